"""Reading a target from outside: /proc/PID/mem with os.pread, and the /proc files around it.

Needs ptrace-attach permission (the same user, or CAP_SYS_PTRACE) but never attaches: the
target is not stopped, and it is only ever read.
"""
from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import os
from collections.abc import Sequence
from typing import Callable

from exporter import procfs

from .records import ProbeUnavailable

#: No user-space pointer reaches this (x86_64 with 5-level paging: 2**56; aarch64: 2**52). A
#: pointer read from a torn or garbage struct may, and os.pread cannot take one past 2**63.
USER_SPACE_END = 1 << 57

MapEntry = procfs.MapEntry

#: The memory interface of the readers of target memory (frames, thread states): (size,
#: address) -> bytes, os.pread's contract on /proc/PID/mem (short or empty when the memory
#: ends, OSError EIO when nothing is mapped). A parser test may give canned memory instead.
Pread = Callable[[int, int], bytes]


def pread_of(source: int | Pread) -> Pread:
    """The Pread of an open /proc/PID/mem fd (or `source` itself when it is one already)."""
    return functools.partial(os.pread, source) if isinstance(source, int) else source


def proc_error(exc: OSError, pid: int) -> ProbeUnavailable:
    if isinstance(exc, PermissionError) or exc.errno in (errno.EPERM, errno.EACCES):
        return ProbeUnavailable("permission_denied", f"pid {pid}: {exc}")
    if isinstance(exc, (FileNotFoundError, ProcessLookupError)) or exc.errno in (errno.ESRCH, errno.ENOENT):
        return ProbeUnavailable("exited", f"pid {pid}: {exc}")
    return ProbeUnavailable("exited" if not procfs.exists(pid) else "validation_failed",
                            f"pid {pid}: {exc}")


@contextlib.contextmanager
def proc_access(pid: int):
    """/proc reads of one target: its exit or a denied access become ProbeUnavailable."""
    try:
        yield
    except procfs.ProcessGone as exc:
        raise ProbeUnavailable("exited", f"pid {pid}") from exc
    except OSError as exc:
        raise proc_error(exc, pid) from exc


def read_maps(pid: int) -> list[MapEntry]:
    with proc_access(pid):
        maps = procfs.maps(pid)
    if not maps:
        # Zombies (exited, not reaped) and kernel threads have no mappings.
        state = procfs.process_state(pid)
        raise ProbeUnavailable("exited" if state in ("Z", "X", "") else "not_cpython",
                               f"pid {pid} has no memory mappings (state {state or '?'})")
    return maps


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (clock ticks since boot): identifies a process across PID reuse."""
    with proc_access(pid):
        return procfs.start_time(pid)


def task_ids(pid: int) -> list[int]:
    with proc_access(pid):
        return procfs.task_ids(pid)


def task_syscalls(pid: int) -> dict[int, tuple]:
    """/proc/PID/task/*/syscall of every thread (procfs.task_syscalls)."""
    with proc_access(pid):
        return procfs.task_syscalls(pid)


def open_mem(pid: int) -> int:
    try:
        return procfs.open_mem(pid)
    except OSError as exc:
        raise proc_error(exc, pid) from exc


def pread_exact(fd: int, size: int, addr: int, pid: int) -> bytes:
    if not 0 <= addr <= USER_SPACE_END - size:
        raise ProbeUnavailable("validation_failed", f"pid {pid}: {addr:#x} is no user-space address")
    try:
        data = os.pread(fd, size, addr)
    except OSError as exc:
        if exc.errno == errno.EIO:       # unmapped address
            raise ProbeUnavailable("validation_failed", f"pid {pid}: {addr:#x} not readable") from exc
        raise proc_error(exc, pid) from exc
    if len(data) != size:
        # The mm is gone (exit): reads return 0 bytes.
        if not data:
            raise ProbeUnavailable("exited", f"pid {pid}: memory no longer readable")
        raise ProbeUnavailable("validation_failed", f"pid {pid}: short read at {addr:#x}")
    return data


class WritableRanges:
    """Sorted writable mappings, for 'is this a heap/data pointer' checks."""

    def __init__(self, maps: Sequence[MapEntry]) -> None:
        spans = sorted((m.start, m.end) for m in maps if m.perms[:2] == "rw")
        self._starts = [s for s, _ in spans]
        self._ends = [e for _, e in spans]

    def __contains__(self, addr: int) -> bool:
        i = bisect.bisect_right(self._starts, addr) - 1
        return i >= 0 and addr < self._ends[i]


def host_arch() -> str:
    m = os.uname().machine
    return {"arm64": "aarch64"}.get(m, m)
