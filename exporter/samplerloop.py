"""The GIL sampler's tick loop in Python: the steps of Core.run in _hotloop.c, for when the
extension was not built (or native=False). exporter/sampler.py's module docstring says what
a tick samples and how its time is credited."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .samplertarget import Target

if TYPE_CHECKING:
    from .sampler import GilSampler

_MASK64 = (1 << 64) - 1


class TickRing:
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

    def at(self, tick: int, st: Target) -> None:
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


class PythonLoop:
    """The tick loop in Python, in the steps of _hotloop.c's Core.run: sleep to the planned
    tick, advance the sampled clock, sample each target due (read, waiters, account and plan
    its next stratum), then plan the next tick to wake at. Between those steps, what the C
    loop leaves to its driver (samplernative.py): new targets, readers to close, failures and
    re-validation, here at every tick."""

    def __init__(self, sampler: GilSampler) -> None:
        self.sampler = sampler
        self.params = sampler._params
        self.rand = sampler._rng.random
        self.recent = sampler._recent.append
        self.ring = TickRing(sampler.idle_ticks, sampler._clock, time.monotonic(),
                             sampler._period * self.rand())

    def run(self) -> None:
        s = self.sampler
        running = s._running          # a list, not Event.is_set(): no Python call per tick
        s.ticks = s.reads = 0
        while running[0]:
            self._retune()
            self._sleep()
            if s._to_close:
                s._close_pending()
            now = self._advance()
            if s._new:
                self._admit_new()
            failed = self._sample_due()
            s.ticks += 1
            if failed or now >= s._next_check:
                self._housekeeping(now, failed)
            self._plan_next(now)
        s._clock = self.ring.c
        s._close_pending()

    def _retune(self) -> None:
        """A new rate or jitter: the next tick at most one new period after the last."""
        params = self.sampler._params
        if params is not self.params:
            self.params = params
            ring = self.ring
            ring.plan = min(ring.plan, ring.last + params[0] + params[1] * self.rand())

    def _sleep(self) -> None:
        delay = self.ring.plan - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _advance(self) -> float:
        """The tick woken at: on the sampled clock and among the recent ticks."""
        now = time.monotonic()
        self.ring.advance(now, self.params[2])
        self.recent(now)
        return now

    def _admit_new(self) -> None:
        """Targets added since the last tick: a first stratum of one tick, sampled now."""
        ring = self.ring
        for st in self.sampler._take_new():
            st.start, st.length = ring.j, 1
            ring.at(ring.j, st)

    def _sample_due(self) -> list:
        """Hot path: one pread per target due at this tick and time-weighted accounting; no
        lock but a per-thread target's own. Returns [(target, exception or None)] failed."""
        failed: list = []
        s, ring, rand = self.sampler, self.ring, self.rand
        hold, idle = self.params[3], s.idle_ticks
        for st in ring.take():
            if st.removed or st.failure is not None:
                continue                  # its reader is closed, or about to be
            seen = read_gil(st, failed)
            if seen is not None:
                account(st, ring, hold, idle, rand, *seen)
                s.reads += 1
        return failed

    def _housekeeping(self, now: float, failed: list) -> None:
        try:
            self.sampler._housekeeping(now, failed)
        except Exception:  # never let the thread die
            pass

    def _plan_next(self, now: float) -> None:
        lo, span = self.params[0], self.params[1]
        self.ring.plan_next(now, lo, span, self.rand, bool(self.sampler._new))


def read_gil(st: Target, failed: list) -> tuple | None:
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


def _waiters(st: Target, count: int) -> int:
    """The waiters: the condvar's count, unless the target has an exact source (3.15+:
    each thread state's gil_requested, read from the target's thread list: hostile memory)."""
    if st.waiting is None:
        return count
    try:
        exact = st.waiting()
    except Exception:
        return count          # the condvar's count stands
    return count if exact is None else exact


def account(st: Target, ring: TickRing, hold: int, idle: int, rand, locked: int, waiters: int,
            switch: int, interval: int, enabled: int, holder: int) -> None:
    """The accounting of one sample, as account() in _hotloop.c: the previous stratum's state
    until this stratum starts, then this one's; then the next stratum, from what was seen."""
    j, c = ring.j, ring.c
    per_thread = st.held
    acc, h0 = None, 0
    if per_thread is not None:    # acc and state change together
        per_thread.lock.acquire()
        acc, h0 = per_thread.acc, per_thread.holder
    c0, l0, w0, s0, _, sampled, held, wait, contended, switches, n, _e = st.state
    if n:
        cs = ring.clock_at(st.start)
        sums = _credit(sampled, held, wait, contended, cs - c0, l0, w0, acc, h0)
        dt = c - cs
        if dt:
            sums = _credit(*sums, dt, locked, waiters, acc, holder)
        sampled, held, wait, contended = sums
        if switch != s0:
            switches += (switch - s0) & _MASK64
    st.state = (c, locked, waiters, switch, interval, sampled, held, wait,
                contended, switches, n + 1, enabled)
    if per_thread is not None:
        per_thread.holder = holder
        per_thread.lock.release()
    _next_stratum(st, ring, j, waiters, hold, idle, rand)


def _credit(sampled: float, held: float, wait: float, contended: float, dt: float, locked: int,
            waiters: int, acc: dict | None, holder: int) -> tuple[float, float, float, float]:
    """`dt` of the sampled clock in one state: (sampled, held, wait, contended) after it, and
    the held time to the holder's address in `acc` (per thread only; credit() in _hotloop.c)."""
    sampled += dt
    if locked:
        held += dt
        if acc is not None:
            acc[holder] = acc.get(holder, 0.0) + dt
        if waiters:
            contended += dt
    if waiters:
        wait += dt * waiters
    return sampled, held, wait, contended


def _next_stratum(st: Target, ring: TickRing, j: int, waiters: int, hold: int, idle: int,
                  rand) -> None:
    """The next stratum, decided from what was seen up to now: one tick while a waiter was
    seen within `hold` ticks, else `idle` ticks sampled at one drawn among them."""
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
