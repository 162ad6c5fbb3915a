"""Interpreters the tests run, and the three ways they are started: on the host, under chroot,
and in a private mount namespace with pivot_root, as a container runtime starts them.

The Debian root filesystems come from tests/setup/rootfs.sh (cached outside the clone):
  sid       Debian unstable's python3.14 and python3.15, on glibc 2.4x
  bookworm  Debian 12's python3 (3.11), on glibc 2.36 like the host
pyenv's interpreters run in the bookworm root with pyenv's directory bind-mounted at the same
path, and one of them also in the sid root (a pyenv build on a glibc with the newer condvar).
"""
from __future__ import annotations

import os
import select
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import workloads

CACHE = Path(os.environ.get("GIL_EXPORTER_CACHE", "/var/cache/gil-exporter"))
SID = CACHE / "rootfs" / "debian-sid-python3.14-python3.15"
BOOKWORM = CACHE / "rootfs" / "debian-bookworm-python3"
LIBDIR = "usr/lib/x86_64-linux-gnu"
PLACEMENTS = ("host", "chroot", "pivot_root")


@dataclass(frozen=True)
class Interpreter:
    name: str                  # "3.14 Debian sid"
    version: str               # "3.14"
    rootfs: Path               # the Debian root it runs in (chroot, pivot_root)
    path: str                  # the interpreter's path inside that root
    binds: tuple = ()          # host directories bind-mounted at the same path inside the root

    def available(self) -> bool:
        return (self.rootfs / ".gil-exporter-rootfs").exists() and all(os.path.isdir(b) for b in self.binds)

    def host_argv(self) -> list[str]:
        """Run it in the host's own mount namespace and root. A sid binary needs sid's glibc,
        so it starts through sid's dynamic loader with sid's libraries."""
        if self.rootfs == BOOKWORM:
            return [self.path]        # the host is Debian 12: the same files
        inside = self.path if any(self.path.startswith(b + "/") for b in self.binds) else str(self.rootfs) + self.path
        return [str(self.rootfs / LIBDIR / "ld-linux-x86-64.so.2"), "--library-path",
                str(self.rootfs / LIBDIR), inside]


def interpreters() -> list[Interpreter]:
    found = []
    pyenv = workloads.pyenv_pythons()
    for version, exe in pyenv.items():
        root = str(Path(exe).resolve().parents[2])      # $(pyenv root)
        found.append(Interpreter(f"{version} pyenv", version, BOOKWORM, exe, (root,)))
    found.append(Interpreter("3.11 Debian bookworm", "3.11", BOOKWORM, "/usr/bin/python3"))
    found.append(Interpreter("3.14 Debian sid", "3.14", SID, "/usr/bin/python3.14"))
    found.append(Interpreter("3.15 Debian sid", "3.15", SID, "/usr/bin/python3.15"))
    if "3.12" in pyenv:
        exe = pyenv["3.12"]
        found.append(Interpreter("3.12 pyenv on sid's glibc", "3.12", SID, exe,
                                 (str(Path(exe).resolve().parents[2]),)))
    return found


def usual_placement(interp: Interpreter) -> str:
    """pyenv and bookworm builds on the host; sid's files in their own root, as a container."""
    return "host" if interp.rootfs == BOOKWORM else "pivot_root"


def require(interp: Interpreter) -> Interpreter:
    """`interp`, or skip the test when its root filesystem is not built here."""
    if not interp.available():
        import pytest
        pytest.skip(f"{interp.name}: root filesystem not built (tests/setup/rootfs.sh)")
    return interp


def _binds(interp: Interpreter) -> str:
    return "".join(f"mkdir -p {shlex.quote(str(interp.rootfs) + b)} && "
                   f"mount --bind {shlex.quote(b)} {shlex.quote(str(interp.rootfs) + b)} && "
                   for b in interp.binds)


def argv(interp: Interpreter, placement: str) -> list[str]:
    """The command that starts `interp` in `placement`; the workload's arguments follow it."""
    root = shlex.quote(str(interp.rootfs))
    if placement == "host":
        return interp.host_argv()
    if placement == "chroot":
        if not interp.binds:
            return ["chroot", str(interp.rootfs), interp.path]
        script = f"mount --make-rprivate / && {_binds(interp)}exec chroot {root} \"$@\""
    elif placement == "pivot_root":
        # as a container runtime: a private mount namespace whose root is the image's root,
        # with the old root unmounted (the target cannot see the host's files at all)
        script = (f"set -e; mount --make-rprivate /; mount --bind {root} {root}; {_binds(interp)}"
                  f"cd {root}; pivot_root . .oldroot; "
                  "exec /bin/sh -c 'mount -t proc proc /proc && umount -l /.oldroot && exec \"$@\"' "
                  "sh \"$@\"")
    else:
        raise ValueError(placement)
    return ["unshare", "--mount", "--fork", "--kill-child", "sh", "-c", script, "sh", interp.path]


@dataclass
class PlacedWorkload(workloads.Workload):
    placement: str = "host"
    target_pid: int = 0

    @property
    def pid(self) -> int:
        return self.target_pid

    def stop(self) -> None:
        if self.target_pid != self.proc.pid:
            workloads.kill_quietly(self.target_pid)     # unshare's child: ours, started above
        super().stop()


def _child(pid: int, timeout: float = 10.0) -> int:
    """The process that `unshare --fork` started (it execs into the interpreter)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise RuntimeError(f"unshare {pid} started no child")


def start(name: str, interp: Interpreter, placement: str, threads: int = 3,
          switch_interval: float | None = None, timeout: float = 30.0) -> PlacedWorkload:
    """Start workload `name` (tests/workloads.py) under `interp` in `placement`; wait until it runs."""
    code = workloads.script(name)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root",
           "WORKLOAD_THREADS": str(threads), "LC_ALL": "C.UTF-8"}
    if switch_interval is not None:
        env["WORKLOAD_SWITCH_INTERVAL"] = repr(switch_interval)
    cmd = argv(interp, placement) + ["-u", "-c", code, "gil-workload", name]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)     # never wait forever
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        proc.kill()
        err = proc.stderr.read()[-500:] if proc.stderr else ""
        raise RuntimeError(f"{name} under {interp.name} ({placement}) did not start: {line!r} {err}")
    proc.stderr.close()
    proc.stderr = None
    pid = _child(proc.pid) if cmd[0] == "unshare" else proc.pid
    return PlacedWorkload(name, proc, interp.path, placement=placement, target_pid=pid)
