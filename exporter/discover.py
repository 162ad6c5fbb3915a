"""Discover: which running processes belong to which configured target.

A process is identified by (pid, start_time), so a reused PID is a new process.
The first target whose matchers all hold claims a process (as in
process-exporter), so a process is never counted twice.

A scan reads the full ProcessInfo (psutil: a dozen reads, a passwd lookup) only for a PID it
has not seen with the same identity marks (stat, cmdline, owner: three small reads). A PID
seen before costs one stat() of /proc/PID per scan, which tells a reused PID (new inode) or
a change of user; its identity marks, which tell an exec, a rewritten argv or a rename, are
read every FULL_EVERY scans. Matching itself is redone at every scan (pidfiles and cgroups
move).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from exporter import procfs
from exporter.config import Config, Match, Target

log = logging.getLogger(__name__)

# Interpreter executables: python, python3, python3.12, python3.13t, pypy3 is not CPython.
_PYTHON_EXE = re.compile(r"(^|/)python[0-9.]*t?$")
_LIBPYTHON = re.compile(r"/libpython[0-9.]+t?\.so")


@dataclass(frozen=True)
class Candidate:
    target: str
    info: procfs.ProcessInfo

    @property
    def key(self) -> tuple[int, float]:
        return (self.info.pid, self.info.start_time)


@dataclass(frozen=True)
class ScanResult:
    candidates: tuple[Candidate, ...]
    dropped: dict = field(default_factory=dict)  # target -> processes left out by the per-target cap


def is_cpython(info: procfs.ProcessInfo) -> bool:
    """A CPython interpreter, or a program that embeds libpython (uwsgi, ...)."""
    if _PYTHON_EXE.search(info.exe):
        return True
    try:
        return any(_LIBPYTHON.search(m.path) for m in procfs.maps(info.pid))
    except (procfs.ProcessGone, PermissionError):
        pass
    # Without ptrace-read access (another user's process, exporter not privileged) exe and
    # maps are unreadable; argv[0] and comm are not, and still name the interpreter.
    if not info.exe:
        argv0 = info.cmdline[0] if info.cmdline else ""
        return bool(_PYTHON_EXE.search(argv0) or _PYTHON_EXE.search(info.comm))
    return False


def _cgroup_matches(pid: int, pattern: re.Pattern) -> bool:
    try:
        return pattern.search(procfs.cgroup(pid)) is not None
    except (procfs.ProcessGone, PermissionError):
        return False


FULL_EVERY = 6  # scans between two readings of a known PID's identity marks


class _Seen:
    """What a scan learnt about one PID, valid while its identity marks stay the same."""

    __slots__ = ("marks", "info", "python", "quick", "checked")

    def __init__(self, marks: tuple, info: procfs.ProcessInfo | None):
        self.marks = marks
        self.info = info                    # None: a kernel thread or zombie (nothing to match)
        self.python: bool | None = None     # is_cpython(info), once asked (reads maps)
        self.quick: tuple = ()              # procfs.quick_marks at the last scan
        self.checked = 0                    # scan at which the marks were last read


class Discoverer:
    def __init__(self, config: Config):
        self.config = config
        self._self_pid = os.getpid()
        self._seen: dict[int, _Seen] = {}   # pid -> what the last scans read
        self._scans = 0

    def _is_python(self, info: procfs.ProcessInfo) -> bool:
        seen = self._seen.get(info.pid)
        if seen is None or seen.info is not info:
            return is_cpython(info)
        if seen.python is None:
            seen.python = is_cpython(info)
        return seen.python

    def _info(self, pid: int) -> procfs.ProcessInfo | None:
        """The process's info, read again only when its identity marks changed; None to skip."""
        quick = procfs.quick_marks(pid)
        seen = self._seen.get(pid)
        if seen is not None and seen.quick == quick and self._scans - seen.checked < FULL_EVERY:
            return seen.info
        marks = procfs.identity_marks(pid)
        if seen is None or seen.marks != marks:
            info = procfs.process_info(pid)
            if not info.exe and not info.cmdline:
                info = None  # kernel thread or zombie
            seen = self._seen[pid] = _Seen(marks, info)
            seen.checked = self._scans - pid % FULL_EVERY  # spread the next readings over scans
        else:
            seen.checked = self._scans
        seen.quick = quick
        return seen.info

    def matches(self, match: Match, info: procfs.ProcessInfo, pidfile_pids: dict[str, int | None]) -> bool:
        if match.pid is not None and info.pid != match.pid:
            return False
        if match.pidfile is not None and pidfile_pids.get(match.pidfile) != info.pid:
            return False
        if match.comm is not None and info.comm != match.comm:
            return False
        if match.user is not None and match.user not in (info.user, str(info.uid)):
            return False
        if match.exe is not None and not match.exe.search(info.exe):
            return False
        if match.cmdline is not None and not match.cmdline.search(" ".join(info.cmdline)):
            return False
        if match.cgroup is not None and not _cgroup_matches(info.pid, match.cgroup):
            return False
        if match.python and not self._is_python(info):
            return False
        return True

    def scan(self) -> ScanResult:
        self._scans += 1
        targets: tuple[Target, ...] = self.config.targets
        pidfile_pids = {t.match.pidfile: procfs.read_pidfile(t.match.pidfile)
                        for t in targets if t.match.pidfile is not None}
        wanted_pids = self._restricting_pids(targets, pidfile_pids)
        pids = procfs.pids() if wanted_pids is None else sorted(wanted_pids)
        found: dict[str, list[Candidate]] = {t.name: [] for t in targets}
        present: set[int] = set()
        for pid in pids:
            if pid == self._self_pid:
                continue
            try:
                info = self._info(pid)
            except (procfs.ProcessGone, PermissionError):
                continue
            present.add(pid)
            if info is None:
                continue
            for target in targets:
                if self.matches(target.match, info, pidfile_pids):
                    found[target.name].append(Candidate(target.name, info))
                    break
        self._seen = {pid: seen for pid, seen in self._seen.items() if pid in present}
        limits = self.config.limits
        out: list[Candidate] = []
        dropped: dict[str, int] = {}
        for name, cands in found.items():
            cands.sort(key=lambda c: (c.info.start_time, c.info.pid))  # oldest first: stable under churn
            keep = cands[:limits.max_processes_per_target]
            room = max(0, limits.max_targets - len(out))  # the cap on processes of all targets together
            keep = keep[:room]
            if len(cands) > len(keep):
                dropped[name] = len(cands) - len(keep)
            out.extend(keep)
        return ScanResult(tuple(out), dropped)

    @staticmethod
    def _restricting_pids(targets, pidfile_pids) -> set[int] | None:
        """When every target names its pid or pidfile, read only those processes."""
        pids: set[int] = set()
        for t in targets:
            if t.match.pid is not None:
                pids.add(t.match.pid)
            elif t.match.pidfile is not None:
                p = pidfile_pids.get(t.match.pidfile)
                if p is not None:
                    pids.add(p)
            else:
                return None
        return pids
