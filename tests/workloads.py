"""Real threaded CPython workloads that tests start as separate processes.

Each workload is a small script run by a chosen interpreter. It prints "ready"
once its threads run, then works until killed. Tests read the process from
outside, exactly as the exporter does in production.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

_PRELUDE = """
import os, sys, threading, time
N = int(os.environ.get("WORKLOAD_THREADS", "3"))
if os.environ.get("WORKLOAD_SWITCH_INTERVAL"):
    sys.setswitchinterval(float(os.environ["WORKLOAD_SWITCH_INTERVAL"]))
def start(fn, n=N):
    ts = [threading.Thread(target=fn, daemon=True) for _ in range(n)]
    for t in ts:
        t.start()
    return ts
def ready():
    sys.stdout.write("ready\\n"); sys.stdout.flush()
def forever():
    while True:
        time.sleep(3600)
"""

SCRIPTS = {
    # N pure-Python CPU threads: serialized on the GIL.
    "cpu": """
def work():
    x = 0
    while True:
        for i in range(10000):
            x += i * i
start(work); ready(); forever()
""",
    # json.dumps holds the GIL too.
    "json": """
import json
doc = {"k%d" % i: [i, str(i), {"v": i * 1.5}] for i in range(200)}
def work():
    while True:
        json.dumps(doc)
start(work); ready(); forever()
""",
    # hashlib releases the GIL on buffers over 2 KiB.
    "hashlib": """
import hashlib
buf = os.urandom(2 * 1024 * 1024)
def work():
    while True:
        hashlib.sha256(buf).digest()
start(work); ready(); forever()
""",
    "zlib": """
import zlib
buf = os.urandom(1024 * 1024)
def work():
    while True:
        zlib.compress(buf, 1)
start(work); ready(); forever()
""",
    "sleep": """
def work():
    while True:
        time.sleep(0.005)
start(work); ready(); forever()
""",
    # One CPU thread alone: GIL held, nobody waits.
    "single": """
def work():
    x = 0
    while True:
        for i in range(10000):
            x += i * i
start(work, 1); ready(); forever()
""",
    # One CPU thread starving I/O-like threads that wake every 2 ms.
    "starved": """
def cpu():
    x = 0
    while True:
        for i in range(10000):
            x += i * i
def io():
    while True:
        time.sleep(0.002)
        sum(range(50))
start(cpu, 1); start(io); ready(); forever()
""",
    # Threads that start and end all the time (counter monotonicity).
    "churn": """
def short():
    x = 0
    for i in range(20000):
        x += i
    time.sleep(0.01)
def spawner():
    while True:
        ts = start(short, N)
        for t in ts:
            t.join()
start(spawner, 1); ready(); forever()
""",
    # A step: idle for WORKLOAD_STEP_DELAY seconds, then N pure-Python CPU threads.
    "step": """
def work():
    time.sleep(float(os.environ.get("WORKLOAD_STEP_DELAY", "5")))
    x = 0
    while True:
        for i in range(10000):
            x += i * i
start(work); ready(); forever()
""",
    # Idle: only the main thread, asleep.
    "idle": """
ready(); forever()
""",
    # A hot function among waiters: N threads spend ~5/6 of their time in hot(), the rest in
    # cool(); whoever holds the GIL is mostly in hot() (the stack sampler's comparison target).
    "hot": """
def hot(n):
    x = 0
    for i in range(n):
        x += i * i  # HOT-LINE
    return x
def cool(n):
    x = 0
    for i in range(n):
        x ^= i  # COOL-LINE
    return x
def work():
    while True:
        hot(25000)
        cool(5000)
start(work); ready(); forever()
""",
    # Stacks whose depth changes all the time (0..40 frames of down()): torn reads happen.
    "recursive": """
def down(n):
    if n:
        return down(n - 1)  # DOWN-LINE
    x = 0
    for i in range(300):
        x += i
    return x
def work():
    i = 0
    while True:
        down(i % 40)  # WORK-LINE
        i += 1
start(work); ready(); forever()
""",
    # One thread holds the GIL for good inside one C call (sum() never lets it go), called
    # from known lines, while N threads wait: its Python stack stands still for reading.
    "pinned": """
import itertools
def hold():
    ready()
    return sum(itertools.repeat(1, 10 ** 15))  # PINNED-LINE
class Outer:
    def middle(self):
        return hold()  # MIDDLE-LINE
def spin():
    x = 0
    while True:
        x += 1
start(spin)
time.sleep(0.2)
threading.Thread(target=Outer().middle, name="pinned-holder", daemon=True).start()
forever()
""",
    # The frozen service: one thread calls a C function that blocks with the GIL held (libc's
    # usleep through ctypes.PyDLL, as a badly wrapped C library or driver does), again and again,
    # while N request threads want the GIL every few milliseconds. After "ready", one line gives
    # the blocking thread's name and native TID ("frozen-holder=123").
    "frozen": """
import ctypes
libc = ctypes.PyDLL(None)
def hold():
    while True:
        libc.usleep(500000)  # FROZEN-CALL: 0.5 s in the kernel, GIL held
def request():
    while True:
        time.sleep(0.003)
        sum(range(100))
start(request)
holder = threading.Thread(target=hold, name="frozen-holder", daemon=True)
holder.start()
time.sleep(0.1); ready()
sys.stdout.write("frozen-holder=%d\\n" % holder.native_id); sys.stdout.flush()
forever()
""",
    # The same call through ctypes.CDLL, which releases the GIL around it: idle, not frozen.
    "released": """
import ctypes
libc = ctypes.CDLL(None)
def hold():
    while True:
        libc.usleep(500000)
def request():
    while True:
        time.sleep(0.003)
        sum(range(100))
start(request)
threading.Thread(target=hold, name="released-caller", daemon=True).start()
time.sleep(0.1); ready()
forever()
""",
    # One CPU-bound thread among N threads that sleep and wake every 20 ms: the hot one holds the
    # GIL, the sleepers wait for it each time they wake. After "ready", one line gives each
    # thread's name and native TID ("hot-worker=123 sleeper-0=124 ...").
    "sleepers": """
def hot():
    x = 0
    while True:
        for i in range(10000):
            x += i * i
def sleeper():
    while True:
        time.sleep(0.02)
        sum(range(200))
ts = [threading.Thread(target=hot, name="hot-worker", daemon=True)]
ts += [threading.Thread(target=sleeper, name="sleeper-%d" % i, daemon=True) for i in range(N)]
for t in ts:
    t.start()
time.sleep(0.1); ready()
sys.stdout.write(" ".join("%s=%d" % (t.name, t.native_id) for t in ts) + "\\n"); sys.stdout.flush()
forever()
""",
}


# Three long-lived CPU threads ("steady-0".."steady-2") while a spawner starts N short-lived
# threads after one another, each holding the GIL for a moment: thread churn. Prints the
# steady threads' TIDs after "ready", as "sleepers" does.
SCRIPTS["churn_steady"] = """
def cpu():
    x = 0
    while True:
        for i in range(10000):
            x += i * i
def short():
    x = 0
    for i in range(20000):
        x += i
def spawner():
    while True:
        ts = [threading.Thread(target=short) for _ in range(N)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
steady = [threading.Thread(target=cpu, name="steady-%d" % i, daemon=True) for i in range(3)]
for t in steady:
    t.start()
threading.Thread(target=spawner, name="spawner", daemon=True).start()
time.sleep(0.1); ready()
sys.stdout.write(" ".join("%s=%d" % (t.name, t.native_id) for t in steady) + "\\n"); sys.stdout.flush()
forever()
"""


# Three threads ("shift-0".."shift-2"): 0 and 1 burn CPU, 2 sleeps, until SIGUSR1 (SIGUSR2)
# makes 0 (1) sleep and 2 burn CPU: the busiest threads change. Prints the TIDs after "ready".
SCRIPTS["shift"] = """
import signal
hot = [threading.Event() for _ in range(3)]
def work(i):
    x = 0
    while True:
        if hot[i].is_set():
            for k in range(10000):
                x += k * k
        else:
            time.sleep(0.01)
def shift(signum, _frame):
    hot[0 if signum == signal.SIGUSR1 else 1].clear(); hot[2].set()
signal.signal(signal.SIGUSR1, shift)
signal.signal(signal.SIGUSR2, shift)
hot[0].set(); hot[1].set()
ts = [threading.Thread(target=work, args=(i,), name="shift-%d" % i, daemon=True) for i in range(3)]
for t in ts:
    t.start()
time.sleep(0.1); ready()
sys.stdout.write(" ".join("%s=%d" % (t.name, t.native_id) for t in ts) + "\\n"); sys.stdout.flush()
forever()
"""


def thread_ids(w: Workload) -> dict[str, int]:
    """{thread name: native TID} from the line a workload prints right after "ready"
    ("sleepers"). Read without select(): reading "ready" may have buffered it already."""
    line = w.proc.stdout.readline()
    pairs = [p.partition("=") for p in line.split()]
    if not pairs:
        raise RuntimeError(f"workload {w.name} printed no thread ids: {line!r}")
    return {name: int(tid) for name, _, tid in pairs}


@dataclass
class Workload:
    name: str
    proc: subprocess.Popen
    python: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def script(name: str) -> str:
    """The full source of workload `name` (prelude included), for `python -c`."""
    return _PRELUDE + textwrap.dedent(SCRIPTS[name])


def start_workload(name: str, python: str | None = None, threads: int = 3,
                   switch_interval: float | None = None, argv_tag: str = "",
                   user: str | None = None, timeout: float = 20.0) -> Workload:
    """Start workload `name` under interpreter `python` and wait until it runs.

    `argv_tag` is appended to argv so that configs can match this process by cmdline.
    """
    python = python or sys.executable
    code = script(name)
    env = dict(os.environ, WORKLOAD_THREADS=str(threads))
    env.pop("PYTHONPATH", None)
    if switch_interval is not None:
        env["WORKLOAD_SWITCH_INTERVAL"] = repr(switch_interval)
    argv = [python, "-u", "-c", code, "gil-workload", name]
    if argv_tag:
        argv.append(argv_tag)
    kwargs = {}
    if user is not None:
        kwargs["user"] = user
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, text=True, **kwargs)
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready" or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"workload {name} under {python} did not start: {line!r}")
    return Workload(name, proc, python)


def pyenv_pythons(min_version: tuple[int, int] = (3, 8)) -> dict[str, str]:
    """Map "3.X" -> interpreter path for every CPython that pyenv has installed.

    Falls back to the running interpreter when pyenv is absent.
    """
    found: dict[str, str] = {}
    root = os.environ.get("PYENV_ROOT")
    if not root and shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    root = root or str(Path.home() / ".pyenv")
    versions = Path(root) / "versions"
    if versions.is_dir():
        for d in sorted(versions.iterdir()):
            parts = d.name.split(".")
            if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
                continue
            if (int(parts[0]), int(parts[1])) < min_version:
                continue
            exe = d / "bin" / "python"
            if exe.exists():
                found[f"{parts[0]}.{parts[1]}"] = str(exe)
    if not found:
        found[f"{sys.version_info[0]}.{sys.version_info[1]}"] = sys.executable
    return dict(sorted(found.items(), key=lambda kv: tuple(int(p) for p in kv[0].split("."))))


def task_ctx_switches(pid: int) -> tuple[int, int]:
    """Ground truth for tests: voluntary/involuntary switches summed over /proc/PID/task/*/status."""
    vol = invol = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
        except FileNotFoundError:
            continue
    return vol, invol


@contextlib.contextmanager
def cpu_hogs(n: int):
    """n processes spinning on a CPU each (`python3 -c 'while 1: pass'`), a busy host for the
    test's duration; ended by PID after."""
    procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            kill_quietly(p.pid)
            p.wait(timeout=10)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# Subinterpreters with their own GIL (3.14+: concurrent.interpreters). WORKLOAD_THREADS CPU
# threads inside each of 2 subinterpreters: contended inside each one, parallel across them.
_SPIN_IN_SUBINTERPRETER = """
code = '''
import threading
def spin():
    x = 0
    while True:
        for i in range(10000):
            x += i
for _ in range(%d):
    threading.Thread(target=spin).start()
'''
"""
SCRIPTS["subinterpreters"] = """
from concurrent import interpreters
""" + _SPIN_IN_SUBINTERPRETER + """
# Both interpreters exist before any of their threads starts: creating one while another's
# threads start was seen to hang 3.14.10 (main thread parked in create(), never woken).
subs = [interpreters.create() for _ in range(2)]
for sub in subs:
    sub.exec(code % N)
time.sleep(0.5); ready(); forever()
"""

# The same on 3.12, through its private module (3.12 has per-interpreter GILs, not yet
# concurrent.interpreters): isolated=True gives each interpreter its own GIL.
SCRIPTS["subinterpreters_312"] = """
import _xxsubinterpreters as _interpreters
""" + _SPIN_IN_SUBINTERPRETER + """
subs = [_interpreters.create(isolated=True) for _ in range(2)]
for sub in subs:
    _interpreters.run_string(sub, code % N)
time.sleep(0.5); ready(); forever()
"""

# 3.14's concurrent.futures.InterpreterPoolExecutor: every worker runs its tasks in an
# interpreter with its own GIL. "pool_contended": one worker whose task starts N CPU threads
# inside its interpreter (contended inside that interpreter); "pool_parallel": N workers, one CPU
# task each (one thread per interpreter: they run in parallel, nothing contends).
_POOL = """
from concurrent.futures import InterpreterPoolExecutor
def spin():
    x = 0
    while True:
        for i in range(10000):
            x += i
def spin_threads(n):
    import threading            # runs in the worker's interpreter: nothing from here but itself
    def spin():
        x = 0
        while True:
            for i in range(10000):
                x += i
    ts = [threading.Thread(target=spin) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
"""
SCRIPTS["pool_contended"] = _POOL + """
pool = InterpreterPoolExecutor(max_workers=1)
pool.submit(spin_threads, N)
time.sleep(1); ready(); forever()
"""
SCRIPTS["pool_parallel"] = _POOL + """
pool = InterpreterPoolExecutor(max_workers=N)
for _ in range(N):
    pool.submit(spin)
time.sleep(1); ready(); forever()
"""
