#!/usr/bin/env python3
"""Benchmark `diagnose --stacks`: what it names, against py-spy and profiling.sampling, and its
CPU cost per stack sample, on every CPython 3.11+ the host has (tests/placements.py).

For each interpreter, one `hot` workload (3 threads; hot() among waiters) is read in turn by:
  ours      exporter.stacks.StackSampler at 100 Hz in this process (the code diagnose runs)
  py-spy    py-spy record --gil --nonblocking -r 100 -f raw
  stdlib    python3.15 -m profiling.sampling attach --mode gil -a -r 100 --collapsed (3.15 only,
            run by the target's interpreter inside its root)
and the top function (innermost frame, most samples) of each is printed. Then the cost:
  per stack   CPU time of the sampler thread (CLOCK_THREAD_CPUTIME_ID) spent reading one holder's
              stack (both walks of the frame chain, code objects, the GIL re-read), per contended
              sample, kept or dropped; for `hot` (5 frames) and `recursive` (4..44 frames)
  per sample  the sampler thread's whole CPU time per GIL sample (GIL reads included)
  py-spy      py-spy's own CPU time (rusage of the child) per sample it was asked for
  hot path    one sample (GIL read, stack, GIL re-read) in a tight loop on the `pinned` workload,
              whose 5-frame stack stands still: the cost with warm caches and no sleeping

    .venv/bin/python bench/bench_stacks.py --seconds 5 [--json bench/results/stacks.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import placements  # noqa: E402
import profilers  # noqa: E402

from exporter.stacks import StackSampler  # noqa: E402


def _placement(interp) -> str:
    return "host" if interp.rootfs == placements.BOOKWORM else "pivot_root"


def _ours(pid: int, seconds: float) -> dict:
    prof = StackSampler(pid, rate_hz=100).start()
    time.sleep(seconds)
    p = prof.stop()
    top = p.top_functions(1)
    depth = (sum(len(s) * n for s, n in p.stacks.items()) / p.kept) if p.kept else 0
    return {
        "top": top[0].qualname if top else "", "own": top[0].own if top else 0.0,
        "samples": p.samples, "contended": p.contended, "kept": p.kept,
        "dropped": sum(p.dropped.values()), "depth": depth,
        "us_per_stack": p.cpu_us_per_stack,
        "us_per_sample": p.sampler_cpu_seconds / p.samples * 1e6 if p.samples else None,
        "unavailable": p.unavailable,
    }


def _hot_path(pid: int, n: int = 3000) -> float:
    sampler = StackSampler(pid)
    sampler.open()
    try:
        for _ in range(100):
            sampler.sample()
        t0 = time.thread_time()
        for _ in range(n):
            sampler.sample()
        cpu = time.thread_time() - t0
    finally:
        sampler.close()
    assert sampler.kept >= n, (sampler.kept, sampler.dropped)
    return cpu / n * 1e6


def measure(interp, seconds: float) -> dict:
    row = {"interpreter": interp.name}
    w = placements.start("pinned", interp, _placement(interp), threads=2)
    try:
        time.sleep(0.5)
        row["hot_path_us"] = _hot_path(w.pid)
    finally:
        w.stop()
    w = placements.start("hot", interp, _placement(interp), threads=3)
    try:
        time.sleep(0.5)
        row["ours"] = _ours(w.pid, seconds)
        spy, cpu = profilers.leaf_counts_py_spy(w.pid, seconds)
        n = sum(spy.values())
        row["py_spy"] = {"top": spy.most_common(1)[0][0] if spy else "",
                         "own": spy.most_common(1)[0][1] / n if n else 0.0,
                         "us_per_sample": cpu / (seconds * 100) * 1e6}
        if tuple(int(x) for x in interp.version.split(".")) >= (3, 15):
            std = profilers.leaf_counts_stdlib(w, interp, seconds)
            m = sum(std.values())
            row["stdlib"] = {"top": std.most_common(1)[0][0] if std else "",
                             "own": std.most_common(1)[0][1] / m if m else 0.0}
    finally:
        w.stop()
    w = placements.start("recursive", interp, _placement(interp), threads=3)
    try:
        time.sleep(0.5)
        row["deep"] = _ours(w.pid, seconds)
    finally:
        w.stop()
    return row


def _us(x) -> str:
    return "–" if x is None else f"{x:.0f}"


def table(rows: list, seconds: float) -> str:
    out = [f"### Top function: ours vs py-spy vs profiling.sampling (`hot` workload, 3 threads, "
           f"{seconds:.0f} s each, one after another)", "",
           "| interpreter | ours (`diagnose --stacks`) | py-spy `record --gil --nonblocking` | "
           "`profiling.sampling --mode gil` | stacks kept / contended samples |",
           "|---|---|---|---|---|"]
    for r in rows:
        o, s = r["ours"], r["py_spy"]
        std = r.get("stdlib")
        stdlib = f"{std['top']} {std['own']:.0%}" if std else "n/a (3.15+)"
        out.append(f"| {r['interpreter']} | {o['top']} {o['own']:.0%} | {s['top']} {s['own']:.0%} | "
                   f"{stdlib} | {o['kept']} / {o['contended']} |")
    out += ["", "### CPU cost per stack sample (sampler thread CPU time, 100 Hz)", "",
            "| interpreter | µs per stack, `hot` (5 frames) | µs per stack, `recursive` (mean depth) | "
            "µs per GIL sample, all in (`hot`) | py-spy µs per sample (`hot`) | "
            "hot path: µs per sample, tight loop (`pinned`, 5 frames) |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        o, d, s = r["ours"], r["deep"], r["py_spy"]
        out.append(f"| {r['interpreter']} | {_us(o['us_per_stack'])} | {_us(d['us_per_stack'])} "
                   f"({d['depth']:.0f} frames; kept {d['kept']}/{d['contended']}) | {_us(o['us_per_sample'])} | "
                   f"{_us(s['us_per_sample'])} | {_us(r['hot_path_us'])} |")
    costs = [r["ours"]["us_per_stack"] for r in rows if r["ours"]["us_per_stack"]]
    if costs:
        out += ["", f"Median over interpreters: {statistics.median(costs):.0f} µs of CPU per stack "
                    f"sample (`hot`)."]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--only", action="append", default=[], help="interpreter name (repeatable)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    load0 = os.getloadavg()
    for interp in placements.interpreters():
        if tuple(int(x) for x in interp.version.split(".")) < (3, 11) or not interp.available():
            continue
        if args.only and interp.name not in args.only:
            continue
        print(f"... {interp.name}", file=sys.stderr, flush=True)
        rows.append(measure(interp, args.seconds))
    load1 = os.getloadavg()
    print(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPUs, load "
          f"average at start {' '.join(f'{x:.1f}' for x in load0)}, at end "
          f"{' '.join(f'{x:.1f}' for x in load1)}; sampler under Python {sys.version.split()[0]}.\n")
    print(table(rows, args.seconds))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
