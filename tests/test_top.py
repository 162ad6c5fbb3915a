"""`gil-exporter top` in a real terminal (tmux: send-keys, capture-pane) on real workloads."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import placements
import pytest
import workloads
from harness import exporter_command

from exporter.top import parse_keys

pytestmark = pytest.mark.skipif(not Path("/usr/bin/tmux").exists(), reason="tmux missing (tests/setup/tools.sh)")

ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\d+)\s")          # PID TARGET THREADS ... (process list)
THREAD_ROW = re.compile(r"^\s*(\d+)\s+(.+?)\s+([RSDTtZXI])\s+(\S+)\s*(● holds(?:, blocked)?)?"
                        r"(?:\s+(\d+%|–)\s+(\d+%|–))?\s*$")     # ... [GIL HELD, WAITING]


class Tmux:
    """One `gil-exporter top` in a detached tmux session on a private tmux server."""

    def __init__(self, tmp_path: Path, args: list[str], width: int = 200, height: int = 50) -> None:
        self.socket = f"gil-exporter-test-{os.getpid()}-{time.monotonic_ns()}"
        self.rc = tmp_path / "top.rc"
        cmd = shlex.join(exporter_command() + ["top", *args])
        self.tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height),
                  f"{cmd}; echo $? > {shlex.quote(str(self.rc))}; sleep 600")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              check=True, timeout=20).stdout

    def screen(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "top")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def wait(self, predicate, timeout: float = 40.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            got = predicate(text)
            if got:
                return got
            time.sleep(0.3)
        raise AssertionError(f"screen never showed {what}:\n{self.screen()}")

    def exit_code(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.rc.exists() and self.rc.read_text().strip():
                return int(self.rc.read_text())
            time.sleep(0.1)
        raise AssertionError(f"top did not exit:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=20)
        # kill-server leaves the socket file behind
        tmpdir = os.environ.get("TMUX_TMPDIR", "/tmp")
        Path(f"{tmpdir}/tmux-{os.getuid()}/{self.socket}").unlink(missing_ok=True)


def _config(tmp_path: Path, pids: list[int]) -> Path:
    targets = "".join(f"  - name: w{i}\n    match:\n      pid: {pid}\n" for i, pid in enumerate(pids))
    path = tmp_path / "top.yaml"
    path.write_text(f"targets:\n{targets}scan_interval_seconds: 1\nwindow_seconds: 3\n")
    return path


def _process_rows(text: str) -> list[tuple[int, str, str]]:
    """(pid, target, whole line) of each row of the process list, top to bottom."""
    return [(int(m.group(1)), m.group(2), line) for line in text.splitlines()
            if (m := ROW.match(line)) and "PID" not in line]


def _scored(line: str) -> bool:
    cells = line.split()
    return len(cells) > 5 and re.fullmatch(r"\d\.\d\d", cells[4]) is not None


def _thread_rows(text: str) -> list[tuple[int, str, bool]]:
    """(tid, name, holds the GIL) of each row of the thread table."""
    out = []
    for line in text.splitlines():
        m = THREAD_ROW.match(line)
        if m and "TID" not in line:
            out.append((int(m.group(1)), m.group(2).strip(), bool(m.group(5))))
    return out


def _thread_shares(text: str) -> dict[int, tuple[float, float]]:
    """{tid: (GIL held, waiting)} from the thread table's share columns (absent: not shown)."""
    out = {}
    for line in text.splitlines():
        m = THREAD_ROW.match(line)
        if m and "TID" not in line and m.group(6) and "%" in m.group(6) + m.group(7):
            out[int(m.group(1))] = tuple(float(x.rstrip("%")) / 100 if x != "–" else 0.0
                                         for x in (m.group(6), m.group(7)))
    return out


def test_contended_process_first_threads_with_the_holder_and_q_quits(tmp_path):
    python = workloads.pyenv_pythons().get("3.12") or sys.executable
    contended = workloads.start_workload("cpu", python, threads=3)
    quiet = workloads.start_workload("sleep", python, threads=3)
    idle = workloads.start_workload("idle", python, threads=1)
    top = Tmux(tmp_path, ["--config", str(_config(tmp_path, [idle.pid, quiet.pid, contended.pid]))])
    try:
        # every process listed with a score, the contended one first, and selected
        rows = top.wait(lambda s: (r := _process_rows(s)) and len(r) == 3
                        and all(_scored(line) for _p, _t, line in r) and r, what="three scored rows")
        assert rows[0][0] == contended.pid, top.screen()
        first = next(line for line in top.screen(escapes=True).splitlines() if str(contended.pid) in line)
        assert "\x1b[7m" in first, "the first row is selected (reverse video)"
        assert float(rows[0][2].split()[4]) > float(rows[1][2].split()[4])

        # enter: its threads from /proc, the GIL holder marked among the workers
        top.keys("Enter")
        tids = {int(t) for t in os.listdir(f"/proc/{contended.pid}/task")}
        holders = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(holders) < 2:
            held = re.compile(r"GIL: held by TID (\d+) \(.*\) in work \(<string>:\d+\)")
            screen = top.wait(lambda s: f"pid {contended.pid}" in s and held.search(s) and s,
                              what="the thread view with a holder in work()")
            threads = _thread_rows(screen)
            assert {t for t, _n, _h in threads} == tids, screen
            marked = [t for t, _n, h in threads if h]
            assert marked == [int(held.search(screen).group(1))], screen
            assert marked[0] != contended.pid, screen       # a worker, not the sleeping main thread
            holders.add(marked[0])
            time.sleep(1.1)
        assert len(holders) >= 2, "the GIL passes between the three workers"

        # escape: back to the list; down moves the selection; q quits with 0
        top.keys("Escape")
        top.wait(lambda s: len(_process_rows(s)) == 3, what="the process list again")
        top.keys("Down")
        time.sleep(0.5)
        second = _process_rows(top.screen())[1][0]
        line = next(line for line in top.screen(escapes=True).splitlines() if str(second) in line)
        assert "\x1b[7m" in line, top.screen(escapes=True)
        top.keys("q")
        assert top.exit_code() == 0
    finally:
        top.close()
        for w in (contended, quiet, idle):
            w.stop()


def test_frozen_holder_is_marked_blocked(tmp_path):
    """A thread holding the GIL inside a blocking C call (ctypes.PyDLL usleep): the thread view
    says the holder is blocked and in which call, and marks its row."""
    python = workloads.pyenv_pythons().get("3.12") or sys.executable
    frozen = workloads.start_workload("frozen", python, threads=3)
    holder = int(frozen.proc.stdout.readline().strip().split("=")[1])
    top = Tmux(tmp_path, ["--config", str(_config(tmp_path, [frozen.pid]))])
    try:
        top.wait(lambda s: len(_process_rows(s)) == 1, what="the frozen process")
        top.keys("Enter")
        line = re.compile(rf"GIL: held by TID {holder} \(.*\) in hold \(<string>:\d+\), "
                          r"BLOCKED \(S in (clock_)?nanosleep\(\)\)")
        # the status line may wrap: search it with the screen's whitespace collapsed
        screen = top.wait(lambda s: line.search(" ".join(s.split())) and s,
                          what="the holder marked blocked")
        row = next(l for l in screen.splitlines() if (m := THREAD_ROW.match(l)) and int(m.group(1)) == holder)
        assert "● holds, blocked" in row, screen
        top.keys("q")
        assert top.exit_code() == 0
    finally:
        top.close()
        frozen.stop()


def test_default_config_shows_every_python_process(tmp_path):
    """No --config: every CPython process on the host (other sessions' too); ours among them,
    the contended one above the idle one."""
    contended = workloads.start_workload("cpu", threads=3)
    idle = workloads.start_workload("idle", threads=1)
    top = Tmux(tmp_path, [], height=100)
    try:
        def both_scored(screen):
            rows = {pid: line for pid, _t, line in _process_rows(screen)}
            return (contended.pid in rows and _scored(rows[contended.pid])
                    and (idle.pid not in rows or _scored(rows[idle.pid])) and rows)
        rows = top.wait(both_scored, what="our contended workload with a score")
        assert all(target == "python" for _p, target, _l in _process_rows(top.screen()))
        order = list(rows)
        if idle.pid in rows:            # on screen unless over 90 busier processes run
            assert order.index(contended.pid) < order.index(idle.pid), top.screen()
        top.keys("q")
        assert top.exit_code() == 0
    finally:
        top.close()
        contended.stop()
        idle.stop()


def test_thread_names_and_the_holders_function_on_debian_314(tmp_path):
    """Debian's 3.14 names OS threads after threading.Thread; the holder's code is shown."""
    interp = next((i for i in placements.interpreters() if i.name == "3.14 Debian sid"), None)
    if interp is None or not interp.available():
        pytest.skip("Debian sid root filesystem not built (tests/setup/rootfs.sh)")
    w = placements.start("hot", interp, "pivot_root", threads=3)
    top = Tmux(tmp_path, ["--config", str(_config(tmp_path, [w.pid]))])
    try:
        top.wait(lambda s: _process_rows(s), what="the process")
        top.keys("Enter")
        screen = top.wait(lambda s: re.search(r"GIL: held by TID \d+ \(Thread-\d \(work\)\) in (hot|cool) "
                                              r"\(<string>:\d+\)", s) and s, what="a named holder in hot/cool")
        names = sorted(n for _t, n, _h in _thread_rows(screen))
        assert names == ["Thread-1 (work)", "Thread-2 (work)", "Thread-3 (work)", "python3.14"], screen
        top.keys("q")
        assert top.exit_code() == 0
    finally:
        top.close()
        w.stop()


def test_thread_view_shows_each_threads_gil_shares(tmp_path):
    """The drill-down samples the process it shows: the CPU-bound thread among sleepers holds
    the largest share of the GIL, the sleepers wait for it; back in the list the columns go."""
    python = workloads.pyenv_pythons().get("3.12") or sys.executable
    w = workloads.start_workload("sleepers", python, threads=3)
    top = Tmux(tmp_path, ["--config", str(_config(tmp_path, [w.pid]))])
    try:
        ids = workloads.thread_ids(w)
        hot = ids["hot-worker"]
        top.wait(lambda s: _process_rows(s), what="the process")
        top.keys("Enter")
        # the hot thread and the sleepers (the main thread, idle, may show "–" or 0%)
        shares = top.wait(lambda s: "GIL HELD" in s and set(ids.values()) <= set(_thread_shares(s))
                          and _thread_shares(s), what="the share columns for every thread")
        assert max(shares, key=lambda t: shares[t][0]) == hot, top.screen()
        assert shares[hot][0] >= 0.5, top.screen()
        assert sum(wait for tid, (_h, wait) in shares.items() if tid != hot) > 0, top.screen()
        top.keys("Escape")
        top.wait(lambda s: "GIL HELD" not in s and _process_rows(s), what="the process list")
        top.keys("q")
        assert top.exit_code() == 0
    finally:
        top.close()
        w.stop()


def test_a_process_that_exits_while_open_goes_back_to_the_list(tmp_path):
    w = workloads.start_workload("cpu", threads=2)
    top = Tmux(tmp_path, ["--config", str(_config(tmp_path, [w.pid]))])
    try:
        top.wait(lambda s: _process_rows(s), what="the process")
        top.keys("Enter")
        top.wait(lambda s: f"pid {w.pid}" in s and _thread_rows(s), what="its threads")
        w.stop()                                    # killed and reaped
        top.wait(lambda s: f"process {w.pid} exited" in s and not _thread_rows(s),
                 what="the list again, saying it exited")
        top.keys("q")
        assert top.exit_code() == 0
    finally:
        top.close()
        w.stop()


def test_without_rich_one_line_and_exit_2():
    code = ("import sys; sys.modules['rich'] = None; from exporter.cli import main; "
            "raise SystemExit(main(['top']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr == "gil-exporter top: needs the Python package `rich`: pip install 'gil-exporter[top]'\n"


def test_without_a_terminal_exit_2():
    r = subprocess.run(exporter_command() + ["top"], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stderr.strip() == "gil-exporter top: needs a terminal (stdin and stdout)"


def test_bad_config_file_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets:\n  - name: a\n    match:\n      cmdline: 'x(['\n")
    r = subprocess.run(exporter_command() + ["top", "--config", str(bad)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and r.stderr.startswith(f"{bad}:4: ") and "Traceback" not in r.stderr


def test_keys_from_a_terminal():
    assert parse_keys(b"\x1b[A\x1b[Bjk\r\x1b[C\x1b[D\x1bq") == [
        "up", "down", "down", "up", "enter", "enter", "back", "back", "quit"]
    assert parse_keys(b"\x1b[5~x\x1bOA") == ["up"]       # page-up and x ignored


def test_top_level_help_names_top_and_stacks():
    r = subprocess.run(exporter_command() + ["--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert "gil-exporter top [--config FILE]" in r.stdout and "[--stacks]" in r.stdout
