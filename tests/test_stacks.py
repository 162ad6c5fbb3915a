"""The code holding the GIL: Python stacks read from outside (exporter/gil/frames.py,
exporter/stacks.py, `diagnose --stacks`), on every interpreter 3.11+ the host has.

pyenv's builds run on the host; Debian sid's 3.14 and 3.15 (and pyenv's 3.12 on sid's glibc)
after pivot_root, as in a container, so that py-spy and the 3.15 stdlib sampler can read them
too. Every expectation comes from the workload's source (marker comments), the interpreter's
own co_lines(), or the library file's text: nothing is hard-coded per version.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import placements
import profilers
import pytest
import workloads
from harness import exporter_command

from exporter import gil
from exporter.gil import frames as gframes
from exporter.stacks import StackSampler

INTERPRETERS = {i.name: i for i in placements.interpreters()}


def _mm(interp: placements.Interpreter) -> tuple:
    return tuple(int(x) for x in interp.version.split("."))


STACK_INTERPRETERS = sorted((n for n, i in INTERPRETERS.items() if _mm(i) >= (3, 11)),
                            key=lambda n: (_mm(INTERPRETERS[n]), n))


def _interp(name: str) -> placements.Interpreter:
    return placements.require(INTERPRETERS[name])


_placement = placements.usual_placement


def _line(workload: str, marker: str) -> int:
    """1-based line of the workload script (run with -c: file "<string>") holding `marker`."""
    for n, text in enumerate(workloads.script(workload).splitlines(), 1):
        if marker in text:
            return n
    raise AssertionError(f"{marker!r} not in workload {workload}")


def _source_line(pid: int, filename: str, line: int) -> str:
    """A library file's line, through the target's own root (it may be a container)."""
    path = Path(f"/proc/{pid}/root{filename}")
    return path.read_text().splitlines()[line - 1]


THREADING = [("Thread.run", "self._target("), ("Thread._bootstrap_inner", "self.run"),
             ("Thread._bootstrap", "self._bootstrap_inner()")]


# ------------------------------------------------------------------ tables and parsers

_DUMP_CODE = r"""
import json, sys, types, importlib
seen, out = set(), []
def walk(co):
    if id(co) in seen: return
    seen.add(id(co))
    out.append([co.co_linetable.hex(), co.co_firstlineno, len(co.co_code) // 2,
                [list(t) for t in co.co_lines()]])
    for c in co.co_consts:
        if isinstance(c, types.CodeType): walk(c)
for name in ("threading", "json.decoder", "collections", "argparse", "email.message"):
    mod = importlib.import_module(name)
    src = open(mod.__file__).read()
    walk(compile(src, mod.__file__, "exec"))
print(json.dumps(out))
"""


@pytest.mark.parametrize("name", STACK_INTERPRETERS)
def test_linetable_parser_matches_the_interpreters_own_co_lines(name):
    """Every code unit of every code object of five stdlib modules: our line == co_lines()."""
    interp = _interp(name)
    r = subprocess.run(placements.argv(interp, "host") + ["-c", _DUMP_CODE], capture_output=True,
                       text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    assert r.returncode == 0, r.stderr[-500:]
    codes = json.loads(r.stdout)
    assert len(codes) > 300
    units = 0
    for table, first, n_units, co_lines in codes:
        ends, lines = gframes.parse_linetable(bytes.fromhex(table), first)
        assert ends[-1] == n_units
        for start, end, line in co_lines:
            for unit in range(start // 2, end // 2):
                assert gframes.line_of(ends, lines, unit) == line, (first, unit)
                units += 1
    assert units > 10000


def test_linetable_parser_refuses_torn_tables():
    ends, lines = gframes.parse_linetable(bytes([0x80 | (13 << 3), 0x02]), 10)  # +1 line, 1 unit
    assert (ends, lines) == ([1], [11])
    with pytest.raises(ValueError):
        gframes.parse_linetable(bytes([0x05, 0x00]), 1)          # no start bit
    with pytest.raises(ValueError):
        gframes.parse_linetable(bytes([0x80 | (14 << 3)]), 1)    # long form cut short


# ------------------------------------------------------------------ live processes

@pytest.mark.parametrize("name", STACK_INTERPRETERS)
def test_pinned_stack_is_read_exactly(name, report):
    """A thread holds the GIL inside one C call, called from known lines: every read of its
    stack gives exactly its five frames, at the lines the source says."""
    interp = _interp(name)
    w = placements.start("pinned", interp, _placement(interp), threads=2)
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until the holder (not a spinner) has taken the GIL for good
            loc = gil.locate(w.pid)
            with gil.GilReader(loc) as r, gframes.StackReader(loc) as sr:
                g = r.read()
                got = sr.stack(g.holder) if g.locked else ()
                if got and got[0].qualname == "hold":
                    break
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
        with gil.GilReader(loc) as r, gframes.StackReader(loc) as sr:
            g = r.read()
            assert g.locked and g.waiters >= 1
            reads = [sr.stack(g.holder) for _ in range(20)]
            tid = sr.native_thread_id(g.holder)
        want = [("hold", "<string>", _line("pinned", "PINNED-LINE"), _line("pinned", "def hold")),
                ("Outer.middle", "<string>", _line("pinned", "MIDDLE-LINE"), _line("pinned", "def middle"))]
        for stack in reads:
            assert stack == reads[0]
        stack = reads[0]
        assert [(f.qualname, f.filename, f.line, f.firstlineno) for f in stack[:2]] == want
        assert [f.qualname for f in stack[2:]] == [q for q, _ in THREADING]
        for f, (_q, text) in zip(stack[2:], THREADING):
            assert f.filename.endswith("/threading.py")
            assert text in _source_line(w.pid, f.filename, f.line), (f, text)
        # the holder's thread state names its OS thread; 3.14+ name it after the Thread
        assert tid in [int(t) for t in os.listdir(f"/proc/{w.pid}/task")]
        comm = Path(f"/proc/{w.pid}/task/{tid}/comm").read_text().strip()
        if _mm(interp) >= (3, 14):
            assert comm == "pinned-holder"
        report.record(name, "stack_pinned", f"{len(stack)} frames")
    finally:
        w.stop()


@pytest.mark.parametrize("name", STACK_INTERPRETERS)
def test_changing_stacks_are_kept_whole_or_dropped(name, report):
    """Stacks 4..44 frames deep, changing all the time: every stack kept is a real one (the
    chain down()...down(), work(), threading's three, at their call lines); the rest dropped."""
    interp = _interp(name)
    w = placements.start("recursive", interp, _placement(interp), threads=3)
    try:
        time.sleep(0.3)
        sampler = StackSampler(w.pid, rate_hz=200).start()
        deadline = time.monotonic() + 12     # a loaded host drops more: sample until 50 are kept
        while sampler.kept < 50 and time.monotonic() < deadline and not sampler.unavailable:
            time.sleep(0.5)
        prof = sampler.stop()
    finally:
        w.stop()
    assert not prof.unavailable, prof.unavailable
    assert prof.kept >= 50, (prof.kept, prof.dropped)
    down_line, work_line = _line("recursive", "DOWN-LINE"), _line("recursive", "WORK-LINE")
    first_down = _line("recursive", "def down")
    for stack in prof.stacks:
        names = [f.qualname for f in stack]
        assert names[-3:] == [q for q, _ in THREADING], names
        downs = stack[:-4]
        assert names[-4] == "work", names
        if downs:   # a caller waits at its call; an innermost work() is anywhere in its loop
            assert stack[-4].line == work_line, stack
        else:
            assert work_line - 2 <= stack[-4].line <= work_line + 1, stack
        assert len(downs) <= 40 and all(f.qualname == "down" for f in downs), names
        assert [f.line for f in downs[1:]] == [down_line] * (len(downs) - 1), [(f.qualname, f.line) for f in stack]
        if downs:
            assert first_down <= downs[0].line < work_line - 2
    report.record(name, "stacks_kept_dropped", f"{prof.kept}/{sum(prof.dropped.values())} "
                                               f"{sorted(prof.dropped.items())}")


@pytest.mark.parametrize("name", STACK_INTERPRETERS)
def test_diagnose_stacks_names_the_hot_function_as_py_spy_and_profiling_sampling_do(name, report):
    """The same workload (a hot function among waiters), read by `diagnose --stacks`, by
    py-spy record --gil --nonblocking and, on 3.15, by profiling.sampling --mode gil: one
    after another, all name the same top function."""
    interp = _interp(name)
    w = placements.start("hot", interp, _placement(interp), threads=3)
    try:
        time.sleep(0.5)
        r = subprocess.run(exporter_command() + ["diagnose", str(w.pid), "--seconds", "3", "--stacks",
                                                 "--json"], capture_output=True, text=True, timeout=90)
        assert r.returncode == 1, r.stdout + r.stderr          # contended
        stacks = json.loads(r.stdout)["stacks"]
        spy, _cpu = profilers.leaf_counts_py_spy(w.pid, 3)
        stdlib = profilers.leaf_counts_stdlib(w, interp, 3) if _mm(interp) >= (3, 15) else None
    finally:
        w.stop()
    assert not stacks["unavailable"]
    top = stacks["top_functions"][0]
    assert (top["qualname"], top["filename"]) == ("hot", "<string>"), stacks["top_functions"][:3]
    assert top["line"] in (_line("hot", "HOT-LINE"), _line("hot", "HOT-LINE") - 1)
    assert top["own"] > 0.5 and stacks["kept"] >= 30, stacks
    assert sum(stacks["dropped"].values()) < stacks["contended"] / 2, stacks
    assert spy.most_common(1)[0][0] == "hot", spy
    cells = f"ours hot {top['own']:.0%}, py-spy {spy.most_common(1)[0][0]}"
    if stdlib is not None:
        assert stdlib.most_common(1)[0][0] == "hot", stdlib
        cells += f", profiling.sampling {stdlib.most_common(1)[0][0]}"
    report.record(name, "stacks_top", cells)


def test_diagnose_stacks_before_311_says_why():
    pythons = workloads.pyenv_pythons()
    old = next((pythons[v] for v in ("3.10", "3.9", "3.8") if v in pythons), None)
    if old is None:
        pytest.skip("no pyenv CPython before 3.11")
    with workloads.start_workload("cpu", old, threads=3) as w:
        r = subprocess.run(exporter_command() + ["diagnose", str(w.pid), "--seconds", "2", "--stacks"],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Code holding the GIL while other threads waited: not measured (unsupported_version: " \
           "stacks need CPython 3.11 or newer" in r.stdout
    assert "Traceback" not in r.stderr


def test_stack_of_something_that_is_not_a_thread_state_is_refused():
    """Addresses that are not thread states (the GIL struct, _PyRuntime, the interpreter, and
    kernel-half pointers such as a torn read gives) give a dropped sample or no frame, never
    frames and never an exception of another kind."""
    interp = INTERPRETERS["3.12 pyenv"] if "3.12 pyenv" in INTERPRETERS else None
    if interp is None:
        pytest.skip("no pyenv 3.12")
    with workloads.start_workload("cpu", interp.path, threads=2) as w:
        loc = gil.locate(w.pid)
        with gframes.StackReader(loc) as sr:
            for addr in (loc.address, loc.identity.runtime_address, loc.address + 8, 4096,
                         0xFFFF_FFFF_0000_0000, (1 << 63) - 8, 1 << 47):
                try:
                    got = sr.stack(addr)
                except gframes.TornStack:
                    continue
                assert got == (), (hex(addr), got)


def test_top_functions_own_total_and_hottest_line():
    """The arithmetic of the table (a unit test of the aggregation, on hand-made stacks)."""
    from exporter.stacks import StackProfile
    F = gframes.Frame
    run = F("Thread.run", "/t.py", 10, 5)
    hot20, hot19 = F("hot", "<s>", 20, 17), F("hot", "<s>", 19, 17)
    cool = F("cool", "<s>", 25, 22)
    work = F("work", "<s>", 29, 27)
    prof = StackProfile(1, "3.13.0", 1.0, samples=20, held=18, contended=12, dropped={"x": 2},
                        stacks={(hot20, work, run): 6, (hot19, work, run): 2, (cool, work, run): 1,
                                (work, run): 1})
    top = prof.top_functions()
    assert [(f.qualname, f.line, f.own, f.total) for f in top] == [
        ("hot", 20, 0.8, 0.8), ("work", 29, 0.1, 1.0), ("cool", 25, 0.1, 0.1), ("Thread.run", 5, 0.0, 1.0)]
    assert prof.kept == 10 and prof.as_dict()["top_functions"][0]["qualname"] == "hot"


def test_diagnose_stacks_text_names_the_pinned_holder_at_its_line():
    interp = INTERPRETERS.get("3.13 pyenv") or INTERPRETERS.get("3.12 pyenv")
    if interp is None:
        pytest.skip("no pyenv 3.12 or 3.13")
    w = placements.start("pinned", interp, "host", threads=2)
    try:
        time.sleep(0.5)
        r = subprocess.run(exporter_command() + ["diagnose", str(w.pid), "--seconds", "2", "--stacks"],
                           capture_output=True, text=True, timeout=60)
    finally:
        w.stop()
    assert r.returncode == 1, r.stdout + r.stderr
    section = r.stdout[r.stdout.index("Code holding the GIL while other threads waited ("):]
    rows = [line.split() for line in section.splitlines()[2:]]
    assert rows[0] == ["100%", "100%", "hold", f"<string>:{_line('pinned', 'PINNED-LINE')}"], section
    assert rows[1] == ["0%", "100%", "Outer.middle", f"<string>:{_line('pinned', 'def middle')}"], section


def test_diagnose_stacks_only_reads(tmp_path):
    """Under strace: reading stacks opens /proc/PID/mem read-only and only preads it; no
    ptrace, no process_vm_writev, no write to the target, no signal to it."""
    import shutil

    from test_readonly import TRACE, parse_trace
    if shutil.which("strace") is None:
        pytest.skip("strace missing (tests/setup/tools.sh)")
    interp = INTERPRETERS.get("3.13 pyenv") or INTERPRETERS.get("3.12 pyenv")
    if interp is None:
        pytest.skip("no pyenv 3.12 or 3.13")
    trace = tmp_path / "trace"
    w = placements.start("pinned", interp, "host", threads=2)
    try:
        time.sleep(0.5)
        r = subprocess.run(["strace", "-f", "-qq", "-e", f"trace={TRACE}", "-o", str(trace)]
                           + exporter_command() + ["diagnose", str(w.pid), "--seconds", "2", "--stacks"],
                           capture_output=True, text=True, timeout=120)
    finally:
        w.stop()
    assert r.returncode == 1 and "100%   100%  hold" in r.stdout, r.stdout + r.stderr
    report = parse_trace(trace.read_text(), -1)
    assert not (report.ptrace or report.vm_writes or report.mem_opens_not_rdonly or report.mem_writes
                or report.proc_opens_for_write or report.signals_to_others), report.summary()
    assert report.mem_reads > 100 and set(report.mem_read_pids) == {w.pid}, report.summary()


def test_a_target_that_exits_mid_sampling_ends_the_sampling_quietly():
    interp = INTERPRETERS.get("3.13 pyenv") or INTERPRETERS.get("3.12 pyenv")
    if interp is None:
        pytest.skip("no pyenv 3.12 or 3.13")
    w = placements.start("hot", interp, "host", threads=3)
    try:
        time.sleep(0.3)
        sampler = StackSampler(w.pid, rate_hz=100).start()
        time.sleep(1.5)
    finally:
        w.stop()                     # killed and reaped while the sampler runs
    time.sleep(0.5)
    assert not sampler.running(), "the sampling thread ends on its own"
    prof = sampler.stop()
    assert prof.samples > 0 and prof.kept > 0 and not prof.unavailable, prof
    assert prof.top_functions(1)[0].qualname in ("hot", "cool")
