"""Reading a located GIL: one os.pread of the struct per sample, on a kept /proc/PID/mem fd."""
from __future__ import annotations

import os
import struct
from dataclasses import replace
from typing import Callable

from .identity import identify_target
from .location import (
    INTERVAL_MAX_US,
    INTERVAL_MIN_US,
    TSTATE_INTERP_OFFSET,
    RuntimeView,
    futex_waiters,
    structural_ok,
    tstate_ok,
)
from .memory import WritableRanges, open_mem, pread_exact, proc_error, read_maps, start_time, task_ids
from .records import GilLayout, GilLocation, GilReading, ProbeUnavailable
from .threads import ThreadWalker

_U64 = struct.Struct("<Q")

#: The order in which layout_struct() unpacks the fields a sample needs.
FIELDS = ("interval", "last_holder", "locked", "switch_number", "cond_wrefs")


def layout_struct(layout: GilLayout) -> struct.Struct:
    """One precompiled struct that unpacks, in offset order, interval, last_holder, locked,
    switch_number and __wrefs (and, first, `enabled` on free-threaded builds)."""
    codes = {"interval": "Q", "last_holder": "Q", "locked": "i", "switch_number": "Q",
             "cond_wrefs": "I", "enabled": "i"}
    fields = sorted((getattr(layout, n), n) for n in FIELDS + ("enabled",) if getattr(layout, n) >= 0)
    expected = (("enabled",) if layout.enabled >= 0 else ()) + FIELDS
    if tuple(n for _, n in fields) != expected:
        raise ValueError(f"unexpected field order in {layout}")
    fmt, pos = "<", 0
    for off, name in fields:
        if off < pos:
            raise ValueError(f"overlapping fields in {layout}")
        if off > pos:
            fmt += f"{off - pos}x"
        fmt += codes[name]
        pos = off + struct.calcsize(codes[name])
    return struct.Struct(fmt)


class GilReader:
    """Reads one target's GIL struct: one os.pread per read() on a kept /proc/PID/mem fd.

    The fd is bound to the target's address space at open time: if the PID is reused
    by another process, reads of the old fd return nothing ("exited"), never the new
    process's memory.
    """

    def __init__(self, location: GilLocation) -> None:
        self.location = location
        self.pid = location.pid
        self.address = location.address
        self.size = location.layout.read_size
        self.struct = layout_struct(location.layout)
        self.free_threaded = location.layout.enabled >= 0
        self.start_time = start_time(self.pid)
        if not location.runtime_size:      # built by hand: take the size from the ELF (cached)
            try:
                self.location = location = replace(
                    location, runtime_size=identify_target(self.pid).elf.runtime[1])
            except ProbeUnavailable:
                pass
        self._writable: WritableRanges | None = None
        self._interps: set = set()       # interpreters already verified (recheck)
        self.fd = open_mem(self.pid)
        self.threads: ThreadWalker | None = None
        if location.threads is not None and location.interpreter:
            self.threads = ThreadWalker(self.fd, location.interpreter, location.threads)
        #: where read().waiters comes from: the threads' own flags (3.15+) or glibc's condvar count
        self.waiters_source = ("gil_requested" if self.threads and location.threads.has_gil_flags
                               else "condvar")

    def read_raw(self) -> tuple[int, int, int, int, int, int]:
        """(interval_us, last_holder, locked, switch_number, wrefs, enabled) with one pread;
        enabled is -1 on builds without the field."""
        if self.fd < 0:
            raise ProbeUnavailable("exited", "reader closed")
        try:
            data = os.pread(self.fd, self.size, self.address)
        except OSError as exc:
            raise proc_error(exc, self.pid) from exc
        if len(data) != self.size:
            raise ProbeUnavailable("exited", f"pid {self.pid}: memory no longer readable")
        vals = self.struct.unpack(data)
        if self.free_threaded:
            return vals[1], vals[2], vals[3], vals[4], vals[5], vals[0]
        return vals + (-1,)

    def read(self) -> GilReading:
        interval, holder, locked, switch, wrefs, enabled = self.read_raw()
        if locked not in (0, 1) or not INTERVAL_MIN_US <= interval <= INTERVAL_MAX_US:
            raise ProbeUnavailable("validation_failed",
                                   f"pid {self.pid}: locked={locked} interval={interval}")
        waiters = wrefs >> 3
        if self.waiters_source == "gil_requested":
            exact = self.threads.waiting()
            if exact is not None:
                waiters = exact
        return GilReading(interval, bool(locked), switch, waiters, holder,
                          None if enabled < 0 else enabled != 0)

    def recheck(self, futex: bool = True, alive: Callable[[], bool] | None = None) -> tuple[str, int]:
        """Re-validate the location on the live process without sleeping.

        Returns (problem, futex_waiters): problem is "" when one snapshot of the struct
        and its mutex still has the GIL's shape and, if the GIL is locked, last_holder is
        a live thread state of the runtime's interpreter. Raises ProbeUnavailable when
        the process exited, was replaced, or denies access. Costs a few /proc reads;
        the writable mappings and the verified interpreter are cached between calls.
        ``futex=False`` leaves out the futex cross-check (futex_waiters -1): it reads every
        thread's /proc/PID/task/TID/syscall, and only has something to say while threads wait.
        ``alive`` replaces same_process() with the caller's own check that the PID still names
        the process this reader was opened for (the sampler keeps /proc/PID/stat open).
        """
        if not (self.same_process() if alive is None else alive()):
            raise ProbeUnavailable("exited", f"pid {self.pid} exited or was replaced")
        loc = self.location
        data = pread_exact(self.fd, loc.layout.mutex + 40, self.address, self.pid)
        tids = task_ids(self.pid)
        problem = ""
        for attempt in range(2):
            if self._writable is None or attempt:
                self._writable = WritableRanges(read_maps(self.pid))
            problem = self._recheck_snapshot(data, len(tids))
            if not problem:
                break
        if problem or not futex:
            return problem, -1
        return "", futex_waiters(self.pid, self.address, loc.layout)

    def _recheck_snapshot(self, data: bytes, ntasks: int) -> str:
        loc = self.location
        writable = self._writable
        if not structural_ok(data, 0, loc.layout, writable, ntasks + 4, INTERVAL_MIN_US):
            return "GIL struct lost its shape"
        locked, = struct.unpack_from("<i", data, loc.layout.locked)
        holder, = _U64.unpack_from(data, loc.layout.last_holder)
        if locked and holder:
            try:
                interp, = _U64.unpack(pread_exact(self.fd, 8, holder + TSTATE_INTERP_OFFSET, self.pid))
            except ProbeUnavailable as exc:
                if exc.reason == "validation_failed":
                    return "last_holder is not readable"
                raise
            if interp in self._interps:
                return ""
            runtime = RuntimeView(self.pid, self.fd, loc.identity.runtime_address, max(loc.runtime_size, 8))
            if loc.interpreter:
                runtime.interpreters.add(loc.interpreter)
            bad = tstate_ok(self.pid, self.fd, holder, writable, runtime)
            if bad:
                return bad
            self._interps.add(interp)
        return ""

    def same_process(self) -> bool:
        """False if the PID now names another process (or none)."""
        try:
            return start_time(self.pid) == self.start_time
        except ProbeUnavailable:
            return False

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> GilReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

