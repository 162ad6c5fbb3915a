"""Derive stage: a contention score and a verdict from one process's figures over one window.

Pure functions over frozen dataclasses, no I/O. Two ways to score:

* ``gil_state``: the sampler read the GIL itself (held flag, waiters, switch number); the score is
  the fraction of the window the GIL was held while at least one thread waited for it.
* ``procfs``: the target's memory cannot be read; the score is estimated from /proc alone (thread
  count, CPU used, context-switch rates). See docs/procfs-heuristic.md for the reasoning and the
  measurements behind every constant below.

Free-threaded builds (GIL disabled) get no score at all.
"""
from __future__ import annotations

from dataclasses import dataclass

#: CPython's default switch interval (sys.getswitchinterval()), used when it was not read.
DEFAULT_INTERVAL = 0.005


@dataclass(frozen=True)
class Figures:
    """One process over one window."""

    threads: int
    cpu_cores: float  # cores used over the window (1.0 = one full core)
    voluntary_per_second: float  # context switches summed over every thread
    involuntary_per_second: float
    host_cpus: int
    gil_enabled: bool | None = None  # None = unknown (no memory probe)
    interval_seconds: float | None = None  # GIL switch interval, if read
    held_ratio: float | None = None  # fraction of window the GIL was held
    waiting_threads: float | None = None  # mean waiters
    switches_per_second: float | None = None  # GIL handoffs/s
    contended_ratio: float | None = None  # fraction of window held with >=1 waiter


@dataclass(frozen=True)
class Verdict:
    contended: bool
    kind: str  # see KINDS
    headline: str  # one line for a person
    advice: tuple[str, ...]  # what to change, concrete


KINDS = (
    "cpu_threads_serialized",
    "io_starved_by_cpu",
    "gil_released",
    "free_threaded",
    "idle",
    "no_contention",
)


def _clamp(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    if x != x:  # NaN
        return lo
    return lo if x < lo else hi if x > hi else x


def _ramp(x: float, zero_at: float, one_at: float) -> float:
    """0 at `zero_at`, 1 at `one_at`, linear in between (works both ways round)."""
    return _clamp((x - zero_at) / (one_at - zero_at))


def _interval(f: Figures) -> float:
    if f.interval_seconds is not None and f.interval_seconds > 0:
        return f.interval_seconds
    return DEFAULT_INTERVAL


# ---------------------------------------------------------------------------------------------
# Scores


def gil_state_score(f: Figures) -> float | None:
    """Fraction of the window the GIL was held with at least one waiter, clamped to [0, 1].

    None when the GIL was not read (or the build has no GIL).
    """
    if f.gil_enabled is False or f.contended_ratio is None:
        return None
    return _clamp(f.contended_ratio)


# Constants of the procfs heuristic, measured in docs/procfs-heuristic.md.
#: Waiter evidence: voluntary switches/s times the switch interval ("waiter-equivalents": a thread
#: waiting for the GIL wakes about once per interval). Below WAKE_NONE nothing waits, from
#: WAKE_FULL on at least one thread waits all the time.
WAKE_NONE = 0.25
WAKE_FULL = 0.75
#: Busy evidence: the GIL can only be held (hence contended) while Python code runs, so the
#: contended fraction is at most about the CPU the process wants. What it wants is the cores it
#: used plus the time its threads sat preempted (a holder preempted on a loaded host still holds
#: the GIL): each involuntary switch counts PREEMPT_SECONDS (/proc/PID/task/*/schedstat run delay
#: per involuntary switch measured 0.35-2 ms on the GIL-bound workloads at load 3, 2.3-6 ms at
#: load 7.5 on 2 cores; an idle host has few involuntary switches, so this term then vanishes).
#: BUSY_FULL < 1 leaves further room.
PREEMPT_SECONDS = 0.002
BUSY_FULL = 0.6
#: Parallel evidence: threads serialized on one GIL use at most about one core. The CPU used beyond
#: PARALLEL_FROM cores must run without the GIL; at PARALLEL_NONE cores it is not GIL-bound at all.
PARALLEL_FROM = 1.15
PARALLEL_NONE = 1.6


def _wanted_cores(f: Figures) -> float:
    """Cores the process wanted: used, plus time its threads sat preempted (estimated)."""
    return f.cpu_cores + f.involuntary_per_second * PREEMPT_SECONDS


def procfs_factors(f: Figures) -> dict[str, float]:
    """The three factors of procfs_score, for explanation and debugging."""
    wake = f.voluntary_per_second * _interval(f)
    factors = {
        "waiter_equivalents": wake,
        "wake": _ramp(wake, WAKE_NONE, WAKE_FULL),
        "busy": _clamp(_wanted_cores(f) / BUSY_FULL),
        "serial": 1.0,
    }
    if f.host_cpus > 1:  # on one CPU nothing can run in parallel: no evidence either way
        factors["serial"] = 1.0 - _ramp(f.cpu_cores, PARALLEL_FROM, PARALLEL_NONE)
    if f.threads < 2:  # one thread cannot contend with itself
        factors["wake"] = 0.0
    return factors


def procfs_score(f: Figures) -> float:
    """Evidence of GIL contention in [0, 1] from /proc figures only (threads, cores, switch
    rates), read without touching the target's memory.

    It agrees with gil_state_score on which side of the verdict threshold a process lies, but is
    not an estimate of the contended fraction: clearly contended processes saturate at 1.0.

    score = wake x busy x serial, each in [0, 1]:
      wake   : some thread waits for the GIL (it wakes ~1/interval times a second)
      busy   : some thread runs Python code, i.e. can hold the GIL (cores used + preempted)
      serial : the process is capped near one core, not running in parallel in C code
    """
    fac = procfs_factors(f)
    return _clamp(fac["wake"] * fac["busy"] * fac["serial"])


def score(f: Figures) -> tuple[float | None, str]:
    """(value, method): "gil_state" when GIL figures exist, else "procfs"; (None, "none") when
    the build is free-threaded."""
    if f.gil_enabled is False:
        return None, "none"
    g = gil_state_score(f)
    if g is not None:
        return g, "gil_state"
    return procfs_score(f), "procfs"


# ---------------------------------------------------------------------------------------------
# Verdict

#: gil_state: handoffs per switch interval, per core wanted (cores used + preempted time, within
#: [STARVED_CORES_FLOOR, 1]) above which the GIL keeps going to threads that give it back quickly
#: (I/O threads around one CPU hog) instead of rotating between CPU-bound threads, which hand off
#: at most about once per interval. Measured at most 0.94 (cpu, json, 2-10 threads, 3.8-3.13,
#: idle to overloaded host) against at least 1.25 (starved).
STARVED_HANDOFFS_PER_INTERVAL = 1.1
#: procfs-only fallback (weaker, see docs/procfs-heuristic.md): voluntary switches per interval,
#: per thread besides one, per core used (floored). CPU-bound waiters wake about once per
#: interval; I/O threads also block on their own. Measured at most 1.39 (cpu, json) against
#: 1.58-3.4 (starved), except windows where the host left starved under 0.6 core (1.06-1.47).
STARVED_WAKES_PER_THREAD = 1.5
#: Below this many cores the host starves the process of CPU and every rate slows down with it:
#: rates are divided by max(cores, floor) so that such windows still classify.
STARVED_CORES_FLOOR = 0.5
IDLE_CORES = 0.05
#: gil_state: the GIL was held for at most this fraction of the CPU the process used: the rest
#: ran in C code with the GIL released.
RELEASED_HELD_PER_CORE = 0.5
#: procfs: more than about one core used means part of the work runs without the GIL.
RELEASED_CORES = PARALLEL_FROM


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


def _starved(f: Figures) -> bool:
    """Contended: I/O-like threads starved by one CPU-bound thread (True) or CPU-bound threads
    taking turns (False)."""
    iv = _interval(f)
    if f.switches_per_second is not None:
        wanted = _clamp(_wanted_cores(f), STARVED_CORES_FLOOR, 1.0)
        return f.switches_per_second * iv / wanted >= STARVED_HANDOFFS_PER_INTERVAL
    others = max(1, f.threads - 1)
    cores = max(f.cpu_cores, STARVED_CORES_FLOOR)
    return f.voluntary_per_second * iv / others / cores >= STARVED_WAKES_PER_THREAD


def _gil_released(f: Figures) -> bool:
    if f.held_ratio is not None:
        return (f.cpu_cores >= 2 * IDLE_CORES
                and _clamp(f.held_ratio) <= RELEASED_HELD_PER_CORE * min(f.cpu_cores, 1.0))
    return f.cpu_cores >= RELEASED_CORES and f.host_cpus > 1


def verdict(f: Figures, threshold: float = 0.5) -> Verdict:
    """What is going on with this process's GIL, and what to change."""
    iv = _interval(f)
    cores = f"{f.cpu_cores:.2f} of {f.host_cpus} cores"
    if f.gil_enabled is False:
        return Verdict(False, "free_threaded",
                       f"free-threaded build: no GIL to contend on ({f.threads} threads, {cores} used)",
                       ("The GIL is off: if threads still do not scale, look at other locks "
                        "(threading.Lock/RLock, queue.Queue, per-object locks on shared dicts and "
                        "lists, logging handlers, the allocator), e.g. with py-spy dump --native "
                        "or perf lock.",))
    value, method = score(f)
    assert value is not None
    how = "measured from the GIL" if method == "gil_state" else "estimated from /proc"
    probe = () if method == "gil_state" else (
        "This is estimated from /proc counters alone: give the exporter ptrace access to the "
        "target (CAP_SYS_PTRACE, or the same user with kernel.yama.ptrace_scope=0) to measure "
        "the GIL itself.",)
    if method == "gil_state":
        amount = f"GIL contended {value:.0%} of the time ({how})"
    else:  # evidence, not a fraction of time
        amount = f"GIL contention score {value:.2f} ({how})"
    threads = f"{f.threads} thread{'' if f.threads == 1 else 's'}"
    iv_text = _ms(iv) if f.interval_seconds else f"{_ms(iv)} unless changed"
    held_idle = f.held_ratio is None or f.held_ratio < IDLE_CORES
    if value < threshold and f.cpu_cores < IDLE_CORES and held_idle:
        return Verdict(False, "idle",
                       f"idle: {cores} used, {threads}, {amount}",
                       ())
    if value >= threshold:
        if _starved(f):
            return Verdict(True, "io_starved_by_cpu",
                           f"I/O threads starved by a CPU-bound thread: {amount}, {threads} on "
                           f"{cores}",
                           ("Move the CPU-bound work out of this process, or off the I/O threads "
                            "and event loop onto a process pool: "
                            "loop.run_in_executor(concurrent.futures.ProcessPoolExecutor(), fn, "
                            "*args) from asyncio, or executor.submit from threads.",
                            f"Every wake-up of an I/O thread waits up to the switch interval "
                            f"({iv_text}) for the GIL: sys.setswitchinterval(0.001) gets them the "
                            f"GIL sooner but costs more switching overhead in the CPU thread; it "
                            f"is a mitigation, not a fix.") + probe)
        return Verdict(True, "cpu_threads_serialized",
                       f"CPU-bound Python threads serialized on the GIL: {amount}, {threads} "
                       f"sharing {cores}",
                       ("Threads add no CPU throughput here: move the CPU-bound work to processes "
                        "(concurrent.futures.ProcessPoolExecutor or multiprocessing.Pool).",
                        "Or move the hot loop to native code that releases the GIL (NumPy, "
                        "Cython `with nogil`, a C/Rust extension), or run on a free-threaded "
                        "build (python3.13t and later).",
                        f"sys.setswitchinterval (now {iv_text}) only changes how often threads "
                        f"take turns, not the total throughput; raising it lowers switching "
                        f"overhead, lowering it improves latency.") + probe)
    if _gil_released(f):
        held = "" if f.held_ratio is None else f", GIL held {f.held_ratio:.0%}"
        return Verdict(False, "gil_released",
                       f"threads run in parallel with the GIL mostly released: {cores}{held}, "
                       f"{amount}",
                       ("Threads are fine here: the work runs in C code that releases the GIL. "
                        "Look elsewhere for slowness (I/O, locks, CPU quota, the host).",))
    return Verdict(False, "no_contention",
                   f"no GIL contention: {amount}, {threads}, {cores}",
                   ())
