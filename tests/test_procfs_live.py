"""procfs's kept files against real processes: what the gates skip is what did not change."""
from __future__ import annotations

import subprocess
import sys
import time

from exporter import procfs

# Four threads blocked for good, two that switch about a thousand times a second.
SCRIPT = """
import threading, time
blocked = threading.Event()
for _ in range(4):
    threading.Thread(target=blocked.wait, daemon=True).start()
def switching():
    while True:
        time.sleep(0.001)
for _ in range(2):
    threading.Thread(target=switching, daemon=True).start()
print("ready", flush=True)
blocked.wait()
"""


def _start():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_kept_thread_files_skip_only_threads_that_did_not_switch():
    proc = _start()
    files = procfs.ThreadFiles(proc.pid)
    try:
        prev, _ = files.read(7)
        time.sleep(0.3)  # the threads that block have blocked by now
        total = 0
        for _ in range(20):
            before = procfs.task_ctx_switches(proc.pid)
            reads = files.status_reads
            ours, _ = files.read(7)
            after = procfs.task_ctx_switches(proc.pid)
            assert set(ours) == set(before) == set(after)
            # Exact: each thread's counts lie between two direct reads around ours.
            for tid, (vol, invol) in ours.items():
                assert before[tid][0] <= vol <= after[tid][0], tid
                assert before[tid][1] <= invol <= after[tid][1], tid
            # Only threads that switched since our last reading had their status read: the
            # four blocked ones and the main thread are skipped (one more allowed for a thread
            # on a CPU at both readings, whose run time moved without a switch).
            moved = sum(1 for tid in after if after[tid] != prev.get(tid))
            assert files.status_reads - reads <= moved + 1
            total += files.status_reads - reads
            prev = ours
            time.sleep(0.02)
        # The two switching threads were read (not every time on a starved host: a thread
        # that has not run since the last reading has not switched either).
        assert total >= 10
    finally:
        files.close()
        proc.kill()
        proc.wait()
