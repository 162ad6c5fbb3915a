"""The cap on per-thread series: which threads get a `thread` label value of their own on a
per-thread counter, the rest adding up in `thread="other"`.
"""
from __future__ import annotations

import math
from typing import Callable

from exporter.attribution import OTHER

#: A thread on a per-thread counter: (group, TID). The group is the interpreter id on a process
#: with several GILs (0 otherwise); TID 0 is a holder whose TID was not read.
ThreadKey = tuple[int, int]


class ThreadLabels:
    """Which threads get a `thread` label value of their own on a per-thread counter; the time
    of every other thread adds up in `thread="other"` (one per group).

    At most `max_threads` threads hold a label at a time, chosen by their held time over about
    the last `window` seconds. Churn cannot make series: a thread is a candidate only after
    being seen for `window` seconds, and it takes a label from a labelled thread only with twice
    that thread's recent time, once that one has held its label for `window` seconds. A thread
    that ends gives its label up. Only time credited after a thread got its label goes to its
    series, so every counter is monotonic and, per group, all of them add up to the time
    credited.

    The label is the thread's name where that name is unique among the live threads (CPython
    3.14 names OS threads after `threading.Thread`), otherwise its TID.
    """

    PERSIST = 64      # values kept of labels that went away, for a thread that comes back

    def __init__(self, max_threads: int, window: float) -> None:
        if max_threads < 0 or not window > 0:
            raise ValueError("max_threads must be >= 0 and window > 0")
        self.max_threads = max_threads
        self.window = window
        self.other: dict[int, float] = {}                # group -> value of thread="other"
        self.labels: dict[ThreadKey, str] = {}
        self.since: dict[ThreadKey, float] = {}          # when it got its label
        self.values: dict[tuple[str, int], float] = {}   # (label, group) -> value, live labels
        self.kept: dict[tuple[str, int], float] = {}     # ... of labels given up
        self.recent: dict[ThreadKey, float] = {}         # decayed held seconds
        self.first_seen: dict[int, float] = {}           # tid -> when first seen alive
        self._last: float | None = None

    def update(self, now: float, increments: dict[ThreadKey, float],
               names: Callable[[], dict[int, str]], alive: set[int]) -> dict[tuple[str, int], float]:
        """Credit `increments` (held seconds per thread since the last update) under the labels
        of the last update, then relabel; `names()` (read only when a thread is to get a label)
        gives the live threads' names by TID, `alive` their TIDs. Returns the counter value of
        every live (label, group), "other" included."""
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        decay = math.exp(-dt / self.window)
        for key in self.recent:
            self.recent[key] *= decay
        for key, inc in increments.items():
            if inc <= 0:
                continue
            label = self.labels.get(key)
            if label is None:
                self.other[key[0]] = self.other.get(key[0], 0.0) + inc
            else:
                self.values[(label, key[0])] += inc
            if key[1]:
                self.recent[key] = self.recent.get(key, 0.0) + inc
        for tid in alive:
            self.first_seen.setdefault(tid, now)
        for key in [k for k in self.labels if k[1] not in alive]:
            self._release(key)
        for tid in [t for t in self.first_seen if t not in alive]:
            del self.first_seen[tid]
        for key in [k for k in self.recent if k[1] not in alive]:
            del self.recent[key]
        self._promote(now, names, alive)
        return {**self.values, **{(OTHER, g): v for g, v in self.other.items()}}

    def _release(self, key: ThreadKey) -> None:
        label = self.labels.pop(key)
        self.since.pop(key, None)
        self.kept[(label, key[0])] = self.values.pop((label, key[0]))
        while len(self.kept) > self.PERSIST:
            del self.kept[next(iter(self.kept))]

    def _label_for(self, tid: int, names: dict[int, str], alive: set[int]) -> str:
        name = names.get(tid, "")
        taken = {label for label, _g in self.values}
        same = sum(1 for t in alive if names.get(t) == name)
        if name and same == 1 and name != OTHER and not name.isdigit() and name not in taken:
            return name
        return str(tid)

    def _assign(self, key: ThreadKey, now: float, names: dict[int, str], alive: set[int]) -> None:
        label = self._label_for(key[1], names, alive)
        self.labels[key] = label
        self.since[key] = now
        self.values[(label, key[0])] = self.kept.pop((label, key[0]), 0.0)

    def _promote(self, now: float, names: Callable[[], dict[int, str]], alive: set[int]) -> None:
        ready = sorted((k for k, r in self.recent.items() if r > 0 and k not in self.labels
                        and now - self.first_seen.get(k[1], now) >= self.window),
                       key=lambda k: (-self.recent[k], k))
        if not ready:
            return
        known: dict[int, str] = {}

        def named() -> dict[int, str]:  # read only when a label is given (not per pass)
            if not known:
                known.update(names())
            return known
        for key in ready:
            if len(self.labels) < self.max_threads:
                self._assign(key, now, named(), alive)
                continue
            settled = [k for k in self.labels if now - self.since[k] >= self.window]
            if not settled:
                break
            weakest = min(settled, key=lambda k: (self.recent.get(k, 0.0), k))
            if self.recent[key] <= 2 * self.recent.get(weakest, 0.0):
                break
            self._release(weakest)
            self._assign(key, now, named(), alive)
            break           # one swap per update: no flapping
