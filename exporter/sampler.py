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
the same loop; Python does the rest between its calls, every 0.25 s or so: samplernative.py),
else in Python (samplerloop.py). A target's reader, state and re-validation: samplertarget.py.
"""
from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Hashable

from .gil import GilLocation, GilReader
from .samplerloop import PythonLoop
from .samplernative import NativeLoop
from .samplertarget import GilTotals, Target, failure_reason
from .sampling import Jitter

try:
    from . import _hotloop  # the loop of samplerloop.py, in C (setup.py builds it when a compiler is there)
except ImportError:
    _hotloop = None

__all__ = ["GilTotals", "GilSampler"]


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
        self._targets: dict[Hashable, Target] = {}
        self._active: tuple = ()                 # targets still sampled (for re-validation)
        self._new: list[Target] = []             # added, not yet scheduled by the sampling thread
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
        st = Target.open(key, location, check_at, per_thread)
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
            return st.drain(alive)

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

    def _retire(self, st: Target) -> None:
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

    def _fail(self, st: Target, reason: str) -> None:
        # called with the lock held, from the sampling thread
        if st.failure is None:
            st.failure = reason
        self._rebuild()
        self._retire(st)

    def _take_new(self) -> list[Target]:
        """The sampling thread: targets added since it last looked, still to be sampled."""
        with self._lock:
            new, self._new = self._new, []
        return [st for st in new if st.failure is None and not st.removed]

    def _run(self) -> None:
        try:
            self.native_id = threading.get_native_id()
        except AttributeError:  # pragma: no cover
            self.native_id = 0
        if self.native:
            NativeLoop(self, _hotloop.Core).run()
        else:
            PythonLoop(self).run()

    def _housekeeping(self, now: float, failed, ahead: float = 0.0) -> None:
        """Record failures from the hot path; re-validate the targets due (the Python loop:
        one per tick at most; the C loop: every one due within `ahead` seconds)."""
        due = []
        with self._lock:
            for st, exc in failed or ():
                if exc is None:
                    reason = "validation_failed"
                elif isinstance(exc, OSError):
                    reason = failure_reason(exc, st.pid)
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

    def _check(self, st: Target, now: float) -> None:
        """Re-validation of one target (Target.recheck); a failure drops it from sampling."""
        why = st.recheck(now, self.check_every, self._rate_hz if self.idle_ticks > 1 else None, self._rng)
        if why is not None:
            with self._lock:
                if self._targets.get(st.key) is st:
                    self._fail(st, why)
                else:
                    st.failure = st.failure or why
