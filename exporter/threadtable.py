"""The per-thread table of `diagnose`, `top` and the landing page: a `ThreadAttribution` (GIL
time per TID) joined with a `TaskBook` (names and CPU per TID), most GIL time first, and its
text for `diagnose`.
"""
from __future__ import annotations

from dataclasses import dataclass

from exporter.attribution import OTHER, TaskBook, ThreadAttribution


@dataclass(frozen=True)
class ThreadShare:
    """One row of the per-thread table. Shares are of the sampled time (held, waiting) or of
    one core over the measurement (cpu); None where not measured."""
    tid: int                      # 0 for the row that folds the rest
    name: str
    held: float | None
    waiting: float | None
    cpu: float | None
    alive: bool = True            # False: the thread ended during the measurement
    interpreter: int | None = None   # id of the interpreter whose GIL it held or awaited
    threads: int = 1              # threads folded into this row
    run_delay: float | None = None   # share of one core runnable but waiting for a CPU (schedstat)


@dataclass(frozen=True)
class ThreadTable:
    pid: int
    seconds: float                # wall time the table covers
    sampled_seconds: float        # time covered by GIL samples (0 when the GIL was not read)
    samples: int
    waiting_source: str           # "gil_requested" (3.15+), "futex" (/proc syscall), "" not read
    gils: int                     # GILs sampled: more than 1 with subinterpreters of their own
    rows: tuple[ThreadShare, ...] = ()
    unknown_held: float = 0.0     # share of sampled time held by a thread whose TID was not read
    waiting_threads: float | None = None   # mean waiters by the GILs' own counts
    unavailable: str = ""         # why GIL shares are missing ("" when measured)
    # A lower bound of the share of the sampled time the GIL was held while its holder was on
    # no CPU and waited for none, thread by thread (None without GIL shares or schedstat).
    held_off_cpu: float | None = None

    def as_dict(self) -> dict:
        return {
            "pid": self.pid, "seconds": self.seconds, "sampled_seconds": self.sampled_seconds,
            "samples": self.samples, "waiting_source": self.waiting_source, "gils": self.gils,
            "unknown_held": self.unknown_held, "waiting_threads": self.waiting_threads,
            "unavailable": self.unavailable, "held_off_cpu": self.held_off_cpu,
            "threads": [r.__dict__ for r in self.rows],
        }

    def shares(self) -> dict[int, tuple[float, float]]:
        """{tid: (held, waiting)}: what top's `thread_shares` hook wants."""
        if not self.sampled_seconds:
            return {}
        return {r.tid: (r.held or 0.0, r.waiting or 0.0) for r in self.rows if r.tid}


def held_off_cpu(rows: list[ThreadShare]) -> float | None:
    """Held time beyond each holder's own CPU and run delay, summed over the threads: a holder
    can hold the GIL while running or runnable at most that long, so the rest it held while
    on no CPU. Tighter than the process's bound (score.held_off_cpu), which must also count
    the run delay of threads that only waited. None when a delay was not measured."""
    held = [r for r in rows if r.tid and r.held and r.cpu is not None]
    if any(r.run_delay is None for r in held):
        return None
    return sum(max(0.0, r.held - r.cpu - r.run_delay) for r in held)


def _rank(r: ThreadShare) -> tuple:
    return (-(r.held or 0.0), -(r.waiting or 0.0), -(r.cpu or 0.0), r.tid)


def thread_table(pid: int, attribution: ThreadAttribution | None, book: TaskBook,
                 limit: int = 0, waiting_source: str = "", gils: int = 1,
                 unavailable: str = "") -> ThreadTable:
    """Rows for every thread seen, most GIL time first; with `limit`, the rows past it are
    folded into one row (tid 0, name "other (N threads)")."""
    att = attribution if attribution is not None and attribution.sampled > 0 else None
    tids = book.tids()
    if att is not None:
        tids |= {t for t in att.held if t} | set(att.waiting)
    rows = []
    for tid in tids:
        held = waiting = None
        if att is not None:
            held = att.held.get(tid, 0.0) / att.sampled
            waiting = att.waiting.get(tid, 0.0) / att.sampled
        rows.append(ThreadShare(tid, book.names.get(tid, "?"), held, waiting, book.cpu(tid),
                                tid in book.alive,
                                att.interpreter.get(tid) if att is not None else None,
                                run_delay=book.delay(tid)))
    rows.sort(key=_rank)
    off = held_off_cpu(rows) if att is not None else None
    if limit and len(rows) > limit + 1:
        rest = rows[limit:]

        def total(xs):
            return None if any(x is None for x in xs) else sum(xs)
        rows = rows[:limit] + [ThreadShare(
            0, f"{OTHER} ({len(rest)} threads)", total([r.held for r in rest]),
            total([r.waiting for r in rest]), total([r.cpu for r in rest]),
            any(r.alive for r in rest), None, len(rest), total([r.run_delay for r in rest]))]
    seconds = (book.t1 - book.t0) if book.t0 is not None and book.t1 is not None else 0.0
    waiting_threads = None
    if att is not None:
        waiting_threads = sum(att.waiters.values()) / att.sampled
    return ThreadTable(
        pid, seconds, att.sampled if att else 0.0, att.samples if att else 0,
        waiting_source if att else "", gils, tuple(rows),
        att.held.get(0, 0.0) / att.sampled if att else 0.0, waiting_threads,
        unavailable or ("" if att else "no GIL samples"), off)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def render(table: ThreadTable) -> str:
    """The per-thread section of `diagnose`."""
    if table.sampled_seconds:
        how = {"gil_requested": "each thread's own gil_requested flag",
               "futex": "threads blocked in futex() on the GIL's condvar"}.get(table.waiting_source, "?")
        head = (f"Threads (GIL sampled {table.sampled_seconds:.1f} s, {table.samples} samples"
                + (f", {table.gils} GILs: one per interpreter" if table.gils > 1 else "")
                + f"; waiting: {how}):")
    else:
        head = f"Threads (GIL shares not measured: {table.unavailable or 'no GIL samples'}):"
    if not table.rows:
        return head + "\n  no thread could be read"
    name_w = max(12, min(24, max(len(r.name) for r in table.rows)))
    interp = table.gils > 1
    lines = [head, f"  {'TID':>8}  {'name':<{name_w}}  {'GIL held':>8}  {'waiting':>7}  {'CPU':>5}"
             + ("  interpreter" if interp else "")]
    for r in table.rows:
        name = r.name if len(r.name) <= name_w else r.name[:name_w - 1] + "…"
        lines.append(f"  {r.tid or '':>8}  {name:<{name_w}}  {_pct(r.held):>8}  {_pct(r.waiting):>7}  "
                     f"{_pct(r.cpu):>5}"
                     + (f"  {'–' if r.interpreter is None else r.interpreter:>11}" if interp else "")
                     + ("  (ended)" if not r.alive else ""))
    if table.unknown_held >= 0.005:
        lines.append(f"  GIL held by a thread whose TID could not be read: {table.unknown_held:.0%}")
    found = sum(r.waiting or 0.0 for r in table.rows)
    if table.waiting_source == "futex" and table.waiting_threads and found < 0.9 * table.waiting_threads:
        lines.append(f"  The waiting shares add up to {found:.2f} threads, the GIL's own count to "
                     f"{table.waiting_threads:.2f}: a waiter just woken, runnable but not yet back "
                     f"in futex(), is only in the count.")
    return "\n".join(lines)
