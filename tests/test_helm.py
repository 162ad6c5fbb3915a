"""The Helm chart: Helm's own lint (helm-sdkpy, Helm v4 as a library) of the default values and
of every documented values example, and assertions on the objects Helm renders.

helm-sdkpy has no `helm template`: its Install/Upgrade need a cluster. It does lint, and lint
renders every template with Helm's engine. In lint mode Helm's `fail` function does not abort but
logs its message ("funcMap fail message=..."), so each chart copy gets a probe template that
`fail`s with the base64 of every other template's rendered output; the test decodes those log
lines into the rendered manifests. Any other `fail` message (e.g. the PrometheusRule template's
missing-marker guard) is reported as an error.

Runs in a subprocess with .venv-helm's Python 3.12 (tests/setup/helm.sh creates it).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "promtool"))
import rulesfile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "gil-exporter"
EXAMPLES = sorted(p.stem for p in (CHART / "examples").glob("*.yaml"))
PROBE = "zz-render-probe.yaml"

LINT_SCRIPT = r"""
import asyncio, json, os, sys
import helm_sdkpy
cfg = helm_sdkpy.Configuration()
out = {}
for name, path in json.loads(sys.argv[1]).items():
    os.write(2, ("GILCHART " + name + "\n").encode())  # unbuffered: Helm's log lines follow in order
    out[name] = asyncio.run(helm_sdkpy.Lint(cfg).run(path))
sys.stdout.write(json.dumps(out))
"""


def helm_python() -> str | None:
    exe = os.environ.get("HELM_SDKPY_PYTHON") or str(ROOT / ".venv-helm" / "bin" / "python")
    if not Path(exe).exists():
        return None
    r = subprocess.run([exe, "-c", "import helm_sdkpy"], capture_output=True, timeout=60)
    return exe if r.returncode == 0 else None


def merge(base, over):
    """helm's values merge (maps merge recursively, everything else replaces)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    return over


def defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def example(name: str) -> dict:
    return yaml.safe_load((CHART / "examples" / f"{name}.yaml").read_text())


ALL_ON = {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
          "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}


def chart_copy(tmp: Path, name: str, values: dict, probe: bool = True,
               mutate=None) -> Path:
    dest = tmp / name
    shutil.copytree(CHART, dest, ignore=shutil.ignore_patterns("examples"))
    (dest / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    if mutate:
        mutate(dest)
    if probe:
        lines = []
        for t in sorted((dest / "templates").iterdir()):
            if t.name.startswith("_") or t.name == PROBE:
                continue
            lines.append(
                '{{- fail (printf "GILRENDER %s %s %s" ' + json.dumps(name) + " " + json.dumps(t.name)
                + ' (include (print $.Template.BasePath "/' + t.name + '") . | b64enc)) }}')
        (dest / "templates" / PROBE).write_text("\n".join(lines) + "\n")
    return dest


class Result:
    def __init__(self, lint: dict, renders: dict[str, str], fails: list[str]):
        self.lint = lint
        self.renders = renders
        self.fails = fails  # fail messages other than the probe's

    @property
    def errors(self) -> list[dict]:
        return [m for m in self.lint.get("Messages") or [] if m.get("Severity", 0) >= 3]

    def objects(self) -> list[dict]:
        objs = []
        for name, text in sorted(self.renders.items()):
            if name.endswith(".yaml"):
                objs.extend(o for o in yaml.safe_load_all(text) if o)
        return objs

    def kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects() if o.get("kind") == kind]

    def one(self, kind: str) -> dict:
        found = self.kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    exe = helm_python()
    if not exe:
        msg = ("helm-sdkpy not available: run tests/setup/helm.sh (creates .venv-helm with "
               "pyenv's Python 3.12) or set HELM_SDKPY_PYTHON")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    tmp = tmp_path_factory.mktemp("charts")
    base = defaults()
    charts = {
        "default": chart_copy(tmp, "default", base),
        "all-enabled": chart_copy(tmp, "all-enabled", merge(base, ALL_ON)),
        "options": chart_copy(tmp, "options", merge(base, merge(ALL_ON, {
            "fullnameOverride": "gilx", "podMetadata": {"enabled": False},
            "listenAddress": "0.0.0.0:9999", "extraArgs": ["--web.telemetry-path=/metrics"],
            "prometheusRule": {"disabledAlerts": ["GilExporterDown"], "jobRegex": "monitoring/gil.*",
                               "runbookBaseUrl": "https://wiki.example.com/runbooks/"},
            "dashboard": {"labels": {"grafana_dashboard": "gil"}}}))),
        # Negative controls: prove that the checks below can fail.
        "bad-values": chart_copy(tmp, "bad-values", merge(base, {"port": "not-a-port"}), probe=False),
        "lost-marker": chart_copy(
            tmp, "lost-marker", merge(base, ALL_ON),
            mutate=lambda d: (d / "files" / "gil-exporter-rules.yaml").write_text(
                (d / "files" / "gil-exporter-rules.yaml").read_text().replace(
                    "# threshold: contentionScore", "# contention threshold"))),
    }
    for ex in EXAMPLES:
        charts[f"example-{ex}"] = chart_copy(tmp, f"example-{ex}", merge(base, example(ex)))
    r = subprocess.run([exe, "-c", LINT_SCRIPT, json.dumps({k: str(v) for k, v in charts.items()})],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    lints = json.loads(r.stdout)
    renders: dict[str, dict[str, str]] = {k: {} for k in charts}
    fails: dict[str, list[str]] = {k: [] for k in charts}
    current = None
    for line in r.stderr.splitlines():
        if line.startswith("GILCHART "):
            current = line.split(" ", 1)[1]
            continue
        m = re.search(r"GILRENDER (\S+) (\S+) ([A-Za-z0-9+/=]*)", line)
        if m:
            assert m.group(1) == current, line[:200]
            renders[current][m.group(2)] = base64.b64decode(m.group(3)).decode()
        elif "funcMap fail" in line:
            fails[current].append(line)
    return {k: Result(lints[k], renders[k], fails[k]) for k in charts}


def check_clean(res: Result):
    assert not res.errors, f"helm lint severity >= 3: {res.errors}"


# --- lint ------------------------------------------------------------------------------

def test_examples_exist():
    assert {"kube-prometheus-stack", "sidecar", "dedicated-nodes"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", ["default", "all-enabled", "options"] + [f"example-{e}" for e in EXAMPLES])
def test_lint_passes(helm, name):
    check_clean(helm[name])
    # Every template rendered (the probe reported it), no template's own `fail` fired.
    templates = {p.name for p in (CHART / "templates").iterdir() if not p.name.startswith("_")}
    assert set(helm[name].renders) == templates
    assert not helm[name].fails, helm[name].fails


def test_lint_detects_errors(helm):
    # Severity >= 3 is how failures show (helm-sdkpy's error objects come back empty).
    assert helm["bad-values"].errors
    # The PrometheusRule template refuses a rules file whose threshold marker is gone.
    assert any("no '# threshold: contentionScore' marker" in f for f in helm["lost-marker"].fails)


# --- rendered objects --------------------------------------------------------------------

def test_daemonset_least_privilege(helm):
    ds = helm["default"].one("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert "--web.listen-address=:10057" in c["args"]
    assert "--config=/etc/gil-exporter/config.yaml" in c["args"]
    assert c["ports"] == [{"name": "metrics", "containerPort": 10057, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["tolerations"] and pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "priorityClassName" not in pod  # empty by default
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/etc/gil-exporter", "/tmp"} <= mounts


def test_config_checksum_and_configmap(helm, tmp_path):
    res = helm["default"]
    ds = res.one("DaemonSet")
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    # The checksum is the sha256 of the rendered ConfigMap: a config change rolls the pods.
    assert ann["checksum/config"] == hashlib.sha256(res.renders["configmap.yaml"].encode()).hexdigest()
    cm = res.one("ConfigMap")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config == defaults()["config"]
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
    # A different config renders a different ConfigMap, hence a different checksum.
    other = helm["example-kube-prometheus-stack"]
    assert (other.one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            != ann["checksum/config"])


@pytest.mark.parametrize("name", ["default"] + [f"example-{e}" for e in EXAMPLES])
def test_rendered_config_is_valid_for_the_exporter(helm, name, tmp_path):
    cms = [c for c in helm[name].kind("ConfigMap") if "config.yaml" in c["data"]]
    assert len(cms) == 1
    path = tmp_path / "config.yaml"
    path.write_text(cms[0]["data"]["config.yaml"])
    exe = Path(sys.executable).parent / "gil-exporter"
    if not exe.exists():
        pytest.skip("gil-exporter is not installed in the test venv")
    r = subprocess.run([str(exe), "--config", str(path), "--config.check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_labels_and_selectors(helm):
    res = helm["default"]
    ds = res.one("DaemonSet")
    sel = ds["spec"]["selector"]["matchLabels"]
    assert sel == {"app.kubernetes.io/name": "gil-exporter", "app.kubernetes.io/instance": sel["app.kubernetes.io/instance"]}
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert sel.items() <= pod_labels.items()
    for obj in res.objects():
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "gil-exporter"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("gil-exporter-")
    svc = res.one("Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


def test_rbac(helm):
    res = helm["default"]
    role = res.one("ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = res.one("ClusterRoleBinding")
    sa = res.one("ServiceAccount")
    ds = res.one("DaemonSet")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"] == ds["spec"]["template"]["spec"]["serviceAccountName"]
    # Nothing optional by default.
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        assert not res.kind(kind)
    assert len(res.kind("ConfigMap")) == 1  # no dashboard


def test_prometheusrule_with_defaults_is_the_rules_file(helm, tmp_path):
    """The chart's PrometheusRule with default values passes the same promtool unit tests."""
    from test_alerts import find_promtool
    promtool = find_promtool()
    rule = helm["all-enabled"].one("PrometheusRule")
    assert rule["spec"] == yaml.safe_load(rulesfile.rules_text())
    if not promtool:
        pytest.skip("promtool missing")
    rules = tmp_path / "deploy" / "helm" / "gil-exporter" / "files" / "gil-exporter-rules.yaml"
    rules.parent.mkdir(parents=True)
    rules.write_text(yaml.safe_dump(rule["spec"]))
    tests = tmp_path / "tests" / "promtool"
    tests.mkdir(parents=True)
    (tests / "t.yaml").write_text(rulesfile.UNIT_TESTS.read_text())
    r = subprocess.run([promtool, "test", "rules", str(tests / "t.yaml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kube_prometheus_stack_example(helm, tmp_path):
    res = helm["example-kube-prometheus-stack"]
    sm = res.one("ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    ep = sm["spec"]["endpoints"][0]
    assert ep["port"] == "metrics"
    assert {"action": "labeldrop", "regex": "(namespace|pod|container|service|endpoint)"} in ep["relabelings"]
    pr = res.one("PrometheusRule")
    assert pr["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for g in pr["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert set(alerts) == set(rulesfile.alerts())
    # Overridden threshold and for:, same text otherwise.
    assert rulesfile.thresholds(alerts["PythonGILContention"]["expr"]) == {"contentionScore": 0.6}
    assert alerts["PythonGILContention"]["for"] == "15m"
    assert alerts["PythonGILSaturated"]["for"] == "10m"
    assert alerts["PythonGILContention"]["labels"] == {"severity": "warning", "team": "python-platform"}
    expected = yaml.safe_load(rulesfile.derive(threshold={"contentionScore": 0.6},
                                               for_={"PythonGILContention": "15m"}))
    for g in expected["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                r["labels"]["team"] = "python-platform"
    assert pr["spec"] == expected
    from test_alerts import find_promtool
    promtool = find_promtool()
    if promtool:
        f = tmp_path / "rules.yaml"
        f.write_text(yaml.safe_dump(pr["spec"]))
        r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    dash = [c for c in res.kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert len(dash) == 1
    assert dash[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash[0]["metadata"]["annotations"] == {"grafana_folder": "Python"}
    assert json.loads(dash[0]["data"]["gil-exporter.json"]) == json.loads(
        (CHART / "dashboards" / "gil-exporter.json").read_text())
    assert res.one("DaemonSet")["spec"]["template"]["spec"]["priorityClassName"] == "system-node-critical"


def test_sidecar_example(helm):
    res = helm["example-sidecar"]
    for kind in ("DaemonSet", "Service", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ServiceMonitor"):
        assert not res.kind(kind), kind
    pm = res.one("PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"gil-exporter.io/sidecar": "true"}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "gil-metrics"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["shop", "batch"]}
    assert res.one("PrometheusRule")
    assert "shareProcessNamespace" in res.renders["NOTES.txt"]


def test_dedicated_nodes_example(helm):
    res = helm["example-dedicated-nodes"]
    pod = res.one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["pool"] == "python-workers"
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["affinity"]["nodeAffinity"]
    assert pod["containers"][0]["image"] == "registry.example.com/platform/gil-exporter:0.1.0"
    assert "--log.level=warn" in pod["containers"][0]["args"]
    assert not res.kind("Service")
    assert res.one("PodMonitor")["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"


# --- docs ------------------------------------------------------------------------------

def _paths(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        p = f"{prefix}{k}"
        if not (isinstance(v, dict) and v and k not in ("config", "podSecurityContext", "securityContext",
                                                   "resources", "livenessProbe", "readinessProbe",
                                                   "updateStrategy", "nodeSelector", "labels",
                                                   "podSelector")):
            out.append(p)  # a leaf, or a block documented as a whole
        else:
            out.extend(_paths(v, p + "."))
    return out


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    missing = [p for p in _paths(defaults()) if f"`{p}`" not in readme]
    assert not missing, f"values not in the chart README: {missing}"
    for ex in EXAMPLES:
        assert f"examples/{ex}.yaml" in readme
    assert "files/gil-exporter-rules.yaml" in readme


def test_schema_covers_every_top_level_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(defaults()) == set(schema["properties"])


def test_readme_sidecar_snippet():
    """The documented sidecar pod spec: shared PID namespace, SYS_PTRACE only, the chart's port
    name and pod label, the exporter's flags."""
    readme = (CHART / "README.md").read_text()
    section = readme[readme.index("## Sidecar mode"):readme.index("## Values")]
    (snippet,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    spec = yaml.safe_load(snippet)["spec"]["template"]
    sidecar_values = defaults()["sidecar"]
    assert spec["metadata"]["labels"] == sidecar_values["podSelector"]
    pod = spec["spec"]
    assert pod["shareProcessNamespace"] is True
    c = next(c for c in pod["containers"] if c["name"] == "gil-exporter")
    assert c["ports"][0]["name"] == sidecar_values["portName"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "--web.listen-address=:10057" in c["args"]
    assert c["resources"]["limits"]


def test_options(helm):
    res = helm["options"]
    ds = res.one("DaemonSet")
    assert ds["metadata"]["name"] == "gilx"
    pod = ds["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "--web.listen-address=0.0.0.0:9999" in c["args"] and "--web.telemetry-path=/metrics" in c["args"]
    # No pod metadata: no NODE_NAME, no token, no RBAC.
    assert "NODE_NAME" not in {e["name"] for e in c.get("env") or []}
    assert pod["automountServiceAccountToken"] is False
    assert not res.kind("ClusterRole") and not res.kind("ClusterRoleBinding")
    pr = res.one("PrometheusRule")
    alerts = {r["alert"]: r for g in pr["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert set(alerts) == set(rulesfile.alerts()) - {"GilExporterDown"}
    for a in alerts.values():
        assert a["annotations"]["runbook_url"].startswith("https://wiki.example.com/runbooks/")
    records = [r for g in pr["spec"]["groups"] for r in g["rules"] if "record" in r]
    assert len(records) == 4
    dash = [c for c in res.kind("ConfigMap") if c["metadata"]["name"] == "gilx-dashboard"]
    assert dash[0]["metadata"]["labels"]["grafana_dashboard"] == "gil"


def test_job_regex_override(tmp_path, helm):
    rule = helm["example-sidecar"].one("PrometheusRule")
    down = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "GilExporterDown")
    assert down["expr"] == rulesfile.alerts(rulesfile.derive(job_regex=".*gil.*"))["GilExporterDown"]["expr"]
