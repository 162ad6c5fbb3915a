"""Monitor: the running state behind /metrics.

One background thread ticks every `tick_seconds`: it rescans for processes when a
scan is due, reads each tracked process's /proc figures, and records a history of
ticks from which the window gauges are derived. A second background thread (the
GilSampler) reads each target's GIL at ~100 Hz. Scrapes never touch /proc or target
memory beyond a liveness check: they read the last tick, so a scrape is cheap and
its cost does not grow with the number of threads.

Counters are made monotonic here: context switches are summed over every thread,
with the last value of each ended thread kept, so a thread that exits never makes
the sum go down.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from exporter import gil, procfs, score
from exporter.config import Config
from exporter.discover import Candidate, Discoverer
from exporter.sampler import GilSampler, GilTotals

log = logging.getLogger(__name__)

# Probe outcomes that no retry can change.
_PERMANENT = {"free_threaded", "musl", "not_cpython", "not_elf", "unsupported_arch", "disabled",
              "unsupported_version", "binary_replaced"}
_RELOCATE_AFTER = 30.0  # seconds between attempts to locate a GIL that was not found
#: Score history per process, for the landing page's sparkline: a point every
#: SCORE_HISTORY_STEP seconds (the score is a window average already), 10 minutes of them
#: (about 13 KiB per process).
SCORE_HISTORY_STEP = 5.0
SCORE_HISTORY = 120


@dataclass(frozen=True)
class Tick:
    """One reading of one process."""

    t: float  # time.monotonic()
    threads: int
    cpu_user: float
    cpu_system: float
    voluntary: int  # monotonic totals over every thread
    involuntary: int
    gil: GilTotals | None
    # tid -> (ns on a CPU, ns runnable but waiting for one), /proc/PID/task/TID/schedstat;
    # empty when the kernel has none
    sched: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HostTick:
    t: float
    cpus: tuple  # per CPU (busy seconds, total seconds)


@dataclass(frozen=True)
class ProcessView:
    """Everything published about one process, as of the last tick."""

    target: str
    pid: int
    exe: str
    python_version: str
    implementation: str
    gil_probe: str  # "ok" or why the memory probe is unavailable
    kube: tuple[tuple[str, str], ...]  # (("namespace", ..), ("pod", ..), ("container", ..)) or ()
    threads: int
    cpu_user_seconds: float
    cpu_system_seconds: float
    voluntary_total: int
    involuntary_total: int
    figures: score.Figures | None  # window figures; None until two ticks exist
    gil: GilTotals | None
    gil_enabled: bool | None
    score: float | None
    score_method: str
    cmdline: str = ""  # argv joined by spaces, as matched by the config
    probe_detail: str = ""  # why the GIL probe is unavailable, in words ("" when ok)
    score_history: tuple = ()  # ((unix time, score or None), ...) every 5 s, oldest first

    free_threaded: bool | None = None  # a Py_GIL_DISABLED build (None: not known)

    @property
    def labels(self) -> dict[str, str]:
        return {"target": self.target, "pid": str(self.pid), **dict(self.kube)}


@dataclass(frozen=True)
class HostView:
    cpus: int
    utilization: tuple[float, ...] | None  # per CPU over the window


def _window(history: deque, window: float):
    """(first, last) ticks spanning about `window` seconds, or None with under two ticks."""
    if len(history) < 2:
        return None
    last = history[-1]
    first = history[0]
    for tick in history:
        if last.t - tick.t <= window + 1e-6:
            first = tick
            break
    if first is last:
        first = history[-2]
    return first, last


@dataclass
class _ProcessState:
    candidate: Candidate
    identity: gil.PythonIdentity | None = None
    probe: str = "pending"
    probe_detail: str = ""
    location: gil.GilLocation | None = None
    next_locate: float = 0.0
    locating: bool = False
    kube: tuple = ()
    gil_base: GilTotals | None = None  # totals of earlier sampler sessions (probe lost, then re-located)
    threads: dict = field(default_factory=dict)  # tid -> (voluntary, involuntary), last seen
    ended: tuple = (0, 0)  # sums of threads that ended
    history: deque = field(default_factory=deque)
    scores: deque = field(default_factory=lambda: deque(maxlen=SCORE_HISTORY))

    def ctx_totals(self, per_thread: dict[int, tuple[int, int]]) -> tuple[int, int]:
        ended_v, ended_i = self.ended
        for tid, (v, i) in self.threads.items():
            now = per_thread.get(tid)
            # An ended thread, or a reused TID whose counts restarted: keep the old figures.
            if now is None or now[0] < v or now[1] < i:
                ended_v += v
                ended_i += i
        self.ended = (ended_v, ended_i)
        self.threads = per_thread
        return (ended_v + sum(v for v, _ in per_thread.values()),
                ended_i + sum(i for _, i in per_thread.values()))


class Monitor:
    def __init__(self, config: Config, tick_seconds: float = 1.0,
                 pod_resolver: Callable | None = None):
        self.config = config
        self.tick_seconds = tick_seconds
        self.errors: Counter = Counter()
        self.dropped: dict[str, int] = {}
        self._discoverer = Discoverer(config)
        self._pod_resolver = pod_resolver
        self._states: dict[tuple, _ProcessState] = {}
        self._host: deque = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_scan = 0.0
        self._locator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gil-locate")
        self.sampler: GilSampler | None = None
        if config.sampling.enabled:
            self.sampler = GilSampler(rate_hz=config.sampling.rate_hz)
        self.ready = threading.Event()  # set after the first tick
        self.generation = 0  # ticks done: what /metrics shows changes only when this does
        self.tick_listeners: list[Callable[[], None]] = []

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        if self.sampler:
            self.sampler.start()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=3)
        if self.sampler:
            self.sampler.stop()
        self._locator.shutdown(wait=False, cancel_futures=True)

    def reload(self, config: Config) -> None:
        """Apply a new, already validated config: the next tick rescans with it."""
        with self._lock:
            self.config = config
            self._discoverer = Discoverer(config)
            self._next_scan = 0.0
        if self.sampler and config.sampling.rate_hz != self.sampler.rate_hz:
            self.sampler.rate_hz = config.sampling.rate_hz

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception as e:  # keep serving whatever happens in one tick
                self.errors["tick"] += 1
                log.error("tick failed: %s: %s", type(e).__name__, e)
                log.debug("tick failure", exc_info=True)
            self.generation += 1
            self.ready.set()
            for listener in list(self.tick_listeners):
                try:
                    listener()
                except Exception as e:
                    self.errors["tick"] += 1
                    log.error("after-tick hook failed: %s: %s", type(e).__name__, e)
            self._stop.wait(max(0.05, self.tick_seconds - (time.monotonic() - started)))

    # -- one tick ----------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_scan:
            self._scan()
            self._next_scan = now + self.config.scan_interval_seconds
        self._read_host(now)
        for key, state in list(self._states.items()):
            self._read_process(key, state)
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
        with self._lock:
            for key in list(self._states):
                state = self._states[key]
                cand = seen.get(key)
                if cand is None or cand.target != state.candidate.target:
                    self._forget(key)
            for key, cand in seen.items():
                if key not in self._states:
                    self._states[key] = _ProcessState(cand, kube=self._kube_labels(cand.info.pid))
                    log.info("tracking pid=%d target=%s", cand.info.pid, cand.target)

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
        state = self._states.pop(key, None)
        if state is not None:
            log.info("untracking pid=%d target=%s", key[0], state.candidate.target)
        if self.sampler:
            self.sampler.remove(key)

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

    def _read_process(self, key, state: _ProcessState) -> None:
        pid = key[0]
        try:
            stat = procfs.process_stat(pid)
            if stat.start_time != key[1]:
                raise procfs.ProcessGone(pid)
            per_thread = procfs.task_ctx_switches(pid)
            sched = procfs.task_schedstat(pid)
        except procfs.ProcessGone:
            with self._lock:
                self._forget(key)
            return
        except PermissionError:
            self.errors["procfs_permission"] += 1
            return
        voluntary, involuntary = state.ctx_totals(per_thread)
        totals = None
        if self.sampler and state.location is not None:
            failure = self.sampler.failure(key)
            if failure:
                state.gil_base = _add_totals(state.gil_base, self.sampler.totals(key))
                state.probe, state.location = failure, None
                state.probe_detail = "the GIL could no longer be read where it was found"
                state.next_locate = time.monotonic() + _RELOCATE_AFTER
                self.sampler.remove(key)
            else:
                totals = _add_totals(state.gil_base, self.sampler.totals(key))
        now = time.monotonic()
        state.history.append(Tick(now, stat.threads, stat.cpu_user, stat.cpu_system,
                                  voluntary, involuntary, totals, sched))
        self._trim(state.history, now)
        wall = time.time()
        if not state.scores or wall - state.scores[-1][0] >= min(SCORE_HISTORY_STEP,
                                                                  self.config.window_seconds / 2):
            host_cpus = len(self._host[-1].cpus) if self._host else 0
            state.scores.append((wall, self._derive(state, host_cpus)[2]))

    # -- locating the GIL (in a worker: ELF parsing can take a while) -------
    def _locate_due(self) -> None:
        now = time.monotonic()
        for key, state in list(self._states.items()):
            if state.locating or state.location is not None or now < state.next_locate:
                continue
            if state.probe in _PERMANENT:
                continue
            state.locating = True
            self._locator.submit(self._locate, key, state)

    def _locate(self, key, state: _ProcessState) -> None:
        pid = key[0]
        try:
            if state.identity is None:
                try:
                    state.identity = gil.identify(pid)
                except gil.ProbeUnavailable as e:
                    state.probe, state.probe_detail = e.reason, e.detail
                    return
            if not self.config.sampling.enabled or self.sampler is None:
                state.probe, state.probe_detail = "disabled", "sampling.enabled is false in the config"
                return
            location = gil.locate(pid)
            if key not in self._states:
                return
            self.sampler.add(key, location)
            state.location, state.probe, state.probe_detail = location, "ok", ""
            log.info("pid=%d GIL at 0x%x (%s, Python %s)", pid, location.address,
                     location.method, state.identity.version)
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

    # -- views for export ------------------------------------------------------
    def host(self) -> HostView:
        items = deque(self._host)
        if not items:
            return HostView(0, None)
        cpus = len(items[-1].cpus)
        span = _window(items, self.config.window_seconds)
        if span is None:
            return HostView(cpus, None)
        a, b = span
        util = []
        for (busy0, total0), (busy1, total1) in zip(a.cpus, b.cpus):
            dt = total1 - total0
            util.append(min(1.0, max(0.0, (busy1 - busy0) / dt)) if dt > 0 else 0.0)
        return HostView(cpus, tuple(util))

    def alive_keys(self) -> frozenset:
        """Keys of the tracked processes that are still running now (one small read each)."""
        with self._lock:
            keys = [k for k, st in self._states.items() if st.history]
        return frozenset(k for k in keys if _alive(k))

    def snapshot(self, check_alive: bool = True, alive: frozenset | None = None) -> list[ProcessView]:
        """Views of the tracked processes; `alive` (from alive_keys()) skips the liveness reads."""
        with self._lock:
            states = list(self._states.items())
        host_cpus = len(self._host[-1].cpus) if self._host else 0
        views = []
        for key, state in states:
            if not state.history:
                continue
            if alive is not None:
                if key not in alive:
                    continue
            elif check_alive and not _alive(key):
                continue  # gone since the last tick: never publish a dead process
            views.append(self._view(state, host_cpus))
        views.sort(key=lambda v: (v.target, v.pid))
        return views

    def _derive(self, state: _ProcessState, host_cpus: int):
        """(figures, gil_enabled, score, method) over the window ending at the last tick."""
        last: Tick = state.history[-1]
        ident = state.identity
        figures = None
        span = _window(state.history, self.config.window_seconds)
        gil_enabled = None
        if state.location is not None and last.gil is not None and last.gil.samples:
            # free-threaded builds: what the last sample saw; a GIL build always has its GIL
            gil_enabled = True if last.gil.enabled is None else last.gil.enabled
        if span is not None:
            a, b = span
            dt = b.t - a.t
            kw = _gil_figures(state.history, a, b)
            kw.update(_thread_figures(a.sched, b.sched, dt))
            kw["host_idle_cpus"] = _host_idle(self._host, a.t, b.t)
            figures = score.Figures(
                threads=b.threads,
                cpu_cores=((b.cpu_user + b.cpu_system) - (a.cpu_user + a.cpu_system)) / dt,
                voluntary_per_second=(b.voluntary - a.voluntary) / dt,
                involuntary_per_second=(b.involuntary - a.involuntary) / dt,
                host_cpus=host_cpus,
                gil_enabled=gil_enabled,
                **kw,
            )
        value, method = (None, "none")
        # While the GIL is being located, or is located but not yet sampled over a window,
        # publish no score rather than a procfs score that flips to gil_state moments later.
        settling = state.probe == "pending" or state.locating or (
            state.location is not None and (figures is None or figures.contended_ratio is None))
        if figures is not None and not settling:
            value, method = score.score(figures)
        return figures, gil_enabled, value, method

    def _view(self, state: _ProcessState, host_cpus: int) -> ProcessView:
        last: Tick = state.history[-1]
        ident = state.identity
        figures, gil_enabled, value, method = self._derive(state, host_cpus)
        info = state.candidate.info
        return ProcessView(
            target=state.candidate.target,
            pid=info.pid,
            exe=_utf8(info.exe),
            python_version=ident.version if ident else "",
            implementation=ident.implementation if ident else "unknown",
            gil_probe=state.probe,
            kube=tuple((k, _utf8(v)) for k, v in state.kube),
            threads=last.threads,
            cpu_user_seconds=last.cpu_user,
            cpu_system_seconds=last.cpu_system,
            voluntary_total=last.voluntary,
            involuntary_total=last.involuntary,
            figures=figures,
            gil=last.gil,
            gil_enabled=gil_enabled,
            free_threaded=ident.free_threaded if ident else None,
            score=value,
            score_method=method,
            cmdline=_utf8(" ".join(info.cmdline)),
            probe_detail=_utf8(state.probe_detail),
            score_history=tuple(state.scores),
        )


def _gil_figures(history: deque, a: Tick, b: Tick) -> dict:
    """GIL fields of Figures over [a, b]. When the GIL was located during the window, its
    figures start at the first tick that has GIL totals, not at `a`: a window whose first tick
    predates the first GIL sample must not lose the GIL figures (it used to, and diagnose then
    fell back to /proc although the probe was fine)."""
    if b.gil is None:
        return {}
    first = a
    if a.gil is None:
        first = next((t for t in history if t.t >= a.t and t.gil is not None), b)
    if first is b or b.gil.sampled_seconds <= first.gil.sampled_seconds:
        return {}
    ds = b.gil.sampled_seconds - first.gil.sampled_seconds
    return dict(
        interval_seconds=b.gil.interval_seconds,
        held_ratio=(b.gil.held_seconds - first.gil.held_seconds) / ds,
        waiting_threads=(b.gil.wait_seconds - first.gil.wait_seconds) / ds,
        switches_per_second=(b.gil.switches - first.gil.switches) / (b.t - first.t),
        contended_ratio=(b.gil.contended_seconds - first.gil.contended_seconds) / ds,
        gil_sampled_seconds=ds,
    )


def _host_idle(host: deque, t0: float, t1: float) -> float | None:
    """CPUs the host left idle between the ticks at t0 and t1 (its ticks are read just before
    the processes' in the same tick)."""
    ticks = list(host)
    h0 = next((h for h in reversed(ticks) if h.t <= t0), None)
    h1 = next((h for h in reversed(ticks) if h.t <= t1), None)
    if h0 is None or h1 is None or h1.t <= h0.t:
        return None
    idle = 0.0
    for (busy0, total0), (busy1, total1) in zip(h0.cpus, h1.cpus):
        dt = total1 - total0
        if dt > 0:
            idle += min(1.0, max(0.0, 1.0 - (busy1 - busy0) / dt))
    return idle


def _thread_figures(a: dict, b: dict, dt: float) -> dict:
    """Per-thread CPU over the window, from schedstat: how many threads share the CPU the
    process used, the busiest thread's share, and the time threads sat runnable (preempted)."""
    if not a or not b or dt <= 0:
        return {}
    runs = []
    delay = 0
    for tid, (run, wait) in b.items():
        run0, wait0 = a.get(tid, (0, 0))  # a thread born in the window starts at 0
        if run < run0 or wait < wait0:  # a reused TID
            run0 = wait0 = 0
        runs.append(run - run0)
        delay += wait - wait0
    total = sum(runs)
    if total <= 0:
        return dict(run_delay_cores=delay / 1e9 / dt)
    return dict(
        run_delay_cores=delay / 1e9 / dt,
        # participation ratio: 4 threads with equal CPU give 4.0, one thread doing it all 1.0
        busy_threads=total * total / sum(r * r for r in runs),
        top_thread_share=max(runs) / total,
    )


def _add_totals(base: GilTotals | None, now: GilTotals | None) -> GilTotals | None:
    """Counters that continue across sampler sessions of one process: a GIL that was lost
    (validation failed) and found again must not restart its *_total series at zero."""
    if base is None or now is None:
        return now if now is not None else base
    return GilTotals(
        sampled_seconds=base.sampled_seconds + now.sampled_seconds,
        held_seconds=base.held_seconds + now.held_seconds,
        wait_seconds=base.wait_seconds + now.wait_seconds,
        contended_seconds=base.contended_seconds + now.contended_seconds,
        switches=base.switches + now.switches,
        interval_seconds=now.interval_seconds,
        samples=base.samples + now.samples,
        futex_waiters_checked=now.futex_waiters_checked,
        enabled=now.enabled,
    )


def _utf8(text: str) -> str:
    """Label-safe text: /proc gives undecodable bytes as surrogates, which UTF-8 output rejects."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _alive(key) -> bool:
    try:
        return procfs.start_time(key[0]) == key[1]
    except (procfs.ProcessGone, PermissionError):
        return False
