"""All raw /proc reading and parsing, in one place (after psutil's _pslinux.py).

Process-level figures that psutil reads well (cmdline, exe, uids, CPU times, start
time, host per-CPU times) come from psutil. What psutil gets wrong or does not
offer is parsed here: context switches summed over every task (psutil counts the
main thread only on Linux, psutil issue 1467), /proc/PID/maps, /proc/PID/cgroup
and /proc/PID/task/TID/syscall.

Every function raises ProcessGone when the process vanished and PermissionError
when access is denied; callers treat both as normal operation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

PROC = "/proc"


class ProcessGone(Exception):
    """The process (or the one we knew under this PID) no longer exists."""


@dataclass(frozen=True)
class ProcessInfo:
    """Identity and matching attributes of a process, read once per scan."""

    pid: int
    start_time: int  # clock ticks after boot (/proc/PID/stat field 22); (pid, start_time) survives PID reuse
    comm: str
    cmdline: tuple[str, ...]
    exe: str
    uid: int
    user: str


@dataclass(frozen=True)
class ProcessStat:
    """Per-tick figures of one process, from one read of /proc/PID/stat."""

    start_time: int  # as ProcessInfo.start_time
    threads: int
    cpu_user: float  # seconds
    cpu_system: float  # seconds


@dataclass(frozen=True)
class MapEntry:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str  # as the target sees it; undecodable bytes kept as surrogates


def pids() -> list[int]:
    return psutil.pids()


def _process(pid: int) -> psutil.Process:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess as e:
        raise ProcessGone(pid) from e


def process_info(pid: int) -> ProcessInfo:
    """Identity and matchable attributes. exe/cmdline may be empty for kernel threads."""
    proc = _process(pid)
    try:
        with proc.oneshot():
            start = start_time(pid)
            comm = proc.name()
            uid = proc.uids().real
            try:
                cmdline = tuple(proc.cmdline())
            except psutil.AccessDenied:
                cmdline = ()
            try:
                exe = proc.exe()
            except (psutil.AccessDenied, FileNotFoundError):
                exe = ""
            try:
                user = proc.username()
            except KeyError:  # uid with no passwd entry
                user = str(uid)
    except psutil.NoSuchProcess as e:
        raise ProcessGone(pid) from e
    except psutil.AccessDenied as e:
        raise PermissionError(f"access denied to /proc/{pid}") from e
    return ProcessInfo(pid, start, comm, cmdline, exe, uid, user)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes]:
    """Fields of /proc/PID/stat after comm (state is [0], utime [11], starttime [19]).

    A zombie or dead process counts as gone.
    """
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e
    # comm may contain spaces and parentheses: fields start after the last ')'.
    fields = data[data.rfind(b")") + 2:].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        raise ProcessGone(pid)
    return fields


def start_time(pid: int) -> int:
    """Start time in clock ticks after boot, for a live process (not a zombie, not a thread)."""
    fields = _stat_fields(pid)
    if not _is_thread_group_leader(pid):
        # /proc/N also answers for a thread N of another process: a dead process's PID taken
        # by a new thread in the same clock tick would otherwise look like the same process.
        raise ProcessGone(pid)
    return int(fields[19])


def _is_thread_group_leader(pid: int) -> bool:
    try:
        with open(f"{PROC}/{pid}/status", "rb") as f:
            head = f.read(512)
    except (FileNotFoundError, ProcessLookupError):
        return False
    i = head.find(b"\nTgid:")
    if i < 0:
        return True  # unknown layout: do not drop a live process
    return int(head[i + 6:head.index(b"\n", i + 1)]) == pid


def process_stat(pid: int) -> ProcessStat:
    """Start time, threads and CPU times from a single read of /proc/PID/stat.

    The monitor calls this for every process every tick; psutil would read stat three times
    and status once for the same figures.
    """
    f = _stat_fields(pid)
    return ProcessStat(start_time=int(f[19]), threads=int(f[17]),
                       cpu_user=int(f[11]) / _CLK_TCK, cpu_system=int(f[12]) / _CLK_TCK)


_VOL = b"\nvoluntary_ctxt_switches:"
_INVOL = b"\nnonvoluntary_ctxt_switches:"


def parse_ctx_switches(status: bytes) -> tuple[int, int]:
    """(voluntary, involuntary) from the text of a /proc/.../status file."""
    def field(key: bytes) -> int:
        i = status.rfind(key)
        if i < 0:
            return 0
        j = i + len(key)
        k = status.find(b"\n", j)
        return int(status[j:k if k >= 0 else None])
    return field(_VOL), field(_INVOL)


def task_ctx_switches(pid: int) -> dict[int, tuple[int, int]]:
    """Per-thread (voluntary, involuntary) context switches, for every task of pid."""
    base = f"{PROC}/{pid}/task"
    try:
        tids = os.listdir(base)
    except FileNotFoundError as e:
        raise ProcessGone(pid) from e
    out: dict[int, tuple[int, int]] = {}
    for tid in tids:
        try:
            with open(f"{base}/{tid}/status", "rb") as f:
                out[int(tid)] = parse_ctx_switches(f.read())
        except (FileNotFoundError, ProcessLookupError):
            continue  # thread ended between listdir and open
    if not out and not os.path.exists(f"{PROC}/{pid}"):
        raise ProcessGone(pid)
    return out


def parse_maps(text: str) -> list[MapEntry]:
    entries = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, _, end = parts[0].partition("-")
        path = parts[5] if len(parts) == 6 else ""
        entries.append(MapEntry(int(start, 16), int(end, 16), parts[1], int(parts[2], 16), int(parts[4]), path))
    return entries


def maps(pid: int) -> list[MapEntry]:
    """Memory mappings. Empty for zombies and kernel threads."""
    try:
        with open(f"{PROC}/{pid}/maps", errors="surrogateescape") as f:
            return parse_maps(f.read())
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e


def process_state(pid: int) -> str:
    """One-letter state from /proc/PID/stat ("R", "S", ...), "" when unreadable or a zombie."""
    try:
        return _stat_fields(pid)[0].decode()
    except (ProcessGone, OSError, ValueError, IndexError):
        return ""


def task_ids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"{PROC}/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e


@dataclass(frozen=True)
class TaskStat:
    """One thread, from one read of /proc/PID/task/TID/stat."""

    name: str  # the comm field: the same text as /proc/PID/task/TID/comm (15 bytes at most)
    state: str  # "R", "S", "D", ...
    cpu_seconds: float  # utime + stime


def task_stats(pid: int) -> dict[int, TaskStat]:
    """Every thread of pid: name, state and CPU time. Threads that end meanwhile are left out."""
    out: dict[int, TaskStat] = {}
    for tid in task_ids(pid):
        try:
            with open(f"{PROC}/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # comm may hold spaces and parentheses: it runs from the first '(' to the last ')'
        name = data[data.find(b"(") + 1:data.rfind(b")")].decode("utf-8", "replace")
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) < 13:
            continue
        out[tid] = TaskStat(name, fields[0].decode(), (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return out


def task_syscalls(pid: int) -> dict[int, tuple[int, ...]]:
    """Per thread: (syscall number, arg1..arg6, sp, pc) from /proc/PID/task/TID/syscall.

    A running thread gives (-1,) and a blocked one without a syscall nothing. Needs
    ptrace-read permission (PermissionError otherwise); never stops the target.
    """
    out: dict[int, tuple[int, ...]] = {}
    for tid in task_ids(pid):
        try:
            with open(f"{PROC}/{pid}/task/{tid}/syscall", "rb") as f:
                line = f.read().split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # thread ended meanwhile
        if not line or line[0] == b"running":
            out[tid] = (-1,)
            continue
        try:
            out[tid] = (int(line[0]),) + tuple(int(x, 16) for x in line[1:])
        except ValueError:
            continue
    return out


def cgroup(pid: int) -> str:
    try:
        with open(f"{PROC}/{pid}/cgroup", errors="surrogateescape") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e


def host_cpu_times() -> list[tuple[float, float]]:
    """Per CPU (busy seconds, total seconds) since boot. iowait counts as idle."""
    out = []
    for t in psutil.cpu_times(percpu=True):
        total = sum(t)
        idle = t.idle + getattr(t, "iowait", 0.0)
        out.append((total - idle, total))
    return out


def read_pidfile(path: str) -> int | None:
    """PID from a pidfile, None when missing or malformed (normal: the service is down)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def task_schedstat(pid: int) -> dict[int, tuple[int, int]]:
    """Per-thread (nanoseconds on a CPU, nanoseconds runnable but waiting for a CPU), from
    /proc/PID/task/TID/schedstat (world-readable; needs CONFIG_SCHED_INFO, which every major
    distribution kernel sets). Empty when the kernel has no schedstat files."""
    base = f"{PROC}/{pid}/task"
    try:
        tids = os.listdir(base)
    except FileNotFoundError as e:
        raise ProcessGone(pid) from e
    out: dict[int, tuple[int, int]] = {}
    for tid in tids:
        try:
            with open(f"{base}/{tid}/schedstat", "rb") as f:
                run, delay, _slices = f.read().split()
            out[int(tid)] = (int(run), int(delay))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue  # thread ended between listdir and open, or no schedstat in this kernel
    return out


_CAP_SYS_PTRACE = 19


def has_cap_sys_ptrace(pid: int | str = "self") -> bool:
    """Whether `pid` (this process by default) holds CAP_SYS_PTRACE in its effective set."""
    try:
        with open(f"{PROC}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    except OSError:
        pass
    return False
