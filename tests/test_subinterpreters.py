"""Subinterpreters with their own GIL (issue 9, part 3): every GIL of a process is found and
sampled; per-thread rows say which interpreter each thread belongs to.

3.12 makes them with the private `_xxsubinterpreters.create(isolated=True)` (pyenv's 3.12 on
the host, and on sid's glibc), 3.14 and 3.15 with `concurrent.interpreters` (Debian sid's, after
pivot_root). Each workload runs N CPU threads inside each of two subinterpreters, while the main
interpreter sleeps: contended inside each interpreter, parallel across them.
"""
from __future__ import annotations

import time

import pytest

import placements
from exporter import gil
from exporter.attribution import ThreadSampler, render

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
