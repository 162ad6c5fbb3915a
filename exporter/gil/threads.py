"""An interpreter's thread states, read from outside (3.13+, where _Py_DebugOffsets describes
PyThreadState): each thread's native TID and, on 3.15+, its own GIL flags.

On 3.15+ `holds_gil` and `gil_requested` give the exact number of threads waiting for the GIL
(glibc's condvar count also counts a waiter that was just woken). take_gil clears
gil_requested just before it sets holds_gil, and our reads of the two are not atomic, so a
thread seen with both set is counted as the holder, not as a waiter.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .records import ThreadStateLayout

_U64 = struct.Struct("<Q")
MAX_THREADS = 4096
_ZERO = b"\0\0\0\0"


@dataclass(frozen=True)
class ThreadState:
    address: int
    native_thread_id: int
    holds_gil: Optional[bool]        # None where the build does not describe it
    gil_requested: Optional[bool]


class ThreadWalker:
    """Follows interp->threads.head through PyThreadState.next, with os.pread on a kept fd.

    The list changes under us (threads start and exit); a walk that meets a state of another
    interpreter, a cycle or an unreadable pointer returns None rather than a wrong answer.
    """

    def __init__(self, fd: int, interpreter: int, layout: ThreadStateLayout) -> None:
        self.fd = fd
        self.interpreter = interpreter
        self.layout = layout
        self.head_address = interpreter + layout.threads_head
        fields = [layout.next, layout.interp]
        if layout.has_gil_flags:
            fields += [layout.holds_gil, layout.gil_requested]
        self.span = max(fields) + 8          # one pread per thread covers every field we need

    def _walk(self) -> Optional[List[Tuple[int, bytes]]]:
        """(address, bytes) of every thread state in list order, or None if the list changed."""
        lay = self.layout
        out: List[Tuple[int, bytes]] = []
        try:
            addr, = _U64.unpack(os.pread(self.fd, 8, self.head_address))
            seen = set()
            while addr:
                if addr in seen or len(seen) >= MAX_THREADS or addr & 7:
                    return None
                seen.add(addr)
                data = os.pread(self.fd, self.span, addr)
                if len(data) != self.span:
                    return None
                if _U64.unpack_from(data, lay.interp)[0] != self.interpreter:
                    return None
                out.append((addr, data))
                addr, = _U64.unpack_from(data, lay.next)
        except (OSError, struct.error):
            return None
        return out

    def waiting(self) -> Optional[int]:
        """Threads waiting for the GIL now (gil_requested and not holds_gil), or None."""
        lay = self.layout
        walk = self._walk() if lay.has_gil_flags else None
        if walk is None:
            return None
        h, r = lay.holds_gil, lay.gil_requested
        return sum(1 for _a, d in walk if d[r:r + 4] != _ZERO and d[h:h + 4] == _ZERO)

    def states(self) -> Optional[List[ThreadState]]:
        """Every thread state of the interpreter now, or None if the list changed under us."""
        lay = self.layout
        walk = self._walk()
        if walk is None:
            return None
        out = []
        for addr, data in walk:
            try:
                tid, = _U64.unpack(os.pread(self.fd, 8, addr + lay.native_thread_id))
            except (OSError, struct.error):
                return None
            holds = req = None
            if lay.has_gil_flags:
                holds = data[lay.holds_gil:lay.holds_gil + 4] != _ZERO
                req = data[lay.gil_requested:lay.gil_requested + 4] != _ZERO
            out.append(ThreadState(addr, tid, holds, req))
        return out
