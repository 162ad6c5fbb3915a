"""`gil-exporter diagnose --pod` and `top --namespace` on real CPython processes made to look
like a pod's containers: each container is a cgroup named as the kubelet's systemd driver and
containerd name them (kubepods-…-pod<UID>.slice/cri-containerd-<ID>.scope, in the host's
cgroup v2 hierarchy) holding a PID namespace of its own (unshare --pid), so the container's PIDs
differ from the node's. The pod list comes from test_kube's fake API server over TLS, and the
CLI runs as in the exporter's pod: its service account mounted at the kubelet's path (in a
private mount namespace), KUBERNETES_SERVICE_HOST/PORT and NODE_NAME set."""
from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from harness import exporter_command
from test_kube import DATA, NODE, TOKEN, FakeApiServer, api_tls  # noqa: F401 (fixture)
from workloads import script

SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def cgroup2_root() -> Path | None:
    """Where the host's cgroup v2 hierarchy is mounted, if a test may make cgroups in it."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            root = Path(left.split()[4])
            return root if os.access(root, os.W_OK) else None
    return None


class FakePod:
    """A pod's containers on this host: a cgroup each, named as on a kubelet node, and in each
    a PID namespace whose PID 1 is a shell that starts the container's commands."""

    def __init__(self, namespace: str, name: str):
        root = cgroup2_root()
        if root is None:
            pytest.skip("no writable cgroup v2 hierarchy here")
        self.namespace, self.name, self.uid = namespace, name, str(uuid.uuid4())
        self.top = root / f"gil-exporter-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.slice = (self.top / "kubepods.slice" / "kubepods-burstable.slice"
                      / f"kubepods-burstable-pod{self.uid.replace('-', '_')}.slice")
        self.containers: dict[str, str] = {}      # name -> container ID
        self.procs: list[subprocess.Popen] = []
        self.inner: dict[str, int] = {}           # workload -> its PID inside the container

    def cgroup(self, container: str) -> Path:
        return self.slice / f"cri-containerd-{self.containers[container]}.scope"

    def start(self, container: str, workloads: list[str] = (), other: str = "") -> None:
        """The container's PID 1 starts each CPython workload (and `other`, a command that is
        not Python) and says each workload's PID as the container sees it."""
        self.containers[container] = uuid.uuid4().hex + uuid.uuid4().hex
        cg = self.cgroup(container)
        cg.mkdir(parents=True)
        inner = "".join(f'{shlex.quote(sys.executable)} -u -c "$W{i}" gil-workload {w} & '
                        f'echo "{w} $!"; ' for i, w in enumerate(workloads))
        inner += (f"{other} & " if other else "") + "wait"
        env = dict(os.environ, WORKLOAD_THREADS="3", **{f"W{i}": script(w) for i, w in enumerate(workloads)})
        env.pop("PYTHONPATH", None)
        cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec unshare --pid --fork --kill-child '
               '--mount-proc sh -c "$1"', str(cg), inner]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.procs.append(proc)
        ready, deadline = 0, time.monotonic() + 30
        while (ready < len(workloads) or len(self.inner) < len(workloads)) and time.monotonic() < deadline:
            words = proc.stdout.readline().split()
            if words == ["ready"]:
                ready += 1
            elif len(words) == 2 and words[0] in workloads:
                self.inner[words[0]] = int(words[1])
            elif not words:
                raise RuntimeError(f"container {container} stopped")
        assert ready == len(workloads), f"container {container}: workloads did not start"

    def node_pids(self, container: str) -> dict[str, int]:
        """The container's workloads by their node PID, from the cgroup as the host sees it."""
        out = {}
        for pid in (self.cgroup(container) / "cgroup.procs").read_text().split():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"gil-workload" in argv:
                out[argv[argv.index(b"gil-workload") + 1].decode()] = int(pid)
        return out

    def api_item(self, template: dict) -> dict:
        """This pod in the API's own shape (a copy of a real item's, re-named)."""
        item = copy.deepcopy(template)
        meta = item["metadata"]
        meta.update(name=self.name, namespace=self.namespace, uid=self.uid)
        status = item["status"]
        status.pop("initContainerStatuses", None)
        base = status["containerStatuses"][0]
        status["containerStatuses"] = [dict(copy.deepcopy(base), name=n, containerID=f"containerd://{cid}")
                                       for n, cid in self.containers.items()]
        return item

    def stop(self) -> None:
        for p in self.procs:
            p.kill()           # unshare --kill-child: the container's PID 1 and all in it go
            p.wait(timeout=10)
        for cg in sorted(self.top.rglob("*.scope")) + sorted(self.top.rglob("*.slice"), reverse=True):
            for _ in range(50):
                try:
                    cg.rmdir()
                    break
                except OSError:  # processes still leaving
                    time.sleep(0.1)
        self.top.rmdir()


def pod_list(*pods: FakePod) -> bytes:
    doc = json.loads((DATA / "kube" / "pods.json").read_text())
    template = doc["items"][0]
    doc["items"] += [p.api_item(template) for p in pods]
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


@pytest.fixture(scope="module")
def cluster(api_tls, tmp_path_factory):
    """The fake API (TLS, the service account's CA) serving this node's pods: test_kube's and
    shop/checkout-fake, whose container app runs a contended and an idle CPython and whose
    container sidecar runs no Python; and batch/no-python with a shell only."""
    shop = FakePod("shop", "checkout-fake-7d9f8b6c5-abcde")
    other = FakePod("batch", "no-python-28374651-q8r2z")
    server = FakeApiServer(tls=(str(api_tls / "apiserver.crt"), str(api_tls / "apiserver.key")))
    try:
        shop.start("app", ["cpu", "sleep"])
        shop.start("sidecar", other="sleep 600")
        other.start("main", other="sleep 600")
        server.body = pod_list(shop, other)
        sa = tmp_path_factory.mktemp("serviceaccount")
        (sa / "token").write_text(TOKEN)
        (sa / "ca.crt").write_text((api_tls / "ca.crt").read_text())
        yield {"server": server, "shop": shop, "other": other, "sa": sa}
    finally:
        server.stop()
        shop.stop()
        other.stop()


def in_pod(cluster, args: list[str], env: dict | None = None, sa: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess:
    """gil-exporter as in the exporter's pod: the service account at the kubelet's path (a
    tmpfs on /run in a private mount namespace; /var/run is /run), the API's address and the
    node's name in the environment."""
    server = cluster["server"]
    env = {**os.environ, "KUBERNETES_SERVICE_HOST": "127.0.0.1",
           "KUBERNETES_SERVICE_PORT": str(server.port), "NODE_NAME": NODE, **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    mount = (f"mount -t tmpfs -o size=1m tmpfs /run && mkdir -p {SA_PATH} && "
             f"cp {shlex.quote(str(cluster['sa']))}/* {SA_PATH}/ && " if sa else "")
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f'{mount}exec "$@"', "sh", *exporter_command(), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_diagnose_pod_measures_each_python_process_with_both_pids(cluster):
    shop = cluster["shop"]
    node = shop.node_pids("app")
    seen = len(cluster["server"].requests)
    r = in_pod(cluster, ["diagnose", "--pod", f"shop/{shop.name}", "--seconds", "3", "--json"])
    assert r.returncode == 1, r.stdout + r.stderr     # the worst: the contended process
    out = json.loads(r.stdout)
    assert (out["namespace"], out["pod"], out["node"], out["exit_code"]) == ("shop", shop.name, NODE, 1)
    by_pid = {p["pid"]: p for p in out["processes"]}
    assert sorted(by_pid) == sorted(node.values())    # the two CPythons; not sh, not sleep
    for workload, code, contended in (("cpu", 1, True), ("sleep", 0, False)):
        p = by_pid[node[workload]]
        # the PID the container itself gave ($! of its shell), beside the node's
        assert p["container_pid"] == shop.inner[workload] != p["pid"]
        assert p["container"] == "app" and p["exit_code"] == code
        d = p["diagnose"]
        assert d["figures"]["pid"] == p["pid"] and d["figures"]["gil_probe"] == "ok"
        assert d["verdict"]["contended"] is contended
    assert by_pid[node["cpu"]]["diagnose"]["verdict"]["kind"] == "cpu_threads_serialized"
    # the daemon's own listing: this node's pods, with its service account's token
    (req,) = cluster["server"].requests[seen:]
    assert req["query"]["fieldSelector"] == [f"spec.nodeName={NODE}"]
    assert req["authorization"] == f"Bearer {TOKEN}"


def test_diagnose_pod_text_names_the_container_pid(cluster):
    shop = cluster["shop"]
    node = shop.node_pids("app")
    r = in_pod(cluster, ["diagnose", "--pod", f"shop/{shop.name}/app", "--seconds", "2"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"--pod shop/{shop.name}/app: 2 Python processes on node {NODE}" in r.stdout
    for workload in ("cpu", "sleep"):
        assert (f"=== pid {node[workload]} (pid {shop.inner[workload]} in container app) ==="
                in r.stdout)
        assert f"gil-exporter diagnose: pid {node[workload]} (" in r.stdout
    assert "CONTENDED: " in r.stdout and "OK: " in r.stdout


@pytest.mark.parametrize("pod,message", [
    ("shop/{shop}/sidecar", "pod shop/{shop}/sidecar has no Python process (3 other processes: sh, sleep, unshare)"),
    ("batch/{other}", "pod batch/{other} on node node-a has no Python process (3 other processes: sh, sleep, unshare)"),
    ("shop/{shop}/nope", "pod shop/{shop} has no running container 'nope' (its containers: app, sidecar)"),
    ("shop/checkout-elsewhere-1", "pod shop/checkout-elsewhere-1 is not on node node-a: run this in "
                                  "the gil-exporter pod on the pod's node"),
    ("shop", "--pod 'shop': expected NAMESPACE/POD or NAMESPACE/POD/CONTAINER"),
    ("Shop/x", "--pod 'Shop/x': not a Kubernetes namespace/pod[/container] name"),
])
def test_diagnose_pod_without_python_processes_exits_2(cluster, pod, message):
    names = {"shop": cluster["shop"].name, "other": cluster["other"].name}
    r = in_pod(cluster, ["diagnose", "--pod", pod.format(**names), "--json"], timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message.format(**names) in r.stderr
    assert json.loads(r.stdout)["error"].startswith(message.format(**names)[:30])
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("env,sa,message", [
    ({"KUBERNETES_SERVICE_HOST": None}, True, "not in a Kubernetes pod: KUBERNETES_SERVICE_HOST is not set"),
    ({}, False, f"no service account token at {SA_PATH}/token"),
    ({"NODE_NAME": None}, True, "NODE_NAME is not set"),
])
def test_not_in_a_cluster_says_why(cluster, env, sa, message):
    seen = len(cluster["server"].requests)
    r = in_pod(cluster, ["diagnose", "--pod", "shop/x"], env=env, sa=sa, timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    top = in_pod(cluster, ["top", "--namespace", "shop"], env=env, sa=sa, timeout=30)
    assert top.returncode == 2 and message in top.stderr, top.stderr
    assert len(cluster["server"].requests) == seen    # asked nothing of the API


def test_api_unreachable_is_one_line(cluster):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                          # nothing listens there now
    r = in_pod(cluster, ["diagnose", "--pod", "shop/x", "--log.level", "error"],
               env={"KUBERNETES_SERVICE_PORT": str(port)}, timeout=30)
    assert r.returncode == 2
    assert f"listing the pods of node {NODE} from https://127.0.0.1:{port} failed:" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_top_namespace_filter_on_the_daemons_pod_labels(cluster, api_tls):
    """top's Monitor labels processes with their pod through the daemon's lookup (the fake
    API, over TLS): --namespace shows only that namespace's processes, n steps to every
    process and back."""
    from workloads import start_workload

    from exporter import kube
    from exporter.config import Config, Limits, Match, Sampling, Target
    from exporter.monitor import Monitor
    from exporter.top import TopView, parse_keys

    resolver = kube.PodResolver(cluster["server"].url, NODE, token=TOKEN,
                                ca_path=str(api_tls / "ca.crt"))

    def labels(pid):  # as cli._pod_resolver's
        from exporter import procfs
        ref = kube.parse_cgroup(procfs.cgroup(pid))
        meta = resolver.resolve(ref) if ref else None
        return (("namespace", meta.namespace), ("pod", meta.pod), ("container", meta.container)) if meta else ()

    shop = set(cluster["shop"].node_pids("app").values())
    with start_workload("sleep", threads=1) as host:
        pids = sorted(shop | {host.pid})
        config = Config(targets=tuple(Target(name=f"t{p}", match=Match(pid=p)) for p in pids),
                        scan_interval_seconds=1.0, window_seconds=2.0,
                        sampling=Sampling(rate_hz=10.0, enabled=True), limits=Limits())
        monitor = Monitor(config, tick_seconds=0.5, pod_resolver=labels)
        monitor.start()
        try:
            view = TopView(monitor, namespace="shop")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                view.refresh()
                if {r.pid for r in view.rows} == shop:
                    break
                time.sleep(0.2)
            assert {r.pid for r in view.rows} == shop and {r.namespace for r in view.rows} == {"shop"}
            assert view.namespaces == ["shop"]
            assert parse_keys(b"n") == ["namespace"]
            view.key("namespace")                      # shop -> every process
            assert view.namespace is None and {r.pid for r in view.rows} == set(pids)
            view.key("namespace")                      # -> shop again
            assert view.namespace == "shop" and {r.pid for r in view.rows} == shop
        finally:
            monitor.stop()
