"""Threads, read from outside: an interpreter's thread states (3.13+, where _Py_DebugOffsets
describes PyThreadState: each thread's native TID and, on 3.15+, its own GIL flags), the native
TID of any thread state (every version), and who holds and who waits for one GIL, by TID.

On 3.15+ `holds_gil` and `gil_requested` give the exact number of threads waiting for the GIL
(glibc's condvar count also counts a waiter that was just woken). take_gil clears
gil_requested just before it sets holds_gil, and our reads of the two are not atomic, so a
thread seen with both set is counted as the holder, not as a waiter.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from .frames import STATIC_FRAME_LAYOUTS
from .layouts import PTHREAD_ID_OFFSETS, SECTION_MAX_DEFAULT, pthread_for_glibc
from .location import futex_waiting_tids
from .memory import USER_SPACE_END, Pread, host_arch, pread_of
from .records import GilLocation, GilReading, ProbeUnavailable, ThreadStateLayout

_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
MAX_THREADS = 4096
#: Bytes read per thread state at most (a PyThreadState is under 1 KiB in 3.13-3.15; the
#: offsets are validated against the same ceiling, layouts.SECTION_MAX_DEFAULT).
MAX_SPAN = SECTION_MAX_DEFAULT
_ZERO = b"\0\0\0\0"


@dataclass(frozen=True)
class ThreadState:
    address: int
    native_thread_id: int
    holds_gil: bool | None        # None where the build does not describe it
    gil_requested: bool | None


class ThreadWalker:
    """Follows interp->threads.head through PyThreadState.next, with os.pread on a kept fd.

    The list changes under us (threads start and exit); a walk that meets a state of another
    interpreter, a cycle or an unreadable pointer returns None rather than a wrong answer.
    """

    def __init__(self, fd: int | Pread, interpreter: int, layout: ThreadStateLayout) -> None:
        self.fd = fd
        self._pread = pread_of(fd)
        self.interpreter = interpreter
        self.layout = layout
        self.head_address = interpreter + layout.threads_head
        fields = [layout.next, layout.interp]
        if layout.has_gil_flags:
            fields += [layout.holds_gil, layout.gil_requested]
        self.span = max(fields) + 8          # one pread per thread covers every field we need
        if min(fields + [layout.threads_head, layout.native_thread_id]) < 0 or self.span > MAX_SPAN \
                or not 0 <= layout.threads_head < USER_SPACE_END or layout.native_thread_id >= MAX_SPAN:
            raise ProbeUnavailable("bad_offsets", f"thread-state offsets out of bounds: {layout}")

    def _walk(self) -> list[tuple[int, bytes]] | None:
        """(address, bytes) of every thread state in list order, or None if the list changed."""
        lay = self.layout
        out: list[tuple[int, bytes]] = []
        try:
            if not 0 < self.head_address < USER_SPACE_END:
                return None
            addr, = _U64.unpack(self._pread(8, self.head_address))
            seen = set()
            while addr:
                if addr in seen or len(seen) >= MAX_THREADS or addr & 7 or addr >= USER_SPACE_END:
                    return None
                seen.add(addr)
                data = self._pread(self.span, addr)
                if len(data) != self.span:
                    return None
                if _U64.unpack_from(data, lay.interp)[0] != self.interpreter:
                    return None
                out.append((addr, data))
                addr, = _U64.unpack_from(data, lay.next)
        except (OSError, struct.error):
            return None
        return out

    def waiting(self) -> int | None:
        """Threads waiting for the GIL now (gil_requested and not holds_gil), or None."""
        lay = self.layout
        walk = self._walk() if lay.has_gil_flags else None
        if walk is None:
            return None
        h, r = lay.holds_gil, lay.gil_requested
        return sum(1 for _a, d in walk if d[r:r + 4] != _ZERO and d[h:h + 4] == _ZERO)

    def states(self) -> list[ThreadState] | None:
        """Every thread state of the interpreter now, or None if the list changed under us."""
        lay = self.layout
        walk = self._walk()
        if walk is None:
            return None
        out = []
        tid_in_span = lay.native_thread_id + 8 <= self.span
        for addr, data in walk:
            try:
                if tid_in_span:
                    tid, = _U64.unpack_from(data, lay.native_thread_id)
                else:
                    tid, = _U64.unpack(self._pread(8, addr + lay.native_thread_id))
            except (OSError, struct.error):
                return None
            holds = req = None
            if lay.has_gil_flags:
                holds = data[lay.holds_gil:lay.holds_gil + 4] != _ZERO
                req = data[lay.gil_requested:lay.gil_requested + 4] != _ZERO
            out.append(ThreadState(addr, tid, holds, req))
        return out


class ThreadIds:
    """The native TID (as in /proc/PID/task) of a thread state, with one or two small reads.

    * 3.13+: PyThreadState.native_thread_id, where the target's _Py_DebugOffsets puts it;
    * 3.11, 3.12: native_thread_id, at the offset of frames.STATIC_FRAME_LAYOUTS;
    * 3.8-3.10: thread states hold no native id, but `thread_id` is the thread's pthread_t: the
      address of glibc's struct pthread, whose `tid` field is the TID (layouts.PTHREADS).

    The thread state is live memory of a running process: a TID read from a state that was
    freed meanwhile can be junk, so callers check it against the process's tasks.
    """

    def __init__(self, fd: int | Pread, location: GilLocation) -> None:
        self.fd = fd
        self._pread = pread_of(fd)
        ident = location.identity
        mm = ident.minor
        self.pthread_tid = -1
        if location.threads is not None:
            self.offset = location.threads.native_thread_id
        elif mm in STATIC_FRAME_LAYOUTS:
            self.offset = STATIC_FRAME_LAYOUTS[mm].tstate_native_thread_id
        elif mm in PTHREAD_ID_OFFSETS:
            try:
                minor = int(ident.libc_version.split(".")[1])
            except (IndexError, ValueError):
                minor = -1
            layout = pthread_for_glibc(minor, host_arch()) if ident.libc == "glibc" else None
            if layout is None:
                raise ProbeUnavailable("unknown_layout", f"no struct pthread layout for "
                                       f"{ident.libc} {ident.libc_version or '?'} on {host_arch()}")
            self.offset = PTHREAD_ID_OFFSETS[mm]
            self.pthread_tid = layout.tid
        else:
            raise ProbeUnavailable("unsupported_version",
                                   f"no thread-state layout for Python {ident.version or '?'}")

    def tid(self, tstate: int) -> int:
        """The TID of the thread state at `tstate`; 0 when it cannot be read."""
        try:
            if not 0 < tstate < USER_SPACE_END:
                return 0
            if not 0 <= self.offset < MAX_SPAN:
                return 0
            value, = _U64.unpack(self._pread(8, tstate + self.offset))
            if self.pthread_tid >= 0:
                if not value or value & 7 or value >= USER_SPACE_END:
                    return 0
                value, = _I32.unpack(self._pread(4, value + self.pthread_tid))
        except (OSError, struct.error):
            return 0
        return value if 0 < value < 1 << 31 else 0


#: reads /proc/PID/task/*/syscall once for every GIL of a sample that needs it
Syscalls = Callable[[], dict[int, tuple]]


class GilThreads:
    """Who holds one GIL and who waits for it, by native TID, from a reading of that GIL.

    The holder is `last_holder` while `locked`. Waiters: on 3.15+ every thread state's own
    `gil_requested` (and not `holds_gil`); before, the threads blocked in futex() on the GIL's
    condvar, from /proc/PID/task/*/syscall, read only when the GIL's own count says someone
    waits. A waiter just woken (runnable, not yet back in futex) is not seen there, so before
    3.15 the waiting threads found can be fewer than the condvar count.
    """

    def __init__(self, fd: int, location: GilLocation, walker: ThreadWalker | None) -> None:
        self.location = location
        self.pid = location.pid
        self.ids = ThreadIds(fd, location)
        self.walker = walker if walker is not None and walker.layout.has_gil_flags else None
        self.waiting_source = "gil_requested" if self.walker is not None else "futex"

    def holder(self, reading: GilReading) -> int:
        """TID of the thread holding the GIL at `reading`; 0 when free or not readable."""
        return self.ids.tid(reading.holder) if reading.locked and reading.holder else 0

    def waiting(self, reading: GilReading, syscalls: Syscalls, holder: int = 0) -> tuple[int, ...]:
        """TIDs of the threads waiting for the GIL about when `reading` was taken. These are
        read after the GIL: `holder` (its holder then) may have dropped it and queued again
        meanwhile, and is left out, as a thread seen both holding and requesting is on 3.15."""
        if self.walker is not None:
            states = self.walker.states()
            if states is not None:
                return tuple(s.native_thread_id for s in states
                             if s.gil_requested and not s.holds_gil and s.native_thread_id != holder)
        if reading.waiters <= 0:
            return ()
        loc = self.location
        return tuple(t for t in futex_waiting_tids(self.pid, loc.address, loc.layout, syscalls())
                     if t != holder)
