"""The monitor's per-process state between passes: readings (Tick, HostTick), what is kept
about each process (ProcessState), and the helpers over a history of readings.

Counters are made monotonic here: context switches are summed over every thread, with the
last value of each ended thread kept, so a thread that exits never makes the sum go down; GIL
totals continue across sampler sessions (add_totals).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from exporter import gil, procfs
from exporter.discover import Candidate
from exporter.sampler import GilTotals
from exporter.threadlabels import ThreadLabels

#: Score history per process, for the landing page's sparkline: a point every
#: SCORE_HISTORY_STEP seconds (the score is a window average already), 10 minutes of them
#: (about 13 KiB per process).
SCORE_HISTORY_STEP = 5.0
SCORE_HISTORY = 120


@dataclass(frozen=True)
class Tick:
    """One reading of one process."""

    t: float  # time.monotonic()
    threads: int
    cpu_user: float
    cpu_system: float
    voluntary: int  # monotonic totals over every thread
    involuntary: int
    gil: GilTotals | None
    # tid -> (ns on a CPU, ns runnable but waiting for one), /proc/PID/task/TID/schedstat;
    # empty when the kernel has none
    sched: dict = field(default_factory=dict)
    # the other interpreters' GILs: interpreter id -> GilTotals (empty: the main GIL only)
    gils: dict = field(default_factory=dict)
    # per_thread: ((thread label, interpreter id, held seconds), ...), or None when off
    thread_held: tuple | None = None


@dataclass(frozen=True)
class HostTick:
    t: float
    cpus: tuple  # per CPU (busy seconds, total seconds)


@dataclass
class ProcessState:
    """What the monitor keeps about one tracked process between passes (its lock and
    threads say who may change what: see Monitor)."""

    candidate: Candidate
    identity: gil.PythonIdentity | None = None
    probe: str = "pending"
    probe_detail: str = ""
    location: gil.GilLocation | None = None
    next_locate: float = 0.0
    locating: bool = False
    kube: tuple = ()
    gil_base: GilTotals | None = None  # totals of earlier sampler sessions (probe lost, then re-located)
    threads: dict = field(default_factory=dict)  # tid -> (voluntary, involuntary), last seen
    ended: tuple = (0, 0)  # sums of threads that ended
    history: deque = field(default_factory=deque)
    scores: deque = field(default_factory=lambda: deque(maxlen=SCORE_HISTORY))
    stat: procfs.StatFile | None = None  # kept /proc/PID/stat (closed under the monitor's lock)
    tasks: procfs.ThreadFiles | None = None  # kept task status and schedstat (monitor thread only)
    # the other interpreters' GILs being sampled: id -> location (replaced whole, never changed)
    gils: dict = field(default_factory=dict)
    gils_base: dict = field(default_factory=dict)  # id -> totals of earlier sampler sessions
    multi: bool = False  # has shown several GILs: series per interpreter from then on
    next_interps: float = 0.0  # when the locator looks for new interpreters' GILs again
    per_thread: bool = False  # its GILs are sampled with per-thread held time
    labels: ThreadLabels | None = None  # per_thread: the thread label values, under the cap
    failing: str = ""  # the last pass's failure reading it ("" when it was read)
    held_off_cpu: float = 0.0  # seconds the GIL was held while no thread ran or waited for a CPU

    def ctx_totals(self, per_thread: dict[int, tuple[int, int]]) -> tuple[int, int]:
        ended_v, ended_i = self.ended
        for tid, (v, i) in self.threads.items():
            now = per_thread.get(tid)
            # An ended thread, or a reused TID whose counts restarted: keep the old figures.
            if now is None or now[0] < v or now[1] < i:
                ended_v += v
                ended_i += i
        self.ended = (ended_v, ended_i)
        self.threads = per_thread
        return (ended_v + sum(v for v, _ in per_thread.values()),
                ended_i + sum(i for _, i in per_thread.values()))


def window(history: deque, window: float):
    """(first, last) ticks spanning about `window` seconds, or None with under two ticks."""
    if len(history) < 2:
        return None
    last = history[-1]
    first = history[0]
    for tick in history:
        if last.t - tick.t <= window + 1e-6:
            first = tick
            break
    if first is last:
        first = history[-2]
    return first, last


def add_totals(base: GilTotals | None, now: GilTotals | None) -> GilTotals | None:
    """Counters that continue across sampler sessions of one process: a GIL that was lost
    (validation failed) and found again must not restart its *_total series at zero."""
    if base is None or now is None:
        return now if now is not None else base
    return GilTotals(
        sampled_seconds=base.sampled_seconds + now.sampled_seconds,
        held_seconds=base.held_seconds + now.held_seconds,
        wait_seconds=base.wait_seconds + now.wait_seconds,
        contended_seconds=base.contended_seconds + now.contended_seconds,
        switches=base.switches + now.switches,
        interval_seconds=now.interval_seconds,
        samples=base.samples + now.samples,
        futex_waiters_checked=now.futex_waiters_checked,
        enabled=now.enabled,
    )

