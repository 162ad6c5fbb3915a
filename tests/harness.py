"""Run the real exporter daemon as a subprocess and scrape it, for tests."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
# Not anchored at the line's end: another thread's log line may follow on the same line.
_URL = re.compile(r"\bmetrics (https?://[^\s/]+)/")


def exporter_command() -> list[str]:
    """The installed console script next to the interpreter running the tests."""
    script = Path(sys.executable).parent / "gil-exporter"
    return [str(script)] if script.exists() else [sys.executable, "-m", "exporter"]


@dataclass
class Sample:
    name: str
    labels: dict
    value: float


class Exporter:
    def __init__(self, args: list[str], env: dict | None = None):
        self.log = tempfile.NamedTemporaryFile(prefix="gil-exporter-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            exporter_command() + ["--web.listen-address", "127.0.0.1:0"] + args,
            stdout=subprocess.DEVNULL, stderr=self.log, env=env or dict(os.environ))
        self.base = self._wait_for_url()

    def _wait_for_url(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _URL.search(self.log_text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited {self.proc.returncode}: {self.log_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"exporter did not start: {self.log_text()}")

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self) -> list[Sample]:
        status, text = self.get("/metrics")
        assert status == 200, text
        out = []
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.append(Sample(s.name, dict(s.labels), s.value))
        return out

    def series(self, name: str, **labels) -> list[Sample]:
        return [s for s in self.scrape() if s.name == name
                and all(s.labels.get(k) == str(v) for k, v in labels.items())]

    def value(self, name: str, **labels) -> float | None:
        found = self.series(name, **labels)
        return found[0].value if found else None

    def wait_for(self, predicate, timeout: float = 30.0, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"condition not met in {timeout}s (last: {last!r})\nlog:\n{self.log_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log.name)


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path
