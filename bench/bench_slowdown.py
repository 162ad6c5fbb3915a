#!/usr/bin/env python3
"""How much the exporter slows down the process it samples, measured so that 0.5 % shows.

The target does fixed units of pure-Python work in T threads (3: its GIL is contended, so
the exporter samples it at the full rate, the worst case); each thread clocks the CPU time of
each unit it does (time.thread_time_ns), and the target reports, when asked, the units done and
the CPU time they took. The real daemon samples it at the default rate. The measure is CPU time
per unit of work, not wall time: what the other work on this 2-core machine takes from the
target shows up in wall time, not in CPU per unit; and it is the work's own CPU, not the
process's, which also counts the waiting threads' wake-ups (they vary with the GIL's rhythm
from one second to the next, by about 10 %).

Rounds of three phases, in a random order per round: "on" (the exporter runs), "off" (the
exporter is stopped with SIGSTOP: nothing of it runs) and "off again" (stopped too: the A/A
control, which shows what the method itself can resolve). Per round, the slowdown is
ln(cpu_per_unit(on) / cpu_per_unit(off)) and the control ln(cpu_per_unit(off again) /
cpu_per_unit(off)); the table gives their means (mean +- 1.96 standard errors over the rounds)
and medians, turned back into relative changes.

Phases are short (50 ms) and many. On this VM the CPU time of a fixed unit of work moves by
8-10 % between two adjacent windows whether they last 50 ms or 1 s (the host's other tenants),
so the confidence interval shrinks with the number of rounds, not with their length: 10 minutes
of 50 ms phases resolve about +-0.2 %, of 1 s phases about +-1 %.

    .venv/bin/python bench/bench_slowdown.py --minutes 10
"""
from __future__ import annotations

import argparse
import math
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_peers import _die_with_parent, exporter_command, free_port, loadavg, pyenv_python  # noqa: E402

TAG = "bench-slowdown-target"
TARGET = """
import sys, threading, time
n = int(sys.argv[1])
units, cpu = [0] * n, [0] * n
def work(i):
    x = 0
    clock = time.thread_time_ns
    while True:
        t0 = clock()
        for k in range(20000):
            x += k
        cpu[i] += clock() - t0
        units[i] += 1
for i in range(n):
    threading.Thread(target=work, args=(i,), daemon=True).start()
print("ready", flush=True)
for _ in sys.stdin:
    print(sum(units), sum(cpu), flush=True)
"""


class Target:
    def __init__(self, python: str, threads: int):
        self.proc = subprocess.Popen([python, "-c", TARGET, str(threads), TAG], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        assert self.proc.stdout.readline().strip() == "ready"

    def mark(self) -> tuple[int, int]:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        units, cpu = self.proc.stdout.readline().split()
        return int(units), int(cpu)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def ci95(xs: list[float]) -> tuple[float, float, float]:
    """Mean of the log ratios with its 95 % interval, as relative changes (lo, mean, hi).

    Logs, not the ratios themselves: with 8-10 % noise on the denominator, the mean of
    a / b - 1 is biased upwards by about the noise's variance (+0.8 % here, as the A/A
    control showed), while the mean of ln(a / b) is not."""
    mean = statistics.fmean(xs)
    half = 1.96 * statistics.stdev(xs) / len(xs) ** 0.5
    return math.expm1(mean - half), math.expm1(mean), math.expm1(mean + half)


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to alternate")
    ap.add_argument("--phase", type=float, default=0.05, help="seconds per phase")
    ap.add_argument("--threads", type=int, default=3, help="threads of the target")
    ap.add_argument("--python", default="3.12")
    args = ap.parse_args(argv)
    python = pyenv_python(args.python)
    rng = random.Random(1)
    target = Target(python, args.threads)
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "slowdown.yaml"
        cfg.write_text(f"targets:\n  - name: target\n    match:\n      cmdline: '{TAG}$'\n")
        log = open(Path(d) / "exporter.log", "w")
        exporter = subprocess.Popen(exporter_command() + ["--config", str(cfg), "--web.listen-address",
                                                          f"127.0.0.1:{port}"],
                                    stdout=log, stderr=log, preexec_fn=_die_with_parent)
        stopped = False
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.5)
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                        body = r.read().decode()
                except OSError:
                    continue
                if re.search(r'pygil_target_info\{[^}]*gil_probe="ok"', body):
                    break
            else:
                sys.exit("bench_slowdown: the exporter never read the target's GIL")
            time.sleep(3)
            load0 = loadavg()
            on, control = [], []
            ran, since = 0.0, time.monotonic()   # seconds the exporter ran (not stopped)
            samples0 = _sampled_seconds(port)
            end = time.monotonic() + 60 * args.minutes
            while time.monotonic() < end:
                phases = ["on", "off", "off again"]
                rng.shuffle(phases)
                per_unit = {}
                for phase in phases:
                    want_stopped = phase != "on"
                    if want_stopped != stopped:
                        exporter.send_signal(signal.SIGSTOP if want_stopped else signal.SIGCONT)
                        if want_stopped:
                            ran += time.monotonic() - since
                        else:
                            since = time.monotonic()
                        stopped = want_stopped
                    u0, c0 = target.mark()
                    time.sleep(args.phase)
                    u1, c1 = target.mark()
                    per_unit[phase] = (c1 - c0) / (u1 - u0)
                on.append(math.log(per_unit["on"] / per_unit["off"]))
                control.append(math.log(per_unit["off again"] / per_unit["off"]))
            if stopped:
                exporter.send_signal(signal.SIGCONT)
                stopped = False
                since = time.monotonic()
            samples1 = _sampled_seconds(port)
            ran += time.monotonic() - since
            load1 = loadavg()
        finally:
            if stopped:
                exporter.send_signal(signal.SIGCONT)
            exporter.terminate()
            exporter.wait()
            log.close()
            target.stop()
    covered = (samples1 - samples0) / ran if samples1 is not None and samples0 is not None else float("nan")
    print(f"\n{len(on)} rounds of 3 phases x {args.phase:g} s ({args.minutes:g} min), target: {args.threads} "
          f"pure-Python threads "
          f"(CPython {args.python}); the exporter's sampled clock advanced {100 * covered:.0f} % of the time it "
          f"ran (it credits up to 45 ms of each stop); load average {load0} at start, {load1} at the end\n")
    print("| comparison | rounds | CPU per unit of work: change (geometric mean) | 95 % interval | median |")
    print("|---|---|---|---|---|")
    for name, xs in (("exporter on vs stopped", on), ("A/A control: stopped vs stopped", control)):
        lo, mean, hi = ci95(xs)
        print(f"| {name} | {len(xs)} | {100 * mean:+.2f} % | {100 * lo:+.2f} % to {100 * hi:+.2f} % | "
              f"{100 * math.expm1(statistics.median(xs)):+.2f} % |")
    return 0


def _sampled_seconds(port: int) -> float | None:
    """The target's pygil_gil_sampled_seconds_total: it grows only while the sampler runs (of
    a stopped exporter's gap at most 3 jittered periods, 45 ms, are credited), so over the run
    it shows that the "on" time was really sampled."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^pygil_gil_sampled_seconds_total\{[^}]*\} (\S+)", body, re.M)
    return float(m.group(1)) if m else None


if __name__ == "__main__":
    raise SystemExit(main())
