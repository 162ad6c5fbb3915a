#!/usr/bin/env python3
"""Benchmark the GIL sampler: its CPU cost, py-spy side by side, target slowdown, accuracy.

Sections (all on real processes, read from outside like the exporter):

  cost      sampler CPU per target-sample with 1, 10 and 50 targets at 100 Hz
            (the sampler runs in a child process; CPU = its sampler thread's
            /proc/self/task/TID/schedstat run time, and the whole child's rusage)
  pyspy     the same 3-thread CPU target sampled at 100 Hz by our sampler and by
            `py-spy record --nonblocking --gil -r 100` at the same time: CPU ratio
  slowdown  throughput of a 3-thread CPU target (loop chunks per second) with
            nothing attached, with our sampler at 100 Hz, and with gilknocker
            in-process at 1 ms polling; interleaved rounds, medians
  accuracy  workload x version: our contended fraction (time-weighted, target
            without gilknocker), gilknocker's contention_metric (in-process, 1 ms),
            and our fraction while gilknocker runs (its own observer effect)

Needs: py-spy on PATH or --pyspy; gilknocker installed in per-version venvs given
by --gk-venv-pattern (default /tmp/gk{v}, e.g. /tmp/gk3.11/bin/python).

    python bench/bench_sampler.py --seconds 5 --rounds 5 --json bench/results/sampler.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from workloads import _PRELUDE, SCRIPTS, pyenv_pythons  # noqa: E402

# Bench-only additions on top of the shared workloads: a CPU workload that counts its
# work (for throughput), a stdin command loop instead of forever(), optional gilknocker.
_BENCH_HOOKS = """
import json as _json
_COUNTS = [0] * 64
_knocker = None
def _start_knocker(us):
    global _knocker
    from gilknocker import KnockKnock
    _knocker = KnockKnock(polling_interval_micros=us)
    _knocker.start()
if os.environ.get("BENCH_GILKNOCKER"):
    _start_knocker(int(os.environ["BENCH_GILKNOCKER"]))
def forever():
    global _knocker
    for _line in sys.stdin:
        _cmd = _line.strip()
        if _cmd == "kon" and _knocker is None:
            _start_knocker(1000)
        elif _cmd == "koff" and _knocker is not None:
            _knocker.stop()
            _knocker = None
        _out = {"count": sum(_COUNTS), "t": time.monotonic(), "cpu": time.process_time()}
        if _knocker is not None:
            _out["gilknocker"] = _knocker.contention_metric
            if _cmd == "reset":
                _knocker.reset_contention_metric()
        sys.stdout.write(_json.dumps(_out) + "\\n"); sys.stdout.flush()
    while True:
        time.sleep(3600)
"""
BENCH_SCRIPTS = dict(SCRIPTS)
BENCH_SCRIPTS["cpucount"] = """
import itertools
_ids = itertools.count()
def work():
    me = next(_ids)
    x = 0
    while True:
        for i in range(10000):
            x += i * i
        _COUNTS[me] += 1
start(work); ready(); forever()
"""


class Target:
    def __init__(self, name: str, python: str, threads: int = 3, gilknocker_us: int = 0) -> None:
        code = _PRELUDE + _BENCH_HOOKS + textwrap.dedent(BENCH_SCRIPTS[name])
        env = dict(os.environ, WORKLOAD_THREADS=str(threads))
        env.pop("PYTHONPATH", None)
        env.pop("BENCH_GILKNOCKER", None)
        if gilknocker_us:
            env["BENCH_GILKNOCKER"] = str(gilknocker_us)
        self.name = name
        self.proc = subprocess.Popen([python, "-u", "-c", code, "gil-bench", name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"bench target {name} under {python} did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def query(self, cmd: str = "r") -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass


# ----------------------------------------------------------------- sampler child
_CHILD = """
import json, os, resource, sys, threading, time
sys.path.insert(0, {root!r})
from exporter.gil import locate
from exporter.sampler import GilSampler
pids = [int(p) for p in sys.argv[1].split(",")]
seconds, rate = float(sys.argv[2]), float(sys.argv[3])
locs = [locate(p) for p in pids]
s = GilSampler(rate_hz=rate)
s.start()
for p, l in zip(pids, locs):
    s.add(p, l)
time.sleep(0.5)                                   # warm-up
def tcpu():
    with open(f"/proc/self/task/{{s.native_id}}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9
def totals():
    return [s.totals(p) for p in pids]
def rus():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
sys.stdout.write("go\\n"); sys.stdout.flush()
c0, r0, t0, s0 = tcpu(), rus(), time.monotonic(), sum(t.samples for t in totals())
time.sleep(seconds)
c1, r1, t1, tt = tcpu(), rus(), time.monotonic(), totals()
s1 = sum(t.samples for t in tt)
out = {{"thread_cpu": c1 - c0, "process_cpu": r1 - r0, "wall": t1 - t0, "samples": s1 - s0,
        "targets": len(pids), "failures": [s.failure(p) for p in pids if s.failure(p)],
        "totals": [t.__dict__ for t in tt]}}
s.stop()
sys.stdout.write(json.dumps(out) + "\\n")
"""


_TOGGLE_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from exporter.gil import locate
from exporter.sampler import GilSampler
pid = int(sys.argv[1])
rate = float(sys.argv[2])
loc = locate(pid)
s = None
sys.stdout.write("go\\n"); sys.stdout.flush()
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "on" and s is None:
        s = GilSampler(rate_hz=rate)
        s.start()
        s.add(pid, loc)
    elif cmd == "off" and s is not None:
        s.close()
        s = None
    sys.stdout.write("ok\\n"); sys.stdout.flush()
"""


def start_sampler_child(pids, seconds: float, rate: float = 100.0) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(ROOT)),
                          ",".join(map(str, pids)), str(seconds), str(rate)],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if line.strip() != "go":
        p.kill()
        raise RuntimeError(f"sampler child failed: {line!r}")
    return p


def finish_sampler_child(p: subprocess.Popen) -> dict:
    out = p.stdout.readline()
    p.wait()
    p.stdout.close()
    return json.loads(out)


def run_sampler(pids, seconds: float, rate: float = 100.0) -> dict:
    return finish_sampler_child(start_sampler_child(pids, seconds, rate))


# ----------------------------------------------------------------- sections
def section_cost(python: str, seconds: float, counts=(1, 10, 50)) -> list:
    """CPU per target-sample. Target 0 is a 3-thread CPU workload, the rest sleep loops."""
    rows = []
    targets = [Target("cpucount", python)]
    try:
        targets += [Target("sleep", python, threads=1) for _ in range(max(counts) - 1)]
        for n in counts:
            r = run_sampler([t.pid for t in targets[:n]], seconds)
            rows.append({
                "targets": n, "samples": r["samples"], "wall": r["wall"],
                "rate_per_target": r["samples"] / r["wall"] / n,
                "us_per_sample_thread": r["thread_cpu"] / r["samples"] * 1e6,
                "us_per_sample_process": r["process_cpu"] / r["samples"] * 1e6,
                "cpu_percent": r["process_cpu"] / r["wall"] * 100, "failures": r["failures"]})
            print(f"cost: {rows[-1]}", flush=True)
    finally:
        for t in targets:
            t.stop()
    # Marginal cost of one more target: slope between the smallest and largest counts.
    a, b = rows[0], rows[-1]
    per_sec_a = a["us_per_sample_thread"] * a["samples"] / a["wall"]
    per_sec_b = b["us_per_sample_thread"] * b["samples"] / b["wall"]
    extra = (b["samples"] / b["wall"] - a["samples"] / a["wall"])
    for r in rows:
        r["marginal_us_per_sample"] = (per_sec_b - per_sec_a) / extra if extra > 0 else None
    return rows


def section_hotloop(python: str, seconds: float, n: int = 50) -> dict:
    """The hot path alone: the sampler run as a busy loop (no sleeping, warm caches)."""
    targets = [Target("cpucount", python)]
    try:
        targets += [Target("sleep", python, threads=1) for _ in range(n - 1)]
        r = run_sampler([t.pid for t in targets], seconds, rate=1e6)
    finally:
        for t in targets:
            t.stop()
    row = {"targets": n, "samples": r["samples"], "us_per_sample_thread": r["thread_cpu"] / r["samples"] * 1e6}
    print(f"hotloop: {row}", flush=True)
    return row


def section_floor(seconds: float) -> dict:
    """CPU of a bare Python thread that only does time.sleep(0.01): the wake-up floor of
    any 100 Hz sampler written in Python on this machine."""
    import threading
    out = {}

    def loop():
        n = int(seconds * 100)
        c0 = time.thread_time()
        for _ in range(n):
            time.sleep(0.01)
        out["us_per_wakeup"] = (time.thread_time() - c0) / n * 1e6

    th = threading.Thread(target=loop)
    th.start()
    th.join()
    print(f"floor: {out}", flush=True)
    return out


def _parse_pyspy_samples(text: str) -> int:
    m = re.search(r"Samples:\s*(\d+)", text)
    return int(m.group(1)) if m else 0


def section_pyspy(python: str, pyspy: str, seconds: float, rounds: int) -> list:
    rows = []
    for _ in range(rounds):
        t = Target("cpucount", python)
        try:
            ours = start_sampler_child([t.pid], seconds)
            spy = subprocess.Popen([pyspy, "record", "--nonblocking", "--gil", "-r", "100",
                                    "-d", str(int(seconds)), "-p", str(t.pid), "-o", "/dev/null"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out = spy.stdout.read()
            _, status, ru = os.wait4(spy.pid, 0)
            spy.returncode = os.waitstatus_to_exitcode(status)
            spy.stdout.close()
            r = finish_sampler_child(ours)
        finally:
            t.stop()
        spy_cpu = ru.ru_utime + ru.ru_stime
        spy_samples = _parse_pyspy_samples(out) or int(100 * seconds)
        row = {"ours_cpu": r["thread_cpu"], "ours_process_cpu": r["process_cpu"],
               "ours_samples": r["samples"], "ours_wall": r["wall"],
               "pyspy_cpu": spy_cpu, "pyspy_samples": spy_samples, "pyspy_wall": int(seconds),
               "pyspy_rc": spy.returncode}
        row["ours_us_per_sample"] = r["thread_cpu"] / r["samples"] * 1e6
        row["pyspy_us_per_sample"] = spy_cpu / spy_samples * 1e6
        # CPU per second of monitoring at the same nominal 100 Hz
        row["ratio_cpu_per_second"] = (r["process_cpu"] / r["wall"]) / (spy_cpu / seconds)
        row["ratio_per_sample"] = row["ours_us_per_sample"] / row["pyspy_us_per_sample"]
        rows.append(row)
        print(f"pyspy: {row}", flush=True)
    return rows


def section_slowdown(gk_python: str, seconds: float, rounds: int, interval: float = 1.0,
                     threads: int = 1) -> dict:
    """Slowdown of ONE CPU target, observer switched on and off in alternation.

    Adjacent 1 s intervals with the observer on and off are paired (order random within
    each pair), which cancels the slow drift of a shared box. Observers: our sampler at
    100 Hz (in a child process, started/stopped by command) and gilknocker at 1 ms polling
    (started/stopped inside the target). Per pair: throughput ratio on/off (chunks per
    wall second) and efficiency ratio (chunks per target CPU second). Reported: mean
    ratio with a 95% interval (1.96 standard errors), and the median.
    """
    pairs = max(4, int(rounds * seconds / (2 * interval)))
    out = {}
    for mode in ("ours_100hz", "ours_10khz", "gilknocker_1ms"):
        t = Target("cpucount", gk_python, threads=threads)
        child = None
        ours = mode.startswith("ours")
        try:
            if ours:
                rate = "100" if mode == "ours_100hz" else "10000"
                child = subprocess.Popen([sys.executable, "-c", _TOGGLE_CHILD.format(root=str(ROOT)),
                                          str(t.pid), rate], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)
                assert child.stdout.readline().strip() == "go"

            def set_on(on: bool) -> None:
                if ours:
                    child.stdin.write("on\n" if on else "off\n")
                    child.stdin.flush()
                    child.stdout.readline()
                else:
                    t.query("kon" if on else "koff")

            time.sleep(1.0)
            wall, eff = [], []
            for _ in range(pairs):
                res = {}
                order = [True, False]
                random.shuffle(order)
                for on in order:
                    set_on(on)
                    time.sleep(0.1)
                    a = t.query()
                    time.sleep(interval)
                    b = t.query()
                    res[on] = ((b["count"] - a["count"]) / (b["t"] - a["t"]),
                               (b["count"] - a["count"]) / max(b["cpu"] - a["cpu"], 1e-9))
                set_on(False)
                wall.append(res[True][0] / res[False][0])
                eff.append(res[True][1] / res[False][1])
        finally:
            if child is not None:
                child.stdin.close()
                child.wait()
                child.stdout.close()
            t.stop()
        row = {"pairs": pairs, "interval_s": interval, "threads": threads,
               "ratios_wall": wall, "ratios_eff": eff}
        for name, xs in (("wall", wall), ("eff", eff)):
            m = statistics.fmean(xs)
            se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
            row[f"slowdown_{name}_pct"] = (1 - m) * 100
            row[f"ci95_{name}_pct"] = 1.96 * se * 100
            row[f"median_slowdown_{name}_pct"] = (1 - statistics.median(xs)) * 100
        out[mode] = row
        print(f"slowdown {mode}: wall {row['slowdown_wall_pct']:+.2f}% +- {row['ci95_wall_pct']:.2f}, "
              f"per CPU-s {row['slowdown_eff_pct']:+.2f}% +- {row['ci95_eff_pct']:.2f} ({pairs} pairs)", flush=True)
    return out


def _iqr(xs) -> float:
    if len(xs) < 4:
        return max(xs) - min(xs)
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


ACCURACY_WORKLOADS = ["cpu", "json", "starved", "hashlib", "zlib", "sleep", "single"]


def section_accuracy(gk_pythons: dict, seconds: float, workloads=ACCURACY_WORKLOADS) -> list:
    rows = []
    for version, python in gk_pythons.items():
        for wl in workloads:
            row = {"version": version, "workload": wl}
            t = Target(wl, python)
            try:
                r = run_sampler([t.pid], seconds)
            finally:
                t.stop()
            tot = r["totals"][0]
            row["ours_contended"] = tot["contended_seconds"] / tot["sampled_seconds"]
            row["ours_held"] = tot["held_seconds"] / tot["sampled_seconds"]
            row["ours_waiters"] = tot["wait_seconds"] / tot["sampled_seconds"]
            t = Target(wl, python, gilknocker_us=1000)
            try:
                time.sleep(0.5)
                t.query("reset")
                r = run_sampler([t.pid], seconds)
                row["gilknocker"] = t.query()["gilknocker"]
            finally:
                t.stop()
            tot = r["totals"][0]
            row["ours_contended_with_gilknocker"] = tot["contended_seconds"] / tot["sampled_seconds"]
            rows.append(row)
            print(f"accuracy: {row}", flush=True)
    return rows


# ----------------------------------------------------------------- report
def markdown(results: dict) -> str:
    lines = []
    meta = results["meta"]
    lines.append(f"Run {meta['when']} on {meta['host']} ({meta['cpus']} CPUs, load average at start "
                 f"{meta['load_start']}, at end {meta['load_end']}); sampler under Python {meta['python']}.")
    lines.append("")
    if "cost" in results:
        lines.append("### Sampler CPU per target-sample (100 Hz, jittered)")
        lines.append("")
        lines.append("| targets | samples/s per target | µs CPU per sample (sampler thread) | µs per sample (whole process) | process CPU % | marginal µs per extra target-sample |")
        lines.append("|---|---|---|---|---|---|")
        for r in results["cost"]:
            m = r["marginal_us_per_sample"]
            lines.append(f"| {r['targets']} | {r['rate_per_target']:.1f} | {r['us_per_sample_thread']:.1f} | "
                         f"{r['us_per_sample_process']:.1f} | {r['cpu_percent']:.2f} | {m:.1f} |" if m is not None else
                         f"| {r['targets']} | {r['rate_per_target']:.1f} | {r['us_per_sample_thread']:.1f} | "
                         f"{r['us_per_sample_process']:.1f} | {r['cpu_percent']:.2f} | - |")
        lines.append("")
    if "hotloop" in results:
        h = results["hotloop"]
        lines.append(f"Hot path alone (sampler as a busy loop over {h['targets']} targets, warm caches): "
                     f"{h['us_per_sample_thread']:.2f} µs CPU per target-sample over {h['samples']} samples.")
        lines.append("")
    if "floor" in results:
        lines.append(f"Wake-up floor: a Python thread doing nothing but time.sleep(0.01) costs "
                     f"{results['floor']['us_per_wakeup']:.1f} µs CPU per wake-up here.")
        lines.append("")
    if "pyspy" in results:
        lines.append("### Same target, same time: our sampler vs `py-spy record --nonblocking --gil -r 100`")
        lines.append("")
        lines.append("| round | ours µs/sample | py-spy µs/sample | ours CPU s (process) | py-spy CPU s | CPU ratio ours/py-spy (per second at 100 Hz) |")
        lines.append("|---|---|---|---|---|---|")
        for i, r in enumerate(results["pyspy"]):
            lines.append(f"| {i} | {r['ours_us_per_sample']:.1f} | {r['pyspy_us_per_sample']:.1f} | "
                         f"{r['ours_process_cpu']:.3f} | {r['pyspy_cpu']:.3f} | {r['ratio_cpu_per_second']:.3f} |")
        med = statistics.median(r["ratio_cpu_per_second"] for r in results["pyspy"])
        lines.append(f"| median | | | | | {med:.3f} |")
        lines.append("")
    if "slowdown" in results:
        th = next(iter(results["slowdown"].values()))["threads"]
        lines.append(f"### Target slowdown: one CPU target ({th} thread(s)), observer on/off in alternating 1 s intervals")
        lines.append("")
        lines.append("| observer | pairs | slowdown of throughput (mean ± 95%) | median | slowdown of work per target CPU-s (mean ± 95%) | median |")
        lines.append("|---|---|---|---|---|---|")
        for m, r in results["slowdown"].items():
            lines.append(f"| {m} | {r['pairs']} | {r['slowdown_wall_pct']:+.2f}% ± {r['ci95_wall_pct']:.2f} | "
                         f"{r['median_slowdown_wall_pct']:+.2f}% | {r['slowdown_eff_pct']:+.2f}% ± {r['ci95_eff_pct']:.2f} | "
                         f"{r['median_slowdown_eff_pct']:+.2f}% |")
        lines.append("")
    if "accuracy" in results:
        lines.append("### Accuracy: our contended fraction vs gilknocker's contention_metric (1 ms polling)")
        lines.append("")
        lines.append("| workload | version | ours: contended | ours: held | ours: mean waiters | gilknocker | ours while gilknocker runs |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in sorted(results["accuracy"], key=lambda r: (ACCURACY_WORKLOADS.index(r["workload"]),
                                                            tuple(int(x) for x in r["version"].split(".")))):
            lines.append(f"| {r['workload']} | {r['version']} | {r['ours_contended']:.3f} | {r['ours_held']:.3f} | "
                         f"{r['ours_waiters']:.2f} | {r['gilknocker']:.3f} | {r['ours_contended_with_gilknocker']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sections", default="cost,hotloop,floor,pyspy,slowdown,accuracy")
    ap.add_argument("--python", default="3.11", help="target version for cost/pyspy/slowdown")
    ap.add_argument("--pyspy", default=shutil.which("py-spy") or "/tmp/bench-venv/bin/py-spy")
    ap.add_argument("--gk-venv-pattern", default="/tmp/gk{v}/bin/python")
    ap.add_argument("--accuracy-seconds", type=float, default=3.0)
    ap.add_argument("--slowdown-threads", type=int, default=1)
    ap.add_argument("--json", default="")
    ap.add_argument("--md", default="")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    pythons = pyenv_pythons()
    gk = {v: args.gk_venv_pattern.format(v=v) for v in pythons
          if os.path.exists(args.gk_venv_pattern.format(v=v))}
    results = {"meta": {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "host": os.uname().nodename, "cpus": os.cpu_count(),
                        "load_start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
                        "python": sys.version.split()[0], "args": vars(args),
                        "pyspy": subprocess.run([args.pyspy, "--version"], capture_output=True,
                                                text=True).stdout.strip() if os.path.exists(args.pyspy) else None}}
    target_python = pythons[args.python]
    if "cost" in sections:
        results["cost"] = section_cost(target_python, args.seconds)
    if "hotloop" in sections:
        results["hotloop"] = section_hotloop(target_python, args.seconds)
    if "floor" in sections:
        results["floor"] = section_floor(args.seconds)
    if "pyspy" in sections:
        results["pyspy"] = section_pyspy(target_python, args.pyspy, args.seconds, max(1, args.rounds // 2))
    if "slowdown" in sections:
        results["slowdown"] = section_slowdown(gk.get(args.python, target_python), args.seconds, args.rounds,
                                               threads=args.slowdown_threads)
    if "accuracy" in sections:
        results["accuracy"] = section_accuracy(gk, args.accuracy_seconds)
    results["meta"]["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    md = markdown(results)
    print(md)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
