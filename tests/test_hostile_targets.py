"""Targets that lie or change under the reader: each gets a reason, nothing wrong is published.

Real processes throughout: a small C program that maps a fake or truncated "libpython",
CPython running on a stripped libpython, non-UTF-8 argv/comm/exe, a target in another mount
namespace, a non-CPython process, and interpreters that finalize while being sampled.
"""
from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from harness import write_config
from workloads import pyenv_pythons, start_workload

from exporter.gil import elf as gil_elf

GIL_SERIES = ("pygil_gil_held_seconds_total", "pygil_gil_wait_seconds_total", "pygil_gil_contended_seconds_total",
              "pygil_gil_switches_total", "pygil_gil_switch_interval_seconds", "pygil_gil_waiting_threads")

MAPPER_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
/* argv[1] is a tag for matching; every further argument is a file to map read-only, except
   "--chroot DIR": chroot there once the files before it are mapped (the same paths then name
   what DIR holds). */
int main(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--chroot") && i + 1 < argc) {
            if (chroot(argv[++i]) || chdir("/")) { perror("chroot"); return 1; }
            continue;
        }
        int fd = open(argv[i], O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0) { perror(argv[i]); return 1; }
        if (mmap(0, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0) == MAP_FAILED) { perror("mmap"); return 1; }
    }
    puts("ready");
    fflush(stdout);
    pause();
    return 0;
}
"""


def _libpython(python: str) -> Path:
    prefix = Path(python).resolve().parent.parent
    libs = sorted((prefix / "lib").glob("libpython3*.so.1.0"))
    if not libs:
        pytest.skip(f"{python} has no shared libpython")
    return libs[0]


@pytest.fixture(scope="module")
def mapper(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the fake-mapping target")
    d = tmp_path_factory.mktemp("mapper")
    (d / "mapper.c").write_text(MAPPER_C)
    subprocess.run(["gcc", "-O1", "-o", str(d / "python3.11"), str(d / "mapper.c")], check=True)
    return d / "python3.11"  # named like an interpreter on purpose


def _start(argv, **kw):
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **kw)
    assert p.stdout.readline().strip() == "ready"
    return p


def _stop(p):
    p.kill()
    p.wait()
    p.stdout.close()


def _config(tmp_path, pattern):
    return write_config(tmp_path, f"""
targets:
  - name: hostile
    match:
      cmdline: '{pattern}'
scan_interval_seconds: 1
window_seconds: 2
""")


def _info(exp, pid):
    """target_info once the probe has an outcome."""
    return exp.wait_for(lambda: [s for s in exp.series("pygil_target_info", pid=pid)
                                 if s.labels["gil_probe"] != "pending"], timeout=20)[0]


def _no_gil_numbers(exp, pid):
    samples = exp.scrape()
    assert not [s for s in samples if s.name in GIL_SERIES and s.labels.get("pid") == str(pid)]
    assert not [s for s in samples if s.name == "pygil_gil_contention_score"
                and s.labels.get("pid") == str(pid) and s.labels["method"] == "gil_state"]


def test_fake_and_truncated_libpython(exporter, tmp_path, mapper):
    fake = tmp_path / "fake" / "libpython3.11.so.1.0"
    fake.parent.mkdir()
    fake.write_bytes(os.urandom(256 * 1024))
    real = _libpython(pyenv_pythons().get("3.11") or sys.executable)
    trunc = tmp_path / "trunc" / real.name
    trunc.parent.mkdir()
    trunc.write_bytes(real.read_bytes()[:64 * 1024])  # ELF header intact, sections cut off
    procs = [_start([str(mapper), "hostile-fake", str(fake)]),
             _start([str(mapper), "hostile-trunc", str(trunc)])]
    try:
        exp = exporter("--config", str(_config(tmp_path, "hostile-(fake|trunc)")))
        for p in procs:
            info = _info(exp, p.pid)
            assert info.labels["gil_probe"] not in ("ok", "pending"), info.labels
            assert info.labels["implementation"] != "cpython" or info.labels["gil_probe"] != "ok"
            _no_gil_numbers(exp, p.pid)
            assert exp.value("pygil_process_threads", pid=p.pid) == 1.0  # /proc figures still there
        assert exp.proc.poll() is None
        assert "Traceback" not in exp.log_text()
    finally:
        for p in procs:
            _stop(p)


def test_stripped_libpython_still_located(exporter, tmp_path):
    """strip --strip-all keeps .dynsym, where _PyRuntime lives: the probe must still work, exactly."""
    if shutil.which("strip") is None:
        pytest.skip("strip (binutils) is missing")
    python = pyenv_pythons().get("3.11") or sys.executable
    real = _libpython(python)
    libdir = tmp_path / "stripped"
    libdir.mkdir()
    shutil.copy(real, libdir / real.name)
    subprocess.run(["strip", "--strip-all", str(libdir / real.name)], check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=str(libdir))
    code = "import sys,threading,time\nsys.setswitchinterval(0.0077)\nprint('ready',flush=True)\ntime.sleep(600)"
    p = _start([python, "-c", code, "hostile-stripped"], env=env)
    try:
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        assert str(libdir / real.name) in maps, "the stripped copy is not the one loaded"
        exp = exporter("--config", str(_config(tmp_path, "hostile-stripped")))
        info = _info(exp, p.pid)
        assert info.labels["gil_probe"] == "ok", info.labels
        exp.wait_for(lambda: exp.value("pygil_gil_switch_interval_seconds", pid=p.pid) == 0.0077)
    finally:
        _stop(p)


def test_non_utf8_argv_comm_and_exe(exporter, tmp_path):
    python = pyenv_pythons().get("3.11") or sys.executable
    odd_dir = Path(os.fsdecode(bytes(tmp_path) + b"/bin\xff\xfe"))
    odd_dir.mkdir()
    odd_python = odd_dir / "python3"
    os.symlink(os.path.realpath(python), odd_python)
    code = textwrap.dedent("""
        import ctypes, threading, time
        libc = ctypes.CDLL(None)
        libc.prctl(15, b"\\xff\\xfegil\\xc3", 0, 0, 0)   # PR_SET_NAME: non-UTF-8 comm
        def spin():
            while True:
                sum(range(1000))
        for _ in range(2):
            threading.Thread(target=spin, daemon=True).start()
        print("ready", flush=True)
        time.sleep(600)
    """)
    # Run through a symlink in a non-UTF-8 directory: /proc/PID/exe resolves to the real binary,
    # argv[0] and the extra argument carry the odd bytes.
    p = _start([os.fsencode(odd_python), b"-c", code.encode(), b"hostile-\xff-argv"])
    try:
        exp = exporter("--config", str(_config(tmp_path, "hostile-.-argv")))
        info = _info(exp, p.pid)
        assert info.labels["gil_probe"] == "ok"
        status, page = exp.get("/")
        assert status == 200 and str(p.pid) in page
        exp.wait_for(lambda: exp.value("pygil_gil_held_seconds_total", pid=p.pid))
    finally:
        _stop(p)


def test_non_utf8_exe_path(exporter, tmp_path):
    """A copied interpreter whose own path is not UTF-8: label text stays valid UTF-8."""
    python = os.path.realpath(pyenv_pythons().get("3.11") or sys.executable)
    odd_dir = Path(os.fsdecode(bytes(tmp_path) + b"/exe\xff"))
    odd_dir.mkdir()
    shutil.copy(python, odd_dir / "python3.11")  # RUNPATH still finds its libpython
    p = _start([str(odd_dir / "python3.11"), "-c", "import time;print('ready',flush=True);time.sleep(600)",
                "hostile-exe"])
    try:
        exp = exporter("--config", str(_config(tmp_path, "hostile-exe$")))
        info = _info(exp, p.pid)
        assert "exe" in info.labels["exe"] and "\ufffd" in info.labels["exe"]
        assert info.labels["gil_probe"] == "ok"
    finally:
        _stop(p)


def test_target_in_another_mount_namespace(exporter, tmp_path):
    """The interpreter lives at a path that exists only in the target's mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is missing")
    python = os.path.realpath(pyenv_pythons().get("3.11") or sys.executable)
    prefix = Path(python).parent.parent
    private = tmp_path / "private-mnt"
    private.mkdir()
    script = (f"mount --make-rprivate / && mount --bind {prefix} {private} && "
              f"exec {private}/bin/{Path(python).name} -c "
              "\"import sys,threading,time\n"
              "def spin():\n    while True: sum(range(1000))\n"
              "[threading.Thread(target=spin,daemon=True).start() for _ in range(3)]\n"
              "print('ready',flush=True); time.sleep(600)\" hostile-mntns")
    try:
        p = _start(["unshare", "-m", "sh", "-c", script])
    except AssertionError:
        pytest.skip("unshare -m is not permitted here")
    try:
        assert not any(private.iterdir()), "the bind mount leaked into our namespace"
        assert str(private) in Path(f"/proc/{p.pid}/maps").read_text()
        exp = exporter("--config", str(_config(tmp_path, "hostile-mntns$")))
        info = _info(exp, p.pid)
        assert info.labels["gil_probe"] == "ok", info.labels
        score = exp.wait_for(lambda: exp.value("pygil_gil_contention_score", pid=p.pid, method="gil_state"),
                             timeout=20)
        assert score > 0.5
    finally:
        _stop(p)


def test_non_cpython_process_matching_the_config(exporter, tmp_path):
    if shutil.which("perl") is None:
        pytest.skip("perl is missing")
    p = _start(["perl", "-e", '$| = 1; print "ready\\n"; sleep 600', "hostile-notpython"])
    try:
        exp = exporter("--config", str(_config(tmp_path, "hostile-notpython")))
        sleep_pid = p.pid
        info = _info(exp, sleep_pid)
        assert info.labels["gil_probe"] != "ok"
        assert info.labels["implementation"] != "cpython"
        _no_gil_numbers(exp, sleep_pid)
        assert exp.value("pygil_process_threads", pid=sleep_pid) == 1.0
    finally:
        _stop(p)


@pytest.mark.parametrize("version", list(pyenv_pythons()))
def test_interpreters_finalizing_while_sampled(exporter, tmp_path, version):
    """Targets that exit by themselves (interpreter finalization tears the GIL down) while
    sampled at 100 Hz and scraped every 100 ms: every published figure stays sane."""
    python = pyenv_pythons()[version]
    code = textwrap.dedent("""
        import sys, threading, time
        def spin(stop):
            while not stop.is_set():
                sum(range(1000))
        stop = threading.Event()
        ts = [threading.Thread(target=spin, args=(stop,)) for _ in range(3)]
        for t in ts: t.start()
        print("ready", flush=True)
        time.sleep(float(sys.argv[1]))
        stop.set()
        for t in ts: t.join()
        # exits normally: Py_FinalizeEx destroys the GIL
    """)
    procs = [_start([python, "-c", code, str(2.5 + 0.3 * i), "hostile-final"]) for i in range(3)]
    try:
        exp = exporter("--config", str(_config(tmp_path, "hostile-final$")))
        last: dict = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            for s in exp.scrape():
                pid = s.labels.get("pid")
                if s.name.endswith("_total"):
                    key = (s.name, pid, s.labels.get("mode"), s.labels.get("type"))
                    assert s.value >= last.get(key, 0.0), (key, s.value, last.get(key))
                    last[key] = s.value
                if s.name == "pygil_gil_contention_score":
                    assert 0.0 <= s.value <= 1.0
                if s.name == "pygil_gil_waiting_threads":
                    assert 0.0 <= s.value <= 4.0, s.value
                if s.name == "pygil_gil_switch_interval_seconds":
                    assert s.value == 0.005
            time.sleep(0.1)
        for p in procs:
            assert p.wait(timeout=10) == 0
        exp.scrape()
        assert not exp.series("pygil_target_info", target="hostile")
        assert exp.proc.poll() is None and "Traceback" not in exp.log_text()
        print(f"finalization check ran on Python {version}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()


# --------------------------------------------------------------------------- files a target controls
#
# Each attack is built for real; each test asserts that a bystander CPython keeps its figures,
# that /metrics answers well inside the chart's scrape timeout, that the daemon's fds, threads
# and RSS stay flat (read from /proc/<exporter>) and that SIGTERM still ends it.

SCRAPE_TIMEOUT = 10.0     # the chart's scrape timeout: a scrape must take well under it
RSS_SLACK_KIB = 32 << 10  # an unbounded read of /dev/zero grows RSS by gigabytes


def _footprint(pid: int) -> tuple[int, int, int]:
    """(open fds, threads, VmRSS KiB) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")), rss


def _timed_scrape(exp) -> tuple[float, list]:
    t = time.monotonic()
    samples = exp.scrape()
    took = time.monotonic() - t
    assert took < SCRAPE_TIMEOUT / 2, f"/metrics took {took:.2f} s"
    return took, samples


def _bystander_sampled(exp, pid: int) -> float:
    """The bystander's sampled GIL time, once it has any (its GIL was located)."""
    return exp.wait_for(lambda: exp.value("pygil_gil_sampled_seconds_total", pid=pid), timeout=30)


def _assert_daemon_healthy(exp, bystander_pid: int, views: tuple[str, ...] = ()) -> None:
    """The bystander's figures keep arriving, scrapes stay quick and the footprint stays flat
    while the hostile input is read scan after scan (and its pages are viewed)."""
    before_sampled = _bystander_sampled(exp, bystander_pid)
    for path in views:   # the first view may start a sampler for the page's process
        exp.get(path)
    before = _footprint(exp.proc.pid)
    started = time.monotonic()
    slowest = 0.0
    for _ in range(8):   # ~4 scans at scan_interval_seconds: 1
        for path in views:
            status, _page = exp.get(path, timeout=SCRAPE_TIMEOUT)
            assert status in (200, 404), (path, status)
        took, _ = _timed_scrape(exp)
        slowest = max(slowest, took)
        time.sleep(0.5)
    after = _footprint(exp.proc.pid)
    elapsed = time.monotonic() - started
    sampled = exp.value("pygil_gil_sampled_seconds_total", pid=bystander_pid)
    assert sampled > before_sampled, (before_sampled, sampled, elapsed)
    assert exp.value("pygil_process_threads", pid=bystander_pid)
    assert after[0] <= before[0] + 2, f"fds {before[0]} -> {after[0]}"
    assert after[1] <= before[1] + 2, f"threads {before[1]} -> {after[1]}"
    assert after[2] <= before[2] + RSS_SLACK_KIB, f"RSS {before[2]} -> {after[2]} KiB"
    print(f"slowest scrape {slowest:.3f} s; fds {before[0]}->{after[0]}, threads {before[1]}->{after[1]}, "
          f"RSS {before[2]}->{after[2]} KiB over {elapsed:.1f} s; bystander sampled "
          f"{before_sampled:.2f}->{sampled:.2f} s")


def _assert_sigterm_exits(exp) -> None:
    t = time.monotonic()
    exp.signal(signal.SIGTERM)
    code = exp.proc.wait(timeout=30)
    took = time.monotonic() - t
    assert code == 0 and took < 5.0, (code, took, exp.log_text()[-2000:])
    assert "Traceback" not in exp.log_text()
    print(f"SIGTERM to exit: {took:.2f} s")


def _two_targets(tmp_path, hostile_match: str) -> Path:
    return write_config(tmp_path, f"""
targets:
  - name: bystander
    match:
      cmdline: 'hostile-bystander'
  - name: hostile
    match:
      {hostile_match}
scan_interval_seconds: 1
window_seconds: 2
""")


@pytest.fixture
def bystander():
    with start_workload("sleep", python=pyenv_pythons().get("3.12") or sys.executable, threads=1,
                        argv_tag="hostile-bystander") as w:
        yield w


@pytest.fixture
def no_sys_admin(monkeypatch):
    """Run the exporter as the chart does: root with CAP_SYS_PTRACE but without CAP_SYS_ADMIN,
    so /proc/PID/map_files is closed to it and the paths a target controls are what it opens."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    import harness
    plain = harness.exporter_command
    monkeypatch.setattr(harness, "exporter_command", lambda: [
        "setpriv", "--inh-caps=-sys_admin,-checkpoint_restore",
        "--bounding-set=-sys_admin,-checkpoint_restore", "--"] + plain())


@pytest.fixture(scope="module")
def libpython312(tmp_path_factory) -> Path:
    """A real libpython, copied where a test may map it under a name it chooses."""
    python = pyenv_pythons().get("3.12")
    if python is None:
        pytest.skip("pyenv's CPython 3.12 is missing")
    copy = tmp_path_factory.mktemp("real") / "libpython3.12.so"
    shutil.copy(_libpython(python), copy)
    return copy


def _make_special(path: Path, kind: str, big_file: Path | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        os.symlink("/dev/zero", path)
    elif kind == "directory":
        path.mkdir()
    else:
        raise ValueError(kind)


def _exporter_sees_no_sys_admin(exp) -> None:
    status = Path(f"/proc/{exp.proc.pid}/status").read_text()
    eff = int(next(l.split()[1] for l in status.splitlines() if l.startswith("CapEff:")), 16)
    assert not eff >> 21 & 1 and eff >> 19 & 1, f"CapEff {eff:x}: want SYS_PTRACE without SYS_ADMIN"


@pytest.mark.parametrize("kind", ["fifo", "devzero", "directory"])
def test_special_file_at_a_mapped_path_after_chroot(exporter, tmp_path, mapper, libpython312, bystander,
                                                    no_sys_admin, kind):
    """A root process maps a real libpython, then chroots so that the same path names a FIFO
    (a /dev/zero symlink, a directory). The locator must not open it: the bystander, started
    first, gets its GIL figures, and views of the hostile process's page leak nothing."""
    mapped = tmp_path / "lib" / "libpython3.12.so"
    mapped.parent.mkdir()
    shutil.copy(libpython312, mapped)
    jail = tmp_path / "jail"
    _make_special(jail / str(mapped).lstrip("/"), kind)
    hostile = _start([str(mapper), "hostile-chroot", str(mapped), "--chroot", str(jail)])
    try:
        assert os.readlink(f"/proc/{hostile.pid}/root") == str(jail)
        assert str(mapped) in Path(f"/proc/{hostile.pid}/maps").read_text()
        exp = exporter("--config", str(_two_targets(tmp_path, "cmdline: 'hostile-chroot'")))
        _exporter_sees_no_sys_admin(exp)
        assert _info(exp, bystander.pid).labels["gil_probe"] == "ok"
        info = _info(exp, hostile.pid)
        assert info.labels["gil_probe"] != "ok", info.labels   # a mapped library, not a running CPython
        _no_gil_numbers(exp, hostile.pid)
        _assert_daemon_healthy(exp, bystander.pid, views=(f"/process/{hostile.pid}",))
        _assert_sigterm_exits(exp)
    finally:
        _stop(hostile)


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_mapped_file_covered_in_the_targets_mount_namespace(exporter, tmp_path, mapper, libpython312,
                                                            bystander, no_sys_admin, kind):
    """The target maps a libpython at a path only its mount namespace has, then bind-mounts a
    FIFO (/dev/zero) over it: every path to the file now names a special file, and the probe
    says so (gil_probe="not_regular_file") instead of opening it."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("unshare and nsenter (util-linux) are needed")
    private = tmp_path / "private-lib"
    private.mkdir()
    script = (f"mount --make-rprivate / && mount --bind {libpython312.parent} {private} && "
              f"exec {mapper} hostile-covered {private}/libpython3.12.so")
    try:
        hostile = _start(["unshare", "-m", "sh", "-c", script])
    except AssertionError:
        pytest.skip("unshare -m is not permitted here")
    try:
        assert not any(private.iterdir()), "the bind mount leaked into our namespace"
        special = "/dev/zero"
        if kind == "fifo":
            special = str(tmp_path / "cover.fifo")
            os.mkfifo(special)
        subprocess.run(["nsenter", "-t", str(hostile.pid), "-m", "mount", "--bind", special,
                        f"{private}/libpython3.12.so"], check=True)
        assert f"{private}/libpython3.12.so" in Path(f"/proc/{hostile.pid}/maps").read_text()
        exp = exporter("--config", str(_two_targets(tmp_path, "cmdline: 'hostile-covered'")))
        _exporter_sees_no_sys_admin(exp)
        info = _info(exp, hostile.pid)
        assert info.labels["gil_probe"] == "not_regular_file", info.labels
        _no_gil_numbers(exp, hostile.pid)
        assert _info(exp, bystander.pid).labels["gil_probe"] == "ok"
        _assert_daemon_healthy(exp, bystander.pid, views=(f"/process/{hostile.pid}",))
        _assert_sigterm_exits(exp)
    finally:
        _stop(hostile)


def test_elf_claiming_a_huge_symbol_table(exporter, tmp_path, mapper, libpython312, bystander):
    """A sparse 64 GiB "libpython" whose .dynsym section header claims 2^32 symbols: parsing
    it symbol by symbol would run for days; the parse gives up at its ceiling."""
    from elftools.elf.elffile import ELFFile
    crafted = tmp_path / "huge" / "libpython3.12.so"
    crafted.parent.mkdir()
    shutil.copy(libpython312, crafted)
    with open(crafted, "r+b") as f:
        elf_file = ELFFile(f)
        index = next(i for i, sec in enumerate(elf_file.iter_sections()) if sec.name == ".dynsym")
        header_at = elf_file["e_shoff"] + index * elf_file["e_shentsize"]
        f.seek(header_at + 32)                   # Elf64_Shdr.sh_size
        f.write((24 << 32).to_bytes(8, "little"))
        f.seek(15)                               # e_ident padding: a first page (cache key) of its own
        f.write(b"\x01")
        f.truncate(64 << 30)
    hostile = _start([str(mapper), "hostile-hugeelf", str(crafted)])
    try:
        exp = exporter("--config", str(_two_targets(tmp_path, "cmdline: 'hostile-hugeelf'")))
        t = time.monotonic()
        info = _info(exp, hostile.pid)
        print(f"hostile ELF refused ({info.labels['gil_probe']}) {time.monotonic() - t:.2f} s after start")
        # The crafted libpython is refused; what is left is the mapper's own ELF, no CPython.
        assert info.labels["gil_probe"] in ("not_elf", "no_runtime_symbol"), info.labels
        with pytest.raises(gil_elf.NotElf, match="more than 32768 dynamic symbols"):
            gil_elf.load(str(crafted))
        assert _info(exp, bystander.pid).labels["gil_probe"] == "ok"
        _assert_daemon_healthy(exp, bystander.pid)
        _assert_sigterm_exits(exp)
    finally:
        _stop(hostile)


@pytest.mark.parametrize("kind", ["fifo", "devzero", "directory"])
def test_hostile_pidfile(exporter, tmp_path, bystander, kind):
    """A pidfile that is a FIFO (a /dev/zero symlink, a directory), read at every scan: the
    monitor thread never blocks on it or reads it without end; its target just has no process."""
    pidfile = tmp_path / "run" / "app.pid"
    _make_special(pidfile, kind)
    exp = exporter("--config", str(_two_targets(tmp_path, f"pidfile: '{pidfile}'")))
    assert _info(exp, bystander.pid).labels["gil_probe"] == "ok"
    _assert_daemon_healthy(exp, bystander.pid)
    assert not exp.series("pygil_target_info", target="hostile")
    _assert_sigterm_exits(exp)


def test_pidfile_is_read_only_as_a_regular_file(exporter, tmp_path, bystander):
    """The same target through a regular pidfile is found (the refusal above is not blindness),
    and a pidfile far larger than any pidfile costs one bounded read."""
    with start_workload("idle", argv_tag="hostile-by-pidfile") as service:
        pidfile = tmp_path / "app.pid"
        with open(pidfile, "wb") as f:
            f.write(f"{service.pid}\n".encode())
            f.truncate(8 << 30)                       # sparse: 8 GiB of NULs after the PID
        exp = exporter("--config", str(_two_targets(tmp_path, f"pidfile: '{pidfile}'")))
        exp.wait_for(lambda: exp.series("pygil_target_info", target="hostile", pid=service.pid))
        _assert_daemon_healthy(exp, bystander.pid)
        _assert_sigterm_exits(exp)


def test_config_fifo(exporter, tmp_path, bystander):
    """--config naming a FIFO: a one-line error and exit 2 at start and for --config.check,
    never a blocked open; at SIGHUP the running config stays, and SIGTERM still ends the daemon."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    from harness import exporter_command
    for extra in ([], ["--config.check"]):
        t = time.monotonic()
        r = subprocess.run(exporter_command() + ["--web.listen-address", "127.0.0.1:0", "--config", str(fifo)]
                           + extra, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t
        assert r.returncode == 2, (extra, r.returncode, r.stderr)
        assert r.stderr == f"{fifo}:0: cannot read config: not a regular file (a FIFO)\n", r.stderr
        print(f"{' '.join(extra) or 'start'} with a FIFO config: exit 2 after {took:.2f} s")
    config = _two_targets(tmp_path, "cmdline: 'hostile-nothing-matches'")
    exp = exporter("--config", str(config))
    assert _info(exp, bystander.pid).labels["gil_probe"] == "ok"
    config.unlink()
    os.mkfifo(config)
    exp.signal(signal.SIGHUP)
    exp.wait_for(lambda: "reload failed, keeping the running config" in exp.log_text()
                 and "not a regular file (a FIFO)" in exp.log_text(), timeout=20)
    _assert_daemon_healthy(exp, bystander.pid)
    _assert_sigterm_exits(exp)


# --------------------------------------------------------------------------- one process's failure
#
# A target can shape what a read of it returns: here a thread whose /proc/PID/task/TID/status
# is cut, at the 4096 bytes of one read, just after "voluntary_ctxt_switches:" (a root process
# sets supplementary groups until the Groups line puts the key there). The count then parsed
# as nothing: before the per-process guard that failed every pass for every process
# (errors_total{reason="tick"}), after it the hostile process's own; now procfs reads such a
# status again whole (procfs.read_ctx_switches).

STATUS_CUT_TARGET = r"""
import os, sys, threading, time
KEY, CUT = b"\nvoluntary_ctxt_switches:", 4096
tid = []
def sleeper():
    tid.append(threading.get_native_id())
    time.sleep(3600)
threading.Thread(target=sleeper, daemon=True).start()
while not tid:
    time.sleep(0.01)
path = f"/proc/self/task/{tid[0]}/status"
def key_end():
    with open(path, "rb") as f:
        data = f.read()
    return data.find(KEY) + len(KEY)
groups, n = [], 0
def place():
    # set groups until the key ends at the cut (again whenever the status shifts)
    global n
    for _ in range(2000):
        d = CUT - key_end()
        if d == 0:
            return True
        n += 1
        if d < 0:
            groups.pop()
        elif d == 1:  # one more digit on the last group
            groups[-1] = 1000000000 + n
        else:
            digits = min(9, d - 1)
            groups.append(10 ** (digits - 1) + n % (9 * 10 ** (digits - 1)) if digits > 1 else 1 + n % 9)
        os.setgroups(groups)
    return False
print(tid[0], "cut" if place() else "missed", flush=True)
while True:  # keep the attack in place: a queued signal or a grown fd table shifts the status
    time.sleep(0.1)
    place()
time.sleep(3600)
"""


def test_a_status_cut_at_the_read_is_read_whole(exporter, tmp_path):
    """The hostile target's thread status ends, at the 4096 bytes of one read, just after
    "voluntary_ctxt_switches:". That used to raise in the pass (every process lost its figures
    before the per-process guard; the hostile one after it). Now the status is read again whole:
    the hostile process is published with its context switches as /proc gives them read whole,
    nothing is counted as an error, and the spinning bystander keeps its figures."""
    if os.geteuid() != 0:
        pytest.skip("setgroups needs root")
    hostile = subprocess.Popen([sys.executable, "-c", STATUS_CUT_TARGET, "hostile-status-cut"],
                               stdout=subprocess.PIPE, text=True)
    try:
        tid, outcome = hostile.stdout.readline().split()
        assert outcome == "cut", "the target could not place its status cut"
        with start_workload("cpu", threads=2, argv_tag="hostile-bystander") as bystander:
            cfg = _two_targets(tmp_path, "cmdline: 'hostile-status-cut'")
            exp = exporter("--config", str(cfg))
            # the attack is real: a read of that thread's status as the exporter reads it ends at the key
            fd = os.open(f"/proc/{hostile.pid}/task/{tid}/status", os.O_RDONLY)
            try:
                exp.wait_for(lambda: os.pread(fd, 4096, 0).endswith(b"\nvoluntary_ctxt_switches:"), timeout=10)
                whole = os.pread(fd, 1 << 20, 0)
            finally:
                os.close(fd)
            exp.wait_for(lambda: exp.value("pygil_process_cpu_cores", pid=bystander.pid) is not None
                         and exp.series("pygil_gil_contention_score", pid=bystander.pid), timeout=30)
            published = exp.wait_for(lambda: exp.value("pygil_process_context_switches_total",
                                                       pid=hostile.pid, type="voluntary"), timeout=30)
            mark = b"\nvoluntary_ctxt_switches:"
            at = whole.rfind(mark) + len(mark)
            thread_vol = int(whole[at:whole.find(b"\n", at)])
            assert published >= thread_vol > 0, (published, thread_vol)
            for _ in range(3):
                samples = exp.scrape()
                mine = [s for s in samples if s.labels.get("pid") == str(bystander.pid)]
                assert {"pygil_process_cpu_cores", "pygil_gil_contention_score"} <= {s.name for s in mine}
                time.sleep(1.0)
            assert not exp.value("pygil_exporter_errors_total", reason="process")
            assert exp.value("pygil_exporter_errors_total", reason="tick") == 0
            assert "Traceback" not in exp.log_text()
            _assert_sigterm_exits(exp)
    finally:
        hostile.kill()
        hostile.wait()
        hostile.stdout.close()


# --------------------------------------------------------------------------- a locate that blocks
#
# A file whose reads never return: a FUSE filesystem served from this test (raw /dev/fuse
# protocol, no library), one regular file named libpython3.12.so whose READ requests are left
# unanswered. O_NONBLOCK does not help against it (a regular file), which is what a hung NFS or
# FUSE mount does too. A target maps it; the exporter's locate blocks in its first read. Like
# a hung mount that honours interrupts (NFS "intr", sshfs), a read ends with EINTR when its
# thread gets a signal, here the SIGKILL of the exporter's exit: a FUSE server that ignores
# even that keeps any process that read from it in the kernel (state D) until it answers.

_FUSE_IN = struct.Struct("<IIQQIIIHH")          # fuse_in_header
_FUSE_OUT = struct.Struct("<IiQ")               # fuse_out_header
_FUSE_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr (protocol 7.9+)
_LOOKUP, _GETATTR, _OPEN, _READ, _RELEASE, _FLUSH, _INIT, _OPENDIR, _RELEASEDIR = 1, 3, 14, 15, 18, 25, 26, 27, 29
_INTERRUPT = 36
_NO_REPLY = (2, 42)                             # FORGET, BATCH_FORGET


class StallFS:
    """A FUSE mount with one regular file, `name`, whose reads stay unanswered until close()."""

    def __init__(self, mountpoint: Path, name: bytes = b"libpython3.12.so", size: int = 1 << 20):
        import ctypes
        import threading
        self.mountpoint, self.name, self.size = mountpoint, name, size
        self.reads = 0          # READ requests left hanging
        self._pending: list[int] = []
        self._closing = False
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        self._libc = ctypes.CDLL(None, use_errno=True)
        opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if self._libc.mount(b"stallfs", str(mountpoint).encode(), b"fuse", 6, opts) != 0:  # nosuid, nodev
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, os.strerror(err))
        # served only once mounted: /dev/fuse refuses reads (EPERM) before
        threading.Thread(target=self._serve, name="stallfs", daemon=True).start()

    def _attr(self, node: int) -> bytes:
        if node == 1:
            return _FUSE_ATTR.pack(1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
        return _FUSE_ATTR.pack(2, self.size, self.size // 512, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096, 0)

    def _reply(self, unique: int, payload: bytes = b"", error: int = 0) -> None:
        os.write(self.fd, _FUSE_OUT.pack(_FUSE_OUT.size + len(payload), error, unique) + payload)

    def _serve(self) -> None:
        import errno
        while True:
            try:
                req = os.read(self.fd, (1 << 17) + 4096)
            except OSError:
                return  # unmounted
            if len(req) < _FUSE_IN.size:
                continue
            length, op, unique, node, *_ = _FUSE_IN.unpack_from(req)
            body = req[_FUSE_IN.size:length]
            try:
                if op == _INIT:  # protocol 7.31, no optional features
                    self._reply(unique, struct.pack("<IIIIHHIIHHII", 7, 31, 0, 0, 0, 0, 1 << 17, 1, 0, 0, 0, 0)
                                + bytes(24))
                elif op == _LOOKUP:
                    if node == 1 and body.rstrip(b"\0") == self.name:
                        self._reply(unique, struct.pack("<QQQQII", 2, 0, 3600, 3600, 0, 0) + self._attr(2))
                    else:
                        self._reply(unique, error=-errno.ENOENT)
                elif op == _GETATTR:
                    self._reply(unique, struct.pack("<QII", 3600, 0, 0) + self._attr(node))
                elif op in (_OPEN, _OPENDIR):
                    self._reply(unique, struct.pack("<QII", 0, 0, 0))
                elif op == _READ and not self._closing:
                    self.reads += 1
                    self._pending.append(unique)  # never answered: the reader blocks
                elif op == _READ:
                    self._reply(unique, error=-errno.EIO)
                elif op == _INTERRUPT:  # a signal for the reader (its process exits): EINTR
                    interrupted, = struct.unpack_from("<Q", body)
                    if interrupted in self._pending:
                        self._pending.remove(interrupted)
                        self._reply(interrupted, error=-errno.EINTR)
                elif op in (_RELEASE, _RELEASEDIR, _FLUSH):
                    self._reply(unique)
                elif op not in _NO_REPLY:
                    self._reply(unique, error=-errno.ENOSYS)
            except OSError:
                pass

    def close(self) -> None:
        """Fail the blocked reads (EIO) and unmount."""
        import errno
        self._closing = True
        for unique in self._pending:
            try:
                self._reply(unique, error=-errno.EIO)
            except OSError:
                pass
        self._libc.umount2(str(self.mountpoint).encode(), 2)  # MNT_DETACH
        os.close(self.fd)


@pytest.fixture
def stallfs(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("mounting a FUSE filesystem needs root and /dev/fuse")
    mnt = tmp_path / "stall"
    mnt.mkdir()
    try:
        fs = StallFS(mnt)
    except OSError as e:
        pytest.skip(f"cannot mount FUSE here: {e}")
    try:
        yield fs
    finally:
        fs.close()


def test_a_locate_blocked_in_a_target_file_times_out(exporter, tmp_path, mapper, stallfs, bystander):
    """The hostile target's locate blocks in a read for good: after the locator's deadline it
    says gil_probe="locate_timeout", a fresh worker locates the others (a CPython started after
    the stall gets ok), the stuck read is not retried (one stuck thread, not one per retry),
    threads, fds and RSS stay flat, and SIGTERM still ends the daemon within seconds."""
    from exporter.giltracker import LOCATE_DEADLINE
    mapped = stallfs.mountpoint / "libpython3.12.so"
    hostile = _start([str(mapper), "hostile-stall", str(mapped)])
    try:
        assert str(mapped) in Path(f"/proc/{hostile.pid}/maps").read_text()
        exp = exporter("--config", str(_two_targets(tmp_path, "cmdline: 'hostile-stall'")))
        started = time.monotonic()
        exp.wait_for(lambda: stallfs.reads, timeout=20)  # the locate is in the read now
        info = exp.wait_for(lambda: [s for s in exp.series("pygil_target_info", pid=hostile.pid)
                                     if s.labels["gil_probe"] == "locate_timeout"], timeout=LOCATE_DEADLINE + 20)[0]
        took = time.monotonic() - started
        assert took >= LOCATE_DEADLINE - 1.0, took  # abandoned at the deadline, not before
        assert exp.value("pygil_exporter_errors_total", reason="gil_locate") >= 1
        assert _info(exp, bystander.pid).labels["gil_probe"] == "ok"
        with start_workload("sleep", threads=1, argv_tag="hostile-bystander") as late:
            t = time.monotonic()
            assert _info(exp, late.pid).labels["gil_probe"] == "ok"
            print(f"locate_timeout after {took:.1f} s; a CPython started after it located in "
                  f"{time.monotonic() - t:.1f} s; hostile: {info.labels['gil_probe']}")
        _assert_daemon_healthy(exp, bystander.pid, views=(f"/process/{hostile.pid}",))
        assert stallfs.reads <= 2, stallfs.reads  # the stuck locate is not tried again meanwhile
        _assert_sigterm_exits(exp)
    finally:
        _stop(hostile)
