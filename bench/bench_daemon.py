"""Daemon benchmark: N matched processes with T threads each.

Reports /metrics latency (p50/p99), the exporter's CPU seconds per second and its RSS,
with GIL sampling on and off, and prints a Markdown table for BENCHMARKS.md.

    .venv/bin/python bench/bench_daemon.py --processes 100 --threads 10 --seconds 60

The workload threads sleep (time.sleep(1) loops), so that the machine's 2 cores stay
free for the exporter and the measurement is of the exporter, not of the workload.
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

WORKER = """
import threading, time, sys
def idle():
    while True:
        time.sleep(1)
for _ in range(int(sys.argv[1]) - 1):
    threading.Thread(target=idle, daemon=True).start()
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(processes: int, threads: int, seconds: float, sampling: bool, tmp: Path) -> dict:
    tag = "bench-daemon-worker"
    procs = []
    try:
        for _ in range(processes):
            p = subprocess.Popen([sys.executable, "-c", WORKER, str(threads), tag],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        cfg = tmp / f"bench-{sampling}.yaml"
        cfg.write_text(f"""
targets:
  - name: bench
    match:
      cmdline: '{tag}$'
scan_interval_seconds: 5
window_seconds: 10
sampling:
  enabled: {str(sampling).lower()}
  rate_hz: 100
limits:
  max_targets: {processes + 10}
  max_processes_per_target: {processes + 10}
""")
        exp = Exporter(["--config", str(cfg)])
        try:
            exp.wait_for(lambda: len(exp.series("pygil_process_threads")) == processes, timeout=60)
            time.sleep(12)  # past one window, and every GIL located
            cpu0, t0 = proc_cpu_seconds(exp.proc.pid), time.monotonic()
            latencies = []
            end = t0 + seconds
            while time.monotonic() < end:
                s = time.perf_counter()
                status, body = exp.get("/metrics")
                latencies.append(time.perf_counter() - s)
                assert status == 200
                time.sleep(max(0.0, 1.0 - (time.perf_counter() - s)))  # a 1 s scrape interval
            cpu1, t1 = proc_cpu_seconds(exp.proc.pid), time.monotonic()
            lat = sorted(latencies)
            probes = [s.labels.get("gil_probe") for s in exp.series("pygil_target_info")]
            return {
                "sampling": sampling,
                "scrapes": len(lat),
                "p50_ms": statistics.median(lat) * 1000,
                "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000,
                "cpu_per_s": (cpu1 - cpu0) / (t1 - t0),
                "rss_mb": proc_rss_mb(exp.proc.pid),
                "series": len(exp.scrape()),
                "probes_ok": probes.count("ok"),
            }
        finally:
            exp.close()
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = [run(args.processes, args.threads, args.seconds, s, Path(d)) for s in (False, True)]
    print(f"\n{args.processes} processes x {args.threads} threads, {args.seconds:g} s of 1 s scrapes, "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    print("| GIL sampling | scrapes | /metrics p50 | /metrics p99 | exporter CPU (cores) | RSS | series | GIL probes ok |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on, 100 Hz' if r['sampling'] else 'off'} | {r['scrapes']} | {r['p50_ms']:.1f} ms | "
              f"{r['p99_ms']:.1f} ms | {r['cpu_per_s']:.3f} | {r['rss_mb']:.1f} MB | {r['series']} | "
              f"{r['probes_ok']} |")


if __name__ == "__main__":
    main()
