"""The driver of the GIL sampler's tick loop in C (Core in _hotloop.c): the loop of
samplerloop.py's PythonLoop runs in Core.run, in chunks of ~0.25 s; between them, here: new
and removed targets, failures, re-validation, closing readers."""
from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING

from .gil.reader import FIELDS
from .samplertarget import Target

if TYPE_CHECKING:
    from .sampler import GilSampler

CHUNK = 0.25    # seconds of ticks per Core.run call at most


class NativeLoop:
    """One sampling thread's run of the C loop: the Core it drives and the targets it samples."""

    def __init__(self, sampler: GilSampler, core_type) -> None:
        s = self.sampler = sampler
        rng = s._rng
        self.core = s._core = core_type(s.idle_ticks, s._clock, s._period * rng.random(),
                                        rng.getrandbits(64))
        self.sampled: dict[int, Target] = {}   # core index -> target
        self.params = s._params

    def run(self) -> None:
        s, core = self.sampler, self.core
        running = s._running
        try:
            while running[0]:
                self._retune()
                self._between_chunks()
                now = time.monotonic()
                if now >= s._next_check - 0.01:
                    s._housekeeping(now, None, ahead=CHUNK)
                failures = self._run_chunk(now)
                if failures:
                    s._housekeeping(time.monotonic(), self._failed(failures))
        finally:
            for i, st in list(self.sampled.items()):
                self._unhook(i, st)
            s._clock = core.clock
            s._close_pending()

    def _retune(self) -> None:
        """A new rate or jitter: the next tick one new period from now."""
        s = self.sampler
        if s._params is not self.params:
            params = self.params = s._params
            self.core.reschedule(time.monotonic() + params[0] + params[1] * s._rng.random())

    def _between_chunks(self) -> None:
        """Removed and failed targets out of the C loop, their readers closed after (it no
        longer reads them), new targets in."""
        s = self.sampler
        for i, st in list(self.sampled.items()):
            if st.removed or st.failure is not None:
                self._unhook(i, st)
        if s._to_close:
            s._close_pending()
        if s._new:
            for st in s._take_new():
                if st.reader is not None:
                    self._hook(st)

    def _run_chunk(self, now: float) -> list:
        """Core.run up to the next re-validation, CHUNK at most, and at least the next tick
        (never a call that returns at once): [(index, errno, kind)] failed."""
        s, core = self.sampler, self.core
        lo, span, max_gap, hold = self.params
        until = max(min(now + CHUNK, s._next_check), core.plan)
        failures = core.run(until, lo, span, max_gap, hold)
        s.ticks, s.reads = core.ticks, core.reads
        return failures

    def _failed(self, failures: list) -> list:
        """The C loop's failures as the Python loop's: [(target, exception or None)]."""
        failed = []
        for i, err, kind in failures:
            st = self.sampled.get(i)
            if st is None:
                continue
            self._unhook(i, st)
            failed.append((st, OSError(err, os.strerror(err)) if kind == 0 else
                           (None if kind == 2 else EOFError("short read"))))
        return failed

    def _hook(self, st: Target) -> None:
        """Sample st in C from its state so far (per thread: and its holder, under its lock)."""
        core, reader, held = self.core, st.reader, st.held
        layout = reader.location.layout
        offsets = (tuple(getattr(layout, f) for f in FIELDS if f != "last_holder")
                   + (layout.enabled,))
        with contextlib.nullcontext() if held is None else held.lock:
            per_thread = () if held is None else (layout.last_holder, held.holder)
            st.slot = core.add(reader.fd, reader.address, reader.size, offsets, st.waiting, st.state,
                               *per_thread)
            st.core = core
        self.sampled[st.slot[0]] = st

    def _unhook(self, i: int, st: Target) -> None:
        """Stop sampling st in C; its totals (and per-thread time not drained yet) stay
        readable from st.state (st.held)."""
        core, held = self.core, st.held
        if held is not None:
            with held.lock:
                got = core.drain(*st.slot)
                if got is not None:
                    st.state, table, held.holder = got
                    held.merge(held.acc, table)
                st.core = None
        else:
            state = core.state(*st.slot)
            if state is not None:
                st.state = state
            st.core = None
        core.remove(i)
        del self.sampled[i]
