"""docs/ARCHITECTURE.md against the tree: data flows one way between the stages, and every
module is named there.

Stages, in order: config -> discover -> probe -> derive -> export. A module may import its
own stage and earlier ones, never a later one (imports inside functions count too). A new
module must be given a stage here and a contract in ARCHITECTURE.md.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "exporter"
DOC = ROOT / "docs" / "ARCHITECTURE.md"

STAGES = ("config", "discover", "probe", "derive", "export")
STAGE_OF = {
    "exporter": "config",  # the package itself: __version__
    "exporter.config": "config", "exporter.webconfig": "config", "exporter.targetfile": "config",
    "exporter.procfs": "discover", "exporter.discover": "discover", "exporter.kube": "discover",
    "exporter.pods": "discover",
    "exporter.gil": "probe", "exporter.sampler": "probe", "exporter._hotloop": "probe",
    "exporter.attribution": "probe", "exporter.stacks": "probe", "exporter.syscalls": "probe",
    "exporter.threadtable": "probe", "exporter.threadlabels": "probe", "exporter.threadsampler": "probe",
    "exporter.sampling": "probe", "exporter.samplertarget": "probe", "exporter.samplerloop": "probe",
    "exporter.samplernative": "probe",
    "exporter.score": "derive", "exporter.state": "derive", "exporter.passes": "derive",
    "exporter.giltracker": "derive", "exporter.views": "derive", "exporter.monitor": "derive",
    "exporter.tracking": "derive",
    "exporter.collector": "export", "exporter.http": "export", "exporter.cli": "export",
    "exporter.diagnose": "export", "exporter.top": "export", "exporter.__main__": "export",
    "exporter.connections": "export", "exporter.redact": "export",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _stage(module: str) -> str:
    """The stage of a module: its own entry, else its package's (exporter.gil.elf: probe)."""
    name = module
    while name not in STAGE_OF and "." in name:
        name = name.rsplit(".", 1)[0]
    if name == "exporter" and module != "exporter":
        raise KeyError(module)
    return STAGE_OF[name]


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported exporter module) for every import in the file, at any depth."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "exporter"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "exporter":
                continue
            for alias in node.names:  # `from exporter import gil` imports the module exporter.gil
                sub = f"{source}.{alias.name}"
                found.append((node.lineno, sub if sub in _modules() or sub in STAGE_OF else source))
    return found


def test_every_module_has_a_stage():
    missing = []
    for module in _modules():
        try:
            _stage(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"give these modules a stage in STAGE_OF (and a contract in ARCHITECTURE.md): {missing}"


def test_no_module_imports_a_later_stage():
    wrong = []
    for module, path in _modules().items():
        mine = STAGES.index(_stage(module))
        for line, imported in _imports(module, path):
            theirs = STAGES.index(_stage(imported))
            if theirs > mine:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} ({STAGES[mine]}) imports "
                             f"{imported} ({STAGES[theirs]})")
    assert not wrong, "data flows config -> discover -> probe -> derive -> export:\n" + "\n".join(wrong)


def test_the_checker_sees_imports_at_any_depth():
    """The check itself: function-level and relative imports are found."""
    found = dict((m, line) for line, m in _imports("exporter.cli", PACKAGE / "cli.py"))
    assert "exporter.monitor" in found and "exporter.http" in found  # imported inside main()
    assert "exporter._hotloop" in {m for _, m in _imports("exporter.sampler", PACKAGE / "sampler.py")}
    with pytest.raises(KeyError):
        _stage("exporter.nonexistent")


def test_every_module_is_named_in_architecture_md():
    doc = DOC.read_text()
    files = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")] + [Path("_hotloop.c")]
    missing = [str(f) for f in files
               if f.name not in ("__init__.py", "__main__.py") and f"{f.name}" not in doc]
    assert not missing, f"docs/ARCHITECTURE.md names no contract for: {missing}"


def test_architecture_md_names_no_module_that_is_gone():
    import re
    doc = DOC.read_text()
    named = set(re.findall(r"`((?:gil/)?[a-z_]+\.(?:py|c))`", doc))
    gone = [n for n in named if not (PACKAGE / n).exists() and not (PACKAGE / "gil" / n).exists()]
    assert not gone, f"docs/ARCHITECTURE.md names modules that do not exist: {gone}"
