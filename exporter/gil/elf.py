"""ELF reading: what the probe needs from a CPython binary (file) and from a mapped libc (memory).

Files are parsed with pyelftools and cached by the digest of their first page, which holds the
ELF header, the program headers and (on every toolchain we know) the build-id note: a file
replaced on disk by another build can never be served from the cache under the old key.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from .. import targetfile

EM_SUPPORTED = {"EM_X86_64": "x86_64", "EM_AARCH64": "aarch64"}
HEAD_SIZE = 4096   # bytes compared between a candidate file and the target's mapping
# What one parse may read: headers, notes, .dynsym and .dynstr. A libpython reads well under
# 1 MiB (docs/gil-internals.md, "Which file"); the ceilings keep a crafted file from costing more.
READ_BUDGET = 16 << 20
MAX_SYMBOLS = 1 << 15     # a libpython defines about 2,000; each costs ~50 µs to parse


class NotElf(Exception):
    """The file is not an ELF file pyelftools can parse (not ELF, truncated, corrupt)."""


@dataclass(frozen=True)
class ElfInfo:
    machine: str             # "x86_64" | "aarch64" | other e_machine
    elfclass: int
    first_load_vaddr: int
    rw_segments: tuple[tuple[int, int], ...]   # (vaddr, memsz) of writable PT_LOADs
    runtime: tuple[int, int] | None         # (st_value, st_size) of a defined _PyRuntime
    py_version: int | None                  # st_value of Py_Version (3.11+)
    soname: str
    interp: str                                # PT_INTERP (ld-musl-... on musl)
    build_id: str


_cache: dict[str, ElfInfo] = {}
_lock = threading.Lock()


def head_key(head: bytes) -> str:
    return hashlib.sha1(head).hexdigest()


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def load(path: str, key: str = "", follow_symlinks: bool = False) -> ElfInfo:
    """Parse what we need from the ELF file at `path`; cached under `key` when given.

    The file is the target's: opened only if regular (targetfile.py; `follow_symlinks` for
    the kernel's magic links), parsed only if its first page still has the digest `key`
    (nothing swapped in since it was compared with the mapping), and read through
    BoundedFile. Raises NotElf for anything pyelftools cannot parse, and for a file that
    asks for more than the reading budget.
    """
    if key:
        with _lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
    try:
        fd = targetfile.open_regular(path, follow_symlinks)
    except OSError as exc:
        raise NotElf(f"{path}: {exc.strerror or exc}") from exc
    try:
        f = BoundedFile(fd, READ_BUDGET)
        if key and head_key(os.pread(fd, HEAD_SIZE, 0)) != key:
            raise NotElf(f"{path}: changed on disk while being read")
        info = _parse(path, f)
    finally:
        os.close(fd)
    if key:
        with _lock:
            _cache[key] = info
    return info


class BudgetExceeded(Exception):
    """A read past the file's budget: a file built to make its parser read without end."""


class BoundedFile:
    """The read/seek/tell that pyelftools needs, over an fd, by pread, with a byte budget.

    A hostile ELF can claim a section of terabytes (a sparse file costs nothing): every read
    is checked against what is left of the budget before a buffer is allocated.
    """

    def __init__(self, fd: int, budget: int) -> None:
        self._fd = fd
        self._pos = 0
        self._size = os.fstat(fd).st_size
        self.left = budget

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = max(self._size - self._pos, 0)
        n = min(n, max(self._size - self._pos, 0))
        if n > self.left:
            raise BudgetExceeded(f"asks to read more than {READ_BUDGET >> 20} MiB")
        data = os.pread(self._fd, n, self._pos)
        self.left -= len(data)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _parse(path: str, f: BoundedFile) -> ElfInfo:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        if f.read(4) != b"\x7fELF":
            raise NotElf(f"{path}: not an ELF file")
        f.seek(0)
        elf = ELFFile(f)
        build_id = interp = soname = ""
        loads = []
        dynamic = None
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
            elif ptype == "PT_DYNAMIC":
                dynamic = seg
        if not loads:
            raise NotElf(f"{path}: no PT_LOAD segment")
        runtime = py_version = None
        # .dynsym when the section headers survive, else the dynamic segment (stripped files)
        symtab = elf.get_section_by_name(".dynsym") or dynamic
        if symtab is not None:
            if symtab.num_symbols() > MAX_SYMBOLS:
                raise NotElf(f"{path}: more than {MAX_SYMBOLS} dynamic symbols")
            for sym in symtab.iter_symbols():
                if sym["st_shndx"] == "SHN_UNDEF" or not sym["st_value"]:
                    continue      # an --enable-shared python imports _PyRuntime: skip it
                if sym.name == "_PyRuntime":
                    runtime = (sym["st_value"], sym["st_size"])
                elif sym.name == "Py_Version":
                    py_version = sym["st_value"]
        if dynamic is not None:
            for tag in dynamic.iter_tags():
                if tag.entry.d_tag == "DT_SONAME":
                    soname = tag.soname
        return ElfInfo(
            machine=EM_SUPPORTED.get(elf["e_machine"], str(elf["e_machine"])),
            elfclass=elf.elfclass,
            first_load_vaddr=min(s["p_vaddr"] for s in loads),
            rw_segments=tuple((s["p_vaddr"], s["p_memsz"]) for s in loads if s["p_flags"] & 2),
            runtime=runtime, py_version=py_version, soname=soname, interp=interp,
            build_id=build_id)
    except NotElf:
        raise
    except BudgetExceeded as exc:
        raise NotElf(f"{path}: {exc}") from exc
    except (ELFError, OSError, ValueError, KeyError, IndexError, AttributeError,
            AssertionError, UnicodeDecodeError, struct.error, TypeError) as exc:
        raise NotElf(f"{path}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # construct's own exceptions for truncated files
        raise NotElf(f"{path}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- mapped images

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_DYN = struct.Struct("<qQ")
_VERDEF = struct.Struct("<HHHHIII")
_VERDAUX = struct.Struct("<II")
PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_STRTAB, DT_VERDEF, DT_VERDEFNUM = 0, 5, 0x6FFFFFFC, 0x6FFFFFFD


def version_definitions(read: Callable[[int, int], bytes], start: int) -> tuple[str, ...]:
    """Names of the symbol versions (GLIBC_2.41, ...) an ELF image defines, read from the
    target's memory: `read(address, size)` reads it, `start` is its mapping at file offset 0.

    Reading the mapped image, not a file, gives the library the process actually runs even
    when an upgrade has replaced the file on disk. Returns () when the image has none.
    """
    ehdr = _EHDR.unpack(read(start, _EHDR.size))
    if ehdr[0][:4] != b"\x7fELF" or ehdr[0][4] != 2:      # ELFCLASS64 only
        raise NotElf("mapped image is not a 64-bit ELF")
    phoff, phentsize, phnum = ehdr[5], ehdr[9], ehdr[10]
    if phentsize != _PHDR.size or not 0 < phnum < 64:
        raise NotElf("mapped image has odd program headers")
    phdrs = read(start + phoff, phentsize * phnum)
    first_load = dynamic = None
    for i in range(phnum):
        p_type, _flags, _off, vaddr, _pa, _fsz, memsz, _al = _PHDR.unpack_from(phdrs, i * phentsize)
        if p_type == PT_LOAD and first_load is None:
            first_load = vaddr
        elif p_type == PT_DYNAMIC:
            dynamic = (vaddr, memsz)
    if first_load is None or dynamic is None:
        return ()
    bias = start - (first_load & ~0xFFF)
    raw = read(bias + dynamic[0], min(dynamic[1], 4096))
    tags = {}
    for off in range(0, len(raw) - _DYN.size + 1, _DYN.size):
        tag, val = _DYN.unpack_from(raw, off)
        if tag == DT_NULL:
            break
        tags[tag] = val

    def absolute(ptr: int) -> int:
        # ld.so relocates these pointers in place for loaded libraries; be right either way
        return ptr if ptr >= bias else ptr + bias

    if DT_VERDEF not in tags or DT_STRTAB not in tags:
        return ()
    strtab, at = absolute(tags[DT_STRTAB]), absolute(tags[DT_VERDEF])
    names = []
    for _ in range(min(tags.get(DT_VERDEFNUM, 0), 256)):
        _ver, _flags, _ndx, cnt, _hash, aux, nxt = _VERDEF.unpack(read(at, _VERDEF.size))
        if cnt:
            name_off, _ = _VERDAUX.unpack(read(at + aux, _VERDAUX.size))
            name = read(strtab + name_off, 64).split(b"\0", 1)[0]
            names.append(name.decode("ascii", "replace"))
        if not nxt:
            break
        at += nxt
    return tuple(names)


def glibc_minor(version_names: tuple[str, ...]) -> int | None:
    """Newest GLIBC_2.N version node. A glibc 2.M defines one node for every release up to M
    that added symbols, so this can trail M; it is exact at 2.41, the condvar change, which
    added symbols (so every glibc from 2.41 on defines GLIBC_2.41)."""
    minors = []
    for name in version_names:
        if name.startswith("GLIBC_2."):
            try:
                minors.append(int(name[8:].split(".")[0]))
            except ValueError:
                continue
    return max(minors) if minors else None
