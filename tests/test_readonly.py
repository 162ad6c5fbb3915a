"""Read-only proof: the daemon, traced by strace while it samples contended targets, never
ptrace-attaches, never writes to a target's memory and never signals a target.

The exporter runs under `strace -f` against 3 "cpu" workloads (three CPython versions)
and samples their GIL at 100 Hz for ~8 s (checked through /metrics: gil_probe="ok" and
pygil_gil_contended_seconds_total growing), then stops on SIGTERM. The trace is parsed with
an fd table (open/openat, close, dup*, fcntl F_DUPFD) so that every pread64/write/pwrite64
on a /proc/PID/mem fd is attributed. Asserted:

- 0 ptrace calls of any kind (so 0 PTRACE_ATTACH/SEIZE/POKE*), 0 process_vm_writev;
- every open of /proc/*/mem is O_RDONLY; 0 write/pwrite64 on such an fd; no open of any
  file under a target's /proc/PID/ for writing;
- 0 signals to any other process: kill/tkill/tgkill/rt_sigqueueinfo/rt_tgsigqueueinfo
  aimed at a pid other than the exporter's own, pidfd_send_signal at all (signal 0, an
  existence check that sends nothing, is counted separately and reported).

strace must be installed (tests/run.sh installs it); without it the test is skipped.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import pytest
from harness import _URL, exporter_command, write_config
from prometheus_client.parser import text_string_to_metric_families
from workloads import pyenv_pythons, start_workload

TRACE = ("ptrace,process_vm_writev,process_vm_readv,open,openat,close,dup,dup2,dup3,fcntl,"
         "write,pwrite64,pwritev,pwritev2,pread64,"
         "kill,tkill,tgkill,pidfd_send_signal,rt_sigqueueinfo,rt_tgsigqueueinfo")

_LINE = re.compile(r"^(?:\[pid\s+)?(?P<tid>\d+)\]?\s+(?P<rest>.*)$")
_CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+|\?|0x[0-9a-f]+)(?P<err>.*)$")
_MEM = re.compile(r'^"/proc/(\d+)(?:/task/\d+)?/mem"$')
_PROC_FILE = re.compile(r'^"/proc/(\d+)/')


@dataclass
class TraceReport:
    exporter_pid: int
    calls: Counter = field(default_factory=Counter)
    ptrace: list = field(default_factory=list)
    vm_writes: list = field(default_factory=list)
    vm_reads: int = 0
    mem_opens: int = 0
    mem_open_flags: Counter = field(default_factory=Counter)
    mem_opens_not_rdonly: list = field(default_factory=list)
    proc_opens_for_write: list = field(default_factory=list)
    mem_reads: int = 0
    mem_read_pids: Counter = field(default_factory=Counter)
    mem_writes: list = field(default_factory=list)
    signals_to_others: list = field(default_factory=list)
    existence_checks: int = 0  # kill(pid, 0): no signal is sent
    unparsed: int = 0

    def summary(self) -> str:
        return (f"ptrace calls: {len(self.ptrace)}; process_vm_writev: {len(self.vm_writes)}; "
                f"/proc/PID/mem opens: {self.mem_opens} (flags {dict(self.mem_open_flags)}), "
                f"not O_RDONLY: {len(self.mem_opens_not_rdonly)}; /proc/PID files opened for writing: "
                f"{len(self.proc_opens_for_write)}; preads of mem fds: {self.mem_reads} "
                f"(by pid {dict(self.mem_read_pids)}); writes to mem fds: {len(self.mem_writes)}; "
                f"signals to other processes: {len(self.signals_to_others)}; kill(pid, 0) checks: "
                f"{self.existence_checks}; process_vm_readv: {self.vm_reads}; syscalls traced: "
                f"{sum(self.calls.values())} {dict(self.calls)}; unparsed lines: {self.unparsed}")


def _split_args(args: str) -> list[str]:
    """Top-level comma split of an strace argument list (quotes, brackets, braces)."""
    out, depth, cur, quoted, esc = [], 0, [], False, False
    for ch in args:
        if quoted:
            cur.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur).strip())
    return out


def _int(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None


def parse_trace(text: str, exporter_pid: int) -> TraceReport:
    r = TraceReport(exporter_pid)
    pending: dict[str, str] = {}  # tid -> start of an <unfinished ...> call
    mem_fds: dict[int, int] = {}  # fd -> target pid (one fd table: the exporter never forks)
    for raw in text.splitlines():
        m = _LINE.match(raw.strip())
        if not m:
            r.unparsed += 1
            continue
        tid, rest = m.group("tid"), m.group("rest")
        if rest.endswith("<unfinished ...>"):
            pending[tid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        if rest.startswith("<..."):
            head = pending.pop(tid, None)
            body = re.sub(r"^<\.\.\. \w+ resumed>\s*", "", rest)
            if head is None:
                r.unparsed += 1
                continue
            rest = head + body
        if rest.startswith(("+++", "---")):
            continue  # exit or signal delivery notes
        c = _CALL.match(rest)
        if not c:
            r.unparsed += 1
            continue
        name, args, ret = c.group("name"), _split_args(c.group("args")), _int(c.group("ret"))
        r.calls[name] += 1
        if name == "ptrace":
            r.ptrace.append(rest)
        elif name in ("process_vm_writev",):
            r.vm_writes.append(rest)
        elif name == "process_vm_readv":
            r.vm_reads += 1
        elif name in ("open", "openat"):
            path, flags = (args[0], args[1]) if name == "open" else (args[1], args[2])
            flagset = set(flags.split("|"))
            writing = bool(flagset & {"O_WRONLY", "O_RDWR", "O_TRUNC", "O_CREAT", "O_APPEND"})
            mm = _MEM.match(path)
            pf = _PROC_FILE.match(path)
            if mm:
                r.mem_opens += 1
                access = [f for f in flags.split("|") if f in ("O_RDONLY", "O_WRONLY", "O_RDWR")]
                r.mem_open_flags["|".join(access) or flags] += 1
                if "O_RDONLY" not in flagset or writing:
                    r.mem_opens_not_rdonly.append(rest)
                if ret is not None and ret >= 0:
                    mem_fds[ret] = int(mm.group(1))
            elif ret is not None and ret >= 0:
                mem_fds.pop(ret, None)
            if pf and writing and int(pf.group(1)) != exporter_pid:
                r.proc_opens_for_write.append(rest)
        elif name == "close":
            fd = _int(args[0]) if args else None
            if fd is not None and ret == 0:
                mem_fds.pop(fd, None)
        elif name in ("dup", "dup2", "dup3", "fcntl"):
            old = _int(args[0]) if args else None
            if name == "fcntl" and not (len(args) > 1 and args[1].startswith("F_DUPFD")):
                continue
            if ret is not None and ret >= 0:
                if old in mem_fds:
                    mem_fds[ret] = mem_fds[old]
                else:
                    mem_fds.pop(ret, None)
        elif name in ("write", "pwrite64", "pwritev", "pwritev2"):
            fd = _int(args[0]) if args else None
            if fd in mem_fds:
                r.mem_writes.append(rest)
        elif name == "pread64":
            fd = _int(args[0]) if args else None
            if fd in mem_fds:
                r.mem_reads += 1
                r.mem_read_pids[mem_fds[fd]] += 1
        elif name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            to = _int(args[0]) if args else None
            sig = args[-1] if name in ("kill", "tkill") else args[2] if name == "tgkill" else args[1]
            if sig in ("0", "SIG_0"):
                r.existence_checks += 1
                continue
            own = {exporter_pid}
            if name == "tkill":
                # a thread of the exporter itself is fine: the tids seen in the trace are ours
                own |= {int(t) for t in re.findall(r"^(?:\[pid\s+)?(\d+)", text, re.M)}
            if to not in own:
                r.signals_to_others.append(rest)
        elif name == "pidfd_send_signal":
            r.signals_to_others.append(rest)
    return r


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _scrape(base: str) -> list:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _pick(versions: dict[str, str], n: int = 3) -> dict[str, str]:
    keys = list(versions)
    if len(keys) <= n:
        return versions
    idx = sorted({0, len(keys) // 2, len(keys) - 1})
    return {keys[i]: versions[keys[i]] for i in idx}


@pytest.mark.skipif(shutil.which("strace") is None,
                    reason="strace is not installed (tests/run.sh installs it: apt-get install -y strace)")
def test_exporter_never_attaches_writes_or_signals(tmp_path):
    tag = f"gil-readonly-{os.getpid()}"
    pythons = _pick(pyenv_pythons())
    workloads = [start_workload("cpu", python=py, threads=3, argv_tag=tag) for py in pythons.values()]
    targets = {w.pid: v for w, v in zip(workloads, pythons)}
    cfg = write_config(tmp_path, f"""\
targets:
  - name: readonly
    match:
      cmdline: '{tag}'
scan_interval_seconds: 1
window_seconds: 3
sampling:
  enabled: true
  rate_hz: 100
""")
    trace = tmp_path / "strace.log"
    log = tmp_path / "exporter.log"
    cmd = ["strace", "-f", "-qq", "-s", "256", "-e", f"trace={TRACE}", "-o", str(trace),
           *exporter_command(), "--config", str(cfg), "--web.listen-address", "127.0.0.1:0"]
    with open(log, "wb") as logf:
        strace = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logf)
    exporter_pid = None
    try:
        deadline = time.monotonic() + 60
        base = None
        while time.monotonic() < deadline and base is None:
            m = _URL.search(log.read_text(errors="replace"))
            if m:
                base = m.group(1)
            elif strace.poll() is not None:
                pytest.fail(f"exporter under strace exited {strace.returncode}: {log.read_text()}")
            time.sleep(0.1)
        assert base, log.read_text()
        kids = _children(strace.pid)
        assert len(kids) == 1, kids
        exporter_pid = kids[0]

        def probed() -> bool:
            ok = {int(s.labels["pid"]) for s in _scrape(base)
                  if s.name == "pygil_target_info" and s.labels.get("gil_probe") == "ok"}
            return set(targets) <= ok

        deadline = time.monotonic() + 60
        while not probed():
            assert time.monotonic() < deadline, (_scrape(base), log.read_text())
            time.sleep(0.5)

        def contended() -> dict[int, float]:
            return {int(s.labels["pid"]): s.value for s in _scrape(base)
                    if s.name == "pygil_gil_contended_seconds_total" and int(s.labels["pid"]) in targets}

        before = contended()
        time.sleep(8)
        after = contended()
        for pid, version in targets.items():
            assert after.get(pid, 0) > before.get(pid, 0), (version, before, after)

        os.kill(exporter_pid, signal.SIGTERM)
        assert strace.wait(timeout=30) == 0, log.read_text()
    finally:
        if strace.poll() is None:
            if exporter_pid:
                try:
                    os.kill(exporter_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            strace.kill()
            strace.wait()
        for w in workloads:
            w.stop()

    report = parse_trace(trace.read_text(errors="replace"), exporter_pid)
    print("\nPythons", ", ".join(pythons), "--", report.summary())

    # the trace saw the probe at work
    assert report.mem_opens >= len(targets), report.summary()
    assert set(report.mem_read_pids) >= set(targets), report.summary()
    assert report.mem_reads >= 100 * len(targets), report.summary()  # ~8 s at 100 Hz each
    assert report.unparsed == 0, report.summary()

    assert report.ptrace == [], report.ptrace[:5]
    assert report.vm_writes == [], report.vm_writes[:5]
    assert report.mem_opens_not_rdonly == [], report.mem_opens_not_rdonly[:5]
    assert report.proc_opens_for_write == [], report.proc_opens_for_write[:5]
    assert report.mem_writes == [], report.mem_writes[:5]
    assert report.signals_to_others == [], report.signals_to_others[:5]


def test_parse_trace_catches_violations():
    """The parser itself: each forbidden call in a hand-written trace is found."""
    text = "\n".join([
        '100 openat(AT_FDCWD, "/proc/200/mem", O_RDONLY|O_CLOEXEC) = 5',
        '101 pread64(5, "\\0\\0"..., 24, 140000) = 24',
        '100 openat(AT_FDCWD, "/proc/200/mem", O_RDWR|O_CLOEXEC) = 6',
        '100 pwrite64(6, "x", 1, 140000) = 1',
        '100 close(6) = 0',
        '100 openat(AT_FDCWD, "/etc/hosts", O_RDONLY) = 6',
        '100 write(6, "x", 1) = -1 EBADF (Bad file descriptor)',
        '101 ptrace(PTRACE_SEIZE, 200, NULL, 0 <unfinished ...>',
        '100 kill(200, 0) = 0',
        '101 <... ptrace resumed>) = 0',
        '100 tgkill(200, 201, SIGSTOP) = 0',
        '100 kill(100, SIGTERM) = 0',
        '100 process_vm_writev(200, [{iov_base="x", iov_len=1}], 1, [{iov_base=0x1, iov_len=1}], 1, 0) = 1',
        '100 +++ exited with 0 +++',
    ])
    r = parse_trace(text, exporter_pid=100)
    assert r.unparsed == 0
    assert r.mem_opens == 2 and len(r.mem_opens_not_rdonly) == 1
    assert r.mem_reads == 1 and len(r.mem_writes) == 1  # the write on /etc/hosts is not counted
    assert len(r.ptrace) == 1 and "PTRACE_SEIZE" in r.ptrace[0]
    assert len(r.vm_writes) == 1
    assert r.existence_checks == 1
    assert len(r.signals_to_others) == 1 and "SIGSTOP" in r.signals_to_others[0]
