"""HTTP: /metrics, a landing page at /, and /healthz, on the standard library's server."""
from __future__ import annotations

import base64
import binascii
import html
import logging
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from exporter import __version__
from exporter.monitor import Monitor
from exporter.webconfig import BasicAuth, WebConfig

log = logging.getLogger(__name__)


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def landing_page(monitor: Monitor, metrics_path: str) -> str:
    rows = []
    for v in monitor.snapshot():
        f = v.figures
        ctx = None if f is None else f.voluntary_per_second + f.involuntary_per_second
        interval = None if v.gil is None or v.gil.samples == 0 else v.gil.interval_seconds * 1000
        score = None if v.score is None else v.score
        method = "" if v.score is None else f" ({v.score_method})"
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
                v.target, v.pid, v.python_version or "?",
                v.threads, _fmt(f and f.cpu_cores, ".2f"), _fmt(ctx, ".0f"),
                _fmt(score, ".2f") + method, _fmt(f and f.waiting_threads, ".2f"),
                _fmt(f and f.held_ratio, ".2f"), _fmt(interval, ".1f"), v.gil_probe)) + "</tr>")
    body = "\n".join(rows) or '<tr><td colspan="11">No target process found yet.</td></tr>'
    source = html.escape(monitor.config.source or "none (every CPython process)")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gil-exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body>
<h1>gil-exporter {__version__}</h1>
<p><a href="{html.escape(metrics_path)}">Metrics</a> · <a href="/healthz">Health</a> · config: {source}
 · window {monitor.config.window_seconds:g} s</p>
<table><tr><th>target</th><th>pid</th><th>Python</th><th>threads</th><th>cores used</th>
<th>context switches/s</th><th>GIL contention score</th><th>waiting threads</th><th>GIL held ratio</th>
<th>switch interval (ms)</th><th>GIL probe</th></tr>
{body}
</table></body></html>
"""


class RenderedMetrics:
    """The /metrics body, rendered at most once per monitor tick and set of live processes.

    The figures only change when the monitor ticks (once a second), but a scrape must never
    show a process that has exited since. So a scrape checks liveness (one small read per
    process) and reuses the body rendered for the same tick and the same live processes;
    after each tick the body is rendered ahead of time while someone is scraping, which keeps
    the text formatting off the scrape's path.
    """

    PRERENDER_WHILE_SCRAPED = 120.0  # seconds after the last scrape

    def __init__(self, registry: CollectorRegistry, monitor: Monitor, collector):
        self.registry = registry
        self.monitor = monitor
        self.collector = collector
        self._cache: dict[str, tuple] = {}  # content type -> (generation, alive, body)
        self._lock = threading.Lock()
        self._last_scrape = 0.0
        self._last_accept = ""
        monitor.tick_listeners.append(self._prerender)

    def body(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        self._last_scrape, self._last_accept = time.monotonic(), accept
        alive = self.monitor.alive_keys()
        generation = self.monitor.generation
        hit = self._cache.get(content_type)
        if hit is not None and hit[0] == generation and hit[1] == alive:
            return hit[2], content_type
        with self._lock:
            with self.collector.pinned(alive):
                body = encoder(self.registry)
            self._cache[content_type] = (generation, alive, body)
        return body, content_type

    def _prerender(self) -> None:
        if time.monotonic() - self._last_scrape < self.PRERENDER_WHILE_SCRAPED:
            self.body(self._last_accept)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that does the TLS handshake in the connection's own thread,
    so a slow or plain-HTTP client can never hold up accept() for everyone else."""

    daemon_threads = True
    request_queue_size = 128
    ssl_context: ssl.SSLContext | None = None
    handshake_timeout = 10.0

    def finish_request(self, request, client_address):
        if self.ssl_context is not None:
            request.settimeout(self.handshake_timeout)
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log.debug("TLS handshake with %s failed: %s", client_address[0], e)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address[0], exc_info=True)


class ExporterServer:
    """Serves one registry and the landing page; stops cleanly on request."""

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, monitor: Monitor,
                 metrics_path: str = "/metrics", web: WebConfig | None = None, collector=None):
        self.registry = registry
        self.monitor = monitor
        self.rendered = RenderedMetrics(registry, monitor, collector) if collector is not None else None
        self.metrics_path = metrics_path
        self.web = web or WebConfig()
        self.auth = BasicAuth(self.web.users) if self.web.users else None
        handler = self._handler()
        server_class = _Server
        if ":" in address[0]:
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        self.httpd = server_class(address, handler)
        self.httpd.ssl_context = self.web.ssl_context
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.web.ssl_context is not None else "http"

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = f"gil-exporter/{__version__}"
            protocol_version = "HTTP/1.1"
            timeout = 30  # a slow client cannot hold a worker thread forever

            def _authorized(self) -> bool:
                if server.auth is None:
                    return True
                header = self.headers.get("Authorization", "")
                scheme, _, value = header.partition(" ")
                if scheme.lower() == "basic":
                    try:
                        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
                    except (binascii.Error, UnicodeDecodeError):
                        user = password = None
                    if user is not None and server.auth.check(user, password):
                        return True
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="gil-exporter"')
                self.send_header("Content-Length", "13")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(b"unauthorized\n")
                return False

            def do_GET(self):  # noqa: N802 (http.server's naming)
                if not self._authorized():
                    return
                path = urlsplit(self.path).path
                if path == server.metrics_path:
                    accept = self.headers.get("Accept", "")
                    try:
                        if server.rendered is not None:
                            body, content_type = server.rendered.body(accept)
                        else:
                            encoder, content_type = choose_encoder(accept)
                            body = encoder(server.registry)
                    except Exception as e:
                        log.error("scrape failed: %s: %s", type(e).__name__, e)
                        self._send(500, "text/plain; charset=utf-8", b"scrape failed\n")
                        return
                    self._send(200, content_type, body)
                elif path == "/":
                    page = landing_page(server.monitor, server.metrics_path).encode()
                    self._send(200, "text/html; charset=utf-8", page)
                elif path == "/healthz":
                    self._send(200, "text/plain; charset=utf-8", b"ok\n")
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def do_HEAD(self):  # noqa: N802
                self.do_GET()

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("http %s %s", self.address_string(), fmt % args)

        return Handler

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
