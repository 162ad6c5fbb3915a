"""exporter.kube: cgroup parsing on recorded /proc/PID/cgroup files, and pod name
resolution against a local HTTP server that serves a recorded pod list."""
from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exporter.kube import ContainerRef, PodMeta, PodResolver, parse_cgroup, read_container_ref

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
    """Serves GET /api/v1/pods from a recorded pod list; records every request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.body = (DATA / "kube" / "pods.json").read_bytes()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                server.requests.append({"path": url.path,
                                        "query": urllib.parse.parse_qs(url.query),
                                        "authorization": self.headers.get("Authorization")})
                if url.path != "/api/v1/pods":
                    self.send_error(404)
                    return
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self.send_error(401)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

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
    assert meta == PodMeta("shop", "checkout-api-7d9f8b6c5-x2k4p", "app")
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
        "shop", "worker-5b6c7d8e9f-abcde", "worker")
    assert api.requests[0]["authorization"] == f"Bearer {TOKEN}"


def test_cache_hit_two_resolves_one_request(api):
    resolver = make_resolver(api)
    a = resolver.resolve(ref_of("v2-containerd-systemd.txt"))
    b = resolver.resolve(ref_of("v1-docker-cgroupfs.txt"))
    c = resolver.resolve(ref_of("v2-crio-cgroupfs.txt"))  # second container of a pod
    assert a == PodMeta("shop", "checkout-api-7d9f8b6c5-x2k4p", "app")
    assert b == PodMeta("batch", "etl-28374651-zzq8r", "etl")
    assert c == PodMeta("shop", "worker-5b6c7d8e9f-abcde", "reporter")
    assert len(api.requests) == 1


def test_static_pod_resolves_through_mirror_annotation(api):
    resolver = make_resolver(api)
    assert resolver.resolve(ref_of("v2-containerd-systemd-static-pod.txt")) == PodMeta(
        "kube-system", "metrics-agent-node-a", "agent")


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
    assert resolver.resolve(new_pod) == PodMeta("shop", "checkout-api-7d9f8b6c5-newpd", "app")
    assert len(api.requests) == 2
    # Known again: cache hit, and the old pods are still known.
    assert resolver.resolve(new_pod) is not None
    assert resolver.resolve(ref_of("v2-docker-systemd.txt")) == PodMeta("batch", "etl-28374651-zzq8r", "etl")
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
    assert resolver.resolve(known) == PodMeta("shop", "checkout-api-7d9f8b6c5-x2k4p", "app")


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
