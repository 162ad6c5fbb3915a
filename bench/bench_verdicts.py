"""Verdicts and the /proc heuristic on real servers and the synthetic workloads.

    .venv/bin/python bench/bench_verdicts.py [--cases a,b] [--repeat N] [--hogs K] [--seconds S]

For every case: start it (tests/servers.py: gunicorn gthread + Flask, uvicorn + sync FastAPI,
waitress, a ThreadPoolExecutor batch with python-dateutil; tests/workloads.py: the synthetic
loops), put it under a bounded loopback load, run the real `gil-exporter diagnose PID --json`,
and print one markdown row: the measured figures, the verdict kind and exit code, and what the
/proc-only heuristic says on the same figures with the GIL fields removed. `--hogs K` runs K
pure-Python busy loops beside it (a busy host); the `host idle` column is the idle CPU the host
had during the measurement, from /proc/stat.

The last lines sum up the /proc heuristic: false positives (a number >= 0.5 on a case whose
measured GIL contention is below 0.5), how often it said "unknown", and misses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import exporter_command  # noqa: E402
from servers import CASES, Load, start_case  # noqa: E402
from workloads import start_workload  # noqa: E402

from exporter import score  # noqa: E402

SYNTHETIC = ("cpu", "json", "starved", "hashlib", "zlib", "sleep", "single", "idle")
PROCFS_FIELDS = ("gil_enabled", "interval_seconds", "held_ratio", "waiting_threads",
                 "switches_per_second", "contended_ratio", "gil_sampled_seconds")


def _idle() -> tuple[float, float]:
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    return parts[3] + parts[4], sum(parts[:8])


def diagnose(pid: int, seconds: float) -> tuple[int, dict | None, str]:
    r = subprocess.run(exporter_command() + ["diagnose", str(pid), "--seconds", str(seconds),
                                             "--json"], capture_output=True, text=True, timeout=120)
    try:
        return r.returncode, json.loads(r.stdout), r.stderr.strip()
    except json.JSONDecodeError:
        return r.returncode, None, (r.stderr or r.stdout).strip()


def figures_of(out: dict) -> score.Figures:
    names = {f.name for f in dataclasses.fields(score.Figures)}
    return score.Figures(**{k: v for k, v in out["figures"].items() if k in names})


def procfs_only(f: score.Figures) -> score.Figures:
    return dataclasses.replace(f, **{k: None for k in PROCFS_FIELDS})


def measure(case: str, seconds: float, warmup: float) -> dict:
    if case in CASES:
        ctx = start_case(case)
    else:
        ctx = start_workload(case, threads=3)
    with ctx as c:
        url, route = (c.url, c.route) if case in CASES else (None, "")
        with Load(url, route, max_seconds=warmup + seconds + 30) as load:
            time.sleep(warmup)
            i0, t0 = _idle()
            code, out, err = diagnose(c.pid, seconds)
            i1, t1 = _idle()
    idle_cpus = (i1 - i0) / (t1 - t0) * (os.cpu_count() or 1) if t1 > t0 else 0.0
    return dict(case=case, code=code, out=out, err=err, idle=idle_cpus, requests=load.done,
                errors=load.errors)


def _f(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


COLS = ["case", "truth", "host idle", "threads", "cores", "vol/s", "invol/s", "run delay",
        "busy threads", "top share", "held", "waiters", "handoffs x iv", "score (gil)", "kind",
        "exit", "procfs", "procfs kind", "req/s"]


def row(m: dict, seconds: float) -> tuple[list, dict]:
    out = m["out"]
    expected = CASES[m["case"]][2] if m["case"] in CASES else m["case"] in ("cpu", "json", "starved")
    if out is None:
        return [m["case"], "", _f(m["idle"]), *["-"] * 13, str(m["code"]), "-", "-", "-"], {}
    f = figures_of(out)
    p = procfs_only(f)
    ps, _ = score.score(p)
    pk = score.verdict(p).kind
    iv = f.interval_seconds or score.DEFAULT_INTERVAL
    truth = f.contended_ratio
    cells = [m["case"], ("contended" if expected else "not"), _f(m["idle"]), f.threads,
             _f(f.cpu_cores), _f(f.voluntary_per_second, ".0f"), _f(f.involuntary_per_second, ".0f"),
             _f(f.run_delay_cores), _f(f.busy_threads, ".1f"), _f(f.top_thread_share),
             _f(f.held_ratio), _f(f.waiting_threads),
             _f(None if f.switches_per_second is None else f.switches_per_second * iv),
             _f(out["figures"]["score"]), out["verdict"]["kind"], m["code"],
             "unknown" if ps is None else f"{ps:.2f}", pk,
             f"{m['requests'] / (seconds + 2):.0f}" if m["requests"] else "-"]
    return cells, dict(truth=truth, procfs=ps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default=",".join(list(CASES) + list(SYNTHETIC)))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--hogs", type=int, default=0, help="pure-Python busy loops beside each case")
    args = ap.parse_args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.hogs)]
    print("| " + " | ".join(COLS) + " |")
    print("|" + "---|" * len(COLS), flush=True)
    fp = unknown_io = io_cases = miss = unknown_cont = cont_cases = 0
    try:
        for _ in range(args.repeat):
            for case in args.cases.split(","):
                cells, s = row(measure(case, args.seconds, args.warmup), args.seconds)
                print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
                if not s or s["truth"] is None:
                    continue
                if s["truth"] < 0.5:
                    io_cases += 1
                    fp += s["procfs"] is not None and s["procfs"] >= 0.5
                    unknown_io += s["procfs"] is None
                else:
                    cont_cases += 1
                    miss += s["procfs"] is not None and s["procfs"] < 0.5
                    unknown_cont += s["procfs"] is None
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    print(f"\n/proc heuristic, measured contention < 0.5: {io_cases} windows, {fp} scored >= 0.5 "
          f"(false positives {fp / max(io_cases, 1):.0%}), {unknown_io} unknown")
    print(f"/proc heuristic, measured contention >= 0.5: {cont_cases} windows, {miss} scored < 0.5, "
          f"{unknown_cont} unknown")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
