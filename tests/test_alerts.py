"""The one rules file: promtool check rules, promtool test rules (every alert firing and not
firing), its annotations and runbooks, and the threshold markers the chart rewrites."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "promtool"))
import rulesfile  # noqa: E402

ROOT = rulesfile.ROOT
RUNBOOKS = ROOT / "docs" / "runbooks"
EXPECTED_ALERTS = {"PythonGILContention", "PythonGILSaturated", "PythonGILProbeUnavailable",
                   "PythonGILReenabled", "GilExporterDown"}


def find_promtool() -> str | None:
    exe = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not exe and Path("/usr/bin/promtool").exists():
        exe = "/usr/bin/promtool"
    return exe


@pytest.fixture(scope="module")
def promtool() -> str:
    exe = find_promtool()
    if not exe:
        msg = "promtool not found: run tests/setup/prometheus.sh (Debian package 'prometheus') or set PROMTOOL"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def test_promtool_check_rules(promtool):
    r = run([promtool, "check", "rules", str(rulesfile.RULES_FILE)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_unit_tests(promtool):
    r = run([promtool, "test", "rules", str(rulesfile.UNIT_TESTS)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_firing_and_silent_unit_tests():
    doc = yaml.safe_load(rulesfile.UNIT_TESTS.read_text())
    assert doc["rule_files"] == ["../../deploy/helm/gil-exporter/files/gil-exporter-rules.yaml"]
    firing, silent = set(), set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else silent).add(t["alertname"])
    assert set(rulesfile.alerts()) == EXPECTED_ALERTS
    assert firing >= EXPECTED_ALERTS, EXPECTED_ALERTS - firing
    assert silent >= EXPECTED_ALERTS, EXPECTED_ALERTS - silent


def test_alerts_match_the_issue():
    a = rulesfile.alerts()
    assert a["PythonGILContention"]["for"] == "10m"
    assert a["PythonGILSaturated"]["for"] == "10m"
    assert "rate(pygil_gil_held_seconds_total[5m])" in a["PythonGILSaturated"]["expr"]
    assert rulesfile.thresholds() == {"contentionScore": 0.5, "saturatedHeldRatio": 0.95,
                                      "saturatedWaitingThreads": 1.0, "saturatedMaxCores": 1.2}
    assert 'method="procfs"' in a["PythonGILProbeUnavailable"]["expr"]
    assert "up{" in a["GilExporterDown"]["expr"]
    assert a["PythonGILReenabled"]["for"] == "5m"
    assert "pygil_gil_enabled == 1" in a["PythonGILReenabled"]["expr"]
    assert 'free_threaded="true"' in a["PythonGILReenabled"]["expr"]


@pytest.mark.parametrize("alert", sorted(EXPECTED_ALERTS))
def test_annotations_and_runbooks(alert):
    rule = rulesfile.alerts()[alert]
    ann = rule["annotations"]
    assert {"summary", "description", "runbook_url"} <= set(ann)
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    if alert != "GilExporterDown":
        for text in (ann["summary"], ann["description"]):
            assert "$labels.target" in text and "$labels.pod" in text and "$labels.pid" in text
        assert "$value" in ann["description"]
    url = ann["runbook_url"]
    prefix = "https://github.com/gil-exporter/gil-exporter/blob/main/docs/runbooks/"
    assert url.startswith(prefix)
    page = RUNBOOKS / url[len(prefix):]
    assert page.is_file(), f"runbook {page} missing"
    body = page.read_text()
    assert alert in body
    assert "## What to change" in body or "## What to do" in body


def test_runbooks_cover_the_remedies():
    text = "\n".join(p.read_text().lower() for p in RUNBOOKS.glob("*.md"))
    for needle in ("multiprocessing", "processpoolexecutor", "switch interval", "setswitchinterval",
                   "c extension", "release the gil", "i/o thread"):
        assert needle in text, needle


def test_derive_changes_thresholds_for_and_job():
    text = rulesfile.derive(threshold={"contentionScore": 0.8},
                            for_={"PythonGILContention": "15s"}, job_regex="gil-e2e")
    assert rulesfile.thresholds(text)["contentionScore"] == 0.8
    assert rulesfile.alerts(text)["PythonGILContention"]["for"] == "15s"
    assert 'job=~"gil-e2e"' in rulesfile.alerts(text)["GilExporterDown"]["expr"]
    with pytest.raises(KeyError):
        rulesfile.derive(threshold={"noSuchThreshold": 1})


def test_a_changed_threshold_changes_what_fires(promtool, tmp_path):
    """The thresholds are live: raising contentionScore to 0.9 makes the 0.8 case stop firing,
    so the unit tests fail. This is what the chart's override does to the same text."""
    rules = tmp_path / "deploy" / "helm" / "gil-exporter" / "files" / "gil-exporter-rules.yaml"
    rules.parent.mkdir(parents=True)
    rules.write_text(rulesfile.derive(threshold={"contentionScore": 0.9}))
    tests_dir = tmp_path / "tests" / "promtool"
    tests_dir.mkdir(parents=True)
    (tests_dir / "t.yaml").write_text(rulesfile.UNIT_TESTS.read_text())
    r = run([promtool, "check", "rules", str(rules)])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([promtool, "test", "rules", str(tests_dir / "t.yaml")])
    assert r.returncode != 0
    assert "PythonGILContention" in r.stdout + r.stderr
