"""The records the GIL probe hands between its stages, and its one error type."""
from __future__ import annotations

from dataclasses import dataclass


class ProbeUnavailable(Exception):
    """The GIL of this process cannot be read; ``reason`` is a short label value."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PythonIdentity:
    implementation: str      # "cpython" or "unknown"
    version: str             # "3.11.7", "" if unknown
    free_threaded: bool
    binary: str              # path, as the target sees it, of the ELF defining _PyRuntime
    runtime_address: int     # absolute address of _PyRuntime in the target, 0 if none
    libc: str                # "glibc" | "musl" | "unknown"
    libc_version: str = ""   # "2.36"; from the libc the target mapped, "" if unknown

    @property
    def minor(self) -> tuple[int, int] | None:
        """(3, 11) for "3.11.7"; None when the version is unknown."""
        parts = self.version.split(".")[:2]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            return None
        return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class GilLayout:
    """Byte offsets inside ``struct _gil_runtime_state`` and its glibc condvar (LP64)."""
    interval: int
    last_holder: int
    locked: int
    switch_number: int
    cond: int                # pthread_cond_t (48 bytes)
    cond_wrefs: int          # its __wrefs word: waiter count << 3 | flags
    mutex: int               # pthread_mutex_t (40 bytes)
    enabled: int = -1        # free-threaded builds: int enabled; -1 when the build has none

    @property
    def read_size(self) -> int:
        """Bytes one sample reads: from the struct's start to the last field used."""
        return max(self.cond_wrefs, self.enabled) + 4

    @property
    def cond_words(self) -> tuple:
        """(lo, hi): the futex words of the condvar that GIL waiters block on lie in [lo, hi)."""
        return self.cond, self.cond + 48


@dataclass(frozen=True)
class ThreadStateLayout:
    """Offsets inside PyThreadState and PyInterpreterState used to walk an interpreter's threads.

    -1 marks a field this version does not describe.
    """
    threads_head: int        # PyInterpreterState.threads.head
    next: int                # PyThreadState.next
    interp: int              # PyThreadState.interp
    native_thread_id: int    # PyThreadState.native_thread_id (the OS TID)
    holds_gil: int = -1      # 3.15+: int holds_gil
    gil_requested: int = -1  # 3.15+: int gil_requested

    @property
    def has_gil_flags(self) -> bool:
        return self.holds_gil >= 0 and self.gil_requested >= 0


@dataclass(frozen=True)
class GilLocation:
    pid: int
    address: int
    layout: GilLayout
    identity: PythonIdentity
    method: str              # "debug_offsets" | "offset_table" | "search" | "debug_offsets_search"
    runtime_size: int = 0    # st_size of _PyRuntime (for re-validation)
    interpreter: int = 0     # address of the PyInterpreterState owning this GIL (0 if unknown)
    threads: ThreadStateLayout | None = None   # set where the build describes its thread states
    interpreter_id: int = 0  # PyInterpreterState.id: 0 for the main interpreter


@dataclass(frozen=True)
class GilReading:
    interval_us: int
    locked: bool
    switch_number: int
    waiters: int
    holder: int
    enabled: bool | None = None   # free-threaded builds: is the GIL switched on; None otherwise
