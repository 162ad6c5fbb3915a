"""The GIL probe's accuracy table: every interpreter here, in every placement, one row each.

    .venv/bin/python bench/accuracy_table.py [--seconds 2] [--placements host,chroot,pivot_root]

Interpreters and placements come from tests/placements.py (pyenv's 3.8-3.13, Debian 12's 3.11,
Debian unstable's 3.14 and 3.15, pyenv's 3.12 on sid's glibc; run tests/setup/rootfs.sh first).
For each one it samples, from outside, at 100 Hz:
  contended  3 pure-Python CPU threads: fraction of time the GIL was held with a waiter (~1)
  waiters    the mean number of threads waiting for the GIL in that workload (~2 of 3)
  hashlib    3 threads hashing 2 MiB buffers (the GIL is released): contended fraction (~0)
  sleep      3 threads in time.sleep loops: contended fraction (~0)
  single     1 CPU thread alone: contended fraction (~0), with the held fraction (~1)
  interval   sys.setswitchinterval(0.0123) in the target, read back (exactly 0.0123)
and prints a Markdown table. Exits 1 if any cell is outside the bands tests/ assert.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import placements  # noqa: E402

from exporter import gil  # noqa: E402
from exporter.sampler import GilSampler  # noqa: E402


def sample(sampler: GilSampler, pid: int, seconds: float):
    loc = gil.locate(pid)
    sampler.add(pid, loc)
    time.sleep(seconds)
    t = sampler.totals(pid)
    failure = sampler.failure(pid)
    sampler.remove(pid)
    if failure:
        raise RuntimeError(f"sampling failed: {failure}")
    return loc, t


def row(sampler: GilSampler, interp, placement: str, seconds: float) -> tuple[list[str], bool]:
    cells = {}
    for workload in ("cpu", "hashlib", "sleep", "single"):
        with placements.start(workload, interp, placement) as w:
            loc, t = sample(sampler, w.pid, seconds)
        cells[workload] = t
    with placements.start("cpu", interp, placement, switch_interval=0.0123) as w:
        _, iv = sample(sampler, w.pid, 0.5)
    frac = {k: t.contended_seconds / t.sampled_seconds for k, t in cells.items()}
    waiters = cells["cpu"].wait_seconds / cells["cpu"].sampled_seconds
    held = cells["single"].held_seconds / cells["single"].sampled_seconds
    cpu = cells["cpu"]
    ok = (cpu.held_seconds / cpu.sampled_seconds >= 0.5 and cpu.contended_seconds / cpu.held_seconds >= 0.9
          and 1.2 <= waiters <= 2.3 and all(frac[k] <= 0.15 for k in ("hashlib", "sleep", "single"))
          and held >= 0.9 and iv.interval_seconds == 0.0123)
    return [interp.name, placement, f"{loc.identity.version}", f"glibc {loc.identity.libc_version}", loc.method,
            f"{frac['cpu']:.2f}", f"{waiters:.2f}", f"{frac['hashlib']:.2f}", f"{frac['sleep']:.2f}",
            f"{frac['single']:.2f} (held {held:.2f})", f"{iv.interval_seconds:g}"], ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="sampling window per cell")
    ap.add_argument("--placements", default=",".join(placements.PLACEMENTS))
    ap.add_argument("--only", default="", help="comma-separated interpreter names to run")
    args = ap.parse_args()
    wanted = [p for p in args.placements.split(",") if p]
    interps = [i for i in placements.interpreters() if not args.only or i.name in args.only.split(",")]
    missing = [i.name for i in interps if not i.available()]
    if missing:
        print(f"missing root filesystems for {missing}: run tests/setup/rootfs.sh", file=sys.stderr)
        return 2
    print("| interpreter | placement | version | libc | located by | contended (cpu ×3) | waiters "
          "| hashlib | sleep | single | interval 0.0123 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sampler = GilSampler(rate_hz=100.0)
    sampler.start()
    bad = 0
    try:
        for interp in interps:
            for placement in wanted:
                cells, ok = row(sampler, interp, placement, args.seconds)
                bad += not ok
                print("| " + " | ".join(cells) + (" |" if ok else " | **out of band**"), flush=True)
    finally:
        sampler.close()
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
