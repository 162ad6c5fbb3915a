"""procfs's parsers on fixture files (tests/data/procfs): what a live process rarely shows."""
from __future__ import annotations

import ast
import os
import time
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


def _read_status(tmp_path: Path, data: bytes) -> tuple[int, int]:
    """read_ctx_switches on a kept fd of a file holding `data`, as procfs keeps a thread's."""
    path = tmp_path / "status"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return procfs.read_ctx_switches(fd)
    finally:
        os.close(fd)


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
    assert _read_status(tmp_path, big) == (1234, 56)


def test_the_cut_that_raised_before(tmp_path):
    """A Groups: line sized so that the first 4,096 bytes end just after the last key: the old
    parser raised ValueError there, and failed the whole pass."""
    base = _with_groups(0)
    tail = base[base.rfind(b"nonvoluntary_ctxt_switches:") + len(b"nonvoluntary_ctxt_switches:"):]
    pad = procfs.STATUS_READ - (len(base) - len(tail))
    padded = base.replace(b"Groups:\t\n", b"Groups:\t" + b"1 " * (pad // 2) + b" " * (pad % 2) + b"\n")
    assert padded[:procfs.STATUS_READ].endswith(b"nonvoluntary_ctxt_switches:")
    assert _read_status(tmp_path, padded) == (1234, 56)


def test_a_status_without_the_lines_counts_nothing(tmp_path):
    assert _read_status(tmp_path, b"Name:\tx\nState:\tS (sleeping)\n") == (0, 0)


# --------------------------------------------------------------------------- a whole procfs tree
# tests/data/procfs/tree is a procfs in files, read through procfs's own code with its root
# pointed there (procfs.set_root): 4242 a containerised python (PID 17 in its namespace, cgroup
# v1) whose comm holds ')' and spaces, with a second thread that has no schedstat; 4243 that
# thread's top-level entry; 4244 a zombie; 4343 a process in cgroup v2 on a kernel without NSpid.

TREE = DATA / "tree"
CLK = os.sysconf("SC_CLK_TCK")
COMM = "py) R 1 (x"


@pytest.fixture
def tree():
    before = procfs.PROC
    procfs.set_root(str(TREE))
    try:
        yield TREE
    finally:
        procfs.set_root(before)


def test_the_root_is_where_every_path_is_built(tree):
    import psutil
    assert procfs.PROC == str(TREE) and psutil.PROCFS_PATH == str(TREE)
    assert procfs.path(4242, "task", "4243") == f"{TREE}/4242/task/4243"
    assert sorted(procfs.pids()) == [4242, 4243, 4244, 4343]
    assert procfs.exists(4242) and not procfs.exists(4245)


def test_set_root_refuses_the_bare_slash():
    with pytest.raises(ValueError):
        procfs.set_root("/")
    assert procfs.PROC == "/proc"


def test_a_comm_with_parentheses_and_spaces(tree):
    """The fields start after the last ')': a naive split would read state "R" and 1 thread."""
    st = procfs.process_stat(4242)
    assert (st.start_time, st.threads) == (438711, 2)
    assert (st.cpu_user, st.cpu_system) == (250 / CLK, 50 / CLK)
    assert procfs.process_state(4242) == "S"
    assert procfs.start_time(4242) == 438711
    marks = procfs.identity_marks(4242)
    assert marks[:5] == (COMM.encode(), b"438711", b"94758057332736", b"94758057352617", b"140726056155248")
    assert marks[5] == b"python3\x00-c\x00while 1: pass\x00"
    assert marks[6] == (TREE / "4242").stat().st_uid
    stats = procfs.task_stats(4242)
    assert stats == {4242: procfs.TaskStat(COMM, "S", 240 / CLK),
                     4243: procfs.TaskStat("worker (1)", "R", 60 / CLK)}


def test_kept_stat_file_reads_the_same_fields(tree):
    f = procfs.StatFile(4242, 438711)
    try:
        assert f.read() == procfs.process_stat(4242) and f.alive()
    finally:
        f.close()
    with pytest.raises(procfs.ProcessGone):
        procfs.StatFile(4242, 438712)  # another process under the same PID


def test_a_thread_entry_and_a_zombie_are_no_processes(tree):
    with pytest.raises(procfs.ProcessGone):
        procfs.start_time(4243)  # /proc/4243 answers for a thread of 4242 (Tgid 4242)
    with pytest.raises(procfs.ProcessGone):
        procfs.process_stat(4244)
    assert procfs.process_state(4244) == "" and procfs.process_state(4245) == ""
    assert procfs.maps(4244) == []
    from exporter.gil import ProbeUnavailable
    from exporter.gil.memory import read_maps
    with pytest.raises(ProbeUnavailable) as zombie:
        read_maps(4244)
    with pytest.raises(ProbeUnavailable) as unmapped:
        read_maps(4343)
    assert (zombie.value.reason, unmapped.value.reason) == ("exited", "not_cpython")


def test_maps_deleted_spaces_undecodable_and_anonymous(tree):
    maps = procfs.maps(4242)
    assert [m.path for m in maps][:4] == ["/usr/bin/python3.12 (deleted)", "/usr/bin/python3.12 (deleted)",
                                          "[heap]", "/opt/my app/lib/libpython3.12.so.1.0"]
    assert maps[4].path.encode("utf-8", "surrogateescape") == b"/tmp/caf\xe9.so"
    assert (maps[5].path, maps[5].perms, maps[5].inode) == ("", "rw-p", 0)
    assert (maps[1].start, maps[1].end, maps[1].offset, maps[1].inode) == (
        0x55d0c0a01000, 0x55d0c0a02000, 0x1000, 1234)
    assert maps[-1].path == "[stack]" and len(maps) == 7


def test_a_thread_without_schedstat(tree):
    """4243 has no schedstat file: it is left out of the run times, not of the switches."""
    ctx = {4242: (1000, 50), 4243: (234, 6)}
    sched = {4242: (2000000000, 300000000)}
    assert procfs.task_ctx_switches(4242) == ctx
    assert procfs.task_schedstat(4242) == sched
    files = procfs.ThreadFiles(4242)
    try:
        assert files.read(2) == (ctx, sched)
        assert files.read(2) == (ctx, sched)  # kept fds, one pread each
    finally:
        files.close()
    assert procfs.task_schedstat(4343) == {4343: (9000000000, 1000000)}


def test_nspid_and_a_kernel_without_it(tree):
    assert procfs.ns_pids(4242) == (4242, 17)
    assert procfs.ns_pids(4343) == (4343,)


def test_cgroup_v1_and_v2(tree):
    from exporter import kube
    v1 = kube.parse_cgroup(procfs.cgroup(4242))
    v2 = kube.parse_cgroup(procfs.cgroup(4343))
    assert v1 == kube.ContainerRef("deadbeef-0000-4111-a222-333344445555", "5555aaaa" * 8)
    assert v2 == kube.ContainerRef("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "7777bbbb" * 8)
    assert kube.read_container_ref(4242) == v1  # through procfs's root
    assert kube.read_container_ref(4244) is None  # no cgroup file: gone, not an error
    with pytest.raises(procfs.ProcessGone):
        procfs.cgroup(4244)


def test_read_container_ref_keeps_its_own_root():
    from exporter import kube
    assert procfs.PROC == "/proc"
    assert kube.read_container_ref(4343, proc_root=str(TREE)) == kube.ContainerRef(
        "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "7777bbbb" * 8)


def test_syscalls_wait_channels_and_capabilities(tree):
    assert procfs.task_syscalls(4242) == {
        4242: (202, 0x7f1000621000, 0x80, 0, 0, 0, 0, 0x7ffd00020f00, 0x7f10000a1b2c), 4243: (-1,)}
    assert procfs.thread_blocked_in(4242, 4242) == (202, "futex_wait_queue")
    assert procfs.thread_blocked_in(4242, 4243) == (None, "")
    assert procfs.has_cap_sys_ptrace(4242) is True  # CapEff bit 19
    assert procfs.has_cap_sys_ptrace(4343) is False


def test_links_and_magic_links_under_the_root(tree):
    assert procfs.readlink(4242, "exe") == "/usr/bin/python3.12 (deleted)"
    with pytest.raises(FileNotFoundError):
        procfs.readlink(4244, "exe")  # the raw OSError: a zombie has no exe, and is not gone
    assert procfs.is_magic_link(procfs.path(4242, "exe"))
    assert procfs.is_magic_link(procfs.path(4242, "map_files", "55d0c0a00000-55d0c0a01000"))
    assert not procfs.is_magic_link("/proc/4242/exe")  # not under this root
    assert not procfs.is_magic_link(procfs.path(4242, "root") + "/usr/bin/python3.12")
    assert not procfs.is_magic_link(procfs.path(4242, "map_files"))


def test_magic_links_under_the_default_root():
    assert procfs.is_magic_link("/proc/1/exe") and procfs.is_magic_link("/proc/1/map_files/1-2")
    assert not procfs.is_magic_link("/proc/self/exe") and not procfs.is_magic_link("/proc/1/root/x")
    assert not procfs.is_magic_link("/procx/1/exe") and not procfs.is_magic_link("/usr/bin/python3")


def _real_totals() -> list[float]:
    """Seconds per CPU since boot, read from the host's /proc/stat by hand."""
    with open("/proc/stat") as f:
        return [sum(int(x) for x in line.split()[1:11]) / CLK
                for line in f if line.startswith("cpu") and not line.startswith("cpu ")]


def test_host_cpu_times_follow_the_root():
    """The kept /proc/stat fd is dropped with the old root, both ways."""
    assert procfs.PROC == "/proc"
    procfs.host_cpu_times()  # keeps the host's fd
    procfs.set_root(str(TREE))
    try:
        assert procfs.host_cpu_times() == [(1550 / CLK, 4150 / CLK), (2550 / CLK, 5150 / CLK)]
    finally:
        procfs.set_root("/proc")
    t0 = time.monotonic()
    before = _real_totals()
    after = [total for _busy, total in procfs.host_cpu_times()]
    elapsed = time.monotonic() - t0
    # the host's own figures, read by hand just before: equal but for the time between the two
    # reads (a second of slack: iowait may step back a tick), not the tree's 41.5 and 51.5 s
    assert len(after) == len(before)
    assert all(b - 1.0 <= a <= b + elapsed + 1.0 for a, b in zip(after, before)), (after, before)


# --------------------------------------------------------------------------- the one door
_FS_CALLS = {"open", "readlink", "stat", "lstat", "listdir", "scandir", "exists", "isdir", "islink",
             "realpath", "read_head", "open_regular", "Path"}
#: targetfile reopens its own O_PATH fd through /proc/self/fd: this process's fd table, not a
#: target's, and it cannot import procfs (procfs imports it).
_OWN_FDS = ("targetfile.py", "/proc/self/fd/")


def _proc_literal(node) -> str:
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        node = node.values[0]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        if node.value == "/proc" or node.value.startswith("/proc/"):
            return node.value
    return ""


def _proc_opens(source: str):
    """(line, literal) of every filesystem call given a /proc path written out."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in _FS_CALLS:
            continue
        for arg in list(node.args) + [k.value for k in node.keywords]:
            head = _proc_literal(arg)
            if head:
                yield node.lineno, head


def test_the_scan_sees_what_main_had():
    """The check below finds the reads this module took over (as they were written before)."""
    before = ('os.readlink(f"/proc/{pid}/exe")\nos.open(f"/proc/{pid}/mem", os.O_RDONLY)\n'
              'os.path.exists(f"/proc/{pid}")\nraise ProbeUnavailable("x", f"/proc/{pid}: gone")\n')
    assert [line for line, _ in _proc_opens(before)] == [1, 2, 3]


def test_no_module_but_procfs_opens_a_proc_path():
    root = Path(__file__).resolve().parent.parent / "exporter"
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "procfs.py":
            continue
        for line, head in _proc_opens(path.read_text()):
            if (path.name, head) != _OWN_FDS:
                found.append(f"{path.relative_to(root.parent)}:{line}: {head}")
    assert found == []


def test_status_is_read_again_only_when_schedstat_moved(tmp_path):
    """ThreadFiles reads a thread's status only when its schedstat line changed (every
    context switch moves it); a kernel that keeps no schedstat ("0 0 0") gets every read."""
    import shutil
    root = tmp_path / "proc"
    shutil.copytree(TREE, root, symlinks=True)
    task = root / "4242" / "task" / "4242"
    status = (task / "status").read_text()
    before = procfs.PROC
    procfs.set_root(str(root))
    files = procfs.ThreadFiles(4242)
    try:
        ctx, _ = files.read(2)
        assert ctx[4242] == (1000, 50) and files.status_reads == 2
        # A status that changed under an unchanged schedstat line is not read: the kernel
        # moves both together, so the fixture's change is one no kernel makes.
        (task / "status").write_text(status.replace("voluntary_ctxt_switches:\t1000",
                                                    "voluntary_ctxt_switches:\t1001"))
        ctx, _ = files.read(2)
        assert ctx[4242] == (1000, 50) and files.status_reads == 3  # 4243: no schedstat
        (task / "schedstat").write_text("2000100000 300000000 1501\n")
        ctx, sched = files.read(2)
        assert ctx[4242] == (1001, 50) and sched[4242] == (2000100000, 300000000)
        assert files.status_reads == 5
        (task / "schedstat").write_text("0 0 0\n")
        files.read(2)
        files.read(2)
        assert files.status_reads == 9
    finally:
        files.close()
        procfs.set_root(before)
