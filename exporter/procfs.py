"""All raw /proc reading and parsing, in one place (after psutil's _pslinux.py).

A process's identity and matching attributes (cmdline, exe, uids, user name) come from
psutil, once per process. What is read again and again is read here, as cheaply as /proc
allows: per-process figures from one pread of a kept /proc/PID/stat fd (StatFile), host
CPU times from a kept /proc/stat fd, and the marks that tell a known PID from a new
process (identity_marks). So is what psutil gets wrong or does not offer: context
switches summed over every task (psutil counts the main thread only on Linux, psutil
issue 1467), /proc/PID/maps, /proc/PID/cgroup and /proc/PID/task/TID/syscall.

Every function raises ProcessGone when the process vanished and PermissionError
when access is denied; callers treat both as normal operation. The few that give the raw
OSError say so: there a missing file does not mean a vanished process (a kernel thread has no
exe link), and the caller tells the cases apart.

The root is one module-level setting, PROC (psutil's PROCFS_PATH, node_exporter's
--path.procfs): "/proc" on a host, the host's procfs mounted elsewhere in a container, or a
fixture tree in the parser tests (tests/test_procfs_parsers.py). set_root() changes it, and
psutil's with it, before any reading starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from exporter import targetfile

PROC = "/proc"  # where procfs is mounted; set_root() changes it, every path is built from it


def set_root(root: str) -> None:
    """Read procfs at `root` from now on: this module's reads and psutil's (process_info).

    For start-up (a flag) and tests; not while other threads read. The kept /proc/stat fd
    is dropped so that host_cpu_times opens the new root's.
    """
    global PROC, _proc_stat_fd
    root = root.rstrip("/")
    if not root:
        raise ValueError("procfs root must be a directory other than /")
    PROC = root
    psutil.PROCFS_PATH = root
    fd, _proc_stat_fd = _proc_stat_fd, -1
    if fd >= 0:
        os.close(fd)


def path(pid: int | str, *parts: str) -> str:
    """The path of /proc/PID/PARTS... under the current root."""
    return "/".join((PROC, str(pid)) + parts)


def exists(pid: int) -> bool:
    """Whether /proc/PID is there (a zombie's is, until it is reaped)."""
    return os.path.exists(path(pid))


def readlink(pid: int, name: str) -> str:
    """The text of the link /proc/PID/NAME (exe, root, cwd). The raw OSError: ENOENT for a
    kernel thread's or zombie's exe is no sign the process is gone; EACCES/EPERM without
    ptrace-read access."""
    return os.readlink(path(pid, name))


def open_mem(pid: int) -> int:
    """A read-only fd of /proc/PID/mem (ptrace-attach access, never attaches). The raw
    OSError: gil.memory.proc_error tells an exit from a denial."""
    return os.open(path(pid, "mem"), os.O_RDONLY | os.O_CLOEXEC)


def is_magic_link(link: str) -> bool:
    """/proc/PID/exe and /proc/PID/map_files/START-END (under the root): links the kernel
    resolves to the very file, so they may be followed where a target's own path may not."""
    prefix = PROC + "/"
    if not link.startswith(prefix):
        return False
    parts = link[len(prefix):].split("/")
    return parts[0].isdigit() and (parts[1:] == ["exe"] or (len(parts) == 3 and parts[1] == "map_files"))


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
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


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
    return _fields(pid, data)


def _fields(pid: int, data: bytes) -> list[bytes]:
    # comm may contain spaces and parentheses: fields start after the last ')'.
    fields = data[data.rfind(b")") + 2:].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        raise ProcessGone(pid)
    return fields


class StatFile:
    """/proc/PID/stat of one process, kept open: each reading is one pread, with no path lookup.

    The fd stays bound to the process it was opened for. Once that process is reaped, reads
    fail with ESRCH (ProcessGone) even if its PID has been reused: a kept fd never shows
    another process. Closing is the owner's business (Monitor: under its lock).
    """

    __slots__ = ("pid", "fd")

    def __init__(self, pid: int, start_time: int):
        self.pid = pid
        try:
            self.fd = os.open(f"{PROC}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise ProcessGone(pid) from e
        try:
            if self.read().start_time != start_time:
                raise ProcessGone(pid)
        except BaseException:
            self.close()
            raise

    def read(self) -> ProcessStat:
        try:
            data = os.pread(self.fd, 1024, 0)
        except (ProcessLookupError, FileNotFoundError) as e:
            raise ProcessGone(self.pid) from e
        f = _fields(self.pid, data)
        return ProcessStat(start_time=int(f[19]), threads=int(f[17]),
                           cpu_user=int(f[11]) / _CLK_TCK, cpu_system=int(f[12]) / _CLK_TCK)

    def alive(self) -> bool:
        try:
            self.read()
            return True
        except (ProcessGone, OSError):
            return False

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def quick_marks(pid: int) -> tuple[int, int]:
    """(inode, owner) of /proc/PID, from one stat(). The kernel drops a process's /proc
    entries when it is reaped, so a reused PID comes back with another inode; an exec or an
    argv rewrite keeps it (identity_marks tells those)."""
    try:
        st = os.stat(f"{PROC}/{pid}")
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e
    return st.st_ino, st.st_uid


def identity_marks(pid: int) -> tuple:
    """What tells a process seen before from a new one under the same PID, or from the same
    process after it exec'd, renamed itself, rewrote its argv (setproctitle) or changed user:
    start time, comm and code/stack addresses (/proc/PID/stat), the raw cmdline, and the owner
    of /proc/PID. Three small reads, against psutil's dozen for the full ProcessInfo.
    """
    try:
        fd = os.open(f"{PROC}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            stat = os.read(fd, 1024)
        finally:
            os.close(fd)
        fd = os.open(f"{PROC}/{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC)
        try:
            cmdline = os.read(fd, 131072)
        finally:
            os.close(fd)
        uid = os.stat(f"{PROC}/{pid}").st_uid
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e
    i = stat.rfind(b")")
    f = stat[i + 2:].split()
    if len(f) < 26:
        raise ProcessGone(pid)
    # comm; starttime (22); startcode, endcode, startstack (26-28, 0 without ptrace access)
    return stat[stat.find(b"(") + 1:i], f[19], f[23], f[24], f[25], cmdline, uid


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


#: A status file is read in one pread of STATUS_READ bytes; a thread in 65,536 supplementary
#: groups (setgroups) makes its `Groups:` line alone about 700 KB, pushing the context-switch
#: lines past it: then it is read again, up to STATUS_MAX bytes (bounded: a target's own doing).
STATUS_READ = 4096
STATUS_MAX = 1 << 20


def parse_ctx_switches(status: bytes) -> tuple[int, int] | None:
    """(voluntary, involuntary) from the text of a /proc/.../status file; None when the text
    was cut before both lines ended (read it whole, then)."""
    def field(key: bytes) -> int | None:
        i = status.rfind(key)
        if i < 0:
            return None
        j = i + len(key)
        k = status.find(b"\n", j)
        if k < 0:
            return None
        try:
            return int(status[j:k])
        except ValueError:
            return None
    vol, invol = field(_VOL), field(_INVOL)
    return None if vol is None or invol is None else (vol, invol)


def read_ctx_switches(fd: int) -> tuple[int, int]:
    """The context switches of one kept status file: one pread, a longer one only when the
    file did not fit; (0, 0) for a file that holds no such lines even whole."""
    data = os.pread(fd, STATUS_READ, 0)
    got = parse_ctx_switches(data)
    if got is None and len(data) == STATUS_READ:
        got = parse_ctx_switches(os.pread(fd, STATUS_MAX, 0))
    return got if got is not None else (0, 0)


def task_ctx_switches(pid: int) -> dict[int, tuple[int, int]]:
    """Per-thread (voluntary, involuntary) context switches, for every task of pid."""
    base = f"{PROC}/{pid}/task"
    try:
        tids = os.listdir(base)
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e
    out: dict[int, tuple[int, int]] = {}
    flags = os.O_RDONLY | os.O_CLOEXEC
    for tid in tids:
        try:
            fd = os.open(f"{base}/{tid}/status", flags)
        except (FileNotFoundError, ProcessLookupError):
            continue  # thread ended between listdir and open
        try:
            out[int(tid)] = read_ctx_switches(fd)
        except ProcessLookupError:
            continue
        finally:
            os.close(fd)
    if not out and not exists(pid):
        raise ProcessGone(pid)
    return out


# Kept fds (StatFile, ThreadFiles) stay below the fd limit less this reserve: connections,
# the sampler's /proc/PID/mem fds and one-off opens must never hit EMFILE.
_FD_RESERVE = 1024
_kept = [0, -1]  # kept thread fds now, and how many may be kept (-1: not yet known)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as Go programs do at start). Returns it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    _kept[1] = max(0, min(soft, 1 << 20) - _FD_RESERVE)
    return soft


class ThreadFiles:
    """/proc/PID/task/TID/status and .../schedstat of every thread of one process, kept open.

    A reading is one pread of schedstat per thread; status (four times its cost: the kernel
    formats some fifty lines) is read again only for a thread whose schedstat line changed.
    That skips nothing: every context switch moves that line (switching a thread out adds
    its run time to the first figure, switching it in adds to the third), so an unchanged
    line means unchanged switch counts. A kernel that keeps no schedstat ("0 0 0", or no
    file) gets every status read. The thread list is read again only when the thread
    count (from /proc/PID/stat) changed or a thread ended: a kept fd of an ended thread
    fails with ESRCH, so the same count with no such failure means the same threads.
    Beyond the fd budget (see raise_fd_limit) it opens each file per reading instead.
    Used from one thread at a time.
    """

    __slots__ = ("pid", "fds", "kept", "last", "status_reads")

    def __init__(self, pid: int):
        self.pid = pid
        self.fds: dict[int, tuple[int, int]] = {}  # tid -> (status fd, schedstat fd or -1)
        self.kept = True
        # tid -> (its last schedstat line, the switch counts read with it, its figures)
        self.last: dict[int, tuple[bytes, tuple[int, int], tuple[int, int]]] = {}
        self.status_reads = 0  # status files read, for the bench and the tests

    def read(self, threads: int = -1) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
        """Per thread (voluntary, involuntary) context switches, and (ns on a CPU, ns runnable
        but waiting) as task_schedstat gives them; `threads`: the count just read."""
        if not self.kept:
            return task_ctx_switches(self.pid), task_schedstat(self.pid)
        if threads != len(self.fds):
            self._sync()
        ctx: dict[int, tuple[int, int]] = {}
        sched: dict[int, tuple[int, int]] = {}
        ended = self._read(self.fds.items(), ctx, sched)
        if ended:
            for tid in ended:
                self._drop(tid)
            new = self._sync()
            if not self.kept:
                return task_ctx_switches(self.pid), task_schedstat(self.pid)
            self._read([(tid, self.fds[tid]) for tid in new], ctx, sched)
        if not ctx and not exists(self.pid):
            raise ProcessGone(self.pid)
        return ctx, sched

    def _read(self, items, ctx: dict, sched: dict) -> list[int]:
        ended = []
        pread = os.pread
        last = self.last
        reads = 0
        for tid, (status, schedstat) in items:
            try:
                if schedstat < 0:
                    ctx[tid] = read_ctx_switches(status)
                    reads += 1
                    continue
                line = pread(schedstat, 128, 0)
                seen = last.get(tid)
                if seen is not None and seen[0] == line:
                    ctx[tid] = seen[1]
                    sched[tid] = seen[2]
                    continue
                run, delay, slices = line.split()
                ctx[tid] = counts = read_ctx_switches(status)
                reads += 1
                sched[tid] = figures = (int(run), int(delay))
                if slices != b"0" or figures != (0, 0):  # "0 0 0": the kernel keeps no schedstat
                    last[tid] = (line, counts, figures)
            except ProcessLookupError:
                ended.append(tid)
                ctx.pop(tid, None)
                sched.pop(tid, None)
        self.status_reads += reads
        return ended

    def _drop(self, tid: int) -> None:
        self.last.pop(tid, None)
        status, schedstat = self.fds.pop(tid)
        os.close(status)
        _kept[0] -= 1
        if schedstat >= 0:
            os.close(schedstat)
            _kept[0] -= 1

    def _sync(self) -> list[int]:
        """Open the threads not open yet, close the ended ones; returns the new TIDs."""
        base = f"{PROC}/{self.pid}/task"
        try:
            tids = {int(t) for t in os.listdir(base)}
        except (FileNotFoundError, ProcessLookupError) as e:
            raise ProcessGone(self.pid) from e
        for tid in [t for t in self.fds if t not in tids]:
            self._drop(tid)
        if _kept[1] < 0:
            raise_fd_limit()
        new = []
        flags = os.O_RDONLY | os.O_CLOEXEC
        for tid in tids - self.fds.keys():
            if _kept[0] + 2 > _kept[1]:
                self.close()
                self.kept = False
                return []
            try:
                status = os.open(f"{base}/{tid}/status", flags)
            except (FileNotFoundError, ProcessLookupError):
                continue  # ended meanwhile
            try:
                schedstat = os.open(f"{base}/{tid}/schedstat", flags)
            except (FileNotFoundError, ProcessLookupError):
                schedstat = -1  # ended meanwhile, or a kernel without schedstat
            self.fds[tid] = (status, schedstat)
            _kept[0] += 1 if schedstat < 0 else 2
            new.append(tid)
        return new

    def close(self) -> None:
        for tid in list(self.fds):
            self._drop(tid)


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


def ns_pids(pid: int) -> tuple[int, ...]:
    """The process's PID in each PID namespace it is in, the node's first and its own
    (a container's) last: the NSpid line of /proc/PID/status."""
    try:
        with open(f"{PROC}/{pid}/status", "rb") as f:
            status = f.read(16384)
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e
    for line in status.splitlines():
        if line.startswith(b"NSpid:"):
            try:
                return tuple(int(x) for x in line.split()[1:])
            except ValueError:
                break
    return (pid,)  # a kernel without NSpid (before 4.1): one namespace as far as it shows


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


def thread_blocked_in(pid: int, tid: int) -> tuple[int | None, str]:
    """(syscall number or None, kernel wait channel or "") of one thread: what it sits in now.

    The number is None while the thread runs or when the file cannot be read (it needs
    ptrace-read permission); the wait channel ("0" or empty while running) comes from
    /proc/PID/task/TID/wchan. Both are bounded single reads; never stops the target."""
    number: int | None = None
    wchan = ""
    base = f"{PROC}/{pid}/task/{tid}"
    try:
        with open(f"{base}/syscall", "rb") as f:
            head = f.read(256).split()
        if head and head[0] not in (b"running", b"-1"):
            number = int(head[0])
    except (OSError, ValueError):
        pass
    try:
        with open(f"{base}/wchan", "rb") as f:
            text = f.read(128).decode("ascii", "replace").strip()
        wchan = "" if text in ("", "0") else text
    except OSError:
        pass
    return number, wchan


def cgroup(pid: int, root: str | None = None) -> str:
    """The text of /proc/PID/cgroup (v1: a line per hierarchy; v2: `0::/path`); `root`:
    another procfs than PROC (kube.read_container_ref's proc_root)."""
    name = f"{root.rstrip('/')}/{pid}/cgroup" if root else path(pid, "cgroup")
    try:
        with open(name, errors="surrogateescape") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e


_proc_stat_fd = -1


def host_cpu_times() -> list[tuple[float, float]]:
    """Per CPU (busy seconds, total seconds) since boot. iowait counts as idle.

    From one pread of a kept /proc/stat fd; total is the sum of every field, as psutil's
    cpu_times(percpu=True) sums them (guest time included twice, as the kernel reports it).
    """
    global _proc_stat_fd
    if _proc_stat_fd < 0:
        _proc_stat_fd = os.open(f"{PROC}/stat", os.O_RDONLY | os.O_CLOEXEC)
    data = os.pread(_proc_stat_fd, 65536, 0)
    out = []
    for line in data.split(b"\n"):
        if not line.startswith(b"cpu") or line.startswith(b"cpu "):
            continue
        ticks = [int(x) for x in line.split()[1:11]]
        total = sum(ticks) / _CLK_TCK
        idle = (ticks[3] + (ticks[4] if len(ticks) > 4 else 0)) / _CLK_TCK
        out.append((total - idle, total))
    return out


PIDFILE_MAX_BYTES = 4096  # a pidfile holds a number and perhaps a line or two more


def read_pidfile(path: str) -> int | None:
    """PID from a pidfile, None when missing or malformed (normal: the service is down).

    The service writes the file, so it is hostile input: only a regular file, not through a
    symlink at its last component, opened without blocking, and only its first
    PIDFILE_MAX_BYTES read (targetfile.py). A FIFO, a device or a symlink counts as malformed.
    """
    try:
        head = targetfile.read_head(path, PIDFILE_MAX_BYTES)
        pid = int(head.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid > 0 else None


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
