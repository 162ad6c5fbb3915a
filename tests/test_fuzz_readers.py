"""Fuzzing the readers of target memory (issue 16): the frame reader, the thread-state walker,
the _Py_DebugOffsets parser and validator, and the ELF readers, given arbitrary bytes for the
target's memory.

Unit tier: memory is canned here, a `Memory` of regions read as os.pread reads
/proc/PID/mem (short at a region's end, EIO where nothing is mapped). The seeds are
structurally valid images built from the layout tables themselves (layouts.DEBUG_SECTIONS,
frames.STATIC_FRAME_LAYOUTS, ...), never memory read from a live interpreter; Hypothesis then
overwrites bytes and pointers, truncates and unmaps regions, and publishes hostile offsets.

Every call must:
* raise nothing but what the reader documents (TornStack, ProbeUnavailable, BadOffsets/
  ValueError, NotElf, ...), or return its documented "unreadable" value;
* stay within a read budget counted through the fake Pread (reads and bytes per call, from
  the readers' own ceilings), and within a CPU-time ceiling (a hang detector);
* allocate at most a bounded amount (tracemalloc peak per call).

CI runs a fixed, derandomized budget (about 2,000 examples, 14 s of CPU, database off). A
longer run: GIL_EXPORTER_FUZZ_EXAMPLES=N examples per target, random seeds, with -s for the
worst figures per reader (the command and a run's figures: BENCHMARKS.md, "Fuzzing the
readers").
"""
from __future__ import annotations

import bisect
import errno
import functools
import gc
import os
import struct
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import elftools.elf.elffile  # noqa: F401  (elf.load imports it lazily: not inside a timed call)
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.gil import elf, frames, layouts, threads
from exporter.gil.frames import (
    MAX_DEPTH,
    STATIC_FRAME_LAYOUTS,
    FrameLayout,
    StackReader,
    TornStack,
    frame_layout_from_debug_offsets,
    layout_for,
)
from exporter.gil.layouts import (
    DEBUG_COOKIE,
    DEBUG_OFFSETS_LAYOUTS,
    DEBUG_SECTIONS,
    DEFAULT_LAYOUT,
    FIELD_WIDTHS,
    SECTION_MAX,
    SECTION_MAX_DEFAULT,
    BadOffsets,
    layout_from_debug_offsets,
    parse_debug_offsets,
    parse_debug_offsets_prefix,
    thread_layout_from_debug_offsets,
)
from exporter.gil.memory import USER_SPACE_END
from exporter.gil.records import GilLocation, GilReading, ProbeUnavailable, PythonIdentity, ThreadStateLayout
from exporter.gil.threads import MAX_SPAN, MAX_THREADS, GilThreads, ThreadIds, ThreadWalker

# ------------------------------------------------------------------ budget of the run

LONG_RUN = int(os.environ.get("GIL_EXPORTER_FUZZ_EXAMPLES", "0"))


def fuzz_settings(ci_examples: int):
    """CI: `ci_examples`, derandomized, no example database (reproducible). A long run: the
    env var's count, random seeds."""
    return settings(max_examples=LONG_RUN or ci_examples, derandomize=not LONG_RUN,
                    database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


#: CPU seconds one call may take: a hang detector (the reads are counted exactly below). The
#: thread's CPU time, not wall time, so a busy host does not push a call across it.
CPU_MAX = 1.0
#: tracemalloc peak of one call (the fuzzed memories are small; a reader that allocates by a
#: size the target published would cross it).
ALLOC_MAX = 16 << 20

# ------------------------------------------------------------------ canned memory


class Memory:
    """Target memory for parser tests: {address: bytes} regions, read with os.pread's contract
    on /proc/PID/mem (short at a region's end, OSError EIO where nothing is mapped), counting
    every read. Sizes and offsets os.pread itself refuses raise what os.pread raises."""

    def __init__(self, regions: dict[int, bytes], limit: int = 1 << 62) -> None:
        self.regions = dict(sorted(regions.items()))
        self.limit = limit      # bytes per call past which a read fails the test at once
        self._starts = list(self.regions)
        self.reset()

    def reset(self) -> None:
        self.reads = 0
        self.bytes = 0          # requested, not returned: what a buffer would be sized by
        self.largest = 0

    def pread(self, size: int, addr: int) -> bytes:
        self.reads += 1
        if size < 0:
            raise ValueError("negative buffersize in pread")
        if not 0 <= addr < 1 << 63:
            raise OverflowError("Python int too large to convert to C long")
        if size > 1 << 30:
            raise MemoryError(f"pread of {size} bytes")
        self.bytes += size
        assert self.bytes <= self.limit, f"{self.bytes} bytes read in one call (ceiling {self.limit})"
        self.largest = max(self.largest, size)
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start = self._starts[i]
            data = self.regions[start]
            if addr < start + len(data) or (addr == start + len(data) and not size):
                return bytes(data[addr - start:addr - start + size])
        raise OSError(errno.EIO, "Input/output error")

    def read(self, addr: int, size: int) -> bytes:
        """identity._glibc_condvar's read: pread_exact's errors."""
        if not 0 <= addr <= USER_SPACE_END - size:
            raise ProbeUnavailable("validation_failed", f"{addr:#x} is no user-space address")
        try:
            data = self.pread(size, addr)
        except OSError:
            raise ProbeUnavailable("validation_failed", f"{addr:#x} not readable") from None
        if len(data) != size:
            raise ProbeUnavailable("validation_failed", f"short read at {addr:#x}")
        return data


@dataclass(frozen=True)
class Cost:
    reads: int
    bytes: int
    largest: int
    cpu: float
    peak: int


#: the worst figures of the run, per target (printed by a long run)
WORST: dict[str, dict[str, float]] = {}
OUTCOMES: dict[str, Counter] = {}


@pytest.fixture(scope="module", autouse=True)
def figures():
    yield
    if LONG_RUN:
        for name, worst in sorted(WORST.items()):
            print(f"\nfuzz {name}: {dict(OUTCOMES[name])}; worst "
                  + ", ".join(f"{k}={v:.4g}" for k, v in worst.items()), file=sys.stderr)


def call(name: str, memory: Memory | None, fn: Callable, allowed: tuple[type, ...]):
    """fn(), its result or one of the `allowed` exceptions, and what it cost. Anything else
    propagates: a crash."""
    if memory is not None:
        memory.reset()
    tracemalloc.start()          # per call: tracing the whole run would slow Hypothesis 3x
    gc.disable()                 # a collection of Hypothesis's garbage is not the reader's time
    t0 = time.thread_time()
    try:
        out = fn()
        outcome = "ok"
    except allowed as exc:
        out = exc
        outcome = f"{type(exc).__name__}:{getattr(exc, 'reason', '')}"
    finally:
        cpu = time.thread_time() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        gc.enable()
    cost = Cost(memory.reads if memory else 0, memory.bytes if memory else 0,
                memory.largest if memory else 0, cpu, peak)
    worst = WORST.setdefault(name, {})
    for k in ("reads", "bytes", "largest", "cpu", "peak"):
        worst[k] = max(worst.get(k, 0), getattr(cost, k))
    OUTCOMES.setdefault(name, Counter())[outcome.split(":")[0] if outcome != "ok" else "ok"] += 1
    assert cost.cpu < CPU_MAX, f"{name} took {cost.cpu:.3f} s of CPU"
    assert cost.peak < ALLOC_MAX, f"{name} allocated {cost.peak} B"
    return out, cost


# ------------------------------------------------------------------ mutations

#: 8-byte values a hostile or torn target puts where a pointer or size belongs
HOSTILE_WORDS = [0, 1, 7, 8, 0xFF, 1 << 31, (1 << 31) - 1, 1 << 32, 1 << 48, USER_SPACE_END - 8,
                 USER_SPACE_END, 1 << 63, (1 << 64) - 1, (1 << 64) - 8]


@st.composite
def mutations(draw, max_count: int = 8):
    """Edits of an image: ("bytes", region, offset, data), ("word", region, offset, value),
    ("point", region, offset, (target region, delta)), ("cut", region, length),
    ("unmap", region)."""
    out = []
    for _ in range(draw(st.integers(0, max_count))):
        kind = draw(st.sampled_from(["bytes", "word", "word", "point", "point", "cut", "unmap"]))
        region = draw(st.integers(0, 1 << 16))
        if kind == "bytes":
            out.append((kind, region, draw(st.integers(0, 1 << 16)), draw(st.binary(min_size=1, max_size=16))))
        elif kind == "word":
            value = draw(st.sampled_from(HOSTILE_WORDS) | st.integers(0, (1 << 64) - 1))
            out.append((kind, region, draw(st.integers(0, 1 << 16)), value))
        elif kind == "point":
            out.append((kind, region, draw(st.integers(0, 1 << 16)),
                        (draw(st.integers(0, 1 << 16)), draw(st.sampled_from([0, 0, 1, 8, -8, 16, 4096])))))
        elif kind == "cut":
            out.append((kind, region, draw(st.integers(0, 1 << 16))))
        else:
            out.append((kind, region))
    return out


def mutate(regions: dict[int, bytes], edits) -> dict[int, bytes]:
    """`regions` with `edits` applied (indices taken modulo what exists; words 8-aligned)."""
    out = {a: bytearray(d) for a, d in regions.items()}
    for edit in edits:
        if not out:
            break
        keys = sorted(out)
        start = keys[edit[1] % len(keys)]
        data = out[start]
        kind = edit[0]
        if kind == "unmap":
            del out[start]
        elif kind == "cut":
            del data[edit[2] % (len(data) + 1):]
        elif data:
            if kind == "bytes":
                off = edit[2] % len(data)
                data[off:off + len(edit[3])] = edit[3]
                del data[len(regions[start]):]
            else:
                off = (edit[2] % len(data)) & ~7
                value = edit[3] if kind == "word" else keys[edit[3][0] % len(keys)] + edit[3][1]
                data[off:off + 8] = struct.pack("<Q", value % (1 << 64))[:len(data) - off]
    return {a: bytes(d) for a, d in out.items()}


def put(buf: bytearray, off: int, fmt: str, value) -> None:
    struct.pack_into(fmt, buf, off, value)


# ------------------------------------------------------------------ _Py_DebugOffsets images

#: Plausible values of every field the readers use, self-consistent (sections large enough,
#: fields apart); fields not listed are 0, sizes not listed 64. Any consistent numbers do:
#: the readers use only what the target publishes.
SEED_OFFSETS: dict[str, int] = {
    "runtime_state.size": 200_000, "runtime_state.finalizing": 40, "runtime_state.interpreters_head": 632,
    "interpreter_state.size": 100_000, "interpreter_state.id": 8, "interpreter_state.next": 0,
    "interpreter_state.threads_head": 72, "interpreter_state.threads_main": 80,
    "interpreter_state.ceval_gil": 4000, "interpreter_state.gil_runtime_state": 8000,
    "interpreter_state.gil_runtime_state_enabled": 0,
    "interpreter_state.gil_runtime_state_locked": 8016, "interpreter_state.gil_runtime_state_holder": 8008,
    "thread_state.size": 480, "thread_state.prev": 0, "thread_state.next": 8, "thread_state.interp": 16,
    "thread_state.current_frame": 72, "thread_state.base_frame": 80, "thread_state.thread_id": 152,
    "thread_state.native_thread_id": 160, "thread_state.datastack_chunk": 184, "thread_state.status": 24,
    "thread_state.holds_gil": 200, "thread_state.gil_requested": 204,
    "interpreter_frame.size": 80, "interpreter_frame.previous": 8, "interpreter_frame.executable": 0,
    "interpreter_frame.instr_ptr": 56, "interpreter_frame.localsplus": 72,
    "interpreter_frame.owner": 70, "interpreter_frame.stackpointer": 64,
    "code_object.size": 208, "code_object.filename": 112, "code_object.name": 120,
    "code_object.qualname": 128, "code_object.linetable": 136, "code_object.firstlineno": 68,
    "code_object.argcount": 60, "code_object.co_code_adaptive": 200,
    "pyobject.size": 16, "pyobject.ob_type": 8,
    "type_object.size": 416, "type_object.tp_name": 24, "type_object.tp_flags": 168,
    "bytes_object.size": 40, "bytes_object.ob_size": 16, "bytes_object.ob_sval": 32,
    "unicode_object.size": 64, "unicode_object.state": 32, "unicode_object.length": 16,
    "unicode_object.asciiobject_size": 40, "unicode_object.compactunicodeobject_size": 56,
}
VERSIONS = sorted(DEBUG_SECTIONS)
HEXVERSION = {v: (v[0] << 24) | (v[1] << 16) | 0xF0 for v in VERSIONS}


def debug_offsets_fields(version) -> dict[str, int]:
    """Every field of `version`'s table with its seed value."""
    out = {}
    for name in DEBUG_OFFSETS_LAYOUTS[version]:
        if name in ("_end", "cookie"):
            continue
        out[name] = SEED_OFFSETS.get(name, 64 if name.endswith(".size") else 0)
    out["version"] = HEXVERSION[version]
    out["free_threaded"] = 0
    return out


def debug_offsets_bytes(version, values: dict[str, int]) -> bytes:
    """_Py_DebugOffsets of `version` as a target lays it out: cookie, then uint64 fields."""
    table = DEBUG_OFFSETS_LAYOUTS[version]
    buf = bytearray(table["_end"])
    buf[:8] = DEBUG_COOKIE
    for name, off in table.items():
        if name not in ("_end", "cookie"):
            put(buf, off, "<Q", values[name] % (1 << 64))
    return bytes(buf)


def seed_frame_layout(version) -> FrameLayout:
    if version in STATIC_FRAME_LAYOUTS:
        return STATIC_FRAME_LAYOUTS[version]
    return frame_layout_from_debug_offsets(parse_debug_offsets(
        debug_offsets_bytes(version, debug_offsets_fields(version)), version), version)


# ------------------------------------------------------------------ stack images

TYPES = 0x1000_0000           # the code, str and bytes type objects, and their tp_name strings
TSTATE = 0x2000_0000
FRAMES = 0x3000_0000
CODES = 0x4000_0000
STRS = 0x5000_0000
TABLES = 0x6000_0000
TYPE_NAMES = (b"code", b"str", b"bytes")


def type_address(name: bytes) -> int:
    return TYPES + 0x100 * TYPE_NAMES.index(name)


@dataclass(frozen=True)
class CodeSpec:
    qualname: str
    filename: str
    firstlineno: int
    entries: tuple[tuple[int, int, int], ...]     # (form, code units, line delta) per entry


@dataclass(frozen=True)
class FrameSpec:
    code: int          # index into the codes
    unit: int          # instruction, taken modulo the code's length
    owner: int         # 0: a Python frame, >= owner_no_code: an entry frame without code


def encode_linetable(entries, firstlineno: int) -> tuple[bytes, list[int], list[int | None]]:
    """A 3.11+ co_linetable from (form, units, delta) entries, with the (ends, lines) it
    stands for. Forms: 0 short, 10 one-line (delta 0..2), 13 no-column, 14 long, 15 none."""
    out = bytearray()
    ends, lines = [], []
    line, unit = firstlineno, 0

    def varint(v):
        while v >= 64:
            out.append(64 | (v & 63))
            v >>= 6
        out.append(v)

    for form, units, delta in entries:
        head = 0x80 | (form << 3) | (units - 1)
        out.append(head)
        if form == 15:
            entry = None
        elif form in (13, 14):
            varint((-delta << 1) | 1 if delta < 0 else delta << 1)
            line += delta
            if form == 14:
                varint(0)
                varint(1)
                varint(2)
            entry = line
        elif form == 10:
            line += delta % 3
            out[-1] = 0x80 | ((10 + delta % 3) << 3) | (units - 1)
            out += b"\x01\x02"
            entry = line
        else:
            out.append(3)
            entry = line
        unit += units
        ends.append(unit)
        lines.append(entry)
    return bytes(out), ends, lines


def str_object(lay: FrameLayout, text: str) -> bytes:
    top = max(map(ord, text), default=0)
    ascii_ = top < 128
    kind = 1 if top < 256 else 2 if top < 65536 else 4
    codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
    start = lay.str_ascii_size if ascii_ else lay.str_compact_size
    buf = bytearray(max(start, lay.str_state + 4) + len(text) * kind + kind)
    put(buf, lay.ob_type, "<Q", type_address(b"str"))
    put(buf, lay.str_length, "<q", len(text))
    put(buf, lay.str_state, "<I", (kind << 2) | (1 << 5) | (int(ascii_) << 6))
    buf[start:start + len(text) * kind] = text.encode(codec)
    return bytes(buf)


def stack_image(lay: FrameLayout, codes: Sequence[CodeSpec], stack: Sequence[FrameSpec],
                tag: int = 0) -> tuple[dict[int, bytes], tuple[tuple[str, str, int, int], ...]]:
    """Memory regions of one thread state and its frames, and the stack the reader must give
    for it: (qualname, filename, line, firstlineno) from the innermost frame."""
    regions: dict[int, bytes] = {}
    for name in TYPE_NAMES:
        t = bytearray(lay.tp_name + 8)
        put(t, lay.tp_name, "<Q", type_address(name) + 0x80)
        regions[type_address(name)] = bytes(t)
        regions[type_address(name) + 0x80] = name + b"\0"
    decoded = []
    for j, c in enumerate(codes):
        table, ends, lines = encode_linetable(c.entries, c.firstlineno)
        units = ends[-1]
        code = CODES + j * 0x10000
        buf = bytearray(max(lay.code_read, lay.code_adaptive + 2 * units))
        put(buf, lay.ob_type, "<Q", type_address(b"code"))
        put(buf, lay.ob_size, "<q", units)
        put(buf, lay.code_firstlineno, "<i", c.firstlineno)
        for k, (off, text) in enumerate([(lay.code_qualname, c.qualname), (lay.code_filename, c.filename),
                                         (lay.code_name, c.qualname.rsplit(".", 1)[-1])]):
            addr = STRS + j * 0x10000 + k * 0x4000
            regions[addr] = str_object(lay, text)
            put(buf, off, "<Q", addr)
        tb = bytearray(lay.bytes_sval + len(table) + 1)
        put(tb, lay.ob_type, "<Q", type_address(b"bytes"))
        put(tb, lay.ob_size, "<q", len(table))
        tb[lay.bytes_sval:lay.bytes_sval + len(table)] = table
        regions[TABLES + j * 0x10000] = bytes(tb)
        put(buf, lay.code_linetable, "<Q", TABLES + j * 0x10000)
        regions[code] = bytes(buf)
        decoded.append((code, units, ends, lines))
    expected = []
    for i, f in enumerate(stack):
        addr = FRAMES + i * 0x100
        buf = bytearray(lay.frame_read)
        put(buf, lay.frame_previous, "<Q", FRAMES + (i + 1) * 0x100 if i + 1 < len(stack) else 0)
        buf[lay.frame_owner] = f.owner
        if f.owner < lay.owner_no_code:
            code, units, ends, lines = decoded[f.code % len(decoded)]
            unit = f.unit % units
            put(buf, lay.frame_code, "<Q", code | (tag & lay.code_tag_bits))
            put(buf, lay.frame_instr, "<Q", code + lay.code_adaptive + 2 * unit)
            c = codes[f.code % len(codes)]
            line = frames.line_of(ends, lines, unit)
            expected.append((c.qualname, c.filename, c.firstlineno if line is None else line, c.firstlineno))
        regions[addr] = bytes(buf)
    ts = bytearray(lay.tstate_read)
    put(ts, lay.tstate_native_thread_id, "<Q", 4242)
    first = FRAMES if stack else 0
    if lay.cframe_frame >= 0:
        cframe = bytearray(lay.cframe_frame + 8)
        put(cframe, lay.cframe_frame, "<Q", first)
        regions[TSTATE + 0x1000] = bytes(cframe)
        first = TSTATE + 0x1000
    put(ts, lay.tstate_frame, "<Q", first)
    regions[TSTATE] = bytes(ts)
    return regions, tuple(expected)


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=24)
entries = st.lists(st.tuples(st.sampled_from([0, 10, 13, 14, 15]), st.integers(1, 8),
                             st.integers(-40, 40)), min_size=1, max_size=12)
code_specs = st.builds(CodeSpec, names, names, st.integers(1, 100_000), entries.map(tuple))


def frame_specs(lay: FrameLayout):
    owners = st.sampled_from([0, 0, 0, 1] + list(range(lay.owner_no_code, lay.owner_max + 1)))
    return st.builds(FrameSpec, st.integers(0, 7), st.integers(0, 1 << 20), owners)


#: Reads and bytes one stack() may cost: up to four walks of MAX_DEPTH frames (two attempts,
#: each read twice) and the decoding of their code objects (12 reads each at most), all
#: within frames.READ_BUDGET bytes.
def stack_ceiling(lay: FrameLayout) -> tuple[int, int]:
    return 4 * (MAX_DEPTH + 2) + MAX_DEPTH * 12, frames.READ_BUDGET


STACK_ALLOWED = (TornStack, ProbeUnavailable)
ALL_LAYOUTS = sorted(set(STATIC_FRAME_LAYOUTS) | set(VERSIONS))


def read_stack(name: str, lay: FrameLayout, regions: dict[int, bytes], tstate: int = TSTATE):
    reads, nbytes = stack_ceiling(lay)
    memory = Memory(regions, nbytes)
    reader = StackReader.reading(memory.pread, lay)
    out, cost = call(name, memory, lambda: reader.stack(tstate), STACK_ALLOWED)
    assert cost.reads <= reads and cost.bytes <= nbytes, cost
    if isinstance(out, tuple):
        assert len(out) <= MAX_DEPTH
        for f in out:
            assert isinstance(f, frames.Frame)
            assert len(f.qualname) <= frames.MAX_STR and len(f.filename) <= frames.MAX_STR
    # a second read through the same reader (its type and code caches) obeys the same rules
    again, cost = call(name, memory, lambda: reader.stack(tstate), STACK_ALLOWED)
    assert cost.reads <= reads and cost.bytes <= nbytes, cost
    return out


@pytest.mark.parametrize("version", ALL_LAYOUTS, ids=lambda v: f"{v[0]}.{v[1]}")
@fuzz_settings(80)
@given(data=st.data())
def test_stack_reader_on_mutated_stacks(version, data):
    lay = seed_frame_layout(version)
    codes = data.draw(st.lists(code_specs, min_size=1, max_size=4))
    stack = data.draw(st.lists(frame_specs(lay), min_size=0, max_size=12))
    regions, expected = stack_image(lay, codes, stack, tag=data.draw(st.integers(0, 3)))
    edits = data.draw(mutations())
    out = read_stack(f"stack {version}", lay, mutate(regions, edits))
    if not edits:
        # the seed itself is a valid stack: the reader gives exactly the frames it holds
        assert out == tuple(frames.Frame(*e) for e in expected)


@pytest.mark.parametrize("version", ALL_LAYOUTS, ids=lambda v: f"{v[0]}.{v[1]}")
@fuzz_settings(40)
@given(blobs=st.lists(st.binary(min_size=0, max_size=512), min_size=1, max_size=6),
       tstate=st.sampled_from([TSTATE, TSTATE + 8, 0, 1 << 63]) | st.integers(0, (1 << 64) - 1))
def test_stack_reader_on_random_memory(version, blobs, tstate):
    """Memory of nothing but random bytes at the places where a stack would be; then the same
    bytes behind a valid thread state, so the walk goes on into them."""
    lay = seed_frame_layout(version)
    bases = [TSTATE, TSTATE + 0x1000, FRAMES, CODES, STRS, TABLES, TYPES]
    read_stack(f"stack-random {version}", lay, dict(zip(bases, blobs)), tstate)
    regions, _ = stack_image(lay, [CodeSpec("f", "f.py", 1, ((0, 1, 0),))], [FrameSpec(0, 0, 0)])
    regions.update(zip(bases[2:], blobs))
    read_stack(f"stack-random {version}", lay, regions)


def test_location_table_with_endless_varints():
    """Found reviewing what the harness's CPU ceiling guards: a varint of continuation bytes
    grew one integer by 6 bits per byte, quadratic time (64 KiB: 0.15 s, a 256 KiB table
    seconds) and a line number too long to print. A varint longer than a C int's 36 bits
    is a table that does not parse."""
    lay = STATIC_FRAME_LAYOUTS[(3, 12)]
    table = bytes([0x80 | (13 << 3)]) + b"\x7f" * (64 << 10) + b"\x00"
    out, cost = call("linetable", None, lambda: frames.parse_linetable(table, 1), (ValueError,))
    assert isinstance(out, ValueError)
    # a line delta of 2**31 - 1 (a C int's worst) still parses
    big, ends, lines = encode_linetable([(13, 1, (1 << 31) - 1), (14, 2, -(1 << 31) + 1)], 1)
    assert frames.parse_linetable(big, 1) == (ends, lines)
    regions, _ = stack_image(lay, [CodeSpec("f", "f.py", 1, ((0, 1, 0),))], [FrameSpec(0, 0, 0)])
    tb = bytearray(lay.bytes_sval + len(table))
    put(tb, lay.ob_type, "<Q", type_address(b"bytes"))
    put(tb, lay.ob_size, "<q", len(table))
    tb[lay.bytes_sval:] = table
    regions[TABLES] = bytes(tb)
    assert isinstance(read_stack("stack-varint", lay, regions), TornStack)


def deep_stack(lay: FrameLayout, depth: int, table_size: int) -> dict[int, bytes]:
    """`depth` frames, each with a code object of its own, all sharing one location table
    of `table_size` bytes: little target memory that costs depth * table_size to decode."""
    regions, _ = stack_image(lay, [CodeSpec("f", "f.py", 1, ((0, 1, 0),) * (table_size // 2))],
                             [FrameSpec(0, 0, 0)] * depth)
    code = regions.pop(CODES)
    for i in range(depth):
        addr = FRAMES + i * 0x100
        frame = bytearray(regions[addr])
        put(frame, lay.frame_code, "<Q", CODES + i * 0x1000)
        put(frame, lay.frame_instr, "<Q", CODES + i * 0x1000 + lay.code_adaptive)
        regions[addr] = bytes(frame)
        regions[CODES + i * 0x1000] = code[:max(lay.code_read, lay.code_adaptive + 2)]
    return regions


@pytest.mark.parametrize("version", [(3, 12), (3, 14)], ids=lambda v: f"{v[0]}.{v[1]}")
def test_stack_of_many_code_objects_sharing_a_huge_table_is_bounded(version):
    """Found by the harness's ceiling: 1024 code objects pointing at one 64 KiB location table
    cost 64 MiB of reads and minutes of decoding per stack() (the cache is keyed by the code
    object). Now one call reads at most frames.READ_BUDGET and drops the stack; what it
    decoded stays cached, so the next calls finish it."""
    lay = seed_frame_layout(version)
    regions = deep_stack(lay, MAX_DEPTH, 64 << 10)
    memory = Memory(regions, frames.READ_BUDGET)
    reader = StackReader.reading(memory.pread, lay)
    out, cost = call("deep-stack", memory, lambda: reader.stack(TSTATE), STACK_ALLOWED)
    assert isinstance(out, TornStack) and cost.bytes <= frames.READ_BUDGET
    # a legitimately deep stack (one code object, as recursion has) is read whole
    regions, expected = stack_image(lay, [CodeSpec("g", "g.py", 7, ((13, 2, 1),) * 50)],
                                    [FrameSpec(0, 3, 0)] * MAX_DEPTH)
    memory = Memory(regions, frames.READ_BUDGET)
    out, cost = call("deep-stack", memory, lambda: StackReader.reading(memory.pread, lay).stack(TSTATE),
                     STACK_ALLOWED)
    assert out == tuple(frames.Frame(*e) for e in expected)


# ------------------------------------------------------------------ _Py_DebugOffsets

RUNTIME = 0x7000_0000_0000


def offsets_values(version):
    """Seed values with a few replaced by hostile ones."""
    names_ = sorted(debug_offsets_fields(version))
    # the fields the readers use, and their sections' sizes, most of the time
    used = sorted((set(FIELD_WIDTHS) | {f"{n.split('.')[0]}.size" for n in FIELD_WIDTHS}
                   | {"interpreter_state.gil_runtime_state_enabled", "free_threaded"}) & set(names_))
    hostile = st.sampled_from(HOSTILE_WORDS + [SECTION_MAX_DEFAULT, SECTION_MAX_DEFAULT - 8, 4096, 4095,
                                               layouts.RUNTIME_SIZE_MAX, layouts.GIL_STRUCT_MAX])
    # plausible numbers that each fit their section but not one another
    small = st.integers(0, 64).map(lambda k: 8 * k) | st.integers(0, 520)
    return st.dictionaries(st.sampled_from(used) | st.sampled_from(names_),
                           small | hostile | st.integers(0, (1 << 64) - 1), max_size=6)


def check_parsed(offs: dict[str, int]) -> None:
    """What validate_debug_offsets promises of what it let through."""
    for name, width in FIELD_WIDTHS.items():
        if name in offs:
            section = name.split(".", 1)[0]
            size = offs[f"{section}.size"]
            assert 0 < size <= SECTION_MAX.get(section, SECTION_MAX_DEFAULT)
            assert offs[name] + width <= size, name


def use_offsets(version, offs: dict[str, int]) -> None:
    """Everything built from parsed offsets: each raises only what it documents."""
    out, _ = call("gil-layout", None, lambda: layout_from_debug_offsets(offs, layouts.CONDVARS[25]),
                  (ValueError,))
    tl = thread_layout_from_debug_offsets(offs)
    walker, _ = call("thread-layout", None, lambda: ThreadWalker(Memory({}).pread, 0x1000, tl),
                     (ProbeUnavailable,))
    if isinstance(walker, ProbeUnavailable):
        assert walker.reason == "bad_offsets"
    fl, _ = call("frame-layout", None, lambda: frame_layout_from_debug_offsets(offs, version), (BadOffsets,))
    if isinstance(fl, FrameLayout):
        read_stack(f"stack-offsets {version}", fl, seed_stack(version))


@functools.cache
def _seed_stack(version) -> tuple[tuple[int, bytes], ...]:
    regions, _ = stack_image(seed_frame_layout(version), [CodeSpec("f", "f.py", 1, ((0, 1, 0),))],
                             [FrameSpec(0, 0, 0)] * 3)
    return tuple(regions.items())


def seed_stack(version) -> dict[int, bytes]:
    """A valid three-frame stack of `version`'s seed layout (read with other layouts)."""
    return dict(_seed_stack(version))


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"{v[0]}.{v[1]}")
@fuzz_settings(80)
@given(data=st.data())
def test_debug_offsets_hostile_values(version, data):
    values = {**debug_offsets_fields(version), **data.draw(offsets_values(version))}
    raw = debug_offsets_bytes(version, values)
    raw = raw[:data.draw(st.sampled_from([len(raw), len(raw), len(raw) - 1, 24, 8]))]
    offs, _ = call("debug-offsets", None, lambda: parse_debug_offsets(raw, version), (ValueError,))
    if isinstance(offs, dict):
        check_parsed(offs)
        use_offsets(version, offs)
    prefix, _ = call("debug-offsets-prefix", None, lambda: parse_debug_offsets_prefix(raw), (ValueError,))
    if isinstance(prefix, dict):
        check_parsed(prefix)
    # frames.layout_for reads them from the target itself, through a Pread
    ident = PythonIdentity("cpython", f"{version[0]}.{version[1]}.0", False, "/x", RUNTIME, "glibc", "2.36")
    loc = GilLocation(1, RUNTIME + 8000, DEFAULT_LAYOUT, ident, "debug_offsets")
    memory = Memory({RUNTIME: raw})
    lay, cost = call("layout-for", memory, lambda: layout_for(loc, memory.pread), (ProbeUnavailable,))
    assert cost.reads <= 1 and cost.bytes <= DEBUG_OFFSETS_LAYOUTS[version]["_end"]
    if not [k for k in values if values[k] != debug_offsets_fields(version)[k]] and len(raw) == len(
            debug_offsets_bytes(version, values)):
        assert isinstance(lay, FrameLayout)       # the seed itself is valid


@pytest.mark.parametrize("field,value", [("unicode_object.state", 0), ("unicode_object.length", 40),
                                         ("bytes_object.ob_sval", 0), ("pyobject.ob_type", 8)])
def test_stack_with_inconsistent_object_offsets(field, value):
    """Found by the harness: offsets each inside its own section but inconsistent with one
    another (a str's state before its type, a bytes object's data at 0) made the str and
    location-table heads shorter than the fields unpacked from them: struct.error out of
    stack(), which diagnose --stacks and top do not expect. Each read now covers every
    field taken from it."""
    version = (3, 13)
    values = {**debug_offsets_fields(version), field: value}
    offs = parse_debug_offsets(debug_offsets_bytes(version, values), version)
    lay = frame_layout_from_debug_offsets(offs, version)
    read_stack("stack-inconsistent", lay, seed_stack(version))


@fuzz_settings(150)
@given(raw=st.binary(max_size=1200), cookie=st.booleans(),
       version=st.sampled_from(VERSIONS + [(3, 12), (3, 16), (4, 0)]))
def test_debug_offsets_random_bytes(raw, cookie, version):
    if cookie:
        raw = DEBUG_COOKIE + struct.pack("<Q", (version[0] << 24) | (version[1] << 16)) + raw
    for mm in (None, version):
        offs, _ = call("debug-offsets-random", None, lambda: parse_debug_offsets(raw, mm), (ValueError,))
        if isinstance(offs, dict):
            check_parsed(offs)
            use_offsets(version, offs)
    prefix, _ = call("debug-offsets-prefix", None, lambda: parse_debug_offsets_prefix(raw), (ValueError,))
    if isinstance(prefix, dict):
        check_parsed(prefix)


# ------------------------------------------------------------------ thread states

INTERP = 0x7100_0000
TSTATES = 0x7200_0000
PTHREADS = 0x7300_0000
THREAD_VERSIONS = [v for v in VERSIONS]


def seed_thread_layout(version) -> ThreadStateLayout:
    return thread_layout_from_debug_offsets(parse_debug_offsets(
        debug_offsets_bytes(version, debug_offsets_fields(version)), version))


def thread_image(lay: ThreadStateLayout, flags: Sequence[tuple[bool, bool]], size: int = 480):
    """An interpreter whose thread list holds one state per (holds_gil, gil_requested), and
    the ThreadStates a walk must give for it."""
    regions: dict[int, bytes] = {}
    head = bytearray(lay.threads_head + 8)
    put(head, lay.threads_head, "<Q", TSTATES if flags else 0)
    regions[INTERP] = bytes(head)
    expected = []
    for i, (holds, req) in enumerate(flags):
        addr = TSTATES + i * 0x800
        ts = bytearray(size)
        put(ts, lay.next, "<Q", addr + 0x800 if i + 1 < len(flags) else 0)
        put(ts, lay.interp, "<Q", INTERP)
        put(ts, lay.native_thread_id, "<Q", 1000 + i)
        if lay.has_gil_flags:
            put(ts, lay.holds_gil, "<i", int(holds))
            put(ts, lay.gil_requested, "<i", int(req))
        regions[addr] = bytes(ts)
        expected.append(threads.ThreadState(addr, 1000 + i, holds if lay.has_gil_flags else None,
                                            req if lay.has_gil_flags else None))
    return regions, expected


def walk_ceiling(walker: ThreadWalker) -> tuple[int, int]:
    """Reads and bytes of one states() or waiting(): the head, and per state its span and a
    TID read outside it."""
    return 1 + 2 * MAX_THREADS, 8 + MAX_THREADS * (walker.span + 8)


def walk(name: str, walker: ThreadWalker, memory: Memory):
    reads, nbytes = walk_ceiling(walker)
    memory.limit = nbytes
    states, cost = call(name, memory, walker.states, ())
    assert cost.reads <= reads and cost.bytes <= nbytes, cost
    if states is not None:
        assert len(states) <= MAX_THREADS
        assert len({s.address for s in states}) == len(states)
        assert all(0 < s.address < USER_SPACE_END and not s.address & 7 for s in states)
    waiting, cost = call(name, memory, walker.waiting, ())
    assert cost.reads <= reads and cost.bytes <= nbytes, cost
    assert waiting is None or 0 <= waiting <= MAX_THREADS
    return states, waiting


flag_lists = st.lists(st.tuples(st.booleans(), st.booleans()), max_size=10)


@pytest.mark.parametrize("version", THREAD_VERSIONS, ids=lambda v: f"{v[0]}.{v[1]}")
@fuzz_settings(80)
@given(flags=flag_lists, edits=mutations())
def test_thread_walker_on_mutated_lists(version, flags, edits):
    lay = seed_thread_layout(version)
    regions, expected = thread_image(lay, flags)
    memory = Memory(mutate(regions, edits))
    walker = ThreadWalker(memory.pread, INTERP, lay)
    states, waiting = walk(f"threads {version}", walker, memory)
    if not edits:
        assert states == expected
        assert waiting == (sum(1 for h, r in flags if r and not h) if lay.has_gil_flags else None)
    # who holds and who waits, by TID, from the same memory
    ids = ThreadIds(memory.pread, thread_location(version, lay))
    gt = GilThreads(memory.pread, thread_location(version, lay), walker)
    for s in expected:
        tid, cost = call("thread-ids", memory, lambda: ids.tid(s.address), ())
        assert 0 <= tid < 1 << 31 and cost.reads <= 2 and cost.bytes <= 16
        reading = GilReading(5000, True, 1, len(flags), s.address)
        holder, _ = call("gil-threads", memory, lambda: gt.holder(reading), ())
        assert 0 <= holder < 1 << 31
        waiters, _ = call("gil-threads", memory, lambda: gt.waiting(reading, dict, holder), ())
        assert isinstance(waiters, tuple) and len(waiters) <= MAX_THREADS


def thread_location(version, lay: ThreadStateLayout | None, libc_version: str = "2.36") -> GilLocation:
    ident = PythonIdentity("cpython", f"{version[0]}.{version[1]}.0", False, "/x", RUNTIME, "glibc",
                           libc_version)
    return GilLocation(1, RUNTIME + 8000, DEFAULT_LAYOUT, ident, "debug_offsets", 0, INTERP, lay)


offsets = (st.integers(0, 64).map(lambda k: 8 * k) | st.integers(-8, 520)
           | st.sampled_from([-1, 0, 8, 16, MAX_SPAN - 8, MAX_SPAN - 4, MAX_SPAN, 1 << 31, 1 << 63,
                              USER_SPACE_END]) | st.integers(-(1 << 64), 1 << 64))


@fuzz_settings(200)
@given(fields=st.fixed_dictionaries({k: st.none() | offsets for k in ("threads_head", "next", "interp",
                                                                       "native_thread_id", "holds_gil",
                                                                       "gil_requested")}),
       flags=flag_lists, interp=st.sampled_from([INTERP, INTERP, 0, 1, 1 << 63, USER_SPACE_END - 8]))
def test_thread_walker_with_hostile_layouts(fields, flags, interp):
    """Offsets as a target may publish them (each the 3.15 seed's where None): the walker
    refuses them (bad_offsets) or walks within its ceilings; a thread's TID is read as 0
    rather than past user space."""
    seed = seed_thread_layout((3, 15))
    lay = ThreadStateLayout(**{k: getattr(seed, k) if v is None else v for k, v in fields.items()})
    regions, _ = thread_image(seed_thread_layout((3, 15)), flags)
    memory = Memory(regions)
    walker, _ = call("thread-layout", None, lambda: ThreadWalker(memory.pread, interp, lay),
                     (ProbeUnavailable,))
    if isinstance(walker, ProbeUnavailable):
        assert walker.reason == "bad_offsets"
    else:
        walk("threads-hostile-layout", walker, memory)
    ids, _ = call("thread-ids", None, lambda: ThreadIds(memory.pread, thread_location((3, 15), lay)),
                  (ProbeUnavailable,))
    if isinstance(ids, ThreadIds):
        for addr in [TSTATES, TSTATES + 0x800, 0, 1 << 63]:
            tid, cost = call("thread-ids", memory, lambda: ids.tid(addr), ())
            assert 0 <= tid < 1 << 31 and cost.reads <= 2 and cost.bytes <= 16


@pytest.mark.parametrize("version", [(3, 9), (3, 10), (3, 11), (3, 12)], ids=lambda v: f"{v[0]}.{v[1]}")
@fuzz_settings(50)
@given(edits=mutations(), libc=st.sampled_from(["2.36", "2.43", "2.24", "", "x.y", "2"]),
       tstate=st.sampled_from([TSTATES, TSTATES + 8, 0, 1 << 63]) | st.integers(-1, 1 << 64))
def test_thread_ids_before_debug_offsets(version, edits, libc, tstate):
    """3.8-3.12 thread states: the TID at the static offset (3.11, 3.12) or through the
    thread's pthread_t into glibc's struct pthread (3.8-3.10)."""
    ident = thread_location(version, None, libc)
    ids, _ = call("thread-ids", None, lambda: ThreadIds(Memory({}).pread, ident), (ProbeUnavailable,))
    if isinstance(ids, ProbeUnavailable):
        assert ids.reason == "unknown_layout" and version < (3, 11)
        return
    ts = bytearray(512)
    pthread = bytearray(1024)
    if ids.pthread_tid >= 0:
        put(ts, ids.offset, "<Q", PTHREADS)
        put(pthread, ids.pthread_tid, "<i", 777)
    else:
        put(ts, ids.offset, "<Q", 777)
    memory = Memory(mutate({TSTATES: bytes(ts), PTHREADS: bytes(pthread)}, edits))
    ids = ThreadIds(memory.pread, ident)
    tid, cost = call("thread-ids", memory, lambda: ids.tid(tstate), ())
    assert 0 <= tid < 1 << 31 and cost.reads <= 2 and cost.bytes <= 16
    if not edits and tstate == TSTATES:
        assert tid == 777


# ------------------------------------------------------------------ ELF: a mapped libc image

LIBC = 0x7F00_0000_0000


def libc_image(versions: Sequence[str], relocated: bool) -> dict[int, bytes]:
    """A 64-bit ELF image as ld.so maps it: ELF header, PT_LOAD and PT_DYNAMIC, the dynamic
    section (DT_STRTAB, DT_VERDEF, DT_VERDEFNUM), the version definitions and their names."""
    strtab = bytearray(b"\0")
    name_offs = []
    for v in versions:
        name_offs.append(len(strtab))
        strtab += v.encode() + b"\0"
    bias = LIBC if relocated else 0
    head = bytearray(0x1000)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    head[:elf._EHDR.size] = elf._EHDR.pack(ident, 3, 62, 1, 0, 64, 0, 0, 64, elf._PHDR.size, 2, 64, 0, 0)
    head[64:64 + 2 * elf._PHDR.size] = (elf._PHDR.pack(elf.PT_LOAD, 5, 0, 0, 0, 0x4000, 0x4000, 0x1000)
                                        + elf._PHDR.pack(elf.PT_DYNAMIC, 6, 0x1000, 0x1000, 0x1000, 64, 64, 8))
    dyn = b"".join(elf._DYN.pack(t, v) for t, v in [
        (elf.DT_STRTAB, bias + 0x2000), (elf.DT_VERDEF, bias + 0x3000),
        (elf.DT_VERDEFNUM, len(versions)), (elf.DT_NULL, 0)])
    verdefs = bytearray()
    for i, off in enumerate(name_offs):
        nxt = 28 if i + 1 < len(versions) else 0
        verdefs += elf._VERDEF.pack(1, 0, i + 1, 1, 0, 20, nxt) + elf._VERDAUX.pack(off, 0)
    return {LIBC: bytes(head), LIBC + 0x1000: dyn, LIBC + 0x2000: bytes(strtab) + b"\0" * 64,
            LIBC + 0x3000: bytes(verdefs)}


glibc_versions = st.lists(st.sampled_from(["GLIBC_2.2.5", "GLIBC_2.17", "GLIBC_2.25", "GLIBC_2.34",
                                           "GLIBC_2.36", "GLIBC_2.41", "GLIBC_2.43", "GLIBC_PRIVATE",
                                           "GLIBC_2.x"]), min_size=1, max_size=8)
#: version_definitions reads: the ELF header, the program headers (< 64), the dynamic section
#: (<= 4096 B) and per definition (<= 256) its verdef, verdaux and 64 bytes of name.
ELF_IMAGE_CEILING = (3 + 3 * 256, elf._EHDR.size + 63 * elf._PHDR.size + 4096
                     + 256 * (elf._VERDEF.size + elf._VERDAUX.size + 64))


@fuzz_settings(200)
@given(versions=glibc_versions, relocated=st.booleans(), edits=mutations())
def test_mapped_libc_version_definitions(versions, relocated, edits):
    """elf.version_definitions over a mapped libc (identity.py: the glibc version, hence the
    condvar layout): NotElf, struct.error or ProbeUnavailable (what identity catches), or
    version names, within its ceilings."""
    memory = Memory(mutate(libc_image(versions, relocated), edits), ELF_IMAGE_CEILING[1])
    out, cost = call("libc-image", memory, lambda: elf.version_definitions(memory.read, LIBC),
                     (elf.NotElf, struct.error, ProbeUnavailable))
    assert cost.reads <= ELF_IMAGE_CEILING[0]
    if isinstance(out, tuple):
        assert len(out) <= 256 and all(isinstance(n, str) and len(n) <= 64 for n in out)
        elf.glibc_minor(out)
    if not edits:
        assert out == tuple(versions)


# ------------------------------------------------------------------ ELF: a libpython file

def libpython_file(soname: str, runtime: tuple[int, int], build_id: bytes, extra_symbols: int) -> bytes:
    """A minimal libpython-like ELF64 shared object: two PT_LOADs (the second writable), a
    PT_DYNAMIC with DT_SONAME, a PT_NOTE with the GNU build id, and section headers for
    .dynsym (_PyRuntime, Py_Version, `extra_symbols` more), .dynstr, .dynamic and .shstrtab.
    Every address equals its file offset (the first PT_LOAD maps the file from 0)."""
    dynstr = bytearray(b"\0")

    def string(s: str) -> int:
        dynstr.extend(s.encode() + b"\0")
        return len(dynstr) - len(s) - 1

    syms = [struct.pack("<IBBHQQ", 0, 0, 0, 0, 0, 0),
            struct.pack("<IBBHQQ", string("_PyRuntime"), 0x11, 0, 6, runtime[0], runtime[1]),
            struct.pack("<IBBHQQ", string("Py_Version"), 0x11, 0, 1, 0x800, 4)]
    syms += [struct.pack("<IBBHQQ", string(f"sym{i}"), 0x12, 0, 1, 0x900 + i, 0) for i in range(extra_symbols)]
    so = string(soname)
    note = struct.pack("<III", 4, len(build_id), 3) + b"GNU\0" + build_id
    body = {}
    pos = 0x200
    for name, data in [("note", note), ("dynsym", b"".join(syms)), ("dynstr", bytes(dynstr))]:
        body[name] = (pos, data)
        pos = (pos + len(data) + 15) & ~15
    dyn_off = pos
    dynamic = b"".join(elf._DYN.pack(t, v) for t, v in [
        (14, so), (5, body["dynstr"][0]), (6, body["dynsym"][0]), (10, len(dynstr)), (11, 24), (0, 0)])
    body["dynamic"] = (dyn_off, dynamic)
    shstr = b"\0.dynsym\0.dynstr\0.dynamic\0.note\0.shstrtab\0"
    body["shstrtab"] = ((dyn_off + len(dynamic) + 15) & ~15, shstr)
    shoff = (body["shstrtab"][0] + len(shstr) + 63) & ~63
    size = shoff + 6 * 64
    phdrs = [elf._PHDR.pack(elf.PT_LOAD, 5, 0, 0, 0, size, size, 0x1000),
             elf._PHDR.pack(elf.PT_LOAD, 6, 0, 0x10000, 0x10000, 0, 0x40000, 0x1000),
             elf._PHDR.pack(elf.PT_DYNAMIC, 6, dyn_off, dyn_off, dyn_off, len(dynamic), len(dynamic), 8),
             elf._PHDR.pack(4, 4, body["note"][0], body["note"][0], body["note"][0], len(note), len(note), 4)]
    out = bytearray(size)
    out[:64] = elf._EHDR.pack(b"\x7fELF\x02\x01\x01" + b"\0" * 9, 3, 62, 1, 0, 64, shoff, 0, 64,
                              elf._PHDR.size, len(phdrs), 64, 6, 5)
    out[64:64 + len(phdrs) * elf._PHDR.size] = b"".join(phdrs)
    for off, data in body.values():
        out[off:off + len(data)] = data
    shdr = struct.Struct("<IIQQQQIIQQ")
    secs = [shdr.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
            shdr.pack(shstr.index(b".dynsym"), 11, 2, body["dynsym"][0], body["dynsym"][0],
                      len(body["dynsym"][1]), 2, 1, 8, 24),
            shdr.pack(shstr.index(b".dynstr"), 3, 2, body["dynstr"][0], body["dynstr"][0], len(dynstr), 0, 0, 1, 0),
            shdr.pack(shstr.index(b".dynamic"), 6, 3, dyn_off, dyn_off, len(dynamic), 2, 0, 8, 16),
            shdr.pack(shstr.index(b".note"), 7, 2, body["note"][0], body["note"][0], len(note), 0, 0, 4, 0),
            shdr.pack(shstr.index(b".shstrtab"), 3, 0, 0, body["shstrtab"][0], len(shstr), 0, 0, 1, 0)]
    out[shoff:shoff + 6 * 64] = b"".join(secs)
    return bytes(out)


@pytest.fixture(scope="module")
def elf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("elf")


@fuzz_settings(60)
@given(soname=st.sampled_from(["libpython3.12.so.1.0", "libpython3.13t.so.1.0", ""]),
       runtime=st.tuples(st.integers(0x10000, 0x40000), st.integers(0, 1 << 20)),
       build_id=st.binary(min_size=1, max_size=20), extra=st.integers(0, 8),
       edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)), max_size=6),
       cut=st.none() | st.integers(0, 1 << 16))
def test_libpython_elf_file(elf_dir, soname, runtime, build_id, extra, edits, cut):
    """elf.load over a mutated libpython file (what identify parses for _PyRuntime): an ElfInfo
    or NotElf, never another exception, within its read budget."""
    raw = bytearray(libpython_file(soname, runtime, build_id, extra))
    for off, data in edits:
        off %= len(raw)
        raw[off:off + len(data)] = data[:len(raw) - off]
    if cut is not None:
        del raw[cut % (len(raw) + 1):]
    path = elf_dir / "libpython.so"
    path.write_bytes(bytes(raw))
    out, cost = call("libpython-file", None, lambda: elf.load(str(path)), (elf.NotElf,))
    if not edits and cut is None:
        assert isinstance(out, elf.ElfInfo), out
        assert (out.runtime, out.py_version, out.soname, out.build_id, out.rw_segments) == (
            runtime, 0x800, soname, build_id.hex(), ((0x10000, 0x40000),))


# ------------------------------------------------------------------ the interpreter list (location.py)

INTERPS = 0x7400_0000


def memfd_of(regions: dict[int, bytes]) -> int:
    """A sparse memfd holding `regions` at their addresses: what location.py's fd-based
    readers (pread_exact) read. Unlike /proc/PID/mem, holes read as zeros and the end as EOF."""
    fd = os.memfd_create("fuzz-target", os.MFD_CLOEXEC)
    for addr, data in regions.items():
        os.pwrite(fd, data, addr)
    return fd


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"{v[0]}.{v[1]}")
@fuzz_settings(40)
@given(data=st.data(), count=st.integers(1, 4), edits=mutations())
def test_interpreter_list(version, data, count, edits):
    """location.interpreters and _main_interpreter, through offsets the validator let
    through: ProbeUnavailable or at most 256 interpreters, never a read past user space."""
    from exporter.gil import location
    raw = debug_offsets_bytes(version, {**debug_offsets_fields(version), **data.draw(offsets_values(version))})
    try:
        offs = parse_debug_offsets(raw, version)
    except ValueError:
        offs = parse_debug_offsets(debug_offsets_bytes(version, debug_offsets_fields(version)), version)
    head = offs["runtime_state.interpreters_head"]
    runtime = bytearray(raw + bytes(max(0, head + 8 - len(raw))))
    put(runtime, head, "<Q", INTERPS)
    regions = {RUNTIME: bytes(runtime)}
    for i in range(count):
        interp = bytearray(max(offs["interpreter_state.id"], offs["interpreter_state.next"]) + 8)
        put(interp, offs["interpreter_state.id"], "<q", count - 1 - i)
        put(interp, offs["interpreter_state.next"], "<Q", INTERPS + (i + 1) * 0x10000 if i + 1 < count else 0)
        regions[INTERPS + i * 0x10000] = bytes(interp)
    fd = memfd_of(mutate(regions, edits))
    try:
        listed, _ = call("interpreters", None, lambda: location.interpreters(1, fd, RUNTIME, offs),
                         (ProbeUnavailable,))
        main, _ = call("main-interpreter", None, lambda: location._main_interpreter(1, fd, RUNTIME, offs),
                       (ProbeUnavailable,))
    finally:
        os.close(fd)
    if isinstance(listed, list):
        assert len(listed) <= 256
    if isinstance(main, int):
        assert 0 <= main < 1 << 64
    if not edits and abs(offs["interpreter_state.id"] - offs["interpreter_state.next"]) >= 8:
        assert [iid for _a, iid in listed] == list(range(count - 1, -1, -1))
        assert main == INTERPS + (count - 1) * 0x10000
