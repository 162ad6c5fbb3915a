import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Exporter  # noqa: E402


def _version_key(label: str):
    """"3.9" < "3.11" < "3.14 Debian sid": by the leading version number, then the text."""
    head, _, rest = label.partition(" ")
    try:
        return tuple(int(x) for x in head.split(".")), rest
    except ValueError:
        return (999,), label


class _VersionReport:
    """Registered once per session; prints which interpreters (and placements) ran, with figures."""

    def __init__(self) -> None:
        self.rows: dict = {}

    def record(self, version: str, what: str, value) -> None:
        self.rows.setdefault(version, {})[what] = value

    def pytest_terminal_summary(self, terminalreporter):
        if not self.rows:
            return
        terminalreporter.section("GIL probe: CPython interpreters and placements exercised")
        for version in sorted(self.rows, key=_version_key):
            cells = ", ".join(f"{k}={v}" for k, v in sorted(self.rows[version].items()))
            terminalreporter.write_line(f"{version}: {cells}")


@pytest.fixture(scope="session")
def report(request):
    """Per-version figures, printed at the end of the run (which CPython versions ran)."""
    pm = request.config.pluginmanager
    plugin = pm.get_plugin("gil-version-report")
    if plugin is None:
        plugin = _VersionReport()
        pm.register(plugin, "gil-version-report")
    return plugin


@pytest.fixture
def exporter():
    """Factory: start the real daemon with CLI args; every one started is stopped after the test."""
    started = []

    def start(*args, env=None):
        e = Exporter(list(args), env=env)
        started.append(e)
        return e

    yield start
    for e in started:
        e.close()


# ------------------------------------------------------------------ tiers (markers in pyproject)
# The unit tier (`./tests/run.sh --fast`, `-m unit`) is what needs no system setup and starts no
# live process: parsers on fixture files, config validation, pure functions, chart renders.
# A file is unit only when listed here, so a new test file starts out in the live tier; a test
# can also carry its own tier marker, which wins.
UNIT_FILES = {
    "test_config.py", "test_docs.py", "test_monitor_figures.py", "test_monitor_units.py",
    "test_kube.py", "test_dockerfile.py", "test_helm.py", "test_passes.py",
    "test_procfs_parsers.py", "test_redact.py", "test_fuzz_readers.py", "test_architecture.py",
    "test_lint.py", "test_gain.py", "test_sampling.py",
}
FILE_TIERS = {
    "test_image.py": ("image", "slow"), "test_image_diagnose.py": ("image", "slow"),
    "test_landing.py": ("browser",),
    "test_e2e_prometheus.py": ("e2e", "slow"), "test_alerts.py": ("e2e",),
    "test_soak.py": ("live", "slow"), "test_placements.py": ("live", "slow"),
    "test_servers.py": ("live", "slow"),
}
TIERS = ("unit", "live", "e2e", "image", "browser")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(t) for t in TIERS):
            continue
        name = item.path.name
        if "promtool" in item.name:  # needs Debian's prometheus package
            tiers = ("e2e",)
        elif name in UNIT_FILES:
            tiers = ("unit",)
        else:
            tiers = FILE_TIERS.get(name, ("live",))
        for t in tiers:
            item.add_marker(t)
