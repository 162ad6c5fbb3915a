"""`gil-exporter top`: a live terminal view of every Python process the exporter can see.

The figures are the daemon's own: one Monitor (config → discover → probe → score) ticks once a
second, and each refresh shows its snapshot, most contended first. Enter opens one process's
threads, read from /proc (TID, name, state, CPU) with the thread that holds the GIL now marked
(its thread state's native TID, and the function it is in, read as `diagnose --stacks` does).

The terminal UI is drawn with rich (the optional extra `gil-exporter[top]`); keys are read from
the terminal in cbreak mode: up/down (or k/j) select, enter (or right) opens, escape (left,
backspace) goes back, q quits.
"""
from __future__ import annotations

import os
import select
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from exporter import gil, procfs, syscalls
from exporter.gil.frames import Frame, StackReader, TornStack
from exporter.monitor import Monitor
from exporter.threadsampler import ThreadSampler
from exporter.views import ProcessView

EXIT_OK, EXIT_ERROR = 0, 2
#: /proc thread states of a thread that is on no CPU and waits for none: interruptible sleep and
#: uninterruptible (disk) sleep. A GIL holder in one of them is blocked with the GIL held.
BLOCKED_STATES = ("S", "D")
RICH_MISSING = ("gil-exporter top: needs the Python package `rich`: "
                "pip install 'gil-exporter[top]'")

# ---------------------------------------------------------------- rows (no terminal here)


@dataclass(frozen=True)
class ProcessRow:
    pid: int
    target: str
    command: str
    threads: int
    cores: float | None      # CPU cores used over the window
    score: float | None      # contention score, None while unknown
    waiting: float | None    # mean threads waiting for the GIL
    held: float | None       # share of sampled time the GIL was held
    probe: str                  # "ok" or why the GIL is not read
    python: str
    namespace: str = ""         # its pod's Kubernetes namespace, "" when not known


def process_rows(views: list[ProcessView], namespace: str | None = None) -> list[ProcessRow]:
    """One row per process, most contended first (unknown scores last, then by CPU); with
    `namespace`, only the processes of pods in that Kubernetes namespace."""
    rows = []
    for v in views:
        ns = dict(v.kube).get("namespace", "")
        if namespace is not None and ns != namespace:
            continue
        f = v.figures
        rows.append(ProcessRow(
            pid=v.pid, target=v.target, command=" ".join((v.cmdline or v.exe).split()),
            threads=v.threads, cores=f.cpu_cores if f else None, score=v.score,
            waiting=f.waiting_threads if f else None, held=f.held_ratio if f else None,
            probe=v.gil_probe, python=v.python_version, namespace=ns))
    rows.sort(key=lambda r: (r.score is None, -(r.score or 0.0), -(r.cores or 0.0), r.pid))
    return rows


@dataclass(frozen=True)
class ThreadRow:
    tid: int
    name: str
    state: str
    cpu: float | None           # share of one core since the previous refresh
    holds_gil: bool                # the GIL's holder at this refresh
    gil_held: float | None = None     # per-thread shares: see ThreadShares
    gil_waiting: float | None = None


#: The hook per-thread GIL shares come through (issue 9, part 1): given a pid, the share of the
#: last seconds each thread (by TID) held the GIL and waited for it, {tid: (held, waiting)}, or
#: None when they are not measured (then top shows no such columns: it never shows a share it
#: did not measure). `SampledShares` samples the process being viewed; an object with a
#: close() method is told when the view leaves that process.
ThreadShares = Callable[[int], "dict[int, tuple[float, float]] | None"]


def no_thread_shares(pid: int) -> dict[int, tuple[float, float]] | None:
    return None


class SampledShares:
    """The ThreadShares of `top`: one `threadsampler.ThreadSampler` on the process being viewed
    (and no other), shares over its last `window` seconds. close() stops the sampling; the
    view calls it when it leaves the process."""

    def __init__(self, rate_hz: float = 100.0, window: float = 5.0) -> None:
        self.rate_hz = rate_hz
        self.window = window
        self._sampler: ThreadSampler | None = None

    def __call__(self, pid: int) -> dict[int, tuple[float, float]] | None:
        if self._sampler is None or self._sampler.pid != pid:
            self.close()
            self._sampler = ThreadSampler(pid, self.rate_hz).start()
        return self._sampler.table(window=self.window).shares() or None

    def close(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.stop()


class ThreadCpu:
    """Per-thread CPU of one process between two reads of /proc/PID/task/*/stat."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, float]] = {}   # tid -> (monotonic time, CPU seconds)
        self._pid = 0

    def rows(self, pid: int, holder_tid: int = 0,
             shares: dict[int, tuple[float, float]] | None = None) -> list[ThreadRow]:
        if pid != self._pid:
            self._last, self._pid = {}, pid
        now = time.monotonic()
        stats = procfs.task_stats(pid)
        rows = []
        for tid, st in stats.items():
            prev = self._last.get(tid)
            cpu = None
            if prev is not None and now > prev[0] and st.cpu_seconds >= prev[1]:
                cpu = (st.cpu_seconds - prev[1]) / (now - prev[0])
            held, waiting = (shares or {}).get(tid, (None, None))
            rows.append(ThreadRow(tid, st.name, st.state, cpu, tid == holder_tid, held, waiting))
        self._last = {tid: (now, st.cpu_seconds) for tid, st in stats.items()}
        rows.sort(key=lambda r: (not r.holds_gil, -(r.cpu or 0.0), r.tid))
        return rows


@dataclass(frozen=True)
class Holder:
    locked: bool
    waiters: int
    tid: int                    # 0 when the GIL is free or the holder's TID is unreadable
    frame: Frame | None      # innermost Python frame of the holder, None if not read


class HolderProbe:
    """Who holds one process's GIL now. The GIL is located in a background thread (as the
    daemon does); then each read() is one read of the GIL and of the holder's stack."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status = "locating the GIL"
        self._gil: gil.GilReader | None = None
        self._stacks: StackReader | None = None
        self._closed = False
        self._lock = threading.Lock()     # the locating thread hands over the readers under it
        threading.Thread(target=self._open, name="top-locate", daemon=True).start()

    def _open(self) -> None:
        try:
            loc = gil.locate(self.pid)
            reader = gil.GilReader(loc)
        except gil.ProbeUnavailable as exc:
            self.status = f"GIL not readable: {exc.reason}"
            return
        try:
            stacks: StackReader | None = StackReader(loc)
        except gil.ProbeUnavailable:
            stacks = None         # before 3.11: the holder is known, not its TID or code
        with self._lock:
            if not self._closed:
                self._gil, self._stacks, self.status = reader, stacks, ""
                return
        reader.close()                    # closed while it was being located
        if stacks:
            stacks.close()

    def read(self) -> Holder | None:
        reader, stacks = self._gil, self._stacks
        if reader is None:
            return None
        try:
            g = reader.read()
        except gil.ProbeUnavailable as exc:
            self.status = f"GIL not readable: {exc.reason}"
            self.close()
            return None
        tid, frame = 0, None
        if g.locked and stacks is not None:
            tid = stacks.native_thread_id(g.holder)
            try:
                stack = stacks.stack(g.holder)
                frame = stack[0] if stack else None
            except (TornStack, gil.ProbeUnavailable):
                pass
        return Holder(g.locked, g.waiters, tid, frame)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            readers, self._gil, self._stacks = (self._gil, self._stacks), None, None
        for r in readers:
            if r is not None:
                r.close()


# ---------------------------------------------------------------- keys

KEYS = {
    b"\x1b[A": "up", b"\x1bOA": "up", b"k": "up",
    b"\x1b[B": "down", b"\x1bOB": "down", b"j": "down",
    b"\x1b[C": "enter", b"\x1bOC": "enter", b"\r": "enter", b"\n": "enter",
    b"\x1b[D": "back", b"\x1bOD": "back", b"\x7f": "back", b"\x08": "back", b"\x1b": "back",
    b"q": "quit", b"Q": "quit",
    b"n": "namespace",
}


def parse_keys(data: bytes) -> list[str]:
    """Key names in a chunk read from the terminal; unknown keys and sequences are skipped."""
    out = []
    i = 0
    while i < len(data):
        if data[i:i + 3] in KEYS:
            out.append(KEYS[data[i:i + 3]])
            i += 3
        elif data[i:i + 1] == b"\x1b" and data[i + 1:i + 2] in (b"[", b"O"):
            i += 2                      # another escape sequence: skip to its final byte
            while i < len(data) and not 0x40 <= data[i] <= 0x7E:
                i += 1
            i += 1
        else:
            name = KEYS.get(data[i:i + 1])
            if name:
                out.append(name)
            i += 1
    return out


# ---------------------------------------------------------------- the view


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


class TopView:
    """The state of the screen: the process list or one process's threads, and the keys."""

    def __init__(self, monitor: Monitor, thread_shares: ThreadShares = no_thread_shares,
                 namespace: str | None = None) -> None:
        self.monitor = monitor
        self.thread_shares = thread_shares
        self.namespace = namespace  # Kubernetes namespace shown, None: every process
        self.namespaces: list[str] = []  # the namespaces of the processes seen at the last refresh
        self.rows: list[ProcessRow] = []
        self.selected = 0           # pid of the selected process (kept across re-sorting)
        self.opened: ProcessRow | None = None
        self.threads: list[ThreadRow] = []
        self.holder: Holder | None = None
        self._holder_probe: HolderProbe | None = None
        self._cpu = ThreadCpu()
        self.gone = ""

    # ------------------------------------------------------------ data
    def refresh(self) -> None:
        views = self.monitor.snapshot()
        self.namespaces = sorted({ns for v in views for k, ns in v.kube if k == "namespace" and ns})
        self.rows = process_rows(views, self.namespace)
        if self.rows and self.selected not in {r.pid for r in self.rows}:
            self.selected = self.rows[0].pid
        if self.opened is not None:
            self._refresh_threads()

    def _refresh_threads(self) -> None:
        pid = self.opened.pid
        row = next((r for r in self.rows if r.pid == pid), None)
        if row is not None:
            self.opened = row
        self.holder = self._holder_probe.read() if self._holder_probe else None
        try:
            self.threads = self._cpu.rows(pid, self.holder.tid if self.holder else 0,
                                          self.thread_shares(pid))
        except (procfs.ProcessGone, PermissionError) as exc:
            self.gone = f"process {pid} exited" if isinstance(exc, procfs.ProcessGone) else str(exc)
            self.back()

    # ------------------------------------------------------------ keys
    def key(self, name: str) -> bool:
        """Apply one key; False when it asks to quit."""
        if name == "quit":
            return False
        if name in ("up", "down") and self.opened is None and self.rows:
            pids = [r.pid for r in self.rows]
            i = pids.index(self.selected) if self.selected in pids else 0
            i = max(0, min(len(pids) - 1, i + (-1 if name == "up" else 1)))
            self.selected = pids[i]
        elif name == "enter" and self.opened is None:
            row = next((r for r in self.rows if r.pid == self.selected), None)
            if row is not None:
                self.open(row)
        elif name == "back":
            self.back()
        elif name == "namespace" and self.opened is None:
            self.next_namespace()
        return True

    def next_namespace(self) -> None:
        """Every process, then each namespace seen in turn, then every process again."""
        order: list[str | None] = [None, *self.namespaces]
        if self.namespace not in order:
            order.append(self.namespace)
        self.namespace = order[(order.index(self.namespace) + 1) % len(order)]
        self.refresh()

    def open(self, row: ProcessRow) -> None:
        self.gone = ""
        self.opened = row
        self._holder_probe = HolderProbe(row.pid)
        self._cpu = ThreadCpu()
        self.threads, self.holder = [], None
        try:
            self.threads = self._cpu.rows(row.pid)
        except (procfs.ProcessGone, PermissionError):
            pass

    def back(self) -> None:
        if self._holder_probe is not None:
            self._holder_probe.close()
        self._holder_probe = None
        self.opened = None
        close = getattr(self.thread_shares, "close", None)
        if close is not None:         # stop sampling the process we leave
            close()

    def close(self) -> None:
        self.back()

    # ------------------------------------------------------------ drawing
    def render(self, height: int = 50):
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        if self.opened is None:
            return self._render_processes(height, box, Group, Table, Text)
        return self._render_threads(height, box, Group, Table, Text)

    def _render_processes(self, height, box, Group, Table, Text):
        host = self.monitor.host()
        shown = f" in namespace {self.namespace}" if self.namespace is not None else ""
        keys = ", n: next namespace" if self.namespaces or self.namespace is not None else ""
        head = Text.assemble(
            ("gil-exporter top", "bold"),
            f"  {len(self.rows)} Python processes{shown}, {host.cpus} CPUs  "
            f"(most contended first; ↑/↓ select, enter: threads{keys}, q: quit)")
        t = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False)
        for name, kw in (("PID", dict(justify="right")), ("TARGET", {}),
                         ("THREADS", dict(justify="right")), ("CORES", dict(justify="right")),
                         ("GIL SCORE", dict(justify="right")), ("WAITING", dict(justify="right")),
                         ("HELD", dict(justify="right")), ("GIL PROBE", {}),
                         ("COMMAND", dict(ratio=1, no_wrap=True, overflow="ellipsis"))):
            t.add_column(name, **kw)
        rows = self.rows
        room = max(1, height - 6)
        if len(rows) > room:            # keep the selection on screen
            i = next((k for k, r in enumerate(rows) if r.pid == self.selected), 0)
            start = min(max(0, i - room // 2), len(rows) - room)
            rows = rows[start:start + room]
        for r in rows:
            t.add_row(str(r.pid), r.target, str(r.threads), _num(r.cores), _num(r.score),
                      _num(r.waiting), _pct(r.held), r.probe, r.command,
                      style="reverse" if r.pid == self.selected else None)
        parts = [head, t]
        if not self.rows:
            parts.append(Text(f"no Python process{shown} found yet (the first scan takes a second)"))
        if self.gone:
            parts.append(Text(self.gone, style="dim"))
        return Group(*parts)

    def _render_threads(self, height, box, Group, Table, Text):
        r = self.opened
        head = Text.assemble(
            ("gil-exporter top", "bold"), f"  pid {r.pid} ({r.target}), Python {r.python or '?'}: "
            f"{r.threads} threads, {_num(r.cores)} cores, GIL score {_num(r.score)}, "
            f"held {_pct(r.held)}, {_num(r.waiting)} waiting  (esc: back, q: quit)")
        lines = [head, Text(r.command, style="dim", overflow="ellipsis", no_wrap=True)]
        probe = self._holder_probe
        h = self.holder
        if h is None:
            lines.append(Text(probe.status if probe and probe.status else "GIL: not read yet"))
        elif not h.locked:
            lines.append(Text("GIL: free at this refresh"))
        else:
            who = f"TID {h.tid}" if h.tid else "a thread whose TID this version does not give"
            name = next((t.name for t in self.threads if t.tid == h.tid), "")
            where = (f" in {h.frame.qualname} ({h.frame.filename}:{h.frame.line})" if h.frame else "")
            state = next((t.state for t in self.threads if t.tid == h.tid), "")
            blocked = ""
            if state in BLOCKED_STATES:  # holding the GIL while asleep or in the kernel
                call = syscalls.describe(*procfs.thread_blocked_in(r.pid, h.tid))
                blocked = f", BLOCKED ({state}{' in ' + call if call else ''})"
            lines.append(Text(f"GIL: held by {who}{f' ({name})' if name else ''}{where}{blocked}, "
                              f"{h.waiters} thread(s) waiting", style="bold red" if blocked else None))
        shares = any(t.gil_held is not None for t in self.threads)
        t = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False)
        t.add_column("TID", justify="right")
        t.add_column("NAME")
        t.add_column("STATE")
        t.add_column("CPU %", justify="right")
        t.add_column("GIL")
        if shares:
            t.add_column("GIL HELD", justify="right")
            t.add_column("WAITING", justify="right")
        for row in self.threads[:max(1, height - 8)]:
            cells = [str(row.tid), row.name, row.state, _pct(row.cpu),
                     ("● holds, blocked" if row.state in BLOCKED_STATES else "● holds")
                     if row.holds_gil else ""]
            if shares:
                cells += [_pct(row.gil_held), _pct(row.gil_waiting)]
            t.add_row(*cells, style="bold" if row.holds_gil else None)
        lines.append(t)
        return Group(*lines)


# ---------------------------------------------------------------- the loop


def run_top(config, refresh: float = 1.0, namespace: str | None = None,
            pod_labels: Callable | None = None) -> int:
    """`pod_labels`: the daemon's pod lookup (cli._pod_resolver), for the namespace filter."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        print(RICH_MISSING, file=sys.stderr)
        return EXIT_ERROR
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        print("gil-exporter top: needs a terminal (stdin and stdout)", file=sys.stderr)
        return EXIT_ERROR
    if not refresh > 0:
        print("gil-exporter top: --refresh must be positive", file=sys.stderr)
        return EXIT_ERROR
    import termios
    import tty

    monitor = Monitor(config, tick_seconds=min(1.0, refresh), pod_resolver=pod_labels)
    view = TopView(monitor, thread_shares=SampledShares(), namespace=namespace)
    console = Console()
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    monitor.start()
    try:
        tty.setcbreak(fd)
        with Live(console=console, screen=True, auto_refresh=False) as live:
            monitor.ready.wait(5)
            next_refresh = 0.0
            while True:
                now = time.monotonic()
                if now >= next_refresh:
                    view.refresh()
                    next_refresh = now + refresh
                live.update(view.render(console.height), refresh=True)
                ready, _, _ = select.select([fd], [], [], max(0.0, next_refresh - time.monotonic()))
                if ready:
                    data = os.read(fd, 64)
                    if not data:
                        return EXIT_OK
                    if not all(view.key(k) for k in parse_keys(data)):
                        return EXIT_OK
                    if view.opened is not None and not view.threads:
                        next_refresh = 0.0
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        view.close()
        monitor.stop()
