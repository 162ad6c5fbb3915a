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
DASHBOARD = rulesfile.CHART / "dashboards" / "gil-exporter.json"
EXPECTED_ALERTS = {"PythonGILContention", "PythonGILSaturated", "PythonGILProbeUnavailable",
                   "PythonGILReenabled", "PythonGILHeldWhileBlocked", "GilExporterDown"}


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


def test_recycling_tests_are_generated_from_rulesfile():
    """recycling.test.yaml is recycling_tests()'s text: one source for the recycled workers."""
    assert rulesfile.RECYCLING_TESTS.read_text() == rulesfile.recycling_tests(), (
        "regenerate: python tests/promtool/rulesfile.py")
    doc = yaml.safe_load(rulesfile.RECYCLING_TESTS.read_text())
    contention, probe, saturated = doc["tests"]
    assert {t["alertname"] for t in saturated["alert_rule_test"]} == {"PythonGILSaturated"}
    pids = {s["series"] for s in contention["input_series"] if 'workload="checkout-api"' in s["series"]}
    assert {t["alertname"] for t in contention["alert_rule_test"]} == {"PythonGILContention"}
    assert {t["alertname"] for t in probe["alert_rule_test"]} == {"PythonGILProbeUnavailable"}
    # 8 workers per generation, a generation every 2 minutes over 30 minutes
    assert len(pids) == 8 * -(-rulesfile.SAMPLES // rulesfile.RECYCLE_EVERY) >= 8 * 15
    assert rulesfile.RECYCLE_EVERY * rulesfile.RECYCLE_SCRAPE == 120 and rulesfile.RECYCLE_MINUTES == 30


def test_alerts_survive_worker_recycling(promtool):
    """8 contended workers replaced by new PIDs every 2 minutes for 30 minutes (every worker at
    once, a scrape with no score between generations): PythonGILContention fires once per
    workload, within its `for:`, and stays firing; the recorded series has no gap. The same for
    PythonGILProbeUnavailable and PythonGILSaturated with workers recycled alike."""
    r = run([promtool, "test", "rules", str(rulesfile.RECYCLING_TESTS)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.parametrize("rewrite,why,alert", [
    # the alert as it was: per process, so every new PID restarted its `for:`
    (lambda t: t.replace("namespace_workload_target:pygil_gil_contention_score:max\n            > 0.5",
                         "pygil_gil_contention_score\n            > 0.5"), "per process", "PythonGILContention"),
    # per workload, but without bridging the scrape between generations
    (lambda t: t.replace("last_over_time(pygil_gil_contention_score[3m])", "pygil_gil_contention_score"),
     "no last_over_time", "PythonGILContention"),
    (lambda t: t.replace("max_over_time(namespace_workload_target:pygil_gil_probe_unavailable_processes:count[3m])",
                         "namespace_workload_target:pygil_gil_probe_unavailable_processes:count"),
     "no max_over_time", "PythonGILProbeUnavailable"),
    (lambda t: t.replace("last_over_time(pygil:gil_saturated_held_ratio:rate5m[3m])",
                         "pygil:gil_saturated_held_ratio:rate5m"), "saturated without last_over_time",
     "PythonGILSaturated"),
])
def test_recycling_test_fails_for_rules_that_reset_on_recycling(promtool, tmp_path, rewrite, why, alert):
    """The recycling test has teeth: rules that lose the workload's series when workers are
    replaced do not pass it."""
    text = rewrite(rulesfile.rules_text())
    assert text != rulesfile.rules_text(), why
    rules = tmp_path / "deploy" / "helm" / "gil-exporter" / "files" / "gil-exporter-rules.yaml"
    rules.parent.mkdir(parents=True)
    rules.write_text(text)
    tests_dir = tmp_path / "tests" / "promtool"
    tests_dir.mkdir(parents=True)
    (tests_dir / "t.yaml").write_text(rulesfile.RECYCLING_TESTS.read_text())
    r = run([promtool, "test", "rules", str(tests_dir / "t.yaml")])
    assert r.returncode != 0, why
    assert f"alertname: {alert}," in r.stdout + r.stderr


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


def records(text: str | None = None) -> dict[str, str]:
    doc = yaml.safe_load(rulesfile.rules_text() if text is None else text)
    return {r["record"]: r["expr"] for g in doc["groups"] for r in g["rules"] if "record" in r}


WORKLOAD_BY = "by (cluster, namespace, workload, workload_kind, target"


def test_alerts_match_the_issue():
    a, rec = rulesfile.alerts(), records()
    assert a["PythonGILContention"]["for"] == "10m"
    assert a["PythonGILSaturated"]["for"] == "10m"
    assert "rate(pygil_gil_held_seconds_total[5m])" in rec["pygil:gil_held_ratio:rate5m"]
    assert "pygil:gil_held_ratio:rate5m" in rec["pygil:gil_saturated_held_ratio:rate5m"]
    assert rulesfile.thresholds() == {"contentionScore": 0.5, "saturatedHeldRatio": 0.95,
                                      "saturatedWaitingThreads": 1.0, "saturatedMaxCores": 1.2,
                                      "heldOffCpuRatio": 0.5}
    assert a["PythonGILHeldWhileBlocked"]["for"] == "5m"
    assert "rate(pygil_gil_held_off_cpu_seconds_total[5m])" in rec["pygil:gil_held_off_cpu_ratio:rate5m"]
    assert 'method="procfs"' in rec["pygil:gil_probe_unavailable:info"]
    assert "up{" in a["GilExporterDown"]["expr"]
    assert a["PythonGILReenabled"]["for"] == "5m"
    assert "pygil_gil_enabled == 1" in rec["pygil:gil_reenabled:info"]
    assert 'free_threaded="true"' in rec["pygil:gil_reenabled:info"]
    # kube-prometheus-stack's InfoInhibitor silences severity info: every alert is a warning
    assert {r["labels"]["severity"] for r in a.values()} == {"warning"}


def test_alerts_are_per_workload_on_the_recording_rules():
    """Each GIL alert is one recorded per-workload series (pid, pod and instance aggregated
    away), and every per-workload record is used by an alert or the dashboard."""
    a, rec = rulesfile.alerts(), records()
    workload = {name: expr for name, expr in rec.items() if name.startswith("namespace_workload_target:")}
    assert "namespace_workload_target:pygil_gil_contention_score:max" in workload
    for name, expr in workload.items():
        assert WORKLOAD_BY in " ".join(expr.split()), name
        assert not any(f"{label}," in expr or f"{label})" in expr for label in ("pid", "pod", "instance")), name
    used = " ".join(r["expr"] + r["annotations"]["description"] for r in a.values()) + DASHBOARD.read_text()
    for name in workload:
        assert name in used, f"{name} is used by neither an alert nor the dashboard"
    for alert, rule in a.items():
        if alert == "GilExporterDown":
            continue
        import re
        read = set(re.findall(r"namespace_workload_target:[a-z_:]+", rule["expr"]))
        assert len(read) == 1 and read <= set(workload), (alert, rule["expr"])
        assert "pygil_" not in rule["expr"].replace("namespace_workload_target:pygil_", ""), alert
    assert rulesfile.thresholds(a["PythonGILContention"]["expr"]) == {"contentionScore": 0.5}


@pytest.mark.parametrize("alert", sorted(EXPECTED_ALERTS))
def test_annotations_and_runbooks(alert):
    rule = rulesfile.alerts()[alert]
    ann = rule["annotations"]
    assert {"summary", "description", "runbook_url", "dashboard_url"} <= set(ann)
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    assert ann["dashboard_url"].startswith(rulesfile.DASHBOARD_URL + "?var-cluster={{ $labels.cluster | urlquery }}")
    if alert != "GilExporterDown":
        for text in (ann["summary"], ann["description"]):
            assert "$labels.target" in text and "$labels.workload" in text and "$labels.namespace" in text
        # the worst process named, so that `diagnose --pod` can follow
        assert ".Labels.pid" in ann["description"] and ".Labels.pod" in ann["description"]
        assert "$value" in ann["description"]
        for var in ("namespace", "workload", "target"):
            assert f"&var-{var}={{{{ $labels.{var} | urlquery }}}}" in ann["dashboard_url"]
    else:
        assert "&var-node={{ $labels.node | urlquery }}" in ann["dashboard_url"]
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


# --- the chart's rewrites: the job regex with fullnameOverride, the dashboard URL ----------------

def rendered_rules(values: dict) -> dict:
    from test_helm import render, with_repository
    values = {**values, "prometheusRule": {"enabled": True, **values.get("prometheusRule", {})}}
    return render(with_repository(values)).one("PrometheusRule")["spec"]


def scrape_job(values: dict) -> str:
    """The job name Prometheus Operator gives the chart's ServiceMonitor: the Service's name,
    or the value of the Service label that jobLabel names."""
    from test_helm import render, with_repository
    res = render(with_repository(values))
    svc = res.one("Service")["metadata"]
    label = res.one("ServiceMonitor")["spec"].get("jobLabel")
    return svc["labels"][label] if label else svc["name"]


@pytest.mark.parametrize("values", [
    {"fullnameOverride": "python-gil"},
    {"nameOverride": "pyprobe"},
    {"fullnameOverride": "python-gil", "serviceMonitor": {"jobLabel": "app.kubernetes.io/component"}},
    {},
], ids=["fullnameOverride", "nameOverride", "jobLabel", "default"])
def test_exporter_down_matches_the_charts_job_name(promtool, tmp_path, values):
    """GilExporterDown's absent() must see the job the chart's ServiceMonitor produces, however
    the release is named: silent while that job is up, firing when it is down."""
    import re
    values = {**values, "serviceMonitor": {"enabled": True, **values.get("serviceMonitor", {})}}
    job = scrape_job(values)
    if values.get("fullnameOverride"):
        assert not re.fullmatch(rulesfile.DEFAULT_JOB_REGEX, job), job  # the regex alone misses it
    spec = rendered_rules(values)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    instance = "10.0.0.5:10057"
    down = [{"exp_labels": {"severity": "warning", "job": job, "instance": instance},
             "exp_annotations": {
                 "summary": f"gil-exporter {instance} is down",
                 "description": (f"Prometheus has not been able to scrape gil-exporter at {instance} (job {job}), "
                                 "or no gil-exporter target exists at all. GIL contention of the Python "
                                 "processes on that node is not being measured, and the GIL alerts cannot fire."),
                 "runbook_url": "https://github.com/gil-exporter/gil-exporter/blob/main/docs/runbooks/gil-exporter-down.md",
                 "dashboard_url": f"{rulesfile.DASHBOARD_URL}?var-cluster=&var-node="}}]
    cases = [{"name": f"{job} {name}", "interval": "1m",
              "input_series": [{"series": f'up{{job="{job}",instance="{instance}"}}', "values": series}],
              "alert_rule_test": [{"eval_time": "10m", "alertname": "GilExporterDown", "exp_alerts": exp}]}
             for name, series, exp in (("up", "1x15", []), ("down", "1x2 0x13", down))]
    t = tmp_path / "t.yaml"
    t.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": cases}))
    r = run([promtool, "test", "rules", str(t)])
    assert r.returncode == 0, r.stdout + r.stderr
    expr = next(r["expr"] for g in spec["groups"] for r in g["rules"] if r.get("alert") == "GilExporterDown")
    assert rulesfile.DEFAULT_JOB_REGEX in expr  # the value's regex stays; the chart's job is added


def test_dashboard_url_value(tmp_path):
    """prometheusRule.dashboardUrl replaces the Grafana base of every alert's dashboard_url,
    rendered with tpl; "" leaves the annotation out."""
    spec = rendered_rules({"prometheusRule": {
        "dashboardUrl": "https://grafana.{{ .Release.Namespace }}.example.com/d/gil-exporter/gil-exporter"}})
    alerts = [r for g in spec["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) == len(EXPECTED_ALERTS)
    from test_helm import NAMESPACE
    for a in alerts:
        url = a["annotations"]["dashboard_url"]
        assert url.startswith(f"https://grafana.{NAMESPACE}.example.com/d/gil-exporter/gil-exporter?var-cluster="), url
    spec = rendered_rules({"prometheusRule": {"dashboardUrl": ""}})
    for g in spec["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                assert "dashboard_url" not in r["annotations"] and "runbook_url" in r["annotations"]


def test_readme_kube_prometheus_stack_join_is_the_tested_one():
    """The README's alternative join on kube-prometheus-stack's
    namespace_workload_pod:kube_pod_owner:relabel is the expression the promtool tests run."""
    import re
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"```promql\n(max by \(cluster, namespace, workload, workload_type.*?)```", readme, re.S)
    assert m, "README lost the kube-prometheus-stack join"
    assert " ".join(m.group(1).split()) in " ".join(rulesfile.UNIT_TESTS.read_text().split())


# --- the dashboard: variables for a fleet, workloads from the recording rules, hosts by node ----

def dashboard_exprs() -> dict[str, list[str]]:
    import json
    out: dict[str, list[str]] = {}
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        out.setdefault(p["title"], []).extend(t["expr"] for t in p.get("targets", []))
    return out


def test_dashboard_has_fleet_variables():
    import json
    dash = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in dash["templating"]["list"]]
    assert {"cluster", "namespace", "workload", "node"} <= set(names), names
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            assert v["includeAll"] and v["allValue"] == ".*", v["name"]  # "All" matches absent labels
    for title, exprs in dashboard_exprs().items():
        for e in exprs:
            assert "$instance" not in e, title
            if "namespace=~" in e:
                assert 'cluster=~"$cluster"' in e and 'workload=~"$workload"' in e, (title, e)


def test_dashboard_ranks_workloads_from_the_recording_rules():
    import re
    exprs = dashboard_exprs()
    recorded = set(records())
    ranked = exprs["Workloads by contention"]
    used = {m for e in ranked for m in re.findall(r"namespace_workload_target:[a-z_:]+", e)}
    assert "namespace_workload_target:pygil_gil_contention_score:max" in used
    assert used <= recorded, used - recorded
    assert ranked[0].startswith("sort_desc(namespace_workload_target:pygil_gil_contention_score:max{")
    # the same series the alert fires on, over time
    (trend,) = exprs["Worst contention score by workload"]
    assert "namespace_workload_target:pygil_gil_contention_score:max" in trend


def test_dashboard_host_panels_are_keyed_by_node():
    """Host panels aggregate by node, which the chart's relabeling sets from the pod's node: a
    rollout (a new exporter pod IP in `instance`) continues the same series. Only a scrape
    without a node label falls back to the instance."""
    import re
    exprs = dashboard_exprs()
    for title in ("Host per-core utilization", "Host cores", "Host mean utilization"):
        for e in exprs[title]:
            by = re.match(r"(max|avg) by \(([^)]*)\)", e)
            assert by and "node" in by.group(2) and "instance" not in by.group(2), (title, e)
            assert 'node=~"$node", node!=""' in e and 'label_replace(' in e, (title, e)
