"""One jittered sampling loop for the samplers that read one process from a thread of their own
(`threadsampler.ThreadSampler`, `stacks.StackSampler`), as CPython's sampling profiler feeds a
`Collector`: the loop owns the thread, the jittered waits, the reader lifetime (open before the
first sample, close whatever happened) and the sampler's CPU time; its consumer owns what one
sample reads and what it adds up.

Samples are taken at jittered times, each wait uniform in period * [1 - jitter, 1 + jitter),
so they cannot lock onto the target's 5 ms switch-interval rhythm. The daemon's `GilSampler`
keeps its own tick loop (planned ticks, strata, and its C twin in _hotloop.c) and takes only
its `Jitter` from here.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from exporter.gil import ProbeUnavailable


@dataclass(frozen=True)
class Jitter:
    """The sampling rate and its jitter: the waits between samples."""
    rate_hz: float
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not self.rate_hz > 0:
            raise ValueError("rate_hz must be > 0")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")

    @property
    def period(self) -> float:
        return 1.0 / self.rate_hz

    @property
    def lo(self) -> float:
        """The shortest wait."""
        return self.period * (1.0 - self.jitter)

    @property
    def span(self) -> float:
        """The waits' spread above `lo`."""
        return 2.0 * self.period * self.jitter

    @property
    def max_gap(self) -> float:
        """The longest gap between samples that sample-and-hold credits: beyond it the sampler
        was starved, and holding the old state would invent data."""
        return 3.0 * self.period * (1.0 + self.jitter)

    def wait(self, rand: Callable[[], float]) -> float:
        return self.lo + self.span * rand()


def unavailable(exc: ProbeUnavailable) -> str:
    """What a sampler says when it could not read: the reason, and its detail if any."""
    return f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason


class Ended(Exception):
    """Raised by a consumer's open() or sample(): nothing (more) to sample. The loop ends
    without end(); close() still runs."""


class Consumer(Protocol):
    """What a `SamplingLoop` drives, every call in the loop's thread."""

    def open(self) -> None:
        """Locate the target and open the readers. Raises ProbeUnavailable or Ended."""

    def sample(self) -> object:
        """One sample (the return value is the consumer's own). Raises ProbeUnavailable when
        the target is gone or unreadable, Ended when there is nothing more to sample."""

    def end(self, why: ProbeUnavailable | None) -> None:
        """The sampling ended: stopped (`why` None), or open() or sample() raised `why`."""

    def close(self) -> None:
        """Close the readers; called once, whatever happened."""


class SamplingLoop:
    """A daemon thread that opens its consumer, samples it at jittered times until stopped or
    the target is gone, and closes it.

    `started` and `ended` are the monotonic times of the first wait and of the end (0 before);
    `cpu_seconds` the thread's CPU time in all, `sampling_cpu_seconds` from `started` on (both
    set when the thread ends).
    """

    def __init__(self, schedule: Jitter, consumer: Consumer, name: str) -> None:
        self.schedule = schedule
        self.consumer = consumer
        self.name = name
        self.started = self.ended = 0.0
        self.cpu_seconds = self.sampling_cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SamplingLoop:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float) -> None:
        """Ask the thread to end; waits up to `timeout` for it (0: not at all)."""
        self._stop.set()
        if self._thread is not None and timeout > 0:
            self._thread.join(timeout=timeout)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, seconds: float) -> bool:
        """For a consumer that waits on its own (no target to sample yet): True once stopped."""
        return self._stop.wait(seconds)

    def _run(self) -> None:
        cpu0 = time.thread_time()
        cpu1 = None
        try:
            try:
                self.consumer.open()
                self.started, cpu1 = time.monotonic(), time.thread_time()
                rand = random.Random().random
                while not self._stop.wait(self.schedule.wait(rand)):
                    self.consumer.sample()
                self.consumer.end(None)
            except ProbeUnavailable as exc:
                self.consumer.end(exc)
            except Ended:
                pass
        finally:
            self.ended = time.monotonic()
            self.consumer.close()
            cpu = time.thread_time()
            self.cpu_seconds = cpu - cpu0
            self.sampling_cpu_seconds = cpu - cpu1 if cpu1 is not None else 0.0
