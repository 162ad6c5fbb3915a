"""Views: what is published about each process, built once from the monitor's state for
every page alike (collector.py, http.py, diagnose.py, top.py).

`build(state, host, window)` derives the window figures and the score (score.py) from a
process's readings and returns its ProcessView; `verdict(view)` gives its verdict and status
the same way for the landing page, /process/PID and diagnose.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from exporter import score
from exporter.sampler import GilTotals
from exporter.state import ProcessState, Tick, window
from exporter.threadtable import ThreadTable


@dataclass(frozen=True)
class InterpreterGil:
    """One GIL of a process with several (an interpreter with a GIL of its own)."""

    interpreter: int  # PyInterpreterState.id; 0: the main interpreter
    gil: GilTotals | None
    waiting_threads: float | None  # over the window
    score: float | None
    score_method: str


@dataclass(frozen=True)
class ProcessView:
    """Everything published about one process, as of the last tick."""

    target: str
    pid: int
    exe: str
    python_version: str
    implementation: str
    gil_probe: str  # "ok" or why the memory probe is unavailable
    kube: tuple[tuple[str, str], ...]  # (("namespace", ..), ("pod", ..), ("container", ..)) or ()
    threads: int
    cpu_user_seconds: float
    cpu_system_seconds: float
    voluntary_total: int
    involuntary_total: int
    figures: score.Figures | None  # window figures; None until two ticks exist
    gil: GilTotals | None
    gil_enabled: bool | None
    score: float | None
    score_method: str
    cmdline: str = ""  # argv joined by spaces, as matched by the config
    probe_detail: str = ""  # why the GIL probe is unavailable, in words ("" when ok)
    score_history: tuple = ()  # ((unix time, score or None), ...) every 5 s, oldest first

    free_threaded: bool | None = None  # a Py_GIL_DISABLED build (None: not known)
    # processes that have shown several GILs: each one (the GIL fields above are then the
    # most contended one's); () for every other process
    interpreters: tuple[InterpreterGil, ...] = ()
    # sampling.per_thread: ((thread label, interpreter id, held seconds), ...); None when off
    thread_held: tuple | None = None
    # lower bound of the seconds the main GIL was held while its holder was on no CPU and
    # waited for none, summed over the passes (None until the GIL has been read)
    held_off_cpu_seconds: float | None = None

    @property
    def labels(self) -> dict[str, str]:
        return {"target": self.target, "pid": str(self.pid), **dict(self.kube)}


@dataclass(frozen=True)
class HostView:
    cpus: int
    utilization: tuple[float, ...] | None  # per CPU over the window


def build(state: ProcessState, host: deque, window_seconds: float) -> ProcessView:
    """What is published about one process, as of its last reading."""
    last: Tick = state.history[-1]
    ident = state.identity
    figures, gil_enabled, value, method, interps = derive(state, host, window_seconds)
    info = state.candidate.info
    interpreters = ()
    if state.multi:
        gils = {0: last.gil, **last.gils}
        interpreters = tuple(
            InterpreterGil(iid, gils.get(iid),
                           interps[iid][0].get("waiting_threads") if iid in interps else None,
                           *(interps[iid][1:] if iid in interps else (None, "none")))
            for iid in sorted(set(gils) | set(interps)))
    return ProcessView(
        target=state.candidate.target,
        pid=info.pid,
        exe=utf8(info.exe),
        python_version=ident.version if ident else "",
        implementation=ident.implementation if ident else "unknown",
        gil_probe=state.probe,
        kube=tuple((k, utf8(v)) for k, v in state.kube),
        threads=last.threads,
        cpu_user_seconds=last.cpu_user,
        cpu_system_seconds=last.cpu_system,
        voluntary_total=last.voluntary,
        involuntary_total=last.involuntary,
        figures=figures,
        gil=last.gil,
        gil_enabled=gil_enabled,
        free_threaded=ident.free_threaded if ident else None,
        score=value,
        score_method=method,
        cmdline=utf8(" ".join(info.cmdline)),
        probe_detail=utf8(state.probe_detail),
        score_history=tuple(state.scores),
        interpreters=interpreters,
        thread_held=last.thread_held,
        held_off_cpu_seconds=state.held_off_cpu if last.gil is not None else None,
    )


def derive(state: ProcessState, host: deque, window_seconds: float):
    """(figures, gil_enabled, score, method, per-interpreter figures) over the window ending
    at the last tick; `host` the host's readings (HostTick), for idle CPUs."""
    host_cpus = len(host[-1].cpus) if host else 0
    last: Tick = state.history[-1]
    figures = None
    span = window(state.history, window_seconds)
    gil_enabled = None
    if state.location is not None and last.gil is not None and last.gil.samples:
        # free-threaded builds: what the last sample saw; a GIL build always has its GIL
        gil_enabled = True if last.gil.enabled is None else last.gil.enabled
    per_gil: dict = {}  # processes with several GILs: interpreter id -> GIL figures
    if span is not None:
        a, b = span
        dt = b.t - a.t
        kw = gil_figures(state.history, a, b)
        if state.multi:
            per_gil[0] = kw
            for iid in last.gils:
                per_gil[iid] = gil_figures(state.history, a, b, iid)
        kw = dict(kw)
        kw.update(thread_figures(a.sched, b.sched, dt))
        kw["host_idle_cpus"] = _host_idle(host, a.t, b.t)
        figures = score.Figures(
            threads=b.threads,
            cpu_cores=((b.cpu_user + b.cpu_system) - (a.cpu_user + a.cpu_system)) / dt,
            voluntary_per_second=(b.voluntary - a.voluntary) / dt,
            involuntary_per_second=(b.involuntary - a.involuntary) / dt,
            host_cpus=host_cpus,
            gil_enabled=gil_enabled,
            **kw,
        )
    value, method = (None, "none")
    # While the GIL is being located, or is located but not yet sampled over a window,
    # publish no score rather than a procfs score that flips to gil_state moments later.
    settling = state.probe == "pending" or (state.locating and state.location is None) or (
        state.location is not None and (figures is None or figures.contended_ratio is None))
    interps: dict = {}  # interpreter id -> (GIL figures, score, method)
    if figures is not None and not settling:
        for iid, gkw in per_gil.items():
            fi = replace(figures, **gkw) if gkw.get("contended_ratio") is not None else None
            interps[iid] = (gkw, *(score.score(fi) if fi is not None else (None, "none")))
        measured = {i: x for i, x in interps.items() if x[1] is not None}
        if len(measured) > 1:
            # the process: its most contended GIL, and how many GILs were held at once
            worst = max(measured, key=lambda i: (measured[i][1], -i))
            figures = replace(figures, **measured[worst][0], gils=len(measured), interpreter=worst,
                              gils_held=sum(x[0]["held_ratio"] for x in measured.values()))
        value, method = score.score(figures)
    return figures, gil_enabled, value, method, interps


def host_view(host: deque, window_seconds: float) -> HostView:
    """Each CPU's utilisation over the window, from the host's readings."""
    items = deque(host)
    if not items:
        return HostView(0, None)
    cpus = len(items[-1].cpus)
    span = window(items, window_seconds)
    if span is None:
        return HostView(cpus, None)
    a, b = span
    util = []
    for (busy0, total0), (busy1, total1) in zip(a.cpus, b.cpus):
        dt = total1 - total0
        util.append(min(1.0, max(0.0, (busy1 - busy0) / dt)) if dt > 0 else 0.0)
    return HostView(cpus, tuple(util))


def verdict(view: ProcessView, can_ptrace: bool | None = None,
            holder: score.Holder | None = None) -> score.Verdict:
    """The verdict on a view's figures (which must exist), as diagnose words it; `holder` the
    thread diagnose found holding the GIL while blocked, if it looked."""
    return score.verdict(view.figures, cmdline=view.cmdline, probe=view.gil_probe,
                         probe_detail=view.probe_detail, can_ptrace=can_ptrace, holder=holder)


def with_threads(view: ProcessView, table: ThreadTable | None) -> ProcessView:
    """The view with what a per-thread table adds to its verdict: the held-off-CPU bound taken
    thread by thread, over the table's time (the page's and diagnose's own sampling)."""
    if view.figures is None or table is None or table.held_off_cpu is None:
        return view
    return replace(view, figures=replace(view.figures, held_off_cpu_threads=table.held_off_cpu))


def table_holder(table: ThreadTable | None) -> score.Holder | None:
    """The thread a per-thread table shows holding the GIL while off the CPU (the one that held
    it most, rows being in that order), if any."""
    r = next((r for r in table.rows if r.tid and score.thread_held_blocked(r.held, r.cpu, r.run_delay)),
             None) if table is not None else None
    return score.Holder(r.tid, r.name) if r is not None else None


def status(view: ProcessView, can_ptrace: bool | None = None,
           holder: score.Holder | None = None) -> tuple[str, score.Verdict | None]:
    """(status, Verdict or None) for a view: status is "contended", "ok", "unknown" or
    "measuring" (no score yet: the GIL is being located or not yet sampled over a window)."""
    f = view.figures
    if f is None or (view.score is None and view.score_method == "none"
                     and view.gil_enabled is not False):
        return "measuring", None
    v = verdict(view, can_ptrace, holder)
    return ("contended" if v.contended else "unknown" if v.kind == "unknown" else "ok"), v


def gil_figures(history: deque, a: Tick, b: Tick, interpreter: int = 0) -> dict:
    """GIL fields of Figures over [a, b] (of one interpreter's GIL: 0 the main one). When the
    GIL was located during the window, its figures start at the first tick that has GIL
    totals, not at `a`: a window whose first tick predates the first GIL sample must not lose
    the GIL figures (it used to, and diagnose then fell back to /proc although the probe was
    fine)."""
    def totals(t: Tick) -> GilTotals | None:
        return t.gil if not interpreter else t.gils.get(interpreter)
    g = totals(b)
    if g is None:
        return {}
    first = a
    g0 = totals(a)
    if g0 is None:
        first = next((t for t in history if t.t >= a.t and totals(t) is not None), b)
        g0 = totals(first)
    if first is b or g.sampled_seconds <= g0.sampled_seconds:
        return {}
    ds = g.sampled_seconds - g0.sampled_seconds
    return dict(
        interval_seconds=g.interval_seconds,
        held_ratio=(g.held_seconds - g0.held_seconds) / ds,
        waiting_threads=(g.wait_seconds - g0.wait_seconds) / ds,
        switches_per_second=(g.switches - g0.switches) / (b.t - first.t),
        contended_ratio=(g.contended_seconds - g0.contended_seconds) / ds,
        gil_sampled_seconds=ds,
    )


def _host_idle(host: deque, t0: float, t1: float) -> float | None:
    """CPUs the host left idle between the ticks at t0 and t1 (its ticks are read just before
    the processes' in the same tick)."""
    ticks = list(host)
    h0 = next((h for h in reversed(ticks) if h.t <= t0), None)
    h1 = next((h for h in reversed(ticks) if h.t <= t1), None)
    if h0 is None or h1 is None or h1.t <= h0.t:
        return None
    idle = 0.0
    for (busy0, total0), (busy1, total1) in zip(h0.cpus, h1.cpus):
        dt = total1 - total0
        if dt > 0:
            idle += min(1.0, max(0.0, 1.0 - (busy1 - busy0) / dt))
    return idle


def thread_figures(a: dict, b: dict, dt: float) -> dict:
    """Per-thread CPU over the window, from schedstat: how many threads share the CPU the
    process used, the busiest thread's share, and the time threads sat runnable (preempted)."""
    if not a or not b or dt <= 0:
        return {}
    runs = []
    delay = 0
    for tid, (run, wait) in b.items():
        run0, wait0 = a.get(tid, (0, 0))  # a thread born in the window starts at 0
        if run < run0 or wait < wait0:  # a reused TID
            run0 = wait0 = 0
        runs.append(run - run0)
        delay += wait - wait0
    total = sum(runs)
    if total <= 0:
        return dict(run_delay_cores=delay / 1e9 / dt)
    return dict(
        run_delay_cores=delay / 1e9 / dt,
        # participation ratio: 4 threads with equal CPU give 4.0, one thread doing it all 1.0
        busy_threads=total * total / sum(r * r for r in runs),
        top_thread_share=max(runs) / total,
    )


def utf8(text: str) -> str:
    """Label-safe text: /proc gives undecodable bytes as surrogates, which UTF-8 output rejects."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def held_off_cpu_increment(prev: Tick, now: Tick) -> float:
    """A lower bound of the seconds the main GIL was held between two ticks while its holder was
    on no CPU and waited for none (asleep, blocked in the kernel): the held time beyond every
    thread's CPU and run delay over the same stretch. CPU is /proc/PID/stat's (which keeps ended
    threads' time) or schedstat's sum, whichever is more; run delay is schedstat's, or without
    it the same estimate from involuntary switches as the score's (score.PREEMPT_SECONDS)."""
    if prev.gil is None or now.gil is None:
        return 0.0
    held = now.gil.held_seconds - prev.gil.held_seconds
    if held <= 0.0:
        return 0.0
    cpu = (now.cpu_user + now.cpu_system) - (prev.cpu_user + prev.cpu_system)
    sched_cpu = delay = 0.0
    for tid, (run_ns, wait_ns) in now.sched.items():
        before = prev.sched.get(tid, (0, 0))
        if run_ns >= before[0] and wait_ns >= before[1]:
            sched_cpu += (run_ns - before[0]) / 1e9
            delay += (wait_ns - before[1]) / 1e9
    if not now.sched:
        delay = max(0, now.involuntary - prev.involuntary) * score.PREEMPT_SECONDS
    return max(0.0, held - max(cpu, sched_cpu) - delay)
