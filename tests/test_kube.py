"""exporter.kube: cgroup parsing on recorded /proc/PID/cgroup files, and pod name resolution
against a local API server that serves a node's pod list in kube-apiserver's own JSON
(tests/data/kube/pods.json: hand-made in the API's shape, checked against Kubernetes' schemas
in strict mode), pages it, and authorizes with the chart's rendered RBAC."""
from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exporter.kube import ContainerRef, PodMeta, PodResolver, Workload, parse_cgroup, read_container_ref, workload_of

DATA = Path(__file__).parent / "data"
CGROUP = DATA / "cgroup"
EXPECTED = json.loads((CGROUP / "expected.json").read_text())
NODE = "node-a"
TOKEN = "test-token-abc123"


# --- parse_cgroup ----------------------------------------------------------------------

def test_every_fixture_has_an_expectation():
    files = sorted(p.name for p in CGROUP.glob("*.txt"))
    assert files == sorted(EXPECTED)
    # The matrix the issue asks for: v1 and v2 x containerd / cri-o / docker x systemd / cgroupfs.
    for v in ("v1", "v2"):
        for rt in ("containerd", "crio", "docker"):
            for drv in ("systemd", "cgroupfs"):
                assert f"{v}-{rt}-{drv}.txt" in EXPECTED
    assert any(k.startswith("host-v1") for k in EXPECTED) and any(k.startswith("host-v2") for k in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parse_cgroup_fixture(name):
    ref = parse_cgroup((CGROUP / name).read_text())
    expected = EXPECTED[name]
    if expected is None:
        assert ref is None
    else:
        assert ref == ContainerRef(**expected)


def test_parse_cgroup_edge_cases():
    assert parse_cgroup("") is None
    assert parse_cgroup("garbage\nno colons here\n") is None
    # Systemd driver writes UID dashes as underscores; the result is the API's form.
    uid = "6f1c2d3e_4b5a_4c7d_8e9f_0a1b2c3d4e5f"
    cid = "ab" * 32
    ref = parse_cgroup(f"0::/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{cid}.scope\n")
    assert ref == ContainerRef(uid.replace("_", "-"), cid)
    # A process in the pod cgroup itself (no container component): pod known, container not.
    ref = parse_cgroup(f"0::/kubepods/burstable/pod{uid.replace('_', '-')}\n")
    assert ref == ContainerRef(uid.replace("_", "-"), "")


def test_read_container_ref(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text((CGROUP / "v2-containerd-systemd.txt").read_text())
    assert read_container_ref(42, proc_root=str(tmp_path)) == ContainerRef(
        **EXPECTED["v2-containerd-systemd.txt"])
    assert read_container_ref(43, proc_root=str(tmp_path)) is None


def test_read_container_ref_of_this_process_outside_kubernetes():
    # The test machine is not a Kubernetes node: our own process has no pod.
    assert read_container_ref(__import__("os").getpid()) is None


# --- PodResolver against a local API server ---------------------------------------------

class FakeApiServer:
    """Serves GET /api/v1/pods from a pod list in kube-apiserver's own JSON; records every request.

    Like the real server it may answer a list in pages smaller than `limit` (`page_size`),
    with metadata.continue and remainingItemCount; with `authorize` it answers 403 to what
    that RBAC check refuses; with `tls` (cert, key) it speaks HTTPS.
    """

    def __init__(self, page_size: int | None = None, authorize=None, tls: tuple[str, str] | None = None):
        self.requests: list[dict] = []
        self.body = (DATA / "kube" / "pods.json").read_bytes()
        self.page_size = page_size
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                server.requests.append({"method": "GET", "path": url.path, "query": query,
                                        "authorization": self.headers.get("Authorization")})
                if url.path != "/api/v1/pods":
                    self.send_error(404)
                    return
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self.send_error(401)
                    return
                if authorize and not authorize("GET", url.path, query):
                    self._send(403, b'{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403}\n')
                    return
                self._send(200, server.page(query))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def page(self, query: dict) -> bytes:
        if not self.page_size:
            return self.body
        doc = json.loads(self.body)
        start = int(query.get("continue", ["0"])[0])
        end = start + min(self.page_size, int(query.get("limit", ["500"])[0]))
        items = doc["items"]
        doc["items"] = items[start:end]
        if end < len(items):
            doc["metadata"]["continue"] = str(end)  # opaque to clients
            doc["metadata"]["remainingItemCount"] = len(items) - end
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"

    def stop(self):
        if not self.thread.is_alive():
            return
        self.httpd.shutdown()
        self.thread.join()
        self.httpd.server_close()


@pytest.fixture
def api():
    server = FakeApiServer()
    yield server
    server.stop()


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def ref_of(name: str) -> ContainerRef:
    return ContainerRef(**EXPECTED[name])


def make_resolver(api, clock=None, **kw) -> PodResolver:
    return PodResolver(api.url, NODE, token=TOKEN, min_refresh_interval=30.0,
                       clock=clock or FakeClock(), **kw)


def test_resolve_lists_this_nodes_pods_with_bearer_token(api):
    resolver = make_resolver(api)
    meta = resolver.resolve(ref_of("v2-containerd-systemd.txt"))
    assert meta == PodMeta("shop", "checkout-api-7d9f8b6c5-x2k4p", "app", "checkout-api", "Deployment")
    assert len(api.requests) == 1
    req = api.requests[0]
    assert req["path"] == "/api/v1/pods"
    assert req["query"]["fieldSelector"] == [f"spec.nodeName={NODE}"]
    assert req["authorization"] == f"Bearer {TOKEN}"


def test_token_file_is_read_per_request(api, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    resolver = PodResolver(api.url, NODE, token_path=str(token_file), clock=FakeClock())
    assert resolver.resolve(ref_of("v2-crio-systemd.txt")) == PodMeta(
        "shop", "worker-5b6c7d8e9f-abcde", "worker", "worker", "Deployment")
    assert api.requests[0]["authorization"] == f"Bearer {TOKEN}"


def test_cache_hit_two_resolves_one_request(api):
    resolver = make_resolver(api)
    a = resolver.resolve(ref_of("v2-containerd-systemd.txt"))
    b = resolver.resolve(ref_of("v1-docker-cgroupfs.txt"))
    c = resolver.resolve(ref_of("v2-crio-cgroupfs.txt"))  # second container of a pod
    assert a == PodMeta("shop", "checkout-api-7d9f8b6c5-x2k4p", "app", "checkout-api", "Deployment")
    assert b == PodMeta("batch", "etl-28374651-zzq8r", "etl", "etl", "CronJob")
    assert c == PodMeta("shop", "worker-5b6c7d8e9f-abcde", "reporter", "worker", "Deployment")
    assert len(api.requests) == 1


def test_static_pod_resolves_through_mirror_annotation(api):
    resolver = make_resolver(api)
    assert resolver.resolve(ref_of("v2-containerd-systemd-static-pod.txt")) == PodMeta(
        "kube-system", "metrics-agent-node-a", "agent", "metrics-agent", "StaticPod")


def test_refresh_on_unknown_uid_is_rate_limited(api):
    clock = FakeClock()
    resolver = make_resolver(api, clock=clock)
    new_pod = ref_of("v1-containerd-systemd.txt")  # UID not in pods.json yet
    assert resolver.resolve(ref_of("v2-containerd-systemd.txt")) is not None
    assert len(api.requests) == 1

    # Unknown UID right after a list: no new request inside the rate-limit interval.
    clock.t += 5
    assert resolver.resolve(new_pod) is None
    assert len(api.requests) == 1

    # The pod appears on the node; past the interval the unknown UID triggers one list.
    api.body = (DATA / "kube" / "pods-after-rollout.json").read_bytes()
    clock.t += 30
    assert resolver.resolve(new_pod) == PodMeta("shop", "checkout-api-7d9f8b6c5-newpd", "app", "checkout-api", "Deployment")
    assert len(api.requests) == 2
    # Known again: cache hit, and the old pods are still known.
    assert resolver.resolve(new_pod) is not None
    assert resolver.resolve(ref_of("v2-docker-systemd.txt")) == PodMeta("batch", "etl-28374651-zzq8r", "etl", "etl", "CronJob")
    assert len(api.requests) == 2


def test_unknown_uid_still_unknown_after_refresh(api):
    clock = FakeClock()
    resolver = make_resolver(api, clock=clock)
    ghost = ContainerRef("00000000-0000-4000-8000-000000000000", "f" * 64)
    assert resolver.resolve(ghost) is None
    clock.t += 1
    assert resolver.resolve(ghost) is None
    assert len(api.requests) == 1


def test_server_down_returns_none_and_keeps_cache(api):
    clock = FakeClock()
    resolver = make_resolver(api, clock=clock, timeout=2.0)
    known = ref_of("v2-containerd-systemd.txt")
    assert resolver.resolve(known) is not None
    api.stop()
    clock.t += 60
    # Unknown UID forces a list, which fails: None, no exception.
    assert resolver.resolve(ref_of("v1-containerd-cgroupfs.txt")) is None
    # The cached pod still resolves.
    assert resolver.resolve(known) == PodMeta("shop", "checkout-api-7d9f8b6c5-x2k4p", "app", "checkout-api", "Deployment")


def test_server_never_reachable_returns_none():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    resolver = PodResolver(f"http://127.0.0.1:{port}", NODE, token=TOKEN, timeout=2.0)
    assert resolver.resolve(ref_of("v2-containerd-systemd.txt")) is None


def test_bad_token_returns_none(api):
    resolver = PodResolver(api.url, NODE, token="wrong", clock=FakeClock())
    assert resolver.resolve(ref_of("v2-containerd-systemd.txt")) is None
    assert len(api.requests) == 1


def test_from_environment(tmp_path):
    assert PodResolver.from_environment(environ={}, serviceaccount_dir=str(tmp_path)) is None
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    # In-cluster variables but no token mounted: not usable.
    assert PodResolver.from_environment(environ=env, serviceaccount_dir=str(tmp_path)) is None
    (tmp_path / "token").write_text(TOKEN)
    # Token but no NODE_NAME (downward API missing): disabled rather than listing the cluster.
    assert PodResolver.from_environment(environ=env, serviceaccount_dir=str(tmp_path)) is None
    resolver = PodResolver.from_environment(environ=dict(env, NODE_NAME=NODE),
                                            serviceaccount_dir=str(tmp_path))
    assert resolver is not None
    assert resolver.base_url == "https://10.96.0.1:443"
    assert resolver.node_name == NODE
    v6 = PodResolver.from_environment(
        environ={"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443",
                 "NODE_NAME": NODE}, serviceaccount_dir=str(tmp_path))
    assert v6.base_url == "https://[fd00::1]:443"


# --- the pod list as kube-apiserver returns it -----------------------------------------------

POD_LIST = json.loads((DATA / "kube" / "pods.json").read_text())
STATUS_KEYS = ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")


def test_pod_list_fixture_has_the_api_shape():
    """pods.json is a PodList in the API's own shape (hand-made, not recorded from a cluster):
    kubernetes-validate in strict mode, which refuses any field Kubernetes does not define,
    accepts the list and every item as a Pod, and it carries what a real node's list carries."""
    import kubernetes_validate
    from test_helm import kube_versions
    newest = kube_versions()[1]
    for name in ("pods.json", "pods-after-rollout.json"):
        raw = (DATA / "kube" / name).read_text()
        assert raw.count("\n") == 1  # compact JSON on one line, as the server sends it
        doc = json.loads(raw)
        kubernetes_validate.validate(doc, newest, strict=True)
        for item in doc["items"]:
            assert "kind" not in item and "apiVersion" not in item  # list items carry neither
            kubernetes_validate.validate(dict(item, apiVersion="v1", kind="Pod"), newest, strict=True)
            meta = item["metadata"]
            assert meta["ownerReferences"] and meta["managedFields"] and meta["resourceVersion"]
            assert item["spec"]["nodeName"] == NODE
    statuses = [cs for p in POD_LIST["items"] for key in STATUS_KEYS for cs in p["status"].get(key, [])]
    ids = [cs["containerID"] for cs in statuses if "containerID" in cs]
    assert ids and all(re.fullmatch(r"containerd://[0-9a-f]{64}", i) for i in ids)
    assert any("containerID" not in cs for cs in statuses)  # a container still being created
    assert {p["metadata"]["ownerReferences"][0]["kind"] for p in POD_LIST["items"]} == {
        "ReplicaSet", "Job", "StatefulSet", "Node"}
    assert {key for p in POD_LIST["items"] for key in STATUS_KEYS if key in p["status"]} == set(STATUS_KEYS)


# --- the workload that owns a pod -------------------------------------------------------------

def _pod(name: str, owners: list[dict] | None, labels: dict | None = None) -> dict:
    """A pod item of pods.json re-owned: the parser reads metadata only."""
    item = json.loads(json.dumps(POD_LIST["items"][0]))
    item["metadata"].update(name=name, labels=labels or {})
    if owners is None:
        item["metadata"].pop("ownerReferences")
    else:
        item["metadata"]["ownerReferences"] = owners
    return item


def _owner(kind: str, name: str, controller: bool = True) -> dict:
    return {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u-" + name, "controller": controller}


def test_workload_of_the_pods_in_the_list():
    """Each owner kind of pods.json, as kube-apiserver lists them: a Deployment's ReplicaSet
    (its name minus the pod-template-hash), a CronJob's Job (its schedule suffix), a
    StatefulSet, a static pod mirrored by its Node."""
    got = {(p["metadata"]["namespace"], p["metadata"]["name"]): workload_of(p) for p in POD_LIST["items"]}
    assert got == {
        ("shop", "checkout-api-7d9f8b6c5-x2k4p"): Workload("checkout-api", "Deployment"),
        ("shop", "worker-5b6c7d8e9f-abcde"): Workload("worker", "Deployment"),
        ("shop", "worker-5b6c7d8e9f-pndng"): Workload("worker", "Deployment"),
        ("batch", "etl-28374651-zzq8r"): Workload("etl", "CronJob"),
        ("ml", "inference-0"): Workload("inference", "StatefulSet"),
        ("kube-system", "metrics-agent-node-a"): Workload("metrics-agent", "StaticPod"),
    }


@pytest.mark.parametrize("pod,want", [
    # Deployment: the hash the ReplicaSet name ends in is the pod's pod-template-hash label.
    (_pod("web-6d4cf56db6-q7x2z", [_owner("ReplicaSet", "web-6d4cf56db6")], {"pod-template-hash": "6d4cf56db6"}),
     Workload("web", "Deployment")),
    # A hyphenated Deployment name keeps its hyphens.
    (_pod("my-api-v2-7f9b-abcde", [_owner("ReplicaSet", "my-api-v2-7f9b")], {"pod-template-hash": "7f9b"}),
     Workload("my-api-v2", "Deployment")),
    # A bare ReplicaSet (no pod-template-hash): the ReplicaSet itself, no guessed suffix.
    (_pod("legacy-rs-x9k2m", [_owner("ReplicaSet", "legacy-rs")]), Workload("legacy-rs", "ReplicaSet")),
    # The label from another ReplicaSet does not strip a name that does not end in it.
    (_pod("odd-abcde", [_owner("ReplicaSet", "odd-rs")], {"pod-template-hash": "123"}), Workload("odd-rs", "ReplicaSet")),
    (_pod("node-agent-4xk2p", [_owner("DaemonSet", "node-agent")]), Workload("node-agent", "DaemonSet")),
    (_pod("db-2", [_owner("StatefulSet", "db")]), Workload("db", "StatefulSet")),
    # CronJob: the Job's name is <cronjob>-<schedule time in minutes>.
    (_pod("nightly-report-29012345-abcde", [_owner("Job", "nightly-report-29012345")]),
     Workload("nightly-report", "CronJob")),
    # A Job made by hand (or by Helm) is its own workload: "migrate-1" is no schedule suffix.
    (_pod("migrate-1-q2x9z", [_owner("Job", "migrate-1")]), Workload("migrate-1", "Job")),
    # No owner: the pod itself.
    (_pod("debug-shell", None), Workload("debug-shell", "Pod")),
    (_pod("debug-shell", []), Workload("debug-shell", "Pod")),
    # The controller reference wins over other owners, whatever their order.
    (_pod("x-0", [_owner("ConfigMap", "cfg", controller=False), _owner("StatefulSet", "x")]),
     Workload("x", "StatefulSet")),
    # Another controller (an operator's custom resource): as it names itself.
    (_pod("cluster-a-0", [_owner("RabbitmqCluster", "cluster-a")]), Workload("cluster-a", "RabbitmqCluster")),
    # A malformed owner (no kind), owners or labels of the wrong type: never an exception.
    (_pod("weird", [{"name": "x"}]), Workload("weird", "Pod")),
    (_pod("weird", {"kind": "StatefulSet"}), Workload("weird", "Pod")),
    (_pod("weird-abc", [_owner("ReplicaSet", "weird")], ["pod-template-hash"]), Workload("weird", "ReplicaSet")),
])
def test_workload_of(pod, want):
    assert workload_of(pod) == want


def test_pod_meta_labels_add_workload_after_the_pod_labels():
    """The kube tuple the daemon publishes: namespace, pod, container as before, then the two
    added labels; a PodMeta without a workload publishes the three it always did."""
    meta = PodMeta("shop", "web-6d4cf56db6-q7x2z", "app", "web", "Deployment")
    assert meta.labels() == (("namespace", "shop"), ("pod", "web-6d4cf56db6-q7x2z"), ("container", "app"),
                             ("workload", "web"), ("workload_kind", "Deployment"))
    assert PodMeta("shop", "p", "c").labels() == (("namespace", "shop"), ("pod", "p"), ("container", "c"))


def test_every_container_in_the_list_resolves(api):
    """Each container ID in the list (app, native sidecar and finished init containers,
    an ephemeral debug container) names its container; a container being created, or the
    previous instance of a restarted one, resolves to its pod only. One list call."""
    resolver = make_resolver(api)
    checked = 0
    for p in POD_LIST["items"]:
        meta = p["metadata"]
        # A static pod's cgroup carries the kubelet's config hash, which the mirror pod shows.
        uid = (meta.get("annotations") or {}).get("kubernetes.io/config.mirror", meta["uid"])
        for key in STATUS_KEYS:
            for cs in p["status"].get(key, []):
                cid = cs.get("containerID", "").split("://", 1)[-1]
                wl = workload_of(p)
                want = PodMeta(meta["namespace"], meta["name"], cs["name"] if cid else "", wl.name, wl.kind)
                assert resolver.resolve(ContainerRef(uid, cid)) == want, (key, cs["name"])
                previous = cs["lastState"].get("terminated", {}).get("containerID")
                if previous:
                    gone = ContainerRef(uid, previous.split("://", 1)[1])
                    assert resolver.resolve(gone) == PodMeta(meta["namespace"], meta["name"], "", wl.name, wl.kind)
                checked += 1
    assert checked >= 9
    assert len(api.requests) == 1


def test_paged_list_is_followed_to_the_end():
    """The API may answer with fewer items than `limit` and a continue token: the resolver
    follows it, sending the same selector with each page."""
    server = FakeApiServer(page_size=2)
    try:
        resolver = make_resolver(server)
        last = POD_LIST["items"][-1]["metadata"]
        wl = workload_of(POD_LIST["items"][-1])
        assert resolver.resolve(ContainerRef(last["uid"], "")) == PodMeta(last["namespace"], last["name"], "",
                                                                         wl.name, wl.kind)
        pages = -(-len(POD_LIST["items"]) // 2)
        assert len(server.requests) == pages
        assert [r["query"].get("continue") for r in server.requests] == [None] + [[str(2 * i)] for i in range(1, pages)]
        for r in server.requests:
            assert r["query"]["fieldSelector"] == [f"spec.nodeName={NODE}"] and r["query"]["limit"] == ["500"]
    finally:
        server.stop()


# --- the chart's RBAC against the call the exporter makes --------------------------------------

def request_attributes(method: str, path: str, query: dict) -> tuple[str, str, str, str]:
    """(verb, apiGroup, resource, namespace) as kube-apiserver derives them from a resource
    request (k8s.io/apiserver RequestInfoFactory): GET on a collection is `list`, or `watch`
    with watch=true; GET on a named object is `get`."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        assert parts[0] == "apis", path
        group, rest = parts[1], parts[3:]
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    assert method == "GET", method
    if query.get("watch", ["false"])[0] in ("true", "1"):
        verb = "watch"
    else:
        verb = "get" if len(rest) > 1 else "list"
    return verb, group, rest[0], namespace


def rbac_rules(rendered, sa_name: str, sa_namespace: str) -> list[tuple[dict, str | None]]:
    """The rules the chart's bindings give one ServiceAccount, each with its scope (None:
    cluster-wide through a ClusterRoleBinding; else the RoleBinding's namespace)."""
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r
             for r in rendered.kind("ClusterRole") + rendered.kind("Role")}
    out = []
    for b in rendered.kind("ClusterRoleBinding") + rendered.kind("RoleBinding"):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa_name and s.get("namespace") == sa_namespace
                   for s in b["subjects"]):
            continue
        scope = None if b["kind"] == "ClusterRoleBinding" else b["metadata"]["namespace"]
        ref = b["roleRef"]
        role = roles[(ref["kind"], None if ref["kind"] == "ClusterRole" else scope, ref["name"])]
        out.extend((rule, scope) for rule in role["rules"])
    return out


def allows(rules, verb: str, group: str, resource: str, namespace: str) -> bool:
    for rule, scope in rules:
        if scope is not None and scope != namespace:
            continue
        if rule.get("resourceNames"):
            continue  # never matches a list
        if ((verb in rule["verbs"] or "*" in rule["verbs"])
                and (group in rule["apiGroups"] or "*" in rule["apiGroups"])
                and (resource in rule["resources"] or "*" in rule["resources"])):
            return True
    return False


@pytest.fixture(scope="module")
def api_tls(tmp_path_factory):
    """A CA (the serviceaccount's ca.crt) and a server certificate for 127.0.0.1."""
    d = tmp_path_factory.mktemp("apiserver-pki")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=kubernetes-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
            "-subj", "/CN=kube-apiserver")
    openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "apiserver.crt", "-days", "2", "-extfile", "san.ext")
    return d


def in_cluster(rendered, pki: Path, tmp_path: Path, server: FakeApiServer) -> PodResolver | None:
    """PodResolver.from_environment() in the chart's pod: the kubelet's service-account mount,
    the DaemonSet's env, the in-cluster API service variables."""
    from exporter.kube import SERVICEACCOUNT_DIR
    assert SERVICEACCOUNT_DIR == "/var/run/secrets/kubernetes.io/serviceaccount"  # the kubelet's path
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(TOKEN)
    (sa_dir / "ca.crt").write_text((pki / "ca.crt").read_text())
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)}
    (c,) = rendered.one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    for e in c.get("env", []):
        if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[e["name"]] = NODE
    return PodResolver.from_environment(environ=env, serviceaccount_dir=str(sa_dir))


def test_charts_rbac_allows_exactly_the_list_call(api_tls, tmp_path):
    """The API server authorizes with the chart's rendered RBAC for its ServiceAccount (the
    token's owner), over TLS with the serviceaccount's CA: the exporter's call is allowed, and
    the role grants nothing the exporter does not call."""
    from test_helm import render, with_repository
    rendered = render(with_repository({}))
    pod = rendered.one("DaemonSet")["spec"]["template"]["spec"]
    sa = rendered.one("ServiceAccount")["metadata"]
    assert pod["serviceAccountName"] == sa["name"] and pod["automountServiceAccountToken"] is True
    rules = rbac_rules(rendered, sa["name"], sa["namespace"])
    server = FakeApiServer(page_size=4, tls=(str(api_tls / "apiserver.crt"), str(api_tls / "apiserver.key")),
                           authorize=lambda m, p, q: allows(rules, *request_attributes(m, p, q)))
    try:
        resolver = in_cluster(rendered, api_tls, tmp_path, server)
        assert resolver is not None and resolver.base_url == server.url
        assert resolver.resolve(ref_of("v2-containerd-systemd.txt")) == PodMeta(
            "shop", "checkout-api-7d9f8b6c5-x2k4p", "app", "checkout-api", "Deployment")
    finally:
        server.stop()
    assert len(server.requests) == 2  # two pages
    calls = {request_attributes(r["method"], r["path"], r["query"]) for r in server.requests}
    assert calls == {("list", "", "pods", "")}  # cluster-wide: the call names no namespace
    granted = {(v, g, res) for rule, _ in rules for v in rule["verbs"] for g in rule["apiGroups"]
               for res in rule["resources"]}
    assert granted == {(v, g, res) for v, g, res, _ in calls}
    assert all(scope is None for _, scope in rules)
    # The same check refuses what the role does not grant.
    for attrs in (("get", "", "pods", "shop"), ("watch", "", "pods", ""), ("list", "", "secrets", ""),
                  ("list", "apps", "pods", "")):
        assert not allows(rules, *attrs), attrs


def test_without_rbac_the_list_is_forbidden_and_pods_stay_unlabelled(api_tls, tmp_path):
    from test_helm import render, with_repository
    rendered = render(with_repository({"rbac": {"create": False}}))
    sa = rendered.one("ServiceAccount")["metadata"]
    rules = rbac_rules(rendered, sa["name"], sa["namespace"])
    assert rules == []
    server = FakeApiServer(tls=(str(api_tls / "apiserver.crt"), str(api_tls / "apiserver.key")),
                           authorize=lambda m, p, q: allows(rules, *request_attributes(m, p, q)))
    try:
        resolver = in_cluster(rendered, api_tls, tmp_path, server)
        assert resolver.resolve(ref_of("v2-containerd-systemd.txt")) is None
    finally:
        server.stop()
    assert len(server.requests) == 1
