#!/usr/bin/env python3
"""gil-exporter side by side with Debian's prometheus-process-exporter, in one run.

The node a per-node exporter is judged on: N CPython processes x T threads (default
100 x 10, Python 3.12 from pyenv); K of them (default 10) run 3 pure-Python spinning
threads (niced to 19, so they take only what the exporters leave: their GILs are
contended all the time, and the exporters' CPU is not held back by them); the others'
threads sleep in 1 s loops. Started side by side, against the same processes:

  process-exporter   prometheus-process-exporter, one group per process
                     ("{{.Comm}}:{{.PID}}"), its default flags
  gil-exporter off   sampling.enabled: false (/proc figures only)
  gil-exporter on    sampling at the default rate (100 Hz)
  ... in the image   the same config, in the container image built from the Dockerfile, run as
                     the chart's DaemonSet runs it (tests/test_image.py's Pod: the image's root
                     filesystem, hostPID, uid 0 with only SYS_PTRACE and DAC_READ_SEARCH);
                     --no-image leaves it out

The bench scrapes each one every --scrape-interval seconds (15 s, a usual Prometheus
interval), as Prometheus would, and measures over --seconds (after a warm-up of one
minute): CPU cores (utime + stime of the exporter from /proc/PID/stat), peak RSS
(VmHWM), series per scrape and scrape latency. Start-up: from exec until every process
is reported with gil_probe="ok" (off: until every process is reported), with the
exporter's CPU seconds at that moment; for process-exporter until its first scrape
reports every process. For each sampling gil-exporter, the GIL sampler thread's CPU per
target-sample: that thread's run time (/proc/PID/task/TID/schedstat) over its read syscalls
(/proc/PID/task/TID/io syscr: one pread of /proc/PID/mem per target-sample). The sampler thread
is the one with the most reads (the threads carry no names on 3.11), and which loop it runs
is the build_info's sampler_loop label.

    .venv/bin/python bench/bench_peers.py --seconds 300 --runs 2

process-exporter is installed with apt-get when it is missing (needs root).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAG = "bench-peers-worker"
CLK_TCK = os.sysconf("SC_CLK_TCK")

WORKER = """
import os, sys, threading, time
threads, spinning = int(sys.argv[1]), int(sys.argv[2])
def idle():
    while True:
        time.sleep(1)
def spin():
    x = 0
    while True:
        x += 1
if spinning:
    os.nice(19)
for i in range(threads - 1):
    threading.Thread(target=spin if i < spinning else idle, daemon=True).start()
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def pyenv_python(version: str) -> str:
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("pyenv") else os.path.expanduser("~/.pyenv")
    found = sorted(glob.glob(f"{root}/versions/{version}*/bin/python"))
    if not found:
        sys.exit(f"bench_peers: no pyenv CPython {version} under {root}/versions")
    return found[-1]


def ensure_process_exporter() -> str:
    path = shutil.which("prometheus-process-exporter")
    if path:
        return path
    print("installing prometheus-process-exporter (apt-get)", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=False, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "prometheus-process-exporter"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    # The package starts a service on :9256; the bench runs its own instance.
    subprocess.run(["systemctl", "stop", "prometheus-process-exporter"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = shutil.which("prometheus-process-exporter")
    if not path:
        sys.exit("bench_peers: prometheus-process-exporter could not be installed")
    return path


def process_exporter_version(binary: str) -> str:
    out = subprocess.run([binary, "-version"], capture_output=True, text=True)
    text = out.stdout + out.stderr
    m = re.search(r"revision: ([^)\s]+)", text) or re.search(r"version (\S+)", text)
    return m.group(1) if m else "?"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def host_busy(seconds: float = 3.0) -> float:
    """CPUs busy with other work right now, from /proc/stat over `seconds` (load averages lag
    by minutes: after a run they still show its spinning threads)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v[:8]) - v[3] - v[4], sum(v[:8])
    b0, t0 = read()
    time.sleep(seconds)
    b1, t1 = read()
    return (os.cpu_count() or 1) * (b1 - b0) / max(1, t1 - t0)


def thread_counters(pid: int) -> dict:
    """{TID: (run time in ns, read syscalls)} of every thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/io") as f:
                syscr = next(int(line.split()[1]) for line in f if line.startswith("syscr:"))
        except (OSError, StopIteration):
            continue
        out[int(tid)] = (run_ns, syscr)
    return out


def sampler_cost(before: dict, after: dict) -> tuple[float, int] | None:
    """(µs of run time per read, reads) of the thread that read most between the two."""
    deltas = [(a[1] - before[t][1], a[0] - before[t][0]) for t, a in after.items() if t in before]
    if not deltas:
        return None
    reads, run_ns = max(deltas)
    return (run_ns / 1e3 / reads, reads) if reads > 0 else None


@dataclass
class Peer:
    name: str
    argv: list
    port: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    log: object = None
    ready_s: float | None = None
    ready_cpu: float | None = None
    scrapes: list = field(default_factory=list)   # (latency s, series)
    cpu0: float = 0.0
    cpu1: float = 0.0
    t0: float = 0.0
    t1: float = 0.0
    hwm_mb: float = 0.0
    rss_mb: float = 0.0
    threads0: dict = field(default_factory=dict)
    threads1: dict = field(default_factory=dict)
    loop: str = ""        # build_info's sampler_loop

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="bench-peers-",
                                               suffix=".log", delete=False)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=self.log, preexec_fn=_die_with_parent)

    def get(self) -> tuple[float, str]:
        s = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            body = r.read().decode()
        return time.perf_counter() - s, body

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()
            os.unlink(self.log.name)


class ImagePeer(Peer):
    """gil-exporter from the container image, run as the chart's DaemonSet runs it, with
    `config` as its config file (in place of the chart's ConfigMap)."""

    def __init__(self, name: str, config: str, tmp: Path):
        sys.path.insert(0, str(ROOT / "tests"))
        from test_helm import merge, render, with_repository
        from test_image import Pod, build_image
        port = free_port()
        rendered = render(merge(with_repository({}), {"listenAddress": f"127.0.0.1:{port}"}))
        super().__init__(name, [], port)
        self.pod = Pod(build_image(), rendered, tmp)
        (cm,) = [c for c in self.pod.configmaps.values() if "config.yaml" in c.get("data", {})]
        cm["data"]["config.yaml"] = config

    def start(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="bench-peers-", suffix=".log", delete=False)
        self.started = time.monotonic()
        # the same process from exec to exec: unshare, sh, the launcher, the exporter
        self.proc = self.pod.start(log=Path(self.log.name))

    def stop(self) -> None:
        super().stop()
        self.pod.close()


def series(body: str) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith("#"))


def our_ready(body: str, n: int, sampling: bool) -> bool:
    info = [line for line in body.splitlines() if line.startswith("pygil_target_info{")]
    if sampling:
        return len(info) == n and all('gil_probe="ok"' in line for line in info)
    return len(info) == n


def pe_ready(body: str, n: int) -> bool:
    return len(set(re.findall(r'namedprocess_namegroup_num_procs\{groupname="([^"]+)"\} 1', body))) == n


def _die_with_parent() -> None:
    """In the child: SIGKILL when the bench dies, however it dies (no orphaned spinners)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_workers(python: str, n: int, threads: int, spinning: int) -> list:
    procs = []
    for i in range(n):
        spin = 3 if i < spinning else 0
        procs.append(subprocess.Popen([python, "-c", WORKER, str(threads), str(spin), TAG],
                                      stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent))
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            sys.exit("bench_peers: a worker did not start")
    return procs


def exporter_command() -> list:
    script = Path(sys.executable).parent / "gil-exporter"
    return [str(script)] if script.exists() else [sys.executable, "-m", "exporter"]


def run_once(args, pe_binary: str, python: str, tmp: Path) -> list:
    load_before = f"{loadavg()}; other work kept {host_busy():.2f} CPUs busy"  # before the spinners
    workers = start_workers(python, args.processes, args.threads, args.spinning)
    n = args.processes
    peers = []
    try:
        pe_cfg = tmp / "process-exporter.yml"
        pe_cfg.write_text(f'process_names:\n  - name: "{{{{.Comm}}}}:{{{{.PID}}}}"\n    cmdline:\n'
                          f"    - '{TAG}$'\n")
        port = free_port()
        peers.append(Peer("process-exporter", [pe_binary, "-config.path", str(pe_cfg),
                                               "-web.listen-address", f"127.0.0.1:{port}"], port))
        for sampling in (False, True):
            cfg = tmp / f"gil-exporter-{sampling}.yaml"
            cfg.write_text(config := f"""targets:
  - name: bench
    match:
      cmdline: '{TAG}$'
sampling:
  enabled: {str(sampling).lower()}
limits:
  max_targets: {n + 10}
  max_processes_per_target: {n + 10}
""")
            port = free_port()
            name = "gil-exporter, GIL sampled (100 Hz)" if sampling else "gil-exporter, /proc only"
            peers.append(Peer(name, exporter_command() + ["--config", str(cfg), "--web.listen-address",
                                                          f"127.0.0.1:{port}"], port))
        if args.image:
            (tmp / "pod").mkdir(exist_ok=True)
            peers.append(ImagePeer("gil-exporter in the image, GIL sampled (100 Hz)", config, tmp / "pod"))
        # Start-up: one exporter at a time, so that each one's start is not slowed by another's.
        # Ours is watched through its log (a scrape renders /metrics, which would add to the CPU
        # being measured); the moment is confirmed by one scrape. process-exporter reads /proc at
        # each scrape: it is ready at its first scrape that reports every process.
        for peer in peers:
            peer.start()
            ours = peer.name != "process-exporter"
            sampling = "sampled" in peer.name
            pattern = re.compile(r"pid=(\d+) GIL at" if sampling else r"tracking pid=(\d+)")
            deadline = peer.started + args.startup_timeout
            while time.monotonic() < deadline:
                time.sleep(0.1 if ours else 0.5)
                if ours:
                    if len(set(pattern.findall(Path(peer.log.name).read_text(errors="replace")))) < n:
                        continue
                    at, cpu = time.monotonic() - peer.started, cpu_seconds(peer.proc.pid)
                    time.sleep(1.5)  # the next tick publishes it
                    if not our_ready(peer.get()[1], n, sampling):
                        continue
                    peer.ready_s, peer.ready_cpu = at, cpu
                    break
                try:
                    _, body = peer.get()
                except OSError:
                    continue
                if pe_ready(body, n):
                    peer.ready_s = time.monotonic() - peer.started
                    peer.ready_cpu = cpu_seconds(peer.proc.pid)
                    break
        # Steady state: every peer scraped every scrape interval, as Prometheus would.
        warmup_end = time.monotonic() + args.warmup
        next_scrape = time.monotonic()
        measuring = False
        end = None
        while True:
            now = time.monotonic()
            if not measuring and now >= warmup_end:
                measuring = True
                for peer in peers:
                    peer.cpu0, peer.t0 = cpu_seconds(peer.proc.pid), time.monotonic()
                    peer.threads0 = thread_counters(peer.pid)
                end = now + args.seconds
            if measuring and now >= end:
                break
            if now >= next_scrape:
                for peer in peers:
                    latency, body = peer.get()
                    if measuring:
                        peer.scrapes.append((latency, series(body)))
                    m = re.search(r'^pygil_exporter_build_info\{[^}]*sampler_loop="(\w+)"', body, re.M)
                    peer.loop = m.group(1) if m else peer.loop
                next_scrape += args.scrape_interval
            time.sleep(max(0.0, min(next_scrape, end or next_scrape, warmup_end if not measuring else end)
                           - time.monotonic()))
        for peer in peers:
            peer.threads1 = thread_counters(peer.pid)
            peer.cpu1, peer.t1 = cpu_seconds(peer.proc.pid), time.monotonic()
            peer.hwm_mb = status_kb(peer.proc.pid, "VmHWM") / 1024
            peer.rss_mb = status_kb(peer.proc.pid, "VmRSS") / 1024
        return [peers, load_before, loadavg()]
    finally:
        for peer in peers:
            peer.stop()
        for p in workers:
            p.kill()
        for p in workers:
            p.wait()
            p.stdout.close()


def table(peers: list) -> list:
    pe = peers[0]
    pe_cores = (pe.cpu1 - pe.cpu0) / (pe.t1 - pe.t0)
    lines = ["| exporter | CPU cores | × process-exporter | peak RSS | × process-exporter | series | "
             "scrape p50 | start-up: all ok after | CPU-s at start-up | sampler µs CPU per target-sample "
             "(loop) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in peers:
        cores = (p.cpu1 - p.cpu0) / (p.t1 - p.t0)
        lat = statistics.median(s[0] for s in p.scrapes) * 1000 if p.scrapes else float("nan")
        nseries = statistics.median(s[1] for s in p.scrapes) if p.scrapes else 0
        ready = "not within the timeout" if p.ready_s is None else f"{p.ready_s:.1f} s"
        ready_cpu = "–" if p.ready_cpu is None else f"{p.ready_cpu:.2f}"
        cost = sampler_cost(p.threads0, p.threads1) if "sampled" in p.name else None
        per = "–" if cost is None else f"{cost[0]:.1f} ({p.loop}, {cost[1]:,} reads)"
        lines.append(f"| {p.name} | {cores:.4f} | {cores / pe_cores:.2f} | {p.hwm_mb:.1f} MB | "
                     f"{p.hwm_mb / pe.hwm_mb:.2f} | {nseries:,.0f} | {lat:.1f} ms | {ready} | {ready_cpu} | "
                     f"{per} |")
    return lines


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally) on SIGTERM too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=10)
    ap.add_argument("--spinning", type=int, default=10, help="processes with 3 spinning threads")
    ap.add_argument("--python", default="3.12", help="pyenv CPython version of the workers")
    ap.add_argument("--scrape-interval", type=float, default=15.0)
    ap.add_argument("--seconds", type=float, default=300.0, help="measured time per run")
    ap.add_argument("--warmup", type=float, default=60.0)
    ap.add_argument("--startup-timeout", type=float, default=90.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--image", action=argparse.BooleanOptionalAction, default=True,
                    help="also the exporter from the container image (needs tests/setup/image.sh)")
    args = ap.parse_args(argv)
    pe_binary = ensure_process_exporter()
    python = pyenv_python(args.python)
    pyver = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                           capture_output=True, text=True).stdout.strip()
    results = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.runs):
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            peers, load0, load1 = run_once(args, pe_binary, python, Path(d))
            results.append(peers)
            print(f"\nRun {i + 1} of {args.runs}, {when}: {args.processes} CPython {pyver} processes x "
                  f"{args.threads} threads ({args.spinning} with 3 spinning threads), scraped every "
                  f"{args.scrape_interval:g} s, {args.seconds:g} s measured; process-exporter "
                  f"{process_exporter_version(pe_binary)}; {os.cpu_count()} CPUs; load average "
                  f"{load0} before the workers started, {load1} at the end (the spinning threads add about "
                  f"{3 * args.spinning})\n")
            print("\n".join(table(peers)), flush=True)
    if args.runs > 1:
        print("\nSpread over the runs (min–max):\n")
        print("| exporter | CPU cores | × process-exporter | peak RSS (MB) | CPU-s at start-up | start-up (s) |")
        print("|---|---|---|---|---|---|")
        for j, name in enumerate(p.name for p in results[0]):
            rows = [r[j] for r in results]
            cores = [(p.cpu1 - p.cpu0) / (p.t1 - p.t0) for p in rows]
            ratio = [c / ((r[0].cpu1 - r[0].cpu0) / (r[0].t1 - r[0].t0)) for c, r in zip(cores, results)]
            hwm = [p.hwm_mb for p in rows]
            rc = [p.ready_cpu for p in rows if p.ready_cpu is not None]
            rs = [p.ready_s for p in rows if p.ready_s is not None]

            def span(xs, fmt):
                return "–" if not xs else f"{min(xs):{fmt}}–{max(xs):{fmt}}"
            print(f"| {name} | {span(cores, '.4f')} | {span(ratio, '.2f')} | {span(hwm, '.1f')} | "
                  f"{span(rc, '.2f')} | {span(rs, '.1f')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
