"""Small applications on real third-party servers from PyPI, for tests/servers.py.

Each server imports one factory from here (gunicorn 'server_apps:create_flask()', uvicorn
--factory, waitress --call). Every app has the same routes:

  /cpu     pure-Python CPU work holding the GIL (SERVER_CPU_LOOPS iterations, ~2-4 ms)
  /io      waits on I/O: a 50 ms sleep, as a call to a slow backend would
  /sqlite  a reporting query on a file database: a join that spends ~30 ms inside sqlite, which
           releases the GIL while it works (as a service waiting on its database does). A
           trivial query would make the route CPU-bound in Flask and gunicorn instead: under
           back-to-back load such a server is rightly found contended.
  /health  nothing

`batch_main` is a ThreadPoolExecutor job (python-dateutil parsing), run as a script.
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
import time

CPU_LOOPS = int(os.environ.get("SERVER_CPU_LOOPS", "60000"))
IO_SECONDS = float(os.environ.get("SERVER_IO_SECONDS", "0.05"))
_DB = os.path.join(tempfile.gettempdir(), f"gil-exporter-test-{os.getpid()}.sqlite")
_local = threading.local()


def cpu_work() -> str:
    x = 0
    for i in range(CPU_LOOPS):
        x += i * i % 7
    return str(x)


def io_work() -> str:
    time.sleep(IO_SECONDS)
    return "slept"


def _db() -> sqlite3.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(_DB, timeout=10)
        conn.execute("create table if not exists items (id integer primary key, name text)")
        if conn.execute("select count(*) from items").fetchone()[0] == 0:
            conn.executemany("insert into items (name) values (?)",
                             [(f"item-{i}",) for i in range(2000)])
            conn.commit()
        _local.conn = conn
    return conn


def sqlite_work() -> str:
    rows = _db().execute("select count(*), max(a.name) from items a join items b"
                         " on b.id % 97 = a.id % 97 where a.id % 61 = ?",
                         (int(time.time() * 1000) % 61,)).fetchall()
    return str(rows[0][0])


FROZEN_SECONDS = float(os.environ.get("SERVER_FROZEN_SECONDS", "0.2"))


def frozen_work() -> str:
    """A badly wrapped C call: libc's usleep through ctypes.PyDLL blocks with the GIL held."""
    import ctypes
    ctypes.PyDLL(None).usleep(int(FROZEN_SECONDS * 1e6))
    return "blocked"


ROUTES = {"/frozen": frozen_work, "/cpu": cpu_work, "/io": io_work, "/sqlite": sqlite_work, "/health": lambda: "ok"}


def create_flask():
    from flask import Flask
    app = Flask("gil-test")
    for path, fn in ROUTES.items():
        app.add_url_rule(path, path.strip("/"), fn)
    return app


def create_fastapi():
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse
    app = FastAPI()
    for path, fn in ROUTES.items():
        # A sync `def` endpoint: FastAPI runs it in its worker thread pool.
        app.add_api_route(path, fn, response_class=PlainTextResponse)
    return app


def create_wsgi():
    def app(environ, start_response):
        fn = ROUTES.get(environ.get("PATH_INFO", ""))
        if fn is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        body = fn().encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    return app


def batch_main(mode: str, workers: int, jobs: int) -> None:
    """A ThreadPoolExecutor batch: parse dates with python-dateutil. `cpu`: parsing only;
    `io`: each job first waits 20 ms on I/O (a fetch), then parses one date."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from dateutil import parser

    texts = [t for m in range(1, 13) for d in range(1, 28)
             for t in (f"2024-{m:02d}-{d:02d}T13:{d:02d}:07+02:00", f"Tuesday, {d} March 2021 10:{m:02d} PM",
                       f"{d}/{m}/2023 08:15", f"Jan {d} 2020 at 9am")]

    def job(i: int) -> int:
        if mode == "io":
            time.sleep(0.02)
            return parser.parse(texts[i % len(texts)]).year
        return sum(parser.parse(t).year for t in texts[i % 50:i % 50 + 20])

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:  # until killed; a batch that keeps the pool full
            list(pool.map(job, range(jobs)))


if __name__ == "__main__":
    import sys
    batch_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
