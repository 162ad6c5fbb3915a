"""Churn soak: many short-lived matching processes start and end under the real daemon.

Processes live 0.2-3 s and run one of the real test workloads (sleep threads, CPU threads,
"churn": threads that start and end) under a random pyenv CPython. Half end by themselves
(normal interpreter exit with daemon threads still running), half are SIGKILLed at a random
moment, many while the exporter's 100 Hz sampler is reading their GIL. Some are spawned at the
PID of one that was just reaped (root: /proc/sys/kernel/ns_last_pid is set to PID-1 just
before the fork; the new PID is verified).

Checked at every scrape (about twice a second, and right after every reap):

- no series for a process that is dead: every `pid` label of the soak target belongs to a
  child that was alive (not reaped) just before the scrape;
- every *_total counter is monotonic per (pid, start time) across scrapes;
- the daemon is alive and pygil_exporter_errors_total stays 0.

At the end: error lines and tracebacks in the daemon's log (run at --log.level debug so
that handled failures log their traceback), and the daemon's open fds and RSS after
warm-up versus at the end, both measured with no soak process left (after two scans).

    .venv/bin/python bench/soak.py --seconds 600 --processes 1000

prints a Markdown table; with --output FILE it also appends it, with the command, to FILE.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import Exporter  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from workloads import _PRELUDE, SCRIPTS, pyenv_pythons  # noqa: E402

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
TARGET = "soak"
# (workload, weight): sleeping threads, GIL-serialized CPU threads, threads that come and go.
MIX = (("sleep", 4), ("churn", 3), ("cpu", 2), ("starved", 1))
# The real workload scripts end with forever(); here forever() returns after SOAK_LIFETIME
# seconds, so the interpreter exits normally with its daemon threads still running.
_LIFETIME = """
def forever():
    time.sleep(float(os.environ.get("SOAK_LIFETIME", "3600")))
"""


def script(name: str) -> str:
    return _PRELUDE + _LIFETIME + textwrap.dedent(SCRIPTS[name])


def start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rfind(b")") + 2:].split()[19])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_links(pid: int) -> list[str]:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def steady_fds(pid: int, samples: int = 20, every: float = 0.1) -> list[str]:
    """The smallest fd set seen over `samples` readings: a leaked fd stays in every reading,
    one the daemon holds for a moment (a /proc read, a scrape connection) does not."""
    best = None
    for _ in range(samples):
        links = fd_links(pid)
        if best is None or len(links) < len(best):
            best = links
        time.sleep(every)
    return best or []


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def can_set_last_pid() -> bool:
    try:
        with open(NS_LAST_PID, "r+") as f:
            f.write(f.read().strip())
        return True
    except OSError:
        return False


@dataclass
class Child:
    popen: subprocess.Popen
    start: int
    workload: str
    python: str
    spawned: float
    kill_at: float | None  # None: exits by itself
    reused_from: int | None = None  # the pid it was meant to reuse (== its pid when achieved)
    seen: bool = False  # present in /metrics at least once
    seen_ok: bool = False  # last scrape showed gil_probe="ok" (the sampler reads it)
    ended: float | None = None
    how: str = ""
    ever_ok: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Stats:
    command: str = ""
    seconds: float = 0.0
    planned: int = 0
    started: int = 0
    exited_by_themselves: int = 0
    exited_nonzero: int = 0
    killed: int = 0
    killed_mid_sample: int = 0
    killed_tracked: int = 0
    seen_in_metrics: int = 0
    seen_probe_ok: int = 0
    reuse_attempts: int = 0
    reuses: int = 0
    reuses_seen_both: int = 0  # both incarnations of a reused pid appeared in /metrics
    scrapes: int = 0
    scrapes_after_reap: int = 0
    scrape_failures: int = 0
    max_concurrent: int = 0
    max_children: int = 0
    fd_warm: int = 0
    fd_end: int = 0
    fd_max: int = 0
    rss_warm_kib: int = 0
    rss_end_kib: int = 0
    rss_max_kib: int = 0
    errors: dict = field(default_factory=dict)
    log_errors: int = 0
    log_warnings: int = 0
    tracebacks: int = 0
    exporter_alive: bool = True
    dead_series: int = 0  # violation: a series for a process that was dead before the scrape
    counter_decreases: int = 0  # violation
    missed: int = 0  # live > 2.5 scan intervals and never shown (coverage, informative)
    leftover_after_quiesce: int = 0  # violation: soak series with no soak process alive
    examples: list = field(default_factory=list)
    pythons: str = ""

    @property
    def violations(self) -> int:
        return self.dead_series + self.counter_decreases + self.leftover_after_quiesce

    def note(self, text: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(text)


class Soak:
    def __init__(self, seconds: float, processes: int, seed: int | None = None,
                 reuse_fraction: float = 0.15, scrape_every: float = 0.5,
                 pythons: dict[str, str] | None = None, log=print):
        self.seconds = seconds
        self.processes = processes
        self.rng = random.Random(seed)
        self.reuse_fraction = reuse_fraction
        self.scrape_every = scrape_every
        self.pythons = pythons or pyenv_pythons()
        self.log = log
        self.tag = f"gil-soak-{uuid.uuid4().hex[:10]}"
        self.stats = Stats(seconds=seconds, planned=processes,
                           pythons=", ".join(self.pythons))
        self.live: dict[int, Child] = {}
        self.last: dict[tuple, float] = {}  # (pid, start, name, labels) -> last value
        self.errors_last: dict[str, float] = {}
        self.reuse_queue: list[int] = []
        self.seen_pids: dict[int, set] = {}  # pid -> start times shown in /metrics
        self.history: dict[int, list[Child]] = {}  # pid -> every child that had it
        self.diagnosed: set[int] = set()
        self.fd_sets: list[list[str]] = []  # exporter fds after warm-up, at the end
        self.can_reuse = can_set_last_pid()
        self.exporter: Exporter | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="gil-soak-")
        self._env = dict(os.environ)
        self._env.pop("PYTHONPATH", None)

    # -- the exporter ----------------------------------------------------------
    def config_text(self) -> str:
        return textwrap.dedent(f"""\
            targets:
              - name: {TARGET}
                match:
                  cmdline: '{self.tag}'
            scan_interval_seconds: 1
            window_seconds: 3
            sampling:
              enabled: true
              rate_hz: 100
            limits:
              max_targets: 200
              max_processes_per_target: 200
            """)

    def start_exporter(self) -> Exporter:
        path = Path(self._tmp.name) / "soak.yaml"
        path.write_text(self.config_text())
        self.exporter = Exporter(["--config", str(path), "--log.level", "debug"])
        return self.exporter

    # -- children --------------------------------------------------------------
    def spawn(self, now: float) -> Child:
        name = self.rng.choices([m for m, _ in MIX], [w for _, w in MIX])[0]
        version = self.rng.choice(list(self.pythons))
        python = self.pythons[version]
        lifetime = self.rng.uniform(0.2, 3.0)
        killed = self.rng.random() < 0.5
        env = dict(self._env, WORKLOAD_THREADS=str(self.rng.randint(1, 4)),
                   SOAK_LIFETIME="3600" if killed else f"{lifetime:.3f}")
        argv = [python, "-u", "-c", script(name), "gil-workload", name, self.tag]
        want = None
        if self.reuse_queue and self.can_reuse:
            want = self.reuse_queue.pop(0)
            self.stats.reuse_attempts += 1
            # Racy by nature (any fork on the host between the write and ours takes the PID),
            # so the result is verified below.
            with open(NS_LAST_PID, "w") as f:
                f.write(str(want - 1))
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, env=env)
        try:
            st = start_time(p.pid)
        except (OSError, ValueError, IndexError):
            st = -1
        child = Child(p, st, name, version, now, now + lifetime if killed else None, want)
        if want is not None:
            if p.pid == want:
                self.stats.reuses += 1
            else:
                child.reused_from = None
        self.live[p.pid] = child
        self.history.setdefault(p.pid, []).append(child)
        self.stats.started += 1
        self.stats.max_children = max(self.stats.max_children, len(self.live))
        return child

    def _ended(self, child: Child, how: str = "") -> None:
        child.ended, child.how = time.monotonic(), how or f"rc={child.popen.returncode}"
        self.live.pop(child.pid, None)
        if child.seen:
            self.stats.seen_in_metrics += 1
            if self.rng.random() < self.reuse_fraction * 2:  # about half the seen ones are candidates
                self.reuse_queue.append(child.pid)
        elif time.monotonic() > self.scan_deadline(child):
            self.stats.missed += 1
            self.stats.note(f"pid {child.pid} ({child.workload}, Python {child.python}) lived "
                            f"{time.monotonic() - child.spawned:.1f}s and never appeared")

    @staticmethod
    def scan_deadline(child: Child) -> float:
        """When a scan (1 s) plus a tick (1 s) should surely have published it, with slack."""
        return child.spawned + 2.5

    def reap(self) -> int:
        n = 0
        for child in list(self.live.values()):
            rc = child.popen.poll()
            if rc is None:
                continue
            n += 1
            if child.kill_at is None:
                self.stats.exited_by_themselves += 1
                if rc != 0:
                    self.stats.exited_nonzero += 1
                    self.stats.note(f"pid {child.pid} ({child.workload}, Python {child.python}) exited {rc}")
            self._ended(child)
        return n

    def _kill(self, child) -> None:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.popen.wait()
        self.stats.killed += 1
        if child.seen_ok:
            self.stats.killed_mid_sample += 1

    def kill_due(self, now: float) -> int:
        n = 0
        for child in list(self.live.values()):
            if child.kill_at is None or child.kill_at > now:
                continue
            self._kill(child)
            if child.seen:
                self.stats.killed_tracked += 1
            self._ended(child, "killed")
            n += 1
        return n

    def kill_all(self) -> None:
        for child in list(self.live.values()):
            self._kill(child)
            child.ended, child.how = time.monotonic(), "killed (quiesce)"
            self.live.pop(child.pid, None)
            if child.seen:
                self.stats.seen_in_metrics += 1

    # -- scraping and checks ---------------------------------------------------
    def scrape(self, after_reap: bool = False) -> set[int] | None:
        e = self.exporter
        live_before = dict(self.live)  # every child reaped so far is dead
        try:
            status, text = e.get("/metrics", timeout=15)
        except OSError as exc:
            self.stats.scrape_failures += 1
            self.stats.note(f"scrape failed: {exc}")
            return None
        if status != 200:
            self.stats.scrape_failures += 1
            self.stats.note(f"scrape status {status}")
            return None
        self.stats.scrapes += 1
        if after_reap:
            self.stats.scrapes_after_reap += 1
        shown: set[int] = set()
        ok: set[int] = set()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "pygil_exporter_errors_total":
                    reason = s.labels.get("reason", "")
                    prev = self.errors_last.get(reason, 0.0)
                    if s.value < prev:
                        self.stats.counter_decreases += 1
                        self.stats.note(f"errors_total{{reason={reason}}} went {prev} -> {s.value}")
                    self.errors_last[reason] = s.value
                    continue
                if s.labels.get("target") != TARGET or "pid" not in s.labels:
                    continue
                pid = int(s.labels["pid"])
                shown.add(pid)
                child = live_before.get(pid)
                if child is None:
                    self.stats.dead_series += 1
                    if pid not in self.diagnosed:
                        self.diagnosed.add(pid)
                        self.stats.note(f"{s.name} for pid {pid}, which was dead before the scrape: "
                                        + self.diagnose(pid))
                    continue
                if s.name == "pygil_target_info" and s.labels.get("gil_probe") == "ok":
                    ok.add(pid)
                if s.name.endswith("_total"):
                    labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("pid", "target")))
                    key = (pid, child.start, s.name, labels)
                    prev = self.last.get(key)
                    if prev is not None and s.value < prev:
                        self.stats.counter_decreases += 1
                        self.stats.note(f"{s.name}{dict(labels)} pid {pid} ({child.workload}) "
                                        f"went {prev} -> {s.value}")
                    self.last[key] = s.value
        for pid, child in live_before.items():
            child.seen_ok = pid in ok
            if pid in shown and not child.seen:
                child.seen = True
                starts = self.seen_pids.setdefault(pid, set())
                starts.add(child.start)
                if len(starts) == 2:
                    self.stats.reuses_seen_both += 1
            if pid in ok and not child.ever_ok:
                child.ever_ok = True
                self.stats.seen_probe_ok += 1
        self.stats.max_concurrent = max(self.stats.max_concurrent, len(shown))
        pid = e.proc.pid
        try:
            self.stats.fd_max = max(self.stats.fd_max, fd_count(pid))
            self.stats.rss_max_kib = max(self.stats.rss_max_kib, rss_kib(pid))
        except OSError:
            pass
        # forget counters of processes that are gone, so memory stays flat over long soaks
        if len(self.last) > 20000:
            alive = {(p, c.start) for p, c in self.live.items()}
            self.last = {k: v for k, v in self.last.items() if (k[0], k[1]) in alive}
        return shown

    def diagnose(self, pid: int) -> str:
        now = time.monotonic()
        parts = []
        for c in self.history.get(pid, []):
            parts.append(f"child {c.workload}/{c.python} start={c.start} spawned {now - c.spawned:.2f}s ago, "
                         f"ended {now - c.ended:.2f}s ago ({c.how})" if c.ended else "alive")
        try:
            with open(f"/proc/{pid}/status") as f:
                st = {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
            parts.append(f"now /proc/{pid}: Name={st.get('Name')} Tgid={st.get('Tgid')} State={st.get('State')} "
                         f"PPid={st.get('PPid')} start={start_time(pid)}")
        except OSError as exc:
            parts.append(f"now /proc/{pid}: {exc.strerror}")
        lines = [line for line in self.exporter.log_text().splitlines() if f"pid={pid} " in line]
        parts.append("log: " + " | ".join(lines[-6:]))
        return "; ".join(parts)

    def quiesce(self) -> tuple[int, int]:
        """Kill every child, wait for two scans, check nothing is left; (fds, RSS KiB)."""
        self.kill_all()
        time.sleep(2.5)
        shown = self.scrape()
        if shown:
            self.stats.leftover_after_quiesce += len(shown)
            self.stats.note(f"after quiesce, series for pids {sorted(shown)}")
        pid = self.exporter.proc.pid
        links = steady_fds(pid)
        self.fd_sets.append(links)
        return len(links), rss_kib(pid)

    def churn(self, until: float, count: int) -> None:
        """Spawn `count` children evenly (with jitter) until `until`; kill, reap and scrape meanwhile."""
        begin = time.monotonic()
        span = max(0.1, until - begin - 1.0)  # the last child still gets a short life
        times = sorted(begin + span * (i + self.rng.uniform(0.0, 0.9)) / max(1, count) for i in range(count))
        nxt = 0
        last_scrape = 0.0
        last_report = begin
        while True:
            now = time.monotonic()
            if nxt >= count and (now >= until or not self.live):
                break
            if now >= until + 5.0:  # never overrun by much
                break
            ended = self.reap() + self.kill_due(now)
            while nxt < count and times[nxt] <= now:
                self.spawn(now)
                nxt += 1
            if ended or now - last_scrape >= self.scrape_every:
                self.scrape(after_reap=bool(ended))
                last_scrape = time.monotonic()
                if self.exporter.proc.poll() is not None:
                    self.stats.exporter_alive = False
                    self.stats.note(f"exporter exited {self.exporter.proc.returncode}")
                    return
            if now - last_report >= 30:
                last_report = now
                s = self.stats
                self.log(f"  t={now - self._t0:.0f}s started={s.started} live={len(self.live)} "
                         f"scrapes={s.scrapes} violations={s.violations} "
                         f"fd={s.fd_max} rss_max={s.rss_max_kib} KiB")
            time.sleep(0.05)
        # let the stragglers of this phase end by their scheduled kill or lifetime
        deadline = time.monotonic() + 4.0
        while self.live and time.monotonic() < deadline:
            ended = self.reap() + self.kill_due(time.monotonic())
            if ended:
                self.scrape(after_reap=True)
            time.sleep(0.05)

    def run(self) -> Stats:
        e = self.start_exporter()
        self._t0 = time.monotonic()
        try:
            e.wait_for(lambda: e.get("/metrics")[0] == 200, timeout=30)
            warm_seconds = min(30.0, max(6.0, 0.1 * self.seconds))
            warm_count = max(1, round(self.processes * warm_seconds / self.seconds))
            self.log(f"warm-up: {warm_count} processes over {warm_seconds:.0f}s")
            self.churn(time.monotonic() + warm_seconds, warm_count)
            self.stats.fd_warm, self.stats.rss_warm_kib = self.quiesce()
            rest = self.processes - warm_count
            self.log(f"soak: {rest} processes over {self.seconds - warm_seconds:.0f}s "
                     f"(fd {self.stats.fd_warm}, RSS {self.stats.rss_warm_kib} KiB after warm-up)")
            self.churn(time.monotonic() + self.seconds - warm_seconds, rest)
            if self.exporter.proc.poll() is None:
                self.stats.fd_end, self.stats.rss_end_kib = self.quiesce()
                if self.fd_sets[0] != self.fd_sets[-1]:
                    self.stats.note(f"exporter fds after warm-up {self.fd_sets[0]}, at the end {self.fd_sets[-1]}")
        finally:
            self.kill_all()
            self.stats.exporter_alive = self.stats.exporter_alive and e.proc.poll() is None
            errors = dict(self.errors_last)
            self.stats.errors = {k: v for k, v in errors.items() if v}
            text = e.log_text()
            self.stats.log_errors = sum(1 for line in text.splitlines() if "level=error" in line)
            self.stats.log_warnings = sum(1 for line in text.splitlines() if "level=warn" in line)
            self.stats.tracebacks = text.count("Traceback (most recent call last)")
            self.log_tail = "\n".join(line for line in text.splitlines()
                                      if "level=error" in line or "level=warn" in line
                                      or "Traceback" in line or "Error" in line)[-4000:]
            self.log_file = None
            e.close()
            self._tmp.cleanup()
        return self.stats


def pct(a: int, b: int) -> str:
    return f"{(b - a) / a * 100:+.1f} %" if a else "n/a"


def table(s: Stats) -> str:
    err = ", ".join(f"{k}={int(v)}" for k, v in sorted(s.errors.items())) or "0"
    rows = [
        ("duration (s)", f"{s.seconds:.0f}"),
        ("processes started", s.started),
        ("  ended by themselves (interpreter exit)", s.exited_by_themselves),
        ("  killed (SIGKILL at a random moment)", s.killed),
        ("  killed mid-sample (GIL probe ok at the last scrape)", s.killed_mid_sample),
        ("  shown in /metrics at least once (with gil_probe=ok)", f"{s.seen_in_metrics} ({s.seen_probe_ok})"),
        ("  never shown though alive > 2.5 s", s.missed),
        ("PID reuses attempted / achieved (same PID verified)", f"{s.reuse_attempts} / {s.reuses}"),
        ("  reused PIDs with both incarnations in /metrics", s.reuses_seen_both),
        ("scrapes (right after a reap)", f"{s.scrapes} ({s.scrapes_after_reap})"),
        ("scrape failures", s.scrape_failures),
        ("max concurrent targets in /metrics", s.max_concurrent),
        ("open fds after warm-up / end (max)", f"{s.fd_warm} / {s.fd_end} ({s.fd_max}); "
                                                  f"{pct(s.fd_warm, s.fd_end)}"),
        ("RSS MiB after warm-up / end (max)", f"{s.rss_warm_kib / 1024:.1f} / {s.rss_end_kib / 1024:.1f} "
                                              f"({s.rss_max_kib / 1024:.1f}); {pct(s.rss_warm_kib, s.rss_end_kib)}"),
        ("exporter alive at the end (crashes)", "yes (0)" if s.exporter_alive else "NO (1)"),
        ("pygil_exporter_errors_total", err),
        ("log lines level=error / warn", f"{s.log_errors} / {s.log_warnings}"),
        ("tracebacks in the log (debug level)", s.tracebacks),
        ("violations: series of dead processes", s.dead_series),
        ("violations: counter decreases per (pid, start)", s.counter_decreases),
        ("violations: series left after all processes ended", s.leftover_after_quiesce),
    ]
    out = ["| figure | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--processes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--output", default="", help="append the results section to this Markdown file")
    args = p.parse_args(argv)
    soak = Soak(args.seconds, args.processes, seed=args.seed, log=lambda m: print(m, flush=True))
    print(f"soak {args.seconds:.0f}s, {args.processes} processes, tag {soak.tag}, "
          f"pythons {soak.stats.pythons}, ns_last_pid writable: {soak.can_reuse}", flush=True)
    s = soak.run()
    command = ".venv/bin/python bench/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = table(s)
    print(md)
    if s.examples:
        print("\nnotes:\n" + "\n".join("- " + x for x in s.examples))
    if soak.log_tail:
        print("\nlog (errors, warnings):\n" + soak.log_tail)
    host = f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end"
    section = (f"## Churn soak ({s.seconds:.0f} s, {s.started} processes)\n\n"
               f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {host}; "
               f"Pythons {s.pythons})\n\n{md}\n")
    if s.examples:
        section += "\nNotes:\n\n" + "\n".join("- " + x for x in s.examples) + "\n"
    if args.output:
        out = Path(args.output)
        old = out.read_text() if out.exists() else "# Churn soak results\n"
        out.write_text(old.rstrip("\n") + "\n\n" + section)
    return 0 if s.violations == 0 and s.exporter_alive and not s.tracebacks else 1


if __name__ == "__main__":
    raise SystemExit(main())
