"""What the window means for each gauge, measured: a process goes from idle to N contended
CPU threads at a known moment; the exporter is scraped every 0.25 s and we record when each
window gauge crosses 50 % and 90 % of its final level.

    .venv/bin/python bench/bench_window.py --window 10
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import Exporter  # noqa: E402
from workloads import start_workload  # noqa: E402

GAUGES = {
    "pygil_process_cpu_cores": {},
    "pygil_process_context_switches_per_second": {"type": "voluntary"},
    "pygil_gil_waiting_threads": {},
    "pygil_gil_contention_score": {"method": "gil_state"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--delay", type=float, default=6.0)
    args = ap.parse_args()
    os.environ["WORKLOAD_STEP_DELAY"] = str(args.delay)
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "c.yaml"
        cfg.write_text(f"targets:\n  - name: step\n    match:\n      cmdline: 'bench-window$'\n"
                       f"scan_interval_seconds: 1\nwindow_seconds: {args.window}\n")
        exp = Exporter(["--config", str(cfg)])
        w = start_workload("step", threads=3, argv_tag="bench-window")
        t_start = time.monotonic()
        t_step = t_start + args.delay  # the threads start working about now
        trace = []
        try:
            while time.monotonic() < t_step + args.window * 2 + 4:
                samples = exp.scrape()
                now = time.monotonic() - t_step
                row = {}
                for name, labels in GAUGES.items():
                    for s in samples:
                        if s.name == name and s.labels.get("pid") == str(w.pid) and \
                                all(s.labels.get(k) == v for k, v in labels.items()):
                            row[name] = s.value
                trace.append((now, row))
                time.sleep(0.25)
        finally:
            w.stop()
            exp.close()
    print(f"\nstep from idle to 3 contended CPU threads at t=0; window_seconds={args.window:g}; "
          f"scrapes every 0.25 s\n")
    print("| gauge | final level | reaches 50 % after | reaches 90 % after |")
    print("|---|---|---|---|")
    for name in GAUGES:
        vals = [(t, r[name]) for t, r in trace if name in r]
        final = sum(v for t, v in vals[-8:]) / max(1, len(vals[-8:]))

        def first(frac):
            for t, v in vals:
                if t > 0 and v >= frac * final:
                    return f"{t:.1f} s"
            return "never"
        print(f"| `{name}` | {final:.2f} | {first(0.5)} | {first(0.9)} |")


if __name__ == "__main__":
    main()
