"""What a target runs: the ELF that defines _PyRuntime, where it is loaded, the exact CPython
version, the build flags and the libc whose condvar layout the GIL uses.

Every file is the one the process actually mapped, never just whatever now sits at its path:
a package upgrade replaces libpython or the executable on disk while old processes keep
running the old build. Each candidate file is checked against the first page of the target's
own mapping before it is parsed (docs/gil-internals.md, "Which file").
"""
from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .. import procfs, targetfile
from . import elf
from .layouts import (
    _EXE_RE,
    _LIBPY_RE,
    DEBUG_COOKIE,
    CondvarLayout,
    condvar_for_glibc,
    detect_free_threaded,
    version_from_hex,
)
from .memory import MapEntry, open_mem, pread_exact, proc_error, read_maps
from .records import ProbeUnavailable, PythonIdentity

FUTEX_SYSCALL = {"x86_64": 202, "aarch64": 98}
_PYTHON_EXE_RE = re.compile(r"^python\d(\.\d+)?t?$")
_DELETED = " (deleted)"

_SYSVERSION_RE = re.compile(
    rb"(?<![0-9A-Za-z.])(\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?\+?) \([^\x00()]{1,80}\) [^\x00]{1,80}\x00")


def version_from_sys_version_buffer(data: bytes, major_minor: str = "") -> str:
    """Find the Py_GetVersion() buffer ("3.10.13 (main, ...) [GCC ...]") in a data segment."""
    found = {m.group(1).decode() for m in _SYSVERSION_RE.finditer(data)}
    if major_minor:
        found = {v for v in found if v.startswith(major_minor + ".")}
    return found.pop() if len(found) == 1 else ""


@dataclass(frozen=True)
class Target:
    identity: PythonIdentity
    elf: elf.ElfInfo
    base: int
    maps: tuple[MapEntry, ...]
    condvar: CondvarLayout | None     # None: a libc whose condvar we do not read


# --------------------------------------------------------------------------- which file

def mapped_file(pid: int, fd: int, mapping: MapEntry, exe_link: str = "") -> tuple[str, str]:
    """(host path, cache key) of the very file `pid` mapped at `mapping` (file offset 0).

    Candidates, best first: /proc/PID/map_files/START-END (the mapped file itself; needs
    CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE), /proc/PID/exe for the executable (ptrace-read
    access), the path inside the target's root (containers), the path as we see it (a chroot:
    maps already shows the chroot prefix), and that path less the chroot prefix inside the
    target's root. A candidate counts only if its first page equals the first page of the
    target's mapping. Raises ProbeUnavailable("binary_replaced") when none does, and
    ("not_regular_file") when the only candidates there are FIFOs, devices, directories or symlinks.
    """
    path = mapping.path[:-len(_DELETED)] if mapping.path.endswith(_DELETED) else mapping.path
    size = min(elf.HEAD_SIZE, mapping.end - mapping.start)
    mem_head = pread_exact(fd, size, mapping.start, pid)
    candidates = [procfs.path(pid, "map_files", f"{mapping.start:x}-{mapping.end:x}")]
    exe_path = exe_link[:-len(_DELETED)] if exe_link.endswith(_DELETED) else exe_link
    if exe_path and exe_path == path:
        candidates.append(procfs.path(pid, "exe"))
    if not mapping.path.endswith(_DELETED):
        candidates += [procfs.path(pid, "root") + path, path]
        # A chroot: maps shows the path from our root, prefix included; inside the target's
        # root (a bind mount only its mount namespace has, say) it is the path without it.
        try:
            root = procfs.readlink(pid, "root")
        except OSError:
            root = "/"
        if root != "/" and path.startswith(root.rstrip("/") + "/"):
            candidates.append(procfs.path(pid, "root") + path[len(root.rstrip('/')):])
    # The kernel's magic links are followed; every other candidate is a path the target
    # controls, so it is never followed at its last component, and never opened unless it is
    # a regular file (a FIFO there would block the open for good).
    differed, special = [], []
    for cand in candidates:
        try:
            head = targetfile.read_head(cand, size, follow_symlinks=procfs.is_magic_link(cand))
        except targetfile.NotRegularFile as exc:
            special.append(f"{cand} is {exc.kind}")
            continue
        except OSError:
            continue
        if len(head) >= 64 and mem_head[:len(head)] == head:
            return cand, elf.head_key(head)
        differed.append(cand)
    if special and not differed:
        raise ProbeUnavailable(
            "not_regular_file",
            f"pid {pid} maps {path}, but no regular file with its contents is there: "
            f"{'; '.join(special)}"[:300])
    if mapping.path.endswith(_DELETED) or differed:
        raise ProbeUnavailable(
            "binary_replaced",
            f"pid {pid} runs {path} (inode {mapping.inode}), which was "
            f"{'deleted' if mapping.path.endswith(_DELETED) else 'replaced'} on disk; the mapped "
            f"file itself is only reachable through {procfs.path(pid, 'map_files')} (CAP_SYS_ADMIN)")
    raise ProbeUnavailable("not_elf", f"pid {pid}: {path} cannot be opened")


# --------------------------------------------------------------------------- libc

def _libc_mapping(maps: Sequence[MapEntry]) -> tuple[str, MapEntry | None]:
    """("glibc" | "musl" | "unknown", the libc's mapping at file offset 0)."""
    for m in maps:
        name = os.path.basename(m.path.replace(_DELETED, ""))
        if name.startswith("ld-musl") or name.startswith("libc.musl"):
            return "musl", None
    for m in maps:
        name = os.path.basename(m.path.replace(_DELETED, ""))
        if m.offset == 0 and (name.startswith("libc.so.6") or re.match(r"libc-2\.\d+\.so", name)):
            return "glibc", m
    return "unknown", None


def _glibc_condvar(pid: int, fd: int, mapping: MapEntry) -> tuple[str, CondvarLayout | None]:
    """glibc's version and condvar layout, from the version nodes of the libc in the target's
    memory (the one it runs, even if an upgrade replaced the file)."""
    def read(addr: int, size: int) -> bytes:
        return pread_exact(fd, size, addr, pid)
    try:
        minor = elf.glibc_minor(elf.version_definitions(read, mapping.start))
    except (elf.NotElf, struct.error) as exc:
        raise ProbeUnavailable("unknown_layout", f"pid {pid}: libc image unreadable: {exc}") from exc
    except ProbeUnavailable as exc:
        if exc.reason != "validation_failed":
            raise
        raise ProbeUnavailable("unknown_layout", f"pid {pid}: libc image unreadable: {exc.detail}") from exc
    if minor is None:
        return "", None
    return f"2.{minor}", condvar_for_glibc(minor)


# --------------------------------------------------------------------------- identify

def identify_target(pid: int) -> Target:
    maps = read_maps(pid)
    try:
        exe = procfs.readlink(pid, "exe")
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise proc_error(exc, pid) from exc
        exe = ""
    fd = open_mem(pid)
    try:
        return _identify(pid, fd, maps, exe)
    finally:
        os.close(fd)


def _candidates(maps: list[MapEntry], exe: str) -> tuple[dict[str, MapEntry], list[str], bool]:
    """(each file's mapping at file offset 0, the ELF files to look for _PyRuntime in, in
    order, whether the process looks like a Python at all)."""
    # The mapping at file offset 0: where a file's ELF header (and load base) is.
    first_map: dict[str, MapEntry] = {}
    for m in maps:
        if m.path.startswith("/") and m.offset == 0 and m.path not in first_map:
            first_map[m.path] = m
    # Candidate ELF files: libpython first (--enable-shared), then the executable, then a
    # mapped python executable that is not /proc/PID/exe (started through ld.so explicitly).
    cands = [p for p in first_map if _LIBPY_RE.search(os.path.basename(p))]
    exe_path = exe if exe in first_map else next(
        (p for p in first_map if exe and p.replace(_DELETED, "") == exe.replace(_DELETED, "")), "")
    if exe_path and exe_path not in cands:
        cands.append(exe_path)
    cands += [p for p in first_map if p not in cands
              and _PYTHON_EXE_RE.search(os.path.basename(p.replace(_DELETED, "")))]
    looks_python = any(_LIBPY_RE.search(os.path.basename(p)) for p in first_map) or bool(
        exe and re.search(r"python", os.path.basename(exe)))
    return first_map, cands, looks_python


def _identify(pid: int, fd: int, maps: list[MapEntry], exe: str) -> Target:
    first_map, cands, looks_python = _candidates(maps, exe)
    errors: list[str] = []
    infos = []
    chosen = None
    replaced: ProbeUnavailable | None = None
    for path in cands:
        m = first_map[path]
        try:
            host, key = mapped_file(pid, fd, m, exe)
            info = elf.load(host, key, follow_symlinks=procfs.is_magic_link(host))
        except ProbeUnavailable as exc:
            if exc.reason in ("binary_replaced", "not_regular_file"):
                replaced = replaced or exc
                continue
            if exc.reason != "not_elf":
                raise
            errors.append(exc.detail)
            continue
        except elf.NotElf as exc:
            errors.append(str(exc))
            continue
        infos.append(info)
        if info.runtime is not None:
            chosen = (path, info, m)
            break
    libc, libc_map = _libc_mapping(maps)
    if libc == "unknown" and any(i.interp and "ld-musl" in i.interp for i in infos):
        libc = "musl"
    if chosen is None:
        if replaced is not None:
            raise replaced
        if not infos and errors:
            raise ProbeUnavailable("not_elf", "; ".join(errors)[:300])
        if not looks_python:
            raise ProbeUnavailable("not_cpython", f"pid {pid} ({exe or '?'}) maps no libpython")
        raise ProbeUnavailable("no_runtime_symbol", f"pid {pid}: no defined _PyRuntime in {cands}")
    path, info, m = chosen
    if info.elfclass != 64 or info.machine not in FUTEX_SYSCALL:
        raise ProbeUnavailable("unsupported_arch", f"{path}: {info.machine} ELF{info.elfclass}")
    # Load base: the mapping at file offset 0, less the first PT_LOAD's page-aligned vaddr.
    base = m.start - (info.first_load_vaddr & ~0xFFF)
    runtime_address = base + info.runtime[0]
    version, debug_ft = _read_version(pid, fd, info, base, runtime_address, path)
    free_threaded = detect_free_threaded(path, info.soname, debug_ft)
    libc_version, condvar = "", None
    if libc_map is not None:
        libc_version, condvar = _glibc_condvar(pid, fd, libc_map)
    ident = PythonIdentity("cpython", version, free_threaded, path.replace(_DELETED, ""),
                           runtime_address, libc, libc_version)
    return Target(ident, info, base, tuple(maps), condvar)


def _read_version(pid: int, fd: int, info: elf.ElfInfo, base: int, runtime_address: int,
                  path: str) -> tuple[str, int | None]:
    """Exact version from the target's memory; also _Py_DebugOffsets.free_threaded if present."""
    m = _LIBPY_RE.search(os.path.basename(info.soname or path)) or _EXE_RE.search(
        os.path.basename(path.replace(_DELETED, "")))
    soname_mm = f"{m.group(1)}.{m.group(2)}" if m and m.group(1) and m.group(2) else ""
    head = pread_exact(fd, 24, runtime_address, pid)
    if head[:8] == DEBUG_COOKIE:
        hexv, ft = struct.unpack_from("<QQ", head, 8)
        try:
            return version_from_hex(hexv), ft
        except ValueError:
            pass
    if info.py_version:
        hexv, = struct.unpack("<Q", pread_exact(fd, 8, base + info.py_version, pid))
        try:
            return version_from_hex(hexv & 0xFFFFFFFF), None
        except ValueError:
            pass
    # 3.8-3.10: sys.version was formatted by Py_GetVersion() into a static buffer
    # in the library's data segment; find it there.
    for vaddr, memsz in info.rw_segments:
        if memsz > 64 << 20:
            continue
        try:
            data = pread_exact(fd, memsz, base + vaddr, pid)
        except ProbeUnavailable as exc:
            if exc.reason != "validation_failed":
                raise
            continue
        v = version_from_sys_version_buffer(data, soname_mm)
        if v:
            return v, None
    return soname_mm, None


def identify(pid: int) -> PythonIdentity:
    """What the target is, read from the target. Raises ProbeUnavailable."""
    return identify_target(pid).identity
