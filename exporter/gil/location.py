"""Locating the GIL: find ``struct _gil_runtime_state`` in a live target and prove it is the GIL.

Strategies, in order (every candidate is validated against the live process first):

* ``debug_offsets`` (3.13+): ``_Py_DebugOffsets`` at the start of ``_PyRuntime``, read with the
  table for that minor version (layouts.py), walking to the main interpreter.
* ``offset_table`` (3.8-3.13): a measured offset inside ``_PyRuntime``.
* ``search``: every offset of ``_PyRuntime`` whose bytes look like a GIL; a unique valid one wins.
* ``debug_offsets_search`` (a version newer than the tables): only the stable first fields of
  ``_Py_DebugOffsets`` (the interpreter list) plus a search of the main interpreter for the
  pointer to its own GIL, validated. If that fails the answer is ``unsupported_version``: the
  probe never reads a version it does not know with a layout it guessed.
"""
from __future__ import annotations

import functools
import os
import struct
import time
from collections.abc import Sequence

from .identity import FUTEX_SYSCALL, Target, identify_target
from .layouts import (
    DEBUG_OFFSETS_LAYOUTS,
    DEBUG_OFFSETS_PREFIX,
    INTERPRETER_LAYOUTS,
    KNOWN_GIL_OFFSETS,
    RUNTIME_SIZE_MAX,
    BadOffsets,
    gil_layout,
    layout_from_debug_offsets,
    parse_debug_offsets,
    parse_debug_offsets_prefix,
    supports,
    thread_layout_from_debug_offsets,
)
from .memory import WritableRanges, host_arch, open_mem, pread_exact, task_ids, task_syscalls
from .records import GilLayout, GilLocation, ProbeUnavailable

# PyThreadState begins with prev, next, interp in every version 3.8 .. 3.15.
TSTATE_INTERP_OFFSET = 16

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
INT_MAX = 2**31 - 1

_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")


def futex_waiting_tids(pid: int, gil_address: int, layout: GilLayout,
                       calls: dict[int, tuple] | None = None) -> list[int]:
    """TIDs of the threads of `pid` blocked in futex() on the GIL's condvar words, from
    /proc/PID/task/*/syscall (or `calls`, that file of every thread read already).

    Needs the same permission as /proc/PID/mem, never stops the target.
    """
    nr = FUTEX_SYSCALL.get(host_arch())
    if nr is None:
        raise ProbeUnavailable("unsupported_arch", host_arch())
    lo, hi = layout.cond_words
    lo, hi = gil_address + lo, gil_address + hi
    if calls is None:
        calls = task_syscalls(pid)
    return [tid for tid, call in calls.items()
            if call[0] == nr and len(call) > 1 and lo <= call[1] < hi]


def futex_waiters(pid: int, gil_address: int, layout: GilLayout) -> int:
    """Threads of `pid` blocked in futex() on the GIL's condvar words (from /proc/PID/task/*/syscall).

    Needs the same permission as /proc/PID/mem, never stops the target.
    """
    return len(futex_waiting_tids(pid, gil_address, layout))


# --------------------------------------------------------------------------- validation

def structural_ok(data: bytes, off: int, layout: GilLayout, writable: WritableRanges,
                  ntasks: int, min_interval_us: int = LOCATE_INTERVAL_MIN_US) -> bool:
    """Cheap checks of one snapshot of a candidate GIL struct (plus its mutex) at `off`."""
    interval, = _U64.unpack_from(data, off + layout.interval)
    if not min_interval_us <= interval <= INTERVAL_MAX_US:
        return False
    if layout.enabled >= 0:
        enabled, pad = struct.unpack_from("<iI", data, off + layout.enabled)
        if not 0 <= enabled <= INT_MAX or pad:
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


class RuntimeView:
    """Lazily read copy of _PyRuntime, to tell the runtime's interpreter from look-alikes."""

    def __init__(self, pid: int, fd: int, address: int, size: int) -> None:
        # `size` is the st_size of the target's own ELF file: capped, like every read size
        # that comes from the target.
        self.pid, self.fd, self.address, self.size = pid, fd, address, min(size, RUNTIME_SIZE_MAX)
        self._data: bytes | None = None
        self.interpreters: set = set()    # interpreters known from _Py_DebugOffsets

    def __contains__(self, addr: int) -> bool:
        return self.address <= addr < self.address + self.size

    def holds_pointer(self, value: int) -> bool:
        """True if `value` is stored as an aligned pointer inside _PyRuntime."""
        if value in self.interpreters:
            return True
        if self._data is None:
            self._data = pread_exact(self.fd, self.size, self.address, self.pid)
        needle = _U64.pack(value)
        i = self._data.find(needle)
        while i >= 0:
            if i % 8 == 0:
                return True
            i = self._data.find(needle, i + 1)
        return False


def tstate_ok(pid: int, fd: int, holder: int, writable: WritableRanges, runtime: RuntimeView) -> str:
    """Is `holder` a live PyThreadState of the runtime's interpreter? "" if so.

    PyThreadState starts with prev, next, interp (3.8 .. 3.15). The interpreter must be
    inside _PyRuntime (3.12+ main interpreter) or be pointed to from it (3.8-3.11
    interpreters.head/main); prev->next and next->prev must point back at `holder`.
    """
    if holder & 7 or holder not in writable:
        return "last_holder is not a data pointer"
    try:
        prev, nxt, interp = struct.unpack("<QQQ", pread_exact(fd, 24, holder, pid))
        if not interp or interp & 7 or interp not in writable:
            return "last_holder->interp is not a data pointer"
        if interp not in runtime and not runtime.holds_pointer(interp):
            return "last_holder->interp is not the runtime's interpreter"
        if prev:
            if prev & 7 or prev not in writable:
                return "last_holder->prev is not a data pointer"
            back, = _U64.unpack(pread_exact(fd, 8, prev + 8, pid))
            if back != holder:
                return "last_holder->prev->next != last_holder"
        if nxt:
            if nxt & 7 or nxt not in writable:
                return "last_holder->next is not a data pointer"
            back, = _U64.unpack(pread_exact(fd, 8, nxt, pid))
            if back != holder:
                return "last_holder->next->prev != last_holder"
    except ProbeUnavailable as exc:
        if exc.reason == "validation_failed":
            return "last_holder is not readable"
        raise
    return ""


def validate(pid: int, fd: int, address: int, layout: GilLayout, maps: Sequence,
             runtime: RuntimeView, reads: int = 6, pause: float = 0.004,
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
    writable = WritableRanges(maps)
    size = layout.mutex + 40
    tids = set(task_ids(pid))
    prev_switch = None
    waiters_seen = 0
    good_holders = bad_locked = 0
    checked: dict[int, str] = {}
    for i in range(reads):
        if i:
            time.sleep(pause)
        data = pread_exact(fd, size, address, pid)
        if not structural_ok(data, 0, layout, writable, len(tids) + 4):
            return "structure"
        owner, = _I32.unpack_from(data, layout.mutex + 8)
        if owner and owner not in tids:
            tids = set(task_ids(pid))
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
                checked[holder] = tstate_ok(pid, fd, holder, writable, runtime)
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
    if waiters_seen >= reads and not _some_waiter_blocked(pid, address, layout, pause):
        return "waiters counted but none futex-blocked on the condvar"
    return ""


def _some_waiter_blocked(pid: int, address: int, layout: GilLayout, pause: float) -> bool:
    """On average >= 1 waiter was counted: some thread must be futex-blocked on this condvar.
    On an overloaded box a waiter whose timed wait expired can stay runnable (and counted in
    __wrefs) for a while before it runs: give it up to ~0.1 s."""
    for _ in range(25):
        if futex_waiters(pid, address, layout) > 0:
            return True
        time.sleep(pause)
    return False


# --------------------------------------------------------------------------- strategies

def _main_interpreter(pid: int, fd: int, runtime_address: int, offs: dict[str, int]) -> int:
    """interpreters.head is the newest interpreter; the main one is the last in the list."""
    interp, = _U64.unpack(pread_exact(fd, 8, runtime_address + offs["runtime_state.interpreters_head"], pid))
    for _ in range(256):
        nxt, = _U64.unpack(pread_exact(fd, 8, interp + offs["interpreter_state.next"], pid))
        if not nxt:
            return interp
        interp = nxt
    raise ProbeUnavailable("validation_failed", f"pid {pid}: interpreter list does not end")


def _search(pid: int, fd: int, target: Target, layout: GilLayout) -> list[int]:
    """Offsets inside _PyRuntime whose bytes look like a GIL struct (cheap checks only)."""
    rt_addr = target.identity.runtime_address
    size = target.elf.runtime[1]
    if not size or size > RUNTIME_SIZE_MAX:
        size = 1 << 20
    data = pread_exact(fd, size, rt_addr, pid)
    writable = WritableRanges(target.maps)
    ntasks = len(task_ids(pid)) + 4
    out = []
    unpack_q = _U64.unpack_from
    for off in range(0, size - (layout.mutex + 40) + 1, 8):
        iv, = unpack_q(data, off + layout.interval)
        if LOCATE_INTERVAL_MIN_US <= iv <= INTERVAL_MAX_US and structural_ok(data, off, layout, writable, ntasks):
            out.append(off)
    return out


def _strategy(method: str):
    """A strategy of _Locator: bad data (ValueError) or an unreadable address ends it with a
    reason in `why` and None; the target exiting or denying access ends locate() itself, and
    so do debug offsets that the target published but that cannot describe it (bad_offsets):
    a target that lies about its layout is not read with any other one either."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(self, *args):
            try:
                return fn(self, *args)
            except BadOffsets as exc:
                raise ProbeUnavailable("bad_offsets", f"pid {self.pid}: {exc}") from exc
            except ValueError as exc:
                self.why.append(f"{method}: {exc}")
            except ProbeUnavailable as exc:
                if exc.reason != "validation_failed":
                    raise
                self.why.append(f"{method}: {exc.detail}")
            return None
        return run
    return wrap


class _Locator:
    """One locate() call: the target, its memory fd, and why each strategy failed."""

    def __init__(self, pid: int, target: Target, layout: GilLayout, fd: int) -> None:
        self.pid, self.target, self.layout, self.fd = pid, target, layout, fd
        ident = target.identity
        self.rt = ident.runtime_address
        self.rt_size = target.elf.runtime[1] or 0
        self.runtime = RuntimeView(pid, fd, self.rt, max(self.rt_size, 8))
        self.why: list[str] = []

    def location(self, address: int, method: str, layout: GilLayout | None = None,
                 interpreter: int = 0, threads=None) -> GilLocation:
        return GilLocation(self.pid, address, layout or self.layout, self.target.identity, method,
                           self.rt_size, interpreter, threads)

    def check(self, address: int, layout: GilLayout | None = None, **kw) -> str:
        try:
            return validate(self.pid, self.fd, address, layout or self.layout, self.target.maps,
                            self.runtime, **kw)
        except ProbeUnavailable as exc:
            if exc.reason != "validation_failed":
                raise
            return exc.detail

    def require(self, address: int, layout: GilLayout | None = None, prefix: str = "") -> None:
        bad = self.check(address, layout)
        if bad:
            raise ValueError(prefix + bad)

    @_strategy("debug_offsets")
    def debug_offsets(self, mm: tuple[int, int]) -> GilLocation:
        offs = read_debug_offsets(self.pid, self.fd, self.rt, mm)
        layout = layout_from_debug_offsets(offs, self.target.condvar)
        interp = _main_interpreter(self.pid, self.fd, self.rt, offs)
        gil_ptr, = _U64.unpack(pread_exact(self.fd, 8, interp + offs["interpreter_state.ceval_gil"], self.pid))
        own = interp + offs["interpreter_state.gil_runtime_state"]
        if gil_ptr != own:
            raise ValueError(f"ceval.gil {gil_ptr:#x} != interp->_gil {own:#x}")
        self.runtime.interpreters.add(interp)
        self.require(own, layout)
        return self.location(own, "debug_offsets", layout, interp, thread_layout_from_debug_offsets(offs))

    @_strategy("debug_offsets_search")
    def debug_offsets_search(self) -> GilLocation:
        """A version without a table: the stable prefix finds the main interpreter; its GIL is
        the struct inside it that one of its own words points at (interp->ceval.gil), validated."""
        offs = parse_debug_offsets_prefix(
            pread_exact(self.fd, DEBUG_OFFSETS_PREFIX["_end"], self.rt, self.pid))
        isize = offs["interpreter_state.size"]
        if not (offs["runtime_state.interpreters_head"] + 8 <= offs["runtime_state.size"] <= 64 << 20
                and 1024 <= isize <= 16 << 20):
            raise ValueError("implausible _Py_DebugOffsets prefix")
        interp = _main_interpreter(self.pid, self.fd, self.rt, offs)
        data = pread_exact(self.fd, isize, interp, self.pid)
        self.runtime.interpreters.add(interp)
        size = self.layout.mutex + 40
        cands = sorted({v for (v,) in _U64.iter_unpack(data)
                        if interp < v <= interp + isize - size and not (v - interp) % 8})
        good = [a for a in cands[:64] if not self.check(a, reads=4, strict=True)]
        if len(good) != 1:
            raise ValueError(f"{len(cands)} pointers into the interpreter, {len(good)} valid GILs")
        return self.location(good[0], "debug_offsets_search", interpreter=interp)

    @_strategy("offset_table")
    def offset_table(self, mm: tuple[int, int]) -> GilLocation | None:
        ident = self.target.identity
        off = KNOWN_GIL_OFFSETS.get(ident.version, KNOWN_GIL_OFFSETS.get(f"{mm[0]}.{mm[1]}"))
        if off is None or self.rt_size < off + self.layout.mutex + 40:
            return None
        self.require(self.rt + off, prefix=f"{off}: ")
        return self.location(self.rt + off, "offset_table")

    @_strategy("search")
    def search(self, mm: tuple[int, int]) -> GilLocation:
        cands = _search(self.pid, self.fd, self.target, self.layout)
        good = []
        for off in cands[:32]:
            # 3.12+: the main interpreter (inside _PyRuntime) points at its GIL
            # (interp->ceval.gil); below 3.12 the GIL is _PyRuntime.ceval.gil itself.
            if supports(mm, "own_gils") and not self.runtime.holds_pointer(self.rt + off):
                continue
            if not self.check(self.rt + off, reads=4, strict=True):
                good.append(off)
        if len(good) != 1:
            raise ValueError(f"{len(cands)} candidates, {len(good)} valid {good[:4]}")
        return self.location(self.rt + good[0], "search")


def read_debug_offsets(pid: int, fd: int, runtime_address: int, minor: tuple[int, int]) -> dict[str, int]:
    """The target's _Py_DebugOffsets, parsed and validated (layouts.parse_debug_offsets): one
    read of the size of our own table for that version. Raises ValueError (BadOffsets)."""
    size = DEBUG_OFFSETS_LAYOUTS[minor]["_end"]
    return parse_debug_offsets(pread_exact(fd, size, runtime_address, pid), minor)


def interpreters(pid: int, fd: int, runtime_address: int, offs: dict[str, int]) -> list[tuple[int, int]]:
    """(address, id) of every interpreter of the process, newest first (the main one last)."""
    out = []
    interp, = _U64.unpack(pread_exact(fd, 8, runtime_address + offs["runtime_state.interpreters_head"], pid))
    while interp and len(out) < 256:
        iid, = struct.unpack("<q", pread_exact(fd, 8, interp + offs["interpreter_state.id"], pid))
        out.append((interp, iid))
        interp, = _U64.unpack(pread_exact(fd, 8, interp + offs["interpreter_state.next"], pid))
    return out


def locate_all(pid: int) -> list[GilLocation]:
    """Every distinct GIL of the process, the main interpreter's first (other_gils())."""
    main = locate(pid)
    return [main] + other_gils(main)


def other_gils(main: GilLocation, known: dict[int, GilLocation] | None = None) -> list[GilLocation]:
    """The GILs of the subinterpreters that have one of their own, by interpreter id.

    Since 3.12 a subinterpreter may have its own GIL (concurrent.interpreters and
    InterpreterPoolExecutor create them so): `interp->ceval.gil` then points at the
    interpreter's own `_gil`, and that struct is validated like the main one (`known`, by
    address, are taken as they are). Interpreters that share the main GIL add nothing. The
    interpreter list is read through _Py_DebugOffsets on 3.13+, and on 3.12 through
    INTERPRETER_LAYOUTS, trusted only when it leads from the main interpreter to the GIL that
    locate() found. Cheap when nothing changed: a few reads per interpreter.
    """
    pid = main.pid
    mm = main.identity.minor
    if main.method == "debug_offsets" and mm in DEBUG_OFFSETS_LAYOUTS:
        static = None
    elif mm in INTERPRETER_LAYOUTS and not main.identity.free_threaded:
        static = INTERPRETER_LAYOUTS[mm]
    else:
        return []
    known = known or {}
    fd = open_mem(pid)
    try:
        rt = main.identity.runtime_address
        try:
            offs = static or read_debug_offsets(pid, fd, rt, mm)
        except ValueError as exc:      # changed since locate() read them: trust none of it
            reason = "bad_offsets" if isinstance(exc, BadOffsets) else "validation_failed"
            raise ProbeUnavailable(reason, f"pid {pid}: {exc}") from exc
        listed = interpreters(pid, fd, rt, offs)
        if static is not None and (
                not listed or listed[-1][0] + offs["interpreter_state.gil_runtime_state"] != main.address):
            return []             # not the layout we know: the main GIL alone, as located
        runtime = RuntimeView(pid, fd, rt, max(main.runtime_size, 8))
        runtime.interpreters.update(a for a, _ in listed)
        maps = None
        found: dict[int, GilLocation] = {}
        for interp, iid in listed:
            gil_ptr, = _U64.unpack(pread_exact(fd, 8, interp + offs["interpreter_state.ceval_gil"], pid))
            own = interp + offs["interpreter_state.gil_runtime_state"]
            if gil_ptr != own or own == main.address or own in found:
                continue          # shares another interpreter's GIL (or is the main one)
            loc = known.get(own)
            if loc is None or loc.interpreter != interp or loc.interpreter_id != iid:
                maps = identify_target(pid).maps if maps is None else maps
                if validate(pid, fd, own, main.layout, maps, runtime, reads=3):
                    continue      # torn or being torn down: skip it this time
                loc = GilLocation(pid, own, main.layout, main.identity, main.method,
                                  main.runtime_size, interp, main.threads, iid)
            found[own] = loc
        return sorted(found.values(), key=lambda loc: loc.interpreter_id)
    finally:
        os.close(fd)


def locate(pid: int, *, methods: Sequence[str] = ("debug_offsets", "offset_table", "search")) -> GilLocation:
    """Find and validate the main interpreter's GIL. Raises ProbeUnavailable.

    `methods` restricts the strategies (tests use it to exercise each one).
    """
    target = identify_target(pid)
    ident = target.identity
    if ident.libc == "musl":
        raise ProbeUnavailable("musl", "musl condvars keep waiters on the waiter's stack")
    if ident.libc != "glibc" or target.condvar is None:
        raise ProbeUnavailable("unknown_layout", f"libc {ident.libc} {ident.libc_version or '?'}: "
                                                 f"condvar layout unknown")
    mm = ident.minor
    if not supports(mm, "gil"):
        raise ProbeUnavailable("unknown_layout", f"unsupported version {ident.version!r}")
    known = mm in DEBUG_OFFSETS_LAYOUTS or not supports(mm, "debug_offsets")
    layout = gil_layout(ident.free_threaded, target.condvar)
    fd = open_mem(pid)
    try:
        loc = _Locator(pid, target, layout, fd)
        found = None
        if not known:
            if "search" in methods:
                found = loc.debug_offsets_search()
            if found is None:
                raise ProbeUnavailable(
                    "unsupported_version",
                    f"pid {pid}: Python {ident.version} is newer than the layouts this exporter "
                    f"knows (up to {max(DEBUG_OFFSETS_LAYOUTS)[0]}.{max(DEBUG_OFFSETS_LAYOUTS)[1]}); "
                    + "; ".join(loc.why))
            return found
        if "debug_offsets" in methods and supports(mm, "debug_offsets"):
            found = loc.debug_offsets(mm)
        # A free-threaded build is only read through its own _Py_DebugOffsets: with the GIL
        # switched off, a search has too little live evidence to tell the GIL from junk.
        if found is None and not ident.free_threaded:
            if "offset_table" in methods:
                found = loc.offset_table(mm)
            if found is None and "search" in methods:
                found = loc.search(mm)
        if found is None:
            raise ProbeUnavailable("validation_failed", f"pid {pid} {ident.version}: " + "; ".join(loc.why))
        return found
    finally:
        os.close(fd)
