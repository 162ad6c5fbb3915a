"""Monitor: the running state behind /metrics.

A background thread reads every tracked process's /proc figures in passes, and keeps the
history of passes from which the window gauges are derived. It rescans for processes every
`scan_interval_seconds`. A second background thread (the GilSampler) reads each target's GIL
at ~100 Hz. Scrapes never read target memory: they read the last pass, after one liveness
read per process.

When passes happen. Without a scraper to follow (`diagnose`, tests), every `tick_seconds`.
Behind the HTTP server (follow_scrapes()), the passes follow the scrapes: Prometheus scrapes
at a fixed interval and phase, so the monitor predicts the next scrape from the last ones
and makes one pass just before it (the scrape finds it ready) and one a window earlier (the
window's first reading); a scrape that finds the last pass older than `tick_seconds` waits
for a fresh one. Nobody scraping: a pass every window_seconds / 2. So a window gauge spans
just under `window_seconds` for a regular scraper, at least half of it for any other, and a
scrape never gets figures older than `tick_seconds`. Reading every thread of every process
every second, whatever the scrape interval, was most of the exporter's cost.

Counters are made monotonic here: context switches are summed over every thread,
with the last value of each ended thread kept, so a thread that exits never makes
the sum go down.

Several GILs (3.12+ subinterpreters with a GIL of their own): the main GIL is sampled under
the process's key, each other one under key + (interpreter id,); the locator looks for new
ones every scan. From the first time a process shows more than one GIL, its GIL series are
published per interpreter (ProcessView.interpreters); an ordinary process never gets them.

Per thread (sampling.per_thread): each pass drains the held time per TID from the sampler
and credits it to the process's `attribution.ThreadLabels` (the cap on thread label values),
in the same pass as the GIL totals it adds up to.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from exporter import gil, passes, procfs, views
from exporter.attribution import ThreadLabels
from exporter.config import Config
from exporter.discover import Discoverer
from exporter.passes import LEAD, ScrapeRhythm
from exporter.sampler import GilSampler, GilTotals
from exporter.state import SCORE_HISTORY_STEP, HostTick, ProcessState, Tick, add_totals
from exporter.views import HostView, InterpreterGil, ProcessView  # noqa: F401 (importers' old home)
# the helpers' former names here (tests import them from this module)
from exporter.state import add_totals as _add_totals, window as _window  # noqa: F401
from exporter.views import gil_figures as _gil_figures, thread_figures as _thread_figures  # noqa: F401
from exporter.views import utf8 as _utf8  # noqa: F401

log = logging.getLogger(__name__)

# Probe outcomes that no retry can change.
_PERMANENT = {"free_threaded", "musl", "not_cpython", "not_elf", "unsupported_arch", "disabled",
              "unsupported_version", "binary_replaced"}
_RELOCATE_AFTER = 30.0  # seconds between attempts to locate a GIL that was not found
# An idle process is sampled once per this many ticks of the GIL sampler (2 Hz at the default
# 100 Hz), a process that showed a waiter in the last 0.25 s at every tick (sampler.py).
IDLE_TICKS = 50


class Monitor:
    def __init__(self, config: Config, tick_seconds: float = 1.0,
                 pod_resolver: Callable | None = None, idle_ticks: int = IDLE_TICKS):
        self.config = config
        self.tick_seconds = tick_seconds
        self.errors: Counter = Counter()
        self.dropped: dict[str, int] = {}
        self._discoverer = Discoverer(config)
        self._pod_resolver = pod_resolver
        self._states: dict[tuple, ProcessState] = {}
        self._gils_lock = threading.Lock()  # replacing a ProcessState.gils (monitor and locator)
        self._host: deque = deque()
        self._lock = threading.Lock()
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
        # One locator: more in parallel would finish sooner but cost more CPU in GIL handoffs
        # (100 processes: 2.9 s and 0.52 CPU-s to every probe ok with one, 1.4 s and 0.67 with 4).
        self._locator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gil-locate")
        self.sampler: GilSampler | None = None
        if config.sampling.enabled:
            self.sampler = GilSampler(rate_hz=config.sampling.rate_hz, idle_ticks=idle_ticks)
        self.ready = threading.Event()  # set after the first pass
        self.lead = LEAD  # how long before an expected scrape its pass happens
        self.generation = 0  # passes done: what /metrics shows changes only when this does
        self.tick_listeners: list[Callable[[], None]] = []

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
        self._locator.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for state in self._states.values():
                if state.stat is not None:
                    state.stat.close()
                if state.tasks is not None:
                    state.tasks.close()

    def reload(self, config: Config) -> None:
        """Apply a new, already validated config: the next tick rescans with it."""
        with self._lock:
            self.config = config
            self._discoverer = Discoverer(config)
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
                self._locate_due()
                self._next_pass = self._plan(time.monotonic())
            except Exception as e:  # keep serving whatever happens in one tick
                self.errors["tick"] += 1
                log.error("tick failed: %s: %s", type(e).__name__, e)
                log.debug("tick failure", exc_info=True)
                self._next_pass = time.monotonic() + self.tick_seconds
            wait = min(self._next_pass, self._next_scan) - time.monotonic()
            if wait > 0:
                self._wake.wait(wait)
            self._wake.clear()

    def _pass(self) -> None:
        """Read the host and every tracked process once; then tell whoever listens."""
        try:
            now = time.monotonic()
            self._passes.append(now)
            self._read_host(now)
            for key, state in list(self._states.items()):
                self._read_process(key, state)
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
        self._locate_due()

    def _scan(self) -> None:
        try:
            result = self._discoverer.scan()
        except Exception as e:
            self.errors["scan"] += 1
            log.error("scan failed: %s: %s", type(e).__name__, e)
            return
        self.dropped = dict(result.dropped)
        seen = {c.key: c for c in result.candidates}
        added = []
        with self._lock:
            for key in list(self._states):
                state = self._states[key]
                cand = seen.get(key)
                if cand is None or cand.target != state.candidate.target:
                    self._forget(key)
        for key, cand in seen.items():
            if key in self._states:
                continue
            try:
                stat = procfs.StatFile(key[0], key[1])
            except (procfs.ProcessGone, OSError):
                continue  # gone since the scan
            state = ProcessState(cand, kube=self._kube_labels(cand.info.pid), stat=stat,
                                  tasks=procfs.ThreadFiles(key[0]))
            with self._lock:
                self._states[key] = state
            added.append((key, state))
            log.info("tracking pid=%d target=%s", cand.info.pid, cand.target)
        if added and self.generation:
            # A first reading now, so that the next pass makes a window.
            for key, state in added:
                self._read_process(key, state)
            self._locate_due()

    def _kube_labels(self, pid: int) -> tuple:
        if self._pod_resolver is None:
            return ()
        try:
            return self._pod_resolver(pid)
        except Exception as e:
            self.errors["kube"] += 1
            log.warning("pod lookup for pid %d failed: %s", pid, e)
            return ()

    def _forget(self, key) -> None:
        # called with self._lock held
        state = self._states.pop(key, None)
        if state is not None:
            log.info("untracking pid=%d target=%s", key[0], state.candidate.target)
            if state.stat is not None:
                state.stat.close()
            if state.tasks is not None:
                state.tasks.close()
        if self.sampler:
            self.sampler.remove(key)
            if state is not None:
                for iid in state.gils:
                    self.sampler.remove(key + (iid,))

    def _read_host(self, now: float) -> None:
        try:
            self._host.append(HostTick(now, tuple(procfs.host_cpu_times())))
        except OSError as e:
            self.errors["host"] += 1
            log.error("reading host CPU times failed: %s", e)
            return
        self._trim(self._host, now)

    def _trim(self, history: deque, now: float) -> None:
        # Keep one sample older than the window so the window is always covered.
        horizon = now - self.config.window_seconds - 2 * self.tick_seconds
        while len(history) > 2 and history[1].t < horizon:
            history.popleft()

    def _read_process(self, key, state: ProcessState) -> None:
        pid = key[0]
        try:
            stat = state.stat.read()
            per_thread, sched = state.tasks.read(stat.threads)
        except procfs.ProcessGone:
            with self._lock:
                self._forget(key)
            return
        except PermissionError:
            self.errors["procfs_permission"] += 1
            return
        voluntary, involuntary = state.ctx_totals(per_thread)
        totals = None
        gils: dict = {}
        held: dict = {}  # per_thread: (interpreter id, TID) -> held seconds since the last pass
        if self.sampler and state.location is not None:
            alive = set(per_thread) if state.per_thread else None
            failure = self.sampler.failure(key)
            now_totals = self._take(key, 0, alive, held)
            failed = []
            for iid in state.gils:
                sub = key + (iid,)
                gone = self.sampler.failure(sub)
                raw = self._take(sub, iid, alive, held)
                t = add_totals(state.gils_base.get(iid), raw)
                if gone or failure or raw is None:  # the locator may find it again
                    if t is not None:
                        state.gils_base[iid] = t
                    failed.append(iid)
                else:
                    gils[iid] = t
            if failed:
                self._drop_gils(key, state, failed)
            if failure:
                state.gil_base = add_totals(state.gil_base, now_totals)
                state.probe, state.location = failure, None
                state.probe_detail = "the GIL could no longer be read where it was found"
                state.next_locate = time.monotonic() + _RELOCATE_AFTER
                self.sampler.remove(key)
            else:
                totals = add_totals(state.gil_base, now_totals)
        thread_held = None
        if state.per_thread and state.labels is not None:
            pid_names = key[0]
            values = state.labels.update(time.monotonic(), held, lambda: _thread_names(pid_names),
                                         set(per_thread))
            thread_held = tuple(sorted((label, g, v) for (label, g), v in values.items()))
        now = time.monotonic()
        state.history.append(Tick(now, stat.threads, stat.cpu_user, stat.cpu_system,
                                  voluntary, involuntary, totals, sched, gils, thread_held))
        self._trim(state.history, now)
        wall = time.time()
        if not state.scores or wall - state.scores[-1][0] >= min(SCORE_HISTORY_STEP,
                                                                  self.config.window_seconds / 2):
            state.scores.append((wall, views.derive(state, self._host, self.config.window_seconds)[2]))

    def _take(self, key, iid: int, alive, held: dict) -> GilTotals | None:
        """A GIL's totals; per thread, its held time per TID since the last pass goes to
        `held` (under (iid, TID)), drained together with those totals."""
        if alive is None:
            return self.sampler.totals(key)
        got = self.sampler.drain(key, alive)
        if got is None:
            return None
        totals, inc = got
        for tid, seconds in inc.items():
            held[(iid, tid)] = held.get((iid, tid), 0.0) + seconds
        return totals

    def _drop_gils(self, key, state: ProcessState, iids) -> None:
        """Stop sampling these interpreters' GILs (the locator may find them again)."""
        with self._gils_lock:
            state.gils = {i: loc for i, loc in state.gils.items() if i not in iids}
        for iid in iids:
            self.sampler.remove(key + (iid,))

    # -- locating the GIL (in a worker: ELF parsing and validation take a while) ----
    def _locate_due(self) -> None:
        now = time.monotonic()
        for key, state in list(self._states.items()):
            if (state.location is not None and not state.locating and now >= state.next_interps
                    and _may_have_other_gils(state.location)):
                state.locating = True
                state.next_interps = now + self.config.scan_interval_seconds
                self._locator.submit(self._find_other_gils, key, state)
                continue
            if state.locating or state.location is not None or now < state.next_locate:
                continue
            if state.probe in _PERMANENT:
                continue
            state.locating = True
            self._locator.submit(self._locate, key, state)

    def _locate(self, key, state: ProcessState) -> None:
        pid = key[0]
        try:
            if not self.config.sampling.enabled or self.sampler is None:
                if state.identity is None:
                    state.identity = gil.identify(pid)
                state.probe, state.probe_detail = "disabled", "sampling.enabled is false in the config"
                return
            try:
                location = gil.locate(pid)  # identifies the target too: one identify per process
            except gil.ProbeUnavailable:
                if state.identity is None:  # the labels still want the version
                    try:
                        state.identity = gil.identify(pid)
                    except gil.ProbeUnavailable:
                        pass
                raise
            state.identity = location.identity
            if key not in self._states:
                return
            per_thread = self.config.sampling.per_thread
            if per_thread and state.labels is None:
                state.labels = ThreadLabels(self.config.limits.max_threads_per_process,
                                            self.config.window_seconds)
            state.per_thread = per_thread and state.labels is not None
            self.sampler.add(key, location, per_thread=state.per_thread)
            state.location, state.probe, state.probe_detail = location, "ok", ""
            log.info("pid=%d GIL at 0x%x (%s, Python %s)", pid, location.address,
                     location.method, state.identity.version)
            if _may_have_other_gils(location):
                state.next_interps = time.monotonic() + self.config.scan_interval_seconds
                self._add_other_gils(key, state, location)
        except gil.ProbeUnavailable as e:
            state.probe, state.probe_detail = e.reason, e.detail
            log.info("pid=%d GIL probe unavailable: %s %s", pid, e.reason, getattr(e, "detail", ""))
        except Exception as e:
            state.probe, state.probe_detail = "error", f"{type(e).__name__}: {e}"
            self.errors["gil_locate"] += 1
            log.error("pid=%d locating the GIL failed: %s: %s", pid, type(e).__name__, e)
            log.debug("locate failure", exc_info=True)
        finally:
            state.next_locate = time.monotonic() + _RELOCATE_AFTER
            state.locating = False

    def _find_other_gils(self, key, state: ProcessState) -> None:
        try:
            location = state.location
            if location is not None and key in self._states:
                self._add_other_gils(key, state, location)
        except Exception as e:
            self.errors["gil_locate"] += 1
            log.error("pid=%d looking for subinterpreters' GILs failed: %s: %s", key[0], type(e).__name__, e)
        finally:
            state.locating = False

    def _add_other_gils(self, key, state: ProcessState, main: gil.GilLocation) -> None:
        """Sample the GILs of subinterpreters that have their own (locator thread); stop
        sampling those of interpreters that are gone."""
        try:
            found = gil.other_gils(main, {loc.address: loc for loc in state.gils.values()})
        except (gil.ProbeUnavailable, OSError) as e:
            log.debug("pid=%d subinterpreters' GILs: %s", key[0], e)
            return
        now = {loc.interpreter_id: loc for loc in found}
        old = state.gils
        gone = [i for i in old if i not in now]
        for iid, loc in now.items():
            if iid not in old or old[iid].address != loc.address:
                self.sampler.add(key + (iid,), loc, per_thread=state.per_thread)
        with self._gils_lock:
            state.gils = now
            if now:
                state.multi = True
        for iid in gone:
            self.sampler.remove(key + (iid,))
        if key not in self._states:  # forgotten meanwhile: nothing of it stays in the sampler
            for iid in now:
                self.sampler.remove(key + (iid,))
        elif now.keys() != old.keys():
            log.info("pid=%d GILs of subinterpreters: %s", key[0], sorted(now) or "none")

    # -- views for export ------------------------------------------------------
    def host(self) -> HostView:
        return views.host_view(self._host, self.config.window_seconds)

    def alive_keys(self) -> frozenset:
        """Keys of the tracked processes that are still running now (one pread each)."""
        with self._lock:  # the monitor closes kept files under this lock only
            return frozenset(k for k, st in self._states.items()
                             if st.history and st.stat is not None and st.stat.alive())

    def snapshot(self, check_alive: bool = True, alive: frozenset | None = None) -> list[ProcessView]:
        """Views of the tracked processes; `alive` (from alive_keys()) skips the liveness reads."""
        if alive is None and check_alive:
            alive = self.alive_keys()  # gone since the last pass: never publish a dead process
        with self._lock:
            states = list(self._states.items())
        out = []
        for key, state in states:
            if not state.history:
                continue
            if alive is not None and key not in alive:
                continue
            out.append(views.build(state, self._host, self.config.window_seconds))
        out.sort(key=lambda v: (v.target, v.pid))
        return out


def _may_have_other_gils(location: gil.GilLocation) -> bool:
    """Subinterpreters with a GIL of their own exist from 3.12 on."""
    return gil.supports(location.identity.minor, "own_gils")


def _thread_names(pid: int) -> dict[int, str]:
    """TID -> name of every thread (read only when a thread is to get a label)."""
    try:
        return {tid: st.name for tid, st in procfs.task_stats(pid).items()}
    except (procfs.ProcessGone, OSError):
        return {}


