"""Background GIL sampler: one daemon thread samples every target at ~100 Hz.

Each tick happens at a jittered time (uniform in period * [1 - jitter, 1 + jitter]) so
the samples cannot lock onto the target's 5 ms switch-interval rhythm. A tick reads
every target with ONE os.pread of its GIL struct on a kept /proc/PID/mem fd, and
accounts time-weighted (sample-and-hold): the state seen at one sample is taken to
last until the next sample of that target.

Every `check_every` seconds (staggered, one target per tick at most) a target is
re-validated (same process, GIL struct shape, live holder) and its futex-blocked
waiters are counted from /proc/PID/task/*/syscall as a cross-check.
"""
from __future__ import annotations

import errno
import functools
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional

from .gil import GilLocation, GilReader, INTERVAL_MAX_US, INTERVAL_MIN_US, ProbeUnavailable

__all__ = ["GilTotals", "GilSampler"]

_MASK64 = (1 << 64) - 1


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
    enabled: Optional[bool] = None  # free-threaded builds: GIL switched on at the last sample


# Per-target state is one tuple, replaced whole at every sample: the sampler thread is the
# only writer, and readers (totals()) get a consistent copy by reading one attribute.
# (t, locked, waiters, switch, interval_us, sampled, held, wait, contended, switches, samples,
#  enabled) -- enabled is -1 on builds without a switchable GIL
_EMPTY_STATE = (0.0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0, 0, -1)


class _Target:
    __slots__ = ("key", "reader", "pid", "read", "unpack", "size", "state", "futex",
                 "next_check", "bad_checks", "failure", "free_threaded", "waiting")

    def __init__(self, key: Hashable, reader: Optional[GilReader], check_at: float) -> None:
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
        self.failure: Optional[str] = None

    def totals(self) -> GilTotals:
        _t, _l, _w, _s, interval, sampled, held, wait, contended, switches, samples, en = self.state
        return GilTotals(sampled, held, wait, contended, switches, interval / 1e6, samples, self.futex,
                         None if en < 0 else bool(en))


class GilSampler:
    """Samples the GIL of many targets from one daemon thread.

    ``add(key, location)`` opens a reader (a failure to open is reported by
    ``failure(key)``, never raised); ``totals(key)`` returns a consistent copy.
    A target whose reads fail (exit, PID reuse, EPERM, validation) is dropped from
    sampling: its last totals stay readable and ``failure(key)`` gives the reason,
    until ``remove(key)``.

    Concurrency: the sampling thread takes no lock per tick. It reads the current tuple
    of active targets, and each target's state is an immutable tuple it replaces whole.
    add()/remove() swap the active tuple under a lock; readers of removed targets are
    closed by the sampling thread itself at its next tick (never while it may still
    read their fd), or at once when it is not running.
    """

    def __init__(self, rate_hz: float = 100.0, jitter: float = 0.5,
                 check_every: float = 5.0) -> None:
        self._schedule(rate_hz, jitter)
        self.check_every = check_every
        self._lock = threading.Lock()            # targets dict, active tuple, to-close list
        self._targets: Dict[Hashable, _Target] = {}
        self._active: tuple = ()
        self._to_close: List[GilReader] = []
        self._running = [False]
        self._thread: Optional[threading.Thread] = None
        self._rng = random.Random()
        self.ticks = 0
        self._next_check = 0.0          # earliest time any target is due for re-validation
        self.native_id = 0              # sampler thread's TID (for CPU accounting)

    # ----------------------------------------------------------------- schedule
    def _schedule(self, rate_hz: float, jitter: float) -> None:
        if not rate_hz > 0:
            raise ValueError("rate_hz must be > 0")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        period = 1.0 / rate_hz
        self._rate_hz = rate_hz
        self._jitter = jitter
        self._period = period
        # One tuple, swapped whole; the sampling thread picks up a new one at its next tick.
        # (lo, span): next tick in period * [1 - jitter, 1 + jitter).
        # max_gap: longest gap credited to one sample; beyond it the sampler was starved
        # and holding the old state would invent data, so the excess is not sampled.
        self._params = (period * (1.0 - jitter), 2.0 * period * jitter,
                        3.0 * period * (1.0 + jitter))

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

    def add(self, key: Hashable, location: GilLocation) -> None:
        check_at = time.monotonic() + self._rng.uniform(0.2, 1.0) * self.check_every
        try:
            st = _Target(key, GilReader(location), check_at)
        except ProbeUnavailable as exc:
            st = _Target(key, None, check_at)
            st.failure = exc.reason
        except OSError as exc:
            st = _Target(key, None, check_at)
            st.failure = _reason(exc)
        with self._lock:
            old = self._targets.pop(key, None)
            self._targets[key] = st
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

    def totals(self, key: Hashable) -> Optional[GilTotals]:
        st = self._targets.get(key)
        return None if st is None else st.totals()

    def failure(self, key: Hashable) -> Optional[str]:
        st = self._targets.get(key)
        return None if st is None else st.failure

    def keys(self) -> list:
        with self._lock:
            return list(self._targets)

    def is_alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    # ----------------------------------------------------------------- internals
    def _rebuild(self) -> None:
        # called with the lock held; one atomic swap of the tuple the hot path iterates
        self._active = tuple(st for st in self._targets.values() if st.failure is None)

    def _retire(self, st: _Target) -> None:
        # called with the lock held: the reader is closed later, by the sampling thread
        if st.reader is not None:
            self._to_close.append(st.reader)
            st.reader = None

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
        params = self._params
        lo, span, max_gap = params
        rand = self._rng.random
        monotonic = time.monotonic
        sleep = time.sleep
        running = self._running          # a list, not Event.is_set(): no Python call per tick
        ticks = 0
        next_t = monotonic() + self._period * rand()
        while running[0]:
            if self._params is not params:     # rate or jitter changed
                params = self._params
                lo, span, max_gap = params
                next_t = min(next_t, monotonic() + lo + span * rand())
            delay = next_t - monotonic()
            if delay > 0:
                sleep(delay)
            if self._to_close:
                self._close_pending()
            now = monotonic()
            failed = None
            # Hot path: one pread per target and sample-and-hold accounting; no lock.
            for st in self._active:
                try:
                    vals = st.unpack(st.read())
                except Exception as exc:      # OSError, or a short read (struct.error)
                    if failed is None:
                        failed = []
                    failed.append((st, exc))
                    continue
                if st.free_threaded:
                    enabled, interval, _holder, locked, switch, wrefs = vals
                else:
                    interval, _holder, locked, switch, wrefs = vals
                    enabled = -1
                if locked & ~1:
                    if failed is None:
                        failed = []
                    failed.append((st, None))
                    continue
                waiters = wrefs >> 3
                if st.waiting is not None:
                    exact = st.waiting()
                    if exact is not None:
                        waiters = exact
                t0, l0, w0, s0, _, sampled, held, wait, contended, switches, n, _e = st.state
                if n:
                    dt = now - t0
                    if dt > max_gap:
                        dt = max_gap
                    sampled += dt
                    if l0:
                        held += dt
                        if w0:
                            contended += dt
                    if w0:
                        wait += dt * w0
                    if switch != s0:
                        switches += (switch - s0) & _MASK64
                st.state = (now, locked, waiters, switch, interval, sampled, held, wait,
                            contended, switches, n + 1, enabled)
            ticks += 1
            self.ticks = ticks
            if failed is not None or now >= self._next_check:
                try:
                    self._housekeeping(now, failed)
                except Exception:  # never let the thread die
                    pass
            next_t += lo + span * rand()
            if next_t < now:           # fell behind (starved): restart the schedule
                next_t = now + lo + span * rand()
        self._close_pending()

    def _housekeeping(self, now: float, failed) -> None:
        """Record failures from the hot path; re-validate at most one due target."""
        due = None
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
                if st.next_check <= now and due is None:
                    due = st
                elif st.next_check < soonest:
                    soonest = st.next_check
            self._next_check = soonest
        if due is not None:
            self._check(due, now)
            with self._lock:
                self._next_check = min(self._next_check, due.next_check)

    def _check(self, st: _Target, now: float) -> None:
        """Occasional re-validation and futex cross-check of one target (sampling thread)."""
        st.next_check = now + self.check_every * self._rng.uniform(0.8, 1.2)
        reader = st.reader
        if reader is None:      # removed meanwhile; its reader is queued for closing
            return
        reason = None
        futex = -1
        interval, samples = st.state[4], st.state[10]
        try:
            problem, futex = reader.recheck()
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
        return "exited" if pid and not os.path.exists(f"/proc/{pid}") else "validation_failed"
    return "exited" if pid and not os.path.exists(f"/proc/{pid}") else "validation_failed"
