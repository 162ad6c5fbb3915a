"""Monitor: the running state behind /metrics: the loop and the table of tracked processes.

A background thread rescans for processes every `scan_interval_seconds` (discover.py) and
reads every tracked process's /proc figures in passes, keeping the history of readings from
which the window gauges are derived (state.py, views.py). A second background thread (the
GilSampler) reads each target's GIL at ~100 Hz; the GilTracker (giltracker.py) locates the
GILs on a worker with a deadline and hands each pass their totals. Scrapes never read target
memory: they read the last pass, after one liveness read per process. The table of tracked
processes and the reading of each in a pass are tracking.py's; Monitor runs them.

When passes happen (passes.py). Without a scraper to follow (`diagnose`, tests), every
`tick_seconds`. Behind the HTTP server (follow_scrapes()), just before each expected scrape
and a window earlier; a scrape that finds the last pass older than `tick_seconds` waits for a
fresh one (refresh()). Nobody scraping: a pass every window_seconds / 2. Reading every thread
of every process every second, whatever the scrape interval, was most of the exporter's cost.

Per thread (sampling.per_thread): each pass drains the held time per TID from the sampler
and credits it to the process's `threadlabels.ThreadLabels` (the cap on thread label values),
in the same pass as the GIL totals it adds up to.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter, deque
from typing import Callable

from exporter import passes, procfs, tracking, views
from exporter.config import Config
from exporter.giltracker import LOCATE_DEADLINE, GilTracker
from exporter.passes import LEAD, ScrapeRhythm
from exporter.sampler import GilSampler
from exporter.state import ProcessState, Tick  # noqa: F401 (Tick: importers' old home)

# the helpers' former names here (tests import them from this module)
from exporter.state import add_totals as _add_totals  # noqa: F401
from exporter.state import window as _window  # noqa: F401
from exporter.views import HostView, InterpreterGil, ProcessView  # noqa: F401 (importers' old home)
from exporter.views import gil_figures as _gil_figures  # noqa: F401
from exporter.views import thread_figures as _thread_figures  # noqa: F401
from exporter.views import utf8 as _utf8  # noqa: F401

log = logging.getLogger(__name__)

# An idle process is sampled once per this many ticks of the GIL sampler (2 Hz at the default
# 100 Hz), a process that showed a waiter in the last 0.25 s at every tick (sampler.py).
IDLE_TICKS = 50


class Monitor:
    def __init__(self, config: Config, tick_seconds: float = 1.0,
                 pod_resolver: Callable | None = None, idle_ticks: int = IDLE_TICKS,
                 locate_deadline: float = LOCATE_DEADLINE):
        self.config = config
        self.tick_seconds = tick_seconds
        self.errors: Counter = Counter()
        self._stop = threading.Event()
        self._wake = threading.Event()           # a scrape wants a pass, or stop()
        self._passed = threading.Condition()     # notified after each pass
        self._thread: threading.Thread | None = None
        self._next_scan = 0.0
        self._next_pass = 0.0
        self._refresh_wanted = False
        self._passes: deque = deque(maxlen=64)   # start times of the last passes
        self._rhythm: ScrapeRhythm | None = None  # None: a pass every tick_seconds
        self.scrape_expected: float | None = None  # monotonic time of the next expected scrape
        self.sampler: GilSampler | None = None
        if config.sampling.enabled:
            self.sampler = GilSampler(rate_hz=config.sampling.rate_hz, idle_ticks=idle_ticks)
        # locating the GILs (a worker with a deadline) and taking their totals for a pass
        self.tracker = GilTracker(config, self.sampler, self.errors, lambda key: key in self._states,
                               deadline=locate_deadline)
        self._tracked = tracking.TrackedProcesses(config, self.tracker, self.errors, pod_resolver)
        self._reader = tracking.ProcessReader(config, tick_seconds, self.tracker, self.errors,
                                              gone=self._tracked.forget)
        self.ready = threading.Event()  # set after the first pass
        self.lead = LEAD  # how long before an expected scrape its pass happens
        self.generation = 0  # passes done: what /metrics shows changes only when this does
        self.tick_listeners: list[Callable[[], None]] = []

    @property
    def _states(self) -> dict[tuple, ProcessState]:
        return self._tracked.states

    @property
    def dropped(self) -> dict[str, int]:
        return self._tracked.dropped

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        procfs.raise_fd_limit()  # kept /proc files: one per process and thread
        # The modules' objects live as long as the process: keep them out of the cyclic
        # collector's full passes (a gen-2 pass over them took ~20 ms).
        gc.collect()
        gc.freeze()
        if self.sampler:
            self.sampler.start()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._passed:
            self._passed.notify_all()
        if self._thread:
            self._thread.join(timeout=3)
        if self.sampler:
            self.sampler.stop()
        self.tracker.stop()  # joins no locator worker: one may be stuck in a target
        self._tracked.close()

    def reload(self, config: Config) -> None:
        """Apply a new, already validated config: the next tick rescans with it."""
        with self._tracked.lock:
            self.config = config
            self.tracker.config = config
            self._reader.config = config
            self._tracked.reload(config)
            self._next_scan = 0.0
        self._wake.set()
        if self.sampler and config.sampling.rate_hz != self.sampler.rate_hz:
            self.sampler.rate_hz = config.sampling.rate_hz

    # -- when to read: every tick, or following the scrapes -----------------
    def follow_scrapes(self) -> None:
        """Pass when scrapes are expected (see the module docstring), instead of every tick."""
        self._rhythm = ScrapeRhythm()

    def scraped(self) -> None:
        """A scrape arrived (called by the HTTP layer for each /metrics request)."""
        if self._rhythm is not None:
            self._rhythm.record(time.monotonic())
            self._wake.set()  # plan again with the new figure

    def refresh(self, max_age: float | None = None, timeout: float = 10.0) -> None:
        """Return once the last pass is at most `max_age` (default tick_seconds) old."""
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return
        max_age = self.tick_seconds if max_age is None else max_age
        with self._passed:
            if self._passes and time.monotonic() - self._passes[-1] <= max_age:
                return
            generation = self.generation
            self._refresh_wanted = True
            self._wake.set()
            self._passed.wait_for(lambda: self.generation != generation or self._stop.is_set(), timeout)

    def _plan(self, now: float) -> float:
        """When the next pass is due (passes.plan), noting the scrape it prepares for."""
        planned = passes.plan(now, self._passes, self.tick_seconds, self.config.window_seconds, self._rhythm)
        if self._rhythm is not None:
            self.scrape_expected = planned.scrape_expected
        return planned.due

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= self._next_scan:
                    self._scan()
                    self._next_scan = now + self.config.scan_interval_seconds
                if self._refresh_wanted or now >= self._next_pass:
                    self._refresh_wanted = False
                    self._pass()
                self.tracker.due(self._states)
                self._next_pass = self._plan(time.monotonic())
            except Exception as e:  # keep serving whatever happens in one tick
                self.errors["tick"] += 1
                log.error("tick failed: %s: %s", type(e).__name__, e)
                log.debug("tick failure", exc_info=True)
                self._next_pass = time.monotonic() + self.tick_seconds
            check = self.tracker.next_check()  # a locate's deadline, to abandon it on time
            wait = min(self._next_pass, self._next_scan, check if check is not None else float("inf")) - time.monotonic()
            if wait > 0:
                self._wake.wait(wait)
            self._wake.clear()

    def _pass(self) -> None:
        """Read the host and every tracked process once; then tell whoever listens."""
        try:
            now = time.monotonic()
            self._passes.append(now)
            self._reader.read_host(now)
            for key, state in list(self._states.items()):
                self._reader.read_guarded(key, state)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("pass: %d processes in %.1f ms; next scrape expected in %s s", len(self._states),
                          (time.monotonic() - now) * 1000,
                          "?" if self.scrape_expected is None else f"{self.scrape_expected - now:.2f}")
        finally:
            with self._passed:
                self.generation += 1
                self._passed.notify_all()
            self.ready.set()
        for listener in list(self.tick_listeners):
            try:
                listener()
            except Exception as e:
                self.errors["tick"] += 1
                log.error("after-tick hook failed: %s: %s", type(e).__name__, e)

    # -- one tick ----------------------------------------------------------
    def tick(self) -> None:
        """Scan if due, read every process once, start locating what needs it."""
        now = time.monotonic()
        if now >= self._next_scan:
            self._scan()
            self._next_scan = now + self.config.scan_interval_seconds
        self._pass()
        self.tracker.due(self._states)

    def _scan(self) -> None:
        added = self._tracked.scan()
        if added and self.generation:
            # A first reading now, so that the next pass makes a window.
            for key, state in added:
                self._reader.read_guarded(key, state)
            self.tracker.due(self._states)

    # -- views for export ------------------------------------------------------
    def host(self) -> HostView:
        return views.host_view(self._reader.host, self.config.window_seconds)

    def alive_keys(self) -> frozenset:
        """Keys of the tracked processes that are still running now (one pread each)."""
        with self._tracked.lock:  # kept files are closed under this lock only
            return frozenset(k for k, st in self._states.items()
                             if st.history and st.stat is not None and st.stat.alive())

    def snapshot(self, check_alive: bool = True, alive: frozenset | None = None) -> list[ProcessView]:
        """Views of the tracked processes; `alive` (from alive_keys()) skips the liveness reads."""
        if alive is None and check_alive:
            alive = self.alive_keys()  # gone since the last pass: never publish a dead process
        with self._tracked.lock:
            states = list(self._states.items())
        out = []
        for key, state in states:
            if not state.history:
                continue
            if alive is not None and key not in alive:
                continue
            out.append(views.build(state, self._reader.host, self.config.window_seconds))
        out.sort(key=lambda v: (v.target, v.pid))
        return out

