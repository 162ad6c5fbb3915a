"""`gil-exporter diagnose PID` against real workloads: figures, verdict, exit codes."""
from __future__ import annotations

import json
import subprocess

import pytest

from harness import exporter_command
from workloads import start_workload


def diagnose(pid, *extra):
    return subprocess.run(exporter_command() + ["diagnose", str(pid), "--seconds", "3", *extra],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("workload,code,kind", [
    ("cpu", 1, "cpu_threads_serialized"),
    ("starved", 1, "io_starved_by_cpu"),
    ("hashlib", 0, None),
    ("sleep", 0, None),
])
def test_verdict_and_exit_code(workload, code, kind):
    with start_workload(workload, threads=3) as w:
        r = diagnose(w.pid, "--json")
    assert r.returncode == code, r.stdout + r.stderr
    out = json.loads(r.stdout)
    fig, verdict = out["figures"], out["verdict"]
    assert fig["pid"] == w.pid and fig["gil_probe"] == "ok" and fig["score_method"] == "gil_state"
    assert fig["interval_seconds"] == 0.005
    assert verdict["contended"] is (code == 1)
    if kind:
        assert verdict["kind"] == kind
        assert verdict["advice"]
    if workload == "cpu":
        assert any("ProcessPoolExecutor" in a for a in verdict["advice"])
        assert fig["score"] >= 0.7


def test_human_output_names_the_figures():
    with start_workload("cpu", threads=3) as w:
        r = diagnose(w.pid)
    assert r.returncode == 1
    for word in ("threads", "CPU cores used", "voluntary switches/s", "switch interval", "GIL held",
                 "mean threads waiting", "GIL handoffs/s", "contention score", "CONTENDED"):
        assert word in r.stdout


def test_missing_process_is_an_error():
    r = diagnose(2 ** 22 + 7)
    assert r.returncode == 2
    assert "no process" in r.stderr and "Traceback" not in r.stderr
