"""The lint the house keeps: ruff with pyproject's [tool.ruff] over every Python file."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found:
        return [found]
    pytest.fail("ruff is not installed: it is in the [test] extra (./tests/run.sh installs it)")


def test_ruff_finds_nothing():
    r = subprocess.run(_ruff() + ["check", "--no-cache", "--output-format", "concise", "."],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_one_typing_style():
    """Builtin generics and X | None everywhere: no typing.Optional/List/Dict/... imports."""
    old = {"Optional", "List", "Dict", "Tuple", "Set", "FrozenSet", "Type", "Union"}
    offenders = []
    for path in sorted(ROOT.glob("**/*.py")):
        parts = path.relative_to(ROOT).parts[:-1]
        if any(p.startswith(".") or p == "data" for p in parts):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("from typing import "):
                names = {x.strip() for x in line.split(" import ", 1)[1].split(",")}
                if names & old:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line}")
    assert not offenders, "\n".join(offenders)
