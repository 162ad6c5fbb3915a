"""The Helm chart, rendered by Helm itself and validated against Kubernetes' own API schemas.

Helm: helm-python-sdk, Helm v4's Go SDK loaded in-process (no helm binary, no cluster).
`Chart.render()` is `helm template`: the chart's defaults coalesced with the given values,
values.schema.json checked, every template rendered. `lint()` and `package()` are `helm lint`
and `helm package`.

Kubernetes: kubernetes-validate, strict (an unknown field is an error), against the oldest
Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest schema set it ships. The
Prometheus operator's kinds (ServiceMonitor, PodMonitor, PrometheusRule) have no schema there:
they are checked field by field below and the rules by promtool.

Rendered: the chart's defaults with the documented `--set image.repository=…`, every file in
examples/ the same way, every install command of the chart README and the README as pasted,
and a few value combinations.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "promtool"))
import rulesfile  # noqa: E402
from test_alerts import find_promtool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "gil-exporter"
EXAMPLES = sorted(p.stem for p in (CHART / "examples").glob("*.yaml"))
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
RELEASE, NAMESPACE = "gil-exporter", "gil-exporter"
# What every documented install command sets.
REPOSITORY = "registry.example.com/platform/gil-exporter"
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
DOCS = {"chart README": CHART / "README.md", "README": ROOT / "README.md"}


def helm_sdk():
    """helm_python, or skip (fail under CI): it is in the [test] extra (Python >= 3.10)."""
    try:
        import helm_python
    except ImportError as exc:
        msg = f"helm-python-sdk not importable ({exc}): pip install -e '.[test]' on Python >= 3.10"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return helm_python


def merge(base, over):
    """Helm's values merge: maps merge recursively, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    return copy.deepcopy(over)


def defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def example(name: str) -> dict:
    return yaml.safe_load((CHART / "examples" / f"{name}.yaml").read_text())


def with_repository(values: dict) -> dict:
    """`-f values.yaml --set image.repository=…`, as every documented command does."""
    return merge(values, {"image": {"repository": REPOSITORY}})


@dataclass
class Rendered:
    files: dict[str, str]  # template file name -> rendered text

    @property
    def objects(self) -> list[dict]:
        out = []
        for name, text in sorted(self.files.items()):
            if name.endswith(".yaml"):
                out.extend(o for o in yaml.safe_load_all(text) if o)
        return out

    def kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]


def render(values: dict | None = None, *, chart: Path = CHART, name: str = RELEASE,
           namespace: str = NAMESPACE) -> Rendered:
    """`helm template NAME CHART -n NAMESPACE` with `values` over the chart's defaults."""
    helm = helm_sdk()
    with helm.Chart.load(str(chart)) as c:
        out = c.render(values or {}, name=name, namespace=namespace, is_install=True)
    prefix = f"{CHART_META['name']}/templates/"
    assert all(k.startswith(prefix) for k in out), sorted(out)
    return Rendered({k[len(prefix):]: v for k, v in out.items()})


ALL_ON = {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
          "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}
OPTIONS = merge(ALL_ON, {
    "fullnameOverride": "gilx", "podMetadata": {"enabled": False},
    "listenAddress": "0.0.0.0:9999", "extraArgs": ["--web.telemetry-path=/metrics"],
    "prometheusRule": {"disabledAlerts": ["GilExporterDown"], "jobRegex": "monitoring/gil.*",
                       "runbookBaseUrl": "https://wiki.example.com/runbooks/"},
    "dashboard": {"labels": {"grafana_dashboard": "gil"}}})
CASES = {"default": with_repository({}), "all-enabled": with_repository(ALL_ON),
         "options": with_repository(OPTIONS),
         **{f"example-{e}": with_repository(example(e)) for e in EXAMPLES}}


def cases_with(key: str) -> list[str]:
    return [n for n, v in sorted(CASES.items()) if merge(defaults(), v)[key]["enabled"]]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {name: render(values) for name, values in CASES.items()}


def kube_versions() -> tuple[str, str]:
    """(oldest, newest): Chart.yaml's lower bound, and the newest schema set
    kubernetes-validate ships (the chart claims no upper bound)."""
    import kubernetes_validate.utils as kv
    m = re.fullmatch(r">=\s*(\d+\.\d+)\.0(-0)?", CHART_META["kubeVersion"])
    assert m, f"kubeVersion {CHART_META['kubeVersion']!r}: expected '>=X.Y.0-0'"
    return m.group(1), kv.major_minor(kv.latest_version())


# --- Helm: render, lint, package ---------------------------------------------------------

def test_examples_exist():
    assert {"kube-prometheus-stack", "sidecar", "dedicated-nodes"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_template_renders(rendered, name):
    templates = {p.name for p in (CHART / "templates").iterdir() if not p.name.startswith("_")}
    assert set(rendered[name].files) == templates
    assert rendered[name].objects


@pytest.mark.parametrize("name", sorted(CASES))
def test_lint(name):
    """`helm lint` with the case's values, plain and with --kube-version for the oldest and
    newest Kubernetes (which adds Helm's deprecated-API check)."""
    helm = helm_sdk()
    for kube in (None, *kube_versions()):
        report = helm.lint(str(CHART), CASES[name], kube_version=f"v{kube}.0" if kube else None)
        errors = [m for m in report["messages"] if m["severity"] >= 2]
        assert not errors and not report["errors"], (kube, report)


def test_lint_and_render_detect_bad_values():
    helm = helm_sdk()
    bad = with_repository({"port": "not-a-port"})
    report = helm.lint(str(CHART), bad)
    assert any("/port" in m["error"] for m in report["messages"] if m["severity"] >= 3), report
    with pytest.raises(helm.HelmValuesError, match="/port"):
        render(bad)


def test_empty_image_repository_fails_clearly():
    """No public image exists: the chart's defaults and every example, as shipped, refuse to
    render until image.repository is set, and the error names the value."""
    helm = helm_sdk()
    assert defaults()["image"]["repository"] == ""
    for values in [{}] + [example(e) for e in EXAMPLES]:
        assert values.get("image", {"repository": ""})["repository"] == ""
        with pytest.raises(helm.HelmValuesError, match=r"/image/repository': minLength"):
            render(values)
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert "required" in schema["properties"]["image"]["properties"]["repository"]["description"].lower()


def test_rules_file_without_threshold_marker_fails_render(tmp_path):
    helm = helm_sdk()
    copy_ = tmp_path / "gil-exporter"
    shutil.copytree(CHART, copy_)
    rules = copy_ / "files" / "gil-exporter-rules.yaml"
    rules.write_text(rules.read_text().replace("# threshold: contentionScore", "# contention threshold"))
    with pytest.raises(helm.HelmRenderError, match="no '# threshold: contentionScore' marker"):
        render(CASES["all-enabled"], chart=copy_)


def test_package(tmp_path, rendered):
    """`helm package`: the archive a release publishes, without examples/, renders the same."""
    helm = helm_sdk()
    archive = Path(helm.package(str(CHART), destination=str(tmp_path)))
    assert archive.name == f"gil-exporter-{CHART_META['version']}.tgz" and archive.exists()
    with helm.Chart.load(str(archive)) as c:
        assert c.metadata["kubeVersion"] == CHART_META["kubeVersion"]
        names = {f["name"] for f in c.files}
    assert not any(n.startswith("examples/") for n in names)
    assert {"files/gil-exporter-rules.yaml", "dashboards/gil-exporter.json", "README.md"} <= names
    assert render(CASES["all-enabled"], chart=archive).files == rendered["all-enabled"].files


# --- Kubernetes: every rendered object against the API schemas ---------------------------

def test_kube_version_claim():
    import kubernetes_validate.utils as kv
    oldest, newest = kube_versions()
    shipped = {kv.major_minor(v) for v in kv.all_versions()}
    assert oldest in shipped, f"no schemas for the chart's oldest Kubernetes {oldest}: {sorted(shipped)}"
    assert oldest != newest


@pytest.mark.parametrize("version", ["oldest", "newest"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_objects_validate_against_kubernetes(rendered, name, version):
    import kubernetes_validate
    kube = dict(zip(("oldest", "newest"), kube_versions()))[version]
    unchecked = []
    for obj in rendered[name].objects:
        try:
            kubernetes_validate.validate(obj, kube, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append(obj["kind"])
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {kube}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")
    # Only the operator's CRDs lack a schema; they are checked by the tests below.
    assert set(unchecked) <= OPERATOR_KINDS, unchecked
    for obj in rendered[name].objects:
        if obj["kind"] in OPERATOR_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"


def test_strict_validation_can_fail(rendered):
    """Negative controls: a misspelt field and a wrong type are caught, for both versions."""
    import kubernetes_validate
    ds = rendered["default"].one("DaemonSet")
    typo = copy.deepcopy(ds)
    typo["spec"]["template"]["spec"]["hostPid"] = typo["spec"]["template"]["spec"].pop("hostPID")
    wrong = copy.deepcopy(ds)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "10057"
    for kube in kube_versions():
        for bad in (typo, wrong):
            with pytest.raises(kubernetes_validate.ValidationError):
                kubernetes_validate.validate(bad, kube, strict=True)


# --- the rendered objects ------------------------------------------------------------------

def test_daemonset_least_privilege(rendered):
    ds = rendered["default"].one("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["image"] == f"{REPOSITORY}:{CHART_META['appVersion']}"
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    assert sc["runAsUser"] == 0 and sc["runAsGroup"] == 0 and sc["runAsNonRoot"] is False
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["args"] == ["--config=/etc/gil-exporter/config.yaml", "--web.listen-address=:10057",
                         "--log.level=info"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["tolerations"] and pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "priorityClassName" not in pod  # empty by default
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/etc/gil-exporter"]["readOnly"] is True
    assert "configMap" in vols[mounts["/etc/gil-exporter"]["name"]]
    # The one writable place under a read-only root (tests/test_image.py runs it so).
    assert vols[mounts["/tmp"]["name"]]["emptyDir"] == {"sizeLimit": "16Mi"}


def test_probes_hit_the_metrics_port(rendered):
    """Both probes GET /healthz on the container port named in them (tests/test_image.py gets
    that path from the running image)."""
    (c,) = rendered["default"].one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 10057}
    for probe in ("livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["port"] in ports
        assert c[probe]["timeoutSeconds"] <= c[probe]["periodSeconds"]
    assert c["livenessProbe"]["initialDelaySeconds"] >= 5  # the first scan must finish


def test_config_checksum_and_configmap(rendered):
    res = rendered["default"]
    ds = res.one("DaemonSet")
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    # The checksum is the sha256 of the rendered ConfigMap: a config change rolls the pods.
    assert ann["checksum/config"] == hashlib.sha256(res.files["configmap.yaml"].encode()).hexdigest()
    cm = res.one("ConfigMap")
    assert yaml.safe_load(cm["data"]["config.yaml"]) == defaults()["config"]
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
    other = rendered["example-kube-prometheus-stack"].one("DaemonSet")
    assert other["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != ann["checksum/config"]


@pytest.mark.parametrize("name", ["default"] + [f"example-{e}" for e in EXAMPLES])
def test_rendered_config_is_valid_for_the_exporter(rendered, name, tmp_path):
    cms = [c for c in rendered[name].kind("ConfigMap") if "config.yaml" in c["data"]]
    assert len(cms) == 1
    path = tmp_path / "config.yaml"
    path.write_text(cms[0]["data"]["config.yaml"])
    exe = Path(sys.executable).parent / "gil-exporter"
    if not exe.exists():
        pytest.skip("gil-exporter is not installed in the test venv")
    r = subprocess.run([str(exe), "--config", str(path), "--config.check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_labels_and_selectors(rendered):
    res = rendered["all-enabled"]
    ds = res.one("DaemonSet")
    sel = ds["spec"]["selector"]["matchLabels"]
    assert sel == {"app.kubernetes.io/name": "gil-exporter", "app.kubernetes.io/instance": RELEASE}
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert sel.items() <= pod_labels.items()
    for obj in res.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "gil-exporter"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == f"gil-exporter-{CHART_META['version']}"
    svc = res.one("Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


@pytest.mark.parametrize("name", cases_with("serviceMonitor"))
def test_servicemonitor_selects_the_service(rendered, name):
    """The ServiceMonitor finds the Service the way the operator does: namespace, then
    matchLabels against the Service's labels, then the endpoint port by name; the Service
    reaches the DaemonSet's pods through its selector and the named target port."""
    res = rendered[name]
    sm, svc = res.one("ServiceMonitor"), res.one("Service")
    pod = res.one("DaemonSet")["spec"]["template"]
    assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert "matchExpressions" not in sm["spec"]["selector"]
    (ep,) = sm["spec"]["endpoints"]
    port = next(p for p in svc["spec"]["ports"] if p["name"] == ep["port"])
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert port["targetPort"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ep["path"] == "/metrics"


def test_rbac_is_only_what_the_exporter_calls(rendered):
    """The ClusterRole, its binding and the ServiceAccount the DaemonSet runs as (the list call
    itself is checked against the API server's request in tests/test_kube.py)."""
    res = rendered["default"]
    role, binding, sa = res.one("ClusterRole"), res.one("ClusterRoleBinding"), res.one("ServiceAccount")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert res.one("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert not res.kind("Role") and not res.kind("RoleBinding")
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        assert not res.kind(kind)  # nothing optional by default
    assert len(res.kind("ConfigMap")) == 1  # no dashboard


@pytest.mark.parametrize("name", cases_with("prometheusRule"))
def test_prometheusrule_passes_promtool(rendered, name, tmp_path):
    promtool = find_promtool()
    if not promtool:
        msg = "promtool not found: run tests/setup/prometheus.sh"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    rule = rendered[name].one("PrometheusRule")
    f = tmp_path / "rules.yaml"
    f.write_text(yaml.safe_dump(rule["spec"]))
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_prometheusrule_with_defaults_is_the_rules_file(rendered, tmp_path):
    """With default values it is the rules file itself, and passes the same promtool unit tests."""
    rule = rendered["all-enabled"].one("PrometheusRule")
    assert rule["spec"] == yaml.safe_load(rulesfile.rules_text())
    promtool = find_promtool()
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


@pytest.mark.parametrize("name", cases_with("dashboard"))
def test_dashboard_configmap(rendered, name):
    values = merge(defaults(), CASES[name])
    (dash,) = [c for c in rendered[name].kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert values["dashboard"]["labels"].items() <= dash["metadata"]["labels"].items()
    assert dash["metadata"]["namespace"] == (values["dashboard"]["namespace"] or NAMESPACE)
    (key,) = dash["data"]
    board = json.loads(dash["data"][key])
    assert board == json.loads((CHART / "dashboards" / "gil-exporter.json").read_text())
    assert board["uid"] == "gil-exporter" and board["panels"]


def test_kube_prometheus_stack_example(rendered):
    res = rendered["example-kube-prometheus-stack"]
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
    (dash,) = [c for c in res.kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert dash["metadata"]["namespace"] == "monitoring"  # Grafana's, for its sidecar
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["metadata"]["annotations"] == {"grafana_folder": "Python"}
    assert res.one("DaemonSet")["spec"]["template"]["spec"]["priorityClassName"] == "system-node-critical"


def test_sidecar_example(rendered):
    res = rendered["example-sidecar"]
    for kind in ("DaemonSet", "Service", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ServiceMonitor"):
        assert not res.kind(kind), kind
    pm = res.one("PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"gil-exporter.io/sidecar": "true"}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "gil-metrics"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["shop", "batch"]}
    assert res.one("PrometheusRule")
    notes = res.files["NOTES.txt"]
    assert "shareProcessNamespace" in notes
    assert f"image: {REPOSITORY}:{CHART_META['appVersion']}" in notes


def test_dedicated_nodes_example(rendered):
    res = rendered["example-dedicated-nodes"]
    pod = res.one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["pool"] == "python-workers"
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["affinity"]["nodeAffinity"]
    assert pod["containers"][0]["image"] == f"{REPOSITORY}:0.1.0"
    assert "--log.level=warn" in pod["containers"][0]["args"]
    assert not res.kind("Service")
    assert res.one("PodMonitor")["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"


def test_options(rendered):
    res = rendered["options"]
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
    assert len(records) == len([r for g in yaml.safe_load(rulesfile.rules_text())["groups"] for r in g["rules"] if "record" in r])
    dash = [c for c in res.kind("ConfigMap") if c["metadata"]["name"] == "gilx-dashboard"]
    assert dash[0]["metadata"]["labels"]["grafana_dashboard"] == "gil"


def test_job_regex_override(rendered):
    rule = rendered["example-sidecar"].one("PrometheusRule")
    down = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "GilExporterDown")
    assert down["expr"] == rulesfile.alerts(rulesfile.derive(job_regex=".*gil.*"))["GilExporterDown"]["expr"]


# --- the install steps, as a user pastes them ----------------------------------------------

def shell_commands(text: str) -> list[str]:
    """Commands in the ```sh blocks of a document: continuations joined, comments dropped,
    `a && b` split."""
    out = []
    for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.extend(part.strip() for part in line.split("&&"))
    return out


def parse_install(cmd: str) -> dict:
    """`helm install|upgrade --install RELEASE CHART [-n NS] [--create-namespace] [-f F]... [--set K=V]...`"""
    argv = shlex.split(cmd)
    assert argv[:2] in (["helm", "install"], ["helm", "upgrade"]), cmd
    out = {"positional": [], "namespace": "default", "files": [], "sets": [], "create_namespace": False}
    it = iter(argv[2:])
    for a in it:
        if a in ("-n", "--namespace"):
            out["namespace"] = next(it)
        elif a in ("-f", "--values"):
            out["files"].append(next(it))
        elif a == "--set":
            out["sets"].append(next(it))
        elif a == "--create-namespace":
            out["create_namespace"] = True
        elif a == "--install":
            pass
        else:
            assert not a.startswith("-"), f"{cmd}: flag {a} not understood by this test"
            out["positional"].append(a)
    return out


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_documented_install_commands_render(doc):
    """Every `helm install` in the doc, run as pasted (from the repository root): sets
    image.repository, renders, and runs in a namespace the steps before it created and labelled
    for Pod Security "privileged"; the image it pulls is the one the build steps push."""
    helm = helm_sdk()
    commands = shell_commands(DOCS[doc].read_text())
    installs = [c for c in commands if c.startswith(("helm install", "helm upgrade"))]
    assert installs, f"no helm install in the {doc}"
    pushed = {shlex.split(c)[-1] for c in commands if c.startswith(("docker push", "buildah push"))}
    built = set()
    for c in commands:
        if c.startswith(("docker build", "buildah bud", "buildah build")):
            argv = shlex.split(c)
            built.add(argv[argv.index("-t") + 1])
    assert pushed and pushed <= built, (doc, built, pushed)
    for cmd in installs:
        inst = parse_install(cmd)
        assert any(s.startswith("image.repository=") for s in inst["sets"]), cmd
        release, chart = inst["positional"]
        ns = inst["namespace"]
        before = commands[:commands.index(cmd)]
        created = inst["create_namespace"] or f"kubectl create namespace {ns}" in before
        assert created, f"{doc}: namespace {ns} is not created before: {cmd}"
        labelled = [c for c in before if c.startswith("kubectl label") and f"namespace {ns} " in c + " "
                    and "pod-security.kubernetes.io/enforce=privileged" in c]
        assert labelled, f"{doc}: namespace {ns} not labelled privileged before: {cmd}"
        values: dict = {}
        for f in inst["files"]:
            values = merge(values, yaml.safe_load((ROOT / f).read_text()))
        for s in inst["sets"]:
            values = merge(values, helm.parse_set_string(s))
        res = render(values, chart=ROOT / chart, name=release, namespace=ns)
        for ds in res.kind("DaemonSet"):
            image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
            assert image in pushed, f"{doc}: {cmd} pulls {image}, the build steps push {pushed}"


def test_build_tag_is_the_charts_app_version():
    for doc, path in DOCS.items():
        for c in shell_commands(path.read_text()):
            if c.startswith(("docker build", "buildah bud", "buildah build")):
                argv = shlex.split(c)
                tag = argv[argv.index("-t") + 1].rsplit(":", 1)[1]
                assert tag == CHART_META["appVersion"], (doc, c)


# --- docs ----------------------------------------------------------------------------------

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
    # `global` is Helm's, passed down to a subchart (test_renders_as_a_subchart_with_global).
    # and `enabled`, for a parent's `condition: gil-exporter.enabled`.
    assert set(defaults()) == set(schema["properties"]) - {"global", "enabled"}


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
    assert c["image"] == f"{REPOSITORY}:{CHART_META['appVersion']}"


# --- installs that must keep working: alert names, subchart, names -------------------------

def _schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def _validate_objects(res: Rendered) -> None:
    """Every object with a schema, strict, for the oldest and newest Kubernetes."""
    import kubernetes_validate
    for kube in kube_versions():
        for obj in res.objects:
            try:
                kubernetes_validate.validate(obj, kube, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert obj["kind"] in OPERATOR_KINDS, obj["kind"]
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {kube}: "
                            f"{'.'.join(map(str, e.path))}: {e.message}")


def test_schema_alert_names_are_the_rules_files():
    """The schema's two alert-name lists are the rules file's alerts, so a new alert cannot be
    left out again (PythonGILReenabled was, and `disabledAlerts: [PythonGILReenabled]` failed)."""
    rule = _schema()["properties"]["prometheusRule"]["properties"]
    names = set(rulesfile.alerts())
    assert "PythonGILReenabled" in names
    assert set(rule["disabledAlerts"]["items"]["enum"]) == names
    assert set(rule["for"]["propertyNames"]["enum"]) == names


def test_install_with_every_alert_disabled_by_name(tmp_path):
    """Every alert of the rules file named in disabledAlerts and in `for:`: the values pass the
    schema, the PrometheusRule keeps only the recording rules, and every object validates."""
    helm = helm_sdk()
    names = sorted(rulesfile.alerts())
    values = with_repository(merge(ALL_ON, {"prometheusRule": {
        "disabledAlerts": names, "for": {n: "7m" for n in names}}}))
    report = helm.lint(str(CHART), values)
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"], report
    res = render(values)
    rules = [r for g in res.one("PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert rules and not [r for r in rules if "alert" in r]
    assert {r["record"] for r in rules} == {r["record"] for g in yaml.safe_load(rulesfile.rules_text())["groups"]
                                             for r in g["rules"] if "record" in r}
    _validate_objects(res)
    promtool = find_promtool()
    if promtool:  # what is left still loads in Prometheus
        f = tmp_path / "rules.yaml"
        f.write_text(yaml.safe_dump(res.one("PrometheusRule")["spec"]))
        r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    # One name at a time too, each leaving the others in place.
    for name in names:
        res = render(with_repository(merge(ALL_ON, {"prometheusRule": {"disabledAlerts": [name]}})))
        alerts = {r["alert"] for g in res.one("PrometheusRule")["spec"]["groups"] for r in g["rules"] if "alert" in r}
        assert alerts == set(names) - {name}
    # The list is still checked: a name the rules file does not have is refused.
    with pytest.raises(helm.HelmValuesError, match="disabledAlerts"):
        render(with_repository({"prometheusRule": {"disabledAlerts": ["NoSuchAlert"]}}))


def test_renders_as_a_subchart_with_global(tmp_path):
    """A parent chart with gil-exporter as a dependency (the packaged archive in charts/, as
    `helm dependency update` leaves it) and global values: Helm hands `global` to the subchart,
    whose schema must accept it; the subchart's objects render with the parent's values."""
    helm = helm_sdk()
    parent = tmp_path / "platform"
    (parent / "charts").mkdir(parents=True)
    helm.package(str(CHART), destination=str(parent / "charts"))
    (parent / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "platform", "version": "1.0.0",
        "dependencies": [{"name": "gil-exporter", "version": CHART_META["version"],
                          "condition": "gil-exporter.enabled"}]}))
    (parent / "values.yaml").write_text(yaml.safe_dump({
        "global": {"imageRegistry": "registry.example.com", "imagePullSecrets": [{"name": "pull"}]},
        "gil-exporter": {"enabled": True}}))
    values = {"gil-exporter": {"image": {"repository": REPOSITORY}, "serviceMonitor": {"enabled": True}}}
    with helm.Chart.load(str(parent)) as c:
        out = c.render(values, name="platform", namespace="platform", is_install=True)
    prefix = "platform/charts/gil-exporter/templates/"
    files = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
    assert "daemonset.yaml" in files, sorted(out)
    res = Rendered(files)
    ds = res.one("DaemonSet")
    assert ds["metadata"]["name"] == "platform-gil-exporter" and ds["metadata"]["namespace"] == "platform"
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == f"{REPOSITORY}:{CHART_META['appVersion']}"
    assert res.one("ServiceMonitor") and res.one("Service")
    _validate_objects(res)
    # `global` is the one key let through: the root still refuses a misspelt value.
    with helm.Chart.load(str(parent)) as c, pytest.raises(helm.HelmValuesError, match="serviceMonitr"):
        c.render(merge(values, {"gil-exporter": {"serviceMonitr": {"enabled": True}}}),
                 name="platform", namespace="platform", is_install=True)


def test_name_overrides_validate():
    """fullnameOverride and nameOverride name every object (and the DaemonSet's selector) and
    pass the schema; a name Kubernetes would refuse fails the install with the value named."""
    helm = helm_sdk()
    res = render(with_repository(merge(ALL_ON, {"fullnameOverride": "gilx", "nameOverride": "gil"})))
    for obj in res.objects:
        assert obj["metadata"]["name"].startswith("gilx"), obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "gil"
    assert res.one("ServiceMonitor")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "gil"
    _validate_objects(res)
    res = render(with_repository({"nameOverride": "py-gil"}), name="prod")
    assert res.one("DaemonSet")["metadata"]["name"] == "prod-py-gil"
    for key, bad in [("fullnameOverride", "Gil_Exporter"), ("fullnameOverride", "9gil"),
                     ("fullnameOverride", "g" * 64), ("nameOverride", "gil.exporter"),
                     ("nameOverride", "-gil"), ("fullnameOverride", 5)]:
        with pytest.raises(helm.HelmValuesError, match=f"/{key}"):
            render(with_repository({key: bad}))


def test_service_only_with_the_servicemonitor():
    """The headless Service publishes every node's exporter by DNS: by default it exists only
    for the ServiceMonitor, which needs it; service.enabled true/false still force it."""
    names = lambda res: {o["kind"] for o in res.objects}  # noqa: E731
    assert "Service" not in names(render(with_repository({})))
    assert "Service" not in names(render(with_repository({"podMonitor": {"enabled": True}})))
    assert "Service" in names(render(with_repository({"serviceMonitor": {"enabled": True}})))
    assert "Service" in names(render(with_repository({"service": {"enabled": True}})))
    assert "Service" not in names(render(with_repository({"service": {"enabled": False},
                                                           "podMonitor": {"enabled": True}})))
    notes = render(with_repository({})).files["NOTES.txt"]
    assert "service.enabled=true" in notes


# --- a secured endpoint: web config, monitors, probes, NetworkPolicy -----------------------

HASH = "$2y$10$" + "a" * 53  # the shape of a bcrypt hash; its value is never checked here
SCRAPE_AUTH = {"username": {"name": "scrape", "key": "username"},
               "password": {"name": "scrape", "key": "password"}}
SCRAPE_TLS = {"ca": {"secret": {"name": "scrape", "key": "ca.crt"}}, "serverName": "gil-exporter"}
TLS_SERVER = {"cert_file": "/etc/gil-exporter-tls/tls.crt", "key_file": "/etc/gil-exporter-tls/tls.key"}


def _container(res: Rendered) -> dict:
    (c,) = res.one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c


def _web_config_file(res: Rendered) -> tuple[str, str, dict]:
    """(mount path, file name, volume) of --web.config.file in the rendered DaemonSet."""
    c = _container(res)
    (arg,) = [a for a in c["args"] if a.startswith("--web.config.file=")]
    path = Path(arg.split("=", 1)[1])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount["readOnly"] is True
    vols = {v["name"]: v for v in res.one("DaemonSet")["spec"]["template"]["spec"]["volumes"]}
    return str(path.parent), path.name, vols[mount["name"]]


def test_web_config_secret_mounted_and_monitors_scrape_with_it(tmp_path):
    """Inline webConfig.config: a Secret with the web config, mounted read-only where
    --web.config.file points, that the exporter's own loader accepts; a change rolls the pods.
    The ServiceMonitor and PodMonitor scrape with https, the tlsConfig and basicAuth given.
    existingSecret: the user's Secret mounted the same way, no Secret rendered."""
    import base64

    from exporter.webconfig import load_web_config
    web = {"basic_auth_users": {"prometheus": HASH}, "tls_server_config": TLS_SERVER}
    monitor = {"enabled": True, "tlsConfig": SCRAPE_TLS, "basicAuth": SCRAPE_AUTH}
    values = with_repository({"webConfig": {"config": web, "tlsSecret": "gil-tls"},
                              "serviceMonitor": monitor, "podMonitor": monitor})
    res = render(values)
    secret = res.one("Secret")
    directory, name, volume = _web_config_file(res)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    text = base64.b64decode(secret["data"][name]).decode()
    assert yaml.safe_load(text) == web
    (tmp_path / name).write_text(yaml.safe_dump({"basic_auth_users": web["basic_auth_users"]}))
    assert load_web_config(str(tmp_path / name)).users == {"prometheus": HASH.encode()}
    mounts = {m["mountPath"]: m for m in _container(res)["volumeMounts"]}
    vols = {v["name"]: v for v in res.one("DaemonSet")["spec"]["template"]["spec"]["volumes"]}
    tls_mount = mounts[str(Path(TLS_SERVER["cert_file"]).parent)]
    assert tls_mount["readOnly"] and vols[tls_mount["name"]]["secret"]["secretName"] == "gil-tls"
    # Mounts beside the config's, never inside its read-only ConfigMap volume.
    assert not directory.startswith("/etc/gil-exporter/")
    for ep in (res.one("ServiceMonitor")["spec"]["endpoints"][0],
               res.one("PodMonitor")["spec"]["podMetricsEndpoints"][0]):
        assert ep["scheme"] == "https" and ep["tlsConfig"] == SCRAPE_TLS and ep["basicAuth"] == SCRAPE_AUTH
    _validate_objects(res)
    ann = lambda r: r.one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]  # noqa: E731
    other = render(merge(values, {"webConfig": {"config": {"basic_auth_users": {"scraper": HASH}}}}))
    assert ann(other)["checksum/web-config"] != ann(res)["checksum/web-config"]
    assert ann(other)["checksum/config"] == ann(res)["checksum/config"]

    # The user's own Secret.
    res = render(with_repository({"webConfig": {"existingSecret": "mine", "key": "web.yml", "tls": "tls"},
                                  "serviceMonitor": monitor}))
    assert not res.kind("Secret")
    directory, name, volume = _web_config_file(res)
    assert name == "web.yml" and volume["secret"]["secretName"] == "mine"
    assert "checksum/web-config" not in ann(res)
    assert res.one("ServiceMonitor")["spec"]["endpoints"][0]["scheme"] == "https"
    _validate_objects(res)

    # Without a web config: plain http, nothing mounted, no Secret.
    res = render(with_repository(ALL_ON))
    assert not res.kind("Secret")
    assert not [a for a in _container(res)["args"] if a.startswith("--web.config.file")]
    ep = res.one("ServiceMonitor")["spec"]["endpoints"][0]
    assert ep["scheme"] == "http" and "tlsConfig" not in ep and "basicAuth" not in ep


@pytest.mark.parametrize("values,message", [
    ({"webConfig": {"existingSecret": "mine", "config": {"basic_auth_users": {"p": HASH}}}}, "not both"),
    ({"webConfig": {"existingSecret": "mine"}}, "set webConfig.tls"),
    ({"webConfig": {"config": {"basic_auth_users": {"p": HASH}}}, "serviceMonitor": {"enabled": True}},
     "set serviceMonitor.basicAuth"),
    ({"webConfig": {"config": {"tls_server_config": TLS_SERVER}, "tlsSecret": "t"},
      "podMonitor": {"enabled": True, "scheme": "http"}}, "podMonitor.scheme is http"),
    ({"serviceMonitor": {"enabled": True, "scheme": "https"}}, "no TLS in the web config"),
    ({"webConfig": {"config": {"tls_server_config": TLS_SERVER}, "tlsSecret": "t", "tls": "mtls"}},
     "leave webConfig.tls empty"),
    ({"webConfig": {"config": {"tls_server_config": {"cert_file": "tls.crt", "key_file": "/k"}}}},
     "tls_server_config.cert_file: \"tls.crt\" is relative"),
    ({"webConfig": {"config": {"tls_server_config": TLS_SERVER}}}, "set webConfig.tlsSecret"),
])
def test_web_config_mismatch_fails_the_install(values, message):
    """A web config the scrapes or probes would not get through fails the install, naming it."""
    helm = helm_sdk()
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(with_repository(values))


def test_web_config_values_are_checked_by_the_schema():
    helm = helm_sdk()
    for bad, where in [({"webConfig": {"config": {"basic_auth_users": {"p": "plaintext"}}}}, "basic_auth_users"),
                       ({"webConfig": {"config": {"tls_config": {}}}}, "tls_config"),
                       ({"webConfig": {"tls": "yes"}}, "/webConfig/tls"),
                       ({"serviceMonitor": {"enabled": True, "scheme": "ftp"}}, "/serviceMonitor/scheme"),
                       ({"podMonitor": {"enabled": True, "basicAuth": {"username": "bob"}}}, "/podMonitor/basicAuth")]:
        with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            render(with_repository(bad))


@pytest.mark.parametrize("web,expect", [
    ({}, ("httpGet", None)),
    ({"config": {"basic_auth_users": {"prometheus": HASH}}}, ("httpGet", None)),
    ({"config": {"basic_auth_users": {"prometheus": HASH}, "tls_server_config": TLS_SERVER}}, ("httpGet", "HTTPS")),
    ({"existingSecret": "mine", "tls": "tls"}, ("httpGet", "HTTPS")),
    ({"existingSecret": "mine", "tls": "none"}, ("httpGet", None)),
    ({"config": {"tls_server_config": {**TLS_SERVER, "client_auth_type": "VerifyClientCertIfGiven",
                                       "client_ca_file": "/etc/gil-exporter-tls/ca.crt"}}}, ("httpGet", "HTTPS")),
    ({"config": {"tls_server_config": {**TLS_SERVER, "client_auth_type": "RequireAndVerifyClientCert",
                                       "client_ca_file": "/etc/gil-exporter-tls/ca.crt"}}}, ("tcpSocket", None)),
    ({"existingSecret": "mine", "tls": "mtls"}, ("tcpSocket", None)),
], ids=["none", "basic-auth", "tls+basic-auth", "secret-tls", "secret-none", "optional-client-cert", "mtls",
        "secret-mtls"])
def test_probes_with_auth(web, expect):
    """The probes as the kubelet can make them with the web config on: GET /healthz (which
    answers without credentials: tests/test_web_security.py runs that against a real exporter
    with basic auth), over HTTPS when TLS is on (the kubelet does not verify the certificate);
    with a client certificate required, which the kubelet cannot present, a TCP connect."""
    kind, scheme = expect
    if "config" in web and "tls_server_config" in web["config"]:
        web = {**web, "tlsSecret": "gil-tls"}
    res = render(with_repository({"webConfig": web}))
    c = _container(res)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        p = c[probe]
        assert set(p) & {"httpGet", "tcpSocket", "exec", "grpc"} == {kind}, p
        assert p[kind]["port"] in ports
        if kind == "httpGet":
            assert p["httpGet"]["path"] == defaults()[probe]["httpGet"]["path"] == "/healthz"
            assert p["httpGet"].get("scheme") == scheme
        # The rest of the probe (delays, periods) is the values' own.
        rest = {k: v for k, v in p.items() if k not in ("httpGet", "tcpSocket")}
        assert rest == {k: v for k, v in defaults()[probe].items() if k != "httpGet"}
    _validate_objects(res)


def _selects(selector: dict | None, labels: dict) -> bool:
    """A Kubernetes LabelSelector: matchLabels and matchExpressions, ANDed; {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], e.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _admits(policy: dict, namespace: str, ns_labels: dict, pod_labels: dict, port: int) -> bool:
    """Whether the NetworkPolicy lets a pod in (namespace, labels) reach `port`, as the API
    defines it: a peer with a namespaceSelector matches pods of those namespaces (all of them
    without a podSelector); a peer with a podSelector alone, pods of the policy's namespace."""
    for rule in policy["spec"]["ingress"]:
        if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
            continue
        for peer in rule.get("from") or []:
            if "ipBlock" in peer:
                continue
            if "namespaceSelector" in peer:
                ns_ok = _selects(peer["namespaceSelector"], ns_labels)
            else:
                ns_ok = namespace == policy["metadata"]["namespace"]
            if ns_ok and _selects(peer.get("podSelector"), pod_labels):
                return True
    return False


def test_network_policy_admits_only_the_scraper():
    """Off by default. On: it selects exactly the exporter's pods, Ingress only, and of these
    callers admits kube-prometheus-stack's Prometheus in `monitoring` alone, on the metrics port
    alone; schema-valid for both Kubernetes versions. With other selectors, those."""
    assert not render(with_repository({})).kind("NetworkPolicy")
    assert not render(with_repository({"mode": "sidecar", "networkPolicy": {"enabled": True}})).kind("NetworkPolicy")
    res = render(with_repository({"networkPolicy": {"enabled": True}}))
    policy = res.one("NetworkPolicy")
    _validate_objects(res)
    pod = res.one("DaemonSet")["spec"]["template"]
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert _selects(policy["spec"]["podSelector"], pod["metadata"]["labels"])
    assert not _selects(policy["spec"]["podSelector"], {"app.kubernetes.io/name": "prometheus"})
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    port = _container(res)["ports"][0]["containerPort"]
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    prometheus = {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack-prometheus",
                  "app.kubernetes.io/managed-by": "prometheus-operator"}
    assert _admits(policy, "monitoring", monitoring, prometheus, port)
    assert not _admits(policy, "monitoring", monitoring, prometheus, port + 1)
    assert not _admits(policy, "monitoring", monitoring, {"app.kubernetes.io/name": "grafana"}, port)
    assert not _admits(policy, "shop", {"kubernetes.io/metadata.name": "shop"}, prometheus, port)
    assert not _admits(policy, NAMESPACE, {"kubernetes.io/metadata.name": NAMESPACE}, {"app": "x"}, port)

    # A selector of the user's replaces the default one (not merged with it).
    res = render(with_repository({"networkPolicy": {
        "enabled": True, "namespaceSelector": {"matchLabels": {"team": "observability"}},
        "podSelector": {"matchLabels": {"app": "vmagent"}},
        "extraFrom": [{"ipBlock": {"cidr": "10.0.0.0/24"}}]}}))
    policy = res.one("NetworkPolicy")
    _validate_objects(res)
    vmagent = {"app": "vmagent"}
    assert _admits(policy, "obs", {"team": "observability"}, vmagent, port)
    assert not _admits(policy, "monitoring", monitoring, vmagent, port)
    assert not _admits(policy, "obs", {"team": "observability"}, prometheus, port)
    assert {"ipBlock": {"cidr": "10.0.0.0/24"}} in policy["spec"]["ingress"][0]["from"]


def test_secured_example(rendered):
    """examples/secured.yaml: the user's web-config Secret mounted, probes over HTTPS, the
    ServiceMonitor with https/tlsConfig/basicAuth from the scrape Secret, the NetworkPolicy."""
    res = rendered["example-secured"]
    directory, name, volume = _web_config_file(res)
    assert volume["secret"]["secretName"] == "gil-exporter-web" and name == "web-config.yaml"
    for probe in ("livenessProbe", "readinessProbe"):
        assert _container(res)[probe]["httpGet"]["scheme"] == "HTTPS"
    ep = res.one("ServiceMonitor")["spec"]["endpoints"][0]
    assert ep["scheme"] == "https" and ep["tlsConfig"]["serverName"] == "gil-exporter"
    assert ep["basicAuth"]["password"] == {"name": "gil-exporter-scrape", "key": "password"}
    assert res.one("NetworkPolicy") and res.one("Service")
