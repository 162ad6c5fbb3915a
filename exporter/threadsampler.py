"""Sampling one process's threads: `ThreadSampler`, the short-lived sampler thread behind
`diagnose` and `top`, reads who holds and who waits for every GIL of one process (and nothing
else), and its threads' names and CPU from /proc; `SamplerPool` keeps one per process the
landing page's per-process pages are looking at.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence

from exporter import gil, procfs
from exporter.attribution import GilSeen, TaskBook, ThreadAttribution
from exporter.gil.memory import task_syscalls
from exporter.gil.threads import GilThreads
from exporter.sampling import Ended, Jitter, SamplingLoop, unavailable
from exporter.threadtable import ThreadTable, thread_table


def _known_tids(pid: int) -> set[int]:
    try:
        return set(procfs.task_ids(pid))
    except (procfs.ProcessGone, OSError):
        return set()


class _Gil:
    """One GIL of the sampled process: its reader and who holds it / waits for it."""

    def __init__(self, location: gil.GilLocation) -> None:
        self.interpreter = location.interpreter_id
        self.reader = gil.GilReader(location)
        try:
            self.threads = GilThreads(self.reader.fd, location, self.reader.threads)
        except BaseException:
            self.reader.close()
            raise

    def close(self) -> None:
        self.reader.close()


class ThreadSampler:
    """Samples who holds and who waits for every GIL of one process, from a daemon thread (a
    `sampling.SamplingLoop` it is the consumer of), and reads its threads' names and CPU from
    /proc about once a second.

    start() returns at once (locating happens in the thread); table() may be called at any
    time; stop() ends the thread and returns the table. A process that exits ends the
    sampling; the table keeps what was measured until then.
    """

    TASKS_EVERY = 1.0
    RELOCATE_AFTER = 1.0
    HISTORY = 120          # snapshots kept for table(window=...): 2 minutes

    def __init__(self, pid: int, rate_hz: float = 100.0, jitter: float = 0.5,
                 locations: Sequence[gil.GilLocation] | None = None,
                 read_gil: bool = True) -> None:
        self.schedule = Jitter(rate_hz, jitter)
        self.pid = pid
        self.read_gil = read_gil           # False: names and CPU only, target memory never read
        self.locations = list(locations) if locations else None
        self.attribution = ThreadAttribution()
        self.book = TaskBook()
        self.unavailable = ""
        self.waiting_source = ""
        self.gils = 0
        self._lock = threading.Lock()
        self._loop = SamplingLoop(self.schedule, self, "gil-threads")
        self._readers: list[_Gil] = []
        self._tids: set[int] = set()
        self._history: deque = deque(maxlen=self.HISTORY)   # (t, ThreadAttribution, TaskBook)
        self._last_t: float | None = None                # the last sample: when, what it saw
        self._last_seen: tuple[GilSeen, ...] = ()
        self._next_tasks = 0.0

    @property
    def sampler_cpu(self) -> float:
        """CPU time of the sampler thread, locating included (set when it ends)."""
        return self._loop.cpu_seconds

    def start(self) -> ThreadSampler:
        self._loop.start()
        return self

    def stop(self, limit: int = 0, timeout: float = 5.0) -> ThreadTable:
        """Stop sampling; waits up to `timeout` for the thread (0: not at all: a daemon
        thread ends by itself, even one that waited long in a read from the target)."""
        self._loop.stop(timeout)
        return self.table(limit)

    def running(self) -> bool:
        return self._loop.running()

    def table(self, limit: int = 0, window: float | None = None) -> ThreadTable:
        """The table since the start, or over about the last `window` seconds (from the
        snapshot kept every TASKS_EVERY seconds that is closest to that far back)."""
        with self._lock:
            att = self.attribution.copy()
            book = self.book.copy()
            history = list(self._history)
        if window is not None and history:
            now = book.t1 if book.t1 is not None else time.monotonic()
            base = next((h for h in reversed(history) if now - h[0] >= window), history[0])
            if base[0] < now:
                att, book = att.since(base[1]), book.since(base[2])
        return thread_table(self.pid, att, book, limit, self.waiting_source, max(1, self.gils),
                            self.unavailable)

    # ------------------------------------------------------------ the consumer of the loop
    def open(self) -> None:
        """A first read of the threads, then every GIL's reader. Without one to read (sampling
        disabled, or locating failed), names and CPU still make a table until stopped, and
        then Ended: there is nothing to sample."""
        try:
            self._tasks(time.monotonic())
        except (procfs.ProcessGone, PermissionError) as exc:
            self.unavailable = f"/proc/{self.pid}/task: {exc or 'process gone'}"
            raise Ended from None
        if not self.read_gil:
            self.unavailable = "sampling.enabled is false in the config"
            self._tasks_for(math.inf)
            raise Ended
        while True:
            try:
                self._open_readers()
                break
            except gil.ProbeUnavailable as exc:
                self.unavailable = unavailable(exc)
                # a busy host can fail live validation once; anything else will not change
                if exc.reason != "validation_failed" or self._tasks_for(self.RELOCATE_AFTER):
                    self._tasks_for(math.inf)
                    raise Ended from None
        self.unavailable = ""
        self._next_tasks = time.monotonic() + self.TASKS_EVERY

    def sample(self) -> None:
        """Read every GIL, credit the stretch since the last sample to what that one saw,
        and re-read the threads every TASKS_EVERY seconds."""
        now = time.monotonic()
        seen = self._read_gils()
        self._credit(now)
        self._last_t, self._last_seen = now, seen
        if now >= self._next_tasks:
            self._next_tasks = now + self.TASKS_EVERY
            try:
                self._tasks(now)
            except (procfs.ProcessGone, PermissionError):
                raise Ended from None

    def end(self, why: gil.ProbeUnavailable | None) -> None:
        """Stopped, or the process is gone: the last stretch is credited, the threads read once
        more."""
        now = time.monotonic()
        if why is not None and why.reason != "exited":
            self.unavailable = self.unavailable or why.reason
        self._credit(now)
        try:
            self._tasks(now)
        except (procfs.ProcessGone, PermissionError):
            pass

    def close(self) -> None:
        """The GILs' readers (the loop calls it once, in its thread; stop() ends sampling)."""
        for g in self._readers:
            g.close()

    # ------------------------------------------------------------ its steps
    def _open_readers(self) -> None:
        locations = self.locations or gil.locate_all(self.pid)
        readers: list[_Gil] = []
        try:
            for loc in locations:
                readers.append(_Gil(loc))
        except BaseException:
            for g in readers:
                g.close()
            raise
        self._readers = readers
        self.gils = len(readers)
        sources = {g.threads.waiting_source for g in self._readers}
        self.waiting_source = "gil_requested" if sources == {"gil_requested"} else "futex"

    def _tasks(self, now: float) -> None:
        stats = procfs.task_stats(self.pid)
        delays = {tid: wait / 1e9 for tid, (_run, wait) in procfs.task_schedstat(self.pid).items()}
        with self._lock:
            self.book.observe(stats, now, delays)
            self._history.append((now, self.attribution.copy(), self.book.copy()))
        self._tids = set(stats)

    def _tasks_for(self, seconds: float) -> bool:
        """No GIL to read (yet): names and CPU still make a table. True once stopped (or the
        process is gone), False after `seconds`."""
        end = time.monotonic() + seconds
        while True:
            wait = min(self.TASKS_EVERY, end - time.monotonic())
            if wait <= 0:
                return False
            stopped = self._loop.wait(wait)
            try:
                self._tasks(time.monotonic())
            except (procfs.ProcessGone, PermissionError):
                return True
            if stopped:
                return True

    def _credit(self, now: float) -> None:
        """Sample-and-hold: what the last sample saw, for the time since (a starved gap counts
        at most the schedule's max_gap)."""
        if self._last_t is not None:
            with self._lock:
                self.attribution.credit(min(now - self._last_t, self.schedule.max_gap),
                                        self._last_seen)

    def _read_gils(self) -> tuple[GilSeen, ...]:
        """Read every GIL once. Raises ProbeUnavailable when the process is gone."""
        calls: dict[int, tuple] = {}
        fetched = [False]

        def syscalls() -> dict[int, tuple]:
            if not fetched[0]:
                calls.update(task_syscalls(self.pid))
                fetched[0] = True
            return calls

        out = []
        for g in self._readers:
            reading = g.reader.read()
            holder = g.threads.holder(reading)
            waiting = g.threads.waiting(reading, syscalls, holder)
            out.append(GilSeen(g.interpreter, reading.locked, self._real(holder),
                               tuple(t for t in waiting if self._real(t)), reading.waiters))
        return tuple(out)

    def _real(self, tid: int) -> int:
        """`tid` if it is a thread of the process (the task list is re-read once for a TID not
        seen yet), else 0: a TID read from a thread state freed under the read is junk."""
        if not tid or tid in self._tids:
            return tid
        self._tids = _known_tids(self.pid)
        return tid if tid in self._tids else 0


class SamplerPool:
    """On-demand ThreadSamplers for the landing page's per-process pages: one per process being
    looked at, started by the first look and stopped `idle` seconds after the last one; at most
    `max_samplers` at a time (the one looked at longest ago is stopped first)."""

    def __init__(self, rate_hz: float = 100.0, idle: float = 60.0, max_samplers: int = 4,
                 read_gil: bool = True) -> None:
        self.rate_hz = rate_hz
        self.idle = idle
        self.max_samplers = max_samplers
        self.read_gil = read_gil
        self._lock = threading.Lock()
        self._samplers: dict[tuple[int, int], tuple[ThreadSampler, float]] = {}  # (pid, start) -> (sampler, last look)

    def table(self, pid: int, start_time: int, window: float, limit: int = 0,
              wait: float = 2.0, read_gil: bool = True) -> ThreadTable:
        """The table of the process over about its last `window` seconds. The first look
        starts sampling and waits up to `wait` seconds for a first second of samples;
        `read_gil` False: that sampler reads names and CPU only (the caller knows that
        locating its GIL blocks)."""
        key = (pid, start_time)
        now = time.monotonic()
        with self._lock:
            self._reap(now)
            hit = self._samplers.get(key)
            fresh = hit is None
            sampler = (ThreadSampler(pid, self.rate_hz, read_gil=self.read_gil and read_gil).start()
                       if fresh else hit[0])
            self._samplers[key] = (sampler, now)
            while len(self._samplers) > self.max_samplers:
                oldest = min(self._samplers, key=lambda k: self._samplers[k][1])
                self._samplers.pop(oldest)[0].stop(timeout=0)  # never wait under the lock
        if fresh:
            deadline = now + wait
            while time.monotonic() < deadline and sampler.running():
                t = sampler.table()
                if t.sampled_seconds >= 1.0 or (t.unavailable and t.seconds >= 1.0):
                    break
                time.sleep(0.1)
        return sampler.table(limit, window)

    def configure(self, rate_hz: float, read_gil: bool) -> None:
        """After a config reload: samplers started from now on use these; running ones that
        read target memory although they no longer may are stopped."""
        with self._lock:
            self.rate_hz = rate_hz
            if self.read_gil and not read_gil:
                samplers, self._samplers = list(self._samplers.values()), {}
                for sampler, _last in samplers:
                    sampler.stop(timeout=0)
            self.read_gil = read_gil

    def _reap(self, now: float) -> None:
        for key, (sampler, last) in list(self._samplers.items()):
            if now - last > self.idle or not sampler.running():
                del self._samplers[key]
                sampler.stop(timeout=0)

    def close(self, timeout: float = 1.0) -> None:
        """Stop every sampler, waiting `timeout` in all for their threads (shutdown must not
        wait for one stuck in a read from its target)."""
        with self._lock:
            samplers, self._samplers = list(self._samplers.values()), {}
        for sampler, _last in samplers:
            sampler.stop(timeout=0)
        deadline = time.monotonic() + timeout
        for sampler, _last in samplers:
            sampler.stop(timeout=max(0.0, deadline - time.monotonic()) or 1e-3)
