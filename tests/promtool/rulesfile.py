"""The one rules file, and the same rewrites the Helm chart applies to it.

The chart (templates/prometheusrule.yaml) and these helpers do the same three things:
  * swap the number on each line ending in `# threshold: <name>`;
  * set an alert's `for:`;
  * swap the exporter job regex `.*gil-exporter.*`.
The end-to-end test uses `derive()` to make its short-`for:` copy; test_alerts.py checks that
the markers exist and that a changed threshold changes what fires. (The chart also swaps the
dashboard URL and adds its own scrape job to the regex; test_alerts renders the chart for those.)

`recycling_tests()` generates recycling.test.yaml: workers replaced by new PIDs every 2 minutes
for 30 minutes, and the per-workload alerts that must fire once and stay firing
(`python tests/promtool/rulesfile.py` rewrites the file).
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "gil-exporter"
RULES_FILE = CHART / "files" / "gil-exporter-rules.yaml"
UNIT_TESTS = Path(__file__).resolve().parent / "gil-exporter-rules.test.yaml"
DEFAULT_JOB_REGEX = ".*gil-exporter.*"

# Same pattern as the chart's regexReplaceAll (Go RE2 syntax is compatible with this).
THRESHOLD_RE = re.compile(
    r"(?m)^(?P<pre>[ \t]*[<>=!]+[ \t]*)(?P<num>[0-9][0-9.eE+-]*)(?P<post>[ \t]*#[ \t]*threshold:[ \t]*(?P<name>[A-Za-z]+))[ \t]*$")


def rules_text() -> str:
    return RULES_FILE.read_text()


def thresholds(text: str | None = None) -> dict[str, float]:
    text = rules_text() if text is None else text
    return {m.group("name"): float(m.group("num")) for m in THRESHOLD_RE.finditer(text)}


def alerts(text: str | None = None) -> dict[str, dict]:
    doc = yaml.safe_load(rules_text() if text is None else text)
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def derive(text: str | None = None, *, threshold: dict[str, float] | None = None,
           for_: dict[str, str] | None = None, job_regex: str | None = None) -> str:
    """A copy of the rules file with thresholds, `for:` durations or the job regex changed."""
    text = rules_text() if text is None else text
    for name, value in (threshold or {}).items():
        pattern = re.compile(THRESHOLD_RE.pattern.replace(r"(?P<name>[A-Za-z]+)", re.escape(name)))
        text, n = pattern.subn(lambda m: f"{m.group('pre')}{value}{m.group('post')}", text)
        if n == 0:
            raise KeyError(f"no '# threshold: {name}' marker in the rules file")
    if job_regex is not None:
        if DEFAULT_JOB_REGEX not in text:
            raise KeyError("job regex marker missing from the rules file")
        text = text.replace(f'job=~"{DEFAULT_JOB_REGEX}"', f'job=~"{job_regex}"')
    for alert, duration in (for_ or {}).items():
        # Textual, so that comments (and the threshold markers) survive.
        m = re.search(rf"(?m)^[ \t]*- alert:[ \t]*{re.escape(alert)}[ \t]*$", text)
        if not m:
            raise KeyError(f"no alert {alert} in the rules file")
        nxt = re.compile(r"(?m)^[ \t]*- (alert|record):").search(text, m.end())
        end = nxt.start() if nxt else len(text)
        f = re.compile(r"(?m)^([ \t]*for:[ \t]*)(\S+)").search(text, m.end(), end)
        if not f:
            raise KeyError(f"alert {alert} has no for:")
        text = text[:f.start(2)] + duration + text[f.end(2):]
    return text


# --- recycled workers: the promtool test of alerts per workload ---------------------------------

RECYCLING_TESTS = Path(__file__).resolve().parent / "recycling.test.yaml"
RECYCLE_SCRAPE = 30      # seconds: the chart's ServiceMonitor interval
RECYCLE_MINUTES = 30
RECYCLE_EVERY = 4        # scrapes between generations of workers: 2 minutes
RECYCLE_GAP = 1          # scrapes at the end of each generation without any score
SAMPLES = RECYCLE_MINUTES * 60 // RECYCLE_SCRAPE + 1
DASHBOARD_URL = "http://localhost:3000/d/gil-exporter/gil-exporter"


def _scored(i: int) -> bool:
    """Whether the workers have a score at sample i (not in the gap before a new generation)."""
    return i % RECYCLE_EVERY < RECYCLE_EVERY - RECYCLE_GAP


class _Recycled:
    """`workers` worker processes, all replaced by new PIDs every RECYCLE_EVERY scrapes: every
    worker of a generation ends at once, its series ended by a staleness marker as a scrape
    that no longer lists it ends it, and the next generation's first score comes RECYCLE_GAP
    scrapes later (the exporter scores a process after two ticks): the worst case, a scrape
    with no score at all. Worker slot w scores `score + 0.01 w`, so the worst is the last slot.
    On Kubernetes the workers are spread over `pods` on two nodes."""

    def __init__(self, labels: dict[str, str], workers: int, score: float, first_pid: int,
                 pods: list[str] | None = None, gil_probe: str = "ok"):
        self.labels, self.workers, self.score, self.first_pid = labels, workers, score, first_pid
        self.pods = pods or []
        # a probe other than ok: the exporter publishes the /proc estimate, and says why in
        # pygil_target_info, series for series
        self.gil_probe = gil_probe
        self.method = "gil_state" if gil_probe == "ok" else "procfs"

    def pid(self, generation: int, w: int) -> int:
        return self.first_pid + generation * self.workers + w

    def where(self, w: int) -> dict[str, str]:
        if not self.pods:
            return {"instance": "batch-host:10057"}
        k = w % len(self.pods)
        return {"pod": self.pods[k], "instance": f"10.0.{k}.7:10057", "node": f"node-{'ab'[k]}"}

    def series(self) -> list[dict]:
        out = []
        for g in range(-(-SAMPLES // RECYCLE_EVERY)):
            start = g * RECYCLE_EVERY
            for w in range(self.workers):
                values = ["_"] * SAMPLES
                for i in range(start, min(start + RECYCLE_EVERY, SAMPLES)):
                    values[i] = f"{self.score + 0.01 * w:.2f}" if _scored(i) else "stale"
                labels = dict(self.labels, pid=str(self.pid(g, w)), **self.where(w))
                body = ",".join(f'{k}="{v}"' for k, v in dict(labels, method=self.method).items())
                out.append({"series": f"pygil_gil_contention_score{{{body}}}", "values": " ".join(values)})
                if self.gil_probe != "ok":
                    info = dict(labels, python_version="3.11.7", implementation="cpython",
                                exe="/usr/local/bin/python3.11", gil_probe=self.gil_probe, free_threaded="false")
                    body = ",".join(f'{k}="{v}"' for k, v in info.items())
                    out.append({"series": f"pygil_target_info{{{body}}}",
                                "values": " ".join("1" if v not in ("_", "stale") else v for v in values)})
        return out

    def probe_alert(self, i: int) -> dict:
        """PythonGILProbeUnavailable as it reads at sample i (a scored one)."""
        assert _scored(i)
        l, w = self.labels, self.workers - 1
        workload = f" ({l['workload_kind']} {l['namespace']}/{l['workload']})"
        where = self.where(w)
        keys = ("namespace", "workload", "workload_kind", "target")
        return {
            "exp_labels": {"severity": "warning", **{k: l[k] for k in keys}, "gil_probe": self.gil_probe},
            "exp_annotations": {
                "summary": f"GIL probe unavailable for {l['target']}{workload}: {self.gil_probe}",
                "description": (
                    f"gil-exporter cannot read the GIL state of {self.workers} Python processes of "
                    f"{l['target']}{workload} because of \"{self.gil_probe}\" (e.g. pid "
                    f"{self.pid(i // RECYCLE_EVERY, w)}, pod {where['pod']}, on {where['node']}), and falls "
                    "back to the /proc heuristic (when /proc alone cannot tell, no score is published and "
                    "pygil_gil_contention_score_unknown is 1). Contention figures for this workload are "
                    "estimates, and the contention alerts may miss it."),
                "runbook_url": "https://github.com/gil-exporter/gil-exporter/blob/main/docs/runbooks/"
                               "python-gil-probe-unavailable.md",
                "dashboard_url": (f"{DASHBOARD_URL}?var-cluster=&var-namespace={l['namespace']}"
                                  f"&var-workload={l['workload']}&var-target={l['target']}"),
            }}

    def alert(self, i: int) -> dict:
        """PythonGILContention as it reads at sample i (a scored one)."""
        assert _scored(i)
        l, w = self.labels, self.workers - 1
        workload = f" ({l['workload_kind']} {l['namespace']}/{l['workload']})" if "workload" in l else ""
        where = self.where(w)
        pod = f", pod {where['pod']}" if "pod" in where else ""
        on = where.get("node", where["instance"])
        worst = f"{self.score + 0.01 * w:.2f}"
        keys = ("namespace", "workload", "workload_kind", "target")
        return {
            "exp_labels": {"severity": "warning", **{k: l[k] for k in keys if k in l}},
            "exp_annotations": {
                "summary": f"GIL contention in {l['target']}{workload}: worst score {worst}",
                "description": (
                    f"{l['target']}{workload} has kept its worst Python process above the GIL contention "
                    f"threshold, whichever workers came and went: {self.workers} of its {self.workers} "
                    f"processes are above it now, the worst at {worst} (pid {self.pid(i // RECYCLE_EVERY, w)}"
                    f"{pod}, on {on}). The GIL was held while another thread waited for it for most of the "
                    "time: adding threads will not make it faster."),
                "runbook_url": "https://github.com/gil-exporter/gil-exporter/blob/main/docs/runbooks/"
                               "python-gil-contention.md",
                "dashboard_url": (f"{DASHBOARD_URL}?var-cluster=&var-namespace={l.get('namespace', '')}"
                                  f"&var-workload={l.get('workload', '')}&var-target={l['target']}"),
            }}


def _at(i: int) -> str:
    seconds = i * RECYCLE_SCRAPE
    return f"{seconds // 60}m{seconds % 60}s" if seconds % 60 else f"{seconds // 60}m"


def _checks(for_: str) -> tuple[int, list[int]]:
    """The evaluation at which `for:` has passed, and where to check the alert fires: there,
    then every 2 minutes (the first scrape of a generation) to the end."""
    assert for_.endswith("m")
    fires = int(for_[:-1]) * 60 // RECYCLE_SCRAPE
    assert _scored(fires)
    return fires, [fires] + list(range(fires + RECYCLE_EVERY - fires % RECYCLE_EVERY, SAMPLES, RECYCLE_EVERY))


def _probe_case() -> dict:
    """8 workers whose GIL probe is unavailable, recycled as above: one
    PythonGILProbeUnavailable for the workload, within its `for:`, firing throughout."""
    legacy = _Recycled({"job": "gil-exporter", "target": "legacy", "namespace": "batch", "container": "app",
                        "workload": "etl-api", "workload_kind": "Deployment"}, 8, 0.3, 20000,
                       pods=["etl-api-5d8f9c7b6-aaaaa", "etl-api-5d8f9c7b6-bbbbb"], gil_probe="permission_denied")
    for_ = alerts()["PythonGILProbeUnavailable"]["for"]
    fires, checks = _checks(for_)
    labels = ('alertstate="firing", severity="warning", namespace="batch", workload="etl-api", '
              'workload_kind="Deployment", target="legacy", gil_probe="permission_denied"')
    return {
        "name": (f"8 workers without GIL probe replaced by new PIDs every {RECYCLE_EVERY * RECYCLE_SCRAPE // 60}m "
                 f"for {RECYCLE_MINUTES}m: one PythonGILProbeUnavailable, within for: {for_}, firing throughout"),
        "interval": f"{RECYCLE_SCRAPE}s",
        "input_series": legacy.series(),
        "alert_rule_test": [
            {"eval_time": _at(fires - 1), "alertname": "PythonGILProbeUnavailable", "exp_alerts": []},
            *({"eval_time": _at(i), "alertname": "PythonGILProbeUnavailable",
               "exp_alerts": [legacy.probe_alert(i)]} for i in checks),
        ],
        "promql_expr_test": [
            {"expr": (f'count_over_time(ALERTS{{alertname="PythonGILProbeUnavailable", alertstate="firing"}}'
                      f'[{RECYCLE_MINUTES}m])'),
             "eval_time": _at(SAMPLES - 1),
             "exp_samples": [{"labels": f'{{alertname="PythonGILProbeUnavailable", {labels}}}',
                              "value": SAMPLES - fires}]},
        ],
    }


def _saturated_case() -> dict:
    """8 workers whose GIL is saturated (held 97-99 %, 2 threads waiting, one core), recycled as
    above: the per-process held ratio needs two samples of the new PID's counters, so each
    generation leaves two scrapes without it; one PythonGILSaturated, firing throughout."""
    workers = 8
    labels = {"job": "gil-exporter", "target": "gunicorn", "namespace": "shop", "container": "app",
              "workload": "render", "workload_kind": "Deployment"}
    pods = ["render-6b7c8d9f5-aaaaa", "render-6b7c8d9f5-bbbbb"]
    gen = _Recycled(labels, workers, 0.9, 30000, pods=pods)
    held = [29.1 + 0.1 * w for w in range(workers)]      # of 30 s sampled per scrape
    series = []
    for g in range(-(-SAMPLES // RECYCLE_EVERY)):
        start = g * RECYCLE_EVERY
        for w in range(workers):
            per = dict(labels, pid=str(gen.pid(g, w)), **gen.where(w))
            body = ",".join(f'{k}="{v}"' for k, v in per.items())
            for name, value in (("pygil_gil_held_seconds_total", lambda n: f"{held[w] * n:.1f}"),
                                ("pygil_gil_sampled_seconds_total", lambda n: f"{30 * n}"),
                                ("pygil_gil_waiting_threads", lambda n: "2"),
                                ("pygil_process_cpu_cores", lambda n: "1")):
                values = ["_"] * SAMPLES
                for i in range(start, min(start + RECYCLE_EVERY, SAMPLES)):
                    values[i] = value(i - start) if _scored(i) else "stale"
                series.append({"series": f"{name}{{{body}}}", "values": " ".join(values)})
    for_ = alerts()["PythonGILSaturated"]["for"]
    assert for_.endswith("m")
    first = 1                                            # the first held ratio: two samples
    fires = first + int(for_[:-1]) * 60 // RECYCLE_SCRAPE
    has_rate = [i for i in range(fires, SAMPLES) if 0 < i % RECYCLE_EVERY < RECYCLE_EVERY - RECYCLE_GAP]
    checks = [fires] + [i for i in has_rate if i % RECYCLE_EVERY == 1 and i > fires]
    assert fires in has_rate
    worst = held[-1] / 30
    keys = ("namespace", "workload", "workload_kind", "target")
    where = gen.where(workers - 1)

    def alert(i: int) -> dict:
        return {
            "exp_labels": {"severity": "warning", **{k: labels[k] for k in keys}},
            "exp_annotations": {
                "summary": f"GIL saturated in gunicorn (Deployment shop/render): held {worst * 100:.4g}% with threads waiting",
                "description": (
                    f"{workers} Python processes of gunicorn (Deployment shop/render) hold the GIL nearly all "
                    "the time with threads waiting, on about one core each; the most saturated held it "
                    f"{worst * 100:.4g}% of the time over 5 minutes (pid {gen.pid(i // RECYCLE_EVERY, workers - 1)}, "
                    f"pod {where['pod']}, on {where['node']}). Such a process is capped at one core by the "
                    "GIL: more threads or more CPU limit will not help; more processes will."),
                "runbook_url": "https://github.com/gil-exporter/gil-exporter/blob/main/docs/runbooks/"
                               "python-gil-saturated.md",
                "dashboard_url": f"{DASHBOARD_URL}?var-cluster=&var-namespace=shop&var-workload=render&var-target=gunicorn",
            }}

    return {
        "name": (f"8 saturated workers replaced by new PIDs every {RECYCLE_EVERY * RECYCLE_SCRAPE // 60}m "
                 f"for {RECYCLE_MINUTES}m: one PythonGILSaturated, within for: {for_}, firing throughout"),
        "interval": f"{RECYCLE_SCRAPE}s",
        "input_series": series,
        "alert_rule_test": [
            {"eval_time": _at(fires - 1), "alertname": "PythonGILSaturated", "exp_alerts": []},
            *({"eval_time": _at(i), "alertname": "PythonGILSaturated", "exp_alerts": [alert(i)]} for i in checks),
        ],
        "promql_expr_test": [
            {"expr": f'count_over_time(ALERTS{{alertname="PythonGILSaturated", alertstate="firing"}}[{RECYCLE_MINUTES}m])',
             "eval_time": _at(SAMPLES - 1),
             "exp_samples": [{"labels": ('{alertname="PythonGILSaturated", alertstate="firing", severity="warning", '
                                         'namespace="shop", workload="render", workload_kind="Deployment", '
                                         'target="gunicorn"}'),
                              "value": SAMPLES - fires}]},
        ],
    }


def recycling_tests() -> str:
    """tests/promtool/recycling.test.yaml, made from the constants above (test_alerts checks the
    file is this text): 8 contended gunicorn workers of a Deployment, over two pods, replaced by
    new PIDs every 2 minutes for 30 minutes; beside them 8 uncontended workers of another
    Deployment, and 4 contended workers of a host process outside Kubernetes, recycled the same
    way. PythonGILContention fires once per workload, within its `for:`, and stays firing."""
    kube = {"job": "gil-exporter", "target": "gunicorn", "namespace": "shop", "container": "app",
            "workload_kind": "Deployment"}
    checkout = _Recycled(dict(kube, workload="checkout-api"), 8, 0.8, 1000,
                         pods=["checkout-api-7d9f8b6c5-x2k4p", "checkout-api-7d9f8b6c5-q9z8w"])
    reports = _Recycled(dict(kube, workload="reports"), 8, 0.2, 5000,
                        pods=["reports-5b6c7d8e9f-abcde", "reports-5b6c7d8e9f-pndng"])
    host = _Recycled({"job": "gil-exporter", "target": "batch-host"}, 4, 0.7, 9000)
    series = checkout.series() + reports.series() + host.series()
    for_ = alerts()["PythonGILContention"]["for"]
    fires, checks = _checks(for_)
    end = _at(SAMPLES - 1)
    checkout_labels = ('namespace="shop", workload="checkout-api", workload_kind="Deployment", '
                       'target="gunicorn"')
    doc = {
        "rule_files": ["../../deploy/helm/gil-exporter/files/gil-exporter-rules.yaml"],
        "evaluation_interval": f"{RECYCLE_SCRAPE}s",
        # as Prometheus orders them on a steady state: the records, then the alerts reading them
        "group_eval_order": ["gil-exporter.recording", "gil-exporter.alerts"],
        "tests": [{
            "name": (f"8 contended workers replaced by new PIDs every {RECYCLE_EVERY * RECYCLE_SCRAPE // 60}m "
                     f"for {RECYCLE_MINUTES}m: one PythonGILContention per workload, within for: {for_}, "
                     "firing throughout"),
            "interval": f"{RECYCLE_SCRAPE}s",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": _at(fires - 1), "alertname": "PythonGILContention", "exp_alerts": []},
                *({"eval_time": _at(i), "alertname": "PythonGILContention",
                   "exp_alerts": [checkout.alert(i), host.alert(i)]} for i in checks),
            ],
            "promql_expr_test": [
                # The input has gaps: the workers' own max is missing before each generation ...
                {"expr": ('count_over_time((max by (namespace, workload, target) (pygil_gil_contention_score'
                          f'{{workload="checkout-api"}}))[{RECYCLE_MINUTES + 1}m:{RECYCLE_SCRAPE}s])'),
                 "eval_time": end,
                 "exp_samples": [{"labels": '{namespace="shop", workload="checkout-api", target="gunicorn"}',
                                  "value": sum(_scored(i) for i in range(SAMPLES))}]},
                # ... 8 workers in each of 16 generations came and went ...
                {"expr": ('count(count by (pid) (last_over_time(pygil_gil_contention_score'
                          f'{{workload="checkout-api"}}[{RECYCLE_MINUTES + 1}m])))'),
                 "eval_time": end,
                 "exp_samples": [{"labels": "{}", "value": len(checkout.series())}]},
                # ... while each workload's recorded series has a sample at every evaluation ...
                {"expr": f"count_over_time(namespace_workload_target:pygil_gil_contention_score:max[{RECYCLE_MINUTES + 1}m])",
                 "eval_time": end,
                 "exp_samples": [
                     {"labels": ('{namespace="shop", '
                                 f'workload="{w}", workload_kind="Deployment", target="gunicorn"}}'),
                      "value": SAMPLES} for w in ("checkout-api", "reports")] + [
                     {"labels": '{target="batch-host"}', "value": SAMPLES}]},
                # ... and its alert fired once: firing at every evaluation since for: passed, its
                # activeAt never moved, and the uncontended workload never even went pending.
                {"expr": (f'count_over_time(ALERTS{{alertname="PythonGILContention", alertstate="firing", '
                          f'workload="checkout-api"}}[{RECYCLE_MINUTES}m])'),
                 "eval_time": end,
                 "exp_samples": [{"labels": ('{alertname="PythonGILContention", alertstate="firing", '
                                             f'severity="warning", {checkout_labels}}}'),
                                  "value": SAMPLES - fires}]},
                {"expr": (f'changes(ALERTS_FOR_STATE{{alertname="PythonGILContention", workload="checkout-api"}}'
                          f'[{RECYCLE_MINUTES + 1}m])'),
                 "eval_time": end,
                 "exp_samples": [{"labels": (f'{{alertname="PythonGILContention", severity="warning", '
                                             f'{checkout_labels}}}'),
                                  "value": 0}]},
                {"expr": f'count_over_time(ALERTS{{workload="reports"}}[{RECYCLE_MINUTES + 1}m])',
                 "eval_time": end, "exp_samples": []},
            ],
        }, _probe_case(), _saturated_case()],
    }
    header = ("# GENERATED by tests/promtool/rulesfile.py (recycling_tests); test_alerts.py checks it is\n"
              "# up to date. Regenerate: python tests/promtool/rulesfile.py\n"
              "# Run: promtool test rules tests/promtool/recycling.test.yaml\n")
    return header + yaml.safe_dump(doc, sort_keys=False, width=4096)


if __name__ == "__main__":
    RECYCLING_TESTS.write_text(recycling_tests())
    print(f"wrote {RECYCLING_TESTS}")
