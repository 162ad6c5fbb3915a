"""Window figures the monitor derives from its ticks (pure functions over recorded ticks)."""
from __future__ import annotations

from collections import deque

import pytest

from exporter.monitor import Tick, _gil_figures, _thread_figures
from exporter.sampler import GilTotals


def totals(sampled, held, switches=0):
    return GilTotals(sampled_seconds=sampled, held_seconds=held, wait_seconds=held,
                     contended_seconds=held, switches=switches, interval_seconds=0.005,
                     samples=int(sampled * 100), futex_waiters_checked=0)


def tick(t, gil=None, sched=None):
    return Tick(t, 4, t, 0.0, 0, 0, gil, sched or {})


def test_gil_figures_start_at_the_first_tick_with_gil_totals():
    """Issue 11: the window's first tick predated the first GIL sample, the GIL figures were
    dropped, and diagnose judged from /proc although the probe was fine."""
    history = deque([tick(0.0), tick(1.0), tick(2.0, totals(0.5, 0.5, 10)),
                     tick(3.0, totals(1.5, 1.5, 110))])
    kw = _gil_figures(history, history[0], history[-1])
    assert kw["gil_sampled_seconds"] == pytest.approx(1.0)
    assert kw["contended_ratio"] == pytest.approx(1.0)
    assert kw["switches_per_second"] == pytest.approx(100.0)  # over the ticks that have GIL data
    # no GIL totals at the end, or only one tick with them: no GIL figures at all
    assert _gil_figures(history, history[0], history[1]) == {}
    assert _gil_figures(history, history[0], history[2]) == {}


def test_thread_figures_share_of_the_busiest_thread():
    ns = 1_000_000_000
    a = {1: (0, 0), 2: (0, 0), 3: (0, 0), 4: (0, 0)}
    even = {1: (ns // 4, 0), 2: (ns // 4, 0), 3: (ns // 4, 0), 4: (ns // 4, ns)}
    f = _thread_figures(a, even, 1.0)
    assert f["busy_threads"] == pytest.approx(4.0) and f["top_thread_share"] == pytest.approx(0.25)
    assert f["run_delay_cores"] == pytest.approx(1.0)
    hog = {1: (ns, 0), 2: (ns // 100, 0), 3: (ns // 100, 0), 4: (0, 0)}
    f = _thread_figures(a, hog, 1.0)
    assert f["top_thread_share"] > 0.97 and f["busy_threads"] < 1.1
    # a thread born in the window counts from zero; a reused TID restarts
    f = _thread_figures({1: (5 * ns, 0)}, {1: (ns, 0), 9: (ns, 0)}, 1.0)
    assert f["busy_threads"] == pytest.approx(2.0)
    # no schedstat in this kernel: no per-thread figures
    assert _thread_figures({}, {}, 1.0) == {}
