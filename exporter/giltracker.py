"""The GIL tracker: locating each process's GIL, its subinterpreters' GILs, and taking their
totals from the sampler for a pass.

Locating parses ELF files and reads target memory, which takes a while and which a target
controls: it runs on a locator worker, one job at a time (more in parallel would finish
sooner but cost more CPU in GIL handoffs: 100 processes took 2.9 s and 0.52 CPU-s to every
probe ok with one worker, 1.4 s and 0.67 with 4). Each job has a deadline (LOCATE_DEADLINE):
a job past it is abandoned with its worker (a Python thread cannot be cancelled; a read from
a file the target controls may block for good), its process gets gil_probe="locate_timeout",
and a fresh worker serves the other processes. A process is not located again while its
abandoned worker still runs, so one process holds at most one stuck worker, and at most
MAX_ABANDONED are kept: past that, locating waits for one of them to return. Workers are
daemon threads and nothing joins them, so shutdown never waits for a stuck one.

Several GILs (3.12+ subinterpreters with a GIL of their own): the main GIL is sampled under
the process's key, each other one under key + (interpreter id,); the locator looks for new
ones every scan. From the first time a process shows more than one GIL (state.multi) its GIL
series are published per interpreter.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from exporter import gil
from exporter.config import Config
from exporter.sampler import GilSampler, GilTotals
from exporter.state import ProcessState, add_totals
from exporter.threadlabels import ThreadLabels

log = logging.getLogger(__name__)

# Probe outcomes that no retry can change.
PERMANENT = frozenset({"free_threaded", "musl", "not_cpython", "not_elf", "unsupported_arch", "disabled",
                       "unsupported_version", "binary_replaced", "not_regular_file"})
RELOCATE_AFTER = 30.0   # seconds between attempts to locate a GIL that was not found
LOCATE_DEADLINE = 10.0  # a locate running longer is abandoned: gil_probe="locate_timeout"
MAX_ABANDONED = 4       # stuck workers kept at most; past that, locating waits for one


@dataclass(eq=False)
class _Job:
    """One locate (or look for subinterpreters' GILs) of one process."""

    key: tuple
    run: Callable[[_Job], None]
    kind: str                      # "locate" | "interpreters"
    started: float | None = None   # monotonic, when a worker took it
    abandoned: bool = False        # past its deadline: its results are thrown away


@dataclass(eq=False)
class _Worker:
    thread: threading.Thread | None = None
    job: _Job | None = None
    retired: bool = False          # abandoned with its job: ends when the job returns
    done: threading.Event = field(default_factory=threading.Event)


class Locator:
    """A queue of jobs, run one at a time by a daemon worker, each within a deadline."""

    def __init__(self, deadline: float = LOCATE_DEADLINE, max_abandoned: int = MAX_ABANDONED):
        self.deadline = deadline
        self.max_abandoned = max_abandoned
        self.apply_lock = threading.Lock()  # a job publishes its results, or is abandoned, under it
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._worker: _Worker | None = None
        self._abandoned: list[_Worker] = []
        self._stopped = False

    def submit(self, job: _Job) -> None:
        with self._cond:
            self._queue.append(job)
            self._ensure_worker()
            self._cond.notify()

    def stuck_keys(self) -> frozenset:
        """Keys whose abandoned job is still running."""
        with self._cond:
            self._abandoned = [w for w in self._abandoned if not w.done.is_set()]
            return frozenset(w.job.key for w in self._abandoned if w.job is not None)

    def overdue(self, now: float) -> list[_Job]:
        """Abandon the running job if past its deadline (its worker with it) and start a fresh
        worker for the queue; returns the jobs abandoned now."""
        with self._cond:
            worker = self._worker
            job = worker.job if worker is not None else None
            if job is None or job.started is None or now - job.started < self.deadline:
                self._ensure_worker()
                return []
            with self.apply_lock:
                job.abandoned = True
            worker.retired = True
            self._abandoned.append(worker)
            self._worker = None
            self._ensure_worker()
            return [job]

    def next_deadline(self) -> float | None:
        """When the running job becomes overdue (None: none running)."""
        worker = self._worker
        job = worker.job if worker is not None else None
        return None if job is None or job.started is None else job.started + self.deadline

    def stop(self) -> None:
        """Wake the workers to end; joins none (a stuck one is a daemon thread)."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify_all()

    def _ensure_worker(self) -> None:
        # called with self._cond held
        if self._stopped or self._worker is not None or not self._queue:
            return
        self._abandoned = [w for w in self._abandoned if not w.done.is_set()]
        if len(self._abandoned) >= self.max_abandoned:
            log.warning("locating waits: %d locator workers are stuck in targets", len(self._abandoned))
            return
        worker = _Worker()
        worker.thread = threading.Thread(target=self._serve, args=(worker,), name="gil-locate", daemon=True)
        self._worker = worker
        worker.thread.start()

    def _serve(self, worker: _Worker) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopped and not worker.retired:
                        self._cond.wait(1.0)
                    if self._stopped or worker.retired:
                        return
                    job = self._queue.popleft()
                    job.started = time.monotonic()
                    worker.job = job
                try:
                    job.run(job)
                except Exception:  # the jobs count their own failures; keep serving
                    log.debug("locator job failed", exc_info=True)
                with self._cond:
                    if worker.retired:
                        return
                    worker.job = None
        finally:
            worker.done.set()
            with self._cond:
                if self._worker is worker:
                    self._worker = None
                self._ensure_worker()


class GilTracker:
    """Locates each tracked process's GILs (a Locator worker) and takes their totals from the
    sampler for a pass (the monitor thread)."""

    def __init__(self, config: Config, sampler: GilSampler | None, errors: Counter,
                 is_tracked: Callable[[tuple], bool], deadline: float = LOCATE_DEADLINE):
        self.config = config  # replaced by Monitor.reload
        self.sampler = sampler
        self.errors = errors
        self._is_tracked = is_tracked
        self._gils_lock = threading.Lock()  # replacing a ProcessState.gils (monitor and locator)
        self.locator = Locator(deadline)

    def stop(self) -> None:
        self.locator.stop()

    def next_check(self) -> float | None:
        """When the monitor should look for an overdue locate again."""
        return self.locator.next_deadline()

    # -- the monitor thread ---------------------------------------------------------
    def due(self, states: dict) -> None:
        """Abandon an overdue locate; start locating what needs it."""
        now = time.monotonic()
        for job in self.locator.overdue(now):
            self._timed_out(job, states.get(job.key), now)
        stuck = self.locator.stuck_keys()
        for key, state in list(states.items()):
            if key in stuck:
                continue
            if (state.location is not None and not state.locating and now >= state.next_interps
                    and _may_have_other_gils(state.location)):
                state.locating = True
                state.next_interps = now + self.config.scan_interval_seconds
                self.locator.submit(_Job(key, lambda job, s=state: self._find_other_gils(job, s),
                                         "interpreters"))
                continue
            if state.locating or state.location is not None or now < state.next_locate:
                continue
            if state.probe in PERMANENT:
                continue
            state.locating = True
            self.locator.submit(_Job(key, lambda job, s=state: self._locate(job, s), "locate"))

    def _timed_out(self, job: _Job, state: ProcessState | None, now: float) -> None:
        self.errors["gil_locate"] += 1
        seconds = now - job.started
        log.error("pid=%d %s took over %.0f s: abandoned (a read from the target blocks?)",
                  job.key[0], "locating the GIL" if job.kind == "locate" else "looking for subinterpreters' GILs",
                  seconds)
        if state is None:
            return
        with self.locator.apply_lock:
            state.locating = False
            if job.kind == "locate" and state.location is None:
                state.probe = "locate_timeout"
                state.probe_detail = (f"locating the GIL took over {self.locator.deadline:g} s "
                                      f"(a read from the target's files or memory blocked)")
                state.next_locate = now + RELOCATE_AFTER
            else:
                state.next_interps = now + RELOCATE_AFTER

    def forget(self, key, state: ProcessState | None) -> None:
        """Nothing of an untracked process stays in the sampler."""
        if self.sampler:
            self.sampler.remove(key)
            if state is not None:
                for iid in state.gils:
                    self.sampler.remove(key + (iid,))

    def take(self, key, state: ProcessState, alive: set | None) -> tuple[GilTotals | None, dict, dict]:
        """For a pass: (main GIL totals, {interpreter id: totals}, per thread {(interpreter id,
        TID): held seconds since the last pass}). `alive`: the live TIDs when per thread. A GIL
        that could no longer be read is dropped here, to be located again."""
        totals = None
        gils: dict = {}
        held: dict = {}
        if not self.sampler or state.location is None:
            return totals, gils, held
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
            state.next_locate = time.monotonic() + RELOCATE_AFTER
            self.sampler.remove(key)
        else:
            totals = add_totals(state.gil_base, now_totals)
        return totals, gils, held

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

    # -- the locator worker ------------------------------------------------------------
    def _locate(self, job: _Job, state: ProcessState) -> None:
        key = job.key
        pid = key[0]
        config = self.config
        identity = location = None
        outcome: tuple | None = None  # (probe, detail) when no GIL was found
        try:
            if not config.sampling.enabled or self.sampler is None:
                identity = state.identity or gil.identify(pid)
                outcome = ("disabled", "sampling.enabled is false in the config")
            else:
                try:
                    location = gil.locate(pid)  # identifies the target too: one identify per process
                    identity = location.identity
                except gil.ProbeUnavailable:
                    if state.identity is None:  # the labels still want the version
                        try:
                            identity = gil.identify(pid)
                        except gil.ProbeUnavailable:
                            pass
                    raise
        except gil.ProbeUnavailable as e:
            outcome = (e.reason, e.detail)
            log.info("pid=%d GIL probe unavailable: %s %s", pid, e.reason, getattr(e, "detail", ""))
        except Exception as e:
            outcome = ("error", f"{type(e).__name__}: {e}")
            self.errors["gil_locate"] += 1
            log.error("pid=%d locating the GIL failed: %s: %s", pid, type(e).__name__, e)
            log.debug("locate failure", exc_info=True)
        with self.locator.apply_lock:
            if job.abandoned:
                return
            others = False
            try:
                if identity is not None:
                    state.identity = identity
                if outcome is not None:
                    state.probe, state.probe_detail = outcome
                elif self._is_tracked(key):
                    self._start_sampling(key, state, location)
                    others = _may_have_other_gils(location)
                    if others:
                        state.next_interps = time.monotonic() + config.scan_interval_seconds
            finally:
                state.next_locate = time.monotonic() + RELOCATE_AFTER
                state.locating = False
        if others:
            self._add_other_gils(job, key, state, location)

    def _start_sampling(self, key, state: ProcessState, location: gil.GilLocation) -> None:
        config = self.config
        per_thread = config.sampling.per_thread
        if per_thread and state.labels is None:
            state.labels = ThreadLabels(config.limits.max_threads_per_process, config.window_seconds)
        state.per_thread = per_thread and state.labels is not None
        self.sampler.add(key, location, per_thread=state.per_thread)
        state.location, state.probe, state.probe_detail = location, "ok", ""
        log.info("pid=%d GIL at 0x%x (%s, Python %s)", key[0], location.address,
                 location.method, location.identity.version)

    def _find_other_gils(self, job: _Job, state: ProcessState) -> None:
        key = job.key
        try:
            location = state.location
            if location is not None and self._is_tracked(key):
                self._add_other_gils(job, key, state, location)
        except Exception as e:
            self.errors["gil_locate"] += 1
            log.error("pid=%d looking for subinterpreters' GILs failed: %s: %s", key[0], type(e).__name__, e)
        finally:
            with self.locator.apply_lock:
                if not job.abandoned:
                    state.locating = False

    def _add_other_gils(self, job: _Job, key, state: ProcessState, main: gil.GilLocation) -> None:
        """Sample the GILs of subinterpreters that have their own (locator worker); stop
        sampling those of interpreters that are gone."""
        try:
            found = gil.other_gils(main, {loc.address: loc for loc in state.gils.values()})
        except (gil.ProbeUnavailable, OSError) as e:
            log.debug("pid=%d subinterpreters' GILs: %s", key[0], e)
            return
        with self.locator.apply_lock:
            if job.abandoned:
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
            if not self._is_tracked(key):  # forgotten meanwhile: nothing of it stays in the sampler
                for iid in now:
                    self.sampler.remove(key + (iid,))
            elif now.keys() != old.keys():
                log.info("pid=%d GILs of subinterpreters: %s", key[0], sorted(now) or "none")


def _may_have_other_gils(location: gil.GilLocation) -> bool:
    """Subinterpreters with a GIL of their own exist from 3.12 on."""
    return gil.supports(location.identity.minor, "own_gils")
