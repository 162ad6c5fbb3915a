"""Targets that lie or change under the reader: each gets a reason, nothing wrong is published.

Real processes throughout: a small C program that maps a fake or truncated "libpython",
CPython running on a stripped libpython, non-UTF-8 argv/comm/exe, a target in another mount
namespace, a non-CPython process, and interpreters that finalize while being sampled.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness import write_config
from workloads import pyenv_pythons, start_workload

GIL_SERIES = ("pygil_gil_held_seconds_total", "pygil_gil_wait_seconds_total", "pygil_gil_contended_seconds_total",
              "pygil_gil_switches_total", "pygil_gil_switch_interval_seconds", "pygil_gil_waiting_threads")

MAPPER_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
/* argv[1] is a tag for matching; every further argument is a file to map read-only. */
int main(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
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
