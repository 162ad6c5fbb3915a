"""The table of tracked processes, kept in step with the scans (monitor.py runs it).

TrackedProcesses: which processes are tracked. A scan (discover.py) adds what is new, with its
kept /proc files and pod labels, and forgets what is gone or now belongs to another target;
closing the kept files happens under the table's lock only, which is what lets a scrape
thread read liveness from them (Monitor.alive_keys).

It runs on the monitor's thread; the scrape threads only read.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable

from exporter import procfs
from exporter.config import Config
from exporter.discover import Discoverer
from exporter.giltracker import GilTracker
from exporter.state import ProcessState

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
