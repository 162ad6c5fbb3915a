"""Per-thread GIL time: the share of time each thread held the GIL, waited for it, and ran on
a CPU (issue 9, part 1) -- the accounting.

`gil.GilThreads` says, at each sample, which thread (native TID) holds a GIL and which threads
wait for it. Here that time is added up per thread (`ThreadAttribution`, sample-and-hold as in
the daemon's sampler), and each thread's name and CPU time from /proc are kept over the
measurement (`TaskBook`, from `procfs.task_stats`; the name is /proc/PID/task/TID/comm, which
CPython 3.14 sets from `threading.Thread`'s name). threadtable.py joins the two into the
per-thread table, threadlabels.py caps the per-thread series, threadsampler.py samples one
process for `diagnose`, `top` and the landing page.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from exporter import procfs

#: What every thread without a row (the table) or a series (the labels) of its own adds up in.
OTHER = "other"


@dataclass(frozen=True)
class GilSeen:
    """One GIL at one sample, by native TID (what `GilThreads` read)."""
    interpreter: int              # the owning interpreter's id (0: the main interpreter)
    locked: bool
    holder: int                   # TID of the holder; 0 when free or not readable
    waiting: tuple[int, ...]      # TIDs waiting for it
    waiters: int                  # the GIL's own count of waiters (condvar, or gil_requested)


class ThreadAttribution:
    """GIL time per thread, sample-and-hold: what one sample saw is credited until the next one.

    `held[0]` is held time whose holder's TID could not be read (a thread state freed under the
    read, or a TID that is no thread of the process). With several GILs (subinterpreters), each
    GIL's holder is credited: a thread holds at most one of them, so per-thread held time stays
    at most the sampled time, while the held times of all threads can add up to more.
    """

    def __init__(self) -> None:
        self.sampled = 0.0
        self.samples = 0
        self.held: dict[int, float] = {}
        self.waiting: dict[int, float] = {}
        self.locked: dict[int, float] = {}         # interpreter id -> seconds its GIL was held
        self.waiters: dict[int, float] = {}        # interpreter id -> thread-seconds its GIL's count gives
        self.interpreter: dict[int, int] = {}      # tid -> interpreter whose GIL it last held or awaited

    def credit(self, dt: float, seen: Iterable[GilSeen]) -> None:
        self.sampled += dt
        self.samples += 1
        for g in seen:
            if g.locked:
                self.held[g.holder] = self.held.get(g.holder, 0.0) + dt
                self.locked[g.interpreter] = self.locked.get(g.interpreter, 0.0) + dt
                if g.holder:
                    self.interpreter[g.holder] = g.interpreter
            for tid in g.waiting:
                self.waiting[tid] = self.waiting.get(tid, 0.0) + dt
                self.interpreter[tid] = g.interpreter
            if g.waiters:
                self.waiters[g.interpreter] = self.waiters.get(g.interpreter, 0.0) + dt * g.waiters

    def copy(self) -> ThreadAttribution:
        out = ThreadAttribution()
        out.sampled, out.samples = self.sampled, self.samples
        out.held, out.waiting = dict(self.held), dict(self.waiting)
        out.locked, out.waiters = dict(self.locked), dict(self.waiters)
        out.interpreter = dict(self.interpreter)
        return out

    def since(self, earlier: ThreadAttribution) -> ThreadAttribution:
        """The time credited after `earlier` (a copy() of this one)."""
        out = ThreadAttribution()
        out.sampled, out.samples = self.sampled - earlier.sampled, self.samples - earlier.samples

        def diff(now: dict, then: dict) -> dict:
            return {k: v - then.get(k, 0.0) for k, v in now.items() if v - then.get(k, 0.0) > 0}
        out.held, out.waiting = diff(self.held, earlier.held), diff(self.waiting, earlier.waiting)
        out.locked, out.waiters = diff(self.locked, earlier.locked), diff(self.waiters, earlier.waiters)
        out.interpreter = dict(self.interpreter)
        return out


class ThreadCounter:
    """One cumulative per-thread counter (CPU seconds, run delay) over a measurement.

    A thread first seen after the first read was born during the measurement: all of its count
    is in. A TID whose count goes down is a new thread under a reused TID: the earlier
    thread's part is kept in `used`.
    """

    def __init__(self) -> None:
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.used: dict[int, float] = {}

    def observe(self, values: dict[int, float], first: bool) -> None:
        for tid, value in values.items():
            prev = self.last.get(tid)
            if prev is None:
                self.base[tid] = value if first else 0.0
            elif value < prev:
                self.used[tid] = self.used.get(tid, 0.0) + prev - self.base[tid]
                self.base[tid] = 0.0
            self.last[tid] = value

    def copy(self) -> ThreadCounter:
        out = ThreadCounter()
        out.base, out.last, out.used = dict(self.base), dict(self.last), dict(self.used)
        return out

    def since(self, earlier: ThreadCounter) -> ThreadCounter:
        """The count after `earlier` (a copy() of this one)."""
        out = self.copy()
        out.used = {}
        for tid, value in self.last.items():
            then = earlier.last.get(tid)
            out.base[tid] = then if then is not None and then <= value else 0.0
        return out

    def total(self, tid: int) -> float | None:
        if tid not in self.last:
            return None
        return self.last[tid] - self.base[tid] + self.used.get(tid, 0.0)


class TaskBook:
    """Names, CPU time and run delay of a process's threads over a measurement
    (procfs.task_stats; the delay from procfs.task_schedstat, where the kernel has it)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.t1: float | None = None
        self.cpu_seconds = ThreadCounter()
        self.delay_seconds = ThreadCounter()   # runnable but waiting for a CPU (schedstat)
        self.names: dict[int, str] = {}
        self.alive: set[int] = set()

    def observe(self, stats: dict[int, procfs.TaskStat], now: float,
                delays: dict[int, float] | None = None) -> None:
        """One read of the threads; `delays`: each thread's run delay so far, in seconds."""
        first = self.t0 is None
        if first:
            self.t0 = now
        self.t1 = now
        self.cpu_seconds.observe({tid: st.cpu_seconds for tid, st in stats.items()}, first)
        self.delay_seconds.observe(delays or {}, first)
        self.names.update((tid, st.name) for tid, st in stats.items())
        self.alive = set(stats)

    def copy(self) -> TaskBook:
        out = TaskBook()
        out.t0, out.t1 = self.t0, self.t1
        out.cpu_seconds, out.delay_seconds = self.cpu_seconds.copy(), self.delay_seconds.copy()
        out.names, out.alive = dict(self.names), set(self.alive)
        return out

    def since(self, earlier: TaskBook) -> TaskBook:
        """The CPU time and delay after `earlier` (a copy() of this one)."""
        out = self.copy()
        out.t0 = earlier.t1
        out.cpu_seconds = self.cpu_seconds.since(earlier.cpu_seconds)
        out.delay_seconds = self.delay_seconds.since(earlier.delay_seconds)
        return out

    def tids(self) -> set[int]:
        return set(self.cpu_seconds.last)

    def cpu(self, tid: int) -> float | None:
        """Share of one core the thread used over the measurement; None before two reads."""
        return self._share(self.cpu_seconds, tid)

    def delay(self, tid: int) -> float | None:
        """Share of one core the thread sat runnable but waiting for a CPU over the measurement;
        None before two reads or without schedstat."""
        return self._share(self.delay_seconds, tid)

    def _share(self, counter: ThreadCounter, tid: int) -> float | None:
        total = counter.total(tid)
        if self.t0 is None or self.t1 is None or self.t1 <= self.t0 or total is None:
            return None
        return total / (self.t1 - self.t0)
