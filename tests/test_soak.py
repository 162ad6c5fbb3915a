"""Churn soak, 60-second version of bench/soak.py (the long run: 10 min, 1,000 processes).

About 150 matching processes start and end under the real daemon (lifetimes 0.2-3 s; sleep,
CPU and thread-churn workloads under every pyenv CPython; half SIGKILLed at a random moment,
many while their GIL is being sampled; some spawned at a just-freed PID when
/proc/sys/kernel/ns_last_pid is writable). Asserts:

1. no crash, no traceback and no error line in the log, pygil_exporter_errors_total 0;
2. no series for a process that was dead before a scrape (scrapes run right after each reap
   and twice a second), nothing left once every process ended;
3. every *_total counter monotonic per (pid, start time);
4. open fds and RSS at the end within 10 % of their level after warm-up.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from soak import Soak, table  # noqa: E402

SECONDS = 60
PROCESSES = 150


def test_churn_soak_60s():
    soak = Soak(SECONDS, PROCESSES, log=lambda m: print(m, flush=True))
    s = soak.run()
    report = table(s) + "\n" + "\n".join(s.examples) + "\n" + soak.log_tail
    print(report)

    # the soak really churned
    assert s.started == PROCESSES, report
    assert s.killed >= PROCESSES // 4 and s.exited_by_themselves >= PROCESSES // 4, report
    assert s.seen_in_metrics >= PROCESSES // 2, report
    assert s.killed_mid_sample >= 10, report
    assert s.scrapes >= SECONDS and s.scrape_failures == 0, report
    if soak.can_reuse:
        assert s.reuses >= 1, report

    # 1. no crash, no error traceback, no unexpected error
    assert s.exporter_alive, report
    assert s.tracebacks == 0, report
    assert s.log_errors == 0, report
    assert s.errors == {}, report

    # 2. no series for a dead process
    assert s.dead_series == 0, report
    assert s.leftover_after_quiesce == 0, report

    # 3. counters monotonic per live process
    assert s.counter_decreases == 0, report

    # 4. fds and RSS flat after warm-up
    assert s.fd_warm > 0 and s.rss_warm_kib > 0, report
    assert abs(s.fd_end - s.fd_warm) <= 0.10 * s.fd_warm, report
    assert abs(s.rss_end_kib - s.rss_warm_kib) <= 0.10 * s.rss_warm_kib, report
