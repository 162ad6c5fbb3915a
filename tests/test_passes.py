"""The pass planner (exporter/passes.py) replayed on simulated clocks: no sleeping, no process.

A small simulator plays the monitor's loop as monitor.py runs it: a pass when the plan says,
a replan after each pass and each scrape, and a scrape that finds the last pass older than a
tick gets one at once (Monitor.refresh). tests/test_monitor_passes.py checks the same on a real
process in real time.
"""
from __future__ import annotations

import math
from collections import deque

import pytest

from exporter.passes import ANCHOR_LATE, LEAD, PassPlan, ScrapeRhythm, plan


class Loop:
    """The monitor's pass loop on a simulated clock."""

    def __init__(self, window: float, tick: float = 1.0, follow: bool = True):
        self.window, self.tick = window, tick
        self.rhythm = ScrapeRhythm() if follow else None
        self.passes: deque = deque(maxlen=64)
        self.all_passes: list[float] = []
        self.expected: list[tuple[float, float | None]] = []  # (when planned, scrape expected)
        self.due = 0.0

    def _pass(self, t: float) -> None:
        self.passes.append(t)
        self.all_passes.append(t)

    def _replan(self, t: float) -> None:
        p = plan(t, self.passes, self.tick, self.window, self.rhythm)
        assert isinstance(p, PassPlan)
        assert p.due >= self.passes[-1] + self.tick - 1e-9  # never sooner than a tick after the last
        self.due = p.due
        self.expected.append((t, p.scrape_expected))

    def run(self, until: float, scrapes=()) -> None:
        pending = deque(sorted(scrapes))
        t = 0.0
        while True:
            scrape = pending[0] if pending else math.inf
            if min(self.due, scrape) > until:
                return
            if self.due <= scrape:
                t = max(t, self.due)
                self._pass(t)
            else:
                t = pending.popleft()
                if self.rhythm is not None:
                    self.rhythm.record(t)
                if not self.passes or t - self.passes[-1] > self.tick:
                    self._pass(t)  # refresh(): the scrape waits for a fresh pass
            self._replan(t)

    def between(self, a: float, b: float) -> list[float]:
        return [t for t in self.all_passes if a < t <= b]

    def last_before(self, t: float) -> float:
        return max(p for p in self.all_passes if p <= t)

    def window_span(self, t: float) -> float:
        """The span _window() finds at time t: the last pass back to the earliest one at most a
        window before it (the two last ones when none is)."""
        done = [p for p in self.all_passes if p <= t]
        last = done[-1]
        first = next(p for p in done if last - p <= self.window + 1e-6)
        if first == last:
            first = done[-2]
        return last - first


def grid(period: float, n: int, phase: float = 0.37) -> list[float]:
    return [phase + i * period for i in range(n)]


def test_a_regular_scraper_gets_two_passes_per_scrape():
    """The live test's case (window 3 s, scrapes 4 s apart): a pass LEAD before each scrape and
    one a window earlier; not one a second."""
    loop = Loop(window=3.0)
    scrapes = grid(4.0, 12)
    loop.run(scrapes[-1] + 0.01, scrapes)
    for a, b in zip(scrapes[3:], scrapes[4:]):
        assert len(loop.between(a, b)) == 2, (a, b, loop.between(a, b))
        assert b - loop.last_before(b) == pytest.approx(LEAD)
        assert 3.0 - 1.0 <= loop.window_span(b) <= 3.0
        assert loop.window_span(b) == pytest.approx(3.0 - ANCHOR_LATE)


@pytest.mark.parametrize("period,window", [(15.0, 60.0), (30.0, 60.0), (60.0, 60.0), (10.0, 30.0),
                                           (2.0, 3.0), (5.0, 3.0), (120.0, 60.0), (1.0, 60.0)])
def test_every_scrape_finds_fresh_figures_over_just_under_a_window(period, window):
    loop = Loop(window=window)
    scrapes = grid(period, 6 + int(3 * window / period))
    loop.run(scrapes[-1] + 0.01, scrapes)
    passes_per_scrape = []
    settled = [i for i, t in enumerate(scrapes) if t >= scrapes[2] + window + period]
    for a, b in zip(scrapes[settled[0] - 1:], scrapes[settled[0]:]):
        age = b - loop.last_before(b)
        assert age <= 1.0, (b, age)  # never older than a tick
        span = loop.window_span(b)
        assert window - 1.0 - 1e-6 <= span <= window + 1e-6, (b, span)
        passes_per_scrape.append(len(loop.between(a, b)))
    # at most two /proc passes per scrape interval, and never more often than a tick
    assert max(passes_per_scrape) <= max(2, math.ceil(period)), passes_per_scrape
    gaps = [y - x for x, y in zip(loop.all_passes, loop.all_passes[1:])]
    assert min(gaps) >= 1.0 - 1e-9


def test_the_plan_names_the_next_scrape():
    loop = Loop(window=10.0)
    scrapes = grid(15.0, 6)
    loop.run(scrapes[-1] + 0.01, scrapes)
    t, expected = loop.expected[-1]
    assert expected == pytest.approx(scrapes[-1] + 15.0)


def test_nobody_scraping_a_pass_every_half_window():
    loop = Loop(window=3.0)
    loop.run(30.0)
    gaps = [y - x for x, y in zip(loop.all_passes, loop.all_passes[1:])]
    assert gaps and all(g == pytest.approx(1.5) for g in gaps), gaps
    assert all(e is None for _, e in loop.expected)


def test_no_scraper_to_follow_a_pass_every_tick():
    loop = Loop(window=60.0, tick=1.0, follow=False)
    loop.run(20.0)
    gaps = [y - x for x, y in zip(loop.all_passes, loop.all_passes[1:])]
    assert len(gaps) == 20 and all(g == pytest.approx(1.0) for g in gaps)


def test_a_scraper_that_stops_is_no_longer_followed():
    loop = Loop(window=10.0)
    scrapes = grid(15.0, 5)
    loop.run(scrapes[-1] + 3 * 15.0 + 10.0 + 40.0, scrapes)
    late = [p for p in loop.all_passes if p > scrapes[-1] + 3 * 15.0 + 10.0 + 5.0]
    gaps = [y - x for x, y in zip(late, late[1:])]
    assert gaps and all(g == pytest.approx(5.0) for g in gaps), gaps
    assert loop.expected[-1][1] is None


def test_an_unexpected_scrape_after_silence_gets_a_fresh_pass():
    loop = Loop(window=3.0)
    loop.run(7.3, [7.3])
    assert loop.all_passes[-1] == 7.3


def test_concurrent_scrapers_count_as_one():
    rhythm = ScrapeRhythm()
    for t in grid(10.0, 5):
        rhythm.record(t)
        rhythm.record(t + 0.01)  # a second Prometheus replica, 10 ms later
    assert rhythm.period() == pytest.approx(10.0)
    assert len(rhythm.times) == 5


def test_the_period_is_the_median_gap():
    rhythm = ScrapeRhythm()
    for t in (0.0, 10.0, 20.0, 21.0, 30.0, 40.0, 50.0):  # one ad-hoc scrape in between
        rhythm.record(t)
    assert rhythm.period() == pytest.approx(10.0)
    assert rhythm.last() == 50.0
    assert ScrapeRhythm().period() is None and ScrapeRhythm().last() is None


def test_a_late_pass_does_not_pile_up_passes():
    """A pass that ran late (a loaded host) is followed by the plan, not by catch-up passes."""
    loop = Loop(window=3.0)
    scrapes = grid(4.0, 12)
    loop.run(scrapes[6] + 0.01, scrapes[:7])
    loop.due += 0.8  # this pass starts 0.8 s late
    loop.run(scrapes[-1] + 0.01, scrapes[7:])
    counts = [len(loop.between(a, b)) for a, b in zip(scrapes[7:], scrapes[8:])]
    assert all(2 <= n <= 3 for n in counts), counts
    assert sum(counts) <= 2 * len(counts) + 1
