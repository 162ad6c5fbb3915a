"""`gil-exporter diagnose PID` against real workloads: figures, verdict, exit codes, and no
verdict from data it does not have."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from harness import exporter_command
from test_unprivileged import world_readable_install  # noqa: F401 (fixture)
from workloads import start_workload


def diagnose(pid, *extra, seconds="3"):
    return subprocess.run(exporter_command() + ["diagnose", str(pid), "--seconds", seconds, *extra],
                          capture_output=True, text=True, timeout=90)


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
    assert fig["gil_sampled_seconds"] >= 0.6 * 3
    assert verdict["contended"] is (code == 1)
    if kind:
        assert verdict["kind"] == kind
        assert verdict["advice"]
    if workload == "cpu":
        assert any("ProcessPoolExecutor" in a for a in verdict["advice"])
        assert fig["score"] >= 0.7
        assert round(fig["busy_threads"]) == 3 and fig["top_thread_share"] < 0.5
    if workload == "starved":
        assert fig["top_thread_share"] >= 0.65
    assert not any("ptrace" in a for a in verdict["advice"])  # measured: nothing to grant


def test_human_output_names_the_figures():
    with start_workload("cpu", threads=3) as w:
        r = diagnose(w.pid)
    assert r.returncode == 1
    for word in ("threads", "CPU cores used", "threads sharing the CPU", "voluntary switches/s",
                 "switch interval", "GIL held", "mean threads waiting", "GIL handoffs/s",
                 "GIL sampled", "contention score (gil_state)", "CONTENDED"):
        assert word in r.stdout


def test_short_windows_use_the_gil_figures():
    """Issue 11: a window whose first tick predated the first GIL sample lost the GIL figures,
    and diagnose gave a /proc verdict although the probe was fine. Short windows hit it most."""
    with start_workload("sleep", threads=3) as w:
        for _ in range(4):
            r = diagnose(w.pid, "--json", seconds="1")
            assert r.returncode == 0, r.stdout + r.stderr
            fig = json.loads(r.stdout)["figures"]
            assert fig["score_method"] == "gil_state" and fig["score"] is not None, fig
            assert "estimated from /proc" not in r.stdout


def test_missing_process_is_an_error():
    r = diagnose(2 ** 22 + 7)
    assert r.returncode == 2
    assert "no process" in r.stderr and "Traceback" not in r.stderr


def test_not_a_python_process():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        r = diagnose(proc.pid, "--json")
    finally:
        proc.kill()
        proc.wait()
    assert r.returncode == 2, r.stdout + r.stderr
    assert "is not a Python process" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(r.stdout) == {"pid": proc.pid, "error": r.stderr.split(": ", 1)[1].strip()}
    assert "verdict" not in r.stdout


def test_process_exiting_during_the_measurement():
    code = "import threading, time\n" \
           "threading.Thread(target=lambda: time.sleep(60), daemon=True).start()\n" \
           "print('ready', flush=True)\ntime.sleep(1.5)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        r = diagnose(proc.pid, seconds="4")
    finally:
        proc.kill()
        proc.wait()
    assert r.returncode == 2, r.stdout + r.stderr
    assert "exited during the measurement" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_bad_arguments():
    r = subprocess.run(exporter_command() + ["diagnose", "1", "--seconds", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "must be positive" in r.stderr


def test_top_level_help_mentions_diagnose():
    r = subprocess.run(exporter_command() + ["--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert "gil-exporter diagnose PID" in r.stdout and "--seconds" in r.stdout


def test_probe_unavailable_says_why(world_readable_install):
    """As `nobody` against root's CPython: the probe is unavailable, and the /proc verdict says
    why (permission_denied), and advises granting ptrace access (nobody has none)."""
    from test_unprivileged import SYSTEM_PYTHON
    with start_workload("cpu", threads=3) as w:
        env = {"PYTHONPATH": str(world_readable_install), "PATH": "/usr/bin:/bin", "HOME": "/"}
        r = subprocess.run([SYSTEM_PYTHON, "-m", "exporter", "diagnose", str(w.pid), "--seconds", "3",
                            "--json"], capture_output=True, text=True, timeout=90, env=env, cwd="/",
                           user="nobody")
    assert r.returncode in (1, 2), r.stdout + r.stderr  # 2: /proc cannot tell on a busy host
    out = json.loads(r.stdout)
    fig, verdict = out["figures"], out["verdict"]
    assert fig["gil_probe"] == "permission_denied" and fig["score_method"] == "procfs"
    assert fig["held_ratio"] is None
    assert any("GIL probe is unavailable (permission_denied" in a and "give the exporter ptrace" in a
               for a in verdict["advice"]), verdict
    if r.returncode == 1:
        assert verdict["kind"] == "cpu_threads_serialized" and fig["score"] >= 0.5
    else:
        assert verdict["kind"] == "unknown" and fig["score"] is None
        assert "cannot tell" in verdict["headline"]


def test_diagnose_samples_a_process_without_waiters_at_the_full_rate():
    """The daemon samples a process without waiters at 2 Hz (unbiased over time); diagnose's
    few-second window would then rest on a handful of samples. Its Monitor reads every tick:
    compare the reads of the two on the same sleeping process, over the same time."""
    import time

    from exporter import diagnose as diagnose_mod
    from exporter.monitor import Monitor
    with start_workload("sleep") as w:
        reads = {}
        for name, kwargs in (("daemon", {}), ("diagnose", {"idle_ticks": 1})):
            m = Monitor(diagnose_mod._config(w.pid, 3.0, 100.0), tick_seconds=0.5, **kwargs)
            m.start()
            try:
                deadline = time.monotonic() + 30
                while not (m.sampler.reads and m.sampler.ticks) and time.monotonic() < deadline:
                    time.sleep(0.1)            # located and sampled once
                r0, t0 = m.sampler.reads, m.sampler.ticks
                time.sleep(3.0)
                reads[name] = (m.sampler.reads - r0, m.sampler.ticks - t0)
            finally:
                m.stop()
        daemon_reads, _ = reads["daemon"]
        diag_reads, diag_ticks = reads["diagnose"]
        assert diag_reads >= 0.95 * diag_ticks and diag_ticks >= 50, reads   # every tick it woke
        assert daemon_reads * 5 < diag_reads, reads                            # 2 Hz against 100
