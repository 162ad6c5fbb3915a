"""Kubernetes pod metadata for monitored processes.

Two halves:

* ``parse_cgroup(text)`` reads the text of ``/proc/PID/cgroup`` (cgroup v1 or v2;
  systemd or cgroupfs cgroup driver; containerd, CRI-O or Docker runtime) and
  extracts the pod UID and the container ID.  No I/O.
* ``PodResolver`` maps a ``ContainerRef`` to namespace / pod / container names,
  and the workload that owns the pod (``workload_of``), through the Kubernetes
  API: it lists the pods of this node
  (``fieldSelector=spec.nodeName=<NODE_NAME>``), caches the result and lists
  again (rate-limited) when it meets a UID or container it does not know.

Only the standard library is used (urllib + ssl) so that the container image
stays small.  Every network error is logged and turned into ``None``: pod
labels are a convenience, never a reason to fail a scrape.
"""
from __future__ import annotations

import json
import logging
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable

from . import procfs

log = logging.getLogger(__name__)

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# Pod UID: a UUID (dashes; systemd's driver writes them as underscores), or, for
# static pods, the 32-hex config hash that the kubelet uses as the pod UID.
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_UID = rf"(?:{_UUID}|[0-9a-f]{{32}})"

# .../pod<uid>[.slice]/<runtime-prefix><container-id>[.scope]
#   systemd:  kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope
#             kubepods-pod<uid>.slice/crio-<id>.scope, .../docker-<id>.scope
#   cgroupfs: kubepods/burstable/pod<uid>/<id>, kubepods/pod<uid>/crio-<id>
_POD_CONTAINER = re.compile(
    rf"pod(?P<uid>{_UID})(?:\.slice)?/"
    r"(?:(?:cri-containerd|crio|docker|containerd)[-:])?"
    r"(?P<cid>[0-9a-f]{64})(?:\.scope)?(?:/|$)"
)
# A pod cgroup without a container component (e.g. a process in the pod-level cgroup).
_POD_ONLY = re.compile(rf"pod(?P<uid>{_UID})(?:\.slice)?(?:/|$)")


@dataclass(frozen=True)
class ContainerRef:
    pod_uid: str
    container_id: str


# A CronJob names its Jobs <cronjob>-<scheduled time in minutes since the epoch>: 8 digits
# from 1973 to 2160.
_CRONJOB_JOB = re.compile(r"(?P<cronjob>.+)-[0-9]{8,}")


@dataclass(frozen=True)
class Workload:
    """What owns a pod, as alerts and dashboards group replicas: a Deployment, StatefulSet,
    DaemonSet or CronJob by name; a bare pod is its own workload."""
    name: str
    kind: str


def _mapping(value) -> dict:
    """A JSON object, or {} for anything else (a malformed list must not stop the labelling)."""
    return value if isinstance(value, dict) else {}


def workload_of(pod: dict) -> Workload:
    """The workload of a pod, from the pod's own JSON (no further API call):

    * ReplicaSet: the Deployment, the ReplicaSet's name minus the pod's `pod-template-hash`
      label; a ReplicaSet without that label is a workload of its own;
    * Job: the CronJob when the Job's name ends in a CronJob's schedule suffix, else the Job;
    * StatefulSet, DaemonSet, any other controller: the owner as named;
    * Node (a static pod's mirror): the pod name minus `-<node>`, kind StaticPod;
    * no owner: the pod itself, kind Pod.
    """
    meta = _mapping(pod.get("metadata"))
    name = str(meta.get("name") or "")
    refs = meta.get("ownerReferences")
    owners = [o for o in (refs if isinstance(refs, list) else []) if isinstance(o, dict)]
    owner = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    if owner is None or not owner.get("name") or not owner.get("kind"):
        return Workload(name, "Pod")
    kind, owner_name = str(owner["kind"]), str(owner["name"])
    if kind == "ReplicaSet":
        template_hash = str(_mapping(meta.get("labels")).get("pod-template-hash") or "")
        if template_hash and owner_name.endswith("-" + template_hash):
            return Workload(owner_name[:-len(template_hash) - 1], "Deployment")
        return Workload(owner_name, "ReplicaSet")
    if kind == "Job":
        m = _CRONJOB_JOB.fullmatch(owner_name)
        return Workload(m.group("cronjob"), "CronJob") if m else Workload(owner_name, "Job")
    if kind == "Node":
        suffix = "-" + owner_name
        return Workload(name[:-len(suffix)] if name.endswith(suffix) and name != suffix else name,
                        "StaticPod")
    return Workload(owner_name, kind)


@dataclass(frozen=True)
class PodMeta:
    namespace: str
    pod: str
    container: str
    workload: str = ""       # "" only when the pod list did not say (see workload_of)
    workload_kind: str = ""

    def labels(self) -> tuple[tuple[str, str], ...]:
        """The per-process labels on Kubernetes, in exposition order (added, never renamed)."""
        out = (("namespace", self.namespace), ("pod", self.pod), ("container", self.container))
        if self.workload:
            out += (("workload", self.workload), ("workload_kind", self.workload_kind))
        return out


@dataclass(frozen=True)
class PodContainers:
    """One pod of this node as the API lists it: the UIDs its cgroups may carry (the pod's
    UID, and a static pod's config hash) and its containers by container ID."""
    namespace: str
    pod: str
    uids: frozenset
    containers: tuple  # ((container ID, container name), ...)

    def container_names(self) -> list[str]:
        return sorted({name for _, name in self.containers})


def not_in_cluster(environ: dict | None = None,
                   serviceaccount_dir: str = SERVICEACCOUNT_DIR) -> str | None:
    """Why PodResolver.from_environment() finds no cluster, in words; None when it would."""
    env = os.environ if environ is None else environ
    if not env.get("KUBERNETES_SERVICE_HOST"):
        return "not in a Kubernetes pod: KUBERNETES_SERVICE_HOST is not set"
    token = os.path.join(serviceaccount_dir, "token")
    if not os.path.exists(token):
        return f"no service account token at {token} (automountServiceAccountToken is off?)"
    if not env.get("NODE_NAME"):
        return "NODE_NAME is not set (the chart sets it from the downward API's spec.nodeName)"
    return None


def _normalise_uid(uid: str) -> str:
    return uid.replace("_", "-").lower()


def parse_cgroup(text: str) -> ContainerRef | None:
    """Pod UID and container ID from the text of /proc/PID/cgroup, or None outside Kubernetes.

    Handles v2 (``0::/path``) and v1 (``N:controllers:/path``, one line per hierarchy),
    paths relative to a cgroup namespace (``/../..``), and the kind/kubelet.slice nesting.
    Lines are tried in order, v2's unified line first, since v1 hierarchies such as
    ``name=systemd`` can be stale on hybrid hosts.
    """
    paths: list[tuple[int, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        # v2 unified hierarchy first, then the v1 ones in file order.
        rank = 0 if hierarchy == "0" and controllers == "" else 1
        paths.append((rank, path))
    paths.sort(key=lambda p: p[0])
    pod_only: ContainerRef | None = None
    for _, path in paths:
        path = path.lower()
        m = _POD_CONTAINER.search(path)
        if m:
            return ContainerRef(_normalise_uid(m.group("uid")), m.group("cid"))
        if pod_only is None:
            m = _POD_ONLY.search(path)
            if m and "kubepods" in path:
                pod_only = ContainerRef(_normalise_uid(m.group("uid")), "")
    return pod_only


def read_container_ref(pid: int, proc_root: str | None = None) -> ContainerRef | None:
    """parse_cgroup() of /proc/PID/cgroup (procfs.cgroup; `proc_root`: another procfs than
    procfs's root); None when unreadable or not in a pod."""
    try:
        return parse_cgroup(procfs.cgroup(pid, root=proc_root))
    except (procfs.ProcessGone, OSError):
        return None


def _strip_runtime(container_id: str) -> str:
    """'containerd://abc' -> 'abc' (the API prefixes IDs with the runtime's scheme)."""
    return container_id.split("://", 1)[-1].lower()


class PodResolver:
    """Resolve ContainerRef -> PodMeta by listing this node's pods from the API server.

    ``token``/``token_path`` and ``ca_path`` are injectable for tests; the token file is
    re-read on each request because projected service-account tokens rotate.
    """

    def __init__(self, base_url: str, node_name: str, *, token: str | None = None,
                 token_path: str | None = None, ca_path: str | None = None,
                 timeout: float = 5.0, min_refresh_interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self.node_name = node_name
        self._token = token
        self._token_path = token_path
        self._timeout = timeout
        self._min_refresh = min_refresh_interval
        self._clock = clock
        self._lock = threading.Lock()
        # uid -> (ns, name, {cid: container}, workload)
        self._pods: dict[str, tuple[str, str, dict[str, str], Workload]] = {}
        self._last_list: float | None = None
        self.requests = 0  # API list calls made (for tests and debugging)
        self._ssl: ssl.SSLContext | None = None
        if self.base_url.startswith("https://"):
            self._ssl = ssl.create_default_context(cafile=ca_path) if ca_path else ssl.create_default_context()

    @classmethod
    def from_environment(cls, environ: dict | None = None,
                         serviceaccount_dir: str = SERVICEACCOUNT_DIR) -> PodResolver | None:
        """The in-cluster resolver, or None when not running in a Kubernetes pod."""
        env = os.environ if environ is None else environ
        host = env.get("KUBERNETES_SERVICE_HOST")
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        token_path = os.path.join(serviceaccount_dir, "token")
        if not host or not os.path.exists(token_path):
            return None
        node = env.get("NODE_NAME")
        if not node:
            log.warning("in a Kubernetes pod but NODE_NAME is not set (downward API "
                        "spec.nodeName); pod labels disabled")
            return None
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literal
        ca_path = os.path.join(serviceaccount_dir, "ca.crt")
        return cls(f"https://{host}:{port}", node, token_path=token_path,
                   ca_path=ca_path if os.path.exists(ca_path) else None)

    # -- API -------------------------------------------------------------------------
    def _bearer(self) -> str | None:
        if self._token_path:
            try:
                with open(self._token_path, encoding="utf-8") as f:
                    return f.read().strip()
            except OSError as exc:
                log.warning("cannot read service account token %s: %s", self._token_path, exc)
                return self._token
        return self._token

    def _list_pods(self) -> list[dict]:
        items: list[dict] = []
        cont = ""
        for _ in range(100):  # pages; a node holds a few hundred pods at most
            query = {"fieldSelector": f"spec.nodeName={self.node_name}", "limit": "500"}
            if cont:
                query["continue"] = cont
            url = f"{self.base_url}/api/v1/pods?{urllib.parse.urlencode(query)}"
            req = urllib.request.Request(url, headers={"Accept": "application/json",
                                                       "User-Agent": "gil-exporter"})
            token = self._bearer()
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            self.requests += 1
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                body = json.load(resp)
            items.extend(body.get("items") or [])
            cont = (body.get("metadata") or {}).get("continue") or ""
            if not cont:
                break
        return items

    @staticmethod
    def _index(items: list[dict]) -> dict[str, tuple[str, str, dict[str, str], Workload]]:
        pods: dict[str, tuple[str, str, dict[str, str], Workload]] = {}
        for pod in items:
            meta = pod.get("metadata") or {}
            status = pod.get("status") or {}
            containers: dict[str, str] = {}
            for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
                for cs in status.get(key) or []:
                    cid = cs.get("containerID")
                    if cid and cs.get("name"):
                        containers[_strip_runtime(cid)] = cs["name"]
            entry = (meta.get("namespace", ""), meta.get("name", ""), containers, workload_of(pod))
            uid = meta.get("uid")
            if uid:
                pods[uid.lower()] = entry
            # Static pods: the cgroup carries the kubelet's config hash, which the
            # mirror pod in the API exposes as an annotation.
            mirror = (meta.get("annotations") or {}).get("kubernetes.io/config.mirror")
            if mirror:
                pods[mirror.lower()] = entry
        return pods

    def refresh(self) -> bool:
        """List this node's pods now. False (and the old cache kept) on any error."""
        with self._lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        self._last_list = self._clock()
        try:
            items = self._list_pods()
        except (urllib.error.URLError, OSError, ValueError, ssl.SSLError) as exc:
            log.warning("listing pods of node %s from %s failed: %s", self.node_name,
                        self.base_url, exc)
            return False
        self._pods = self._index(items)
        return True

    def find_pod(self, namespace: str, name: str) -> PodContainers | None:
        """The pod `namespace/name` from a fresh list of this node's pods (the cache is
        replaced by it); None when it is not on this node. Raises OSError (urllib's
        errors are OSErrors) or ValueError when the list cannot be had."""
        with self._lock:
            self._last_list = self._clock()
            self._pods = self._index(self._list_pods())
            pods = self._pods
        uids = frozenset(uid for uid, (ns, pod, *_) in pods.items() if (ns, pod) == (namespace, name))
        if not uids:
            return None
        containers = pods[next(iter(uids))][2]
        return PodContainers(namespace, name, uids, tuple(sorted(containers.items())))

    def _lookup(self, ref: ContainerRef) -> PodMeta | None:
        entry = self._pods.get(ref.pod_uid.lower())
        if entry is None:
            return None
        ns, name, containers, workload = entry
        container = containers.get(ref.container_id.lower(), "") if ref.container_id else ""
        return PodMeta(ns, name, container, workload.name, workload.kind)

    def resolve(self, ref: ContainerRef) -> PodMeta | None:
        """PodMeta for ref; lists pods again (at most once per min_refresh_interval) when
        the UID or the container is unknown. Never raises on network errors."""
        try:
            with self._lock:
                meta = self._lookup(ref)
                complete = meta is not None and (meta.container or not ref.container_id)
                if complete:
                    return meta
                now = self._clock()
                if self._last_list is None or now - self._last_list >= self._min_refresh:
                    self._refresh_locked()
                    meta = self._lookup(ref)
                return meta
        except Exception:  # pragma: no cover - defensive: labels must never break a scrape
            log.exception("resolving pod for %s failed", ref)
            return None
