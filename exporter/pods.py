"""The Python processes of one Kubernetes pod on this node, for `diagnose --pod`.

A pod is named NAMESPACE/POD[/CONTAINER]. This node's pod list, the daemon's own
(kube.PodResolver: fieldSelector spec.nodeName), gives the pod's UIDs and its containers' IDs,
and each process's /proc/PID/cgroup the pod and container it runs in. The exporter runs with
the node's PID namespace (hostPID), so its PIDs are the node's; NSpid gives each process's PID
in its container as well, the one `ps` shows inside it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from exporter import discover, kube, procfs

# RFC 1123 labels and subdomains: what Kubernetes allows in namespace, pod and container names.
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_NAME = re.compile(_LABEL)


class PodError(Exception):
    """Why a pod's processes cannot be had; printed as one line, exit 2."""


@dataclass(frozen=True)
class PodName:
    namespace: str
    pod: str
    container: str = ""  # "" every container of the pod

    @classmethod
    def parse(cls, text: str) -> PodName:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise PodError(f"--pod {text!r}: expected NAMESPACE/POD or NAMESPACE/POD/CONTAINER")
        ns, pod, container = parts[0], parts[1], parts[2] if len(parts) == 3 else ""
        if not (_NAME.fullmatch(ns) and len(pod) <= 253 and _SUBDOMAIN.fullmatch(pod)
                and (not container or _NAME.fullmatch(container))):
            raise PodError(f"--pod {text!r}: not a Kubernetes namespace/pod[/container] name")
        return cls(ns, pod, container)

    def __str__(self) -> str:
        return "/".join(p for p in (self.namespace, self.pod, self.container) if p)


@dataclass(frozen=True)
class PodProcess:
    pid: int            # the node's PID (the `pid` label)
    container_pid: int  # the same process's PID in its container's PID namespace
    container: str      # "" when the pod list does not name its container ID
    comm: str


@dataclass(frozen=True)
class PodProcesses:
    node: str
    pod: kube.PodContainers
    python: tuple[PodProcess, ...]
    others: tuple[str, ...]  # comm of the pod's processes that are not Python


def resolver(environ: dict | None = None,
             serviceaccount_dir: str = kube.SERVICEACCOUNT_DIR) -> kube.PodResolver:
    """The daemon's in-cluster resolver; PodError saying why when not in a cluster."""
    why = kube.not_in_cluster(environ, serviceaccount_dir)
    found = None if why else kube.PodResolver.from_environment(environ, serviceaccount_dir)
    if found is None:
        raise PodError(f"--pod needs the exporter's pod on the target's node: {why}")
    return found


def _process(pid: int, container: str) -> tuple[PodProcess, bool] | None:
    """The process and whether it is CPython; None when it is gone or unreadable."""
    try:
        info = procfs.process_info(pid)
        ns = procfs.ns_pids(pid)
        python = discover.is_cpython(info)
    except (procfs.ProcessGone, PermissionError):
        return None
    return PodProcess(pid, ns[-1], container, info.comm), python


def find(name: PodName, pods: kube.PodResolver) -> PodProcesses:
    """The processes of pod `name` on this node, Python ones by node PID; PodError when the
    pod is not on this node, has no such container, or the pod list cannot be had."""
    try:
        pod = pods.find_pod(name.namespace, name.pod)
    except (OSError, ValueError) as e:
        raise PodError(f"listing the pods of node {pods.node_name} from {pods.base_url} "
                       f"failed: {e}") from None
    if pod is None:
        raise PodError(f"pod {name.namespace}/{name.pod} is not on node {pods.node_name}: run "
                       f"this in the gil-exporter pod on the pod's node (`kubectl get pod -n "
                       f"{name.namespace} {name.pod} -o wide` shows the node)")
    names = dict(pod.containers)
    if name.container and name.container not in names.values():
        raise PodError(f"pod {name.namespace}/{name.pod} has no running container "
                       f"{name.container!r} (its containers: {', '.join(pod.container_names()) or 'none yet'})")
    python, others = [], []
    me = os.getpid()
    for pid in sorted(procfs.pids()):
        if pid == me:
            continue
        try:
            ref = kube.parse_cgroup(procfs.cgroup(pid))
        except (procfs.ProcessGone, PermissionError):
            continue
        if ref is None or ref.pod_uid not in pod.uids:
            continue
        container = names.get(ref.container_id, "")
        if name.container and container != name.container:
            continue
        found = _process(pid, container)
        if found is not None:
            (python if found[1] else others).append(found[0])
    return PodProcesses(pods.node_name, pod, tuple(python), tuple(p.comm for p in others))
