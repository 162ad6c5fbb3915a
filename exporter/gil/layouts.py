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
CONDVARS: dict[int, CondvarLayout] = {
    25: CondvarLayout("glibc-2.25", wrefs=36, signals=40),
    41: CondvarLayout("glibc-2.41", wrefs=28, signals=32),
}


def condvar_for_glibc(minor: int) -> CondvarLayout | None:
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
PTHREADS: dict[str, dict[int, PthreadLayout]] = {
    "x86_64": {25: PthreadLayout("glibc-2.25", tid=720)},
}


def pthread_for_glibc(minor: int, arch: str = "x86_64") -> PthreadLayout | None:
    """The struct pthread layout of glibc 2.<minor> on `arch`, None when we have none."""
    rows = PTHREADS.get(arch, {})
    known = [k for k in rows if k <= minor]
    return rows[max(known)] if known else None


# --------------------------------------------------------------------------- struct _gil_runtime_state

#: Field offsets of struct _gil_runtime_state (LP64, 3.8 .. 3.15). Free-threaded builds
#: (Py_GIL_DISABLED) put `int enabled` first, which moves every other field by 8.
_GIL_FIELDS: dict[bool, dict[str, int]] = {
    False: dict(interval=0, last_holder=8, locked=16, switch_number=24, cond=32, mutex=80, enabled=-1),
    True: dict(enabled=0, interval=8, last_holder=16, locked=24, switch_number=32, cond=40, mutex=88),
}


def gil_layout(free_threaded: bool, condvar: CondvarLayout) -> GilLayout:
    f = _GIL_FIELDS[free_threaded]
    return GilLayout(interval=f["interval"], last_holder=f["last_holder"], locked=f["locked"],
                     switch_number=f["switch_number"], cond=f["cond"],
                     cond_wrefs=f["cond"] + condvar.wrefs, mutex=f["mutex"], enabled=f["enabled"])


#: Every GIL layout we read, keyed by (free-threaded build, condvar layout name).
LAYOUTS: dict[tuple[bool, str], GilLayout] = {
    (ft, cv.name): gil_layout(ft, cv) for ft in (False, True) for cv in CONDVARS.values()}

#: The layout of the default build on glibc 2.25 .. 2.40 (pyenv's builds on Debian 12 here).
DEFAULT_LAYOUT = LAYOUTS[(False, "glibc-2.25")]

#: Offset of the main GIL inside _PyRuntime, measured on the pyenv builds (docs/gil-internals.md).
#: Only a first guess for 3.8-3.12: it is always validated, and a search follows when validation
#: fails. Keys: "major.minor" or an exact "major.minor.micro" override.
KNOWN_GIL_OFFSETS: dict[str, int] = {
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
PTHREAD_ID_OFFSETS: dict[tuple[int, int], int] = {
    (3, 8): 176,
    (3, 9): 176,
    (3, 10): 176,
}

# --------------------------------------------------------------------------- CPython versions

#: What CPython gives a reader from outside, by the first minor version that has it. Code asks
#: supports(minor, feature) and never compares versions itself.
SINCE: dict[str, tuple[int, int]] = {
    "gil": (3, 8),                # the oldest GIL layout read (struct _gil_runtime_state)
    "stacks": (3, 11),            # _PyInterpreterFrame: stacks and PyThreadState.native_thread_id
    "own_gils": (3, 12),          # per-interpreter GILs; the main GIL is inside the interpreter
    "debug_offsets": (3, 13),     # _Py_DebugOffsets at the start of _PyRuntime
    "thread_gil_flags": (3, 15),  # PyThreadState.holds_gil and gil_requested
}


def supports(minor: tuple[int, int] | None, feature: str) -> bool:
    """Does CPython `minor` ((3, 12)) have `feature` (a key of SINCE)? False when unknown."""
    return minor is not None and tuple(minor) >= SINCE[feature]


# --------------------------------------------------------------------------- _Py_DebugOffsets (3.13+)

DEBUG_COOKIE = b"xdebugpy"

# The one description of _Py_DebugOffsets: a char[8] cookie followed by uint64_t fields only,
# grouped in sections. Each version's table lists the sections and their fields in declaration
# order (CPython's Include/internal/pycore_runtime.h in 3.13, pycore_debug_offsets.h from 3.14);
# a field's offset inside the struct is 8 times its position. Only the sections up to the last
# one used are listed. Checked against the values pyenv's 3.13.0 and Debian's 3.14.10 and
# 3.15.2 carry (tests/test_stacks.py reads them live).
Sections = tuple[tuple[str, tuple[str, ...]], ...]

_DEBUG_313: Sections = (
    ("", ("cookie", "version", "free_threaded")),
    ("runtime_state", ("size", "finalizing", "interpreters_head")),
    ("interpreter_state", ("size", "id", "next", "threads_head", "gc", "imports_modules",
                           "sysdict", "builtins", "ceval_gil", "gil_runtime_state",
                           "gil_runtime_state_enabled", "gil_runtime_state_locked",
                           "gil_runtime_state_holder")),
    ("thread_state", ("size", "prev", "next", "interp", "current_frame", "thread_id",
                      "native_thread_id", "datastack_chunk", "status")),
    ("interpreter_frame", ("size", "previous", "executable", "instr_ptr", "localsplus", "owner")),
    ("code_object", ("size", "filename", "name", "qualname", "linetable", "firstlineno",
                     "argcount", "localsplusnames", "localspluskinds", "co_code_adaptive")),
    ("pyobject", ("size", "ob_type")),
    ("type_object", ("size", "tp_name", "tp_repr", "tp_flags")),
    ("tuple_object", ("size", "ob_item", "ob_size")),
    ("list_object", ("size", "ob_item", "ob_size")),
    ("dict_object", ("size", "ma_keys", "ma_values")),
    ("float_object", ("size", "ob_fval")),
    ("long_object", ("size", "lv_tag", "ob_digit")),
    ("bytes_object", ("size", "ob_size", "ob_sval")),
    ("unicode_object", ("size", "state", "length", "asciiobject_size")),
)


def _amend(table: Sections, before: dict[str, tuple[str, tuple[str, ...]]] = None,
           **sections: tuple[str, ...]) -> Sections:
    """`table` with the fields of some sections replaced, and new sections inserted before
    the named ones (before={"tuple_object": ("heap_type_object", fields)})."""
    out = []
    for name, fields in table:
        if before and name in before:
            out.append(before[name])
        out.append((name, sections.get(name, fields)))
    return tuple(out)


# 3.14: interpreter_state gains threads_main (before gc), code_object_generation,
# tlbc_generation; interpreter_frame stackpointer, tlbc_index; code_object co_tlbc; a
# set_object section after list_object (read live: tests/test_hostile_offsets.py).
_DEBUG_314 = _amend(
    _DEBUG_313, before={"dict_object": ("set_object", ("size", "used", "table", "mask"))},
    interpreter_state=("size", "id", "next", "threads_head", "threads_main", "gc",
                       "imports_modules", "sysdict", "builtins", "ceval_gil", "gil_runtime_state",
                       "gil_runtime_state_enabled", "gil_runtime_state_locked",
                       "gil_runtime_state_holder", "code_object_generation", "tlbc_generation"),
    interpreter_frame=("size", "previous", "executable", "instr_ptr", "localsplus", "owner",
                       "stackpointer", "tlbc_index"),
    code_object=("size", "filename", "name", "qualname", "linetable", "firstlineno", "argcount",
                 "localsplusnames", "localspluskinds", "co_code_adaptive", "co_tlbc"))
# 3.15: thread_state gains base_frame, last_profiled_frame(_seq), holds_gil, gil_requested,
# current_exception, exc_state; an err_stackitem section; type_object tp_basicsize,
# tp_dictoffset; a heap_type_object section; unicode_object compactunicodeobject_size.
_DEBUG_315 = _amend(
    _DEBUG_314, before={"interpreter_frame": ("err_stackitem", ("exc_value",)),
                        "tuple_object": ("heap_type_object", ("size", "ht_cached_keys"))},
    thread_state=("size", "prev", "next", "interp", "current_frame", "base_frame",
                  "last_profiled_frame", "last_profiled_frame_seq", "thread_id",
                  "native_thread_id", "datastack_chunk", "status", "holds_gil", "gil_requested",
                  "current_exception", "exc_state"),
    type_object=("size", "tp_name", "tp_repr", "tp_flags", "tp_basicsize", "tp_dictoffset"),
    unicode_object=("size", "state", "length", "asciiobject_size", "compactunicodeobject_size"))

DEBUG_SECTIONS: dict[tuple[int, int], Sections] = {
    (3, 13): _DEBUG_313, (3, 14): _DEBUG_314, (3, 15): _DEBUG_315}


def debug_offsets_fields(sections: Sections) -> dict[str, int]:
    """{"section.field": offset inside _Py_DebugOffsets, "_end": its size} of a table above."""
    out: dict[str, int] = {}
    pos = 0
    for section, fields in sections:
        for f in fields:
            out[f"{section}.{f}" if section else f] = pos
            pos += 8
    out["_end"] = pos
    return out


#: Offsets inside _Py_DebugOffsets of every field, by version (derived from DEBUG_SECTIONS).
DEBUG_OFFSETS_LAYOUTS: dict[tuple[int, int], dict[str, int]] = {
    v: debug_offsets_fields(s) for v, s in DEBUG_SECTIONS.items()}

#: The first fields, identical in 3.13, 3.14 and 3.15. A version without a table is read
#: through these alone plus a validated search (location.py): never a guess.
DEBUG_OFFSETS_PREFIX: dict[str, int] = {
    **{k: v for k, v in DEBUG_OFFSETS_LAYOUTS[(3, 13)].items()
       if k in ("version", "free_threaded", "runtime_state.size", "runtime_state.interpreters_head",
                "interpreter_state.size", "interpreter_state.id", "interpreter_state.next",
                "interpreter_state.threads_head")},
    "_end": DEBUG_OFFSETS_LAYOUTS[(3, 13)]["interpreter_state.threads_head"] + 8}

# ---- validation: a target publishes these numbers, and a target can lie (issue 16).
# As CPython's own remote reader does (Python/remote_debug.h), every field read is checked
# against its section's declared size, and every section size against a ceiling, before one
# byte is read through them.

#: Ceiling of _PyRuntime's size as its ELF symbol gives it (st_size: 190-350 KiB in 3.8-3.15),
#: and of the runtime and interpreter sections of _Py_DebugOffsets.
RUNTIME_SIZE_MAX = 4 << 20

#: Ceiling of a section's declared size (sizeof the struct). The runtime and interpreter
#: structs measure 190-350 KiB in 3.13-3.15; the others less than 1 KiB.
SECTION_MAX: dict[str, int] = {"runtime_state": RUNTIME_SIZE_MAX, "interpreter_state": RUNTIME_SIZE_MAX}
SECTION_MAX_DEFAULT = 8 << 10

#: Bytes the readers take at each field used (8: a pointer or 64-bit integer, 4: an int,
#: 1: a char, 0: a position or size compared, never read past). A field is valid when
#: offset + width <= its section's size.
FIELD_WIDTHS: dict[str, int] = {
    "runtime_state.interpreters_head": 8,
    "interpreter_state.id": 8, "interpreter_state.next": 8, "interpreter_state.threads_head": 8,
    "interpreter_state.ceval_gil": 8,
    "interpreter_state.gil_runtime_state": 128,     # the GIL struct and its mutex (<= 128 B)
    "interpreter_state.gil_runtime_state_locked": 4, "interpreter_state.gil_runtime_state_holder": 8,
    "thread_state.next": 8, "thread_state.interp": 8, "thread_state.current_frame": 8,
    "thread_state.native_thread_id": 8, "thread_state.holds_gil": 4, "thread_state.gil_requested": 4,
    "interpreter_frame.previous": 8, "interpreter_frame.executable": 8,
    "interpreter_frame.instr_ptr": 8, "interpreter_frame.owner": 1,
    "code_object.filename": 8, "code_object.name": 8, "code_object.qualname": 8,
    "code_object.linetable": 8, "code_object.firstlineno": 4, "code_object.co_code_adaptive": 0,
    "pyobject.ob_type": 8, "type_object.tp_name": 8,
    "bytes_object.ob_size": 8, "bytes_object.ob_sval": 0,
    "unicode_object.state": 4, "unicode_object.length": 8,
    "unicode_object.asciiobject_size": 0, "unicode_object.compactunicodeobject_size": 0,
}
#: `gil_runtime_state_enabled` is published relative to the GIL struct, not the interpreter.
GIL_STRUCT_MAX = 128


class BadOffsets(ValueError):
    """The target's _Py_DebugOffsets carry the cookie and our version but numbers that cannot
    describe it: the reason is `bad_offsets`, and nothing is read through them."""


def validate_debug_offsets(offs: dict[str, int]) -> None:
    """Raise BadOffsets unless every section size used is within its ceiling and every field
    used lies inside its section. `offs` are parsed fields ("section.field": value)."""
    for name, width in FIELD_WIDTHS.items():
        if name not in offs:
            continue
        section = name.split(".", 1)[0]
        size = offs.get(f"{section}.size", 0)
        limit = SECTION_MAX.get(section, SECTION_MAX_DEFAULT)
        if not 0 < size <= limit:
            raise BadOffsets(f"{section}.size {size} is not in (0, {limit}]")
        if offs[name] + width > size:
            raise BadOffsets(f"{name} {offs[name]} + {width} is outside its section ({size} B)")
    enabled = offs.get("interpreter_state.gil_runtime_state_enabled")
    if enabled is not None and enabled >= GIL_STRUCT_MAX:
        raise BadOffsets(f"interpreter_state.gil_runtime_state_enabled {enabled} is outside "
                         f"the GIL struct")
    if "interpreter_state.gil_runtime_state_holder" in offs:
        gil = offs["interpreter_state.gil_runtime_state"]
        for f in ("locked", "holder"):
            rel = offs[f"interpreter_state.gil_runtime_state_{f}"] - gil
            if not 0 <= rel < GIL_STRUCT_MAX:
                raise BadOffsets(f"interpreter_state.gil_runtime_state_{f} is outside the GIL struct")


#: The interpreter list of 3.12, which has per-interpreter GILs but no _Py_DebugOffsets: the
#: same fields, named as above, from offsetof() over the installed headers of 3.12.1
#: (Py_BUILD_CORE: _PyRuntimeState.interpreters.head, PyInterpreterState.next, id,
#: threads.head, ceval.gil and _gil). locate_all() only trusts them when they lead from the
#: main interpreter to the very GIL that locate() found.
INTERPRETER_LAYOUTS: dict[tuple[int, int], dict[str, int]] = {
    (3, 12): {"runtime_state.interpreters_head": 40, "interpreter_state.next": 0,
              "interpreter_state.id": 8, "interpreter_state.threads_head": 72,
              "interpreter_state.ceval_gil": 384, "interpreter_state.gil_runtime_state": 1040},
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


def _debug_offsets_key(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[:8] != DEBUG_COOKIE:
        raise ValueError("no _Py_DebugOffsets cookie")
    hexversion, = struct.unpack_from("<Q", data, 8)
    return (hexversion >> 24) & 0xFF, (hexversion >> 16) & 0xFF


def _parse_with(data: bytes, table: dict[str, int]) -> dict[str, int]:
    if len(data) < table["_end"]:
        raise ValueError("truncated _Py_DebugOffsets")
    return {name: struct.unpack_from("<Q", data, off)[0]
            for name, off in table.items() if not name.startswith("_")}


def parse_debug_offsets(data: bytes, minor_version: tuple[int, int] | None = None) -> dict[str, int]:
    """Every field of the table of its version, from the bytes at the start of _PyRuntime,
    validated (validate_debug_offsets).

    Raises ValueError if the cookie is missing, the versions disagree or the layout is unknown
    (then :func:`parse_debug_offsets_prefix` still reads the stable first fields), BadOffsets
    (a ValueError) if the numbers cannot be the target's own layout.
    """
    key = _debug_offsets_key(data)
    if minor_version is not None and key != tuple(minor_version):
        raise ValueError(f"debug offsets version {key} != binary version {minor_version}")
    table = DEBUG_OFFSETS_LAYOUTS.get(key)
    if table is None:
        raise ValueError(f"unknown _Py_DebugOffsets layout for {key[0]}.{key[1]}")
    offs = _parse_with(data, table)
    validate_debug_offsets(offs)
    return offs


def parse_debug_offsets_prefix(data: bytes) -> dict[str, int]:
    """The stable first fields of _Py_DebugOffsets, for any version that carries the cookie
    (validated as parse_debug_offsets does)."""
    _debug_offsets_key(data)
    offs = _parse_with(data, DEBUG_OFFSETS_PREFIX)
    validate_debug_offsets(offs)
    return offs


def layout_from_debug_offsets(offs: dict[str, int], condvar: CondvarLayout) -> GilLayout:
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


def thread_layout_from_debug_offsets(offs: dict[str, int]) -> ThreadStateLayout:
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
                         debug_free_threaded: int | None = None,
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
