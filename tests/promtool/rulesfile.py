"""The one rules file, and the same rewrites the Helm chart applies to it.

The chart (templates/prometheusrule.yaml) and these helpers do the same three things:
  * swap the number on each line ending in `# threshold: <name>`;
  * set an alert's `for:`;
  * swap the exporter job regex `.*gil-exporter.*`.
The end-to-end test uses `derive()` to make its short-`for:` copy; test_alerts.py checks that
the markers exist and that a changed threshold changes what fires.
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
