"""Other GIL-aware profilers, run against the same workload as `diagnose --stacks`, for the
comparison in tests/test_stacks.py and bench/bench_stacks.py:

  py-spy      `py-spy record --gil --nonblocking -f raw` (PyPI py-spy, from the test extra):
              samples only the thread holding the GIL, never pauses the target
  stdlib      `python3.15 -m profiling.sampling attach --mode gil -a --collapsed` (3.15+),
              run inside the target's own root (its mount namespace after pivot_root)

Both report stacks root first; the innermost function of each is what "top function" means.
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import placements


def py_spy() -> str:
    """py-spy next to the interpreter running the tests (the test extra), else on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else (shutil.which("py-spy") or "")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def leaf_counts_py_spy(pid: int, seconds: float, rate: int = 100) -> tuple[Counter, float]:
    """(innermost function -> samples, py-spy's CPU seconds) from py-spy's raw output."""
    out = f"/tmp/gil-exporter-py-spy-{os.getpid()}-{pid}.txt"
    cpu0 = _children_cpu()
    r = subprocess.run([py_spy(), "record", "--gil", "--nonblocking", "-d", str(int(seconds)),
                        "-r", str(rate), "-f", "raw", "-o", out, "-p", str(pid)],
                       capture_output=True, text=True, timeout=seconds + 60)
    cpu = _children_cpu() - cpu0
    try:
        if r.returncode != 0:
            raise RuntimeError(f"py-spy failed ({r.returncode}): {r.stderr[-500:]}")
        counts: Counter = Counter()
        for line in Path(out).read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            leaf = stack.split(";")[-1]             # "hot (<string>:20)"
            counts[leaf.rsplit(" (", 1)[0]] += int(n)
        return counts, cpu
    finally:
        if os.path.exists(out):
            os.unlink(out)


def leaf_counts_stdlib(w: placements.PlacedWorkload, interp: placements.Interpreter,
                       seconds: float, rate: int = 100) -> Counter:
    """innermost function -> samples from the 3.15 stdlib sampler in GIL mode, run by the
    target's own interpreter inside the target's root (`nsenter` into its mount namespace;
    the workload must have been placed with pivot_root so that /proc is mounted there)."""
    assert w.placement == "pivot_root", "profiling.sampling runs in the target's own root"
    name = f"tmp/gil-exporter-profiling-{os.getpid()}-{w.pid}.txt"
    r = subprocess.run(["nsenter", "-t", str(w.pid), "-m", "-r", "-w", interp.path, "-m",
                        "profiling.sampling", "attach", "--mode", "gil", "-a", "-d", str(int(seconds)),
                        "-r", str(rate), "--collapsed", "-o", "/" + name, str(w.pid)],
                       capture_output=True, text=True, timeout=seconds + 60)
    out = interp.rootfs / name
    try:
        if r.returncode != 0:
            raise RuntimeError(f"profiling.sampling failed ({r.returncode}): {r.stderr[-500:]}")
        counts: Counter = Counter()
        for line in out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            leaf = stack.split(";")[-1]             # "<string>:hot:20"
            parts = leaf.rsplit(":", 2)
            counts[parts[1] if len(parts) == 3 else leaf] += int(n)
        return counts
    finally:
        if out.exists():
            out.unlink()

