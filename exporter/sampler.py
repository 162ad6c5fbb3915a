"""Background GIL sampler: one daemon thread samples every target, at ~100 Hz when it matters.

Ticks happen at jittered times (uniform in period * [1 - jitter, 1 + jitter]) so the samples
cannot lock onto the target's 5 ms switch-interval rhythm. A sample is ONE os.pread of the
target's GIL struct on a kept /proc/PID/mem fd; time is accounted time-weighted.

Adaptive rate, unbiased (``idle_ticks`` > 1; the daemon's default). Time is cut, per target,
into strata of whole ticks: one tick while the target showed a waiter in the last
``hold_seconds`` (every tick is a sample, exactly as at the full rate), ``idle_ticks`` ticks
otherwise. Each stratum is sampled once, at a tick drawn uniformly among its ticks, and the
state seen there is credited for the whole stratum. A stratum's length is fixed before any
of its ticks is seen, from samples taken before it, and where in it the sample falls is a
coin the target cannot influence; so the expected credit of every stratum equals what
sampling each of its ticks would credit, whatever the target does. (Choosing how long to
hold a state from that same state -- "idle, so look again in 200 ms" -- would not be: long
holds would go to idle states and short ones to busy states.) Ticks at which no target is
due are slept through.

Time is a "sampled clock": wall time, except that a gap between two ticks longer than
three periods (the sampler itself was starved) counts for three periods only.

Every `check_every` seconds (staggered; 12 times less often while it is sampled slowly) a
target is re-validated (same process, GIL struct shape, live holder); while it shows waiters,
once a minute, they are also counted from /proc/PID/task/*/syscall as a cross-check.

Per thread (``add(..., per_thread=True)``; the daemon's ``sampling.per_thread``): every
stretch of held time credited to the totals is also credited to the GIL's holder at that
sample, by the address of its thread state (``last_holder``, which the sample reads anyway).
``drain(key)`` returns the totals together with the held time per holder since the last
drain, mapped to native TIDs (``gil.threads.ThreadIds``, cached per address): the increments
add up exactly to ``held_seconds``, so the per-thread split is as unbiased as the totals.
A target without it pays nothing more per sample.

The loop runs in C when the optional extension exporter._hotloop was built (_hotloop.c,
the same loop; Python does the rest between its calls, every 0.25 s or so), else in Python.
"""
from __future__ import annotations

import errno
import functools
import os
import random
import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from . import procfs
from .gil import INTERVAL_MAX_US, INTERVAL_MIN_US, GilLocation, GilReader, ProbeUnavailable
from .gil.reader import FIELDS
from .gil.threads import ThreadIds
from .sampling import Jitter

try:
    from . import _hotloop  # the loop below, in C (setup.py builds it when a compiler is there)
except ImportError:
    _hotloop = None

__all__ = ["GilTotals", "GilSampler"]

_MASK64 = (1 << 64) - 1
IDLE_CHECKS = 12      # a target sampled slowly is re-validated this many times less often
FUTEX_EVERY = 60.0    # seconds between futex cross-checks of one target


@dataclass(frozen=True)
class GilTotals:
    sampled_seconds: float      # wall time covered by samples (time-weighted, sample-and-hold)
    held_seconds: float         # time the GIL was held
    wait_seconds: float         # thread-seconds waiting (2 waiters for 1 s add 2)
    contended_seconds: float    # held while >= 1 thread waited
    switches: int               # GIL handoffs since the target was added
    interval_seconds: float     # current switch interval (sys.getswitchinterval() of the target)
    samples: int
    futex_waiters_checked: int  # last /proc futex cross-check (-1 if none yet)
    enabled: bool | None = None  # free-threaded builds: GIL switched on at the last sample


# Per-target state is one tuple, replaced whole at every sample: the sampler thread is the
# only writer, and readers (totals()) get a consistent copy by reading one attribute.
# (c, locked, waiters, switch, interval_us, sampled, held, wait, contended, switches, samples,
#  enabled) -- c is the sampled clock up to which time is credited; enabled is -1 on builds
# without a switchable GIL
_EMPTY_STATE = (0.0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0, 0, -1)


class _Target:
    __slots__ = ("key", "reader", "pid", "read", "unpack", "size", "state", "futex",
                 "next_check", "bad_checks", "failure", "free_threaded", "waiting",
                 "start", "length", "last_waiter", "removed", "checked_wait", "checked_at",
                 "checked", "stat", "core", "slot", "per_thread", "holder", "acc", "lock",
                 "ids", "tid_of")

    def __init__(self, key: Hashable, reader: GilReader | None, check_at: float) -> None:
        self.key = key
        self.reader = reader
        self.pid = reader.pid if reader is not None else 0
        self.free_threaded = False
        self.waiting = None
        if reader is not None:
            fd, size, addr = reader.fd, reader.size, reader.address
            self.size = size
            self.read = functools.partial(os.pread, fd, size, addr)
            self.unpack = reader.struct.unpack
            self.free_threaded = reader.free_threaded
            # 3.15+: exact waiters from the threads' own gil_requested flags
            self.waiting = reader.threads.waiting if reader.waiters_source == "gil_requested" else None
        self.state = _EMPTY_STATE
        self.futex = -1
        self.next_check = check_at
        self.bad_checks = 0
        self.failure: str | None = None
        self.removed = False       # set (under the lock) before its reader is queued for closing
        self.start = 0             # tick index where the current stratum starts
        self.length = 1            # its length in ticks
        self.last_waiter = -(1 << 62)  # tick index of the last sample that saw a waiter
        self.checked_wait = -1.0   # wait_seconds at the last re-validation
        self.checked_at = 0.0      # when the last futex cross-check was made
        self.checked = (0.0, 0)    # (time, samples) at the last re-validation
        self.stat: procfs.StatFile | None = None  # kept /proc/PID/stat: is it the same process
        self.core = None           # the C loop's Core while it samples this target
        self.slot = (0, 0)         # (index, uid) in it
        # per thread: held seconds by holder address since the last drain (None: off), the
        # holder at the last sample, a lock that pairs acc with state, address -> TID
        self.per_thread = False
        self.acc: dict | None = None
        self.holder = 0
        self.lock: threading.Lock | None = None
        self.ids: ThreadIds | None = None
        self.tid_of: dict[int, int] = {}

    def still_readable(self) -> bool:
        """The PID still names this process (kept stat fd), and we may still read it: readlink
        of /proc/PID/exe needs the same ptrace access (PermissionError once it is lost; the
        open /proc/PID/mem fd itself would keep reading)."""
        stat = self.stat
        if stat is None or not stat.alive():
            return False
        procfs.readlink(self.pid, "exe")
        return True

    def snapshot(self) -> tuple:
        """The state tuple: from the C loop while it samples this target."""
        core = self.core
        if core is not None:
            state = core.state(*self.slot)
            if state is not None:
                return state
        return self.state

    def totals(self, state: tuple | None = None) -> GilTotals:
        _c, _l, _w, _s, interval, sampled, held, wait, contended, switches, samples, en = (
            self.snapshot() if state is None else state)
        return GilTotals(sampled, held, wait, contended, switches, interval / 1e6, samples, self.futex,
                         None if en < 0 else bool(en))

    def take(self) -> tuple[tuple, dict]:
        """(state, {holder address: held seconds since the last take}), consistently: the
        C loop's, plus what the Python side holds (the Python loop's, or left by _unhook)."""
        with self.lock:
            state = None
            acc, self.acc = self.acc, {}
            core = self.core
            if core is not None:
                got = core.drain(*self.slot)
                if got is not None:
                    state, held, _holder = got
                    for ptr, s in held.items():
                        acc[ptr] = acc.get(ptr, 0.0) + s
            return (self.state if state is None else state), acc

    def tids(self, acc: dict, alive: set[int] | None) -> dict[int, float]:
        """`acc` by native TID: an address is read again when it is new or its cached thread is
        gone (a freed thread state may be reused by a new thread); a TID read that is no thread
        of the process is junk (0), unless that address was an ended thread's (its last held
        time). Called with the sampler's lock held, so the reader's fd is still open."""
        out: dict[int, float] = {}
        if alive is None:
            try:
                alive = set(procfs.task_ids(self.pid))
            except (procfs.ProcessGone, OSError):
                alive = set()
        for ptr, s in acc.items():
            tid = self.tid_of.get(ptr, 0) if ptr else 0
            if ptr and tid not in alive and self.ids is not None and self.reader is not None:
                fresh = self.ids.tid(ptr)
                if fresh in alive:
                    tid = self.tid_of[ptr] = fresh
                elif tid:
                    del self.tid_of[ptr]    # the ended thread's last time; not cached again
            out[tid] = out.get(tid, 0.0) + s
        if len(self.tid_of) > 4 * len(alive) + 64:
            self.tid_of = {p: t for p, t in self.tid_of.items() if t in alive}
        return out


class _TickRing:
    """The Python loop's ticks, kept as the C loop keeps them (Core in _hotloop.c): the
    sampled clock at each of the last ticks and the targets due at each of the next ones
    (index & mask). A stratum starts at most idle-1 ticks before its sample, and the next
    sample is at most 2*idle-1 ticks ahead."""

    __slots__ = ("idle", "mask", "clock", "due", "j", "c", "last", "plan")

    def __init__(self, idle: int, clock: float, now: float, first: float) -> None:
        size = 4
        while size < 2 * idle + 2:
            size *= 2
        self.idle = idle
        self.mask = size - 1
        self.clock = [0.0] * size
        self.due: list[list] = [[] for _ in range(size)]
        self.j = 0               # index of the last tick (woken at or slept through)
        self.c = clock           # sampled clock at tick j (continued across restarts)
        self.last = now          # time of tick j
        self.plan = now + first  # planned time of tick j + 1, the next to wake at

    def advance(self, now: float, max_gap: float) -> None:
        """A tick woken at `now`: a starved gap counts at most max_gap on the sampled clock."""
        self.j += 1
        gap = now - self.last
        self.c += gap if gap < max_gap else max_gap
        self.clock[self.j & self.mask] = self.c
        self.last = now

    def take(self) -> list:
        """The targets due at this tick."""
        slot = self.j & self.mask
        batch = self.due[slot]
        self.due[slot] = []
        return batch

    def at(self, tick: int, st: _Target) -> None:
        self.due[tick & self.mask].append(st)

    def clock_at(self, tick: int) -> float:
        return self.clock[tick & self.mask]

    def plan_next(self, now: float, lo: float, span: float, rand, new_waiting: bool) -> None:
        """The next tick to wake at: the first with a target due, at most `idle` ahead. Ticks
        before it are slept through, and go on the clock at their planned times."""
        j, mask, due = self.j, self.mask, self.due
        k = 1
        while k < self.idle and not due[(j + k) & mask] and not new_waiting:
            k += 1
        t = self.plan
        for i in range(k):
            if i:
                self.j += 1
                self.c += t - self.last
                self.clock[self.j & mask] = self.c
                self.last = t
            t += lo + span * rand()
            if t < now:            # fell behind (starved): restart the schedule
                t = now + lo + span * rand()
        self.plan = t


def _read_gil(st: _Target, failed: list) -> tuple | None:
    """One sample of a target's GIL: (locked, waiters, switch, interval, enabled, holder), or
    None with the failure appended (a read error, a short read, an implausible `locked`)."""
    try:
        vals = st.unpack(st.read())
    except Exception as exc:      # OSError, or a short read (struct.error)
        failed.append((st, exc))
        return None
    if st.free_threaded:
        enabled, interval, holder, locked, switch, wrefs = vals
    else:
        interval, holder, locked, switch, wrefs = vals
        enabled = -1
    if locked & ~1:
        failed.append((st, None))
        return None
    return locked, _waiters(st, wrefs >> 3), switch, interval, enabled, holder


def _waiters(st: _Target, count: int) -> int:
    """The waiters: the condvar's count, unless the target has an exact source (3.15+:
    each thread state's gil_requested, read from the target's thread list: hostile memory)."""
    if st.waiting is None:
        return count
    try:
        exact = st.waiting()
    except Exception:
        return count          # the condvar's count stands
    return count if exact is None else exact


def _account(st: _Target, ring: _TickRing, hold: int, idle: int, rand, locked: int, waiters: int,
             switch: int, interval: int, enabled: int, holder: int) -> None:
    """The accounting of one sample, as account() in _hotloop.c: the previous stratum's state
    until this stratum starts, then this one's; then the next stratum, from what was seen."""
    j, c = ring.j, ring.c
    lock = st.lock
    if lock is not None:          # per thread: acc and state change together
        lock.acquire()
        acc, h0 = st.acc, st.holder
    c0, l0, w0, s0, _, sampled, held, wait, contended, switches, n, _e = st.state
    if n:
        cs = ring.clock_at(st.start)
        dt = cs - c0
        sampled += dt
        if l0:
            held += dt
            if lock is not None:
                acc[h0] = acc.get(h0, 0.0) + dt
            if w0:
                contended += dt
        if w0:
            wait += dt * w0
        dt = c - cs
        if dt:
            sampled += dt
            if locked:
                held += dt
                if lock is not None:
                    acc[holder] = acc.get(holder, 0.0) + dt
                if waiters:
                    contended += dt
            if waiters:
                wait += dt * waiters
        if switch != s0:
            switches += (switch - s0) & _MASK64
    st.state = (c, locked, waiters, switch, interval, sampled, held, wait,
                contended, switches, n + 1, enabled)
    if lock is not None:
        st.holder = holder
        lock.release()
    if waiters:
        st.last_waiter = j
    start = st.start + st.length
    st.start = start
    if j - st.last_waiter < hold or idle == 1:
        st.length = 1
        ring.at(start, st)
    else:
        st.length = idle
        ring.at(start + int(rand() * idle), st)


class GilSampler:
    """Samples the GIL of many targets from one daemon thread.

    ``add(key, location)`` opens a reader (a failure to open is reported by
    ``failure(key)``, never raised); ``totals(key)`` returns a consistent copy.
    A target whose reads fail (exit, PID reuse, EPERM, validation) is dropped from
    sampling: its last totals stay readable and ``failure(key)`` gives the reason,
    until ``remove(key)``.

    ``idle_ticks`` (1: every target every tick) and ``hold_seconds`` set the adaptive rate
    described in the module docstring. The hold is short: an idle process whose threads
    wake together now and then shows a waiter for a moment, which is no reason to sample it
    at the full rate for long; sustained contention shows waiters at every sample.

    Concurrency: the sampling thread takes no lock per tick. Targets due at a tick sit in
    that tick's slot of a ring that only the sampling thread touches; add() hands new
    targets over through a list swapped under a lock, and each target's state is an
    immutable tuple it replaces whole. remove() marks the target and queues its reader;
    readers are closed by the sampling thread itself at its next tick (never while it may
    still read their fd), or at once when it is not running.
    """

    def __init__(self, rate_hz: float = 100.0, jitter: float = 0.5,
                 check_every: float = 5.0, idle_ticks: int = 1, hold_seconds: float = 0.25,
                 native: bool | None = None) -> None:
        if int(idle_ticks) != idle_ticks or idle_ticks < 1:
            raise ValueError("idle_ticks must be a whole number >= 1")
        if native and _hotloop is None:
            raise ValueError("the C hot loop (exporter._hotloop) was not built")
        self.native = _hotloop is not None if native is None else native
        if not hold_seconds >= 0:
            raise ValueError("hold_seconds must be >= 0")
        self.idle_ticks = int(idle_ticks)
        self.hold_seconds = hold_seconds
        self._schedule(rate_hz, jitter)
        self.check_every = check_every
        self._lock = threading.Lock()            # targets dict, active tuple, new and to-close lists
        self._targets: dict[Hashable, _Target] = {}
        self._active: tuple = ()                 # targets still sampled (for re-validation)
        self._new: list[_Target] = []            # added, not yet scheduled by the sampling thread
        self._to_close: list[GilReader] = []
        self._running = [False]
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        self.ticks = 0                  # ticks at which the thread woke
        self.reads = 0                  # target-samples taken
        self._next_check = 0.0          # earliest time any target is due for re-validation
        self._clock = 0.0               # the sampled clock where the last sampling thread left it
        self._recent: deque = deque(maxlen=64)  # times of the last ticks (the Python loop)
        self._core = None               # the C loop's Core, while it runs
        self.native_id = 0              # sampler thread's TID (for CPU accounting)

    # ----------------------------------------------------------------- schedule
    def _schedule(self, rate_hz: float, jitter: float) -> None:
        schedule = Jitter(rate_hz, jitter)   # raises ValueError for a rate or jitter out of range
        self._rate_hz = rate_hz
        self._jitter = jitter
        self._period = schedule.period
        # One tuple, swapped whole; the sampling thread picks up a new one at its next tick.
        # (lo, span): next tick in period * [1 - jitter, 1 + jitter).
        # max_gap: longest gap between ticks counted on the sampled clock; beyond it the
        # sampler was starved and holding the old state would invent data.
        # hold: ticks a target stays at the full rate after a sample that saw a waiter.
        self._params = (schedule.lo, schedule.span, schedule.max_gap,
                        max(1, round(self.hold_seconds * rate_hz)))

    @property
    def rate_hz(self) -> float:
        return self._rate_hz

    @rate_hz.setter
    def rate_hz(self, value: float) -> None:
        """Changeable while running (config reload); applies from the next tick."""
        self._schedule(value, self._jitter)

    @property
    def jitter(self) -> float:
        return self._jitter

    @jitter.setter
    def jitter(self, value: float) -> None:
        self._schedule(self._rate_hz, value)

    # ----------------------------------------------------------------- public API
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._running = [True]           # a fresh flag per thread: a stopped one never revives
        with self._lock:                 # a new thread schedules every target afresh
            self._new = [st for st in self._targets.values() if st.failure is None]
        self._thread = threading.Thread(target=self._run, name="gil-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running[0] = False
        t = self._thread
        if t is not None:
            t.join(timeout=5.0)
        self._thread = None
        self._close_pending()

    def close(self) -> None:
        self.stop()
        for key in self.keys():
            self.remove(key)

    def add(self, key: Hashable, location: GilLocation, per_thread: bool = False) -> None:
        """Sample the GIL at `location` under `key`; `per_thread`: also credit held time per
        holder thread (drain())."""
        check_at = time.monotonic() + self._rng.uniform(0.2, 1.0) * self.check_every
        try:
            st = _Target(key, GilReader(location), check_at)
            try:
                st.stat = procfs.StatFile(st.pid, st.reader.start_time)
            except (procfs.ProcessGone, OSError):
                pass  # re-validation falls back to GilReader.same_process()
            if per_thread:
                st.per_thread = True
                st.acc, st.lock = {}, threading.Lock()
                try:
                    st.ids = ThreadIds(st.reader.fd, location)
                except ProbeUnavailable:
                    pass      # held time is still credited, to TID 0 ("not read")
        except ProbeUnavailable as exc:
            st = _Target(key, None, check_at)
            st.failure = exc.reason
        except OSError as exc:
            st = _Target(key, None, check_at)
            st.failure = _reason(exc)
        with self._lock:
            old = self._targets.pop(key, None)
            self._targets[key] = st
            if st.failure is None:
                self._new.append(st)
            self._next_check = min(self._next_check, check_at) if self._next_check else check_at
            self._rebuild()
            if old is not None:
                self._retire(old)
        if not self.is_alive():
            self._close_pending()

    def remove(self, key: Hashable) -> None:
        with self._lock:
            st = self._targets.pop(key, None)
            if st is not None:
                self._rebuild()
                self._retire(st)
        if not self.is_alive():
            self._close_pending()

    def totals(self, key: Hashable) -> GilTotals | None:
        st = self._targets.get(key)
        return None if st is None else st.totals()

    def drain(self, key: Hashable, alive: set[int] | None = None
              ) -> tuple[GilTotals, dict[int, float]] | None:
        """(totals, {TID: held seconds since the last drain}) of a target added with
        per_thread (else the increments are {}); TID 0: a holder whose TID could not be read.
        Over all drains, the increments add up to totals.held_seconds. `alive`: the process's
        TIDs now, if the caller has them (else /proc/PID/task is listed)."""
        with self._lock:
            st = self._targets.get(key)
            if st is None:
                return None
            if not st.per_thread:
                return st.totals(), {}
            state, acc = st.take()
            return st.totals(state), (st.tids(acc, alive) if acc else {})

    def failure(self, key: Hashable) -> str | None:
        st = self._targets.get(key)
        return None if st is None else st.failure

    def keys(self) -> list:
        with self._lock:
            return list(self._targets)

    def is_alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def recent_ticks(self) -> list:
        """Monotonic times of the last (up to 64) ticks the sampling thread woke at."""
        core = self._core
        return core.recent if core is not None else list(self._recent)

    # ----------------------------------------------------------------- internals
    def _rebuild(self) -> None:
        # called with the lock held
        self._active = tuple(st for st in self._targets.values() if st.failure is None)

    def _retire(self, st: _Target) -> None:
        # called with the lock held: the reader is closed later, by the sampling thread
        st.removed = True
        if st.reader is not None:
            self._to_close.append(st.reader)
            st.reader = None
        if st.stat is not None:
            self._to_close.append(st.stat)
            st.stat = None

    def _close_pending(self) -> None:
        with self._lock:
            pending, self._to_close = self._to_close, []
        for reader in pending:
            reader.close()

    def _fail(self, st: _Target, reason: str) -> None:
        # called with the lock held, from the sampling thread
        if st.failure is None:
            st.failure = reason
        self._rebuild()
        self._retire(st)

    def _run(self) -> None:
        try:
            self.native_id = threading.get_native_id()
        except AttributeError:  # pragma: no cover
            self.native_id = 0
        if self.native:
            self._run_native()
        else:
            self._run_python()

    def _run_native(self) -> None:
        """The loop of _run_python in C (Core.run), in chunks of ~0.25 s; between them, here:
        new and removed targets, failures, re-validation, closing readers."""
        core = self._core = _hotloop.Core(self.idle_ticks, self._clock, self._period * self._rng.random(),
                                          self._rng.getrandbits(64))
        sampled: dict[int, _Target] = {}   # core index -> target
        params = self._params
        running = self._running
        monotonic = time.monotonic
        try:
            while running[0]:
                if self._params is not params:     # rate or jitter changed
                    params = self._params
                    core.reschedule(monotonic() + params[0] + params[1] * self._rng.random())
                for i, st in list(sampled.items()):
                    if st.removed or st.failure is not None:
                        self._unhook(core, i, st, sampled)
                if self._to_close:
                    self._close_pending()   # after _unhook: the C loop no longer reads them
                if self._new:
                    with self._lock:
                        new, self._new = self._new, []
                    for st in new:
                        if st.failure is None and not st.removed and st.reader is not None:
                            self._hook(core, st, sampled)
                now = monotonic()
                if now >= self._next_check - 0.01:
                    self._housekeeping(now, None, ahead=0.25)
                lo, span, max_gap, hold = params
                # at least the next tick: never a call that returns at once
                until = max(min(now + 0.25, self._next_check), core.plan)
                failures = core.run(until, lo, span, max_gap, hold)
                self.ticks, self.reads = core.ticks, core.reads
                if failures:
                    failed = []
                    for i, err, kind in failures:
                        st = sampled.get(i)
                        if st is None:
                            continue
                        self._unhook(core, i, st, sampled)
                        failed.append((st, OSError(err, os.strerror(err)) if kind == 0 else
                                       (None if kind == 2 else EOFError("short read"))))
                    self._housekeeping(monotonic(), failed)
        finally:
            for i, st in list(sampled.items()):
                self._unhook(core, i, st, sampled)
            self._clock = core.clock
            self._close_pending()

    @staticmethod
    def _hook(core, st: _Target, sampled: dict) -> None:
        reader = st.reader
        layout = reader.location.layout
        offsets = (tuple(getattr(layout, f) for f in FIELDS if f != "last_holder")
                   + (layout.enabled,))
        if st.per_thread:
            with st.lock:
                st.slot = core.add(reader.fd, reader.address, reader.size, offsets, st.waiting,
                                   st.state, layout.last_holder, st.holder)
                st.core = core
        else:
            st.slot = core.add(reader.fd, reader.address, reader.size, offsets, st.waiting, st.state)
            st.core = core
        sampled[st.slot[0]] = st

    @staticmethod
    def _unhook(core, i: int, st: _Target, sampled: dict) -> None:
        """Stop sampling st in C; its totals (and per-thread time not drained yet) stay
        readable from st.state (st.acc)."""
        if st.per_thread:
            with st.lock:
                got = core.drain(*st.slot)
                if got is not None:
                    st.state, held, st.holder = got
                    for ptr, s in held.items():
                        st.acc[ptr] = st.acc.get(ptr, 0.0) + s
                st.core = None
        else:
            state = core.state(*st.slot)
            if state is not None:
                st.state = state
            st.core = None
        core.remove(i)
        del sampled[i]

    def _run_python(self) -> None:
        """The tick loop in Python, in the steps of _hotloop.c's Core.run: sleep to the planned
        tick, advance the sampled clock, sample each target due (read, waiters, account and
        plan its next stratum), then plan the next tick to wake at."""
        lo, span, max_gap, hold = params = self._params
        rand = self._rng.random
        monotonic = time.monotonic
        recent = self._recent.append
        running = self._running          # a list, not Event.is_set(): no Python call per tick
        ring = _TickRing(self.idle_ticks, self._clock, monotonic(), self._period * rand())
        self.ticks = self.reads = 0
        while running[0]:
            if self._params is not params:     # rate or jitter changed
                lo, span, max_gap, hold = params = self._params
                ring.plan = min(ring.plan, ring.last + lo + span * rand())
            delay = ring.plan - monotonic()
            if delay > 0:
                time.sleep(delay)
            if self._to_close:
                self._close_pending()
            now = monotonic()
            ring.advance(now, max_gap)
            recent(now)
            if self._new:
                self._admit_new(ring)
            failed = self._sample_due(ring, hold, rand)
            self.ticks += 1
            if failed or now >= self._next_check:
                try:
                    self._housekeeping(now, failed)
                except Exception:  # never let the thread die
                    pass
            ring.plan_next(now, lo, span, rand, bool(self._new))
        self._clock = ring.c
        self._close_pending()

    def _admit_new(self, ring: _TickRing) -> None:
        """Targets added since the last tick: a first stratum of one tick, sampled now."""
        with self._lock:
            new, self._new = self._new, []
        for st in new:
            if st.failure is None and not st.removed:
                st.start, st.length = ring.j, 1
                ring.at(ring.j, st)

    def _sample_due(self, ring: _TickRing, hold: int, rand) -> list:
        """Hot path: one pread per target due at this tick and time-weighted accounting; no
        lock but a per-thread target's own. Returns [(target, exception or None)] failed."""
        failed: list = []
        idle = self.idle_ticks
        for st in ring.take():
            if st.removed or st.failure is not None:
                continue                  # its reader is closed, or about to be
            seen = _read_gil(st, failed)
            if seen is not None:
                _account(st, ring, hold, idle, rand, *seen)
                self.reads += 1
        return failed

    def _housekeeping(self, now: float, failed, ahead: float = 0.0) -> None:
        """Record failures from the hot path; re-validate the targets due (the Python loop:
        one per tick at most; the C loop: every one due within `ahead` seconds)."""
        due = []
        with self._lock:
            for st, exc in failed or ():
                if exc is None:
                    reason = "validation_failed"
                elif isinstance(exc, OSError):
                    reason = _reason(exc, st.pid)
                else:   # short read: the target's memory is gone
                    reason = "exited"
                self._fail(st, reason)
            soonest = now + self.check_every
            for st in self._active:
                if st.next_check <= now + ahead and (ahead or not due):
                    due.append(st)
                elif st.next_check < soonest:
                    soonest = st.next_check
            self._next_check = soonest
        for st in due:
            self._check(st, now)
        if due:
            with self._lock:
                self._next_check = min([self._next_check] + [st.next_check for st in due])

    def _check(self, st: _Target, now: float) -> None:
        """Occasional re-validation of one target (sampling thread): every check_every
        seconds while it is sampled at the full rate, IDLE_CHECKS times less often while it is
        sampled slowly. The futex cross-check reads every thread's syscall file: only while
        waiters are seen, at most once a FUTEX_EVERY seconds."""
        state = st.snapshot()
        interval, samples, wait = state[4], state[10], state[7]
        then, before = st.checked
        st.checked = (now, samples)
        fast = self.idle_ticks == 1 or (samples - before) >= 0.5 * self._rate_hz * (now - then)
        every = self.check_every * (1 if fast else IDLE_CHECKS)
        st.next_check = now + every * self._rng.uniform(0.8, 1.2)
        reader = st.reader
        if reader is None:      # removed meanwhile; its reader is queued for closing
            return
        reason = None
        futex = -1
        cross_check = (state[2] > 0 or wait > st.checked_wait) and (
            st.checked_at == 0.0 or now - st.checked_at >= FUTEX_EVERY)
        st.checked_wait = wait
        try:
            problem, futex = reader.recheck(futex=cross_check,
                                            alive=None if st.stat is None else st.still_readable)
            if samples and not INTERVAL_MIN_US <= interval <= INTERVAL_MAX_US:
                problem = problem or f"interval {interval} us out of range"
            if problem:
                # one miss is tolerated (take_gil sets locked just before last_holder)
                st.bad_checks += 1
                if st.bad_checks >= 2:
                    reason = "validation_failed"
                else:
                    st.next_check = now + 0.05
            else:
                st.bad_checks = 0
        except ProbeUnavailable as exc:
            reason = exc.reason
        except OSError as exc:
            reason = _reason(exc, st.pid)
        except Exception:
            reason = "validation_failed"
        if futex >= 0:
            st.futex = futex
            st.checked_at = now
        if reason is not None:
            with self._lock:
                if self._targets.get(st.key) is st:
                    self._fail(st, reason)
                else:
                    st.failure = st.failure or reason


def _reason(exc: OSError, pid: int = 0) -> str:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return "permission_denied"
    if exc.errno in (errno.ESRCH, errno.ENOENT):
        return "exited"
    if exc.errno == errno.EIO:
        return "exited" if pid and not procfs.exists(pid) else "validation_failed"
    return "exited" if pid and not procfs.exists(pid) else "validation_failed"
