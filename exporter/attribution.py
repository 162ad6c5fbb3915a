"""Per-thread GIL attribution: the share of time each thread held the GIL, waited for it, and
ran on a CPU (issue 9, part 1).

`gil.GilThreads` says, at each sample, which thread (native TID) holds a GIL and which threads
wait for it. Here that time is added up per thread (`ThreadAttribution`, sample-and-hold as in
the daemon's sampler), joined with each thread's name and CPU time from /proc (`TaskBook`, from
`procfs.task_stats`; the name is /proc/PID/task/TID/comm, which CPython 3.14 sets from
`threading.Thread`'s name) into the per-thread table of `diagnose`, `top` and the landing page
(`ThreadTable`). `ThreadLabels` decides which threads get a series of their own under the cap.
`ThreadSampler` is the short-lived sampler thread behind `diagnose` and `top`: it reads one
process, every GIL it has, and nothing else.
"""
from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from exporter import gil, procfs
from exporter.gil.memory import task_syscalls
from exporter.gil.threads import GilThreads

#: The label value that every thread without a series of its own adds up in.
OTHER = "other"


# ---------------------------------------------------------------- accumulating


@dataclass(frozen=True)
class GilSeen:
    """One GIL at one sample, by native TID (what `GilThreads` read)."""
    interpreter: int              # the owning interpreter's id (0: the main interpreter)
    locked: bool
    holder: int                   # TID of the holder; 0 when free or not readable
    waiting: Tuple[int, ...]      # TIDs waiting for it
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
        self.held: Dict[int, float] = {}
        self.waiting: Dict[int, float] = {}
        self.locked: Dict[int, float] = {}         # interpreter id -> seconds its GIL was held
        self.waiters: Dict[int, float] = {}        # interpreter id -> thread-seconds its GIL's count gives
        self.interpreter: Dict[int, int] = {}      # tid -> interpreter whose GIL it last held or awaited

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

    def copy(self) -> "ThreadAttribution":
        out = ThreadAttribution()
        out.sampled, out.samples = self.sampled, self.samples
        out.held, out.waiting = dict(self.held), dict(self.waiting)
        out.locked, out.waiters = dict(self.locked), dict(self.waiters)
        out.interpreter = dict(self.interpreter)
        return out

    def since(self, earlier: "ThreadAttribution") -> "ThreadAttribution":
        """The time credited after `earlier` (a copy() of this one)."""
        out = ThreadAttribution()
        out.sampled, out.samples = self.sampled - earlier.sampled, self.samples - earlier.samples

        def diff(now: dict, then: dict) -> dict:
            return {k: v - then.get(k, 0.0) for k, v in now.items() if v - then.get(k, 0.0) > 0}
        out.held, out.waiting = diff(self.held, earlier.held), diff(self.waiting, earlier.waiting)
        out.locked, out.waiters = diff(self.locked, earlier.locked), diff(self.waiters, earlier.waiters)
        out.interpreter = dict(self.interpreter)
        return out


class TaskBook:
    """Names and CPU time of a process's threads over a measurement (procfs.task_stats).

    A thread first seen after the first read was born during the measurement: all its CPU time
    counts. A TID whose CPU time goes down is a new thread under a reused TID.
    """

    def __init__(self) -> None:
        self.t0: Optional[float] = None
        self.t1: Optional[float] = None
        self.base: Dict[int, float] = {}
        self.last: Dict[int, float] = {}
        self.used: Dict[int, float] = {}      # CPU seconds of earlier threads under a reused TID
        self.names: Dict[int, str] = {}
        self.alive: Set[int] = set()

    def observe(self, stats: Dict[int, procfs.TaskStat], now: float) -> None:
        first = self.t0 is None
        if first:
            self.t0 = now
        self.t1 = now
        for tid, st in stats.items():
            prev = self.last.get(tid)
            if prev is None:
                self.base[tid] = st.cpu_seconds if first else 0.0
            elif st.cpu_seconds < prev:
                self.used[tid] = self.used.get(tid, 0.0) + prev - self.base[tid]
                self.base[tid] = 0.0
            self.last[tid] = st.cpu_seconds
            self.names[tid] = st.name
        self.alive = set(stats)

    def copy(self) -> "TaskBook":
        out = TaskBook()
        out.t0, out.t1 = self.t0, self.t1
        out.base, out.last, out.used = dict(self.base), dict(self.last), dict(self.used)
        out.names, out.alive = dict(self.names), set(self.alive)
        return out

    def since(self, earlier: "TaskBook") -> "TaskBook":
        """The CPU time used after `earlier` (a copy() of this one)."""
        out = self.copy()
        out.t0 = earlier.t1
        out.used = {}
        for tid, cpu in self.last.items():
            then = earlier.last.get(tid)
            out.base[tid] = then if then is not None and then <= cpu else 0.0
        return out

    def cpu(self, tid: int) -> Optional[float]:
        """Share of one core the thread used over the measurement; None before two reads."""
        if self.t0 is None or self.t1 is None or self.t1 <= self.t0 or tid not in self.last:
            return None
        return (self.last[tid] - self.base[tid] + self.used.get(tid, 0.0)) / (self.t1 - self.t0)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class ThreadShare:
    """One row of the per-thread table. Shares are of the sampled time (held, waiting) or of
    one core over the measurement (cpu); None where not measured."""
    tid: int                      # 0 for the row that folds the rest
    name: str
    held: Optional[float]
    waiting: Optional[float]
    cpu: Optional[float]
    alive: bool = True            # False: the thread ended during the measurement
    interpreter: Optional[int] = None   # id of the interpreter whose GIL it held or awaited
    threads: int = 1              # threads folded into this row


@dataclass(frozen=True)
class ThreadTable:
    pid: int
    seconds: float                # wall time the table covers
    sampled_seconds: float        # time covered by GIL samples (0 when the GIL was not read)
    samples: int
    waiting_source: str           # "gil_requested" (3.15+), "futex" (/proc syscall), "" not read
    gils: int                     # GILs sampled: more than 1 with subinterpreters of their own
    rows: Tuple[ThreadShare, ...] = ()
    unknown_held: float = 0.0     # share of sampled time held by a thread whose TID was not read
    waiting_threads: Optional[float] = None   # mean waiters by the GILs' own counts
    unavailable: str = ""         # why GIL shares are missing ("" when measured)

    def as_dict(self) -> dict:
        return {
            "pid": self.pid, "seconds": self.seconds, "sampled_seconds": self.sampled_seconds,
            "samples": self.samples, "waiting_source": self.waiting_source, "gils": self.gils,
            "unknown_held": self.unknown_held, "waiting_threads": self.waiting_threads,
            "unavailable": self.unavailable,
            "threads": [r.__dict__ for r in self.rows],
        }

    def shares(self) -> Dict[int, Tuple[float, float]]:
        """{tid: (held, waiting)}: what top's `thread_shares` hook wants."""
        if not self.sampled_seconds:
            return {}
        return {r.tid: (r.held or 0.0, r.waiting or 0.0) for r in self.rows if r.tid}


def _rank(r: ThreadShare) -> tuple:
    return (-(r.held or 0.0), -(r.waiting or 0.0), -(r.cpu or 0.0), r.tid)


def thread_table(pid: int, attribution: Optional[ThreadAttribution], book: TaskBook,
                 limit: int = 0, waiting_source: str = "", gils: int = 1,
                 unavailable: str = "") -> ThreadTable:
    """Rows for every thread seen, most GIL time first; with `limit`, the rows past it are
    folded into one row (tid 0, name "other (N threads)")."""
    att = attribution if attribution is not None and attribution.sampled > 0 else None
    tids = set(book.last)
    if att is not None:
        tids |= {t for t in att.held if t} | set(att.waiting)
    rows = []
    for tid in tids:
        held = waiting = None
        if att is not None:
            held = att.held.get(tid, 0.0) / att.sampled
            waiting = att.waiting.get(tid, 0.0) / att.sampled
        rows.append(ThreadShare(tid, book.names.get(tid, "?"), held, waiting, book.cpu(tid),
                                tid in book.alive,
                                att.interpreter.get(tid) if att is not None else None))
    rows.sort(key=_rank)
    if limit and len(rows) > limit + 1:
        rest = rows[limit:]

        def total(xs):
            return None if any(x is None for x in xs) else sum(xs)
        rows = rows[:limit] + [ThreadShare(
            0, f"{OTHER} ({len(rest)} threads)", total([r.held for r in rest]),
            total([r.waiting for r in rest]), total([r.cpu for r in rest]),
            any(r.alive for r in rest), None, len(rest))]
    seconds = (book.t1 - book.t0) if book.t0 is not None and book.t1 is not None else 0.0
    waiting_threads = None
    if att is not None:
        waiting_threads = sum(att.waiters.values()) / att.sampled
    return ThreadTable(
        pid, seconds, att.sampled if att else 0.0, att.samples if att else 0,
        waiting_source if att else "", gils, tuple(rows),
        att.held.get(0, 0.0) / att.sampled if att else 0.0, waiting_threads,
        unavailable or ("" if att else "no GIL samples"))


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.0%}"


def render(table: ThreadTable) -> str:
    """The per-thread section of `diagnose`."""
    if table.sampled_seconds:
        how = {"gil_requested": "each thread's own gil_requested flag",
               "futex": "threads blocked in futex() on the GIL's condvar"}.get(table.waiting_source, "?")
        head = (f"Threads (GIL sampled {table.sampled_seconds:.1f} s, {table.samples} samples"
                + (f", {table.gils} GILs: one per interpreter" if table.gils > 1 else "")
                + f"; waiting: {how}):")
    else:
        head = f"Threads (GIL shares not measured: {table.unavailable or 'no GIL samples'}):"
    if not table.rows:
        return head + "\n  no thread could be read"
    name_w = max(12, min(24, max(len(r.name) for r in table.rows)))
    interp = table.gils > 1
    lines = [head, f"  {'TID':>8}  {'name':<{name_w}}  {'GIL held':>8}  {'waiting':>7}  {'CPU':>5}"
             + ("  interpreter" if interp else "")]
    for r in table.rows:
        name = r.name if len(r.name) <= name_w else r.name[:name_w - 1] + "…"
        lines.append(f"  {r.tid or '':>8}  {name:<{name_w}}  {_pct(r.held):>8}  {_pct(r.waiting):>7}  "
                     f"{_pct(r.cpu):>5}"
                     + (f"  {'–' if r.interpreter is None else r.interpreter:>11}" if interp else "")
                     + ("  (ended)" if not r.alive else ""))
    if table.unknown_held >= 0.005:
        lines.append(f"  GIL held by a thread whose TID could not be read: {table.unknown_held:.0%}")
    found = sum(r.waiting or 0.0 for r in table.rows)
    if table.waiting_source == "futex" and table.waiting_threads and found < 0.9 * table.waiting_threads:
        lines.append(f"  The waiting shares add up to {found:.2f} threads, the GIL's own count to "
                     f"{table.waiting_threads:.2f}: a waiter just woken, runnable but not yet back "
                     f"in futex(), is only in the count.")
    return "\n".join(lines)


# ---------------------------------------------------------------- the cap on series


#: A thread on a per-thread counter: (group, TID). The group is the interpreter id on a process
#: with several GILs (0 otherwise); TID 0 is a holder whose TID was not read.
ThreadKey = Tuple[int, int]


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
        self.other: Dict[int, float] = {}                # group -> value of thread="other"
        self.labels: Dict[ThreadKey, str] = {}
        self.since: Dict[ThreadKey, float] = {}          # when it got its label
        self.values: Dict[Tuple[str, int], float] = {}   # (label, group) -> value, live labels
        self.kept: Dict[Tuple[str, int], float] = {}     # ... of labels given up
        self.recent: Dict[ThreadKey, float] = {}         # decayed held seconds
        self.first_seen: Dict[int, float] = {}           # tid -> when first seen alive
        self._last: Optional[float] = None

    def update(self, now: float, increments: Dict[ThreadKey, float],
               names: Callable[[], Dict[int, str]], alive: Set[int]) -> Dict[Tuple[str, int], float]:
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

    def _label_for(self, tid: int, names: Dict[int, str], alive: Set[int]) -> str:
        name = names.get(tid, "")
        taken = {label for label, _g in self.values}
        same = sum(1 for t in alive if names.get(t) == name)
        if name and same == 1 and name != OTHER and not name.isdigit() and name not in taken:
            return name
        return str(tid)

    def _assign(self, key: ThreadKey, now: float, names: Dict[int, str], alive: Set[int]) -> None:
        label = self._label_for(key[1], names, alive)
        self.labels[key] = label
        self.since[key] = now
        self.values[(label, key[0])] = self.kept.pop((label, key[0]), 0.0)

    def _promote(self, now: float, names: Callable[[], Dict[int, str]], alive: Set[int]) -> None:
        ready = sorted((k for k, r in self.recent.items() if r > 0 and k not in self.labels
                        and now - self.first_seen.get(k[1], now) >= self.window),
                       key=lambda k: (-self.recent[k], k))
        if not ready:
            return
        known: Dict[int, str] = {}

        def named() -> Dict[int, str]:  # read only when a label is given (not per pass)
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


# ---------------------------------------------------------------- sampling one process


def _known_tids(pid: int) -> Set[int]:
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
    """Samples who holds and who waits for every GIL of one process, from a daemon thread, and
    reads its threads' names and CPU from /proc about once a second.

    start() returns at once (locating happens in the thread); table() may be called at any
    time; stop() ends the thread and returns the table. A process that exits ends the
    sampling; the table keeps what was measured until then.
    """

    TASKS_EVERY = 1.0
    RELOCATE_AFTER = 1.0
    HISTORY = 120          # snapshots kept for table(window=...): 2 minutes

    def __init__(self, pid: int, rate_hz: float = 100.0, jitter: float = 0.5,
                 locations: Optional[Sequence[gil.GilLocation]] = None,
                 read_gil: bool = True) -> None:
        if not rate_hz > 0 or not 0 <= jitter < 1:
            raise ValueError("rate_hz must be > 0 and jitter in [0, 1)")
        self.pid = pid
        self.read_gil = read_gil           # False: names and CPU only, target memory never read
        self.period = 1.0 / rate_hz
        self.jitter = jitter
        self.locations = list(locations) if locations else None
        self.attribution = ThreadAttribution()
        self.book = TaskBook()
        self.unavailable = ""
        self.waiting_source = ""
        self.gils = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._readers: List[_Gil] = []
        self.sampler_cpu = 0.0
        self._tids: Set[int] = set()
        self._history: deque = deque(maxlen=self.HISTORY)   # (t, ThreadAttribution, TaskBook)

    def start(self) -> "ThreadSampler":
        self._thread = threading.Thread(target=self._run, name="gil-threads", daemon=True)
        self._thread.start()
        return self

    def stop(self, limit: int = 0, timeout: float = 5.0) -> ThreadTable:
        """Stop sampling; waits up to `timeout` for the thread (0: not at all: a daemon
        thread ends by itself, even one that waited long in a read from the target)."""
        self._stop.set()
        if self._thread is not None and timeout > 0:
            self._thread.join(timeout=timeout)
        return self.table(limit)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def table(self, limit: int = 0, window: Optional[float] = None) -> ThreadTable:
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

    # ------------------------------------------------------------ the thread
    def _open(self) -> None:
        locations = self.locations or gil.locate_all(self.pid)
        readers: List[_Gil] = []
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
        with self._lock:
            self.book.observe(stats, now)
            self._history.append((now, self.attribution.copy(), self.book.copy()))
        self._tids = set(stats)

    def _run(self) -> None:
        cpu0 = time.thread_time()
        try:
            try:
                self._tasks(time.monotonic())
            except (procfs.ProcessGone, PermissionError) as exc:
                self.unavailable = f"/proc/{self.pid}/task: {exc or 'process gone'}"
                return
            if not self.read_gil:
                self.unavailable = "sampling.enabled is false in the config"
                self._tasks_for(math.inf)
                return
            while True:
                try:
                    self._open()
                    break
                except gil.ProbeUnavailable as exc:
                    self.unavailable = f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason
                    # a busy host can fail live validation once; anything else will not change
                    if exc.reason != "validation_failed" or self._tasks_for(self.RELOCATE_AFTER):
                        self._tasks_for(math.inf)
                        return
            self.unavailable = ""
            self._sample_until_stopped()
        finally:
            for g in self._readers:
                g.close()
            self.sampler_cpu = time.thread_time() - cpu0

    def _tasks_for(self, seconds: float) -> bool:
        """No GIL to read (yet): names and CPU still make a table. True once stopped (or the
        process is gone), False after `seconds`."""
        end = time.monotonic() + seconds
        while True:
            wait = min(self.TASKS_EVERY, end - time.monotonic())
            if wait <= 0:
                return False
            stopped = self._stop.wait(wait)
            try:
                self._tasks(time.monotonic())
            except (procfs.ProcessGone, PermissionError):
                return True
            if stopped:
                return True

    def _sample_until_stopped(self) -> None:
        rng = random.Random()
        lo, span = self.period * (1 - self.jitter), 2 * self.period * self.jitter
        max_gap = 3 * self.period * (1 + self.jitter)
        last_t: Optional[float] = None
        last_seen: Tuple[GilSeen, ...] = ()
        next_tasks = time.monotonic() + self.TASKS_EVERY
        while True:
            stopping = self._stop.wait(lo + span * rng.random())
            now = time.monotonic()
            try:
                seen = self._sample() if not stopping else last_seen
            except gil.ProbeUnavailable as exc:
                if exc.reason != "exited":
                    self.unavailable = self.unavailable or exc.reason
                seen = None
            if last_t is not None:
                with self._lock:
                    self.attribution.credit(min(now - last_t, max_gap), last_seen)
            if seen is None or stopping:
                self._final_tasks(now)
                return
            last_t, last_seen = now, seen
            if now >= next_tasks:
                next_tasks = now + self.TASKS_EVERY
                try:
                    self._tasks(now)
                except (procfs.ProcessGone, PermissionError):
                    return

    def _final_tasks(self, now: float) -> None:
        try:
            self._tasks(now)
        except (procfs.ProcessGone, PermissionError):
            pass

    def _sample(self) -> Tuple[GilSeen, ...]:
        """Read every GIL once. Raises ProbeUnavailable when the process is gone."""
        calls: Dict[int, tuple] = {}
        fetched = [False]

        def syscalls() -> Dict[int, tuple]:
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
        self._samplers: Dict[Tuple[int, int], Tuple[ThreadSampler, float]] = {}  # (pid, start) -> (sampler, last look)

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
