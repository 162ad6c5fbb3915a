"""Export: a prometheus_client custom collector that yields families at scrape time.

Per-process series carry `target` and `pid`, plus `namespace`, `pod`,
`container`, `workload` and `workload_kind` on Kubernetes (absent, not empty, elsewhere;
kube.PodMeta.labels), so families are built
from samples with per-sample label sets. The GIL series (and the per-thread ones) of a
process that has shown several GILs carry `interpreter` too, one per GIL; those of every
other process never do.
"""
from __future__ import annotations

import contextlib
import threading
import time

from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

from exporter import __version__
from exporter.monitor import Monitor
from exporter.views import ProcessView

ERROR_STAGES = ("scan", "tick", "host", "gil_locate", "procfs_permission", "kube", "process")


def _family(name: str, doc: str, kind: str, unit: str = "") -> Metric:
    return Metric(name, doc, kind, unit)


class GilCollector:
    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self._local = threading.local()

    def describe(self):
        return []  # collected lazily; nothing to check at registration

    @contextlib.contextmanager
    def pinned(self, alive: frozenset):
        """Collect, in this thread, exactly the processes in `alive` (checked by the caller)."""
        self._local.alive = alive
        try:
            yield
        finally:
            self._local.alive = None

    def collect(self):
        started = time.perf_counter()
        views = self.monitor.snapshot(alive=getattr(self._local, "alive", None))
        host = self.monitor.host()
        families = list(self._process_families(views))
        families.extend(self._gil_families(views))
        threads = self._thread_family(views)
        if threads.samples:  # sampling.per_thread only: otherwise /metrics stays as it was
            families.append(threads)
        families.extend(self._host_families(host))
        families.extend(self._exporter_families())
        yield from families
        took = _family("pygil_exporter_scrape_duration_seconds",
                       "Time this scrape took to collect, in seconds.", "gauge")
        took.add_sample("pygil_exporter_scrape_duration_seconds", {}, time.perf_counter() - started)
        yield took

    @staticmethod
    def _process_families(views: list[ProcessView]):
        info = _family("pygil_target_info", "A monitored process: what it runs and whether its GIL can be read "
                       "(gil_probe=\"ok\" or the reason it cannot).", "gauge")
        threads = _family("pygil_process_threads", "Threads in the process.", "gauge")
        cpu = _family("pygil_process_cpu_seconds", "CPU time used by the process, in seconds.", "counter")
        cores = _family("pygil_process_cpu_cores",
                        "CPU cores used over the exporter's window (1.0 = one full core).", "gauge")
        ctx = _family("pygil_process_context_switches",
                      "Context switches summed over every thread of the process, monotonic when threads end.",
                      "counter")
        ctx_rate = _family("pygil_process_context_switches_per_second",
                           "Context switches per second over the exporter's window, summed over every thread.",
                           "gauge")
        for v in views:
            labels = v.labels
            info_labels = {**labels, "python_version": v.python_version,
                           "implementation": v.implementation, "exe": v.exe, "gil_probe": v.gil_probe}
            if v.free_threaded is not None:   # a Py_GIL_DISABLED build; pygil_gil_enabled says if its GIL is on
                info_labels["free_threaded"] = "true" if v.free_threaded else "false"
            info.add_sample("pygil_target_info", info_labels, 1)
            threads.add_sample("pygil_process_threads", labels, v.threads)
            cpu.add_sample("pygil_process_cpu_seconds_total", {**labels, "mode": "user"}, v.cpu_user_seconds)
            cpu.add_sample("pygil_process_cpu_seconds_total", {**labels, "mode": "system"}, v.cpu_system_seconds)
            ctx.add_sample("pygil_process_context_switches_total", {**labels, "type": "voluntary"},
                           v.voluntary_total)
            ctx.add_sample("pygil_process_context_switches_total", {**labels, "type": "involuntary"},
                           v.involuntary_total)
            f = v.figures
            if f is not None:
                cores.add_sample("pygil_process_cpu_cores", labels, f.cpu_cores)
                ctx_rate.add_sample("pygil_process_context_switches_per_second",
                                    {**labels, "type": "voluntary"}, f.voluntary_per_second)
                ctx_rate.add_sample("pygil_process_context_switches_per_second",
                                    {**labels, "type": "involuntary"}, f.involuntary_per_second)
        return info, threads, cpu, cores, ctx, ctx_rate

    @staticmethod
    def _gil_families(views: list[ProcessView]):
        enabled = _family("pygil_gil_enabled", "1 while the target's GIL is on, 0 while a free-threaded "
                          "build runs with its GIL off (absent when unknown).", "gauge")
        interval = _family("pygil_gil_switch_interval_seconds",
                           "The target's GIL switch interval (sys.getswitchinterval()), in seconds.", "gauge")
        sampled = _family("pygil_gil_sampled_seconds",
                          "Time covered by GIL samples, in seconds: wall time, less any stretch in which the "
                          "sampler itself was starved. Divide the other pygil_gil_*_seconds_total rates by its "
                          "rate for exact fractions.", "counter")
        held = _family("pygil_gil_held_seconds", "Time the GIL was held, in seconds (sampled).", "counter")
        wait = _family("pygil_gil_wait_seconds",
                       "Thread-seconds spent waiting for the GIL (2 threads waiting 1 s add 2).", "counter")
        contended = _family("pygil_gil_contended_seconds",
                            "Time the GIL was held while at least one thread waited for it, in seconds.", "counter")
        switches = _family("pygil_gil_switches", "GIL handoffs between threads.", "counter")
        off_cpu = _family("pygil_gil_held_off_cpu_seconds",
                          "Time the (main interpreter's) GIL was held while its holder was on no CPU and "
                          "waited for none, in seconds: asleep or blocked in the kernel with the GIL held. A "
                          "lower bound: the held time beyond every thread's CPU and run delay, per pass.",
                          "counter")
        waiting = _family("pygil_gil_waiting_threads",
                          "Mean number of threads waiting for the GIL over the exporter's window.", "gauge")
        score = _family("pygil_gil_contention_score",
                        "GIL contention over the exporter's window, 0-1. method=\"gil_state\": the fraction of time "
                        "the GIL was held while at least one other thread waited for it; method=\"procfs\": "
                        "estimate from /proc alone.", "gauge")
        unknown = _family("pygil_gil_contention_score_unknown",
                          "1 while the contention score is withheld because /proc alone cannot tell GIL "
                          "contention from busy I/O (method=\"procfs\"); pygil_gil_contention_score is "
                          "absent for the process meanwhile.", "gauge")
        for v in views:
            labels = v.labels
            if v.score is None and v.score_method == "procfs":
                unknown.add_sample("pygil_gil_contention_score_unknown",
                                   {**labels, "method": v.score_method}, 1)
            if v.gil_enabled is not None:
                enabled.add_sample("pygil_gil_enabled", labels, 1 if v.gil_enabled else 0)
            f = v.figures
            if v.interpreters:  # several GILs: each one's series, by interpreter
                gils = [({**labels, "interpreter": str(i.interpreter)}, i.gil, i.waiting_threads, i.score,
                         i.score_method) for i in v.interpreters]
            else:
                gils = [(labels, v.gil, f.waiting_threads if f is not None else None, v.score, v.score_method)]
            if v.held_off_cpu_seconds is not None and v.gil is not None and v.gil.samples > 0:
                # the main interpreter's GIL: labelled so where the process has several
                off_labels = {**labels, "interpreter": "0"} if v.interpreters else labels
                off_cpu.add_sample("pygil_gil_held_off_cpu_seconds_total", off_labels, v.held_off_cpu_seconds)
            for ls, g, waiting_threads, value, method in gils:
                if g is not None and g.samples > 0:
                    interval.add_sample("pygil_gil_switch_interval_seconds", ls, g.interval_seconds)
                    sampled.add_sample("pygil_gil_sampled_seconds_total", ls, g.sampled_seconds)
                    held.add_sample("pygil_gil_held_seconds_total", ls, g.held_seconds)
                    wait.add_sample("pygil_gil_wait_seconds_total", ls, g.wait_seconds)
                    contended.add_sample("pygil_gil_contended_seconds_total", ls, g.contended_seconds)
                    switches.add_sample("pygil_gil_switches_total", ls, g.switches)
                if waiting_threads is not None:
                    waiting.add_sample("pygil_gil_waiting_threads", ls, waiting_threads)
                if value is not None:
                    score.add_sample("pygil_gil_contention_score", {**ls, "method": method}, value)
        return enabled, interval, sampled, held, wait, contended, switches, off_cpu, waiting, score, unknown

    @staticmethod
    def _thread_family(views: list[ProcessView]):
        held = _family("pygil_thread_gil_held_seconds",
                       "Time each thread held the GIL, in seconds (sampled; sampling.per_thread). thread is "
                       "the thread's name where unique, else its TID; at most limits.max_threads_per_process "
                       "threads per process get one, by recent held time, and the rest add up in "
                       "thread=\"other\". Only time after a thread got its label counts in its series.",
                       "counter")
        for v in views:
            if not v.thread_held:
                continue
            labels = v.labels
            for thread, interp, value in v.thread_held:
                ls = {**labels, "thread": thread}
                if v.interpreters:
                    ls["interpreter"] = str(interp)
                held.add_sample("pygil_thread_gil_held_seconds_total", ls, value)
        return held

    @staticmethod
    def _host_families(host):
        cpus = _family("pygil_host_cpus", "CPUs of the host the exporter sees.", "gauge")
        cpus.add_sample("pygil_host_cpus", {}, host.cpus)
        util = _family("pygil_host_cpu_utilization_ratio",
                       "Busy fraction of each CPU over the exporter's window, 0-1.", "gauge")
        for i, u in enumerate(host.utilization or ()):
            util.add_sample("pygil_host_cpu_utilization_ratio", {"cpu": str(i)}, u)
        return cpus, util

    def _exporter_families(self):
        build = _family("pygil_exporter_build_info",
                        "gil-exporter's version, and which GIL sampling loop runs: sampler_loop=\"c\" "
                        "(exporter._hotloop, compiled at install) or \"python\" (the fallback).", "gauge")
        build.add_sample("pygil_exporter_build_info",
                         {"version": __version__, "sampler_loop": sampler_loop(self.monitor)}, 1)
        errors = _family("pygil_exporter_errors", "Unexpected errors inside the exporter, by stage.", "counter")
        # The known stages always appear (at 0), so that rate() and alerts see them from the start.
        for reason in sorted(set(ERROR_STAGES) | set(self.monitor.errors)):
            errors.add_sample("pygil_exporter_errors_total", {"reason": reason}, self.monitor.errors[reason])
        dropped = _family("pygil_exporter_dropped_processes",
                          "Matching processes left out because a target hit limits.max_processes_per_target.",
                          "gauge")
        for name in sorted({t.name for t in self.monitor.config.targets}):
            dropped.add_sample("pygil_exporter_dropped_processes", {"target": name},
                               self.monitor.dropped.get(name, 0))
        return build, errors, dropped


def sampler_loop(monitor: Monitor) -> str:
    """"c" when the GIL sampler runs the C loop (the optional extension was built at install),
    else "python". With sampling off, the loop a sampler would run."""
    if monitor.sampler is not None:
        return "c" if monitor.sampler.native else "python"
    import importlib.util
    return "c" if importlib.util.find_spec("exporter._hotloop") is not None else "python"


# --------------------------------------------------------------------------- exposition
# prometheus_client formats each sample through per-label validity checks and escaping
# functions: 12 ms (text) and 24 ms (OpenMetrics) for the 1,800 series of 100 processes.
# The same bytes, written directly: about a tenth of that. Only what this exporter emits is
# written here (gauges and counters, no timestamps, exemplars or units, names in the legacy
# character set); anything else goes back to prometheus_client (None).

_TEXT_TYPES = {"counter": "counter", "gauge": "gauge", "unknown": "untyped"}
_LABELSTRS: dict = {}  # sorted label items -> '{k="v",...}': the same processes at every scrape


def _escape_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def exposition(metrics, openmetrics: bool) -> bytes | None:
    """The text exposition (format 0.0.4, or OpenMetrics 1.0.0) of `metrics`, byte for byte
    what prometheus_client's generate_latest writes for them; None if it has to do it."""
    out: list[str] = []
    append = out.append
    labelstrs = _LABELSTRS
    if len(labelstrs) > 50_000:  # processes come and go
        labelstrs.clear()
    fmt = floatToGoString
    for m in metrics:
        kind = m.type
        if kind not in _TEXT_TYPES or getattr(m, "unit", ""):
            return None
        name = m.name
        if openmetrics:
            append(f"# HELP {name} {_escape_value(m.documentation)}\n# TYPE {name} {kind}\n")
        else:
            shown = name + "_total" if kind == "counter" else name
            doc = m.documentation.replace("\\", r"\\").replace("\n", r"\n")
            append(f"# HELP {shown} {doc}\n# TYPE {shown} {_TEXT_TYPES[kind]}\n")
        for s in m.samples:
            if s.timestamp is not None or s.exemplar is not None or getattr(s, "native_histogram", None):
                return None
            labels = s.labels
            if labels:
                key = tuple(sorted(labels.items()))
                ls = labelstrs.get(key)
                if ls is None:
                    ls = labelstrs[key] = "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in key) + "}"
            else:
                ls = ""
            append(f"{s.name}{ls} {fmt(s.value)}\n")
    if openmetrics:
        append("# EOF\n")
    return "".join(out).encode("utf-8")

