"""Which code holds the GIL while other threads wait for it (`gil-exporter diagnose PID --stacks`).

A background thread (sampling.SamplingLoop) reads the target's GIL at jittered times (as the
daemon's sampler does). When it is held and at least one thread waits, it reads the Python
stack of the holder (`last_holder`), then reads the GIL again: if another thread took it
meanwhile, the stack may mix two threads' frames and the sample is dropped. Everything is read
with os.pread on /proc/PID/mem: the target is never stopped, attached to or written.

Each kept sample stands for an equal share of the contended time (the sampling times are
random), so a function's share of the samples is its share of the time the GIL was held while
others waited: `own` when it was the innermost frame, `total` when it was anywhere on the stack.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from exporter import gil
from exporter.gil.frames import Frame, StackReader, TornStack
from exporter.sampling import Jitter, SamplingLoop, unavailable

NO_PYTHON_FRAME = "(no Python frame)"


@dataclass(frozen=True)
class FunctionShare:
    qualname: str
    filename: str
    line: int            # the line it was at most often when innermost (its def line if never)
    firstlineno: int
    own: float           # share of contended samples with this function innermost
    total: float         # share of contended samples with it anywhere on the stack
    own_samples: int


@dataclass(frozen=True)
class StackProfile:
    pid: int
    python_version: str
    seconds: float
    samples: int             # GIL reads
    held: int                # ... with the GIL held
    contended: int           # ... held while at least one thread waited
    dropped: dict[str, int]  # contended samples whose stack was not kept, by reason
    stacks: dict[tuple[Frame, ...], int] = field(default_factory=dict)  # innermost first
    unavailable: str = ""    # why no stack could be read at all ("" when stacks were read)
    stack_cpu_seconds: float = 0.0   # sampler CPU time spent reading stacks (kept or dropped)
    sampler_cpu_seconds: float = 0.0  # sampler thread CPU time in all (GIL reads and stacks)

    @property
    def kept(self) -> int:
        return sum(self.stacks.values())

    @property
    def cpu_us_per_stack(self) -> float | None:
        n = self.contended
        return self.stack_cpu_seconds / n * 1e6 if n else None

    def top_functions(self, n: int = 10) -> list[FunctionShare]:
        kept = self.kept
        if not kept:
            return []
        own: Counter = Counter()
        total: Counter = Counter()
        lines: dict[tuple, Counter] = {}
        for frames, count in self.stacks.items():
            if not frames:
                own[(NO_PYTHON_FRAME, "", 0)] += count
                continue
            leaf = frames[0]
            own[leaf.function] += count
            lines.setdefault(leaf.function, Counter())[leaf.line] += count
            for fn in {f.function for f in frames}:
                total[fn] += count
        total.update({k: v for k, v in own.items() if k[0] == NO_PYTHON_FRAME})
        ranked = sorted(total, key=lambda k: (-own[k], -total[k], k))[:n]
        out = []
        for key in ranked:
            qualname, filename, first = key
            line = lines[key].most_common(1)[0][0] if key in lines else first
            out.append(FunctionShare(qualname, filename, line, first, own[key] / kept,
                                     total[key] / kept, own[key]))
        return out

    def as_dict(self, n: int = 10) -> dict:
        return {
            "pid": self.pid, "python_version": self.python_version, "seconds": self.seconds,
            "samples": self.samples, "held": self.held, "contended": self.contended,
            "kept": self.kept, "dropped": dict(self.dropped), "unavailable": self.unavailable,
            "cpu_us_per_stack": self.cpu_us_per_stack,
            "sampler_cpu_seconds": self.sampler_cpu_seconds,
            "top_functions": [f.__dict__ for f in self.top_functions(n)],
        }


class StackSampler:
    """Samples the GIL holder's stack of one process from a daemon thread (a
    `sampling.SamplingLoop` it is the consumer of).

    start() returns at once (locating the GIL happens in the thread); stop() returns the
    StackProfile. A process that exits or forbids access ends the sampling; the profile then
    holds what was read until then, and `unavailable` says why when nothing could be read.
    """

    def __init__(self, pid: int, rate_hz: float = 100.0, jitter: float = 0.5,
                 location: gil.GilLocation | None = None) -> None:
        self.schedule = Jitter(rate_hz, jitter)
        self.pid = pid
        self.location = location
        self.version = location.identity.version if location else ""
        self._loop = SamplingLoop(self.schedule, self, "gil-stacks")
        self.samples = self.held = self.contended = 0
        self.dropped: Counter = Counter()
        self.stacks: Counter = Counter()
        self.unavailable = ""
        self.stack_cpu = 0.0
        self._gil: gil.GilReader | None = None
        self._frames: StackReader | None = None

    # ------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Locate the GIL (unless given) and open the readers. Raises ProbeUnavailable."""
        if self.location is None:
            self.location = gil.locate(self.pid)
            self.version = self.location.identity.version
        self._gil = gil.GilReader(self.location)
        try:
            self._frames = StackReader(self.location)
        except BaseException:
            self._gil.close()
            raise

    def start(self) -> StackSampler:
        self._loop.start()
        return self

    def running(self) -> bool:
        return self._loop.running()

    def stop(self) -> StackProfile:
        self._loop.stop(timeout=5)
        self.close()
        return self.profile()

    def end(self, why: gil.ProbeUnavailable | None) -> None:
        """Stopped, or `why` ended the sampling: said only when no stack was kept."""
        if why is not None and not self.kept:
            self.unavailable = unavailable(why)

    def close(self) -> None:
        for r in (self._gil, self._frames):
            if r is not None:
                r.close()

    @property
    def sampler_cpu(self) -> float:
        """CPU time of the sampler thread from its first sample on (set when it ends)."""
        return self._loop.sampling_cpu_seconds

    def profile(self) -> StackProfile:
        started, ended = self._loop.started, self._loop.ended
        end = ended or time.monotonic()
        return StackProfile(self.pid, self.version, max(0.0, end - started) if started else 0.0,
                            self.samples, self.held, self.contended, dict(self.dropped),
                            dict(self.stacks), self.unavailable, self.stack_cpu, self.sampler_cpu)

    @property
    def kept(self) -> int:
        return sum(self.stacks.values())

    # ------------------------------------------------------------ one sample
    def sample(self) -> tuple[Frame, ...] | None:
        """Read the GIL once and, when contended, the holder's stack. Returns the stack kept,
        or None. Raises ProbeUnavailable when the target is gone or unreadable."""
        reading = self._gil.read()
        self.samples += 1
        if not reading.locked:
            return None
        self.held += 1
        if reading.waiters <= 0:
            return None
        self.contended += 1
        t0 = time.thread_time()
        try:
            frames = self._frames.stack(reading.holder)
            _interval, holder, locked, switch, _w, _e = self._gil.read_raw()
            if not locked or holder != reading.holder or switch != reading.switch_number:
                raise TornStack("GIL changed hands during the read")
        except TornStack as exc:
            self.dropped[exc.reason] += 1
            return None
        finally:
            self.stack_cpu += time.thread_time() - t0
        self.stacks[frames] += 1
        return frames


# ---------------------------------------------------------------- text


def _short(path: str, width: int = 48) -> str:
    """The path's last components that fit in `width`, after ".../"."""
    if len(path) <= width:
        return path
    tail = path[-(width - 4):]
    cut = tail.find("/")
    return ".../" + (tail[cut + 1:] if cut >= 0 else tail)


def render(profile: StackProfile, n: int = 10) -> str:
    """The `--stacks` section of `diagnose`: top functions by share of contended time."""
    head = "Code holding the GIL while other threads waited"
    if profile.unavailable:
        return f"{head}: not measured ({profile.unavailable})"
    if not profile.samples:
        return f"{head}: not measured (no GIL samples)"
    lines = [f"{head} ({profile.kept} stacks from {profile.contended} contended of "
             f"{profile.samples} samples over {profile.seconds:.1f} s"
             + (f"; {sum(profile.dropped.values())} dropped: "
                + ", ".join(f"{k} {v}" for k, v in sorted(profile.dropped.items(), key=lambda kv: -kv[1]))
                if profile.dropped else "") + "):"]
    top = profile.top_functions(n)
    if not top:
        lines.append("  no stack: the GIL never had waiters while sampled" if not profile.contended
                     else "  no stack could be read intact (see dropped)")
        return "\n".join(lines)
    lines.append(f"  {'own':>5} {'total':>6}  {'function':<40} where")
    for f in top:
        where = f"{_short(f.filename)}:{f.line}" if f.filename else ""
        lines.append(f"  {f.own:>5.0%} {f.total:>6.0%}  {f.qualname:<40} {where}")
    return "\n".join(lines)
