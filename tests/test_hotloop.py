"""`pip install .` with and without a C compiler: the sampler's hot loop in C is optional.

A copy of the working tree (no build artifacts, like a fresh clone) is installed into a
directory twice: with the compiler hidden (CC points nowhere), which must install without the
extension and sample in Python, and as is, which must build exporter._hotloop and sample in C.
Each install then samples a real contended CPython process from a fresh interpreter.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from workloads import pyenv_pythons, start_workload

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys, time
from exporter import sampler
from exporter.gil import locate
pid = int(sys.argv[1])
s = sampler.GilSampler(rate_hz=100.0)
s.add("k", locate(pid))
s.start()
time.sleep(2.0)
t = s.totals("k")
s.close()
print(json.dumps({"native": s.native, "built": sampler._hotloop is not None, "samples": t.samples,
                  "contended": t.contended_seconds / t.sampled_seconds}))
"""


def _fresh_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        "*.so", "build", "*.egg-info", ".venv*", "__pycache__", ".git", ".pytest_cache", ".hypothesis",
        "results"))
    return src


def _install(src: Path, target: Path, env: dict) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), "."],
                       cwd=src, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def _sample(target: Path, pid: int) -> dict:
    import json
    # -S: not the site hook of the editable install of this checkout; the installed copy,
    # then the test venv's dependencies
    path = [str(target)] + [p for p in sys.path if p.endswith("site-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([sys.executable, "-S", "-c", PROBE + "\nassert sampler.__file__.startswith(sys.argv[2])",
                        str(pid), str(target)], env=env, capture_output=True, text=True, timeout=60,
                       cwd=target)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_install_without_a_compiler(tmp_path):
    src = _fresh_tree(tmp_path)
    target = tmp_path / "no-compiler"
    _install(src, target, dict(os.environ, CC="/nonexistent/cc", LDSHARED="/nonexistent/cc -shared"))
    assert not list((target / "exporter").glob("_hotloop*.so"))
    with start_workload("cpu", list(pyenv_pythons().values())[-1], threads=3) as w:
        out = _sample(target, w.pid)
    assert out["built"] is False and out["native"] is False
    assert out["samples"] > 30 and out["contended"] > 0.7, out


def test_install_with_a_compiler(tmp_path):
    if not (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")):
        pytest.skip("no C compiler on this host")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        pytest.skip(f"no Python.h for {sys.executable} (python3-dev)")
    src = _fresh_tree(tmp_path)
    target = tmp_path / "with-compiler"
    _install(src, target, dict(os.environ))
    assert list((target / "exporter").glob("_hotloop*.so"))
    with start_workload("cpu", list(pyenv_pythons().values())[-1], threads=3) as w:
        out = _sample(target, w.pid)
    assert out["built"] is True and out["native"] is True
    assert out["samples"] > 30 and out["contended"] > 0.7, out
