#!/usr/bin/env python3
"""The /proc pass's per-thread reads, with and without the schedstat gate, in one run.

N CPython processes x T threads (default 100 x 10, the interpreter running this script),
K of them (default 10) with 3 threads that switch (1 ms sleeps), the others asleep in 1 s
loops. For each process: its kept StatFile and ThreadFiles, read as a monitor pass does.
"gated" is ThreadFiles as shipped (a thread's status is read only when its schedstat line
moved); "every status" forgets the gate's memory before each reading, which is the read
pattern before the gate. The two alternate, pass by pass, so that both see the same host.

    .venv/bin/python bench/bench_pass.py --passes 20
    .venv/bin/python bench/bench_pass.py --passes 3 --gap 5    # passes as far apart as 5 s scrapes
    .venv/bin/python bench/bench_pass.py --passes 3 --gap 5 --idle block
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from exporter import procfs  # noqa: E402

WORKER = """
import sys, threading, time
threads, switching, block = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "block"
def idle():
    if block:  # as a pool's worker waits on its queue
        threading.Event().wait()
    while True:
        time.sleep(1)
def switch():
    while True:
        time.sleep(0.001)
for i in range(threads - 1):
    threading.Thread(target=switch if i < switching else idle, daemon=True).start()
print("ready", flush=True)
idle()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=10)
    ap.add_argument("--switching", type=int, default=10, help="processes with 3 switching threads")
    ap.add_argument("--passes", type=int, default=20, help="passes of each kind")
    ap.add_argument("--idle", choices=["sleep", "block"], default="sleep",
                    help="idle threads in 1 s sleeps (bench_peers's workers) or blocked for good")
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between two passes")
    args = ap.parse_args()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(args.threads),
                               str(3 if i < args.switching else 0), args.idle], stdout=subprocess.PIPE, text=True)
             for i in range(args.processes)]
    try:
        for p in procs:
            p.stdout.readline()
        stats = [procfs.StatFile(p.pid, procfs.start_time(p.pid)) for p in procs]
        files = [procfs.ThreadFiles(p.pid) for p in procs]
        cpu: dict[str, list[float]] = {"every status": [], "gated": []}
        reads: dict[str, list[int]] = {"every status": [], "gated": []}
        for f, s in zip(files, stats):
            f.read(s.read().threads)
        for _ in range(args.passes):
            for kind in cpu:
                time.sleep(args.gap)
                before = sum(f.status_reads for f in files)
                t0 = time.thread_time()
                for f, s in zip(files, stats):
                    if kind == "every status":
                        f.last.clear()
                    f.read(s.read().threads)
                cpu[kind].append(time.thread_time() - t0)
                reads[kind].append(sum(f.status_reads for f in files) - before)
        n = args.processes * args.threads
        print(f"{args.processes} processes x {args.threads} threads ({n} threads), "
              f"{args.switching} with 3 switching threads; {args.passes} passes each, alternating, "
              f"{args.gap:g} s apart, idle threads: {args.idle}\n")
        print("| pass | CPU ms per pass (median) | status files read per pass | CPU us per thread |")
        print("|---|---|---|---|")
        for kind in cpu:
            ms = statistics.median(cpu[kind]) * 1000
            print(f"| {kind} | {ms:.2f} | {statistics.median(reads[kind]):.0f} | {ms * 1000 / n:.2f} |")
        for f in files:
            f.close()
        for s in stats:
            s.close()
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
