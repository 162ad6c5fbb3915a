"""The daemon without privilege: run as `nobody` against another user's CPython process.

/proc figures need no privilege, so the process is still found (no config: every CPython
process) and measured; the GIL probe says why it cannot read memory, and the score comes
from /proc (method="procfs").
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from workloads import start_workload

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


def _system_python_matches() -> bool:
    """A world-executable interpreter with the venv's minor version (so its C extensions load)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    out = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True).stdout.strip()
    return out == str(sys.version_info[:2])


@pytest.fixture(scope="module")
def world_readable_install():
    """The package and its dependencies copied where `nobody` can read them."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    if not _system_python_matches():
        pytest.skip(f"{SYSTEM_PYTHON} is missing or not Python {sys.version_info[0]}.{sys.version_info[1]}")
    d = Path(tempfile.mkdtemp(prefix="gil-exporter-nobody-"))
    try:
        shutil.copytree(ROOT / "exporter", d / "exporter")
        site = Path(sysconfig.get_paths()["purelib"])
        for name in os.listdir(site):
            if name.startswith(("psutil", "prometheus_client", "yaml", "_yaml", "elftools", "jsonschema",
                                "referencing", "rpds", "attrs", "attr", "bcrypt", "typing_extensions")):
                src = site / name
                (shutil.copytree if src.is_dir() else shutil.copy)(src, d / name)
        for root, dirs, files in os.walk(d):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_unprivileged_exporter_falls_back_to_procfs(world_readable_install):
    with start_workload("cpu", threads=3, argv_tag="nobody-target") as w:
        env = {"PYTHONPATH": str(world_readable_install), "PATH": "/usr/bin:/bin", "HOME": "/"}
        log = tempfile.NamedTemporaryFile(prefix="gil-exporter-nobody-", suffix=".log", delete=False)
        proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-m", "exporter", "--web.listen-address", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=log, env=env, cwd="/", user="nobody", group="nogroup"
            if _has_group("nogroup") else None)
        try:
            base = _wait_for_base(log.name, proc)
            found = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                samples = _scrape(base)
                mine = [s for s in samples if s.labels.get("pid") == str(w.pid)]
                score = [s for s in mine if s.name in ("pygil_gil_contention_score",
                                                       "pygil_gil_contention_score_unknown")]
                if score:
                    found = mine
                    break
                time.sleep(0.5)
            assert found, Path(log.name).read_text()[-2000:]
            info = [s for s in found if s.name == "pygil_target_info"][0]
            assert info.labels["target"] == "python"
            assert info.labels["gil_probe"] == "permission_denied", info.labels
            score = [s for s in found if s.name == "pygil_gil_contention_score"]
            unknown = [s for s in found if s.name == "pygil_gil_contention_score_unknown"]
            # 3 pure-Python threads: contended, seen from /proc alone; or, when the shared host
            # left no CPU idle, unknown (/proc cannot tell then), with no score series at all.
            assert len(score) + len(unknown) == 1, found
            if score:
                assert score[0].labels["method"] == "procfs"
                assert score[0].value >= 0.6
            else:
                assert unknown[0].labels["method"] == "procfs" and unknown[0].value == 1
                util = [s.value for s in _scrape(base) if s.name == "pygil_host_cpu_utilization_ratio"]
                print(f"procfs score unknown; host idle CPUs {sum(1 - u for u in util):.2f}")
            assert [s.value for s in found if s.name == "pygil_process_threads"] == [4.0]
            assert not [s for s in found if s.name.startswith("pygil_gil_held")]
            assert proc.poll() is None
            assert "Traceback" not in Path(log.name).read_text()
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0
            log.close()
            os.unlink(log.name)


def _has_group(name: str) -> bool:
    import grp
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _wait_for_base(log_path: str, proc) -> str:
    import re
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(r"metrics (http://\S+?)/metrics", Path(log_path).read_text())
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise AssertionError(Path(log_path).read_text())
        time.sleep(0.05)
    raise AssertionError("exporter did not start: " + Path(log_path).read_text())


def _scrape(base: str):
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]
