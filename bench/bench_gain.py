"""The gain, predicted and then measured: the same fixed CPU work as k threads in one process,
then as k processes.

    .venv/bin/python bench/bench_gain.py [--python 3.12] [--seconds 16] [--ks 2,3,4] [--json FILE]

For each case, the threaded run is measured by the real `gil-exporter diagnose PID --json`
while its threads count finished work units; its `gain_ratio` is the prediction. Then the same
workers run as separate processes for the same time. The measured ratio is the units the
processes did over the units the threads did. The host column is what the host gave the
process run: CPU-seconds used per wall second, so a busy host shows in its own figure (the
prediction's `spare` input is the process's cores plus the idle ones during the threaded run).

Cases: `cpu-k`: k CPU-bound threads; `mix-k`: k CPU-bound threads plus k threads that sleep 10 ms
between small pieces of work (only the CPU-bound units count).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness import exporter_command  # noqa: E402
from workloads import pyenv_pythons  # noqa: E402

WORKER = r"""
import os, sys, threading, time
cpu, sleepers, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
counts = [0] * cpu
go = threading.Event()
def work(i):
    go.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        x = 0
        for j in range(20000):
            x += j * j
        counts[i] += 1
def sleeper():
    go.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
        sum(range(300))
ts = [threading.Thread(target=work, args=(i,)) for i in range(cpu)]
ts += [threading.Thread(target=sleeper) for _ in range(sleepers)]
for t in ts:
    t.start()
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()        # start together
go.set()
for t in ts:
    t.join()
sys.stdout.write("%d\n" % sum(counts)); sys.stdout.flush()
"""


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(python: str, cpu: int, sleepers: int, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([python, "-c", WORKER, str(cpu), str(sleepers), str(seconds)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _finish(procs) -> int:
    return sum(int(p.communicate(timeout=120)[0].strip()) for p in procs)


def run_case(python: str, k: int, sleepers: int, seconds: float) -> dict:
    # threads: k CPU threads (+ sleepers) in one process, diagnosed while they work
    t = _start(python, k, sleepers, seconds)
    t.stdin.write("go\n")
    t.stdin.flush()
    t_start, t_cpu0 = time.monotonic(), _cpu_seconds(t.pid)
    time.sleep(0.5)
    # the measurement fits well inside the run: locating takes a moment, and diagnose waits
    # up to one more window for enough GIL samples on a busy host
    r = subprocess.run(exporter_command() + ["diagnose", str(t.pid), "--json", "--seconds",
                                             str(max(2.0, seconds / 4))],
                       capture_output=True, text=True, timeout=120)
    threads_used = (_cpu_seconds(t.pid) - t_cpu0) / (time.monotonic() - t_start)
    threaded = _finish([t])
    doc = json.loads(r.stdout)
    if "figures" not in doc:
        raise RuntimeError(f"diagnose: {doc.get('error', r.stderr.strip())}")
    fig = doc["figures"]
    # processes: the same workers, one process each, for the same time
    procs = [_start(python, 1, 0, seconds) for _ in range(k)]
    procs += [_start(python, 0, 1, seconds) for _ in range(sleepers)]
    t0 = time.monotonic()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    time.sleep(seconds * 0.9)
    used = sum(_cpu_seconds(p.pid) for p in procs[:k])
    wall = time.monotonic() - t0
    processed = _finish(procs)
    measured = processed / threaded if threaded else float("nan")
    return {
        "case": f"{'mix' if sleepers else 'cpu'}-{k}", "kind": doc["verdict"]["kind"],
        "demand": fig["demand_threads"], "spare": fig["spare_cores"],
        "predicted": fig["gain_ratio"], "measured": measured,
        "host_gave": used / wall, "threads_used": threads_used,
        # the same formula on the cores the host actually gave each run: what a busy host's
        # figures are checked against
        "predicted_given": max(1.0, min(fig["demand_threads"] or 0.0, used / wall) / max(threads_used, 1e-9)),
        "threaded_units": threaded, "process_units": processed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default="3.12")
    ap.add_argument("--seconds", type=float, default=16.0)
    ap.add_argument("--ks", default="2,3,4")
    ap.add_argument("--json")
    args = ap.parse_args()
    python = pyenv_pythons()[args.python]
    ks = [int(x) for x in args.ks.split(",")]
    rows = []
    print(f"CPython {args.python}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start")
    print("| case | kind | demand (threads) | spare (cores) | predicted × | measured × | "
          "error | threads used (cores) | processes got (cores) | predicted on what the host gave × | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for sleepers in (0, 1):
        for k in ks:
            try:
                row = run_case(python, k, k * sleepers, args.seconds)
            except RuntimeError as e:
                print(f"| {'mix' if sleepers else 'cpu'}-{k} | {e} ||||||||||", flush=True)
                continue
            rows.append(row)
            pred, meas = row["predicted"], row["measured"]
            err = "n/a" if pred is None else f"{(pred - meas) / meas:+.0%}"
            given = row["predicted_given"]
            print(f"| {row['case']} | {row['kind']} | {row['demand']:.2f} | {row['spare']:.2f} | "
                  f"{'n/a' if pred is None else format(pred, '.2f')} | {meas:.2f} | {err} | "
                  f"{row['threads_used']:.2f} | {row['host_gave']:.2f} | {given:.2f} | "
                  f"{(given - meas) / meas:+.0%} |", flush=True)
    print(f"load {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
