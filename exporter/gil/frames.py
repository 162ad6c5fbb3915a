"""The Python stack of one thread of another CPython process (3.11+), read from outside.

A thread state leads to the thread's current `_PyInterpreterFrame` (through `_PyCFrame` on
3.11 and 3.12); each frame links to its caller (`previous`) and holds its code object
(`f_code`, or `f_executable` from 3.13, a tagged `_PyStackRef` from 3.14) and the instruction
it is at (`prev_instr`, `instr_ptr` from 3.13). The code object gives the qualified name, the
file, and the line through its location table (`co_linetable`, the 3.11+ format).

Where the offsets come from: `_Py_DebugOffsets` at the start of `_PyRuntime` on 3.13+ (read
from the target, through layouts.py's one description of that struct, validated), and tables measured
from the 3.11.7 and 3.12.1 headers before that (docs/gil-internals.md, "Stacks").

The target runs while we read: frames are pushed and popped under us. Every object is checked
(the code object's type is the code type, strings are compact str objects of sane length, the
location table a bytes object, the instruction inside the code, owners known, depth bounded,
no cycles), and a stack that fails any check is dropped (`TornStack`), never shown half-read.
"""
from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .layouts import DEBUG_OFFSETS_LAYOUTS, BadOffsets, parse_debug_offsets, supports
from .memory import USER_SPACE_END, Pread, open_mem, pread_of
from .records import GilLocation, ProbeUnavailable

_U64 = struct.Struct("<Q")

#: Frames read per stack at most; deeper stacks keep their innermost MAX_DEPTH frames.
MAX_DEPTH = 1024
MAX_STR = 4096              # characters in a name or file name
MAX_LINETABLE = 256 << 10   # bytes of one code object's location table (stdlib, pip: <= 71 KB)
#: Bytes one stack() call reads at most. Code objects are cached by address, so without it a
#: target whose frames hold many code objects sharing one big location table made each call
#: read and decode frames * table bytes. Past it the stack is dropped (TornStack); what was
#: decoded stays cached, so the next calls of a stack that is merely large get further.
READ_BUDGET = 512 << 10


class TornStack(Exception):
    """The stack changed under the read (or was never a stack): drop this sample."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FrameLayout:
    """Offsets of the fields a stack read uses (LP64). One row per CPython minor version."""
    # PyThreadState
    tstate_frame: int          # tstate->current_frame (3.13+), tstate->cframe (3.11, 3.12)
    cframe_frame: int          # _PyCFrame.current_frame; -1 when tstate holds the frame itself
    tstate_native_thread_id: int
    # _PyInterpreterFrame
    frame_previous: int
    frame_code: int            # f_code / f_executable
    frame_instr: int           # prev_instr (3.11, 3.12) / instr_ptr (3.13+)
    frame_owner: int           # char owner
    code_tag_bits: int         # tag bits of a _PyStackRef f_executable (3.14+), 0 before
    owner_no_code: int         # owners >= this are C-stack / interpreter entry frames: no code
    owner_max: int             # largest owner value this version uses
    # PyCodeObject
    code_filename: int
    code_name: int
    code_qualname: int
    code_linetable: int
    code_firstlineno: int
    code_adaptive: int         # co_code_adaptive: the bytecode the frames point into
    # objects
    ob_type: int = 8
    ob_size: int = 16          # PyVarObject.ob_size: code units of a code object, bytes of bytes
    tp_name: int = 24
    bytes_sval: int = 32
    str_length: int = 16
    str_state: int = 32
    str_ascii_size: int = 40       # sizeof(PyASCIIObject): data of a compact ASCII str
    str_compact_size: int = 56     # sizeof(PyCompactUnicodeObject): data of other compact strs

    @property
    def frame_read(self) -> int:
        return max(self.frame_previous, self.frame_code, self.frame_instr, self.frame_owner) + 8

    @property
    def code_read(self) -> int:
        return max(self.code_filename, self.code_name, self.code_qualname, self.code_linetable,
                   self.code_firstlineno, self.ob_size, self.ob_type) + 8

    # Each head read covers every field taken from it: a target's offsets may each lie in
    # their own section and still put a str's state before its type (tests/test_fuzz_readers.py).
    @property
    def str_read(self) -> int:
        return max(self.ob_type + 8, self.str_length + 8, self.str_state + 4)

    @property
    def bytes_read(self) -> int:
        return max(self.ob_type, self.ob_size) + 8

    @property
    def tstate_read(self) -> int:
        return max(self.tstate_frame, self.tstate_native_thread_id) + 8


#: 3.11 and 3.12, which have no _Py_DebugOffsets: offsetof() over the installed headers of
#: 3.11.7 and 3.12.1 (Include/cpython/pystate.h, cpython/code.h, internal/pycore_frame.h,
#: cpython/unicodeobject.h), checked against live processes in tests/test_stacks.py.
STATIC_FRAME_LAYOUTS: dict[tuple[int, int], FrameLayout] = {
    (3, 11): FrameLayout(
        tstate_frame=56, cframe_frame=8, tstate_native_thread_id=160,
        frame_previous=48, frame_code=32, frame_instr=56, frame_owner=69,
        code_tag_bits=0, owner_no_code=3, owner_max=2,
        code_filename=112, code_name=120, code_qualname=128, code_linetable=136,
        code_firstlineno=72, code_adaptive=184,
        str_ascii_size=48, str_compact_size=72),         # 3.11 still has wstr
    (3, 12): FrameLayout(
        tstate_frame=56, cframe_frame=0, tstate_native_thread_id=144,
        frame_previous=8, frame_code=0, frame_instr=56, frame_owner=70,
        code_tag_bits=0, owner_no_code=3, owner_max=3,   # FRAME_OWNED_BY_CSTACK = 3
        code_filename=112, code_name=120, code_qualname=128, code_linetable=136,
        code_firstlineno=68, code_adaptive=192),
}

# ------------------------------------------------------------------ _Py_DebugOffsets (3.13+)
#: What _Py_DebugOffsets does not say. 3.14 made f_executable a _PyStackRef (tag bits 0b11 in
#: the default build) and added FRAME_OWNED_BY_INTERPRETER = 3 before FRAME_OWNED_BY_CSTACK =
#: 4; 3.15 dropped CSTACK. sizeof(PyCompactUnicodeObject) is sizeof(PyASCIIObject) + 16
#: (utf8_length, utf8) where the offsets do not carry it.
DEBUG_EXTRAS: dict[tuple[int, int], dict[str, int]] = {
    (3, 13): dict(code_tag_bits=0, owner_no_code=3, owner_max=3),
    (3, 14): dict(code_tag_bits=3, owner_no_code=3, owner_max=4),
    (3, 15): dict(code_tag_bits=3, owner_no_code=3, owner_max=3),
}


def frame_layout_from_debug_offsets(offs: dict[str, int], version: tuple[int, int]) -> FrameLayout:
    """The FrameLayout of a 3.13+ target from its parsed and validated _Py_DebugOffsets
    (layouts.parse_debug_offsets, the one description of that struct)."""
    ascii_size = offs["unicode_object.asciiobject_size"]
    layout = FrameLayout(
        tstate_frame=offs["thread_state.current_frame"], cframe_frame=-1,
        tstate_native_thread_id=offs["thread_state.native_thread_id"],
        frame_previous=offs["interpreter_frame.previous"],
        frame_code=offs["interpreter_frame.executable"],
        frame_instr=offs["interpreter_frame.instr_ptr"],
        frame_owner=offs["interpreter_frame.owner"],
        code_filename=offs["code_object.filename"], code_name=offs["code_object.name"],
        code_qualname=offs["code_object.qualname"], code_linetable=offs["code_object.linetable"],
        code_firstlineno=offs["code_object.firstlineno"],
        code_adaptive=offs["code_object.co_code_adaptive"],
        ob_type=offs["pyobject.ob_type"], tp_name=offs["type_object.tp_name"],
        ob_size=offs["bytes_object.ob_size"], bytes_sval=offs["bytes_object.ob_sval"],
        str_length=offs["unicode_object.length"], str_state=offs["unicode_object.state"],
        str_ascii_size=ascii_size,
        str_compact_size=offs.get("unicode_object.compactunicodeobject_size", ascii_size + 16),
        **DEBUG_EXTRAS[version])
    # Offsets of a few hundred bytes at most: anything else is not a layout we understand.
    for name, value in layout.__dict__.items():
        if not -1 <= value < 4096:
            raise BadOffsets(f"implausible _Py_DebugOffsets value {name}={value}")
    return layout


# ------------------------------------------------------------------ location table (3.11+)

def _varint(table: bytes, i: int) -> tuple[int, int]:
    b = table[i]
    i += 1
    val = b & 63
    shift = 0
    while b & 64:
        b = table[i]
        i += 1
        shift += 6
        if shift > 30:      # CPython writes C ints: 6 chunks at most; longer grows without end
            raise ValueError("location table varint longer than an int")
        val |= (b & 63) << shift
    return val, i


def _svarint(table: bytes, i: int) -> tuple[int, int]:
    val, i = _varint(table, i)
    return (-(val >> 1) if val & 1 else val >> 1), i


def parse_linetable(table: bytes, firstlineno: int) -> tuple[list[int], list[int | None]]:
    """Decode a 3.11+ co_linetable (CPython Objects/locations.md) into (ends, lines): entry k
    covers code units [ends[k-1], ends[k]) and has source line lines[k] (None: no location).

    Raises ValueError on a table that does not parse (a torn or wrong read)."""
    ends: list[int] = []
    lines: list[int | None] = []
    line = firstlineno
    unit = 0
    i = 0
    n = len(table)
    try:
        while i < n:
            first = table[i]
            if not first & 0x80:
                raise ValueError(f"location entry without its start bit at byte {i}")
            i += 1
            code = (first >> 3) & 15
            unit += (first & 7) + 1
            if code == 15:                    # no location
                entry: int | None = None
            elif code == 14:                  # long form: line delta, end line, columns
                delta, i = _svarint(table, i)
                line += delta
                _, i = _varint(table, i)
                _, i = _varint(table, i)
                _, i = _varint(table, i)
                entry = line
            elif code == 13:                  # no column information
                delta, i = _svarint(table, i)
                line += delta
                entry = line
            elif code >= 10:                  # one-line forms: line delta 0..2, two column bytes
                line += code - 10
                i += 2
                entry = line
            else:                             # short forms: same line, one column byte
                i += 1
                entry = line
            ends.append(unit)
            lines.append(entry)
    except IndexError:
        raise ValueError("location table ends inside an entry") from None
    if i != n:
        raise ValueError("location table ends inside an entry")
    return ends, lines


def line_of(ends: Sequence[int], lines: Sequence[int | None], unit: int) -> int | None:
    """Source line of the instruction at code unit `unit`, None when it has no location."""
    k = bisect.bisect_right(ends, unit)
    return lines[k] if k < len(lines) else None


# ------------------------------------------------------------------ records

@dataclass(frozen=True)
class Frame:
    qualname: str
    filename: str
    line: int          # line of the instruction the frame is at (its first line if unknown)
    firstlineno: int   # line of the `def`: with qualname and filename, names the function

    @property
    def function(self) -> tuple[str, str, int]:
        return self.qualname, self.filename, self.firstlineno


@dataclass(frozen=True)
class _Code:
    qualname: str
    filename: str
    firstlineno: int
    units: int                     # length of the bytecode in code units
    ends: tuple[int, ...]
    lines: tuple[int | None, ...]


# ------------------------------------------------------------------ reader

def layout_for(location: GilLocation, pread: Pread) -> FrameLayout:
    """The FrameLayout of the target of `location`. Raises ProbeUnavailable."""
    ident = location.identity
    mm = ident.minor
    if not supports(mm, "stacks"):
        raise ProbeUnavailable("unsupported_version",
                               f"stacks need CPython 3.11 or newer, pid {location.pid} runs "
                               f"{ident.version or 'an unknown version'}")
    if ident.free_threaded:
        raise ProbeUnavailable("free_threaded", "stacks of free-threaded builds are not read "
                                                "(thread-local bytecode)")
    if mm in STATIC_FRAME_LAYOUTS:
        return STATIC_FRAME_LAYOUTS[mm]
    if mm not in DEBUG_OFFSETS_LAYOUTS or mm not in DEBUG_EXTRAS:
        newest = max(DEBUG_OFFSETS_LAYOUTS)
        raise ProbeUnavailable("unsupported_version",
                               f"Python {ident.version} is newer than the frame layouts this "
                               f"exporter knows (up to {newest[0]}.{newest[1]})")
    try:
        data = pread(DEBUG_OFFSETS_LAYOUTS[mm]["_end"], ident.runtime_address)
        return frame_layout_from_debug_offsets(parse_debug_offsets(data, mm), mm)
    except OSError as exc:
        raise ProbeUnavailable("exited", f"pid {location.pid}: {exc}") from exc
    except BadOffsets as exc:
        raise ProbeUnavailable("bad_offsets", f"pid {location.pid}: {exc}") from exc
    except ValueError as exc:
        raise ProbeUnavailable("validation_failed", f"pid {location.pid}: {exc}") from exc


class StackReader:
    """Reads Python stacks of thread states of one target with os.pread on /proc/PID/mem.

    Decoded code objects are cached by their address and the pointers they hold (a freed
    code object whose memory is reused by another has other name and table pointers), so a
    frame usually costs two small reads: the frame and the head of its code object.
    """

    CACHE_MAX = 20000

    def __init__(self, location: GilLocation) -> None:
        fd = open_mem(location.pid)
        try:
            self._start(location.pid, pread_of(fd), layout_for(location, pread_of(fd)), fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def reading(cls, pread: Pread, layout: FrameLayout, pid: int = 0) -> StackReader:
        """A reader of the memory `pread` gives (os.pread's signature), with `layout`: what
        a parser test (tests/test_fuzz_readers.py) reads canned memory through."""
        reader = cls.__new__(cls)
        reader._start(pid, pread, layout, -1)
        return reader

    def _start(self, pid: int, pread: Pread, layout: FrameLayout, fd: int) -> None:
        self.pid, self.fd, self._pread, self.layout = pid, fd, pread, layout
        self._types: dict[bytes, int] = {}      # b"code" / b"bytes" / b"str" -> type address
        self._codes: dict[tuple[int, bytes], _Code] = {}
        self._mask = ~self.layout.code_tag_bits & 0xFFFFFFFFFFFFFFFF
        self._left: int | None = None        # bytes stack() may still read (READ_BUDGET)

    # -------------------------------------------------------------- raw reads
    def _read(self, addr: int, size: int, aligned: bool = True) -> bytes:
        """`size` bytes at `addr`; TornStack when the pointer cannot be one (null, misaligned,
        unmapped), ProbeUnavailable when the process is gone."""
        if addr <= 0 or (aligned and addr & 7):
            raise TornStack("misaligned pointer")
        if addr + size > USER_SPACE_END:     # torn or garbage: os.pread cannot even take it
            raise TornStack("not a user-space pointer")
        if self._left is not None:
            self._left -= size
            if self._left < 0:
                raise TornStack("stack too large to read in one call")
        try:
            data = self._pread(size, addr)
        except OSError as exc:
            if exc.errno == 5:            # EIO: nothing mapped there
                raise TornStack("unmapped pointer") from None
            raise ProbeUnavailable("exited", f"pid {self.pid}: {exc}") from exc
        if len(data) != size:
            if not data:
                raise ProbeUnavailable("exited", f"pid {self.pid}: memory no longer readable")
            raise TornStack("short read")
        return data

    def _is_type(self, type_addr: int, name: bytes) -> bool:
        """Is `type_addr` the type called `name`? Learnt once per type from tp_name."""
        known = self._types.get(name)
        if known is not None:
            return type_addr == known
        try:
            tp_name, = _U64.unpack(self._read(type_addr + self.layout.tp_name, 8))
            text = self._read(tp_name, len(name) + 1, aligned=False)
        except TornStack:
            return False
        if text != name + b"\0":
            return False
        self._types[name] = type_addr
        return True

    def _str(self, addr: int) -> str:
        lay = self.layout
        head = self._read(addr, lay.str_read)
        if not self._is_type(_U64.unpack_from(head, lay.ob_type)[0], b"str"):
            raise TornStack("name is not a str")
        length, = struct.unpack_from("<q", head, lay.str_length)
        state, = struct.unpack_from("<I", head, lay.str_state)
        kind, compact, ascii_ = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
        if not compact or kind not in (1, 2, 4) or (ascii_ and kind != 1) or not 0 <= length <= MAX_STR:
            raise TornStack("implausible str")
        if not length:
            return ""
        start = addr + (lay.str_ascii_size if ascii_ else lay.str_compact_size)
        raw = self._read(start, length * kind)
        codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
        try:
            return raw.decode("ascii" if ascii_ else codec)
        except UnicodeDecodeError:
            raise TornStack("undecodable str") from None

    def _code(self, addr: int) -> _Code:
        lay = self.layout
        head = self._read(addr, lay.code_read)
        if not self._is_type(_U64.unpack_from(head, lay.ob_type)[0], b"code"):
            raise TornStack("f_code is not a code object")
        key = (addr, head[lay.code_filename:lay.code_linetable + 8]
               + head[lay.code_firstlineno:lay.code_firstlineno + 4] + head[lay.ob_size:lay.ob_size + 8])
        hit = self._codes.get(key)
        if hit is not None:
            return hit
        units, = struct.unpack_from("<q", head, lay.ob_size)
        firstlineno, = struct.unpack_from("<i", head, lay.code_firstlineno)
        if not 0 < units < 1 << 24 or not 0 <= firstlineno < 1 << 28:
            raise TornStack("implausible code object")
        ptr = lambda off: _U64.unpack_from(head, off)[0]  # noqa: E731
        qualname = self._str(ptr(lay.code_qualname))
        filename = self._str(ptr(lay.code_filename))
        table_addr = ptr(lay.code_linetable)
        table_head = self._read(table_addr, lay.bytes_read)
        if not self._is_type(_U64.unpack_from(table_head, lay.ob_type)[0], b"bytes"):
            raise TornStack("co_linetable is not bytes")
        size, = struct.unpack_from("<q", table_head, lay.ob_size)
        if not 0 <= size <= MAX_LINETABLE:
            raise TornStack("implausible co_linetable")
        table = self._read(table_addr + lay.bytes_sval, size) if size else b""
        try:
            ends, lines = parse_linetable(table, firstlineno)
        except ValueError:
            raise TornStack("co_linetable does not parse") from None
        code = _Code(qualname, filename, firstlineno, units, tuple(ends), tuple(lines))
        if len(self._codes) >= self.CACHE_MAX:
            self._codes.clear()
        self._codes[key] = code
        return code

    # -------------------------------------------------------------- API
    def current_frame(self, tstate: int) -> int:
        """Address of the thread's innermost _PyInterpreterFrame (0: no Python frame)."""
        lay = self.layout
        frame, = _U64.unpack(self._read(tstate + lay.tstate_frame, 8))
        if lay.cframe_frame >= 0 and frame:
            frame, = _U64.unpack(self._read(frame + lay.cframe_frame, 8))
        return frame

    def native_thread_id(self, tstate: int) -> int:
        """The OS thread id (TID) of a thread state; 0 when unreadable."""
        try:
            return _U64.unpack(self._read(tstate + self.layout.tstate_native_thread_id, 8))[0]
        except TornStack:
            return 0

    def _walk(self, tstate: int) -> list[tuple[int, bytes]]:
        """(address, header bytes) of each frame from the innermost, following `previous`."""
        lay = self.layout
        out: list[tuple[int, bytes]] = []
        seen = set()
        addr = self.current_frame(tstate)
        while addr and len(out) < MAX_DEPTH:
            if addr in seen:
                raise TornStack("frame cycle")
            seen.add(addr)
            data = self._read(addr, lay.frame_read)
            out.append((addr, data))
            addr = _U64.unpack_from(data, lay.frame_previous)[0]
        return out

    def _same(self, walk: list[tuple[int, bytes]], again: list[tuple[int, bytes]]) -> bool:
        """Do two walks show the same frames: same addresses, links, code and owners, and the
        callers at the same instructions (the innermost one runs on)?"""
        if len(walk) != len(again):
            return False
        lay = self.layout
        fields = [(lay.frame_previous, 8), (lay.frame_code, 8), (lay.frame_owner, 1)]
        callers = fields + [(lay.frame_instr, 8)]
        for i, ((a1, d1), (a2, d2)) in enumerate(zip(walk, again)):
            if a1 != a2 or any(d1[o:o + n] != d2[o:o + n] for o, n in (callers if i else fields)):
                return False
        return True

    def stack(self, tstate: int) -> tuple[Frame, ...]:
        """The thread's Python stack, innermost frame first. Raises TornStack when the frames
        read do not form a valid stack, ProbeUnavailable when the process is gone.

        The thread runs while we read: frames return and their memory is reused by new calls
        at once. So the chain of frame headers is read twice (and once more if they differ),
        and kept only if nothing but the innermost frame's instruction moved in between (a
        caller's frame does not change while it waits for its callee); only then are the code
        objects decoded.
        """
        self._left = READ_BUDGET
        try:
            return self._stack(tstate)
        finally:
            self._left = None

    def _stack(self, tstate: int) -> tuple[Frame, ...]:
        lay = self.layout
        for attempt in range(2):
            walk = self._walk(tstate)
            if self._same(walk, self._walk(tstate)):
                break
        else:
            raise TornStack("stack changed during the read")
        frames: list[Frame] = []
        unpack = _U64.unpack_from
        for addr, data in walk:
            owner = data[lay.frame_owner]
            if owner > lay.owner_max:
                raise TornStack("unknown frame owner")
            if owner >= lay.owner_no_code:
                continue
            code_addr = unpack(data, lay.frame_code)[0] & self._mask
            code = self._code(code_addr)
            unit = unpack(data, lay.frame_instr)[0] - (code_addr + lay.code_adaptive)
            if unit % 2:
                raise TornStack("misaligned instruction pointer")
            unit //= 2
            # 3.11/3.12: prev_instr is one unit before the code in a frame not yet started
            if not -1 <= unit < code.units:
                raise TornStack("instruction outside its code object")
            line = line_of(code.ends, code.lines, unit) if unit >= 0 else None
            frames.append(Frame(code.qualname, code.filename,
                                code.firstlineno if line is None else line, code.firstlineno))
        return tuple(frames)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> StackReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
