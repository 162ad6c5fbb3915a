"""Real servers from PyPI (gunicorn gthread + Flask, uvicorn + sync FastAPI, waitress) and a
ThreadPoolExecutor batch, started as separate processes, and a bounded loopback load.

    with start_case("gunicorn-cpu") as case, Load(case.url, case.route):
        ... read case.pid from outside ...

Every case is named "<server>-<route>"; CASES says what is expected of each. Traffic goes to
127.0.0.1 only and is bounded in requests and in time.
"""
from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable  # the test venv: the servers are installed by the [test] extra

# case -> (server, route, contended?, workers/threads). CPU routes run pure Python in every
# handler thread; I/O routes sleep 50 ms or wait ~30 ms on a sqlite join (GIL released).
CASES = {
    "gunicorn-cpu": ("gunicorn", "/cpu", True),
    "gunicorn-io": ("gunicorn", "/io", False),
    "gunicorn-sqlite": ("gunicorn", "/sqlite", False),
    "uvicorn-cpu": ("uvicorn", "/cpu", True),
    "uvicorn-io": ("uvicorn", "/io", False),
    "waitress-cpu": ("waitress", "/cpu", True),
    "waitress-io": ("waitress", "/io", False),
    # a handler blocking in C with the GIL held: frozen, and more processes would not help
    "waitress-frozen": ("waitress", "/frozen", True),
    # one worker with one handler thread, CPU-bound: not contended, but it uses its one core;
    # processes would add throughput, threads would not
    "waitress1-cpu": ("waitress1", "/cpu", False),
    "pool-cpu": ("pool", "cpu", True),
    "pool-io": ("pool", "io", False),
}
THREADS = 4  # handler threads per server process; pool workers
CLIENTS = 8  # concurrent client connections: more than the handler threads
_URL = re.compile(r"https?://127\.0\.0\.1:(\d+)")


def _command(server: str, route: str) -> list[str]:
    if server == "gunicorn":
        return [PYTHON, "-m", "gunicorn", "--chdir", str(HERE), "-k", "gthread", "--workers", "1",
                "--threads", str(THREADS), "--bind", "127.0.0.1:0", "--access-logfile", "-",
                "--log-level", "info", "server_apps:create_flask()"]
    if server == "uvicorn":
        # Sync endpoints run in anyio's thread pool (40 threads); no access log: it would be
        # most of the CPU work.
        return [PYTHON, "-m", "uvicorn", "--app-dir", str(HERE), "--factory", "--host", "127.0.0.1",
                "--port", "0", "--no-access-log", "--log-level", "info", "server_apps:create_fastapi"]
    if server == "waitress":
        return [PYTHON, "-m", "waitress", "--host", "127.0.0.1", "--port", "0",
                f"--threads={THREADS}", "--call", "server_apps:create_wsgi"]
    if server == "waitress1":
        return [PYTHON, "-m", "waitress", "--host", "127.0.0.1", "--port", "0",
                "--threads=1", "--call", "server_apps:create_wsgi"]
    if server == "pool":
        return [PYTHON, str(HERE / "server_apps.py"), route, str(THREADS), "200"]
    raise ValueError(server)


@dataclass
class Case:
    name: str
    server: str
    route: str
    contended: bool
    proc: subprocess.Popen
    port: int | None = None
    log: Path | None = None

    @property
    def url(self) -> str | None:
        return None if self.port is None else f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The process that runs the application code (gunicorn: its one worker)."""
        if self.server != "gunicorn":
            return self.proc.pid
        children = psutil.Process(self.proc.pid).children()
        return children[0].pid

    def stop(self) -> None:
        for child in _children(self.proc.pid):  # gunicorn's worker, if the master dies first
            _kill(child)
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.log is not None:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> Case:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def start_case(name: str, timeout: float = 30.0) -> Case:
    server, route, contended = CASES[name]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    fd, log = tempfile.mkstemp(prefix=f"gil-server-{name}-", suffix=".log")
    proc = subprocess.Popen(_command(server, route), stdout=fd, stderr=subprocess.STDOUT, env=env,
                            cwd=HERE)
    os.close(fd)
    case = Case(name, server, route, contended, proc, log=Path(log))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = case.log.read_text(errors="replace")
        if proc.poll() is not None:
            case.stop()
            raise RuntimeError(f"{name}: server exited {proc.returncode}: {text[-2000:]}")
        if server == "pool":
            if "ready" in text:
                return case
        else:
            m = _URL.search(text)
            if m and (server != "gunicorn" or _children(proc.pid)):
                case.port = int(m.group(1))
                if _get(case.port, "/health"):
                    return case
        time.sleep(0.1)
    case.stop()
    raise RuntimeError(f"{name}: server did not start in {timeout:.0f} s")


def _get(port: int, path: str) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        ok = conn.getresponse().read() is not None
        conn.close()
        return ok
    except OSError:
        return False


@dataclass
class Load:
    """CLIENTS keep-alive connections to 127.0.0.1, each sending requests back to back, until
    `max_requests` in total or `max_seconds` have passed, whichever comes first."""

    url: str | None
    route: str
    clients: int = CLIENTS
    max_requests: int = 20000
    max_seconds: float = 60.0
    done: int = 0
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        if self.url is None:  # a batch: it loads itself
            return self
        port = int(self.url.rsplit(":", 1)[1])
        self._deadline = time.monotonic() + self.max_seconds
        for _ in range(self.clients):
            t = threading.Thread(target=self._client, args=(port,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self.done + self.errors >= self.max_requests \
                    or time.monotonic() > self._deadline:
                return False
            self.done += 1
            return True

    def _client(self, port: int) -> None:
        conn = None
        while self._take():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", self.route)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise OSError(f"status {resp.status}")
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                with self._lock:
                    self.done -= 1
                    self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
        if conn is not None:
            conn.close()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)
