"""The Dockerfile builds the wheels (with the sampler's C loop) in a builder stage and installs
them into a venv in a runtime stage without a compiler, from a build context that .dockerignore
keeps small. No Docker engine is needed: the test reads the Dockerfile, applies .dockerignore to
the repository, and builds the wheel from exactly the files the builder stage copies."""
from __future__ import annotations

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


def stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """(FROM arguments, that stage's instructions) in order."""
    out: list = []
    for ins, args in instructions():
        if ins == "FROM":
            out.append((args, []))
        elif out:
            out[-1][1].append((ins, args))
    return out


def test_dockerfile_builds_in_a_builder_stage_and_runs_without_a_compiler():
    """Two stages: the builder (BUILDER_IMAGE, a Python with gcc and headers) makes the wheels,
    the C loop checked in; the runtime (BASE_IMAGE, the slim image users pull) installs them
    offline from a bind mount, so no wheel, source or compiler lands in it."""
    ins = instructions()
    first_from = next(i for i, (w, _) in enumerate(ins) if w == "FROM")
    args = dict(a.split("=", 1) for i, a in ins[:first_from] if i == "ARG")
    # Both are build arguments (the tests build on local Debian images) whose defaults are the
    # public images, the same Python minor version and Debian suite (the wheel is built for
    # the builder's Python ABI), declared before FROM so that FROM may use them.
    slim = re.fullmatch(r"python:(3\.\d+)-slim(-\w+)?", args["BASE_IMAGE"])
    full = re.fullmatch(r"python:(3\.\d+)(-\w+)?", args["BUILDER_IMAGE"])
    assert slim and full and slim.groups() == full.groups(), args
    (builder_from, builder), (runtime_from, runtime) = stages()
    assert builder_from == "${BUILDER_IMAGE} AS builder" and runtime_from == "${BASE_IMAGE}"
    copied = [a.split()[:-1] for i, a in builder if i == "COPY"]
    assert ["setup.py"] in [[f] for c in copied for f in c], copied     # the C loop's build hook
    (wheel,) = [a for i, a in builder if i == "RUN" and "pip wheel" in a]
    assert re.search(r"pip wheel --wheel-dir /wheels \"\.\[top\]\"", wheel), wheel
    assert "exporter/_hotloop" in wheel and "sys.exit" in wheel     # no C loop: the build fails
    assert not [a for i, a in runtime if i in ("COPY", "ADD")], runtime
    (install,) = [a for i, a in runtime if i == "RUN" and "pip install" in a]
    m = re.match(r"--mount=type=bind,from=builder,source=/wheels,target=/wheels python3 -m venv (\S+) "
                 r"&& (\S+)/bin/pip install --no-index --find-links=/wheels \"gil-exporter\[top\]\"", install)
    assert m and m.group(1) == m.group(2), install
    venv = m.group(1)
    assert f"{venv}/bin/python -c \"import exporter._hotloop, rich\"" in install
    assert not re.search(r"\b(gcc|build-essential|python3-dev)\b", " ".join(a for _, a in runtime))
    entry = [a for i, a in runtime if i == "ENTRYPOINT"]
    assert entry == [f'["{venv}/bin/gil-exporter"]']
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert re.search(rf"PATH={re.escape(venv)}/bin:", env), env     # kubectl exec … gil-exporter
    assert ("EXPOSE", "10057") in runtime
    cmd = [a for i, a in runtime if i == "CMD"]
    assert cmd == ['["--web.listen-address=:10057"]']


def test_dockerfile_labels():
    """The OCI annotations, agreeing with the package: version, license, source."""
    import shlex

    import exporter
    _, runtime = stages()[-1]
    labels = dict(kv.split("=", 1) for i, a in runtime if i == "LABEL" for kv in shlex.split(a))
    args = dict(a.split("=", 1) for i, a in runtime if i == "ARG")
    assert args["VERSION"] == exporter.__version__
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    (license_,) = re.findall(r'^license = \{text = "([^"]+)"\}', pyproject, re.M)
    assert labels["org.opencontainers.image.licenses"] == license_
    urls = dict(re.findall(r'^(\w+) = "(https://[^"]+)"', pyproject.split("[project.urls]")[1], re.M))
    assert labels["org.opencontainers.image.source"] == urls["Source"]
    assert labels["org.opencontainers.image.title"] == "gil-exporter"
    for key in ("description", "url", "documentation"):
        assert labels[f"org.opencontainers.image.{key}"], key


def test_dockerfile_runs_as_non_root_by_default():
    users = [a for i, a in instructions() if i == "USER"]
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root")


def test_dockerignore_excludes_caches_and_keeps_the_package():
    pats = ignore_patterns()
    for p in (".venv/bin/python", ".venv-helm/bin/python", ".git/HEAD", ".pytest_cache/v/x",
              ".hypothesis/examples/x", "exporter/__pycache__/cli.cpython-312.pyc",
              "tests/__pycache__/x.pyc", "gil_exporter.egg-info/PKG-INFO", "build/lib/x.py",
              "exporter/_hotloop.cpython-311-x86_64-linux-gnu.so"):
        assert ignored(p, pats), p
    for p in ("pyproject.toml", "setup.py", "README.md", "exporter/__init__.py", "exporter/cli.py",
              "exporter/_hotloop.c", "exporter/schema/config.schema.json"):
        assert not ignored(p, pats), p


def test_build_context_builds_the_package(tmp_path):
    """Build the wheel from only what the Dockerfile COPYs out of the ignore-filtered context."""
    pats = ignore_patterns()
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    copies = [a for i, a in stages()[0][1] if i == "COPY"]     # the builder's
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
    if shutil.which("cc") or shutil.which("gcc"):
        # the builder stage's check, here: the context has what the C loop's build needs
        assert any(n.startswith("exporter/_hotloop") and n.endswith(".so") for n in names), names
    assert "exporter/cli.py" in names
    assert "exporter/schema/config.schema.json" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gil-exporter = exporter.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_license_changelog_and_project_metadata_agree():
    """LICENSE is the license pyproject.toml names (and its classifier); the project URLs point
    where the chart's `home` and the image's source label do; CHANGELOG.md keeps an Unreleased
    section in Keep a Changelog's form."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    (license_,) = re.findall(r'^license = \{text = "([^"]+)"\}', pyproject, re.M)
    assert license_ == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert '"License :: OSI Approved :: Apache Software License"' in pyproject
    urls = dict(re.findall(r'^(\w+) = "(https://[^"]+)"', pyproject.split("[project.urls]")[1], re.M))
    chart = (ROOT / "deploy" / "helm" / "gil-exporter" / "Chart.yaml").read_text()
    assert f"home: {urls['Homepage']}\n" in chart
    assert {"Homepage", "Source", "Documentation", "Issues", "Changelog"} <= set(urls)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "keepachangelog.com" in changelog
    heads = re.findall(r"^## \[([^\]]+)\]", changelog, re.M)
    assert heads and heads[0] == "Unreleased", heads
    unreleased = changelog.split("## [Unreleased]")[1].split("\n## ")[0]
    assert set(re.findall(r"^### (\w+)", unreleased, re.M)) <= {"Added", "Changed", "Deprecated",
                                                                "Removed", "Fixed", "Security"}
    assert "sampler_loop" in unreleased and "DAC_READ_SEARCH" in unreleased
