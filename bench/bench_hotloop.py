#!/usr/bin/env python3
"""The sampler's hot loop in C (exporter/_hotloop.c) against the same loop in Python.

One GilSampler at the default rate over N targets: K contended ones (3 pure-Python threads,
sampled at the full rate) and N-K whose threads sleep (sampled at the idle rate). Rounds
alternate the two loops (the host is shared: alternating cancels slow drifts); the figure is
the sampler thread's CPU time (/proc/self/task/TID/schedstat) per second and per target-sample.

    .venv/bin/python bench/bench_hotloop.py --targets 50 --contended 5 --seconds 10 --rounds 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from workloads import start_workload  # noqa: E402

from exporter import sampler as sampler_mod  # noqa: E402
from exporter.gil import locate  # noqa: E402


def _thread_cpu(tid: int) -> float:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def measure(locations: list, native: bool, seconds: float) -> tuple[float, float]:
    """(CPU cores of the sampler thread, µs of its CPU per target-sample)."""
    s = sampler_mod.GilSampler(idle_ticks=50, native=native)
    for i, loc in enumerate(locations):
        s.add(i, loc)
    s.start()
    try:
        time.sleep(1.0)                       # the adaptive rate settles
        tid = s.native_id
        c0, r0, t0 = _thread_cpu(tid), s.reads, time.monotonic()
        time.sleep(seconds)
        c1, r1, t1 = _thread_cpu(tid), s.reads, time.monotonic()
    finally:
        s.stop()
    return (c1 - c0) / (t1 - t0), 1e6 * (c1 - c0) / max(1, r1 - r0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=int, default=50)
    ap.add_argument("--contended", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    if sampler_mod._hotloop is None:
        print("exporter._hotloop is not built: nothing to compare", file=sys.stderr)
        return 2
    workloads = [start_workload("cpu" if i < args.contended else "sleep", sys.executable)
                 for i in range(args.targets)]
    try:
        locations = [locate(w.pid) for w in workloads]
        rows: dict = {True: [], False: []}
        for r in range(args.rounds):
            for native in ((True, False) if r % 2 == 0 else (False, True)):
                rows[native].append(measure(locations, native, args.seconds))
    finally:
        for w in workloads:
            w.stop()
    print(f"\n{args.targets} targets ({args.contended} contended), {args.rounds} rounds x {args.seconds:g} s "
          f"per loop, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| loop | sampler CPU (cores, median) | µs CPU per target-sample (median) | rounds |")
    print("|---|---|---|---|")
    for native, name in ((True, "C (_hotloop)"), (False, "Python")):
        cores = statistics.median(c for c, _ in rows[native])
        per = statistics.median(u for _, u in rows[native])
        print(f"| {name} | {cores:.4f} | {per:.1f} | {len(rows[native])} |")
    ratio = statistics.median(c for c, _ in rows[False]) / statistics.median(c for c, _ in rows[True])
    print(f"\nPython loop / C loop: {ratio:.2f}x the sampler thread's CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
