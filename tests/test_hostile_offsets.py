"""The one description of _Py_DebugOffsets (exporter/gil/layouts.py), read on the real 3.13
(pyenv), 3.14 and 3.15 (Debian sid) interpreters, and targets that publish lies in it (issue 16).

A target controls its own memory, the offsets it publishes included. The hostile targets here
overwrite fields of their own _Py_DebugOffsets with ctypes (the exporter never writes), or
make their thread list or interpreter list a cycle; beside them an innocent target of the
same interpreter. Real processes throughout; every pread the exporter makes is recorded (the
real os.pread, wrapped) to show that reads stay small.
"""
from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import time

import placements
import pytest
from harness import write_config

from exporter import gil
from exporter.gil import frames as gframes
from exporter.gil import location as glocation
from exporter.gil.layouts import DEBUG_OFFSETS_LAYOUTS, RUNTIME_SIZE_MAX
from exporter.gil.threads import MAX_SPAN, ThreadWalker

INTERPRETERS = {i.name: i for i in placements.interpreters()}
DEBUG_INTERPRETERS = [n for n in ("3.13 pyenv", "3.14 Debian sid", "3.15 Debian sid") if n in INTERPRETERS]

# The target: optionally one thread spinning (it holds the GIL: figures to check), a
# corruption of its own memory, then facts about itself on one JSON line, then sleep.
TARGET = r"""
import ctypes, gc, json, struct, sys, threading, time
tag, spin, what, pos, value = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
gc.disable()          # a corrupted thread list must not be walked by our own collector (3.14+)
def spinner():
    while True:
        pass
if spin:
    threading.Thread(target=spinner, daemon=True).start()
ready = threading.Event()
def sleeper():
    ready.set()
    time.sleep(3600)
threading.Thread(target=sleeper, daemon=True).start()
ready.wait()
rt = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
u64 = lambda addr: ctypes.c_uint64.from_address(addr)
ctypes.pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
ctypes.pythonapi.PyInterpreterState_Get.restype = ctypes.c_void_p
tstate, interp = ctypes.pythonapi.PyThreadState_Get(), ctypes.pythonapi.PyInterpreterState_Get()
if what == "offset":          # a field of our own _Py_DebugOffsets
    u64(rt + pos).value = value
elif what == "tstate_cycle":  # pos: _Py_DebugOffsets' thread_state.next: main's next -> main
    u64(tstate + u64(rt + pos).value).value = tstate
elif what == "interp_cycle":  # pos: interpreter_state.next: the main interpreter -> itself
    u64(interp + u64(rt + pos).value).value = interp
items = [object(), 2]
obj = {"tids": sorted(t.native_id for t in threading.enumerate()),
       "str_data": sys.getsizeof("") - 1, "bytes_sval": sys.getsizeof(b"") - 1,
       "list": id(items), "item0": id(items[0]), "list_type": id(list), "float": id(2.5),
       "code": id(sys._getframe().f_code), "firstlineno": sys._getframe().f_code.co_firstlineno,
       "hexversion": sys.hexversion}
print(json.dumps(obj), flush=True)
keep = (items,)
time.sleep(3600)
"""


class Target:
    def __init__(self, interp, tag, spin=False, what="", pos=0, value=0):
        cmd = interp.host_argv() + ["-u", "-c", TARGET, tag, "1" if spin else "0", what or "-",
                                    str(pos), str(value)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                     env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("{"):
            self.stop()
            raise RuntimeError(f"{interp.name} target {tag} did not start: {line!r}")
        self.facts = json.loads(line)
        self.pid = self.proc.pid

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def _interp(name):
    return placements.require(INTERPRETERS[name])


def _minor(interp):
    return tuple(int(x) for x in interp.version.split("."))


class PreadLog:
    """The real os.pread, every size it was asked for recorded."""

    def __init__(self, monkeypatch):
        self.sizes = []
        real = os.pread

        def pread(fd, size, offset):
            self.sizes.append(size)
            return real(fd, size, offset)
        for mod in (os,):
            monkeypatch.setattr(mod, "pread", pread)

    @property
    def largest(self):
        return max(self.sizes, default=0)


# ------------------------------------------------------------------ the one table, read live

def _u64(fd, addr):
    return struct.unpack("<Q", os.pread(fd, 8, addr))[0]


@pytest.mark.parametrize("name", DEBUG_INTERPRETERS)
def test_the_one_table_reads_each_interpreter_right(name, report):
    """Every field is placed by its position in layouts.DEBUG_SECTIONS: a section missing or
    a field out of order moves every later one. Read from outside through the table, the
    target's own objects must come out as the target itself describes them (its threads'
    TIDs, a list's item, its type, a float's value, str and bytes header sizes at the very
    end of the table)."""
    interp = _interp(name)
    t = Target(interp, "table")
    try:
        loc = gil.locate(t.pid)
        assert loc.method == "debug_offsets" and loc.identity.minor == _minor(interp)
        fd = os.open(f"/proc/{t.pid}/mem", os.O_RDONLY)
        try:
            offs = glocation.read_debug_offsets(t.pid, fd, loc.identity.runtime_address, loc.identity.minor)
            assert offs["version"] == t.facts["hexversion"]
            walker = ThreadWalker(fd, loc.interpreter, loc.threads)
            states = walker.states()
            assert states is not None
            assert sorted(s.native_thread_id for s in states) == t.facts["tids"]
            lst = t.facts["list"]
            assert _u64(fd, lst + offs["pyobject.ob_type"]) == t.facts["list_type"]
            assert _u64(fd, lst + offs["list_object.ob_size"]) == 2
            assert _u64(fd, _u64(fd, lst + offs["list_object.ob_item"])) == t.facts["item0"]
            fval = os.pread(fd, 8, t.facts["float"] + offs["float_object.ob_fval"])
            assert struct.unpack("<d", fval)[0] == 2.5
            code = t.facts["code"]
            first = struct.unpack("<i", os.pread(fd, 4, code + offs["code_object.firstlineno"]))[0]
            assert first == t.facts["firstlineno"]
            assert offs["unicode_object.asciiobject_size"] == t.facts["str_data"]
            assert offs["bytes_object.ob_sval"] == t.facts["bytes_sval"]
            layout = gframes.frame_layout_from_debug_offsets(offs, loc.identity.minor)
            assert layout.str_ascii_size == t.facts["str_data"]
        finally:
            os.close(fd)
        report.record(interp.version, "debug_offsets_table", f"{len(offs)} fields read right")
    finally:
        t.stop()


# ------------------------------------------------------------------ published lies

def _lies(minor):
    """(label, field of _Py_DebugOffsets, value written there) for a version."""
    t = DEBUG_OFFSETS_LAYOUTS[minor]
    lies = [("native_thread_id=2^63", t["thread_state.native_thread_id"], 1 << 63),
            ("threads_head=-1", t["interpreter_state.threads_head"], (1 << 64) - 1),
            ("thread_state.size=2^62", t["thread_state.size"], 1 << 62),
            ("interpreter_state.size=2^40", t["interpreter_state.size"], 1 << 40)]
    if "thread_state.holds_gil" in t:        # the per-thread flags that span one read (3.15)
        lies.append(("holds_gil=2^40", t["thread_state.holds_gil"], 1 << 40))
    return lies


@pytest.mark.parametrize("name", DEBUG_INTERPRETERS)
def test_published_lies_are_refused_and_reads_stay_small(name, monkeypatch, report):
    interp = _interp(name)
    minor = _minor(interp)
    innocent = Target(interp, "innocent", spin=True)
    hostile = []
    try:
        for label, pos, value in _lies(minor):
            hostile.append((label, Target(interp, "hostile", what="offset", pos=pos, value=value)))
        log = PreadLog(monkeypatch)
        loc = gil.locate(innocent.pid)
        assert loc.method == "debug_offsets"
        with gil.GilReader(loc) as r:
            held = sum(r.read().locked for _ in range(200))
            assert r.threads is not None and r.threads.states() is not None
        assert held > 0          # the spinner holds the GIL for much of any stretch
        for label, t in hostile:
            with pytest.raises(gil.ProbeUnavailable) as exc:
                gil.locate(t.pid)
            assert exc.value.reason == "bad_offsets", (label, exc.value)
            # the frame reader reads the table on its own: it refuses too
            by_hand = gil.GilLocation(t.pid, 0, gil.DEFAULT_LAYOUT, gil.identify(t.pid), "debug_offsets")
            with pytest.raises(gil.ProbeUnavailable) as exc:
                gframes.StackReader(by_hand)
            assert exc.value.reason == "bad_offsets", (label, exc.value)
        # the largest read: _PyRuntime (a search, a look-up of pointers inside it), capped
        assert log.largest <= RUNTIME_SIZE_MAX
        report.record(interp.version, "hostile_offsets",
                      f"{len(hostile)} refused (bad_offsets), largest pread {log.largest} B")
    finally:
        innocent.stop()
        for _l, t in hostile:
            t.stop()


def test_hand_built_thread_layouts_beyond_the_ceiling_are_refused():
    """A ThreadStateLayout not from validated offsets still cannot make a huge read."""
    huge = gil.ThreadStateLayout(threads_head=8, next=8, interp=16, native_thread_id=24,
                                 holds_gil=1 << 40, gil_requested=40)
    with pytest.raises(gil.ProbeUnavailable) as exc:
        ThreadWalker(-1, 1 << 20, huge)
    assert exc.value.reason == "bad_offsets"
    fine = gil.ThreadStateLayout(threads_head=8, next=8, interp=16, native_thread_id=24)
    assert ThreadWalker(-1, 1 << 20, fine).span <= MAX_SPAN


# ------------------------------------------------------------------ cycles

@pytest.mark.parametrize("name", DEBUG_INTERPRETERS)
def test_a_thread_list_cycle_is_bounded(name, report):
    """The main thread state's `next` points at itself: the walk stops at the repeat (None),
    and the GIL is still read (on 3.15 its waiter count falls back to the condvar's)."""
    interp = _interp(name)
    minor = _minor(interp)
    t = Target(interp, "cycle", spin=True, what="tstate_cycle",
               pos=DEBUG_OFFSETS_LAYOUTS[minor]["thread_state.next"])
    try:
        loc = gil.locate(t.pid)
        with gil.GilReader(loc) as r:
            sizes = []
            walker = ThreadWalker(lambda size, addr: sizes.append(size) or os.pread(r.fd, size, addr),
                                  loc.interpreter, loc.threads)
            t0 = time.monotonic()
            assert walker.states() is None
            assert walker.waiting() is None
            took = time.monotonic() - t0
            assert len(sizes) < 20        # a few thread states, not MAX_THREADS reads
            readings = [r.read() for _ in range(50)]
            assert all(0 <= x.waiters <= 4 for x in readings)
        report.record(interp.version, "thread_list_cycle", f"{len(sizes)} reads, {took * 1e3:.2f} ms")
    finally:
        t.stop()


@pytest.mark.parametrize("name", DEBUG_INTERPRETERS)
def test_an_interpreter_list_cycle_is_bounded(name, report):
    """The main interpreter's `next` points at itself: locating ends (a GIL found by another
    strategy, or a reason), and the subinterpreter look-up reads a bounded list."""
    interp = _interp(name)
    minor = _minor(interp)
    t = Target(interp, "icycle", spin=True, what="interp_cycle",
               pos=DEBUG_OFFSETS_LAYOUTS[minor]["interpreter_state.next"])
    try:
        t0 = time.monotonic()
        try:
            loc = gil.locate(t.pid)
            outcome = loc.method
            assert gil.other_gils(loc) == []   # only the main interpreter, seen many times
        except gil.ProbeUnavailable as exc:
            outcome = exc.reason
        took = time.monotonic() - t0
        assert took < 30
        report.record(interp.version, "interpreter_list_cycle", f"{outcome} in {took:.2f} s")
    finally:
        t.stop()


# ------------------------------------------------------------------ the daemon

def test_daemon_innocent_keeps_ok_and_figures_beside_liars(exporter, tmp_path):
    """One innocent target per interpreter, spinning, beside hostile ones: the innocent keep
    gil_probe="ok" and their GIL series; the liars get bad_offsets and no GIL series."""
    targets = []
    try:
        for name in DEBUG_INTERPRETERS:
            interp = INTERPRETERS[name]
            if not interp.available():
                continue
            targets.append(("ok", Target(interp, "gil-hostile-offsets", spin=True)))
            label, pos, value = _lies(_minor(interp))[0]
            targets.append(("bad_offsets", Target(interp, "gil-hostile-offsets", what="offset",
                                                  pos=pos, value=value)))
        if not targets:
            pytest.skip("no 3.13+ interpreter here")
        cfg = write_config(tmp_path, """
targets:
  - name: offsets
    match:
      cmdline: 'gil-hostile-offsets'
scan_interval_seconds: 1
window_seconds: 2
""")
        exp = exporter("--config", str(cfg))
        for want, t in targets:
            info = exp.wait_for(lambda: [s for s in exp.series("pygil_target_info", pid=t.pid)
                                         if s.labels["gil_probe"] != "pending"], timeout=30)[0]
            assert info.labels["gil_probe"] == want, (want, info.labels)
            held = exp.wait_for(lambda: exp.value("pygil_gil_held_seconds_total", pid=t.pid) or
                                (want != "ok" and -1.0), timeout=30)
            if want == "ok":
                assert held > 0
            else:
                assert exp.value("pygil_gil_held_seconds_total", pid=t.pid) is None
        assert exp.proc.poll() is None
        assert "Traceback" not in exp.log_text()
    finally:
        for _w, t in targets:
            t.stop()
