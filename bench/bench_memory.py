#!/usr/bin/env python3
"""Where gil-exporter's resident memory goes, import by import, and the running daemon's peak.

Each step imports more of what the daemon imports, in the order it does, in one fresh
interpreter (the venv's), and prints the resident set (VmRSS) after it: the difference is what
that step costs. The standard library parts that prometheus_client drags in (its __init__
imports its exposition module: http.server, ssl, urllib.request, wsgiref) are shown as their
own steps, ahead of it. Then the real daemon, started with a config watching --targets CPython
processes (sleeping threads, sampled at the default rate) for --seconds: its VmHWM (peak) and
VmRSS, beside the imports' total.

    .venv/bin/python bench/bench_memory.py --targets 20 --seconds 20
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

# (step, modules it imports, when the daemon needs it)
STEPS = [
    ("interpreter", [], "always"),
    ("stdlib the daemon uses itself", ["argparse", "logging", "threading", "json", "re", "socket",
                                      "ipaddress", "html", "dataclasses", "collections", "signal"],
     "always"),
    ("ssl (+ libssl, libcrypto)", ["ssl"], "http.client imports it; the daemon itself only for --web.config.file TLS"),
    ("http.server (+ http.client, email)", ["http.server"], "always: the exporter's request handler is http.server's (prometheus_client imports it too)"),
    ("urllib.request, wsgiref", ["urllib.request", "wsgiref.simple_server"], "prometheus_client only (push gateway, WSGI app): unused"),
    ("prometheus_client", ["prometheus_client", "prometheus_client.core"], "always: the registry and the text formats"),
    ("yaml", ["yaml"], "always: the config"),
    ("psutil", ["psutil"], "always: discovery"),
    ("jsonschema", ["jsonschema"], "a config file: validated against its schema at load"),
    ("pyelftools", ["elftools.elf.elffile"], "the first GIL locate"),
    ("exporter (every module)", ["exporter.cli", "exporter.http", "exporter.monitor", "exporter.collector",
                                 "exporter.giltracker", "exporter.sampler", "exporter.attribution",
                                 "exporter.stacks", "exporter.diagnose", "exporter.top"],
     "always"),
]

CHILD = r"""
import gc, importlib, json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
steps = json.loads(sys.argv[1])
for name, modules in steps:
    for m in modules:
        importlib.import_module(m)
    gc.collect()
    print(json.dumps([name, rss(), len(sys.modules)]), flush=True)
"""


def import_steps(python: str) -> list[tuple[str, int, int]]:
    spec = [[name, modules] for name, modules, _ in STEPS]
    import json
    out = subprocess.run([python, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    return [tuple(json.loads(line)) for line in out.splitlines()]


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def daemon_peak(python: str, targets: int, seconds: float) -> tuple[int, int, int]:
    """(VmHWM, VmRSS, processes seen ok) of the daemon watching `targets` sleeping CPythons."""
    workers = [subprocess.Popen([sys.executable, "-c",
                                 "import threading,time\n"
                                 "for i in range(9): threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
                                 "print('bench-memory-worker', flush=True)\ntime.sleep(3600)",
                                 "bench-memory-worker"],
                                stdout=subprocess.DEVNULL) for _ in range(targets)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    config = tmp / "config.yaml"
    config.write_text("targets:\n  - name: workers\n    match:\n      cmdline: 'bench-memory-worker'\n"
                      f"limits:\n  max_targets: {targets + 10}\n  max_processes_per_target: {targets + 10}\n")
    log = open(tmp / "log", "w")
    daemon = subprocess.Popen([python, "-m", "exporter", "--config", str(config),
                               "--web.listen-address", "127.0.0.1:0"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=log)
    try:
        time.sleep(seconds)
        body = ""
        text = (tmp / "log").read_text()
        import re
        import urllib.request
        m = re.search(r"\bmetrics (https?://[^\s/]+)/", text)
        if m:
            with urllib.request.urlopen(m.group(1) + "/metrics", timeout=10) as r:
                body = r.read().decode()
        ok = body.count('gil_probe="ok"')
        return status_kb(daemon.pid, "VmHWM"), status_kb(daemon.pid, "VmRSS"), ok
    finally:
        daemon.terminate()
        daemon.wait(10)
        for w in workers:
            w.kill()
            w.wait()
        log.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=str(ROOT / ".venv/bin/python"), help="the daemon's interpreter")
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--no-daemon", action="store_true", help="the imports only")
    args = ap.parse_args(argv)
    rows = import_steps(args.python)
    when = {name: w for name, _, w in STEPS}
    print(f"command: {' '.join([os.path.relpath(sys.argv[0], ROOT)] + (argv if argv is not None else sys.argv[1:]))}")
    version = subprocess.run([args.python, "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True).stdout.strip()
    print(f"interpreter: Python {version} ({args.python})\n")
    print("| step | + RSS | RSS after | modules | needed |")
    print("|---|---|---|---|---|")
    prev = None
    for name, rss, modules in rows:
        delta = "" if prev is None else f"+{(rss - prev) / 1024:.1f} MB"
        print(f"| {name} | {delta} | {rss / 1024:.1f} MB | {modules} | {when[name]} |")
        prev = rss
    if not args.no_daemon:
        hwm, rss, ok = daemon_peak(args.python, args.targets, args.seconds)
        print(f"\ndaemon, {args.targets} targets x 10 threads, sampling at the default rate, after "
              f"{args.seconds:g} s: peak (VmHWM) {hwm / 1024:.1f} MB, now (VmRSS) {rss / 1024:.1f} MB, "
              f"{ok} series with gil_probe=\"ok\"; the imports above: {rows[-1][1] / 1024:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
