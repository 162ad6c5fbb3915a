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


def _view(**kw):
    from exporter.monitor import ProcessView
    base = dict(target="t", pid=1, exe="/usr/bin/python3.14t", python_version="3.14.0",
                implementation="cpython", gil_probe="ok", kube=(), threads=4, cpu_user_seconds=1.0,
                cpu_system_seconds=0.0, voluntary_total=1, involuntary_total=1, figures=None,
                gil=totals(2.0), gil_enabled=False, score=None, score_method="none",
                free_threaded=True)
    base.update(kw)
    return ProcessView(**base)


def test_free_threaded_with_the_gil_off_publishes_no_score():
    from exporter import score
    from exporter.collector import GilCollector
    f = score.Figures(threads=4, cpu_cores=3.5, voluntary_per_second=10, involuntary_per_second=5,
                      host_cpus=4, gil_enabled=False, contended_ratio=0.0, held_ratio=0.0)
    assert score.score(f) == (None, "none")
    assert score.verdict(f).kind == "free_threaded" and not score.verdict(f).contended
    fams = {m.name: m for m in GilCollector._gil_families([_view()])}
    assert [s.value for s in fams["pygil_gil_enabled"].samples] == [0]
    assert not fams["pygil_gil_contention_score"].samples
    info = {m.name: m for m in GilCollector._process_families([_view()])}["pygil_target_info"]
    assert info.samples[0].labels["free_threaded"] == "true"
    # the same build once its GIL is switched on: a GIL like any other, scored
    fams = {m.name: m for m in GilCollector._gil_families([_view(gil_enabled=True, score=0.9,
                                                                 score_method="gil_state")])}
    assert [s.value for s in fams["pygil_gil_enabled"].samples] == [1]
    assert [s.value for s in fams["pygil_gil_contention_score"].samples] == [0.9]
    # a default build says free_threaded="false"; unknown leaves the label out
    info = {m.name: m for m in GilCollector._process_families([_view(free_threaded=False)])}
    assert info["pygil_target_info"].samples[0].labels["free_threaded"] == "false"
    info = {m.name: m for m in GilCollector._process_families([_view(free_threaded=None)])}
    assert "free_threaded" not in info["pygil_target_info"].samples[0].labels
