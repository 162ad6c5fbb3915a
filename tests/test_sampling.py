"""sampling.SamplingLoop's contract with its consumer, and Jitter's checks (issue 17).

The loop runs in a real thread on the real clock; the consumer here only records what it is
asked to do (no target process: what the samplers read is tested in test_threads.py and
test_stacks.py). Timing bounds are one-sided: load can only make waits longer.
"""
from __future__ import annotations

import math
import threading
import time

import pytest

from exporter.gil import ProbeUnavailable
from exporter.sampler import GilSampler
from exporter.sampling import Ended, Jitter, SamplingLoop, unavailable


class Recorder:
    """A consumer that records its calls; `fail_at` makes the n-th sample raise `fail`."""

    def __init__(self, fail_at: int = 0, fail: BaseException | None = None,
                 open_fails: BaseException | None = None) -> None:
        self.calls: list[str] = []
        self.times: list[float] = []
        self.why: list = []
        self.fail_at, self.fail, self.open_fails = fail_at, fail, open_fails
        self.closed = threading.Event()

    def open(self) -> None:
        self.calls.append("open")
        if self.open_fails is not None:
            raise self.open_fails

    def sample(self) -> None:
        self.times.append(time.monotonic())
        self.calls.append("sample")
        if self.fail_at and len(self.times) == self.fail_at:
            raise self.fail

    def end(self, why) -> None:
        self.calls.append("end")
        self.why.append(why)

    def close(self) -> None:
        self.calls.append("close")
        self.closed.set()


def _until(cond, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stop_ends_then_closes_and_waits_are_jittered_never_short():
    schedule = Jitter(200.0, 0.5)
    rec = Recorder()
    loop = SamplingLoop(schedule, rec, "test-loop").start()
    _until(lambda: len(rec.times) >= 30)
    loop.stop(timeout=10)
    assert not loop.running()
    n = len(rec.times)
    assert rec.calls == ["open"] + ["sample"] * n + ["end", "close"]
    assert rec.why == [None]
    gaps = [b - a for a, b in zip(rec.times, rec.times[1:])]
    # every wait is at least lo (a busy host only lengthens them), and no more samples than
    # the time the loop ran allows at that shortest wait
    assert min(gaps) >= schedule.lo - 1e-4
    assert n <= (loop.ended - loop.started) / schedule.lo + 1
    assert loop.started > 0 and loop.ended >= rec.times[-1]
    assert 0 <= loop.sampling_cpu_seconds <= loop.cpu_seconds


def test_target_gone_ends_the_loop_with_the_reason():
    gone = ProbeUnavailable("exited", "pid 1234")
    rec = Recorder(fail_at=3, fail=gone)
    loop = SamplingLoop(Jitter(500.0), rec, "test-loop").start()
    assert rec.closed.wait(20)
    _until(lambda: not loop.running())
    assert rec.calls == ["open", "sample", "sample", "sample", "end", "close"]
    assert rec.why == [gone]
    assert unavailable(gone) == "exited: pid 1234" and unavailable(ProbeUnavailable("x")) == "x"


def test_ended_closes_without_end():
    rec = Recorder(fail_at=2, fail=Ended())
    SamplingLoop(Jitter(500.0), rec, "test-loop").start()
    assert rec.closed.wait(20)
    assert rec.calls == ["open", "sample", "sample", "close"]


def test_open_failure_ends_with_the_reason_and_never_samples():
    denied = ProbeUnavailable("permission_denied", "pid 1")
    rec = Recorder(open_fails=denied)
    loop = SamplingLoop(Jitter(100.0), rec, "test-loop").start()
    assert rec.closed.wait(20)
    _until(lambda: not loop.running())
    assert rec.calls == ["open", "end", "close"] and rec.why == [denied]
    assert loop.started == 0.0 and loop.sampling_cpu_seconds == 0.0


def test_a_consumer_waiting_on_its_own_sees_the_stop():
    loop = SamplingLoop(Jitter(100.0), Recorder(), "test-loop")
    t0 = time.monotonic()
    assert loop.wait(0.05) is False and time.monotonic() - t0 >= 0.05 - 1e-3
    loop.stop(timeout=0)
    assert loop.wait(60) is True


def test_jitter_bounds():
    j = Jitter(100.0, 0.5)
    assert j.period == pytest.approx(0.01)
    assert (j.lo, j.span, j.max_gap) == pytest.approx((0.005, 0.01, 0.045))
    assert j.wait(lambda: 0.0) == j.lo and j.wait(lambda: 0.999999) < j.lo + j.span
    assert Jitter(50.0, 0.0).wait(lambda: 0.7) == pytest.approx(0.02)


@pytest.mark.parametrize("rate,jitter", [(0, 0.5), (-1, 0.5), (math.nan, 0.5), (100, 1.0),
                                         (100, -0.1), (100, math.nan)])
def test_rate_and_jitter_out_of_range_are_refused_by_every_sampler(rate, jitter):
    with pytest.raises(ValueError):
        Jitter(rate, jitter)
    with pytest.raises(ValueError):
        GilSampler(rate_hz=rate, jitter=jitter)
