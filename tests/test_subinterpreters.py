"""Subinterpreters with their own GIL (issue 9, part 3): every GIL of a process is found and
sampled; per-thread rows say which interpreter each thread belongs to.

3.12 makes them with the private `_xxsubinterpreters.create(isolated=True)` (pyenv's 3.12 on
the host, and on sid's glibc), 3.14 and 3.15 with `concurrent.interpreters` (Debian sid's, after
pivot_root). Each workload runs N CPU threads inside each of two subinterpreters, while the main
interpreter sleeps: contended inside each interpreter, parallel across them.
"""
from __future__ import annotations

import re
import subprocess
import time

import placements
import pytest

from exporter import gil
from exporter.threadsampler import ThreadSampler
from exporter.threadtable import render

CASES = {  # interpreter name -> workload
    "3.12 pyenv": "subinterpreters_312",
    "3.12 pyenv on sid's glibc": "subinterpreters_312",
    "3.14 Debian sid": "subinterpreters",
    "3.15 Debian sid": "subinterpreters",
}
INTERPRETERS = {i.name: i for i in placements.interpreters()}


def _start(name: str, threads: int = 2) -> placements.PlacedWorkload:
    if name not in INTERPRETERS:
        pytest.skip(f"{name}: not installed here (pyenv)")
    interp = placements.require(INTERPRETERS[name])
    return placements.start(CASES[name], interp, placements.usual_placement(interp), threads=threads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_gil_is_found_and_each_thread_is_in_its_interpreter(name, report):
    w = _start(name)
    try:
        locs = gil.locate_all(w.pid)
        assert len(locs) == 3 and len({loc.address for loc in locs}) == 3, locs
        assert [loc.interpreter_id for loc in locs] == [0, 1, 2]
        assert locs[0].address == gil.locate(w.pid).address
        # listed again (as the daemon does every scan): the known ones are taken as they are
        again = gil.other_gils(locs[0], {loc.address: loc for loc in locs[1:]})
        assert len(again) == 2 and all(a is b for a, b in zip(again, locs[1:]))
        sampler = ThreadSampler(w.pid).start()
        time.sleep(3)
        table = sampler.stop()
        text = render(table)
        assert table.gils == 3 and "3 GILs" in text, text
        workers = [r for r in table.rows if r.tid != w.pid]
        assert len(workers) == 4, text
        by_interp = {}
        for r in workers:
            by_interp.setdefault(r.interpreter, []).append(r)
        assert sorted(by_interp) == [1, 2], text            # two CPU threads in each
        assert all(len(rs) == 2 for rs in by_interp.values()), text
        for rs in by_interp.values():                         # each GIL always held by one of its two
            assert sum(r.held for r in rs) >= 0.7, text
        main = next(r for r in table.rows if r.tid == w.pid)
        assert main.held < 0.05 and main.interpreter in (None, 0), text
        report.record(name, "subinterpreter GILs", " ".join(
            f"interp {i}: held {sum(r.held for r in rs):.2f}" for i, rs in sorted(by_interp.items())))
    finally:
        w.stop()


# ------------------------------------------------------------------ the daemon


def _gil_series(exp, pid: int, name: str) -> dict:
    """{interpreter label or None: value} of one GIL family for one process, from one scrape."""
    return {s.labels.get("interpreter"): s.value for s in exp.scrape()
            if s.name == name and s.labels.get("pid") == str(pid)}


def test_interpreter_label_and_verdicts_with_interpreter_pool_executor(exporter, tmp_path, report):
    """3.14's InterpreterPoolExecutor, on the real Debian 3.14 after pivot_root, next to an
    ordinary process of the same interpreter: the ordinary one keeps exactly its series (no
    `interpreter` label); the pools get one series per interpreter. One worker running CPU
    threads inside its interpreter is contended (and the verdict names that interpreter); two
    workers with one CPU thread each run in parallel, each on its own GIL: not GIL-bound.
    Per-thread series carry the interpreter too, and add up per interpreter."""
    from harness import exporter_command, write_config
    interp = placements.require(INTERPRETERS["3.14 Debian sid"])
    ordinary = placements.start("cpu", interp, "pivot_root", threads=2)
    contended = placements.start("pool_contended", interp, "pivot_root", threads=2)
    parallel = placements.start("pool_parallel", interp, "pivot_root", threads=2)
    try:
        cfg = write_config(tmp_path, f"""
targets:
  - name: ordinary
    match: {{pid: {ordinary.pid}}}
  - name: contended
    match: {{pid: {contended.pid}}}
  - name: parallel
    match: {{pid: {parallel.pid}}}
scan_interval_seconds: 1
window_seconds: 4
sampling:
  per_thread: true
""")
        exp = exporter("--config", str(cfg))
        score = "pygil_gil_contention_score"
        exp.wait_for(lambda: len(_gil_series(exp, parallel.pid, score)) == 3
                     and len(_gil_series(exp, contended.pid, score)) == 2
                     and _gil_series(exp, ordinary.pid, score), timeout=90)
        time.sleep(5)                        # a whole window with every GIL sampled
        samples = exp.scrape()
        mine = [s for s in samples if s.name.startswith("pygil_") and s.labels.get("pid")]
        # the ordinary process: no series of its has an interpreter label
        assert not [s for s in mine if s.labels["pid"] == str(ordinary.pid) and "interpreter" in s.labels]
        for w, ids in ((contended, {"0", "1"}), (parallel, {"0", "1", "2"})):
            gil_series = [s for s in mine if s.labels["pid"] == str(w.pid) and s.name.startswith("pygil_gil_")
                          and s.name != "pygil_gil_enabled"]
            assert gil_series and all("interpreter" in s.labels for s in gil_series), gil_series
            assert {s.labels["interpreter"] for s in gil_series} == ids
            # the process's own series (CPU, threads, info) keep their labels
            assert not [s for s in mine if s.labels["pid"] == str(w.pid) and s.name.startswith("pygil_process_")
                        and "interpreter" in s.labels]
        # the same families for every process: a pool's have one more label (interpreter)
        def shape(pid: int, drop: set) -> set:
            return {(s.name, frozenset(set(s.labels) - drop)) for s in mine if s.labels["pid"] == str(pid)}
        assert shape(contended.pid, {"interpreter"}) == shape(parallel.pid, {"interpreter"}) \
            == shape(ordinary.pid, set()), (shape(ordinary.pid, set()) ^ shape(contended.pid, {"interpreter"}))
        c = _gil_series(exp, contended.pid, score)
        p = _gil_series(exp, parallel.pid, score)
        # inside interpreter 1, one of its two CPU threads waits while the other holds its GIL
        # (not all the time on a saturated host, see test_daemon_samples_every_gil; how long
        # the GIL is held at all depends on the CPU the host gives)
        held = _gil_series(exp, contended.pid, "pygil_gil_held_seconds_total")
        busy = _gil_series(exp, contended.pid, "pygil_gil_contended_seconds_total")
        assert held["1"] > 1.0 and busy["1"] >= 0.3 * held["1"], (held, busy)
        pbusy = _gil_series(exp, parallel.pid, "pygil_gil_contended_seconds_total")
        assert sum(pbusy.values()) <= 0.05 * busy["1"], pbusy   # nobody waits: one thread per GIL
        assert c["1"] > c["0"] and c["0"] <= 0.2, c
        assert max(p.values()) <= 0.3, p
        # per-thread series: per interpreter, they add up to that interpreter's held time
        for w in (contended, parallel):
            held = _gil_series(exp, w.pid, "pygil_gil_held_seconds_total")
            threads: dict = {}
            for s in exp.scrape():
                if s.name == "pygil_thread_gil_held_seconds_total" and s.labels["pid"] == str(w.pid):
                    threads[s.labels["interpreter"]] = threads.get(s.labels["interpreter"], 0.0) + s.value
            for i in held:
                if held[i] > 0 or i in threads:
                    assert abs(threads[i] - held[i]) <= 1e-6 * max(1.0, held[i]), (i, threads, held)
        # the verdicts, as diagnose gives them
        out = subprocess.run(exporter_command() + ["diagnose", str(contended.pid), "--seconds", "4"],
                             capture_output=True, text=True, timeout=180)
        found = re.search(r"the GIL of interpreter 1 contended (\d+)% of the time", out.stdout)
        assert found and "the most contended of 2 interpreters with a GIL of their own" in out.stdout, \
            out.stdout + out.stderr
        # CONTENDED (exit 1) from 50 %: reached unless the host starves the process
        assert out.returncode == (1 if int(found.group(1)) >= 50 else 0), out.stdout + out.stderr
        out = subprocess.run(exporter_command() + ["diagnose", str(parallel.pid), "--seconds", "4"],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "OK: subinterpreters run in parallel, each on its own GIL" in out.stdout, out.stdout
        report.record("3.14 Debian sid", "InterpreterPoolExecutor scores",
                      f"contended {c}, parallel {p}")
    finally:
        for w in (ordinary, contended, parallel):
            w.stop()


def _gil_totals(exp, pid: int) -> tuple[dict, dict, dict]:
    """Per interpreter: GIL held seconds, contended seconds, per-thread held seconds summed."""
    mine = [s for s in exp.scrape() if s.labels.get("pid") == str(pid)]
    held = {s.labels["interpreter"]: s.value for s in mine if s.name == "pygil_gil_held_seconds_total"}
    busy = {s.labels["interpreter"]: s.value for s in mine if s.name == "pygil_gil_contended_seconds_total"}
    assert not [s for s in mine if s.name.startswith("pygil_process_") and "interpreter" in s.labels]
    threads: dict = {}
    for s in mine:
        if s.name == "pygil_thread_gil_held_seconds_total":
            threads[s.labels["interpreter"]] = threads.get(s.labels["interpreter"], 0.0) + s.value
    return held, busy, threads


def _sched(pid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable waiting for one) summed over the process's threads
    (schedstat); None without schedstat."""
    import os
    ran = delayed = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
            ran, delayed = ran + int(fields[0]), delayed + int(fields[1])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    return ran / 1e9, delayed / 1e9


@pytest.mark.parametrize("name", sorted(CASES))
def test_daemon_samples_every_gil(name, exporter, tmp_path, report):
    """The daemon on 3.12 (_xxsubinterpreters) and 3.14/3.15 (concurrent.interpreters): one
    set of GIL series per interpreter, labelled 0, 1, 2; inside each subinterpreter one of its
    two CPU threads waits whenever the other holds its GIL; per-thread series add up to each
    interpreter's held time while no labelled thread has lost its label."""
    from harness import write_config
    w = _start(name)
    try:
        cfg = write_config(tmp_path, f"""
targets:
  - name: subs
    match: {{pid: {w.pid}}}
scan_interval_seconds: 1
window_seconds: 3
sampling:
  per_thread: true
""")
        exp = exporter("--config", str(cfg))
        exp.wait_for(lambda: set(_gil_series(exp, w.pid, "pygil_gil_contention_score")) == {"0", "1", "2"},
                     timeout=90)
        held0, busy0, _ = _gil_totals(exp, w.pid)
        sched0 = _sched(w.pid)
        time.sleep(3)
        held, busy, threads = _gil_totals(exp, w.pid)
        sched1 = _sched(w.pid)
        # What the host gave: the share of their runnable time the target's threads sat
        # waiting for a CPU (schedstat), over the same seconds.
        starved = None
        if sched0 and sched1:
            ran, delayed = (sched1[0] - sched0[0]), (sched1[1] - sched0[1])
            starved = delayed / (ran + delayed) if ran + delayed > 0 else None
        for i in ("1", "2"):
            dheld, dbusy = held[i] - held0[i], busy[i] - busy0[i]
            assert dheld > 0.5, (held0, held)
            # While one thread of interpreter i holds its GIL the other waits for it, unless it
            # sits runnable without a CPU (or runs between two requests): the bound rests on
            # how starved the host kept the target, not on a fixed share that load pushes
            # across (0.3 of the totals since start failed at 0.27, startup included).
            if starved is not None:
                bound = dheld * (1.0 - starved) - 0.15 * dheld - 0.1
                assert dbusy >= bound, (i, dheld, dbusy, starved)
                print(f"{name} interpreter {i}: held {dheld:.2f} s, contended {dbusy:.2f} s over 3 s; "
                      f"threads starved {starved:.2f} of their runnable time; bound {bound:.2f} s")
            else:  # no schedstat: nothing measured to bound it by
                assert dbusy > 0, (i, dheld, dbusy)
            assert abs(threads[i] - held[i]) <= 1e-6 * max(1.0, held[i]), (i, threads, held)
        assert held["0"] <= 0.2 * max(held["1"], held["2"]), held
        report.record(name, "daemon: GIL held by interpreter",
                      ", ".join(f"{i}: {held[i]:.1f} s" for i in sorted(held)))
    finally:
        w.stop()
