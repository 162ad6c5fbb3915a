"""procfs's parsers on fixture files (tests/data/procfs): what a live process rarely shows."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from exporter import procfs

DATA = Path(__file__).resolve().parent / "data" / "procfs"
STATUS = (DATA / "status-thread.txt").read_bytes()


def _with_groups(n: int) -> bytes:
    """The fixture with a Groups: line of n supplementary groups (setgroups(2) allows 65,536)."""
    groups = b"Groups:\t" + b" ".join(str(100000 + i).encode() for i in range(n)) + b"\n"
    lines = [groups if line.startswith(b"Groups:") else line + b"\n" for line in STATUS.splitlines()]
    return b"".join(lines)


def _fd(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "status"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_status_fixture():
    assert procfs.parse_ctx_switches(STATUS) == (1234, 56)


@pytest.mark.parametrize("cut", [
    STATUS.rfind(b"nonvoluntary_ctxt_switches:") + len(b"nonvoluntary_ctxt_switches:"),  # after the key
    STATUS.rfind(b"\t56") + 2,          # inside the number
    STATUS.rfind(b"\nvoluntary_ctxt_switches:") + 5,      # inside the first key
])
def test_a_cut_status_is_incomplete_not_a_number(cut):
    assert procfs.parse_ctx_switches(STATUS[:cut]) is None


def test_a_status_longer_than_one_read_is_read_whole(tmp_path):
    big = _with_groups(65536)
    assert len(big) > procfs.STATUS_READ
    fd = _fd(tmp_path, big)
    try:
        assert procfs.read_ctx_switches(fd) == (1234, 56)
    finally:
        os.close(fd)


def test_the_cut_that_raised_before(tmp_path):
    """A Groups: line sized so that the first 4,096 bytes end just after the last key: the old
    parser raised ValueError there, and failed the whole pass."""
    base = _with_groups(0)
    tail = base[base.rfind(b"nonvoluntary_ctxt_switches:") + len(b"nonvoluntary_ctxt_switches:"):]
    pad = procfs.STATUS_READ - (len(base) - len(tail))
    padded = base.replace(b"Groups:\t\n", b"Groups:\t" + b"1 " * (pad // 2) + b" " * (pad % 2) + b"\n")
    assert padded[:procfs.STATUS_READ].endswith(b"nonvoluntary_ctxt_switches:")
    fd = _fd(tmp_path, padded)
    try:
        assert procfs.read_ctx_switches(fd) == (1234, 56)
    finally:
        os.close(fd)


def test_a_status_without_the_lines_counts_nothing(tmp_path):
    fd = _fd(tmp_path, b"Name:\tx\nState:\tS (sleeping)\n")
    try:
        assert procfs.read_ctx_switches(fd) == (0, 0)
    finally:
        os.close(fd)
