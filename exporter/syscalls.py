"""System call names, by number, for what a thread blocked in (/proc/PID/task/TID/syscall).

Data only: the calls a thread holding the GIL is found blocked in (sleeps, waits, socket and
file I/O, polls), for the two architectures the probe supports. A number not listed is shown
as `syscall N`. Numbers from the kernel's syscall tables (arch/x86/entry/syscalls/syscall_64.tbl;
include/uapi/asm-generic/unistd.h for arm64).
"""
from __future__ import annotations

import platform

X86_64 = {
    0: "read", 1: "write", 7: "poll", 17: "pread64", 18: "pwrite64", 19: "readv", 20: "writev",
    23: "select", 34: "pause", 35: "nanosleep", 42: "connect", 43: "accept", 44: "sendto",
    45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 61: "wait4", 72: "fcntl", 74: "fsync",
    75: "fdatasync", 202: "futex", 230: "clock_nanosleep", 232: "epoll_wait", 247: "waitid",
    257: "openat", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 288: "accept4",
    299: "recvmmsg", 307: "sendmmsg", 441: "epoll_pwait2",
}

AARCH64 = {
    22: "epoll_pwait", 25: "fcntl", 56: "openat", 63: "read", 64: "write", 65: "readv",
    66: "writev", 67: "pread64", 68: "pwrite64", 72: "pselect6", 73: "ppoll", 82: "fsync",
    83: "fdatasync", 98: "futex", 101: "nanosleep", 115: "clock_nanosleep", 202: "accept",
    203: "connect", 206: "sendto", 207: "recvfrom", 211: "sendmsg", 212: "recvmsg",
    242: "accept4", 243: "recvmmsg", 260: "wait4", 269: "sendmmsg", 95: "waitid",
    441: "epoll_pwait2",
}

TABLES = {"x86_64": X86_64, "aarch64": AARCH64}


def name(number: int, machine: str | None = None) -> str:
    """The call's name on `machine` (this host's by default); `syscall N` when not listed."""
    table = TABLES.get(machine or platform.machine(), {})
    return table.get(number, f"syscall {number}")


def describe(number: int | None, wchan: str = "", machine: str | None = None) -> str:
    """What a thread sits in, as `procfs.thread_blocked_in` read it: `clock_nanosleep()`, or
    `kernel wait WCHAN` when no system call was readable, or "" when neither was."""
    if number is not None:
        return f"{name(number, machine)}()"
    return f"kernel wait {wchan}" if wchan else ""
