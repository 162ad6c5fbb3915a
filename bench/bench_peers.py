#!/usr/bin/env python3
"""gil-exporter side by side with Debian's prometheus-process-exporter, in one run.

The node a per-node exporter is judged on: N CPython processes x T threads (default
100 x 10, Python 3.12 from pyenv); K of them (default 10) run 3 pure-Python spinning
threads (niced to 19, so they take only what the exporters leave: their GILs are
contended all the time, and the exporters' CPU is not held back by them); the others'
threads sleep in 1 s loops. Started side by side, against the same processes:

  process-exporter, one group        prometheus-process-exporter, one group for every worker
  process-exporter, one group per process   the same, "{{.Comm}}:{{.PID}}" (the like-for-like
                     setup: gil-exporter publishes every process), its default flags
  gil-exporter off   sampling.enabled: false (/proc figures only)
  gil-exporter on    sampling at the default rate (100 Hz)
  ... in the image   the same config, in the container image built from the Dockerfile, run as
                     the chart's DaemonSet runs it (tests/test_image.py's Pod: the image's root
                     filesystem, hostPID, uid 0 with only SYS_PTRACE and DAC_READ_SEARCH);
                     --no-image leaves it out

Each --scrape-interval (default 5 and 15 s) is a phase of its own: the exporters are started
afresh (start-up is measured in each), then each is scraped every interval by its own scraper
thread, as Prometheus would (a scrape that takes longer than the interval fails and is
counted), and measured over --seconds after --warmup: CPU cores (utime + stime of the exporter
from /proc/PID/stat), peak RSS (VmHWM), series per scrape, scrapes ok / failed and scrape
latency. Start-up, one exporter at a time: from exec until every process is reported with
gil_probe="ok" (off: until every process is reported), with the exporter's CPU seconds at that
moment; for process-exporter until its first scrape reports every process. For each sampling
gil-exporter, the GIL sampler thread's CPU per target-sample: that thread's run time
(/proc/PID/task/TID/schedstat) over its read syscalls (/proc/PID/task/TID/io syscr: one pread of
/proc/PID/mem per target-sample). The sampler thread is the one with the most reads (the
threads carry no names on 3.11), and which loop it runs is the build_info's sampler_loop label.

--saturate N keeps N CPU hogs (sh loops) running through every phase: the saturated node of a
busy cluster (2 cores at load ~150). At --saturate-nice 19 (the default) they take only what
the exporters leave, as other pods do on a node whose cgroups weigh CPU by the pods' requests;
at 0 every hog competes with each exporter thread as an equal (a bare host at that load).

    .venv/bin/python bench/bench_peers.py                    # quiet host, 5 s and 15 s scrapes
    .venv/bin/python bench/bench_peers.py --saturate 150     # the saturated node

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
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAG = "bench-peers-worker"
PE_GROUPED = "process-exporter, one group"
PE_PER_PROCESS = "process-exporter, one group per process"
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
    """{TID: (run time in ns, read syscalls, user ticks, system ticks)} of every thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/io") as f:
                syscr = next(int(line.split()[1]) for line in f if line.startswith("syscr:"))
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                utime, stime = (int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        except (OSError, StopIteration, ValueError):
            continue
        out[int(tid)] = (run_ns, syscr, utime, stime)
    return out


def sampler_cost(before: dict, after: dict) -> tuple[float, int, float | None] | None:
    """(µs of run time per read, reads, share of it in the kernel) of the thread that read
    most between the two."""
    deltas = [(a[1] - before[t][1], a[0] - before[t][0], a[2] - before[t][2], a[3] - before[t][3])
              for t, a in after.items() if t in before]
    if not deltas:
        return None
    reads, run_ns, user, system = max(deltas)
    kernel = system / (user + system) if user + system else None
    return (run_ns / 1e3 / reads, reads, kernel) if reads > 0 else None


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
    failed: int = 0       # scrapes while measuring that failed or took over the interval

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="bench-peers-",
                                               suffix=".log", delete=False)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=self.log, preexec_fn=_die_with_parent)

    def get(self, timeout: float = 30.0) -> tuple[float, str]:
        s = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout) as r:
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


def pe_ready(body: str, groups: int, n: int) -> bool:
    """Every worker reported: `groups` groups holding `n` processes in all."""
    found = re.findall(r'namedprocess_namegroup_num_procs\{groupname="([^"]+)"\} (\d+)', body)
    return len(found) == groups and sum(int(c) for _, c in found) == n


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


def scrape_loop(peer: Peer, interval: float, warmup_end: float, end: float,
                measuring: threading.Event) -> None:
    """Scrape `peer` every `interval` until `end`; scrapes while `measuring` are counted."""
    next_scrape = time.monotonic()
    while next_scrape < end:
        counted = measuring.is_set()
        try:
            latency, body = peer.get(timeout=interval)
        except OSError:  # refused, reset or past the interval (socket.timeout is an OSError)
            if counted:
                peer.failed += 1
        else:
            if counted:
                peer.scrapes.append((latency, series(body)))
            m = re.search(r'^pygil_exporter_build_info\{[^}]*sampler_loop="(\w+)"', body, re.M)
            peer.loop = m.group(1) if m else peer.loop
        next_scrape += interval
        while next_scrape < time.monotonic():  # a scrape took longer than the interval: skip
            next_scrape += interval
        time.sleep(max(0.0, min(next_scrape, end) - time.monotonic()))


def run_once(args, pe_binary: str, python: str, tmp: Path, interval: float) -> list:
    load_before = f"{loadavg()}; other work kept {host_busy():.2f} CPUs busy"  # before the spinners
    workers = start_workers(python, args.processes, args.threads, args.spinning)
    n = args.processes
    peers = []
    try:
        for name, group in ((PE_GROUPED, "all"), (PE_PER_PROCESS, "{{.Comm}}:{{.PID}}")):
            pe_cfg = tmp / f"process-exporter-{group == 'all'}.yml"
            pe_cfg.write_text(f'process_names:\n  - name: "{group}"\n    cmdline:\n'
                              f"    - '{TAG}$'\n")
            port = free_port()
            peers.append(Peer(name, [pe_binary, "-config.path", str(pe_cfg),
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
            ours = not peer.name.startswith("process-exporter")
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
                if pe_ready(body, 1 if peer.name == PE_GROUPED else n, n):
                    peer.ready_s = time.monotonic() - peer.started
                    peer.ready_cpu = cpu_seconds(peer.proc.pid)
                    break
        # Steady state: every peer scraped every scrape interval, as Prometheus would, each by
        # its own scraper thread (a slow exporter delays only its own scrapes; a scrape that
        # takes longer than the interval fails, as Prometheus's scrape_timeout would have it).
        warmup_end = time.monotonic() + args.warmup
        end = warmup_end + args.seconds
        measuring = threading.Event()
        scrapers = [threading.Thread(target=scrape_loop, args=(peer, interval, warmup_end, end, measuring),
                                     daemon=True) for peer in peers]
        for t in scrapers:
            t.start()
        time.sleep(max(0.0, warmup_end - time.monotonic()))
        for peer in peers:
            peer.cpu0, peer.t0 = cpu_seconds(peer.proc.pid), time.monotonic()
            peer.threads0 = thread_counters(peer.pid)
        measuring.set()
        time.sleep(max(0.0, end - time.monotonic()))
        for peer in peers:
            peer.cpu1, peer.t1 = cpu_seconds(peer.proc.pid), time.monotonic()
        for t in scrapers:
            t.join(interval + 1)
        for peer in peers:
            peer.threads1 = thread_counters(peer.pid)
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


def cores(p: Peer) -> float:
    return (p.cpu1 - p.cpu0) / (p.t1 - p.t0)


def table(peers: list) -> list:
    grouped, per_process = peers[0], peers[1]
    lines = ["| exporter | CPU cores | × process-exporter (grouped / per process) | peak RSS | "
             "× process-exporter's (per process) | series | scrapes ok / failed | scrape p50 | "
             "ready (all probes ok) | CPU-s to ready | sampler µs CPU per target-sample (loop) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in peers:
        c = cores(p)
        ratio = "—" if p.name.startswith("process-exporter") else \
            f"{c / cores(grouped):.2f} / {c / cores(per_process):.2f}"
        lat = statistics.median(s[0] for s in p.scrapes) * 1000 if p.scrapes else float("nan")
        nseries = statistics.median(s[1] for s in p.scrapes) if p.scrapes else 0
        ready = "not within the timeout" if p.ready_s is None else f"{p.ready_s:.1f} s"
        ready_cpu = "–" if p.ready_cpu is None else f"{p.ready_cpu:.2f}"
        cost = sampler_cost(p.threads0, p.threads1) if "sampled" in p.name else None
        per = "–" if cost is None else (f"{cost[0]:.1f} ({p.loop}, {cost[1]:,} reads"
                                        + ("" if cost[2] is None else f", {cost[2]:.0%} in the kernel") + ")")
        lines.append(f"| {p.name} | {c:.4f} | {ratio} | {p.hwm_mb:.1f} MB | "
                     f"{p.hwm_mb / per_process.hwm_mb:.2f} | {nseries:,.0f} | {len(p.scrapes)} / {p.failed} | "
                     f"{lat:.1f} ms | {ready} | {ready_cpu} | {per} |")
    return lines


def start_hogs(n: int, nice: int) -> list:
    """n processes spinning in sh (a few hundred kB each), at `nice`: the saturated node."""
    return [subprocess.Popen(["nice", "-n", str(nice), "sh", "-c", "while :; do :; done"],
                             preexec_fn=_die_with_parent) for _ in range(n)]


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally) on SIGTERM too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=10)
    ap.add_argument("--spinning", type=int, default=10, help="processes with 3 spinning threads")
    ap.add_argument("--python", default="3.12", help="pyenv CPython version of the workers")
    ap.add_argument("--scrape-interval", type=float, nargs="+", default=[5.0, 15.0],
                    help="one phase per interval, each with freshly started exporters")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured time per run and interval")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--startup-timeout", type=float, default=90.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--saturate", type=int, default=0, metavar="N",
                    help="N CPU hogs running throughout (the saturated node: --saturate 150 on 2 cores)")
    ap.add_argument("--saturate-nice", type=int, default=19,
                    help="the hogs' nice value (19: they take what the exporters leave; 0: they compete "
                         "with the exporters thread for thread)")
    ap.add_argument("--image", action=argparse.BooleanOptionalAction, default=True,
                    help="also the exporter from the container image (needs tests/setup/image.sh)")
    args = ap.parse_args(argv)
    pe_binary = ensure_process_exporter()
    python = pyenv_python(args.python)
    pyver = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                           capture_output=True, text=True).stdout.strip()
    # The exporter from bytecode, as an installed one runs (pip compiles at install): a checkout
    # run with PYTHONDONTWRITEBYTECODE would compile every module at every start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "exporter")], check=True)
    command = " ".join([".venv/bin/python", "bench/bench_peers.py"] + (argv if argv is not None else sys.argv[1:]))
    print(f"command: {command}")
    results: dict = {}
    hogs = []
    try:
        if args.saturate:
            hogs = start_hogs(args.saturate, args.saturate_nice)
            time.sleep(5)  # the load average starts moving
        with tempfile.TemporaryDirectory() as d:
            for i in range(args.runs):
                for interval in args.scrape_interval:
                    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                    peers, load0, load1 = run_once(args, pe_binary, python, Path(d), interval)
                    results.setdefault(interval, []).append(peers)
                    hogged = (f"; {args.saturate} CPU hogs at nice {args.saturate_nice} throughout"
                              if args.saturate else "")
                    print(f"\nRun {i + 1} of {args.runs}, scraped every {interval:g} s, {when}: "
                          f"{args.processes} CPython {pyver} processes x {args.threads} threads "
                          f"({args.spinning} with 3 spinning threads){hogged}, {args.seconds:g} s measured "
                          f"after {args.warmup:g} s; process-exporter {process_exporter_version(pe_binary)}; "
                          f"{os.cpu_count()} CPUs; load average {load0} before the workers started, {load1} "
                          f"at the end\n")
                    print("\n".join(table(peers)), flush=True)
    finally:
        for h in hogs:
            h.kill()
        for h in hogs:
            h.wait()
    for interval, runs in results.items():
        if len(runs) > 1:
            spread(interval, runs)
    return 0


def spread(interval: float, results: list) -> None:
    print(f"\nSpread over the runs at {interval:g} s scrapes (min–max):\n")
    print("| exporter | CPU cores | × process-exporter per process | peak RSS (MB) | CPU-s to ready | ready (s) |")
    print("|---|---|---|---|---|---|")
    for j, name in enumerate(p.name for p in results[0]):
        rows = [r[j] for r in results]
        cs = [cores(p) for p in rows]
        ratio = [c / cores(r[1]) for c, r in zip(cs, results)]
        hwm = [p.hwm_mb for p in rows]
        rc = [p.ready_cpu for p in rows if p.ready_cpu is not None]
        rs = [p.ready_s for p in rows if p.ready_s is not None]

        def span(xs, fmt):
            return "–" if not xs else f"{min(xs):{fmt}}–{max(xs):{fmt}}"
        print(f"| {name} | {span(cs, '.4f')} | {span(ratio, '.2f')} | {span(hwm, '.1f')} | "
              f"{span(rc, '.2f')} | {span(rs, '.1f')} |")


if __name__ == "__main__":
    raise SystemExit(main())
