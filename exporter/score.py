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

import re
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
    gil_sampled_seconds: float | None = None  # time the GIL figures above cover
    # Per-thread CPU from /proc/PID/task/TID/schedstat (None when the kernel has none):
    run_delay_cores: float | None = None  # thread-seconds runnable but not running, per second
    busy_threads: float | None = None  # how many threads share the CPU used (1.0: one does it all)
    top_thread_share: float | None = None  # the busiest thread's share of the CPU used
    host_idle_cpus: float | None = None  # CPUs of the host left idle over the window
    # Subinterpreters with a GIL of their own: with gils > 1 the GIL figures above are those of
    # the most contended interpreter's GIL (`interpreter`, its id), and gils_held is the mean
    # number of GILs held at once (more than 1: interpreters ran Python code in parallel).
    gils: int = 1
    interpreter: int | None = None
    gils_held: float | None = None
    # The same lower bound as held_off_cpu(), thread by thread, where the GIL's holder at each
    # sample was read (the per-thread table, threadtable.held_off_cpu); None when not.
    held_off_cpu_threads: float | None = None


@dataclass(frozen=True)
class Gain:
    """What running the contended threads as processes (or on a free-threaded build) would buy,
    from the figures measured over the window (see `gain`)."""

    demand_threads: float  # threads that wanted the GIL on average (holding or waiting)
    spare_cores: float  # cores the host could give: the process's own plus the idle ones
    spare_measured: bool  # False: the host's idle CPU was not measured, spare = all its cores
    ratio: float  # up to this many times the throughput


@dataclass(frozen=True)
class Holder:
    """The thread that held the GIL while off the CPU, as far as it could be read."""

    tid: int
    name: str
    blocked_in: str = ""  # the system call or kernel wait it sat in ("" when not readable)
    frame: str = ""  # the Python frame that made the call (with --stacks)


@dataclass(frozen=True)
class Verdict:
    contended: bool
    kind: str  # see KINDS
    headline: str  # one line for a person
    advice: tuple[str, ...]  # what to change, concrete
    gain: Gain | None = None  # contended kinds where processes would help


KINDS = (
    "gil_held_while_blocked",
    "cpu_threads_serialized",
    "io_starved_by_cpu",
    "contended_unclassified",
    "unknown",
    "gil_released",
    "interpreters_parallel",
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
    """The fraction of time the GIL was held while at least one other thread waited for it,
    over the window, clamped to [0, 1].

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
#: Without per-thread run delay (no schedstat in the kernel), each involuntary switch counts this
#: much preempted time (measured 0.35-6 ms per switch on GIL-bound workloads under load).
PREEMPT_SECONDS = 0.002
#: Parallel evidence: threads serialized on one GIL use at most about one core. The CPU used beyond
#: PARALLEL_FROM cores must run without the GIL; at PARALLEL_NONE cores it is not GIL-bound at all.
PARALLEL_FROM = 1.15
PARALLEL_NONE = 1.6
#: The GIL-capped signature: the process used at least CAPPED_CORES while the host had at least
#: CAPPED_HOST_IDLE CPUs idle, so nothing but the process itself kept it near one core.
CAPPED_CORES = 0.9
CAPPED_HOST_IDLE = 0.5
#: ... and its threads slept at most this often per second of CPU they used: threads taking turns
#: on the GIL run for a good part of an interval between waits (measured 530-2,800 voluntary
#: switches per core-second on CPU-bound servers, pools and loops), while a busy I/O server near
#: one core blocks after every small request (3,800-13,900 on gunicorn serving sqlite queries at
#: 0.87-1.0 core; 2,900 at 0.64 core).
CAPPED_MAX_WAKES_PER_CORE = 3000
#: The verdict threshold the procfs number must stay clear of unless the signature above holds.
THRESHOLD = 0.5


def _wanted_cores(f: Figures) -> float:
    """Cores the process wanted: used, plus the time its threads sat runnable but not running
    (measured from schedstat; estimated from involuntary switches without it). A preempted
    holder keeps the GIL, so the GIL can be held (and contended) at most this fraction of the
    time."""
    delay = f.run_delay_cores
    if delay is None:
        delay = f.involuntary_per_second * PREEMPT_SECONDS
    return f.cpu_cores + delay


def procfs_factors(f: Figures) -> dict[str, float]:
    """The factors of procfs_score, for explanation and debugging."""
    wake = f.voluntary_per_second * _interval(f)
    factors = {
        "waiter_equivalents": wake,
        "wake": _ramp(wake, WAKE_NONE, WAKE_FULL),
        "wanted_cores": _wanted_cores(f),
        "serial": 1.0,
        "capped": 0.0,
    }
    if f.host_cpus > 1:  # on one CPU nothing can run in parallel: no evidence either way
        factors["serial"] = 1.0 - _ramp(f.cpu_cores, PARALLEL_FROM, PARALLEL_NONE)
    if f.threads < 2:  # one thread cannot contend with itself
        factors["wake"] = 0.0
    if (f.cpu_cores >= CAPPED_CORES and f.host_idle_cpus is not None
            and f.host_idle_cpus >= CAPPED_HOST_IDLE
            and f.voluntary_per_second <= CAPPED_MAX_WAKES_PER_CORE * f.cpu_cores):
        factors["capped"] = 1.0
    return factors


def procfs_score(f: Figures) -> float | None:
    """Evidence of GIL contention in [0, 1] from /proc figures only (threads, CPU, context-switch
    rates, per-thread run delay, host idle CPU), read without touching the target's memory;
    None ("unknown") when /proc cannot tell.

    The GIL can only be contended while it is held, and it is held at most while some thread
    runs or sits preempted: `wanted_cores` bounds the contended fraction from above. So:
      * nothing wakes like a GIL waiter, or one thread, or the process runs in parallel beyond
        one core (C code without the GIL): no contention, a low number;
      * wanted cores below THRESHOLD: contention cannot reach the threshold; the number is
        wake x wanted, below THRESHOLD;
      * capped near one core while the host had CPUs idle, threads waking like GIL waiters
        but not after every small piece of work: contended, wake x serial (1.0 when clear);
      * anything else - a busy I/O server, or any busy process on a saturated host - looks the
        same from /proc as GIL contention: None.
    Measured on real servers and synthetic loops in docs/procfs-heuristic.md: no I/O-bound
    window scores at or above THRESHOLD.
    """
    fac = procfs_factors(f)
    if fac["wake"] == 0.0 or fac["serial"] == 0.0:
        return 0.0
    if fac["wanted_cores"] < THRESHOLD:
        return _clamp(fac["wake"] * fac["wanted_cores"] * fac["serial"])
    if fac["capped"]:
        return _clamp(fac["wake"] * fac["serial"])
    return None


def score(f: Figures) -> tuple[float | None, str]:
    """(value, method): "gil_state" when GIL figures exist, else "procfs", whose value is None
    when /proc cannot tell ("unknown"); (None, "none") when the build is free-threaded."""
    if f.gil_enabled is False:
        return None, "none"
    g = gil_state_score(f)
    if g is not None:
        return g, "gil_state"
    return procfs_score(f), "procfs"


# ---------------------------------------------------------------------------------------------
# Verdict

#: One thread did at least this share of the process's CPU: the others, waiting for the GIL,
#: are starved by it. Measured: one CPU thread beside I/O threads 0.97-0.99; CPU-bound threads,
#: request handlers and pool workers taking turns 0.16-0.50 (2-40 threads).
STARVED_TOP_SHARE = 0.65
IDLE_CORES = 0.05
#: gil_state: the GIL was held for at most this fraction of the CPU the process used: the rest
#: ran in C code with the GIL released.
RELEASED_HELD_PER_CORE = 0.5
#: gil_state: ... and the work that wanted no GIL (the cores wanted, used or waited for, beyond
#: the time held) came to at least half a core. An I/O-bound server spends its ~0.1 cores
#: largely in the kernel's socket calls, with the GIL released too: nothing worth naming.
RELEASED_MIN_CORES = 0.5
#: procfs: more than about one core used means part of the work runs without the GIL.
RELEASED_CORES = PARALLEL_FROM

#: Request servers recognised on the command line, for advice that names their own settings.
#: (pattern searched in argv, what the threads are, how to get processes instead)
SERVERS = (
    (re.compile(r"\bgunicorn\b"), "request handlers",
     "run more gunicorn worker processes with fewer threads each (gunicorn --workers N "
     "--threads 1-2, N about the cores you can give it)"),
    (re.compile(r"\buvicorn\b|\bhypercorn\b|\bfastapi\b"), "request handlers",
     "sync endpoints run in one process's thread pool: run more worker processes "
     "(uvicorn --workers N, or gunicorn -k uvicorn.workers.UvicornWorker --workers N), or move the "
     "CPU work to a ProcessPoolExecutor"),
    (re.compile(r"\bwaitress\b"), "request handlers",
     "waitress serves from one process: run several waitress processes behind a load "
     "balancer, or serve the app with gunicorn --workers N"),
    (re.compile(r"\buwsgi\b"), "request handlers",
     "run more uWSGI processes with fewer threads each (--processes N --threads 1-2)"),
    (re.compile(r"\bcelery\b"), "tasks",
     "use the prefork pool (celery worker --pool prefork --concurrency N) instead of threads"),
)


def _server(cmdline: str) -> tuple[str, str] | None:
    for pattern, what, advice in SERVERS:
        if pattern.search(cmdline):
            return what, advice
    return None


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


def _gil_released(f: Figures) -> bool:
    if f.held_ratio is not None:
        held = _clamp(f.held_ratio)
        return (_wanted_cores(f) - held >= RELEASED_MIN_CORES
                and held <= RELEASED_HELD_PER_CORE * min(f.cpu_cores, 1.0))
    return f.cpu_cores >= RELEASED_CORES and f.host_cpus > 1


def _probe_advice(probe: str, detail: str, can_ptrace: bool | None) -> tuple[str, ...]:
    """Why the GIL was not measured, and what would let the exporter measure it."""
    why = f"The GIL probe is unavailable ({probe}{': ' + detail if detail else ''})"
    if probe == "permission_denied":
        if can_ptrace:
            return (why + ", although the exporter has CAP_SYS_PTRACE: a target of another uid "
                    "also needs CAP_DAC_READ_SEARCH (its /proc/PID/mem is mode 0600, owned by its "
                    "uid; the Helm chart adds both), else a Yama ptrace_scope of 3, a "
                    "seccomp/AppArmor/SELinux policy, or a target that is not dumpable forbids "
                    "reading its memory.",)
        return (why + ": give the exporter ptrace access to the target (CAP_SYS_PTRACE, and "
                "CAP_DAC_READ_SEARCH for a target of another uid; or the same user with "
                "kernel.yama.ptrace_scope=0) to measure the GIL itself.",)
    if probe in ("musl",):
        return (why + ": musl keeps condition-variable waiters where they cannot be counted; "
                "the figures come from /proc alone.",)
    if probe == "disabled":
        return (why + ": set sampling.enabled: true to measure the GIL itself.",)
    return (why + "; the figures come from /proc alone. If this is a standard CPython build, "
            "please report its version and exe.",)


#: The GIL was held while its holder was off the CPU (neither running nor runnable) for at
#: least this share of the time it was held: the holder blocked with the GIL held. Measured:
#: a ctypes.PyDLL call blocking in the kernel 0.93-1.00; CPU-bound threads 0.00-0.05 (the CPU
#: and run delay the process had cover the time held).
BLOCKED_HELD_SHARE = 0.5


def held_off_cpu(f: Figures) -> float | None:
    """A lower bound of the fraction of the window the GIL was held while its holder was on no
    CPU and waiting for none (asleep or blocked in the kernel): the time held beyond every
    thread's CPU and run delay together. None when the GIL was not read."""
    if f.held_ratio is None or f.gil_enabled is False:
        return None
    # Both are lower bounds: the larger holds. The process's counts the run delay of every
    # thread, waiters included, which a loaded host makes large; the per-thread one does not.
    by_threads = min(f.held_off_cpu_threads or 0.0, f.held_ratio)
    return max(_clamp(f.held_ratio - _wanted_cores(f)), by_threads)


def thread_held_blocked(held: float | None, cpu: float | None,
                        run_delay: float | None = None) -> bool:
    """One thread's shares over a window (of the sampled time, of one core): it held the GIL for
    at least half that time while on no CPU and waiting for none (`run_delay`, where measured),
    the same rule as the process's verdict."""
    return (bool(held) and cpu is not None
            and held - cpu - (run_delay or 0.0) >= BLOCKED_HELD_SHARE * held)


def gain(f: Figures) -> Gain | None:
    """Up to how many times the throughput processes (or a free-threaded build) would give:
    min(threads that wanted the GIL, cores the host can spare) over the one core's worth of
    Python the GIL let run (the held ratio). None when the GIL was not read."""
    if f.held_ratio is None or f.waiting_threads is None or f.held_ratio <= 0:
        return None
    demand = f.held_ratio + max(0.0, f.waiting_threads)
    measured = f.host_idle_cpus is not None
    spare = (min(float(f.host_cpus), f.cpu_cores + f.host_idle_cpus) if measured
             else float(f.host_cpus))
    ratio = max(1.0, min(demand, max(spare, 0.0)) / min(1.0, f.held_ratio))
    return Gain(demand, spare, measured, ratio)


def _gain_advice(g: Gain | None) -> tuple[str, ...]:
    if g is None:
        return ()
    spare = (f"the host could spare {g.spare_cores:.1f} cores (this process's plus the idle ones)"
             if g.spare_measured else
             f"the host has {g.spare_cores:.0f} cores (how many sat idle was not measured)")
    return (f"Gain: {g.demand_threads:.1f} threads wanted the GIL on average against the 1 it "
            f"lets run, and {spare}: processes or a free-threaded build would give up to "
            f"{g.ratio:.1f}x the throughput.",)


def _one_core_advice(f: Figures, cmdline: str, method: str) -> tuple[str, ...]:
    """Not contended, but one thread runs Python at about a full core with the GIL held: more
    threads would only take turns on it; processes would add throughput if the host has room."""
    if (method != "gil_state" or f.held_ratio is None or f.held_ratio < CAPPED_CORES
            or f.cpu_cores < CAPPED_CORES or (f.top_thread_share or 0.0) < STARVED_TOP_SHARE):
        return ()
    server = _server(cmdline)
    how = server[1] if server else "run the work in more processes (ProcessPoolExecutor, workers)"
    if f.host_idle_cpus is not None:
        room = (f"the host had {f.host_idle_cpus:.1f} idle cores beside it, so processes could "
                f"give up to {1.0 + min(f.host_idle_cpus, f.host_cpus - 1.0):.1f}x the throughput "
                f"if the load is there")
    else:
        room = "how many cores sat idle was not measured"
    return (f"One thread runs Python at {f.cpu_cores:.2f} cores with the GIL held "
            f"{f.held_ratio:.0%} of the time: more threads would only take turns on the GIL. "
            f"To serve more, {how}; {room}.",)


def _blocked(f: Figures, holder: Holder | None, amount: str, threads: str, cores: str,
             off: float) -> Verdict:
    if holder is not None:
        who = f"thread {holder.tid}" + (f" ({holder.name})" if holder.name else "")
        where = f" in {holder.blocked_in}" if holder.blocked_in else ""
        frame = f", called from {holder.frame}" if holder.frame else ""
        named = f"{who} held it while blocked{where}{frame}"
    else:
        named = "which thread held it was not read here (`gil-exporter diagnose PID` names it)"
    return Verdict(
        True, "gil_held_while_blocked",
        f"GIL held while its holder was off the CPU: {off:.0%} of the time at least; {named}; "
        f"{amount}, {threads} on {cores}",
        ("Release the GIL around the blocking call: call C through ctypes.CDLL rather than "
         "ctypes.PyDLL, wrap blocking C code in Py_BEGIN_ALLOW_THREADS / Py_END_ALLOW_THREADS "
         "(Cython: `with nogil`), or upgrade to a driver release that does; or move the call to "
         "a process of its own.",
         "More threads or processes do not help: each one freezes the same way while the call "
         "blocks with the GIL held. The fix is in the code that makes the call.",
         "Every other thread waits for the whole blocking call: the GIL's switch interval "
         "cannot take the GIL from a thread that is not running Python."))


def verdict(f: Figures, threshold: float = THRESHOLD, cmdline: str = "", probe: str = "",
            probe_detail: str = "", can_ptrace: bool | None = None,
            holder: Holder | None = None) -> Verdict:
    """What is going on with this process's GIL, and what to change.

    `cmdline` names request servers in the advice; `probe`, `probe_detail` and `can_ptrace`
    (whether the exporter holds CAP_SYS_PTRACE) explain a verdict made from /proc alone;
    `holder` names the thread that held the GIL while blocked, when it was read."""
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
    threads = f"{f.threads} thread{'' if f.threads == 1 else 's'}"
    probe_why = () if method == "gil_state" else _probe_advice(probe or "unavailable",
                                                                probe_detail, can_ptrace)
    if value is None:
        return Verdict(False, "unknown",
                       f"unknown: /proc alone cannot tell GIL contention from busy I/O here "
                       f"({threads}, {cores} used, {f.voluntary_per_second:.0f} voluntary "
                       f"switches/s" + (", host busy" if (f.host_idle_cpus or 0) < CAPPED_HOST_IDLE
                                        else "") + ")",
                       probe_why)
    amount = _amount(f, value, method)
    iv_text = _ms(iv) if f.interval_seconds else f"{_ms(iv)} unless changed"
    held_idle = f.held_ratio is None or f.held_ratio < IDLE_CORES
    if value < threshold and f.cpu_cores < IDLE_CORES and held_idle:
        return Verdict(False, "idle", f"idle: {cores} used, {threads}, {amount}", probe_why)
    if value >= threshold:
        return _contended(f, holder, amount, threads, cores, iv_text, cmdline, method, probe_why)
    if f.gils > 1 and (f.gils_held or 0.0) >= PARALLEL_FROM:
        return Verdict(False, "interpreters_parallel",
                       f"subinterpreters run in parallel, each on its own GIL: {f.gils_held:.1f} "
                       f"of {f.gils} GILs held at once on average, {cores}; {amount}",
                       ("Interpreters with a GIL of their own do not wait for each other: this "
                        "process is not GIL-bound. Contention, if any, is inside one interpreter: "
                        "pygil_gil_contention_score{interpreter=...} shows each one.",))
    if _gil_released(f):
        held = "" if f.held_ratio is None else f", GIL held {f.held_ratio:.0%}"
        return Verdict(False, "gil_released",
                       f"threads run in parallel with the GIL mostly released: {cores}{held}, "
                       f"{amount}",
                       ("Threads are fine here: the work runs in C code that releases the GIL. "
                        "Look elsewhere for slowness (I/O, locks, CPU quota, the host).",)
                       + probe_why)
    return Verdict(False, "no_contention", f"no GIL contention: {amount}, {threads}, {cores}",
                   _one_core_advice(f, cmdline, method) + probe_why)


def _amount(f: Figures, value: float, method: str) -> str:
    """How much the GIL is contended, in words, and how that was found."""
    how = "measured from the GIL" if method == "gil_state" else "estimated from /proc"
    if method == "gil_state" and f.gils > 1:
        return (f"the GIL of interpreter {f.interpreter} contended {value:.0%} of the time "
                f"({how}; the most contended of {f.gils} interpreters with a GIL of their own)")
    if method == "gil_state":
        return f"GIL contended {value:.0%} of the time ({how})"
    return f"GIL contention score {value:.2f} ({how})"  # evidence, not a fraction of time


def _contended(f: Figures, holder: Holder | None, amount: str, threads: str, cores: str, iv_text: str,
               cmdline: str, method: str, probe_why: tuple) -> Verdict:
    """The verdict on a process whose score is over the threshold: which kind of contention."""
    off = held_off_cpu(f)
    if (method == "gil_state" and off is not None and f.held_ratio
            and off >= BLOCKED_HELD_SHARE * f.held_ratio):
        return _blocked(f, holder, amount, threads, cores, off)
    g = gain(f) if method == "gil_state" else None
    switch = (f"sys.setswitchinterval (now {iv_text}) only changes how often threads take "
              f"turns, not the total throughput; raising it lowers switching overhead, "
              f"lowering it improves latency.")
    if f.top_thread_share is None:
        return Verdict(True, "contended_unclassified",
                       f"GIL contended: {amount}, {threads} on {cores} (which threads hold "
                       f"it was not measured: no /proc/PID/task/*/schedstat)",
                       ("Move the CPU-bound Python work to processes "
                        "(concurrent.futures.ProcessPoolExecutor, more worker processes), "
                        "or off the threads that serve I/O.", *_gain_advice(g), switch)
                       + probe_why, g)
    if f.top_thread_share >= STARVED_TOP_SHARE:
        return Verdict(True, "io_starved_by_cpu",
                       f"threads starved by one CPU-bound thread: {amount}; one thread did "
                       f"{f.top_thread_share:.0%} of the CPU work, {threads} on {cores}",
                       ("Move the CPU-bound work out of this process, or off the I/O threads "
                        "and event loop onto a process pool: "
                        "loop.run_in_executor(concurrent.futures.ProcessPoolExecutor(), fn, "
                        "*args) from asyncio, or executor.submit from threads.",
                        f"Every wake-up of an I/O thread waits up to the switch interval "
                        f"({iv_text}) for the GIL: sys.setswitchinterval(0.001) gets them the "
                        f"GIL sooner but costs more switching overhead in the CPU thread; it "
                        f"is a mitigation, not a fix.") + _gain_advice(g) + probe_why, g)
    server = _server(cmdline)
    what = server[0] if server else "Python threads"
    n = max(2, round(f.busy_threads or 2))
    share = min(1.0, f.cpu_cores)
    processes = (f"Threads add no CPU throughput here: {server[1]}." if server else
                 "Threads add no CPU throughput here: move the CPU work to processes "
                 "(concurrent.futures.ProcessPoolExecutor or multiprocessing.Pool).")
    return Verdict(True, "cpu_threads_serialized",
                   f"CPU-bound {what} serialized on the GIL: {n} threads share "
                   f"~{share:.1f} core; {amount}",
                   (processes,
                    "Or move the hot loop to native code that releases the GIL (NumPy, "
                    "Cython `with nogil`, a C/Rust extension), or run on a free-threaded "
                    "build (python3.13t and later).",
                    *_gain_advice(g), switch) + probe_why, g)
