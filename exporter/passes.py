"""When the monitor reads /proc: the pass planner, a pure function of time and the scrapes seen.

Without a scraper to follow (`diagnose`, tests), a pass every `tick_seconds`. Behind the HTTP
server the passes follow the scrapes: Prometheus scrapes at a fixed interval and phase, so the
next scrape is predicted from the last ones and a pass is planned just before it (the scrape
finds it ready) and one a window earlier (the window's first reading). Nobody scraping: a pass
every window_seconds / 2. Nothing here reads a clock or sleeps: the monitor passes `now`, the
start times of its last passes and the scrape times it saw, so that tests/test_passes.py can
replay any schedule in microseconds.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

LEAD = 0.5         # a pass this long before an expected scrape
ANCHOR_LATE = 0.3  # the window's first pass: this much less than a window before the last
COINCIDENT = 0.05  # scrapes closer than this to the previous one (concurrent scrapers) count once


class ScrapeRhythm:
    """The scrape times seen lately, and the next scrape they predict.

    Prometheus scrapes a target at a fixed interval and phase: the median gap between the
    last scrapes is the interval, and the last scrape plus that interval the next one.
    """

    def __init__(self, keep: int = 9):
        self.times: deque = deque(maxlen=keep)

    def record(self, t: float) -> None:
        if not self.times or t - self.times[-1] >= COINCIDENT:
            self.times.append(t)

    def last(self) -> float | None:
        return self.times[-1] if self.times else None

    def period(self) -> float | None:
        times = list(self.times)
        if len(times) < 2:
            return None
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        return gaps[len(gaps) // 2]


@dataclass(frozen=True)
class PassPlan:
    """The next pass, and the scrape it prepares for (None: no regular scraper)."""

    due: float
    scrape_expected: float | None


def plan(now: float, passes: Sequence[float], tick_seconds: float, window: float,
         rhythm: ScrapeRhythm | None) -> PassPlan:
    """When the next pass is due, given the start times of the last passes (oldest first).

    `rhythm` None: a pass every tick_seconds. Never sooner than a tick after the last pass.
    """
    last = passes[-1] if passes else -1e9
    floor = last + tick_seconds
    if rhythm is None:
        return PassPlan(floor, None)
    period, scraped = rhythm.period(), rhythm.last()
    if period is None or now - scraped > 3 * period + window:
        return PassPlan(max(floor, last + window / 2), None)  # nobody scrapes regularly
    period = max(period, tick_seconds)
    expected = scraped + period
    while expected < now:
        expected += period
    # Passes just before the expected scrapes, and each one's window start (unless another
    # pass already falls less than a window, and more than window - 1 s, earlier).
    span = int(window // period)
    pres = [expected - LEAD + k * period for k in range(-span - 2, span + 3)]
    wanted = []
    for pre in pres:
        if pre < now - tick_seconds:
            continue
        if pre >= now or last < pre - 0.05:
            wanted.append(max(pre, now))
        lo, hi = pre - window + ANCHOR_LATE - 0.1, pre - window + ANCHOR_LATE + 0.9
        if hi < now:
            continue
        if any(lo <= t <= hi for t in passes) or any(lo <= p <= hi for p in pres):
            continue
        wanted.append(max(pre - window + ANCHOR_LATE, now))
    due = max(floor, min(wanted)) if wanted else max(floor, last + window / 2)
    return PassPlan(due, expected)
