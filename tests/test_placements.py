"""The GIL probe on every interpreter here, started three ways: on the host, under chroot, and in a
private mount namespace with pivot_root (as a container runtime starts them).

Interpreters: pyenv's 3.8-3.13, Debian bookworm's 3.11 (the host's own), Debian unstable's 3.14
and 3.15 (tests/setup/rootfs.sh builds their root filesystems), and pyenv's 3.12 on sid's glibc
(whose condvar layout differs). Also: binaries replaced on disk under a running process, a
version newer than the layout tables, and an exporter without CAP_SYS_ADMIN (no map_files).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import placements  # noqa: E402
from placements import PLACEMENTS, SID, Interpreter  # noqa: E402
from workloads import kill_quietly  # noqa: E402

from exporter import gil  # noqa: E402
from exporter import procfs as gil_procfs  # noqa: E402
from exporter.sampler import GilSampler, GilTotals  # noqa: E402

INTERPRETERS = {i.name: i for i in placements.interpreters()}
MISSING = [i.name for i in INTERPRETERS.values() if not i.available()]
if MISSING:
    pytest.skip(f"root filesystems missing for {MISSING}: run tests/setup/rootfs.sh",
                allow_module_level=True)
NEW = [n for n in INTERPRETERS if "Debian" in n]          # the rows this suite adds to the table


@pytest.fixture
def sampler():
    s = GilSampler(rate_hz=100.0)
    s.start()
    yield s
    s.close()


def _sample(sampler: GilSampler, pid: int, seconds: float) -> tuple[gil.GilLocation, GilTotals]:
    loc = gil.locate(pid)
    sampler.add(pid, loc)
    time.sleep(seconds)
    assert sampler.failure(pid) is None, sampler.failure(pid)
    t = sampler.totals(pid)
    sampler.remove(pid)
    assert t.samples >= 0.15 * 100 * seconds and t.sampled_seconds > 0.2 * seconds
    return loc, t


def _assert_contended(t: GilTotals) -> None:
    """3 CPU threads: whenever the GIL is held, another thread waits for it. On an idle host the
    GIL is held nearly all the time; on an overloaded one it also sits unlocked while the next
    waiter waits for a CPU, so the held share is checked loosely and the contended share of the
    held time strictly (it does not depend on how much CPU the host gave)."""
    held = t.held_seconds / t.sampled_seconds
    assert held >= 0.5, held
    assert t.contended_seconds / t.held_seconds >= 0.9, (t.contended_seconds, t.held_seconds)


def _glibc_minor(interp: Interpreter) -> int:
    text = (interp.rootfs / ".gil-exporter-rootfs").read_text()
    return int(text.split("libc6=2.")[1].split("-")[0].split(".")[0])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", list(INTERPRETERS))
def test_located_and_sampled(name, placement, sampler, report):
    """Every interpreter in every placement: located, validated, sampled; the contended
    figures and a switch interval of 12.3 ms read back exactly."""
    interp = INTERPRETERS[name]
    with placements.start("cpu", interp, placement, switch_interval=0.0123) as w:
        loc, t = _sample(sampler, w.pid, 1.5)
    ident = loc.identity
    assert ident.version.startswith(interp.version + ".")
    # the condvar layout is the one of the glibc the target runs, not the exporter's
    assert ident.libc == "glibc" and ident.libc_version == f"2.{_glibc_minor(interp)}"
    assert loc.layout == gil.gil_layout(False, gil.condvar_for_glibc(_glibc_minor(interp)))
    contended = t.contended_seconds / t.sampled_seconds
    waiters = t.wait_seconds / t.sampled_seconds
    report.record(name, placement, f"{loc.method} contended={contended:.2f} waiters={waiters:.2f}")
    assert t.interval_seconds == 0.0123
    _assert_contended(t)
    assert 1.0 <= waiters <= 2.3


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", NEW)
def test_accuracy_table(name, placement, sampler, report):
    """The per-version accuracy cells for the Debian interpreters, in every placement:
    contended (3 CPU threads), hashlib, sleep, a single thread."""
    interp = INTERPRETERS[name]
    cells = {}
    for workload in ("cpu", "hashlib", "sleep", "single"):
        with placements.start(workload, interp, placement) as w:
            _loc, t = _sample(sampler, w.pid, 2.0)
        cells[workload] = t
    cpu = cells["cpu"]
    contended = {k: v.contended_seconds / v.sampled_seconds for k, v in cells.items()}
    waiters = cpu.wait_seconds / cpu.sampled_seconds
    single_held = cells["single"].held_seconds / cells["single"].sampled_seconds
    report.record(name, f"{placement} table",
                  f"cpu={contended['cpu']:.2f} waiters={waiters:.2f} hashlib={contended['hashlib']:.2f} "
                  f"sleep={contended['sleep']:.2f} single={contended['single']:.2f} "
                  f"(held {single_held:.2f})")
    _assert_contended(cpu)
    assert 1.2 <= waiters <= 2.3 and cpu.switches > 0
    assert cpu.interval_seconds == 0.005
    for quiet in ("hashlib", "sleep", "single"):
        assert contended[quiet] <= 0.15, (quiet, contended[quiet])
    # one CPU thread alone: held, never waited for; at most the main thread's own hand-over
    # as it goes to sleep after printing "ready" (late on a busy host)
    assert single_held >= 0.9 and cells["single"].switches <= 2


def _thread_cross_check(reader: gil.GilReader, pid: int, loc: gil.GilLocation, seconds: float = 2.5):
    """Per thread, the GIL flags against the kernel's view of the same thread (by native TID):
    a thread futex-blocked on the GIL's condvar must be flagged waiting, and a thread flagged
    waiting must be blocked there or runnable (woken, or not yet in futex()). Returns the
    mean flagged waiters, the mean futex-blocked ones, the checks and the violations."""
    lo, hi = loc.layout.cond_words
    lo, hi = loc.address + lo, loc.address + hi
    nr = gil.FUTEX_SYSCALL["x86_64"]
    flagged = blocked = checks = bad = rounds = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and rounds < 300:
        before = reader.threads.states()
        calls = gil_procfs.task_syscalls(pid)
        after = reader.threads.states()
        if before is None or after is None:
            continue
        rounds += 1
        stable = {s.native_thread_id: s for s in before}
        for s in after:
            b = stable.get(s.native_thread_id)
            if b is None or (b.gil_requested, b.holds_gil) != (s.gil_requested, s.holds_gil):
                continue            # changed while /proc was read: no claim either way
            waiting = s.gil_requested and not s.holds_gil
            call = calls.get(s.native_thread_id, ())
            in_futex = bool(call) and call[0] == nr and len(call) > 1 and lo <= call[1] < hi
            runnable = call == (-1,)
            flagged += waiting
            blocked += in_futex
            checks += 1
            if (in_futex and not waiting) or (waiting and not (in_futex or runnable)):
                bad += 1
    return flagged / max(rounds, 1), blocked / max(rounds, 1), checks, bad


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_315_threads_own_gil_flags(placement, report):
    """3.15 describes holds_gil and gil_requested per thread: the exporter counts waiters from
    them exactly, and each flagged thread is cross-checked against /proc/PID/task/TID/syscall."""
    interp = INTERPRETERS["3.15 Debian sid"]
    with placements.start("cpu", interp, placement) as w:
        loc = gil.locate(w.pid)
        assert loc.threads is not None and loc.threads.has_gil_flags
        with gil.GilReader(loc) as reader:
            assert reader.waiters_source == "gil_requested"
            states = reader.threads.states()
            tids = {int(t) for t in os.listdir(f"/proc/{w.pid}/task")}
            assert states is not None and {s.native_thread_id for s in states} == tids
            assert sum(1 for s in states if s.holds_gil) <= 1
            exact = condvar = 0
            for _ in range(200):            # interleaved, spread over about a second
                exact += reader.read().waiters
                condvar += reader.read_raw()[4] >> 3
                time.sleep(0.004)
            exact, condvar = exact / 200, condvar / 200
            flagged, blocked, checks, bad = _thread_cross_check(reader, w.pid, loc)
    report.record("3.15 Debian sid", f"{placement} waiters",
                  f"gil_requested={exact:.2f} condvar={condvar:.2f} futex-blocked={blocked:.2f} "
                  f"per-thread disagreements={bad}/{checks}")
    assert 1.2 <= exact <= 2.0 and abs(exact - condvar) <= 0.3   # 3 CPU threads: ~2 wait
    assert checks >= 100 and blocked > 0.5
    assert bad <= 0.05 * checks, (bad, checks)


# ----------------------------------------------------------------- which file is read

def _run_probe(pid: int, no_sys_admin: bool) -> dict:
    """locate() and one read in a fresh process, optionally without CAP_SYS_ADMIN (and
    CAP_CHECKPOINT_RESTORE): then /proc/PID/map_files cannot be opened, as in a Kubernetes
    pod that only adds SYS_PTRACE."""
    code = (
        "import json, sys\n"
        "from exporter import gil\n"
        "try:\n"
        f"    loc = gil.locate({pid}); r = gil.GilReader(loc).read()\n"
        "    out = {'reason': 'ok', 'version': loc.identity.version, 'method': loc.method,\n"
        "           'interval_us': r.interval_us, 'binary': loc.identity.binary}\n"
        "except gil.ProbeUnavailable as e:\n"
        "    out = {'reason': e.reason, 'detail': e.detail}\n"
        "print(json.dumps(out))\n")
    cmd = [sys.executable, "-c", code]
    if no_sys_admin:
        cmd = ["setpriv", "--bounding-set=-sys_admin,-checkpoint_restore", "--"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    code = ("import sys, threading, time\n"
            "sys.setswitchinterval(0.0077)\n"
            "def spin():\n    while True: sum(range(1000))\n"
            "for _ in range(2): threading.Thread(target=spin, daemon=True).start()\n"
            "print('ready', flush=True); time.sleep(600)\n")
    p = subprocess.Popen(argv + ["-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "ready"
    return p


def _stop(p: subprocess.Popen) -> None:
    kill_quietly(p.pid)
    p.wait(timeout=10)
    p.stdout.close()


def test_executable_replaced_on_disk(tmp_path, report):
    """A copy of Debian's (static) python3.11 runs; an upgrade renames another version's binary
    over it. The probe reads the mapped old file: through /proc/PID/map_files as root, and
    through /proc/PID/exe without CAP_SYS_ADMIN. Never the new file's layout."""
    exe = tmp_path / "python3"
    shutil.copy2("/usr/bin/python3.11", exe)
    p = _start([str(exe)])
    try:
        assert Path(f"/proc/{p.pid}/exe").resolve() == exe
        newer = tmp_path / "python3.new"
        shutil.copy2(SID / "usr/bin/python3.14", newer)
        os.rename(newer, exe)                   # what dpkg does: the old inode is now deleted
        assert "(deleted)" in os.readlink(f"/proc/{p.pid}/exe")
        for no_sys_admin in (False, True):
            out = _run_probe(p.pid, no_sys_admin)
            assert out["reason"] == "ok", out
            assert out["version"].startswith("3.11.") and out["interval_us"] == 7700
        report.record("3.11 Debian bookworm", "exe replaced", "read from the mapped file")
    finally:
        _stop(p)


def test_libpython_replaced_on_disk(tmp_path, report):
    """pyenv's 3.12 loads libpython3.12 from a directory; an upgrade renames 3.13's library over
    it. As root the mapped file is read (map_files); without CAP_SYS_ADMIN the only file left at
    that path is another build, so the answer is a clear reason, never numbers from it."""
    pythons = {i.version: i.path for i in INTERPRETERS.values() if i.name.endswith("pyenv")}
    if "3.12" not in pythons or "3.13" not in pythons:
        pytest.skip("needs pyenv's 3.12 and 3.13")
    libdir = tmp_path / "lib"
    libdir.mkdir()
    lib12 = Path(pythons["3.12"]).resolve().parents[1] / "lib" / "libpython3.12.so.1.0"
    lib13 = Path(pythons["3.13"]).resolve().parents[1] / "lib" / "libpython3.13.so.1.0"
    shutil.copy2(lib12, libdir / lib12.name)
    p = _start([pythons["3.12"]], env=dict(os.environ, LD_LIBRARY_PATH=str(libdir)))
    try:
        assert str(libdir / lib12.name) in Path(f"/proc/{p.pid}/maps").read_text()
        shutil.copy2(lib13, libdir / "new.so")
        os.rename(libdir / "new.so", libdir / lib12.name)
        root = _run_probe(p.pid, no_sys_admin=False)
        assert root["reason"] == "ok" and root["version"].startswith("3.12.") and root["interval_us"] == 7700
        limited = _run_probe(p.pid, no_sys_admin=True)
        assert limited["reason"] == "binary_replaced", limited
        assert "map_files" in limited["detail"] and lib12.name in limited["detail"]
        report.record("3.12 pyenv", "libpython replaced", "root: read; no CAP_SYS_ADMIN: binary_replaced")
    finally:
        _stop(p)


@pytest.mark.parametrize("placement", ("chroot", "pivot_root"))
@pytest.mark.parametrize("name", ["3.14 Debian sid", "3.12 pyenv on sid's glibc"])
def test_contained_targets_without_map_files(name, placement):
    """Without CAP_SYS_ADMIN the file comes from the path as the reader sees it (chroot) or
    inside the target's root (pivot_root), checked against the target's own mapping."""
    with placements.start("cpu", INTERPRETERS[name], placement, switch_interval=0.0123) as w:
        out = _run_probe(w.pid, no_sys_admin=True)
    assert out["reason"] == "ok", out
    assert out["interval_us"] == 12300


# ----------------------------------------------------------------- a version the tables lack

def _contrived_316(tmp_path: Path, break_interpreters_head: bool = False) -> Path:
    """A copy of sid's python3.15 whose _Py_DebugOffsets say 3.16.0: the runtime never reads
    that word, so the process runs as 3.15 while every probe sees a version it has no table for."""
    data = bytearray((SID / "usr/bin/python3.15").read_bytes())
    old = gil.DEBUG_COOKIE + struct.pack("<Q", 0x030F02F0)
    at = data.find(old)
    assert at >= 0 and data.find(old, at + 1) < 0, "python3.15's debug offsets not found once"
    struct.pack_into("<Q", data, at + 8, 0x031000F0)
    if break_interpreters_head:      # the self-describing prefix no longer leads anywhere
        struct.pack_into("<Q", data, at + gil.DEBUG_OFFSETS_PREFIX["runtime_state.interpreters_head"], 8)
    exe = tmp_path / "python3.16"
    exe.write_bytes(bytes(data))
    exe.chmod(0o755)
    return exe


def _run_contrived(exe: Path) -> subprocess.Popen:
    lib = SID / placements.LIBDIR
    return _start([str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib), str(exe)],
                  env={"PYTHONHOME": str(SID / "usr"), "PATH": "/usr/bin:/bin"})


def _cpu_seconds(pid: int) -> float:
    """The process's CPU time so far: what the host gave it, for a failure's message."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_unknown_version_found_by_validated_search(tmp_path, sampler, report):
    p = _run_contrived(_contrived_316(tmp_path))
    try:
        loc = gil.locate(p.pid)
        assert loc.identity.version == "3.16.0"
        assert loc.method == "debug_offsets_search"
        real = gil.locate(p.pid, methods=("offset_table", "search"))     # 3.15's own GIL...
        assert real.address == loc.address                              # ...is the one found
        sampler.add(p.pid, loc)
        # Two spinning threads: one of them always holds the GIL, even while a loaded host
        # runs neither; how often the other is waiting for it, and when they first hand it
        # over, depends on the CPU the host gives: wait for a handoff rather than a fixed 1 s.
        deadline = time.monotonic() + 20
        while True:
            time.sleep(0.5)
            t = sampler.totals(p.pid)
            if t is not None and t.sampled_seconds >= 1.0 and t.switches > 0 and t.contended_seconds > 0:
                break
            assert time.monotonic() < deadline, (t, _cpu_seconds(p.pid))
        assert t.interval_seconds == 0.0077 and t.held_seconds / t.sampled_seconds >= 0.9, t
        report.record("3.16 (contrived)", "unknown version", f"{loc.method}, interval 7.7 ms exact")
    finally:
        _stop(p)


def test_unknown_version_without_a_way_in_is_unsupported(tmp_path, exporter, report):
    exe = _contrived_316(tmp_path, break_interpreters_head=True)
    p = _run_contrived(exe)
    try:
        with pytest.raises(gil.ProbeUnavailable) as ei:
            gil.locate(p.pid)
        assert ei.value.reason == "unsupported_version"
        assert "3.16.0" in ei.value.detail
        # the daemon says so in the label and in its log line, and falls back to /proc
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"targets:\n  - name: future\n    match: {{pid: {p.pid}}}\n")
        exp = exporter("--config", str(cfg))
        info = exp.wait_for(lambda: [s for s in exp.series("pygil_target_info", target="future")
                                     if s.labels["gil_probe"] not in ("pending",)])[0]
        assert info.labels["gil_probe"] == "unsupported_version"
        assert info.labels["python_version"] == "3.16.0"
        exp.wait_for(lambda: "unsupported_version" in exp.log_text() and "3.16.0" in exp.log_text())
        assert not exp.series("pygil_gil_held_seconds_total", target="future")
        # diagnose names the reason and the version, and its figures come from /proc alone
        from harness import exporter_command
        out = subprocess.run(exporter_command() + ["diagnose", str(p.pid), "--seconds", "2"],
                             capture_output=True, text=True, timeout=120)
        assert "unsupported_version" in out.stdout and "3.16.0" in out.stdout, out.stdout + out.stderr
        assert "estimated from /proc" in out.stdout or out.returncode == 2, out.stdout
        report.record("3.16 (contrived)", "no way in", "unsupported_version")
    finally:
        _stop(p)


# ----------------------------------------------------------------- subinterpreters with their own GIL

@pytest.mark.parametrize("placement", ("host", "pivot_root"))
def test_subinterpreters_have_their_own_gils(placement, report):
    """3.14's concurrent.interpreters: each subinterpreter created this way has its own GIL.
    locate_all() finds the main GIL and one per subinterpreter; each is contended inside, and
    they are distinct structs (so the process as a whole runs in parallel)."""
    interp = INTERPRETERS["3.14 Debian sid"]
    with placements.start("subinterpreters", interp, placement, threads=2) as w:
        locs = gil.locate_all(w.pid)
        assert len(locs) == 3, locs
        assert locs[0].interpreter_id == 0 and locs[0].address == gil.locate(w.pid).address
        assert len({loc.address for loc in locs}) == 3
        assert sorted(loc.interpreter_id for loc in locs[1:]) == [1, 2]
        held = {}
        for loc in locs:
            with gil.GilReader(loc) as r:
                reads = []
                for _ in range(150):
                    reads.append(r.read())
                    time.sleep(0.004)
            held[loc.interpreter_id] = (sum(x.locked for x in reads) / len(reads),
                                        sum(x.waiters for x in reads) / len(reads))
    report.record("3.14 Debian sid", f"{placement} subinterpreters",
                  ", ".join(f"interp {i}: held {h:.2f} waiters {wt:.2f}" for i, (h, wt) in sorted(held.items())))
    assert held[0][0] <= 0.2                       # the main interpreter only sleeps
    for i in (1, 2):                               # 2 CPU threads inside each: one waits
        assert held[i][0] >= 0.8 and 0.5 <= held[i][1] <= 1.2, held
