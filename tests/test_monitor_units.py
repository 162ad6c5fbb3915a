"""Unit tests of the monitor's pure helpers (no processes needed)."""
from collections import deque

from exporter.monitor import Tick, _add_totals, _utf8, _window
from exporter.sampler import GilTotals


def totals(x, switches=10, interval=0.005):
    return GilTotals(sampled_seconds=x, held_seconds=x, wait_seconds=2 * x, contended_seconds=x / 2,
                     switches=switches, interval_seconds=interval, samples=int(100 * x), futex_waiters_checked=1)


def test_gil_totals_continue_across_sampler_sessions():
    first = totals(5.0, switches=600)
    assert _add_totals(None, first) == first
    assert _add_totals(first, None) == first
    after = _add_totals(first, totals(1.0, switches=100, interval=0.0123))
    assert after.held_seconds == 6.0 and after.wait_seconds == 12.0 and after.contended_seconds == 3.0
    assert after.switches == 700 and after.samples == 600
    assert after.interval_seconds == 0.0123  # the current interval, not a sum


def test_window_spans_the_configured_seconds():
    h = deque(Tick(float(t), 1, 0.0, 0.0, 0, 0, None) for t in range(20))
    first, last = _window(h, 10.0)
    assert (first.t, last.t) == (9.0, 19.0)
    assert _window(deque([h[0]]), 10.0) is None
    first, last = _window(deque([h[0], h[1]]), 0.5)  # shorter than one tick: the last two ticks
    assert (first.t, last.t) == (0.0, 1.0)


def test_utf8_labels():
    assert _utf8("/usr/bin/python3") == "/usr/bin/python3"
    assert _utf8("/tmp/\udcffx") == "/tmp/\ufffdx"
    _utf8("/tmp/\udcffx").encode("utf-8")
