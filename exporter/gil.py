"""Locate and read the GIL of another CPython process, from outside.

Everything here reads the target with ``os.pread`` on ``/proc/PID/mem`` (and a
few ``/proc/PID/*`` text files). Nothing attaches with ptrace, writes to the
target or pauses it. See /work/shared/GIL-INTERNALS.md for the facts used.

Pipeline:

* :func:`identify` finds the ELF file (libpython or the executable) that
  defines ``_PyRuntime`` through its dynamic symbol table (pyelftools), the
  load base from /proc/PID/maps, and reads the exact version from the target.
* :func:`locate` finds the address of ``struct _gil_runtime_state`` —
  3.13+: from ``_Py_DebugOffsets`` at the start of ``_PyRuntime``; older: a
  table of known offsets, then a search of the ``_PyRuntime`` region. Every
  candidate is validated against the live process before it is returned.
* :class:`GilReader` keeps /proc/PID/mem open and reads the struct with one
  ``os.pread`` per sample.
"""
from __future__ import annotations

import bisect
import errno
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from exporter import procfs

__all__ = [
    "ProbeUnavailable", "PythonIdentity", "GilLayout", "GilLocation", "GilReading",
    "identify", "locate", "GilReader", "futex_waiters", "LAYOUTS", "KNOWN_GIL_OFFSETS",
    "DEBUG_OFFSETS_LAYOUTS", "parse_debug_offsets", "detect_free_threaded",
    "version_from_hex",
]


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


@dataclass(frozen=True)
class GilLayout:
    """Offsets inside ``struct _gil_runtime_state`` (LP64)."""
    interval: int
    last_holder: int
    locked: int
    switch_number: int
    cond_wrefs: int          # glibc pthread_cond_t.__wrefs (waiter count << 3)

    @property
    def read_size(self) -> int:
        return self.cond_wrefs + 4

    @property
    def cond(self) -> int:
        """Start of the pthread_cond_t (``__wrefs`` is at cond+36 in glibc >= 2.25)."""
        return self.cond_wrefs - 36

    @property
    def mutex(self) -> int:
        """Start of the pthread_mutex_t that follows the 48-byte condvar."""
        return self.cond + 48


@dataclass(frozen=True)
class GilLocation:
    pid: int
    address: int
    layout: GilLayout
    identity: PythonIdentity
    method: str              # "debug_offsets" | "offset_table" | "search"
    runtime_size: int = 0    # st_size of _PyRuntime (for re-validation)


@dataclass(frozen=True)
class GilReading:
    interval_us: int
    locked: bool
    switch_number: int
    waiters: int
    holder: int


# --------------------------------------------------------------------------- data tables

# struct _gil_runtime_state, LP64. Keyed by free-threaded flag: the free-threaded build
# puts ``int enabled`` first and moves every field by 8 (listed for completeness; we
# refuse free-threaded targets because their GIL is normally disabled).
LAYOUTS: Dict[bool, GilLayout] = {
    False: GilLayout(interval=0, last_holder=8, locked=16, switch_number=24, cond_wrefs=32 + 36),
    True: GilLayout(interval=8, last_holder=16, locked=24, switch_number=32, cond_wrefs=40 + 36),
}

# Offset of the main GIL inside _PyRuntime, as measured on the pyenv builds here
# (GIL-INTERNALS.md). Only a first guess: it is always validated, and a search follows
# when validation fails. Keys: "major.minor" or an exact "major.minor.micro" override.
KNOWN_GIL_OFFSETS: Dict[str, int] = {
    "3.8": 1152,
    "3.9": 352,
    "3.10": 352,
    "3.11": 360,
    "3.12": 77432,
    "3.12.1": 77432,
    "3.13": 96104,
    "3.13.0": 96104,
}

# Byte offsets of the fields we use inside _Py_DebugOffsets, per minor version.
# 3.13: Include/internal/pycore_runtime.h; 3.14: Include/internal/pycore_debug_offsets.h
# (3.14.0 adds interpreter_state.threads_main before gc, shifting the GIL fields by 8;
# 3.14 alphas without it give a layout that layout_from_debug_offsets() or the live
# validation rejects, and locate() falls back to the search).
_DEBUG_OFFSETS_313: Dict[str, int] = {
    "version": 8, "free_threaded": 16,
    "runtime_state.size": 24, "runtime_state.interpreters_head": 40,
    "interpreter_state.size": 48, "interpreter_state.next": 64,
    "interpreter_state.threads_head": 72,
    "interpreter_state.ceval_gil": 112, "interpreter_state.gil_runtime_state": 120,
    "interpreter_state.gil_runtime_state_enabled": 128,
    "interpreter_state.gil_runtime_state_locked": 136,
    "interpreter_state.gil_runtime_state_holder": 144,
    "thread_state.next": 168, "thread_state.interp": 176,
    "_end": 184,
}
DEBUG_OFFSETS_LAYOUTS: Dict[Tuple[int, int], Dict[str, int]] = {
    (3, 13): _DEBUG_OFFSETS_313,
    # 3.14: the same fields, from the GIL's on 8 bytes later (threads_main came before gc).
    (3, 14): {**_DEBUG_OFFSETS_313,
              "interpreter_state.ceval_gil": 120, "interpreter_state.gil_runtime_state": 128,
              "interpreter_state.gil_runtime_state_enabled": 136,
              "interpreter_state.gil_runtime_state_locked": 144,
              "interpreter_state.gil_runtime_state_holder": 152,
              "thread_state.next": 192, "thread_state.interp": 200,
              "_end": 208},
}
DEBUG_COOKIE = b"xdebugpy"

# PyThreadState: prev, next, interp are the first three pointers in 3.8 .. 3.14.
TSTATE_INTERP_OFFSET = 16

FUTEX_SYSCALL = {"x86_64": 202, "aarch64": 98}
EM_SUPPORTED = {"EM_X86_64": "x86_64", "EM_AARCH64": "aarch64"}

# Plausible switch interval in microseconds. CPython stores (unsigned long)(1e6 * s), so
# sys.setswitchinterval(1e-7) stores 0 (take_gil then waits 1 us): 0 is legal once a GIL
# is located, and the reader and sampler accept it. Locating wants [1 us, 1 h]: a zero word
# is the commonest junk in static memory (measured: with 0 allowed, wrong table offsets on
# 3.8-3.10 pass validation), while real intervals, default or set by the target, lie in it.
# A target that set an interval below 1 us before we first saw it gets validation_failed
# and the procfs score: honest, never a guess.
INTERVAL_MIN_US = 0
LOCATE_INTERVAL_MIN_US = 1
INTERVAL_MAX_US = 3_600_000_000

_LIBPY_RE = re.compile(r"libpython(\d+)\.(\d+)([a-z]*)\.so")
_EXE_RE = re.compile(r"python(\d+)?(?:\.(\d+))?([a-z]*)$")


# --------------------------------------------------------------------------- parsers on data

def version_from_hex(hexversion: int) -> str:
    """PY_VERSION_HEX -> "3.11.7" / "3.13.0rc1" (sys.version spelling)."""
    major = (hexversion >> 24) & 0xFF
    minor = (hexversion >> 16) & 0xFF
    micro = (hexversion >> 8) & 0xFF
    level = (hexversion >> 4) & 0xF
    serial = hexversion & 0xF
    base = f"{major}.{minor}.{micro}"
    if level == 0xF:
        return base
    tag = {0xA: "a", 0xB: "b", 0xC: "rc"}.get(level)
    if tag is None:
        raise ValueError(f"bad release level in {hexversion:#x}")
    return f"{base}{tag}{serial}"


def parse_debug_offsets(data: bytes, minor_version: Optional[Tuple[int, int]] = None) -> Dict[str, int]:
    """Parse the fields we need from the bytes at the start of _PyRuntime.

    Raises ValueError if the cookie is missing or the layout is unknown.
    """
    if len(data) < 24 or data[:8] != DEBUG_COOKIE:
        raise ValueError("no _Py_DebugOffsets cookie")
    hexversion, = struct.unpack_from("<Q", data, 8)
    key = ((hexversion >> 24) & 0xFF, (hexversion >> 16) & 0xFF)
    if minor_version is not None and key != tuple(minor_version):
        raise ValueError(f"debug offsets version {key} != binary version {minor_version}")
    table = DEBUG_OFFSETS_LAYOUTS.get(key)
    if table is None:
        raise ValueError(f"unknown _Py_DebugOffsets layout for {key[0]}.{key[1]}")
    if len(data) < table["_end"]:
        raise ValueError("truncated _Py_DebugOffsets")
    out = {name: struct.unpack_from("<Q", data, off)[0]
           for name, off in table.items() if not name.startswith("_")}
    out["version"] = hexversion
    return out


def layout_from_debug_offsets(offs: Dict[str, int]) -> GilLayout:
    """GIL field offsets relative to the GIL struct, from parsed debug offsets."""
    gil = offs["interpreter_state.gil_runtime_state"]
    locked = offs["interpreter_state.gil_runtime_state_locked"] - gil
    holder = offs["interpreter_state.gil_runtime_state_holder"] - gil
    # No offsets are published for interval and switch_number: in the LP64 layout
    # interval precedes last_holder and switch_number follows locked (+padding).
    switch_number = locked + 8
    layout = GilLayout(interval=holder - 8, last_holder=holder, locked=locked,
                       switch_number=switch_number, cond_wrefs=switch_number + 8 + 36)
    if layout not in LAYOUTS.values():
        raise ValueError(f"debug offsets give an unexpected GIL layout {layout}")
    return layout


def detect_free_threaded(binary_path: str = "", soname: str = "",
                         debug_free_threaded: Optional[int] = None,
                         abiflags: str = "") -> bool:
    """True for a Py_GIL_DISABLED build.

    Evidence, strongest first: _Py_DebugOffsets.free_threaded (3.13+), the "t" ABI flag
    in the library soname (libpython3.13t.so) or the executable name (python3.13t).
    """
    if debug_free_threaded is not None:
        return bool(debug_free_threaded)
    if "t" in abiflags:
        return True
    for name in (soname, os.path.basename(binary_path)):
        if not name:
            continue
        m = _LIBPY_RE.search(name)
        if m:
            return "t" in m.group(3)
        m = _EXE_RE.search(name)
        if m and m.group(2):
            return "t" in m.group(3)
    return False


_SYSVERSION_RE = re.compile(
    rb"(?<![0-9A-Za-z.])(\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?\+?) \([^\x00()]{1,80}\) [^\x00]{1,80}\x00")


def version_from_sys_version_buffer(data: bytes, major_minor: str = "") -> str:
    """Find the Py_GetVersion() buffer ("3.10.13 (main, ...) [GCC ...]") in a data segment."""
    found = {m.group(1).decode() for m in _SYSVERSION_RE.finditer(data)}
    if major_minor:
        found = {v for v in found if v.startswith(major_minor + ".")}
    return found.pop() if len(found) == 1 else ""


# --------------------------------------------------------------------------- /proc helpers

_Map = procfs.MapEntry


def _proc_error(exc: OSError, pid: int) -> ProbeUnavailable:
    if isinstance(exc, PermissionError) or exc.errno in (errno.EPERM, errno.EACCES):
        return ProbeUnavailable("permission_denied", f"pid {pid}: {exc}")
    if isinstance(exc, (FileNotFoundError, ProcessLookupError)) or exc.errno in (errno.ESRCH, errno.ENOENT):
        return ProbeUnavailable("exited", f"pid {pid}: {exc}")
    return ProbeUnavailable("exited" if not os.path.exists(f"/proc/{pid}") else "validation_failed",
                            f"pid {pid}: {exc}")


def _read_maps(pid: int) -> List[_Map]:
    try:
        maps = procfs.maps(pid)
    except procfs.ProcessGone as exc:
        raise ProbeUnavailable("exited", f"pid {pid}") from exc
    except OSError as exc:
        raise _proc_error(exc, pid) from exc
    if not maps:
        # Zombies (exited, not reaped) and kernel threads have no mappings.
        state = procfs.process_state(pid)
        raise ProbeUnavailable("exited" if state in ("Z", "X", "") else "not_cpython",
                               f"pid {pid} has no memory mappings (state {state or '?'})")
    return maps


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (clock ticks since boot): identifies a process across PID reuse."""
    try:
        return procfs.start_time(pid)
    except procfs.ProcessGone as exc:
        raise ProbeUnavailable("exited", f"pid {pid}") from exc
    except OSError as exc:
        raise _proc_error(exc, pid) from exc


class _WritableRanges:
    """Sorted writable mappings, for 'is this a heap/data pointer' checks."""

    def __init__(self, maps: Sequence[_Map]) -> None:
        spans = sorted((m.start, m.end) for m in maps if m.perms[:2] == "rw")
        self._starts = [s for s, _ in spans]
        self._ends = [e for _, e in spans]

    def __contains__(self, addr: int) -> bool:
        i = bisect.bisect_right(self._starts, addr) - 1
        return i >= 0 and addr < self._ends[i]


def _open_mem(pid: int) -> int:
    try:
        return os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _proc_error(exc, pid) from exc


def _pread_exact(fd: int, size: int, addr: int, pid: int) -> bytes:
    try:
        data = os.pread(fd, size, addr)
    except OSError as exc:
        if exc.errno == errno.EIO:       # unmapped address
            raise ProbeUnavailable("validation_failed", f"pid {pid}: {addr:#x} not readable") from exc
        raise _proc_error(exc, pid) from exc
    if len(data) != size:
        # The mm is gone (exit): reads return 0 bytes.
        if not data:
            raise ProbeUnavailable("exited", f"pid {pid}: memory no longer readable")
        raise ProbeUnavailable("validation_failed", f"pid {pid}: short read at {addr:#x}")
    return data


def _host_arch() -> str:
    m = os.uname().machine
    return {"arm64": "aarch64"}.get(m, m)


def futex_waiters(pid: int, gil_address: int, layout: Optional[GilLayout] = None) -> int:
    """Threads of `pid` blocked in futex() on the GIL's condvar words (from /proc/PID/task/*/syscall).

    Needs the same permission as /proc/PID/mem, never stops the target.
    """
    layout = layout or LAYOUTS[False]
    nr = FUTEX_SYSCALL.get(_host_arch())
    if nr is None:
        raise ProbeUnavailable("unsupported_arch", _host_arch())
    lo = gil_address + layout.cond
    hi = lo + 48
    try:
        calls = procfs.task_syscalls(pid)
    except procfs.ProcessGone as exc:
        raise ProbeUnavailable("exited", f"pid {pid}") from exc
    except OSError as exc:
        raise _proc_error(exc, pid) from exc
    count = 0
    for call in calls.values():
        if call[0] == nr and len(call) > 1 and lo <= call[1] < hi:
            count += 1
    return count


def _task_ids(pid: int) -> List[int]:
    try:
        return procfs.task_ids(pid)
    except procfs.ProcessGone as exc:
        raise ProbeUnavailable("exited", f"pid {pid}") from exc
    except OSError as exc:
        raise _proc_error(exc, pid) from exc


# --------------------------------------------------------------------------- ELF

@dataclass(frozen=True)
class _ElfInfo:
    machine: str             # "x86_64" | "aarch64" | other e_machine
    elfclass: int
    first_load_vaddr: int
    rw_segments: Tuple[Tuple[int, int], ...]   # (vaddr, memsz) of writable PT_LOADs
    runtime: Optional[Tuple[int, int]]         # (st_value, st_size) of defined _PyRuntime
    py_version: Optional[int]                  # st_value of Py_Version (3.11+)
    soname: str
    interp: str                                # PT_INTERP (ld-musl-... on musl)
    build_id: str


_elf_cache: Dict[Tuple[str, str], _ElfInfo] = {}
_elf_stat_cache: Dict[Tuple[str, int, int, int, int], _ElfInfo] = {}
_elf_lock = threading.Lock()


class _NotElf(Exception):
    pass


def _load_elf(host_path: str, target_path: str) -> _ElfInfo:
    """Parse what we need from an ELF file. Cached per (target path, build id).

    Raises _NotElf for anything pyelftools cannot parse (not ELF, truncated, corrupt).
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        st = os.stat(host_path)
    except OSError as exc:
        raise _NotElf(f"{host_path}: {exc}") from exc
    skey = (target_path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _elf_lock:
        hit = _elf_stat_cache.get(skey)
    if hit is not None:
        return hit
    try:
        with open(host_path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise _NotElf(f"{host_path}: not an ELF file")
            f.seek(0)
            elf = ELFFile(f)
            build_id = ""
            loads = []
            interp = ""
            for seg in elf.iter_segments():
                ptype = seg["p_type"]
                if ptype == "PT_LOAD":
                    loads.append(seg)
                elif ptype == "PT_NOTE":
                    for note in seg.iter_notes():
                        if note["n_type"] == "NT_GNU_BUILD_ID":
                            build_id = str(note["n_desc"])
                elif ptype == "PT_INTERP":
                    interp = seg.get_interp_name()
            with _elf_lock:
                cached = _elf_cache.get((target_path, build_id)) if build_id else None
            if cached is not None:
                with _elf_lock:
                    _elf_stat_cache[skey] = cached
                return cached
            if not loads:
                raise _NotElf(f"{host_path}: no PT_LOAD segment")
            runtime = None
            py_version = None
            soname = ""
            symtab = elf.get_section_by_name(".dynsym")
            if symtab is None:
                for seg in elf.iter_segments():
                    if seg["p_type"] == "PT_DYNAMIC":
                        symtab = seg
                        break
            if symtab is not None:
                for sym in symtab.iter_symbols():
                    name = sym.name
                    if name == "_PyRuntime":
                        if sym["st_shndx"] != "SHN_UNDEF" and sym["st_value"]:
                            runtime = (sym["st_value"], sym["st_size"])
                    elif name == "Py_Version":
                        if sym["st_shndx"] != "SHN_UNDEF" and sym["st_value"]:
                            py_version = sym["st_value"]
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_DYNAMIC":
                    for tag in seg.iter_tags():
                        if tag.entry.d_tag == "DT_SONAME":
                            soname = tag.soname
                    break
            info = _ElfInfo(
                machine=EM_SUPPORTED.get(elf["e_machine"], str(elf["e_machine"])),
                elfclass=elf.elfclass,
                first_load_vaddr=min(s["p_vaddr"] for s in loads),
                rw_segments=tuple((s["p_vaddr"], s["p_memsz"]) for s in loads if s["p_flags"] & 2),
                runtime=runtime, py_version=py_version, soname=soname, interp=interp,
                build_id=build_id)
    except _NotElf:
        raise
    except (ELFError, OSError, ValueError, KeyError, IndexError, AttributeError,
            AssertionError, UnicodeDecodeError, struct.error, TypeError) as exc:
        raise _NotElf(f"{host_path}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # construct's own exceptions for truncated files
        raise _NotElf(f"{host_path}: {type(exc).__name__}: {exc}") from exc
    with _elf_lock:
        if build_id:
            _elf_cache[(target_path, build_id)] = info
        _elf_stat_cache[skey] = info
    return info


def clear_elf_cache() -> None:
    with _elf_lock:
        _elf_cache.clear()
        _elf_stat_cache.clear()


def _host_path(pid: int, target_path: str, m: Optional[_Map] = None) -> str:
    """Open the target's file from its own mount namespace (/proc/PID/root/...)."""
    path = target_path
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
        if m is not None:  # the file on disk was replaced: the mapped one is still here
            mf = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
            if os.path.exists(mf):
                return mf
    return f"/proc/{pid}/root{path}"


# --------------------------------------------------------------------------- identify

def _detect_libc(maps: Sequence[_Map], interps: Sequence[str]) -> str:
    names = {os.path.basename(m.path) for m in maps if m.path.startswith("/")}
    names.update(os.path.basename(i) for i in interps if i)
    if any(n.startswith("ld-musl") or n.startswith("libc.musl") for n in names):
        return "musl"
    if any(n.startswith("libc.so.6") or re.match(r"libc-2\.\d+\.so", n) or n.startswith("ld-linux") for n in names):
        return "glibc"
    return "unknown"


@dataclass(frozen=True)
class _Target:
    identity: PythonIdentity
    elf: _ElfInfo
    base: int
    maps: Tuple[_Map, ...]


def _identify(pid: int) -> _Target:
    maps = _read_maps(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise _proc_error(exc, pid) from exc
        exe = ""
    # Candidate ELF files: libpython first (--enable-shared), then the executable.
    first_map: Dict[str, _Map] = {}
    for m in maps:
        if m.path.startswith("/") and m.path not in first_map:
            first_map[m.path] = m
    cands = [p for p in first_map if _LIBPY_RE.search(os.path.basename(p))]
    exe_path = exe if exe in first_map else next(
        (p for p in first_map if exe and p.replace(" (deleted)", "") == exe), exe)
    if exe_path and exe_path not in cands:
        cands.append(exe_path)
    looks_python = any(_LIBPY_RE.search(os.path.basename(p)) for p in cands) or bool(
        exe and re.search(r"python", os.path.basename(exe)))
    errors = []
    infos = []
    chosen = None
    for path in cands:
        m = first_map.get(path)
        try:
            info = _load_elf(_host_path(pid, path, m), path)
        except _NotElf as exc:
            errors.append(str(exc))
            continue
        infos.append(info)
        if info.runtime is not None and m is not None:
            chosen = (path, info, m)
            break
    # libc from the mapped files and from the executable's PT_INTERP
    libc = _detect_libc(maps, [i.interp for i in infos])
    if chosen is None:
        if not infos and errors:
            raise ProbeUnavailable("not_elf", "; ".join(errors)[:300])
        if not looks_python:
            raise ProbeUnavailable("not_cpython", f"pid {pid} ({exe or '?'}) maps no libpython")
        raise ProbeUnavailable("no_runtime_symbol", f"pid {pid}: no defined _PyRuntime in {cands}")
    path, info, _ = chosen
    if info.elfclass != 64 or info.machine not in FUTEX_SYSCALL:
        raise ProbeUnavailable("unsupported_arch", f"{path}: {info.machine} ELF{info.elfclass}")
    # Load base: the mapping of this file at file offset 0, minus the first PT_LOAD vaddr.
    zero = [m for m in maps if m.path == path and m.offset == 0]
    if not zero:
        raise ProbeUnavailable("validation_failed", f"pid {pid}: {path} has no mapping at offset 0")
    base = min(m.start for m in zero) - (info.first_load_vaddr & ~0xFFF)
    runtime_address = base + info.runtime[0]
    version, debug_ft = _read_version(pid, info, base, runtime_address, path)
    free_threaded = detect_free_threaded(path, info.soname, debug_ft)
    ident = PythonIdentity("cpython", version, free_threaded, path, runtime_address, libc)
    return _Target(ident, info, base, tuple(maps))


def _read_version(pid: int, info: _ElfInfo, base: int, runtime_address: int,
                  path: str) -> Tuple[str, Optional[int]]:
    """Exact version from the target's memory; also _Py_DebugOffsets.free_threaded if present."""
    m = _LIBPY_RE.search(os.path.basename(info.soname or path)) or _EXE_RE.search(os.path.basename(path))
    soname_mm = f"{m.group(1)}.{m.group(2)}" if m and m.group(1) and m.group(2) else ""
    fd = _open_mem(pid)
    try:
        head = _pread_exact(fd, 24, runtime_address, pid)
        debug_ft = None
        if head[:8] == DEBUG_COOKIE:
            hexv, ft = struct.unpack_from("<QQ", head, 8)
            try:
                return version_from_hex(hexv), ft
            except ValueError:
                pass
        if info.py_version:
            hexv, = struct.unpack("<Q", _pread_exact(fd, 8, base + info.py_version, pid))
            try:
                return version_from_hex(hexv & 0xFFFFFFFF), debug_ft
            except ValueError:
                pass
        # 3.8-3.10: sys.version was formatted by Py_GetVersion() into a static buffer
        # in the library's data segment; find it there.
        for vaddr, memsz in info.rw_segments:
            if memsz > 64 << 20:
                continue
            try:
                data = _pread_exact(fd, memsz, base + vaddr, pid)
            except ProbeUnavailable as exc:
                if exc.reason != "validation_failed":
                    raise
                continue
            v = version_from_sys_version_buffer(data, soname_mm)
            if v:
                return v, debug_ft
        return soname_mm, debug_ft
    finally:
        os.close(fd)


def identify(pid: int) -> PythonIdentity:
    """What the target is, read from the target. Raises ProbeUnavailable."""
    return _identify(pid).identity


# --------------------------------------------------------------------------- validation

_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")


def _structural_ok(data: bytes, off: int, layout: GilLayout, writable: _WritableRanges,
                   ntasks: int, min_interval_us: int = LOCATE_INTERVAL_MIN_US) -> bool:
    """Cheap checks of one snapshot of a candidate GIL struct (plus its mutex) at `off`."""
    interval, = _U64.unpack_from(data, off + layout.interval)
    if not min_interval_us <= interval <= INTERVAL_MAX_US:
        return False
    locked, pad = struct.unpack_from("<iI", data, off + layout.locked)
    if locked not in (0, 1) or pad != 0:
        return False
    holder, = _U64.unpack_from(data, off + layout.last_holder)
    if holder and (holder & 7 or holder not in writable):
        return False
    wrefs, = _U32.unpack_from(data, off + layout.cond_wrefs)
    # __wrefs: bit 0 process-shared (never for the GIL), bit 1 clock id, bit 2 set by
    # pthread_cond_destroy; the waiter count (>> 3) cannot exceed the thread count.
    if wrefs & 5 or (wrefs >> 3) > ntasks + 1:
        return False
    mx = off + layout.mutex
    lock, _count, owner, _nusers, kind = struct.unpack_from("<iIiIi", data, mx)
    # pthread_mutex_init(&m, NULL): a normal (timed) mutex, kind 0 once the glibc lock
    # elision flags (0x100, 0x200), which glibc may set at run time, are masked out.
    if lock not in (0, 1, 2) or kind & ~0x300 or owner < 0:
        return False
    if data[mx + 24:mx + 40] != b"\0" * 16:         # __list of a non-robust mutex
        return False
    return True


class _RuntimeView:
    """Lazily read copy of _PyRuntime, to tell the runtime's interpreter from look-alikes."""

    def __init__(self, pid: int, fd: int, address: int, size: int) -> None:
        self.pid, self.fd, self.address, self.size = pid, fd, address, size
        self._data: Optional[bytes] = None

    def __contains__(self, addr: int) -> bool:
        return self.address <= addr < self.address + self.size

    def holds_pointer(self, value: int) -> bool:
        """True if `value` is stored as an aligned pointer inside _PyRuntime."""
        if self._data is None:
            self._data = _pread_exact(self.fd, self.size, self.address, self.pid)
        needle = _U64.pack(value)
        i = self._data.find(needle)
        while i >= 0:
            if i % 8 == 0:
                return True
            i = self._data.find(needle, i + 1)
        return False


def _tstate_ok(pid: int, fd: int, holder: int, writable: _WritableRanges,
               runtime: _RuntimeView) -> str:
    """Is `holder` a live PyThreadState of the runtime's interpreter? "" if so.

    PyThreadState starts with prev, next, interp (3.8 .. 3.14). The interpreter must be
    inside _PyRuntime (3.12+ main interpreter) or be pointed to from it (3.8-3.11
    interpreters.head/main); prev->next and next->prev must point back at `holder`.
    """
    if holder & 7 or holder not in writable:
        return "last_holder is not a data pointer"
    try:
        prev, nxt, interp = struct.unpack("<QQQ", _pread_exact(fd, 24, holder, pid))
        if not interp or interp & 7 or interp not in writable:
            return "last_holder->interp is not a data pointer"
        if interp not in runtime and not runtime.holds_pointer(interp):
            return "last_holder->interp is not the runtime's interpreter"
        if prev:
            if prev & 7 or prev not in writable:
                return "last_holder->prev is not a data pointer"
            back, = _U64.unpack(_pread_exact(fd, 8, prev + 8, pid))
            if back != holder:
                return "last_holder->prev->next != last_holder"
        if nxt:
            if nxt & 7 or nxt not in writable:
                return "last_holder->next is not a data pointer"
            back, = _U64.unpack(_pread_exact(fd, 8, nxt, pid))
            if back != holder:
                return "last_holder->next->prev != last_holder"
    except ProbeUnavailable as exc:
        if exc.reason == "validation_failed":
            return "last_holder is not readable"
        raise
    return ""


def _validate(pid: int, fd: int, address: int, layout: GilLayout, maps: Sequence[_Map],
              runtime: _RuntimeView, reads: int = 6, pause: float = 0.004,
              strict: bool = False) -> str:
    """Validate a candidate GIL struct against the live process. Returns "" if valid, else why not.

    Every read: plausible interval, locked in {0,1}, a glibc mutex/condvar shape, mutex
    owner (if any) a thread of the process, switch_number monotonic. While the GIL is
    locked, last_holder must be a live thread state of the runtime's interpreter (one
    miss allowed: take_gil sets locked just before last_holder). An unlocked GIL may
    keep a dangling last_holder (the last holder exited), so that is not held against
    it, except in `strict` mode (search), which needs at least one good holder. If on
    average a thread waits, some thread must be futex-blocked on this condvar.
    """
    writable = _WritableRanges(maps)
    size = layout.mutex + 40
    tids = set(_task_ids(pid))
    prev_switch = None
    waiters_seen = 0
    good_holders = bad_locked = 0
    checked: Dict[int, str] = {}
    for i in range(reads):
        if i:
            time.sleep(pause)
        data = _pread_exact(fd, size, address, pid)
        if not _structural_ok(data, 0, layout, writable, len(tids) + 4):
            return "structure"
        owner, = _I32.unpack_from(data, layout.mutex + 8)
        if owner and owner not in tids:
            tids = set(_task_ids(pid))
            if owner not in tids:
                return "mutex owner is not a thread of the process"
        switch, = _U64.unpack_from(data, layout.switch_number)
        if prev_switch is not None and (switch - prev_switch) % (1 << 64) > (1 << 40):
            return "switch_number not monotonic"
        prev_switch = switch
        holder, = _U64.unpack_from(data, layout.last_holder)
        locked, = _I32.unpack_from(data, layout.locked)
        if holder:
            if holder not in checked:
                checked[holder] = _tstate_ok(pid, fd, holder, writable, runtime)
            if checked[holder]:
                if locked:
                    bad_locked += 1
                    if bad_locked > 1:
                        return checked[holder]
            else:
                good_holders += 1
        elif locked:
            bad_locked += 1
            if bad_locked > 1:
                return "locked without a holder"
        wrefs, = _U32.unpack_from(data, layout.cond_wrefs)
        waiters_seen += wrefs >> 3
    if strict and not good_holders:
        return "no live thread state seen as last_holder"
    if waiters_seen >= reads:     # on average >= 1 waiter: they must be futex-blocked here
        # On an overloaded box a waiter whose timed wait expired can stay runnable (and
        # counted in __wrefs) for a while before it runs: give it up to ~0.1 s.
        for _ in range(25):
            if futex_waiters(pid, address, layout) > 0:
                break
            time.sleep(pause)
        else:
            return "waiters counted but none futex-blocked on the condvar"
    return ""


# --------------------------------------------------------------------------- locate

def _search(pid: int, fd: int, target: _Target, layout: GilLayout,
            exclude: Sequence[int] = ()) -> List[int]:
    """Offsets inside _PyRuntime whose bytes look like a GIL struct (cheap checks only)."""
    rt_addr = target.identity.runtime_address
    size = target.elf.runtime[1]
    if not size or size > 16 << 20:
        size = 1 << 20
    data = _pread_exact(fd, size, rt_addr, pid)
    writable = _WritableRanges(target.maps)
    ntasks = len(_task_ids(pid)) + 4
    last = size - (layout.mutex + 40)
    out = []
    unpack_q = _U64.unpack_from
    for off in range(0, last + 1, 8):
        iv, = unpack_q(data, off + layout.interval)
        if not LOCATE_INTERVAL_MIN_US <= iv <= INTERVAL_MAX_US:
            continue
        if off not in exclude and _structural_ok(data, off, layout, writable, ntasks):
            out.append(off)
    return out


def locate(pid: int, *, methods: Sequence[str] = ("debug_offsets", "offset_table", "search")) -> GilLocation:
    """Find and validate the main interpreter's GIL. Raises ProbeUnavailable.

    `methods` restricts the strategies (tests use it to exercise each one).
    """
    target = _identify(pid)
    ident = target.identity
    if ident.free_threaded:
        raise ProbeUnavailable("free_threaded", f"{ident.binary} is a free-threaded build")
    if ident.libc == "musl":
        raise ProbeUnavailable("musl", "musl condvars keep waiters on the waiter's stack")
    if ident.libc != "glibc":
        raise ProbeUnavailable("unknown_layout", f"libc {ident.libc}: condvar layout unknown")
    try:
        mm = tuple(int(x) for x in ident.version.split(".")[:2])
    except ValueError:
        mm = ()
    if len(mm) != 2 or mm < (3, 8):
        raise ProbeUnavailable("unknown_layout", f"unsupported version {ident.version!r}")
    layout = LAYOUTS[False]
    rt = ident.runtime_address
    rt_end = rt + (target.elf.runtime[1] or 0)
    fd = _open_mem(pid)
    why = []
    runtime = _RuntimeView(pid, fd, rt, max(rt_end - rt, 8))
    try:
        # 1. _Py_DebugOffsets (3.13+)
        if "debug_offsets" in methods and mm >= (3, 13):
            try:
                head = _pread_exact(fd, 512, rt, pid)
                offs = parse_debug_offsets(head, mm)
                dl = layout_from_debug_offsets(offs)
                # interpreters.head is the newest interpreter; the main one is last.
                interp, = _U64.unpack(_pread_exact(
                    fd, 8, rt + offs["runtime_state.interpreters_head"], pid))
                for _ in range(256):
                    nxt, = _U64.unpack(_pread_exact(fd, 8, interp + offs["interpreter_state.next"], pid))
                    if not nxt:
                        break
                    interp = nxt
                gil_ptr, = _U64.unpack(_pread_exact(
                    fd, 8, interp + offs["interpreter_state.ceval_gil"], pid))
                own = interp + offs["interpreter_state.gil_runtime_state"]
                if gil_ptr != own:
                    why.append(f"debug_offsets: ceval.gil {gil_ptr:#x} != interp->_gil {own:#x}")
                else:
                    bad = _validate(pid, fd, own, dl, target.maps, runtime)
                    if not bad:
                        return GilLocation(pid, own, dl, ident, "debug_offsets", rt_end - rt)
                    why.append(f"debug_offsets: {bad}")
            except ValueError as exc:
                why.append(f"debug_offsets: {exc}")
            except ProbeUnavailable as exc:
                if exc.reason != "validation_failed":
                    raise
                why.append(f"debug_offsets: {exc.detail}")
        # 2. known offset for this version, validated
        tried = []
        if "offset_table" in methods:
            off = KNOWN_GIL_OFFSETS.get(ident.version, KNOWN_GIL_OFFSETS.get(f"{mm[0]}.{mm[1]}"))
            if off is not None and rt_end - rt >= off + layout.mutex + 40:
                tried.append(off)
                try:
                    bad = _validate(pid, fd, rt + off, layout, target.maps, runtime)
                except ProbeUnavailable as exc:
                    if exc.reason != "validation_failed":
                        raise
                    bad = exc.detail
                if not bad:
                    return GilLocation(pid, rt + off, layout, ident, "offset_table", rt_end - rt)
                why.append(f"offset_table {off}: {bad}")
        # 3. search the _PyRuntime region; validate every candidate, accept a unique one
        if "search" in methods:
            cands = _search(pid, fd, target, layout)
            good = []
            for off in cands[:32]:
                # 3.12+: the main interpreter (inside _PyRuntime) points at its GIL
                # (interp->ceval.gil); below 3.12 the GIL is _PyRuntime.ceval.gil itself.
                if mm >= (3, 12) and not runtime.holds_pointer(rt + off):
                    continue
                try:
                    bad = _validate(pid, fd, rt + off, layout, target.maps, runtime,
                                    reads=4, strict=True)
                except ProbeUnavailable as exc:
                    if exc.reason != "validation_failed":
                        raise
                    bad = exc.detail
                if not bad:
                    good.append(off)
            if len(good) == 1:
                return GilLocation(pid, rt + good[0], layout, ident, "search", rt_end - rt)
            why.append(f"search: {len(cands)} candidates, {len(good)} valid {good[:4]}")
    finally:
        os.close(fd)
    raise ProbeUnavailable("validation_failed", f"pid {pid} {ident.version}: " + "; ".join(why))


# --------------------------------------------------------------------------- reader

def _layout_struct(layout: GilLayout) -> struct.Struct:
    """One precompiled struct for interval, last_holder, locked, switch_number, wrefs."""
    fields = sorted([(layout.interval, "Q"), (layout.last_holder, "Q"), (layout.locked, "i"),
                     (layout.switch_number, "Q"), (layout.cond_wrefs, "I")])
    fmt, pos = "<", 0
    for off, code in fields:
        if off < pos:
            raise ValueError(f"overlapping fields in {layout}")
        if off > pos:
            fmt += f"{off - pos}x"
        fmt += code
        pos = off + struct.calcsize(code)
    return struct.Struct(fmt)


class GilReader:
    """Reads one target's GIL struct: one os.pread per read() on a kept /proc/PID/mem fd.

    The fd is bound to the target's address space at open time: if the PID is reused
    by another process, reads of the old fd return nothing ("exited"), never the new
    process's memory.
    """

    def __init__(self, location: GilLocation) -> None:
        self.location = location
        self.pid = location.pid
        self.address = location.address
        self.size = location.layout.read_size
        self.struct = _layout_struct(location.layout)
        order = sorted(["interval", "last_holder", "locked", "switch_number", "cond_wrefs"],
                       key=lambda n: getattr(location.layout, n))
        self.order = tuple(order)
        self._perm = tuple(order.index(n) for n in
                           ("interval", "last_holder", "locked", "switch_number", "cond_wrefs"))
        self.start_time = start_time(self.pid)
        if not location.runtime_size:      # built by hand: take the size from the ELF (cached)
            try:
                self.location = location = replace(
                    location, runtime_size=_identify(self.pid).elf.runtime[1])
            except ProbeUnavailable:
                pass
        self._writable: Optional[_WritableRanges] = None
        self._interps: set = set()       # interpreters already verified (recheck)
        self.fd = _open_mem(self.pid)

    def read_raw(self) -> Tuple[int, int, int, int, int]:
        """(interval_us, last_holder, locked, switch_number, wrefs) with one pread."""
        if self.fd < 0:
            raise ProbeUnavailable("exited", "reader closed")
        try:
            data = os.pread(self.fd, self.size, self.address)
        except OSError as exc:
            raise _proc_error(exc, self.pid) from exc
        if len(data) != self.size:
            raise ProbeUnavailable("exited", f"pid {self.pid}: memory no longer readable")
        vals = self.struct.unpack(data)
        p = self._perm
        return vals[p[0]], vals[p[1]], vals[p[2]], vals[p[3]], vals[p[4]]

    def read(self) -> GilReading:
        interval, holder, locked, switch, wrefs = self.read_raw()
        if locked not in (0, 1) or not INTERVAL_MIN_US <= interval <= INTERVAL_MAX_US:
            raise ProbeUnavailable("validation_failed",
                                   f"pid {self.pid}: locked={locked} interval={interval}")
        return GilReading(interval, bool(locked), switch, wrefs >> 3, holder)

    def recheck(self) -> Tuple[str, int]:
        """Re-validate the location on the live process without sleeping.

        Returns (problem, futex_waiters): problem is "" when one snapshot of the struct
        and its mutex still has the GIL's shape and, if the GIL is locked, last_holder is
        a live thread state of the runtime's interpreter. Raises ProbeUnavailable when
        the process exited, was replaced, or denies access. Costs a few /proc reads;
        the writable mappings and the verified interpreter are cached between calls.
        """
        if not self.same_process():
            raise ProbeUnavailable("exited", f"pid {self.pid} exited or was replaced")
        loc = self.location
        data = _pread_exact(self.fd, loc.layout.mutex + 40, self.address, self.pid)
        tids = _task_ids(self.pid)
        for attempt in range(2):
            if self._writable is None or attempt:
                self._writable = _WritableRanges(_read_maps(self.pid))
            problem = self._recheck_snapshot(data, len(tids))
            if not problem:
                break
        if problem:
            return problem, -1
        return "", futex_waiters(self.pid, self.address, loc.layout)

    def _recheck_snapshot(self, data: bytes, ntasks: int) -> str:
        loc = self.location
        writable = self._writable
        if not _structural_ok(data, 0, loc.layout, writable, ntasks + 4, INTERVAL_MIN_US):
            return "GIL struct lost its shape"
        locked, = _I32.unpack_from(data, loc.layout.locked)
        holder, = _U64.unpack_from(data, loc.layout.last_holder)
        if locked and holder:
            rt = loc.identity.runtime_address
            try:
                interp, = _U64.unpack(_pread_exact(self.fd, 8, holder + TSTATE_INTERP_OFFSET, self.pid))
            except ProbeUnavailable as exc:
                if exc.reason == "validation_failed":
                    return "last_holder is not readable"
                raise
            if interp in self._interps:
                return ""
            runtime = _RuntimeView(self.pid, self.fd, rt, max(loc.runtime_size, 8))
            bad = _tstate_ok(self.pid, self.fd, holder, writable, runtime)
            if bad:
                return bad
            self._interps.add(interp)
        return ""

    def same_process(self) -> bool:
        """False if the PID now names another process (or none)."""
        try:
            return start_time(self.pid) == self.start_time
        except ProbeUnavailable:
            return False

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "GilReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
