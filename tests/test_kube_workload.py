"""The `workload` and `workload_kind` labels on real processes, from the real daemon: CPython
workloads run in pod-like cgroups with PID namespaces of their own (test_diagnose_pod's
FakePod), the node's pod list comes from test_kube's fake API server over TLS with each pod
owned as kube-apiserver lists it (a Deployment's ReplicaSet, a CronJob's Job, a StatefulSet, no
owner), and the daemon runs as in the exporter's pod (service account at the kubelet's path,
KUBERNETES_SERVICE_HOST/PORT, NODE_NAME). A process outside any pod keeps none of the pod
labels."""
from __future__ import annotations

import copy
import json
import os
import shlex

import harness
import pytest
from test_diagnose_pod import SA_PATH, FakePod
from test_kube import DATA, NODE, TOKEN, FakeApiServer, api_tls  # noqa: F401 (fixture)
from workloads import start_workload

POD_LABELS = ("namespace", "pod", "container", "workload", "workload_kind")


def owned(pod: FakePod, template: dict, owner: dict | None, labels: dict) -> dict:
    """The fake pod as the API lists it, owned by `owner` (None: a bare pod)."""
    item = pod.api_item(template)
    meta = item["metadata"]
    meta["labels"] = labels
    if owner is None:
        meta.pop("ownerReferences", None)
    else:
        meta["ownerReferences"] = [dict(copy.deepcopy(meta["ownerReferences"][0]), **owner)]
    return item


# (namespace, pod, owner reference, pod labels, workload workload_kind the daemon must publish)
PODS = [
    ("shop", "web-6d4cf56db6-q7x2z", {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-6d4cf56db6"},
     {"app": "web", "pod-template-hash": "6d4cf56db6"}, ("web", "Deployment")),
    ("batch", "nightly-report-29012345-k2j4m", {"apiVersion": "batch/v1", "kind": "Job",
                                                 "name": "nightly-report-29012345"},
     {"job-name": "nightly-report-29012345"}, ("nightly-report", "CronJob")),
    ("ml", "db-0", {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db"},
     {"app": "db"}, ("db", "StatefulSet")),
    ("default", "debug-shell", None, {}, ("debug-shell", "Pod")),
]


@pytest.fixture(scope="module")
def fleet(api_tls, tmp_path_factory):
    pods, items = [], []
    template = json.loads((DATA / "kube" / "pods.json").read_text())["items"][0]
    server = FakeApiServer(tls=(str(api_tls / "apiserver.crt"), str(api_tls / "apiserver.key")))
    try:
        for ns, name, owner, labels, _ in PODS:
            pod = FakePod(ns, name)
            pods.append(pod)
            pod.start("app", ["cpu" if ns == "shop" else "sleep"])
            items.append(owned(pod, template, owner, labels))
        doc = json.loads((DATA / "kube" / "pods.json").read_text())
        doc["items"] += items
        server.body = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        sa = tmp_path_factory.mktemp("serviceaccount")
        (sa / "token").write_text(TOKEN)
        (sa / "ca.crt").write_text((api_tls / "ca.crt").read_text())
        yield {"server": server, "pods": pods, "sa": sa}
    finally:
        server.stop()
        for pod in pods:
            pod.stop()


def test_real_processes_carry_their_workload(fleet, exporter, monkeypatch, tmp_path):
    """Every series of a pod's process carries namespace, pod, container, workload and
    workload_kind (the two added after the three it always had); the host process none."""
    plain = harness.exporter_command
    mount = (f"mount -t tmpfs -o size=1m tmpfs /run && mkdir -p {SA_PATH} && "
             f"cp {shlex.quote(str(fleet['sa']))}/* {SA_PATH}/ && ")
    monkeypatch.setattr(harness, "exporter_command", lambda: [
        "unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mount}exec "$@"', "sh", *plain()])
    config = tmp_path / "config.yaml"
    config.write_text("targets:\n  - name: py\n    match: {cmdline: 'gil-workload (cpu|sleep)( kube-host)?$'}\n"
                      "scan_interval_seconds: 1\nwindow_seconds: 2\n")
    env = {**os.environ, "KUBERNETES_SERVICE_HOST": "127.0.0.1",
           "KUBERNETES_SERVICE_PORT": str(fleet["server"].port), "NODE_NAME": NODE}
    want = {}
    for pod, (ns, name, _, _, (workload, kind)) in zip(fleet["pods"], PODS):
        (pid,) = pod.node_pids("app").values()
        want[str(pid)] = {"namespace": ns, "pod": name, "container": "app", "workload": workload,
                          "workload_kind": kind}
    with start_workload("sleep", threads=1, argv_tag="kube-host") as host:
        e = exporter("--config", str(config), env=env)

        def labelled():
            info = {s.labels["pid"]: s.labels for s in e.series("pygil_target_info")}
            return info if all(p in info and "workload" in info[p] for p in want) and str(host.pid) in info else None

        info = e.wait_for(labelled, timeout=60)
        for pid, labels in want.items():
            assert {k: info[pid].get(k) for k in POD_LABELS} == labels, info[pid]
        assert not set(POD_LABELS) & set(info[str(host.pid)]), info[str(host.pid)]
        # the same labels on the figures
        cpu_pid = next(p for p, lab in want.items() if lab["workload"] == "web")
        score = e.wait_for(lambda: e.series("pygil_gil_contention_score", pid=cpu_pid), timeout=60)
        assert {k: score[0].labels.get(k) for k in POD_LABELS} == want[cpu_pid]
        for name in ("pygil_process_threads", "pygil_gil_waiting_threads"):
            (s,) = e.series(name, pid=cpu_pid)
            assert {k: s.labels.get(k) for k in POD_LABELS} == want[cpu_pid], name
    requests = fleet["server"].requests
    assert requests and all(r["query"]["fieldSelector"] == [f"spec.nodeName={NODE}"] for r in requests)
