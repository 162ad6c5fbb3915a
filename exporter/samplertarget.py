"""One target of the GIL sampler: its reader, the state its samples build, its per-thread held
time, and its re-validation (exporter/sampler.py's module docstring says how they are used)."""
from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Hashable
from dataclasses import dataclass

from . import procfs
from .gil import INTERVAL_MAX_US, INTERVAL_MIN_US, GilLocation, GilReader, ProbeUnavailable
from .gil.threads import ThreadIds

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
EMPTY_STATE = (0.0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0, 0, -1)


class HeldTime:
    """Per thread: held seconds by holder address since the last drain, the holder at the
    last sample, and the holders' native TIDs (address -> TID, cached)."""

    __slots__ = ("lock", "acc", "holder", "ids", "tid_of")

    def __init__(self, ids: ThreadIds | None) -> None:
        self.lock = threading.Lock()     # pairs acc with the target's state
        self.acc: dict[int, float] = {}
        self.holder = 0
        self.ids = ids                   # None: held time still credited, to TID 0 ("not read")
        self.tid_of: dict[int, int] = {}

    @staticmethod
    def merge(acc: dict, held: dict) -> None:
        """Add the C loop's table (address -> seconds) to `acc`."""
        for ptr, s in held.items():
            acc[ptr] = acc.get(ptr, 0.0) + s

    def tids(self, acc: dict, alive: set[int] | None, pid: int, readable: bool) -> dict[int, float]:
        """`acc` by native TID: an address is read again when it is new or its cached thread is
        gone (a freed thread state may be reused by a new thread); a TID read that is no thread
        of the process is junk (0), unless that address was an ended thread's (its last held
        time). Called with the sampler's lock held, so the reader's fd is still open."""
        out: dict[int, float] = {}
        if alive is None:
            try:
                alive = set(procfs.task_ids(pid))
            except (procfs.ProcessGone, OSError):
                alive = set()
        for ptr, s in acc.items():
            tid = self.tid_of.get(ptr, 0) if ptr else 0
            if ptr and tid not in alive and self.ids is not None and readable:
                fresh = self.ids.tid(ptr)
                if fresh in alive:
                    tid = self.tid_of[ptr] = fresh
                elif tid:
                    del self.tid_of[ptr]    # the ended thread's last time; not cached again
            out[tid] = out.get(tid, 0.0) + s
        if len(self.tid_of) > 4 * len(alive) + 64:
            self.tid_of = {p: t for p, t in self.tid_of.items() if t in alive}
        return out


class Target:
    __slots__ = ("key", "reader", "pid", "read", "unpack", "size", "state", "futex",
                 "next_check", "bad_checks", "failure", "free_threaded", "waiting",
                 "start", "length", "last_waiter", "removed", "checked_wait", "checked_at",
                 "checked", "stat", "core", "slot", "held")

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
        self.state = EMPTY_STATE
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
        self.held: HeldTime | None = None  # per thread only

    @classmethod
    def open(cls, key: Hashable, location: GilLocation, check_at: float, per_thread: bool) -> Target:
        """A target with its reader open, or with `failure` set (never raises)."""
        try:
            st = cls(key, GilReader(location), check_at)
            try:
                st.stat = procfs.StatFile(st.pid, st.reader.start_time)
            except (procfs.ProcessGone, OSError):
                pass  # re-validation falls back to GilReader.same_process()
            if per_thread:
                try:
                    ids = ThreadIds(st.reader.fd, location)
                except ProbeUnavailable:
                    ids = None
                st.held = HeldTime(ids)
        except ProbeUnavailable as exc:
            st = cls(key, None, check_at)
            st.failure = exc.reason
        except OSError as exc:
            st = cls(key, None, check_at)
            st.failure = failure_reason(exc)
        return st

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

    def drain(self, alive: set[int] | None) -> tuple[GilTotals, dict[int, float]]:
        """(totals, {TID: held seconds since the last drain}); {} unless per thread."""
        held = self.held
        if held is None:
            return self.totals(), {}
        state, acc = self.take()
        return self.totals(state), (held.tids(acc, alive, self.pid, self.reader is not None) if acc else {})

    def take(self) -> tuple[tuple, dict]:
        """(state, {holder address: held seconds since the last take}), consistently: the
        C loop's, plus what the Python side holds (the Python loop's, or left by unhook)."""
        held = self.held
        with held.lock:
            state = None
            acc, held.acc = held.acc, {}
            core = self.core
            if core is not None:
                got = core.drain(*self.slot)
                if got is not None:
                    state, table, _holder = got
                    held.merge(acc, table)
            return (self.state if state is None else state), acc

    def recheck(self, now: float, check_every: float, full_rate: float | None, rng) -> str | None:
        """Occasional re-validation (sampling thread): every check_every seconds while it is
        sampled at the full rate (`full_rate` None: always), IDLE_CHECKS times less often while
        it is sampled slowly. The futex cross-check reads every thread's syscall file: only
        while waiters are seen, at most once a FUTEX_EVERY seconds. Returns why it failed."""
        state = self.snapshot()
        interval, samples, wait = state[4], state[10], state[7]
        then, before = self.checked
        self.checked = (now, samples)
        fast = full_rate is None or (samples - before) >= 0.5 * full_rate * (now - then)
        every = check_every * (1 if fast else IDLE_CHECKS)
        self.next_check = now + every * rng.uniform(0.8, 1.2)
        reader = self.reader
        if reader is None:      # removed meanwhile; its reader is queued for closing
            return None
        why = None
        futex = -1
        cross_check = (state[2] > 0 or wait > self.checked_wait) and (
            self.checked_at == 0.0 or now - self.checked_at >= FUTEX_EVERY)
        self.checked_wait = wait
        try:
            problem, futex = reader.recheck(futex=cross_check,
                                            alive=None if self.stat is None else self.still_readable)
            if samples and not INTERVAL_MIN_US <= interval <= INTERVAL_MAX_US:
                problem = problem or f"interval {interval} us out of range"
            if problem:
                # one miss is tolerated (take_gil sets locked just before last_holder)
                self.bad_checks += 1
                if self.bad_checks >= 2:
                    why = "validation_failed"
                else:
                    self.next_check = now + 0.05
            else:
                self.bad_checks = 0
        except ProbeUnavailable as exc:
            why = exc.reason
        except OSError as exc:
            why = failure_reason(exc, self.pid)
        except Exception:
            why = "validation_failed"
        if futex >= 0:
            self.futex = futex
            self.checked_at = now
        return why


def failure_reason(exc: OSError, pid: int = 0) -> str:
    """A failure's reason from its errno; "exited" when the PID is gone."""
    if exc.errno in (errno.EPERM, errno.EACCES):
        return "permission_denied"
    if exc.errno in (errno.ESRCH, errno.ENOENT):
        return "exited"
    if exc.errno == errno.EIO:
        return "exited" if pid and not procfs.exists(pid) else "validation_failed"
    return "exited" if pid and not procfs.exists(pid) else "validation_failed"
