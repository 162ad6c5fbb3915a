"""Cost of the per-thread metric (sampling.per_thread): the daemon's CPU with it on and off.

N processes, each with a thread that holds the GIL all the time while using no CPU (it sleeps
inside a C call that keeps the GIL: ctypes.PyDLL) and T-1 threads that wait for it or sleep:
every GIL sample finds the GIL held, so every sample pays for the holder's TID. This is the
worst case for the per-thread metric; a process whose GIL is free costs nothing more. The
daemon runs with per_thread off and on in alternating rounds (the host is shared: alternating
cancels slow drifts); its CPU is utime+stime from /proc/PID/stat over each round, and its
sampler thread's CPU is the busiest thread's (the sampler, at 100 Hz on N targets).

    .venv/bin/python bench/bench_threads.py --processes 50 --threads 4 --seconds 30 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import Exporter  # noqa: E402
from workloads import pyenv_pythons  # noqa: E402

WORKER = """
import ctypes, os, sys, threading, time
libc = ctypes.PyDLL(None)          # calls through PyDLL keep the GIL
def hold():
    while True:
        libc.usleep(200000)
def idle():
    while True:
        time.sleep(1)
print("ready", flush=True)
for _ in range(int(sys.argv[1]) - 2):
    threading.Thread(target=idle, daemon=True).start()
threading.Thread(target=hold, daemon=True).start()
while True:
    time.sleep(1)
"""

CLK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def thread_cpu(pid: int) -> dict[int, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = cpu(pid, int(tid))
        except OSError:
            pass
    return out


def round_(python: str, n: int, threads: int, seconds: float, per_thread: bool, tmp: Path) -> dict:
    cfg = tmp / f"bench-{per_thread}.yaml"
    cfg.write_text("targets:\n  - name: bench\n    match:\n      cmdline: 'bench-threads-worker'\n"
                   f"scan_interval_seconds: 5\nsampling:\n  per_thread: {str(per_thread).lower()}\n")
    exp = Exporter(["--config", str(cfg)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:        # every probe located before measuring
            ok = [s for s in exp.series("pygil_target_info") if s.labels.get("gil_probe") == "ok"]
            if len(ok) >= n:
                break
            time.sleep(1)
        time.sleep(3)
        pid = exp.proc.pid
        c0, t0, th0 = cpu(pid), time.monotonic(), thread_cpu(pid)
        scrapes = 0
        while time.monotonic() - t0 < seconds:
            exp.scrape()
            scrapes += 1
            time.sleep(5)
        c1, t1, th1 = cpu(pid), time.monotonic(), thread_cpu(pid)
        busiest = max((th1[t] - th0.get(t, 0.0) for t in th1), default=0.0)
        series = len(exp.series("pygil_thread_gil_held_seconds_total"))
        return {"cores": (c1 - c0) / (t1 - t0), "sampler": busiest / (t1 - t0), "series": series,
                "scrapes": scrapes}
    finally:
        exp.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=50)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--python", default=pyenv_pythons().get("3.12") or sys.executable)
    args = ap.parse_args()
    procs = []
    try:
        for _ in range(args.processes):
            p = subprocess.Popen([args.python, "-c", WORKER, str(args.threads), "bench-threads-worker"],
                                 stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "ready"
            procs.append(p)
        results = {False: [], True: []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for per_thread in ((False, True) if r % 2 == 0 else (True, False)):
                    res = round_(args.python, args.processes, args.threads, args.seconds, per_thread, Path(tmp))
                    results[per_thread].append(res)
                    print(f"round {r} per_thread={per_thread}: {res}", file=sys.stderr)
        load = os.getloadavg()[0]
        print(f"{args.processes} processes x {args.threads} threads (GIL held all the time), "
              f"{args.rounds} rounds of {args.seconds:g} s each way, Python {args.python}, "
              f"load average {load:.1f}\n")
        print("| sampling.per_thread | exporter CPU (cores), median | sampler thread (cores), median | "
              "per-thread series |")
        print("|---|---|---|---|")
        for per_thread in (False, True):
            rs = results[per_thread]
            print(f"| {'on' if per_thread else 'off'} | {statistics.median(r['cores'] for r in rs):.3f} | "
                  f"{statistics.median(r['sampler'] for r in rs):.3f} | "
                  f"{statistics.median(r['series'] for r in rs):.0f} |")
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
