"""collector.exposition writes /metrics itself: byte for byte what prometheus_client writes.

The unit test feeds both the same families (views with every label the exporter emits,
including exe paths with quotes, backslashes, newlines and non-ASCII); the daemon test reads
a real exporter with the Accept headers Prometheus sends and parses what comes back.
"""
from __future__ import annotations

import collections
import urllib.request

from harness import write_config
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from workloads import start_workload

from exporter import score
from exporter.collector import GilCollector, exposition
from exporter.http import _openmetrics
from exporter.monitor import HostView, InterpreterGil, ProcessView
from exporter.sampler import GilTotals

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8,"
                     "application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=1.0.0;"
                     "escaping=allow-utf-8;q=0.5,*/*;q=0.1")


def _views():
    exes = ["/usr/bin/python3.12", '/opt/we"ird\\path\nwith newline', "/srv/ünïcode/python", ""]
    out = []
    for i, exe in enumerate(exes * 3):
        figures = None if i % 4 == 3 else score.Figures(
            threads=3 + i, cpu_cores=0.1 * i, voluntary_per_second=1e6 * i, involuntary_per_second=0.5,
            host_cpus=2, gil_enabled=True, contended_ratio=i / 12, held_ratio=1.0, waiting_threads=1e-7 * i,
            interval_seconds=0.005, switches_per_second=123456789.0)
        gil = None if i % 5 == 4 else GilTotals(1.5 * i, 0.5, 1e7, 0.0, 2 ** 40 + i, 0.005, 100 * i, -1,
                                               None if i % 2 else bool(i % 3))
        kube = (("namespace", "ns"), ("pod", f'pod-"{i}"'), ("container", "c")) if i % 3 == 0 else ()
        out.append(ProcessView(
            target=f"target-{i % 2}", pid=1000 + i, exe=exe, python_version="3.12.1" if i % 4 else "",
            implementation="cpython", gil_probe="ok" if i % 3 else "permission_denied", kube=kube,
            threads=3 + i, cpu_user_seconds=12.34 * i, cpu_system_seconds=float(i), voluntary_total=10 ** i,
            involuntary_total=i, figures=figures, gil=gil, gil_enabled=None if i % 3 else bool(i % 2),
            score=None if i % 4 == 1 else i / 12, score_method="gil_state" if i % 2 else "procfs",
            free_threaded=(None, True, False)[i % 3],
            # several GILs on every 4th view; per-thread series on every other one
            interpreters=() if i % 4 else (InterpreterGil(0, gil, 0.5, 0.1, "gil_state"),
                                           InterpreterGil(3, GilTotals(2.0, 1.5, 3.0, 1.0, 7, 0.005, 9, -1),
                                                          None, None, "none")),
            thread_held=None if i % 2 else (("hot-worker", 0, 1.25), ("other", 0, 0.5))
            + ((("1234", 3, 1.5),) if not i % 4 else ())))
    return out


class _Monitor:
    """What GilCollector reads from a Monitor, with fixed contents."""

    def __init__(self):
        self.errors = collections.Counter({"scan": 2, "tick": 0})
        self.dropped = {"target-0": 3}
        self.sampler = None  # build_info reads which loop runs
        self.config = type("C", (), {"targets": tuple(type("T", (), {"name": n})() for n in ("target-0", "target-1"))})()

    def snapshot(self, alive=None):
        return _views()

    def host(self):
        return HostView(2, (0.25, 1.0))


def _without_duration(body: bytes) -> bytes:
    return b"\n".join(line for line in body.split(b"\n")
                      if not line.startswith(b"pygil_exporter_scrape_duration_seconds "))


def test_same_bytes_as_prometheus_client():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GilCollector(_Monitor()))
    ours = exposition(registry.collect(), openmetrics=False)
    theirs = generate_latest(registry)
    assert _without_duration(ours) == _without_duration(theirs)
    ours = exposition(registry.collect(), openmetrics=True)
    theirs = openmetrics_latest(registry)
    assert _without_duration(ours) == _without_duration(theirs)
    assert ours.endswith(b"# EOF\n") and b'exe="/opt/we\\"ird\\\\path\\nwith newline"' in ours


def test_interpreter_and_thread_labels():
    """GIL series by interpreter only for views with several GILs; per-thread series with the
    process's labels (kube ones included) and, there, the interpreter."""
    views = {str(v.pid): v for v in _views()}
    families = {f.name: f for f in GilCollector(_Monitor()).collect()}
    for name, f in families.items():
        for s in f.samples:
            v = views.get(s.labels.get("pid"))
            if v is None:
                continue
            assert {k: s.labels[k] for k in v.labels} == v.labels, s
            several = name.startswith(("pygil_gil_", "pygil_thread_")) and name not in (
                "pygil_gil_enabled", "pygil_gil_contention_score_unknown") and bool(v.interpreters)
            assert ("interpreter" in s.labels) == several, s
    threads = families["pygil_thread_gil_held_seconds"].samples
    assert {(s.labels["pid"], s.labels["thread"], s.labels.get("interpreter"), s.value) for s in threads} == {
        (str(v.pid), t, str(g) if v.interpreters else None, x) for v in views.values() for t, g, x in v.thread_held or ()}
    assert any("namespace" in s.labels for s in threads)
    held = [s for s in families["pygil_gil_held_seconds"].samples if s.labels["pid"] == "1008"]
    assert {(s.labels["interpreter"], s.value) for s in held} == {("0", 0.5), ("3", 1.5)}


def test_formats_chosen_from_accept():
    for accept, expected in [("", False), (PROMETHEUS_ACCEPT, True),
                             ("application/openmetrics-text;version=1.0.0", True),
                             ("text/plain;version=1.0.0;escaping=allow-utf-8", False),
                             ("text/plain;version=1.0.0;escaping=dots", None),
                             ("application/openmetrics-text;version=2.0.0", None)]:
        _, content_type = choose_encoder(accept)
        assert _openmetrics(content_type) is expected, (accept, content_type)


def test_daemon_serves_both_formats(exporter, tmp_path):
    with start_workload("cpu", threads=3, argv_tag="exposition") as w:
        cfg = write_config(tmp_path, "targets:\n  - name: work\n    match:\n      cmdline: 'exposition$'\n"
                                     "scan_interval_seconds: 1\nwindow_seconds: 2\n")
        exp = exporter("--config", str(cfg))
        exp.wait_for(lambda: exp.value("pygil_gil_contention_score", pid=w.pid, method="gil_state") is not None)
        request = urllib.request.Request(exp.base + "/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
            om = {f.name: f for f in parse_openmetrics(r.read().decode())}
        status, text = exp.get("/metrics")
        assert status == 200
        plain = {f.name: f for f in parse_text(text)}
    for families in (om, plain):
        held = [s for s in families["pygil_gil_held_seconds"].samples if s.labels.get("pid") == str(w.pid)]
        assert held and held[0].value > 0
        assert families["pygil_process_threads"].type == "gauge"
    assert om["pygil_gil_switches"].type == "counter"
