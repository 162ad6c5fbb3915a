"""`gil-exporter diagnose PID`: the daemon's measurement, once, for a person at a terminal.

A verdict is only given from data that was measured: the GIL figures when the probe works (it
waits for enough GIL samples, and gives up with exit 2 when they do not come), the /proc
estimate only when the probe is unavailable, and then it says why. A process that is not Python,
or that exits during the measurement, is an error (exit 2), never a verdict.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass

from exporter import discover, gil, pods, procfs, score, syscalls, threadsampler, threadtable, views
from exporter import stacks as holder_stacks
from exporter.config import Config, Limits, Match, Sampling, Target
from exporter.gil.threads import GilThreads
from exporter.monitor import Monitor
from exporter.redact import shown_cmdline
from exporter.views import ProcessView

EXIT_OK, EXIT_CONTENDED, EXIT_ERROR = 0, 1, 2

#: How long the GIL may take to be located (ELF parsing of a big libpython on a busy host).
LOCATE_TIMEOUT = 20.0
#: GIL samples must cover at least this fraction of the requested window; diagnose waits up to
#: one more window for them (a starved sampler thread is not credited: see GilTotals).
MIN_SAMPLED_FRACTION = 0.6
#: Rows of the per-thread table; the threads past them are folded into one row.
THREAD_ROWS = 20


class DiagnoseError(Exception):
    """Why no verdict can be given; printed as one line, exit 2."""


@dataclass(frozen=True)
class Measurement:
    view: ProcessView
    can_ptrace: bool


def _config(pid: int, seconds: float, rate_hz: float) -> Config:
    return Config(
        targets=(Target(name="diagnose", match=Match(pid=pid)),),
        scan_interval_seconds=3600.0,
        window_seconds=seconds,
        sampling=Sampling(rate_hz=rate_hz, enabled=True),
        limits=Limits(),
    )


def _view(monitor: Monitor, key: tuple[int, int]) -> ProcessView | None:
    for v in monitor.snapshot(check_alive=False):
        if v.pid == key[0]:
            return v
    return None


def _gone(pid: int, key: tuple[int, int]) -> bool:
    try:
        return procfs.start_time(pid) != key[1]
    except (procfs.ProcessGone, PermissionError):
        return True


def measure(pid: int, seconds: float, rate_hz: float = 100.0) -> Measurement:
    """Track one process like the daemon does, for `seconds` of data after its GIL probe
    settled. Raises DiagnoseError when no verdict can be given."""
    try:
        info = procfs.process_info(pid)
    except procfs.ProcessGone:
        raise DiagnoseError(f"no process {pid}") from None
    except PermissionError as e:
        raise DiagnoseError(f"cannot read /proc/{pid}: {e}") from None
    key = (pid, info.start_time)
    tick = min(1.0, max(0.1, seconds / 5))
    # idle_ticks=1: every tick, waiters or not. The daemon's idle rate (2 Hz) is unbiased but
    # would leave a few-second window with a handful of samples of a process without waiters.
    monitor = Monitor(_config(pid, seconds, rate_hz), tick_seconds=tick, idle_ticks=1)
    monitor.start()
    exited = DiagnoseError(f"process {pid} exited during the measurement")
    try:
        view = _wait_for_probe(monitor, pid, key, exited)
        _check_python(view, info)
        probe = view.gil_probe
        time.sleep(seconds + tick)
        if probe != "ok":  # the /proc estimate: one window of /proc figures is all it needs
            view = _view(monitor, key)
        else:
            view = _wait_for_samples(monitor, pid, key, seconds, tick, exited)
        if _gone(pid, key) or view is None:
            raise exited
        if view.figures is None:
            raise DiagnoseError(f"no figures for process {pid}: /proc could not be read")
        return Measurement(view, procfs.has_cap_sys_ptrace())
    finally:
        monitor.stop()


def _wait_for_probe(monitor: Monitor, pid: int, key, exited: DiagnoseError) -> ProcessView:
    """The view once the GIL is located, or known unreadable."""
    deadline = time.monotonic() + LOCATE_TIMEOUT
    while True:
        view = _view(monitor, key)
        if _gone(pid, key):
            raise exited
        if view is not None and view.gil_probe != "pending":
            return view
        if time.monotonic() > deadline:
            raise DiagnoseError(f"the GIL of process {pid} could not be located within "
                                f"{LOCATE_TIMEOUT:.0f} s")
        time.sleep(0.05)


def _wait_for_samples(monitor: Monitor, pid: int, key, seconds: float, tick: float,
                      exited: DiagnoseError) -> ProcessView:
    """The view once enough GIL samples arrived, waiting up to one more window."""
    need = MIN_SAMPLED_FRACTION * seconds
    deadline = time.monotonic() + seconds + 2 * tick
    while True:
        view = _view(monitor, key)
        if _gone(pid, key):
            raise exited
        if view is not None and view.gil_probe != "ok":
            raise DiagnoseError(
                f"the GIL probe of process {pid} failed during the measurement: "
                f"{view.gil_probe}" + (f" ({view.probe_detail})" if view.probe_detail else ""))
        f = view.figures if view is not None else None
        sampled = (f.gil_sampled_seconds or 0.0) if f is not None else 0.0
        if f is not None and f.contended_ratio is not None and sampled >= need:
            return view
        if time.monotonic() > deadline:
            raise DiagnoseError(
                f"only {sampled:.1f} s of GIL samples of process {pid} arrived in "
                f"{2 * seconds:.0f} s (need {need:.1f} s): the host is too busy for the "
                f"sampler thread; try again, or with a longer --seconds")
        time.sleep(tick / 2)


def _check_python(view: ProcessView, info: procfs.ProcessInfo) -> None:
    what = f"process {view.pid} ({view.exe or (info.cmdline[0] if info.cmdline else info.comm)})"
    if view.gil_probe == "not_cpython":
        raise DiagnoseError(f"{what} is not a Python process: it maps no libpython and its "
                            f"executable defines no _PyRuntime")
    if view.gil_probe == "permission_denied" and not discover.is_cpython(info):
        raise DiagnoseError(f"{what} is not a Python process as far as /proc shows "
                            f"(argv[0] and comm name no python interpreter), and its memory "
                            f"cannot be read to check: permission denied")
    if view.gil_probe == "exited":
        raise DiagnoseError(f"process {view.pid} exited during the measurement")


def _holders_blocked(pid: int, tries: int = 40, pause: float = 0.01) -> Counter:
    """(TID, what it sits in) of the GIL's holder at `tries` moments when the holder was off the
    CPU: a fresh GIL reading, then that thread's /proc syscall and wchan, read from outside."""
    seen: Counter = Counter()
    try:
        location = gil.locate(pid)
        reader = gil.GilReader(location)
    except (gil.ProbeUnavailable, OSError):
        return seen
    try:
        threads = GilThreads(reader.fd, location, reader.threads)
        for _ in range(tries):
            tid = threads.holder(reader.read())
            if tid:
                where = syscalls.describe(*procfs.thread_blocked_in(pid, tid))
                if where:
                    seen[(tid, where)] += 1
            time.sleep(pause)
    except (gil.ProbeUnavailable, OSError):
        pass
    finally:
        reader.close()
    return seen


def blocked_holder(pid: int, table: threadtable.ThreadTable,
                   profile: holder_stacks.StackProfile | None = None) -> score.Holder | None:
    """The thread found holding the GIL while off the CPU most often, read right after the
    measurement (the GIL's holder, then what it sits in); the per-thread table gives its name,
    and with --stacks the Python function the holder was in most. None when no holder was
    caught off the CPU."""
    seen = _holders_blocked(pid)
    if not seen:
        return None
    (tid, blocked_in), _ = seen.most_common(1)[0]
    name = next((r.name for r in table.rows if r.tid == tid), "")
    if not name:
        try:
            task = procfs.task_stats(pid).get(tid)
        except (procfs.ProcessGone, OSError):
            task = None
        name = task.name if task else ""
    frame = ""
    if profile is not None:
        best = profile.top_functions(1)
        if best and best[0].filename:
            frame = f"{best[0].qualname} ({best[0].filename}:{best[0].line})"
    return score.Holder(tid, _printable(name), blocked_in, _printable(frame))


def report(m: Measurement, show_cmdline: bool = False,
           holder: score.Holder | None = None) -> tuple[dict, score.Verdict]:
    view = m.view
    f = view.figures
    v = views.verdict(view, can_ptrace=m.can_ptrace, holder=holder)
    g = score.gain(f) if view.score_method == "gil_state" else None
    figures = {
        "pid": view.pid,
        "exe": view.exe,
        "cmdline": shown_cmdline(view.cmdline, show_cmdline),
        "python_version": view.python_version,
        "gil_probe": view.gil_probe,
        "gil_probe_detail": view.probe_detail,
        **dataclasses.asdict(f),
        "score": view.score,
        "score_method": view.score_method,
        "held_off_cpu_ratio": score.held_off_cpu(f) if view.score_method == "gil_state" else None,
        "demand_threads": g.demand_threads if g else None,
        "spare_cores": g.spare_cores if g else None,
        "gain_ratio": g.ratio if g else None,
        "holder": dataclasses.asdict(holder) if holder else None,
    }
    return figures, v


def _line(label: str, value, fmt: str = "", unit: str = "") -> str:
    shown = "n/a" if value is None else (format(value, fmt) + unit)
    return f"  {label:<32}{shown}"


def render(figures: dict, v: score.Verdict) -> str:
    interval = figures.get("interval_seconds")
    probe = figures["gil_probe"] + (f" ({figures['gil_probe_detail']})"
                                    if figures.get("gil_probe_detail") else "")
    score_text = figures["score"]
    lines = [
        f"gil-exporter diagnose: pid {figures['pid']} ({_printable(figures['exe'] or '?')}), "
        f"Python {_printable(figures['python_version'] or 'unknown')}",
        _line("threads", figures["threads"]),
        _line("CPU cores used", figures["cpu_cores"], ".2f", f" of {figures['host_cpus']}"),
        _line("threads sharing the CPU", figures.get("busy_threads"), ".1f"),
        _line("busiest thread's CPU share", figures.get("top_thread_share"), ".0%"),
        _line("time runnable, not running", figures.get("run_delay_cores"), ".2f", " cores"),
        _line("voluntary switches/s", figures["voluntary_per_second"], ".0f"),
        _line("involuntary switches/s", figures["involuntary_per_second"], ".0f"),
        _line("GIL probe", _printable(probe)),
        _line("switch interval", None if interval is None else interval * 1000, ".2f", " ms"),
        _line("GIL held", figures.get("held_ratio"), ".0%"),
        _line("mean threads waiting", figures.get("waiting_threads"), ".2f"),
        _line("GIL handoffs/s", figures.get("switches_per_second"), ".0f"),
        _line("GIL sampled", figures.get("gil_sampled_seconds"), ".1f", " s"),
        _line("GIL held off the CPU", figures.get("held_off_cpu_ratio"), ".0%", " (at least)"),
        _line("threads wanting the GIL", figures.get("demand_threads"), ".2f"),
        (_line(f"contention score ({figures['score_method']})", score_text, ".2f")
         if score_text is not None or figures["score_method"] != "procfs"
         else _line("contention score (procfs)", "unknown")),
        "",
        ("CONTENDED: " if v.contended else "UNKNOWN: " if v.kind == "unknown" else "OK: ")
        + v.headline,
    ]
    lines += [f"  - {_printable(a)}" for a in v.advice]
    return "\n".join(lines)


def _printable_table(table: threadtable.ThreadTable) -> threadtable.ThreadTable:
    """The thread table with each thread's name (the target names its threads) escaped."""
    return dataclasses.replace(table, rows=tuple(dataclasses.replace(r, name=_printable(r.name))
                                                 for r in table.rows))


def _printable_profile(profile: holder_stacks.StackProfile) -> holder_stacks.StackProfile:
    """The stack profile with function and file names (the target's code objects) escaped."""
    stacks: dict = {}
    for frames, count in profile.stacks.items():
        key = tuple(dataclasses.replace(f, qualname=_printable(f.qualname),
                                        filename=_printable(f.filename)) for f in frames)
        stacks[key] = stacks.get(key, 0) + count
    return dataclasses.replace(profile, stacks=stacks,
                               python_version=_printable(profile.python_version))


def run_diagnose(pid: int, seconds: float, rate_hz: float, as_json: bool, stacks: bool = False,
                 show_cmdline: bool = False) -> int:
    if seconds <= 0 or rate_hz <= 0:
        print("gil-exporter diagnose: --seconds and --rate-hz must be positive", file=sys.stderr)
        return EXIT_ERROR
    # who holds and who waits for the GIL, per thread; with --stacks, the holder's Python
    # stack: each sampled by its own thread during the same window
    threads = threadsampler.ThreadSampler(pid, rate_hz).start()
    sampler = holder_stacks.StackSampler(pid, rate_hz).start() if stacks else None
    try:
        m = measure(pid, seconds, rate_hz)
    except DiagnoseError as e:
        print(f"gil-exporter diagnose: {_printable(str(e))}", file=sys.stderr)
        if as_json:
            print(json.dumps({"pid": pid, "error": str(e)}))
        return EXIT_ERROR
    finally:
        table = threads.stop(THREAD_ROWS)
        profile = sampler.stop() if sampler else None
    m = dataclasses.replace(m, view=views.with_threads(m.view, table))
    figures, v = report(m, show_cmdline, blocked_holder(pid, table, profile))
    if as_json:
        out = {"figures": figures, "verdict": dataclasses.asdict(v), "threads": table.as_dict()}
        if profile is not None:
            out["stacks"] = profile.as_dict()
        print(json.dumps(out, indent=2))
    else:
        # JSON escapes by itself; the text is escaped wherever a target named something
        print(render(figures, v))
        print("\n" + threadtable.render(_printable_table(table)))
        if profile is not None:
            print("\n" + holder_stacks.render(_printable_profile(profile)))
    if v.kind == "unknown":
        return EXIT_ERROR
    return EXIT_CONTENDED if v.contended else EXIT_OK


def _printable(text: str) -> str:
    """A target's own name, with what a terminal would act on shown as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _no_python(found: pods.PodProcesses, name: pods.PodName) -> str:
    where = f"pod {name}" + ("" if name.container else f" on node {found.node}")
    if not found.others:
        return (f"{where} has no process visible here (the exporter needs the node's PID "
                f"namespace: hostPID)")
    shown = ", ".join(sorted({_printable(c) for c in found.others}))
    return f"{where} has no Python process ({len(found.others)} other processes: {shown})"


def run_diagnose_pod(pod: str, seconds: float, rate_hz: float, as_json: bool,
                     stacks: bool = False, environ: dict | None = None,
                     show_cmdline: bool = False) -> int:
    """`diagnose --pod NAMESPACE/POD[/CONTAINER]`: `diagnose PID` on each Python process of
    the pod, one after the other, each with its container's PID beside the node's. Exit code:
    the worst of theirs; 2 when the pod has no Python process here."""
    try:
        name = pods.PodName.parse(pod)
        found = pods.find(name, pods.resolver(environ))
        if not found.python:
            raise pods.PodError(_no_python(found, name))
    except pods.PodError as e:
        print(f"gil-exporter diagnose: {e}", file=sys.stderr)
        if as_json:
            print(json.dumps({"pod": pod, "error": str(e)}))
        return EXIT_ERROR
    head = {"namespace": name.namespace, "pod": name.pod, "container": name.container,
            "node": found.node}
    if not as_json:
        print(f"gil-exporter diagnose --pod {name}: {len(found.python)} Python process"
              f"{'es' if len(found.python) > 1 else ''} on node {found.node}\n"
              f"  {'PID':>8}  {'container PID':>13}  {'container':<20} command")
        for p in found.python:
            print(f"  {p.pid:>8}  {p.container_pid:>13}  {_printable(p.container or '?'):<20} "
                  f"{_printable(p.comm)}")
    worst, measured = EXIT_OK, []
    for p in found.python:
        if not as_json:
            print(f"\n=== pid {p.pid} (pid {p.container_pid} in container "
                  f"{p.container or '?'}) ===", flush=True)
            code = run_diagnose(p.pid, seconds, rate_hz, False, stacks, show_cmdline)
        else:  # diagnose PID's own JSON document, one per process
            with contextlib.redirect_stdout(io.StringIO()) as out:
                code = run_diagnose(p.pid, seconds, rate_hz, True, stacks, show_cmdline)
            measured.append({"pid": p.pid, "container_pid": p.container_pid,
                             "container": p.container, "exit_code": code,
                             "diagnose": json.loads(out.getvalue())})
        worst = max(worst, code)
    if as_json:
        print(json.dumps({**head, "exit_code": worst, "processes": measured}, indent=2))
    return worst
