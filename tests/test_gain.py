"""Pure functions of the derive stage: the time the GIL was held off the CPU (a lower bound),
the verdict it gives, and the gain processes would buy. Figures as measured by the live tests
(tests/test_verdict_blocked.py, bench/bench_gain.py)."""
from __future__ import annotations

import pytest

from exporter import score, syscalls, views
from exporter.score import Figures


def fig(**kw) -> Figures:
    base = dict(threads=5, cpu_cores=0.02, voluntary_per_second=634.0, involuntary_per_second=11.0,
                host_cpus=2, gil_enabled=True, interval_seconds=0.005, held_ratio=1.0,
                waiting_threads=3.2, switches_per_second=7.0, contended_ratio=1.0,
                gil_sampled_seconds=2.4, run_delay_cores=0.07, busy_threads=3.9,
                top_thread_share=0.29, host_idle_cpus=1.9)
    base.update(kw)
    return Figures(**base)


FROZEN = fig()  # 3.12: a ctypes.PyDLL usleep() loop beside 3 request threads
CPU = fig(threads=4, cpu_cores=1.0, voluntary_per_second=800, held_ratio=1.0, waiting_threads=2.0,
          switches_per_second=120, contended_ratio=0.99, run_delay_cores=0.02, busy_threads=3.0,
          top_thread_share=0.34, host_idle_cpus=0.9)


def test_held_off_cpu_is_the_held_time_beyond_cpu_and_run_delay():
    assert score.held_off_cpu(FROZEN) == pytest.approx(1.0 - 0.02 - 0.07)
    assert score.held_off_cpu(CPU) == 0.0
    # no schedstat: the run delay is estimated from involuntary switches, as the procfs score does
    no_sched = fig(run_delay_cores=None, involuntary_per_second=100.0)
    assert score.held_off_cpu(no_sched) == pytest.approx(1.0 - 0.02 - 100 * score.PREEMPT_SECONDS)
    assert score.held_off_cpu(fig(held_ratio=None)) is None
    assert score.held_off_cpu(fig(gil_enabled=False)) is None


def test_frozen_service_gets_its_own_kind_and_names_the_holder():
    holder = score.Holder(31857, "db-call", "clock_nanosleep()", "hold (app.py:21)")
    v = score.verdict(FROZEN, holder=holder)
    assert (v.contended, v.kind) == (True, "gil_held_while_blocked")
    assert "thread 31857 (db-call) held it while blocked in clock_nanosleep(), called from hold (app.py:21)" in v.headline
    assert "91% of the time at least" in v.headline
    text = " ".join(v.advice)
    assert "ctypes.CDLL" in text and "Py_BEGIN_ALLOW_THREADS" in text
    assert "ProcessPoolExecutor" not in text and "--workers" not in text and v.gain is None
    unnamed = score.verdict(FROZEN)
    assert unnamed.kind == "gil_held_while_blocked" and "gil-exporter diagnose PID` names it" in unnamed.headline
    # a server's command line does not turn it into "add workers"
    assert "--workers" not in " ".join(score.verdict(FROZEN, cmdline="gunicorn app:app").advice)


def test_cpu_bound_threads_keep_their_kind_with_the_gain():
    v = score.verdict(CPU)
    assert v.kind == "cpu_threads_serialized"
    g = v.gain
    # demand: the holder plus the waiters; spare: the process's own core plus the idle ones
    assert g == score.Gain(demand_threads=3.0, spare_cores=1.9, spare_measured=True, ratio=1.9)
    assert any(a.startswith("Gain: 3.0 threads wanted the GIL") and "1.9x" in a for a in v.advice)


@pytest.mark.parametrize("kw,demand,spare,ratio", [
    (dict(waiting_threads=1.0, host_idle_cpus=6.0, host_cpus=8), 2.0, 7.0, 2.0),   # 2 threads, room
    (dict(waiting_threads=3.0, host_idle_cpus=0.0), 4.0, 1.0, 1.0),                # host saturated
    (dict(waiting_threads=3.0, host_idle_cpus=None, host_cpus=4), 4.0, 4.0, 4.0),  # idle not read
    (dict(held_ratio=0.5, waiting_threads=0.5, cpu_cores=0.5, host_idle_cpus=3.5, host_cpus=4),
     1.0, 4.0, 2.0),   # half a core of Python, one thread's worth of demand: 2x, not 4x
    (dict(waiting_threads=9.0, host_idle_cpus=30.0, host_cpus=16), 10.0, 16.0, 10.0),  # capped by host
])
def test_gain_is_demand_capped_by_the_cores_the_host_can_spare(kw, demand, spare, ratio):
    g = score.gain(CPU.__class__(**{**CPU.__dict__, **kw}))
    assert (g.demand_threads, g.spare_cores, g.ratio) == pytest.approx((demand, spare, ratio))
    assert g.spare_measured is (kw.get("host_idle_cpus", 0.9) is not None)


def test_no_gain_without_gil_figures():
    assert score.gain(fig(held_ratio=None)) is None
    assert score.gain(fig(waiting_threads=None)) is None
    assert score.gain(fig(held_ratio=0.0)) is None


def test_syscall_names():
    assert syscalls.name(230, "x86_64") == "clock_nanosleep"
    assert syscalls.name(115, "aarch64") == "clock_nanosleep"
    assert syscalls.name(202, "x86_64") == "futex" and syscalls.name(98, "aarch64") == "futex"
    assert syscalls.name(9999, "x86_64") == "syscall 9999"
    assert syscalls.name(0, "riscv64") == "syscall 0"
    assert syscalls.describe(230, "", "x86_64") == "clock_nanosleep()"
    assert syscalls.describe(None, "do_sys_poll") == "kernel wait do_sys_poll"
    assert syscalls.describe(None, "") == ""


def test_one_busy_thread_gets_processes_advice_not_threads():
    one = fig(threads=2, cpu_cores=1.0, held_ratio=0.99, waiting_threads=0.01, contended_ratio=0.01,
              run_delay_cores=0.01, busy_threads=1.0, top_thread_share=0.99, host_idle_cpus=1.0,
              voluntary_per_second=20)
    v = score.verdict(one, cmdline="python -m waitress --threads=1 app")
    assert (v.contended, v.kind) == (False, "no_contention")
    assert any("more threads would only take turns" in a and "waitress processes" in a
               and "up to 2.0x" in a for a in v.advice), v.advice
    assert not score.verdict(CPU.__class__(**{**one.__dict__, "cpu_cores": 0.3})).advice


def test_a_thread_held_blocked_by_its_own_shares():
    assert score.thread_held_blocked(1.0, 0.0) and score.thread_held_blocked(0.3, 0.1)
    assert not score.thread_held_blocked(0.34, 0.30)   # a CPU-bound worker taking turns
    assert not score.thread_held_blocked(0.0, 0.0) and not score.thread_held_blocked(None, 0.0)
    assert not score.thread_held_blocked(0.9, None)    # CPU not measured: no claim


def test_a_holder_starved_of_cpu_is_not_blocked():
    """A CPU-bound holder on a host too busy to run it holds the GIL while runnable: its run
    delay covers the held time its CPU does not."""
    assert score.thread_held_blocked(0.9, 0.35)                 # without schedstat: no way to tell
    assert not score.thread_held_blocked(0.9, 0.35, 0.5)
    assert score.thread_held_blocked(0.9, 0.0, 0.05)            # blocked, and only briefly runnable


def test_the_per_thread_bound_decides_when_waiters_sat_runnable():
    """A frozen holder beside waiters that woke every 5 ms and then waited for a CPU: the
    process's bound (held time beyond every thread's CPU and run delay) drops under half the
    held time, the per-thread one (each holder's own) does not, and the larger bound holds."""
    frozen = score.Figures(threads=5, cpu_cores=0.02, voluntary_per_second=600,
                           involuntary_per_second=50, host_cpus=2, gil_enabled=True,
                           interval_seconds=0.005, held_ratio=0.98, waiting_threads=3.0,
                           switches_per_second=8, contended_ratio=0.97, gil_sampled_seconds=3.0,
                           run_delay_cores=0.7, busy_threads=3.0, top_thread_share=0.3,
                           host_idle_cpus=0.0)
    assert score.held_off_cpu(frozen) == pytest.approx(0.26)
    assert score.verdict(frozen).kind != "gil_held_while_blocked"
    both = score.Figures(**{**frozen.__dict__, "held_off_cpu_threads": 0.95})
    assert score.held_off_cpu(both) == pytest.approx(0.95)
    v = score.verdict(both, holder=score.Holder(42, "frozen-holder"))
    assert v.kind == "gil_held_while_blocked" and "thread 42 (frozen-holder)" in v.headline, v
    over = score.Figures(**{**frozen.__dict__, "held_off_cpu_threads": 1.5})
    assert score.held_off_cpu(over) == pytest.approx(0.98)       # never more than the time held


def _stat(name: str, cpu: float):
    from exporter.procfs import TaskStat
    return TaskStat(name, "S", cpu)


def test_the_table_bounds_held_time_by_each_holders_own_cpu_and_delay():
    """threadtable's bound over 3 s: a frozen holder (held all, no CPU, no delay), waiters that
    sat runnable (delay, never held), and a CPU-bound thread held back by a busy host (held
    time covered by its CPU and its run delay). The TaskBook's delay is over the same 3 s."""
    from exporter.attribution import GilSeen, TaskBook, ThreadAttribution
    from exporter.threadtable import thread_table
    att = ThreadAttribution()
    att.credit(2.0, [GilSeen(0, True, 11, (12, 13), 2)])   # 11 frozen, 12 and 13 waiting
    att.credit(1.0, [GilSeen(0, True, 14, (12,), 1)])      # 14 CPU-bound, starved
    book = TaskBook()
    book.observe({t: _stat(f"t{t}", 1.0) for t in (11, 12, 13, 14)}, 10.0,
                 {11: 5.0, 12: 5.0, 13: 5.0, 14: 5.0})
    book.observe({11: _stat("t11", 1.0), 12: _stat("t12", 1.03), 13: _stat("t13", 1.03),
                  14: _stat("t14", 1.4)}, 13.0, {11: 5.0, 12: 6.2, 13: 6.2, 14: 5.6})
    assert book.delay(12) == pytest.approx(0.4) and book.delay(14) == pytest.approx(0.2)
    table = thread_table(1, att, book)
    rows = {r.tid: r for r in table.rows}
    assert rows[11].held == pytest.approx(2 / 3) and rows[11].run_delay == pytest.approx(0.0)
    # held 1/3, CPU 0.4/3, delay 0.6/3 of the 3 s: all covered
    assert table.held_off_cpu == pytest.approx(2 / 3)
    assert views.table_holder(table) == score.Holder(11, "t11")
    earlier = book.copy()
    book.observe({11: _stat("t11", 1.0), 14: _stat("t14", 1.0)}, 14.0, {11: 5.1, 14: 0.5})
    later = book.since(earlier)        # 14 is a new thread under a reused TID: all its delay
    assert later.delay(11) == pytest.approx(0.1) and later.delay(14) == pytest.approx(0.5)


def test_the_table_makes_no_claim_without_run_delay():
    from exporter.attribution import GilSeen, TaskBook, ThreadAttribution
    from exporter.threadtable import thread_table
    att = ThreadAttribution()
    att.credit(1.0, [GilSeen(0, True, 11, (), 0)])
    book = TaskBook()
    book.observe({11: _stat("t11", 0.0)}, 0.0)
    book.observe({11: _stat("t11", 0.0)}, 1.0)
    table = thread_table(1, att, book)
    assert table.rows[0].run_delay is None and table.held_off_cpu is None
