"""CPython and glibc memory layouts the probe relies on, as data tables.

Every table here is documented, with its sources, in docs/gil-internals.md. Version-specific
facts live in these tables and nowhere else: adding a CPython or glibc release means adding
a row, never an if-branch in the code that reads memory.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .records import GilLayout, ThreadStateLayout

# --------------------------------------------------------------------------- glibc condvar

@dataclass(frozen=True)
class CondvarLayout:
    """glibc's pthread_cond_t (48 bytes on LP64): where its waiter count and futex words are."""
    name: str
    wrefs: int      # __wrefs: waiter reference count << 3 | flags (bit 1: clock, bit 0: shared)
    signals: int    # __g_signals[2]: the futex words blocked waiters sleep on


#: glibc 2.25 rewrote condvars (the layout below); 2.41 dropped __g_refs, which moved __wrefs
#: and __g_signals up by 8 bytes. Keyed by the first glibc minor version with that layout.
CONDVARS: Dict[int, CondvarLayout] = {
    25: CondvarLayout("glibc-2.25", wrefs=36, signals=40),
    41: CondvarLayout("glibc-2.41", wrefs=28, signals=32),
}


def condvar_for_glibc(minor: int) -> Optional[CondvarLayout]:
    """The condvar layout of glibc 2.<minor>, None before 2.25 (a layout we do not read)."""
    known = [k for k in CONDVARS if k <= minor]
    return CONDVARS[max(known)] if known else None


# --------------------------------------------------------------------------- glibc struct pthread

@dataclass(frozen=True)
class PthreadLayout:
    """glibc's struct pthread on x86_64: where the thread's kernel TID is. A pthread_t (what
    pthread_self() returns, and PyThreadState.thread_id holds) is the address of this struct."""
    name: str
    tid: int        # pid_t tid: after the TCB header (tcbhead_t, 704 bytes) and list_t list (16)


#: Keyed, like CONDVARS, by the first glibc minor version with that layout. Measured live on
#: glibc 2.36 and 2.43 (the only offset at which every thread's struct holds its own TID);
#: the probe reads no glibc before 2.25. aarch64 puts the TCB after the struct: no row.
PTHREADS: Dict[str, Dict[int, PthreadLayout]] = {
    "x86_64": {25: PthreadLayout("glibc-2.25", tid=720)},
}


def pthread_for_glibc(minor: int, arch: str = "x86_64") -> Optional[PthreadLayout]:
    """The struct pthread layout of glibc 2.<minor> on `arch`, None when we have none."""
    rows = PTHREADS.get(arch, {})
    known = [k for k in rows if k <= minor]
    return rows[max(known)] if known else None


# --------------------------------------------------------------------------- struct _gil_runtime_state

#: Field offsets of struct _gil_runtime_state (LP64, 3.8 .. 3.15). Free-threaded builds
#: (Py_GIL_DISABLED) put `int enabled` first, which moves every other field by 8.
_GIL_FIELDS: Dict[bool, Dict[str, int]] = {
    False: dict(interval=0, last_holder=8, locked=16, switch_number=24, cond=32, mutex=80, enabled=-1),
    True: dict(enabled=0, interval=8, last_holder=16, locked=24, switch_number=32, cond=40, mutex=88),
}


def gil_layout(free_threaded: bool, condvar: CondvarLayout) -> GilLayout:
    f = _GIL_FIELDS[free_threaded]
    return GilLayout(interval=f["interval"], last_holder=f["last_holder"], locked=f["locked"],
                     switch_number=f["switch_number"], cond=f["cond"],
                     cond_wrefs=f["cond"] + condvar.wrefs, mutex=f["mutex"], enabled=f["enabled"])


#: Every GIL layout we read, keyed by (free-threaded build, condvar layout name).
LAYOUTS: Dict[Tuple[bool, str], GilLayout] = {
    (ft, cv.name): gil_layout(ft, cv) for ft in (False, True) for cv in CONDVARS.values()}

#: The layout of the default build on glibc 2.25 .. 2.40 (pyenv's builds on Debian 12 here).
DEFAULT_LAYOUT = LAYOUTS[(False, "glibc-2.25")]

#: Offset of the main GIL inside _PyRuntime, measured on the pyenv builds (docs/gil-internals.md).
#: Only a first guess for 3.8-3.12: it is always validated, and a search follows when validation
#: fails. Keys: "major.minor" or an exact "major.minor.micro" override.
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

#: PyThreadState.thread_id (unsigned long, the thread's pthread_t) where the thread state holds
#: no native_thread_id (3.8-3.10; 3.11 and 3.12 have one: frames.STATIC_FRAME_LAYOUTS, 3.13+
#: _Py_DebugOffsets). offsetof() over the installed headers of 3.8.18, 3.9.18 and 3.10.13.
PTHREAD_ID_OFFSETS: Dict[Tuple[int, int], int] = {
    (3, 8): 176,
    (3, 9): 176,
    (3, 10): 176,
}

# --------------------------------------------------------------------------- _Py_DebugOffsets (3.13+)

DEBUG_COOKIE = b"xdebugpy"

#: The first fields of _Py_DebugOffsets, identical in 3.13, 3.14 and 3.15. A version without a
#: table below is read through these alone plus a validated search (locate.py): never a guess.
DEBUG_OFFSETS_PREFIX: Dict[str, int] = {
    "version": 8, "free_threaded": 16,
    "runtime_state.size": 24, "runtime_state.interpreters_head": 40,
    "interpreter_state.size": 48, "interpreter_state.id": 56, "interpreter_state.next": 64,
    "interpreter_state.threads_head": 72,
    "_end": 80,
}

# Byte offsets, inside _Py_DebugOffsets, of the fields we use. From CPython's
# Include/internal/pycore_runtime.h (3.13) and pycore_debug_offsets.h (3.14, 3.15), checked
# against the values that Debian's 3.14.10 and 3.15.2 and pyenv's 3.13.0 carry.
_DEBUG_OFFSETS_313: Dict[str, int] = {
    **DEBUG_OFFSETS_PREFIX,
    "interpreter_state.ceval_gil": 112, "interpreter_state.gil_runtime_state": 120,
    "interpreter_state.gil_runtime_state_enabled": 128,
    "interpreter_state.gil_runtime_state_locked": 136,
    "interpreter_state.gil_runtime_state_holder": 144,
    "thread_state.next": 168, "thread_state.interp": 176,
    "thread_state.native_thread_id": 200,
    "_end": 224,
}
# 3.14 adds interpreter_state.threads_main (before gc: the GIL fields move by 8) and
# code_object_generation, tlbc_generation (after them: thread_state moves by 24).
_DEBUG_OFFSETS_314: Dict[str, int] = {
    **_DEBUG_OFFSETS_313,
    "interpreter_state.ceval_gil": 120, "interpreter_state.gil_runtime_state": 128,
    "interpreter_state.gil_runtime_state_enabled": 136,
    "interpreter_state.gil_runtime_state_locked": 144,
    "interpreter_state.gil_runtime_state_holder": 152,
    "thread_state.next": 192, "thread_state.interp": 200,
    "thread_state.native_thread_id": 224,
    "_end": 248,
}
# 3.15 adds base_frame, last_profiled_frame(_seq) before thread_id, and holds_gil,
# gil_requested after status: the per-thread GIL state that profiling.sampling reads.
_DEBUG_OFFSETS_315: Dict[str, int] = {
    **_DEBUG_OFFSETS_314,
    "thread_state.native_thread_id": 248,
    "thread_state.holds_gil": 272, "thread_state.gil_requested": 280,
    "_end": 304,
}
#: The interpreter list of 3.12, which has per-interpreter GILs but no _Py_DebugOffsets: the
#: same fields, named as above, from offsetof() over the installed headers of 3.12.1
#: (Py_BUILD_CORE: _PyRuntimeState.interpreters.head, PyInterpreterState.next, id,
#: threads.head, ceval.gil and _gil). locate_all() only trusts them when they lead from the
#: main interpreter to the very GIL that locate() found.
INTERPRETER_LAYOUTS: Dict[Tuple[int, int], Dict[str, int]] = {
    (3, 12): {"runtime_state.interpreters_head": 40, "interpreter_state.next": 0,
              "interpreter_state.id": 8, "interpreter_state.threads_head": 72,
              "interpreter_state.ceval_gil": 384, "interpreter_state.gil_runtime_state": 1040},
}

DEBUG_OFFSETS_LAYOUTS: Dict[Tuple[int, int], Dict[str, int]] = {
    (3, 13): _DEBUG_OFFSETS_313,
    (3, 14): _DEBUG_OFFSETS_314,
    (3, 15): _DEBUG_OFFSETS_315,
}


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


def _debug_offsets_key(data: bytes) -> Tuple[int, int]:
    if len(data) < 24 or data[:8] != DEBUG_COOKIE:
        raise ValueError("no _Py_DebugOffsets cookie")
    hexversion, = struct.unpack_from("<Q", data, 8)
    return (hexversion >> 24) & 0xFF, (hexversion >> 16) & 0xFF


def _parse_with(data: bytes, table: Dict[str, int]) -> Dict[str, int]:
    if len(data) < table["_end"]:
        raise ValueError("truncated _Py_DebugOffsets")
    return {name: struct.unpack_from("<Q", data, off)[0]
            for name, off in table.items() if not name.startswith("_")}


def parse_debug_offsets(data: bytes, minor_version: Optional[Tuple[int, int]] = None) -> Dict[str, int]:
    """The fields we use, from the bytes at the start of _PyRuntime.

    Raises ValueError if the cookie is missing, the versions disagree or the layout is unknown
    (then :func:`parse_debug_offsets_prefix` still reads the stable first fields).
    """
    key = _debug_offsets_key(data)
    if minor_version is not None and key != tuple(minor_version):
        raise ValueError(f"debug offsets version {key} != binary version {minor_version}")
    table = DEBUG_OFFSETS_LAYOUTS.get(key)
    if table is None:
        raise ValueError(f"unknown _Py_DebugOffsets layout for {key[0]}.{key[1]}")
    return _parse_with(data, table)


def parse_debug_offsets_prefix(data: bytes) -> Dict[str, int]:
    """The stable first fields of _Py_DebugOffsets, for any version that carries the cookie."""
    _debug_offsets_key(data)
    return _parse_with(data, DEBUG_OFFSETS_PREFIX)


def layout_from_debug_offsets(offs: Dict[str, int], condvar: CondvarLayout) -> GilLayout:
    """GIL field offsets relative to the GIL struct, from parsed debug offsets.

    No offsets are published for interval and switch_number: in every LP64 layout interval
    precedes last_holder and switch_number follows locked (+padding). The result must be a
    layout we know, or this raises ValueError.
    """
    gil = offs["interpreter_state.gil_runtime_state"]
    holder = offs["interpreter_state.gil_runtime_state_holder"] - gil
    locked = offs["interpreter_state.gil_runtime_state_locked"] - gil
    expected = gil_layout(bool(offs["free_threaded"]), condvar)
    if (holder, locked) != (expected.last_holder, expected.locked):
        raise ValueError(f"debug offsets give an unexpected GIL layout: last_holder +{holder}, "
                         f"locked +{locked}")
    if expected.enabled >= 0 and offs["interpreter_state.gil_runtime_state_enabled"] != expected.enabled:
        raise ValueError("debug offsets give an unexpected GIL `enabled` offset")
    return expected


def thread_layout_from_debug_offsets(offs: Dict[str, int]) -> ThreadStateLayout:
    return ThreadStateLayout(
        threads_head=offs["interpreter_state.threads_head"],
        next=offs["thread_state.next"], interp=offs["thread_state.interp"],
        native_thread_id=offs["thread_state.native_thread_id"],
        holds_gil=offs.get("thread_state.holds_gil", -1),
        gil_requested=offs.get("thread_state.gil_requested", -1))


# --------------------------------------------------------------------------- build flags

_LIBPY_RE = re.compile(r"libpython(\d+)\.(\d+)([a-z]*)\.so")
_EXE_RE = re.compile(r"python(\d+)?(?:\.(\d+))?([a-z]*)$")


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
