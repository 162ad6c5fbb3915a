"""`gil-exporter diagnose PID`: the daemon's measurement, once, for a person at a terminal."""
from __future__ import annotations

import dataclasses
import json
import sys
import time

from exporter import procfs, score
from exporter.config import Config, Limits, Match, Sampling, Target
from exporter.monitor import Monitor, ProcessView

EXIT_OK, EXIT_CONTENDED, EXIT_ERROR = 0, 1, 2


def measure(pid: int, seconds: float, rate_hz: float = 100.0) -> ProcessView | None:
    """Track one process like the daemon does, for `seconds` after its GIL probe settled."""
    config = Config(
        targets=(Target(name="diagnose", match=Match(pid=pid)),),
        scan_interval_seconds=3600.0,
        window_seconds=seconds,
        sampling=Sampling(rate_hz=rate_hz, enabled=True),
        limits=Limits(),
    )
    tick = min(1.0, max(0.1, seconds / 5))
    monitor = Monitor(config, tick_seconds=tick)
    monitor.start()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # wait until the GIL is located (or known unreadable)
            views = monitor.snapshot()
            if not views and monitor.ready.is_set() and not _exists(pid):
                return None
            if views and views[0].gil_probe != "pending":
                break
            time.sleep(0.05)
        time.sleep(seconds + tick)
        views = monitor.snapshot()
        return views[0] if views else None
    finally:
        monitor.stop()


def _exists(pid: int) -> bool:
    try:
        procfs.start_time(pid)
        return True
    except (procfs.ProcessGone, PermissionError):
        return False


def report(view: ProcessView) -> tuple[dict, score.Verdict]:
    f = view.figures
    v = score.verdict(f)
    figures = {
        "pid": view.pid,
        "exe": view.exe,
        "python_version": view.python_version,
        "gil_probe": view.gil_probe,
        **dataclasses.asdict(f),
        "score": view.score,
        "score_method": view.score_method,
    }
    return figures, v


def _line(label: str, value, fmt: str = "", unit: str = "") -> str:
    shown = "n/a" if value is None else (format(value, fmt) + unit)
    return f"  {label:<32}{shown}"


def render(figures: dict, v: score.Verdict) -> str:
    interval = figures.get("interval_seconds")
    lines = [
        f"gil-exporter diagnose: pid {figures['pid']} ({figures['exe'] or '?'}), "
        f"Python {figures['python_version'] or 'unknown'}",
        _line("threads", figures["threads"]),
        _line("CPU cores used", figures["cpu_cores"], ".2f", f" of {figures['host_cpus']}"),
        _line("voluntary switches/s", figures["voluntary_per_second"], ".0f"),
        _line("involuntary switches/s", figures["involuntary_per_second"], ".0f"),
        _line("GIL probe", figures["gil_probe"]),
        _line("switch interval", None if interval is None else interval * 1000, ".2f", " ms"),
        _line("GIL held", figures.get("held_ratio"), ".0%"),
        _line("mean threads waiting", figures.get("waiting_threads"), ".2f"),
        _line("GIL handoffs/s", figures.get("switches_per_second"), ".0f"),
        _line(f"contention score ({figures['score_method']})", figures["score"], ".2f"),
        "",
        ("CONTENDED: " if v.contended else "OK: ") + v.headline,
    ]
    lines += [f"  - {a}" for a in v.advice]
    return "\n".join(lines)


def run_diagnose(pid: int, seconds: float, rate_hz: float, as_json: bool) -> int:
    if seconds <= 0 or rate_hz <= 0:
        print("gil-exporter diagnose: --seconds and --rate-hz must be positive", file=sys.stderr)
        return EXIT_ERROR
    if not _exists(pid):
        print(f"gil-exporter diagnose: no process {pid}", file=sys.stderr)
        return EXIT_ERROR
    view = measure(pid, seconds, rate_hz)
    if view is None or view.figures is None:
        print(f"gil-exporter diagnose: process {pid} exited or could not be read", file=sys.stderr)
        return EXIT_ERROR
    figures, v = report(view)
    if as_json:
        print(json.dumps({"figures": figures, "verdict": dataclasses.asdict(v)}, indent=2))
    else:
        print(render(figures, v))
    return EXIT_CONTENDED if v.contended else EXIT_OK
