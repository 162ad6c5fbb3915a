"""`diagnose --pod` from the container image, run as the chart's DaemonSet runs it (test_image's
Pod: the image's root filesystem, hostPID, only SYS_PTRACE, read-only root), against
test_diagnose_pod's pod: real CPythons in pod-like cgroups with a PID namespace of their own,
and the fake pod API over TLS. What the kubelet adds to the container is added here too: the
service account token and CA at the kubelet's path, and KUBERNETES_SERVICE_HOST/PORT."""
from __future__ import annotations

import json
import os

from test_diagnose_pod import SA_PATH, cluster  # noqa: F401 (fixture)
from test_helm import render, with_repository
from test_image import Pod, image  # noqa: F401 (fixture)
from test_kube import NODE, api_tls  # noqa: F401 (fixture)


def test_diagnose_pod_in_the_image(image, cluster, tmp_path):  # noqa: F811
    pod = Pod(image, render(with_repository({})), tmp_path)
    try:
        # the service account as the kubelet mounts it (/var/run is a link to /run in Debian)
        var_run = pod.rootfs / "var" / "run"
        run = pod.rootfs / os.readlink(var_run).lstrip("/") if var_run.is_symlink() else var_run
        sa = run / SA_PATH.removeprefix("/var/run/")
        sa.mkdir(parents=True)
        for name in ("token", "ca.crt"):
            (sa / name).write_text((cluster["sa"] / name).read_text())
        shop = cluster["shop"]
        node = shop.node_pids("app")
        r = pod.run(["/usr/bin/env", "KUBERNETES_SERVICE_HOST=127.0.0.1",
                     f"KUBERNETES_SERVICE_PORT={cluster['server'].port}",
                     "/opt/gil-exporter/bin/gil-exporter", "diagnose", "--pod",
                     f"shop/{shop.name}/app", "--seconds", "3", "--json"])
    finally:
        pod.close()
    assert r.returncode == 1, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["node"] == NODE
    got = {p["pid"]: (p["container_pid"], p["exit_code"]) for p in out["processes"]}
    assert got == {node["cpu"]: (shop.inner["cpu"], 1), node["sleep"]: (shop.inner["sleep"], 0)}
    for p in out["processes"]:
        assert p["diagnose"]["figures"]["gil_probe"] == "ok"
