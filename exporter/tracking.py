"""The monitor's two helpers: the table of tracked processes and the reading of them in a pass.

TrackedProcesses: which processes are tracked. A scan (discover.py) adds what is new, with its
kept /proc files and pod labels, and forgets what is gone or now belongs to another target;
closing the kept files happens under the table's lock only, which is what lets a scrape
thread read liveness from them (Monitor.alive_keys).

ProcessReader: one pass's readings. The host's CPU times, and per process its /proc figures
and the GIL totals the GilTracker hands over, appended as a `Tick` to the process's history,
which is trimmed to the window. A process's failure costs that process's figures only.

Both run on the monitor's thread (monitor.py); the scrape threads only read.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Callable

from exporter import procfs, views
from exporter.config import Config
from exporter.discover import Discoverer
from exporter.giltracker import GilTracker
from exporter.state import SCORE_HISTORY_STEP, HostTick, ProcessState, Tick

log = logging.getLogger(__name__)


class TrackedProcesses:
    """key -> ProcessState of every tracked process, kept in step with the scans."""

    def __init__(self, config: Config, tracker: GilTracker, errors: Counter,
                 pod_resolver: Callable | None = None):
        self.states: dict[tuple, ProcessState] = {}
        self.lock = threading.Lock()  # held to change the table or close a kept file
        self.dropped: dict[str, int] = {}  # target -> processes the last scan left out (its cap)
        self._discoverer = Discoverer(config)
        self._tracker = tracker
        self._errors = errors
        self._pod_resolver = pod_resolver

    def reload(self, config: Config) -> None:
        """Scan with `config` from the next scan on (called with the lock held)."""
        self._discoverer = Discoverer(config)

    def scan(self) -> list[tuple[tuple, ProcessState]]:
        """Rescan: forget what is gone or changed target, add what is new; return the added."""
        try:
            result = self._discoverer.scan()
        except Exception as e:
            self._errors["scan"] += 1
            log.error("scan failed: %s: %s", type(e).__name__, e)
            return []
        self.dropped = dict(result.dropped)
        seen = {c.key: c for c in result.candidates}
        added = []
        with self.lock:
            for key in list(self.states):
                cand = seen.get(key)
                if cand is None or cand.target != self.states[key].candidate.target:
                    self._forget(key)
        for key, cand in seen.items():
            if key in self.states:
                continue
            try:
                stat = procfs.StatFile(key[0], key[1])
            except (procfs.ProcessGone, OSError):
                continue  # gone since the scan
            state = ProcessState(cand, kube=self._kube_labels(cand.info.pid), stat=stat,
                                 tasks=procfs.ThreadFiles(key[0]))
            with self.lock:
                self.states[key] = state
            added.append((key, state))
            log.info("tracking pid=%d target=%s", cand.info.pid, cand.target)
        return added

    def forget(self, key) -> None:
        """Stop tracking a process (it is gone): its kept files closed, its GILs unsampled."""
        with self.lock:
            self._forget(key)

    def close(self) -> None:
        """Close every kept file (on stop)."""
        with self.lock:
            for state in self.states.values():
                _close_files(state)

    def _forget(self, key) -> None:
        # called with self.lock held
        state = self.states.pop(key, None)
        if state is not None:
            log.info("untracking pid=%d target=%s", key[0], state.candidate.target)
            _close_files(state)
        self._tracker.forget(key, state)

    def _kube_labels(self, pid: int) -> tuple:
        if self._pod_resolver is None:
            return ()
        try:
            return self._pod_resolver(pid)
        except Exception as e:
            self._errors["kube"] += 1
            log.warning("pod lookup for pid %d failed: %s", pid, e)
            return ()


def _close_files(state: ProcessState) -> None:
    if state.stat is not None:
        state.stat.close()
    if state.tasks is not None:
        state.tasks.close()


class ProcessReader:
    """One pass's readings: the host's CPU times and each process's Tick, in their histories."""

    def __init__(self, config: Config, tick_seconds: float, tracker: GilTracker, errors: Counter,
                 gone: Callable[[tuple], None]):
        self.config = config  # replaced by Monitor.reload
        self.host: deque = deque()  # HostTick history, trimmed to the window
        self._tick_seconds = tick_seconds
        self._tracker = tracker
        self._errors = errors
        self._gone = gone  # a process found gone while read: stop tracking it

    def read_host(self, now: float) -> None:
        try:
            self.host.append(HostTick(now, tuple(procfs.host_cpu_times())))
        except OSError as e:
            self._errors["host"] += 1
            log.error("reading host CPU times failed: %s", e)
            return
        self._trim(self.host, now)

    def read_guarded(self, key, state: ProcessState) -> None:
        """One process's part of a pass: whatever it raises costs that process's figures only
        (errors_total{reason="process"}); the other processes are read as ever."""
        try:
            self.read_process(key, state)
            state.failing = ""
        except Exception as e:
            self._errors["process"] += 1
            # Nothing stale is published: the process is back with its next good readings.
            state.history = deque()
            what = f"{type(e).__name__}: {e}"
            if what != state.failing:  # once per kind of failure, not once per pass
                log.error("pid=%d reading the process failed, its figures are left out: %s", key[0], what)
                log.debug("process failure", exc_info=True)
            state.failing = what

    def read_process(self, key, state: ProcessState) -> None:
        try:
            stat = state.stat.read()
            per_thread, sched = state.tasks.read(stat.threads)
        except procfs.ProcessGone:
            self._gone(key)
            return
        except PermissionError:
            self._errors["procfs_permission"] += 1
            return
        voluntary, involuntary = state.ctx_totals(per_thread)
        alive = set(per_thread) if state.per_thread else None
        totals, gils, held = self._tracker.take(key, state, alive)
        thread_held = None
        if state.per_thread and state.labels is not None:
            pid_names = key[0]
            values = state.labels.update(time.monotonic(), held, lambda: _thread_names(pid_names),
                                         set(per_thread))
            thread_held = tuple(sorted((label, g, v) for (label, g), v in values.items()))
        now = time.monotonic()
        tick = Tick(now, stat.threads, stat.cpu_user, stat.cpu_system, voluntary, involuntary,
                    totals, sched, gils, thread_held)
        if state.history:
            state.held_off_cpu += views.held_off_cpu_increment(state.history[-1], tick)
        state.history.append(tick)
        self._trim(state.history, now)
        wall = time.time()
        if not state.scores or wall - state.scores[-1][0] >= min(SCORE_HISTORY_STEP,
                                                                  self.config.window_seconds / 2):
            state.scores.append((wall, views.derive(state, self.host, self.config.window_seconds)[2]))

    def _trim(self, history: deque, now: float) -> None:
        # Keep one sample older than the window so the window is always covered.
        horizon = now - self.config.window_seconds - 2 * self._tick_seconds
        while len(history) > 2 and history[1].t < horizon:
            history.popleft()


def _thread_names(pid: int) -> dict[int, str]:
    """TID -> name of every thread (read only when a thread is to get a label)."""
    try:
        return {tid: st.name for tid, st in procfs.task_stats(pid).items()}
    except (procfs.ProcessGone, OSError):
        return {}
