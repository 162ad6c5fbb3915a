"""The Dockerfile installs through the README's command (`pip install .` into a venv) from a
build context that .dockerignore keeps small. No Docker engine is needed: the test reads the
Dockerfile, applies .dockerignore to the repository, and builds the wheel from exactly the files
the Dockerfile copies."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README_INSTALL = "python3 -m venv .venv && .venv/bin/pip install ."


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        buf = ""
    return out


def ignore_patterns() -> list[str]:
    pats = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pats.append(line.rstrip("/"))
    return pats


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern matches the path or any of its parent directories
    (`**` matches any number of directories); a later `!pattern` re-includes."""
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        rx = re.compile("^" + re.escape(p).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
                        .replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$")
        if any(rx.match(pre) for pre in prefixes):
            result = not neg
    return result


def test_readme_quick_start_is_the_install_command():
    readme = (ROOT / "README.md").read_text()
    assert README_INSTALL in readme


def test_dockerfile_installs_like_the_readme():
    ins = instructions()
    froms = [a for i, a in ins if i == "FROM"]
    # The base is a build argument (the tests build on a local Debian image) whose default is
    # the public slim Python image users pull; it is declared before FROM, so FROM may use it.
    args = dict(a.split("=", 1) for i, a in ins[:ins.index(("FROM", froms[0]))] if i == "ARG")
    assert froms == ["${BASE_IMAGE}"], froms
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", args["BASE_IMAGE"]), args
    runs = [a for i, a in ins if i == "RUN"]
    install = [r for r in runs if "pip install" in r]
    assert len(install) == 1, install
    # `python3 -m venv <dir> && <dir>/bin/pip install .`: the README's command, another venv path.
    m = re.match(r"python3 -m venv (\S+) && (\S+)/bin/pip install \.(?: |$)", install[0])
    assert m and m.group(1) == m.group(2), install[0]
    venv = m.group(1)
    readme_form = README_INSTALL.replace(".venv", venv, 2)
    assert install[0].startswith(readme_form)
    entry = [a for i, a in ins if i == "ENTRYPOINT"]
    assert entry == [f'["{venv}/bin/gil-exporter"]']
    assert ("EXPOSE", "10057") in ins
    cmd = [a for i, a in ins if i == "CMD"]
    assert cmd == ['["--web.listen-address=:10057"]']


def test_dockerfile_runs_as_non_root_by_default():
    users = [a for i, a in instructions() if i == "USER"]
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root")


def test_dockerignore_excludes_caches_and_keeps_the_package():
    pats = ignore_patterns()
    for p in (".venv/bin/python", ".venv-helm/bin/python", ".git/HEAD", ".pytest_cache/v/x",
              ".hypothesis/examples/x", "exporter/__pycache__/cli.cpython-312.pyc",
              "tests/__pycache__/x.pyc", "gil_exporter.egg-info/PKG-INFO", "build/lib/x.py"):
        assert ignored(p, pats), p
    for p in ("pyproject.toml", "README.md", "exporter/__init__.py", "exporter/cli.py",
              "exporter/schema/config.schema.json"):
        assert not ignored(p, pats), p


def test_build_context_builds_the_package(tmp_path):
    """Build the wheel from only what the Dockerfile COPYs out of the ignore-filtered context."""
    pats = ignore_patterns()
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    copies = [a for i, a in instructions() if i == "COPY"]
    assert copies
    for args in copies:
        *srcs, _dest = args.split()
        for src in srcs:
            src_path = ROOT / src.rstrip("/")
            assert src_path.exists(), src
            files = [src_path] if src_path.is_file() else [p for p in src_path.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if ignored(rel, pats):
                    continue
                (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, ctx / rel)
    assert not list(ctx.rglob("__pycache__"))
    out = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ctx)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("Could not find a version" in r.stderr or "Network" in r.stderr):
        pytest.skip(f"pip could not fetch the build backend: {r.stderr[-500:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("gil_exporter-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "exporter/cli.py" in names
    assert "exporter/schema/config.schema.json" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gil-exporter = exporter.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
