"""When the monitor reads /proc: following the scrapes it sees (monitor.py), on a real process.

A regular scraper gets a pass just before each scrape and one a window earlier, not one a
second; the window gauges then span just under window_seconds; an unexpected scrape still gets
figures at most a tick old; with nobody scraping, a pass every half window.
"""
from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry
from workloads import start_workload

from exporter.collector import GilCollector
from exporter.config import Config, Limits, Match, Sampling, Target
from exporter.http import RenderedMetrics
from exporter.monitor import Monitor, _window

WINDOW = 3.0
PERIOD = 4.0


def _monitor(pid: int) -> tuple[Monitor, RenderedMetrics]:
    config = Config(targets=(Target(name="passes", match=Match(pid=pid)),), scan_interval_seconds=1.0,
                    window_seconds=WINDOW, sampling=Sampling(enabled=False), limits=Limits())
    monitor = Monitor(config)
    registry = CollectorRegistry(auto_describe=False)
    collector = GilCollector(monitor)
    registry.register(collector)
    rendered = RenderedMetrics(registry, monitor, collector)
    monitor.start()
    return monitor, rendered


@pytest.fixture
def followed():
    with start_workload("sleep", threads=3) as w:
        monitor, rendered = _monitor(w.pid)
        try:
            yield w, monitor, rendered
        finally:
            monitor.stop()


def _passes_between(monitor: Monitor, t0: float, t1: float) -> list[float]:
    return [t for t in monitor._passes if t0 < t <= t1]


def test_regular_scraper_gets_two_passes_per_scrape(followed):
    w, monitor, rendered = followed
    scrapes = []
    start = time.monotonic()
    for i in range(8):
        # scrape on a fixed grid, as Prometheus does (the grid keeps its phase under load)
        time.sleep(max(0.0, start + i * PERIOD - time.monotonic()))
        scrapes.append(time.monotonic())
        rendered.body("")
        state = next(iter(monitor._states.values()))
        assert scrapes[-1] - monitor._passes[-1] <= monitor.tick_seconds + 0.05  # fresh figures
        if i >= 3:  # the rhythm is known after two scrapes
            a, b = _window(state.history, WINDOW)
            assert WINDOW - 1.0 <= b.t - a.t <= WINDOW, (b.t - a.t, [t.t - b.t for t in state.history])
    counts = [len(_passes_between(monitor, a, b)) for a, b in zip(scrapes[3:], scrapes[4:])]
    print(f"passes between scrapes {PERIOD:g} s apart, window {WINDOW:g} s: {counts}")
    # Every second would be 4 passes per interval; following the scrapes, 2 (before the
    # scrape, and a window earlier), 3 when a pass ran late on a loaded host.
    assert all(2 <= n <= 3 for n in counts), counts
    assert sum(counts) <= 2 * len(counts) + 1, counts


def test_nobody_scraping_then_an_unexpected_scrape(followed):
    w, monitor, rendered = followed
    time.sleep(7.0)
    gaps = [b - a for a, b in zip(list(monitor._passes)[1:], list(monitor._passes)[2:])]
    assert gaps and all(WINDOW / 2 - 0.3 <= g <= WINDOW / 2 + 0.6 for g in gaps), gaps
    asked = time.monotonic()
    body, _ = rendered.body("")
    assert monitor._passes[-1] >= asked - monitor.tick_seconds  # waited for a pass if needed
    assert f'pid="{w.pid}"'.encode() in body
