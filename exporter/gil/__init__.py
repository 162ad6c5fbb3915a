"""The GIL probe: locate and read the GIL of another CPython process, from outside.

Everything reads the target with ``os.pread`` on ``/proc/PID/mem`` and a few ``/proc/PID/*``
files. Nothing attaches with ptrace, writes to the target or pauses it. The facts relied on
are in docs/gil-internals.md. Split by idea:

* ``elf``      - ELF files (pyelftools) and mapped ELF images (symbol versions of libc);
* ``layouts``  - CPython and glibc layouts as data tables (the one description of
  ``_Py_DebugOffsets``, what each version supports), their parsers and validation;
* ``identity`` - which file the target mapped, its load base, version, build flags and libc;
* ``location`` - strategies that find ``struct _gil_runtime_state`` and validate it live;
* ``reader``   - ``GilReader``: one pread per sample, and periodic re-validation;
* ``threads``  - an interpreter's thread states (native TIDs; per-thread GIL flags on 3.15+).
* ``frames``   - a thread's Python stack (3.11+): frame and code-object layouts, line tables.
"""
from .elf import NotElf
from .elf import clear_cache as clear_elf_cache
from .identity import FUTEX_SYSCALL, Target, identify, identify_target, version_from_sys_version_buffer
from .layouts import (
                      CONDVARS,
                      DEBUG_COOKIE,
                      DEBUG_OFFSETS_LAYOUTS,
                      DEBUG_OFFSETS_PREFIX,
                      DEBUG_SECTIONS,
                      DEFAULT_LAYOUT,
                      KNOWN_GIL_OFFSETS,
                      LAYOUTS,
                      SINCE,
                      BadOffsets,
                      CondvarLayout,
                      condvar_for_glibc,
                      detect_free_threaded,
                      gil_layout,
                      layout_from_debug_offsets,
                      parse_debug_offsets,
                      parse_debug_offsets_prefix,
                      supports,
                      validate_debug_offsets,
                      version_from_hex,
)
from .location import INTERVAL_MAX_US, INTERVAL_MIN_US, futex_waiters, locate, locate_all, other_gils
from .memory import start_time
from .reader import GilReader, layout_struct
from .records import GilLayout, GilLocation, GilReading, ProbeUnavailable, PythonIdentity, ThreadStateLayout
from .threads import ThreadState, ThreadWalker

__all__ = [
    "ProbeUnavailable", "PythonIdentity", "GilLayout", "GilLocation", "GilReading",
    "ThreadStateLayout", "Target", "identify", "identify_target", "locate", "locate_all", "other_gils",
    "GilReader",
    "futex_waiters", "ThreadWalker", "ThreadState", "LAYOUTS", "DEFAULT_LAYOUT", "CONDVARS",
    "CondvarLayout", "condvar_for_glibc", "gil_layout", "KNOWN_GIL_OFFSETS",
    "DEBUG_OFFSETS_LAYOUTS", "DEBUG_OFFSETS_PREFIX", "DEBUG_COOKIE", "parse_debug_offsets",
    "parse_debug_offsets_prefix", "layout_from_debug_offsets", "detect_free_threaded",
    "version_from_hex", "version_from_sys_version_buffer", "layout_struct", "start_time",
    "clear_elf_cache", "NotElf", "FUTEX_SYSCALL", "INTERVAL_MIN_US", "INTERVAL_MAX_US",
    "DEBUG_SECTIONS", "SINCE", "supports", "BadOffsets", "validate_debug_offsets",
]
