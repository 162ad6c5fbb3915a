"""HTTP: /metrics, a landing page at /, and /healthz, on the standard library's server."""
from __future__ import annotations

import base64
import binascii
import html
import io
import ipaddress
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from exporter import __version__, procfs, score, views
from exporter.collector import exposition
from exporter.connections import ConnectionServer, Request, ResponseWriter, ServerLimits
from exporter.monitor import Monitor
from exporter.redact import shown_cmdline
from exporter.threadsampler import SamplerPool
from exporter.threadtable import ThreadTable
from exporter.views import status as process_verdict  # the verdict as diagnose gives it
from exporter.webconfig import WebConfig, WebConfigFile

log = logging.getLogger(__name__)


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


#: Where the alert runbooks live (the same base URL as the alert rules' runbook_url).
RUNBOOK_BASE = "https://github.com/gil-exporter/gil-exporter/blob/main/docs/runbooks/"
CMDLINE_SHOWN = 90  # characters of a command line on the landing page
SPARK_SECONDS = 600.0  # the per-process page's sparkline covers the last 10 minutes
THREAD_ROWS = 30  # rows of the per-process page's thread table; the rest are folded into one

_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td.l,th.l{text-align:left}th{background:#f3f3f3}
tr.contended td{background:#fde0dc}tr.unknown td{background:#f4f4f4;color:#555}
.badge{display:inline-block;padding:1px 6px;border-radius:3px;font-size:85%;font-weight:bold}
.b-contended{background:#c62828;color:#fff}.b-ok{background:#2e7d32;color:#fff}
.b-unknown,.b-measuring{background:#757575;color:#fff}
code{background:#f3f3f3;padding:1px 3px}.cmd{font-family:monospace;font-size:90%}
section{margin-top:1.5em}"""


def _badge(status: str) -> str:
    text = {"contended": "CONTENDED", "ok": "ok", "unknown": "unknown",
            "measuring": "measuring"}[status]
    return f'<span class="badge b-{status}">{text}</span>'


def _score_text(v) -> str:
    if v.score is None:
        return "unknown (procfs)" if v.score_method == "procfs" else "–"
    return f"{v.score:.2f} ({v.score_method})"


def _truncate(text: str, n: int) -> str:
    """Head and tail of a long command line: the program and its last arguments (the app,
    a tag) are what tell processes apart."""
    if len(text) <= n:
        return text
    head = n * 2 // 5
    return text[:head] + " … " + text[-(n - head - 3):]


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
{body}
</body></html>
"""


def landing_page(monitor: Monitor, metrics_path: str, show_cmdline: bool = False) -> str:
    can_ptrace = procfs.has_cap_sys_ptrace()
    views = monitor.snapshot()
    judged = [(v, *process_verdict(v, can_ptrace)) for v in views]
    # Highest score first; processes without a score after every scored one.
    judged.sort(key=lambda j: (j[0].score is None, -(j[0].score or 0.0), j[0].pid))
    rows = []
    for v, status, verdict in judged:
        f = v.figures
        cmd = shown_cmdline(v.cmdline, show_cmdline) or v.exe or "?"
        shown = _truncate(cmd, CMDLINE_SHOWN)
        headline = verdict.headline if verdict else (
            "locating the GIL" if v.gil_probe == "pending" else "collecting a first window")
        link = f'/process/{v.pid}'
        rows.append(
            f'<tr class="{status}" data-pid="{v.pid}">'
            f'<td class="l">{_badge(status)}</td>'
            f'<td>{html.escape(_score_text(v))}</td>'
            f'<td class="l"><a href="{link}">{v.pid}</a></td>'
            f'<td class="l cmd" title="{html.escape(cmd)}">{html.escape(shown)}</td>'
            f'<td class="l">{html.escape(headline)}</td>'
            f'<td class="l">{html.escape(v.target)}</td>'
            f'<td>{html.escape(v.python_version or "?")}</td>'
            f'<td>{v.threads}</td>'
            f'<td>{_fmt(f and f.cpu_cores, ".2f")}</td>'
            f'<td>{_fmt(f and f.waiting_threads, ".2f")}</td>'
            f'<td>{_fmt(f and f.held_ratio, ".0%")}</td>'
            f'<td class="l">{html.escape(v.gil_probe)}</td></tr>')
    body = "\n".join(rows) or '<tr><td class="l" colspan="12">No target process found yet.</td></tr>'
    contended = sum(1 for _, status, _ in judged if status == "contended")
    source = html.escape(monitor.config.source or "none (every CPython process)")
    return _page("gil-exporter", f"""<h1>gil-exporter {__version__}</h1>
<p><a href="{html.escape(metrics_path)}">Metrics</a> · <a href="/healthz">Health</a> ·
<a href="{RUNBOOK_BASE}python-gil-contention.md">Runbook</a> · config: {source} ·
window {monitor.config.window_seconds:g} s</p>
<p><b>{len(views)} process{"" if len(views) == 1 else "es"}, {contended} contended.</b>
A process is <span class="badge b-contended">CONTENDED</span> when its GIL contention score is
0.5 or more: the fraction of time the GIL was held while another thread waited for it
(<code>gil_state</code>, read from the process's memory), or the /proc-only estimate
(<code>procfs</code>) when its memory cannot be read, which says <i>unknown</i> when /proc cannot
tell. Click a PID for the verdict, advice and history, or run
<code>gil-exporter diagnose PID</code>.</p>
<table><tr><th class="l">status</th><th>score</th><th class="l">pid</th><th class="l">command line</th>
<th class="l">verdict</th><th class="l">target</th><th>Python</th><th>threads</th><th>cores used</th>
<th>threads waiting for the GIL</th><th>GIL held</th><th class="l">GIL probe</th></tr>
{body}
</table>""")


def sparkline(history, now: float, seconds: float = SPARK_SECONDS, width: int = 480,
              height: int = 60, threshold: float = 0.5) -> str:
    """Inline SVG of the score over the history kept (at most `seconds`, at least a minute
    wide): a line per stretch of known scores (gaps where there was none), the alert threshold
    dashed."""
    points = [(t, s) for t, s in history if now - t <= seconds]
    span = min(seconds, max(60.0, now - points[0][0])) if points else seconds

    def x(t):
        return round(width * (1 - (now - t) / span), 1)

    def y(s):
        return round(height - 2 - (height - 4) * max(0.0, min(1.0, s)), 1)

    segments, current = [], []
    for t, s in points:
        if s is None:
            if current:
                segments.append(current)
            current = []
            continue
        current.append((x(t), y(s)))
    if current:
        segments.append(current)
    lines = "".join(
        '<polyline points="' + " ".join(f"{a},{b}" for a, b in seg)
        + '" fill="none" stroke="#1565c0" stroke-width="2"/>' if len(seg) > 1 else
        f'<circle cx="{seg[0][0]}" cy="{seg[0][1]}" r="2" fill="#1565c0"/>'
        for seg in segments)
    ty = y(threshold)
    label = f"{span / 60:.0f} min" if span >= 120 else f"{span:.0f} s"
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="contention score, last '
            f'{label}" style="border:1px solid #ccc;background:#fafafa">'
            f'<line x1="0" y1="{ty}" x2="{width}" y2="{ty}" stroke="#c62828" '
            f'stroke-dasharray="4 3" stroke-width="1"/>{lines}'
            f'<text x="3" y="11" font-size="9" fill="#777">1</text>'
            f'<text x="3" y="{height - 3}" font-size="9" fill="#777">0 · {label} ago</text></svg>')


def _thread_rows(table: ThreadTable) -> str:
    interp = table.gils > 1
    head = ('<tr><th>TID</th><th class="l">name</th><th>GIL held</th><th>waiting</th><th>CPU</th>'
            + ("<th>interpreter</th>" if interp else "") + "</tr>")
    rows = []
    for r in table.rows:
        name = r.name + ("" if r.alive else " (ended)") + (
            " (held the GIL while blocked)" if score.thread_held_blocked(r.held, r.cpu, r.run_delay)
            else "")
        cells = [str(r.tid or ""), name, _fmt(r.held, ".0%"), _fmt(r.waiting, ".0%"), _fmt(r.cpu, ".0%")]
        if interp:
            cells.append("–" if r.interpreter is None else str(r.interpreter))
        rows.append(f'<tr data-tid="{r.tid}"><td>{html.escape(cells[0])}</td>'
                    f'<td class="l">{html.escape(cells[1])}</td>'
                    + "".join(f"<td>{html.escape(c)}</td>" for c in cells[2:]) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def thread_section(table: ThreadTable | None) -> str:
    """The per-thread table of the per-process page (the same rows as `diagnose`)."""
    if table is None:
        return ""
    if table.sampled_seconds:
        how = {"gil_requested": "each thread's own <code>gil_requested</code> flag",
               "futex": "threads blocked in <code>futex()</code> on the GIL's condition variable"}
        note = (f"Sampled over the last {table.seconds:.0f} s ({table.samples} GIL samples"
                + (f", {table.gils} GILs: one per interpreter" if table.gils > 1 else "")
                + f"); waiting: {how.get(table.waiting_source, '?')}. CPU is a share of one core.")
    else:
        note = (f"GIL shares not measured ({html.escape(table.unavailable or 'no GIL samples yet')}); "
                f"CPU over the last {table.seconds:.0f} s, as a share of one core.")
    found = sum(r.waiting or 0.0 for r in table.rows)
    if table.waiting_source == "futex" and table.waiting_threads and found < 0.9 * table.waiting_threads:
        note += (f" The waiting shares add up to {found:.2f} threads, the GIL's own count to "
                 f"{table.waiting_threads:.2f}: a waiter just woken, not yet back in "
                 f"<code>futex()</code>, is only in the count.")
    return (f"<p>{note} Sampled while this page is looked at, from the moment it first was; "
            f"reload for a fresh table.</p>" + (_thread_rows(table) if table.rows else
                                                "<p>No thread could be read.</p>"))


def _figure_rows(view) -> str:
    """The figures table's rows of a process page."""
    f = view.figures
    interval = None if f is None or f.interval_seconds is None else f.interval_seconds * 1000
    figures = [
        ("contention score", _score_text(view)),
        ("threads", str(view.threads)),
        ("CPU cores used", _fmt(f and f.cpu_cores, ".2f")),
        ("threads sharing the CPU", _fmt(f and f.busy_threads, ".1f")),
        ("busiest thread's CPU share", _fmt(f and f.top_thread_share, ".0%")),
        ("time runnable, not running (cores)", _fmt(f and f.run_delay_cores, ".2f")),
        ("voluntary / involuntary switches/s",
         f"{_fmt(f and f.voluntary_per_second, '.0f')} / {_fmt(f and f.involuntary_per_second, '.0f')}"),
        ("GIL held", _fmt(f and f.held_ratio, ".0%")),
        ("threads waiting for the GIL (mean)", _fmt(f and f.waiting_threads, ".2f")),
        ("GIL handoffs/s", _fmt(f and f.switches_per_second, ".0f")),
        ("switch interval (ms)", _fmt(interval, ".2f")),
        ("GIL probe", view.gil_probe + (f" ({view.probe_detail})" if view.probe_detail else "")),
        ("Python", f"{view.python_version or '?'} ({view.implementation})"),
        ("executable", view.exe or "?"),
        ("target", view.target),
    ]
    rows = "\n".join(f'<tr><th class="l">{html.escape(k)}</th><td class="l">{html.escape(v)}</td></tr>'
                     for k, v in figures)
    return rows


def _verdict_html(status: str, verdict) -> str:
    """The verdict section's text of a process page, as diagnose words it."""
    if verdict is None:
        said = "<p>No verdict yet: the GIL is being located or sampled over a first window.</p>"
    else:
        advice = "".join(f"<li>{html.escape(a)}</li>" for a in verdict.advice)
        said = (f"<p>{_badge(status)} <b>{html.escape(verdict.headline)}</b> "
                f"(<code>{verdict.kind}</code>)</p>" + (f"<ul>{advice}</ul>" if advice else ""))
    return said


def process_page(monitor: Monitor, pid: int, metrics_path: str,
                 threads: SamplerPool | None = None, show_cmdline: bool = False) -> str | None:
    view = next((v for v in monitor.snapshot() if v.pid == pid), None)
    if view is None:
        return None
    table = None
    if threads is not None:
        threads.configure(monitor.config.sampling.rate_hz, monitor.config.sampling.enabled)
        try:
            # a process whose locate blocked: the page's own sampler must not block too
            table = threads.table(pid, procfs.start_time(pid), monitor.config.window_seconds,
                                  limit=THREAD_ROWS, read_gil=view.gil_probe != "locate_timeout")
        except (procfs.ProcessGone, PermissionError):
            return None
    status, verdict = process_verdict(views.with_threads(view, table), procfs.has_cap_sys_ptrace(),
                                      views.table_holder(table))
    rows = _figure_rows(view)
    said = _verdict_html(status, verdict)
    runbook = "python-gil-probe-unavailable.md" if view.score_method == "procfs" \
        else "python-gil-contention.md"
    now = time.time()
    return _page(f"gil-exporter: pid {pid}", f"""<p><a href="/">← all processes</a></p>
<h1 class="{status}">pid {pid} {_badge(status)}</h1>
<p class="cmd">{html.escape(shown_cmdline(view.cmdline, show_cmdline) or view.exe or "?")}</p>
<section id="verdict"><h2>Verdict</h2>{said}
<p>Same as <code>gil-exporter diagnose {pid}</code>. Runbook:
<a href="{RUNBOOK_BASE}{runbook}">{runbook}</a> ·
metrics: <a href="{html.escape(metrics_path)}">{html.escape(metrics_path)}</a>
(series with <code>pid="{pid}"</code>)</p></section>
<section id="history"><h2>Contention score, up to the last {SPARK_SECONDS / 60:g} minutes</h2>
{sparkline(view.score_history, now)}
<p>Dashed: the alert threshold (0.5). Gaps: no score (measuring, or unknown from /proc).</p></section>
<section id="figures"><h2>Figures over the last {monitor.config.window_seconds:g} s</h2>
<table>{rows}</table></section>
<section id="threads"><h2>Threads: who holds the GIL, who waits for it</h2>
{thread_section(table) or "<p>Not sampled here.</p>"}</section>""")


class RenderedMetrics:
    """The /metrics body, rendered at most once per monitor pass and set of live processes.

    The figures only change when the monitor makes a pass, but a scrape must never show a
    process that has exited since. So a scrape checks liveness (one pread per process) and
    reuses the body rendered for the same pass and the same live processes. The monitor
    follows the scrapes (Monitor.follow_scrapes): it makes a pass just before each expected
    scrape, after which the body is rendered ahead of time, which keeps the text formatting
    off the scrape's path; a scrape that finds the figures older than a tick waits for a pass.
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
        monitor.follow_scrapes()
        monitor.tick_listeners.append(self._prerender)

    def body(self, accept: str) -> tuple[bytes, str]:
        self._last_scrape, self._last_accept = time.monotonic(), accept
        self.monitor.scraped()
        self.monitor.refresh()
        return self._render(accept)

    def _render(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        alive = self.monitor.alive_keys()
        generation = self.monitor.generation
        hit = self._cache.get(content_type)
        if hit is not None and hit[0] == generation and hit[1] == alive:
            return hit[2], content_type
        with self._lock:
            with self.collector.pinned(alive):
                om = _openmetrics(content_type)
                body = None if om is None else exposition(self.registry.collect(), om)
                if body is None:
                    body = encoder(self.registry)
            self._cache[content_type] = (generation, alive, body)
        return body, content_type

    def _prerender(self) -> None:
        now = time.monotonic()
        if now - self._last_scrape >= self.PRERENDER_WHILE_SCRAPED:
            return
        expected = self.monitor.scrape_expected
        if expected is not None and expected - now > 2 * self.monitor.lead:
            return  # a pass for a window's start, not one a scrape is about to read
        self._render(self._last_accept)


def _openmetrics(content_type: str) -> bool | None:
    """For the formats exposition() writes (names in the legacy character set need no
    escaping): True for OpenMetrics 1.0.0, False for the text format; None for any other."""
    params = [p.strip() for p in content_type.split(";")]
    escaping = next((p[9:] for p in params if p.startswith("escaping=")), "underscores")
    if escaping not in ("underscores", "allow-utf-8"):
        return None
    if params[0] == "application/openmetrics-text" and "version=1.0.0" in params:
        return True
    if params[0] == "text/plain" and ("version=0.0.4" in params or "version=1.0.0" in params):
        return False
    return None


class AllowedHosts:
    """The Host header check against DNS rebinding: a page on evil.example that resolves its
    own name to 127.0.0.1 reaches this server with `Host: evil.example`. Accepted: an IP
    literal (what Prometheus and the kubelet send: Host: POD_IP:PORT), a name given with
    --web.allowed-hosts, this host's own name, and `localhost` when the listener takes
    loopback connections; a request without Host (not a browser) too. `names` None: no check."""

    def __init__(self, names, listen_host: str):
        self.names = None if names is None else {n.lower().rstrip(".") for n in names}
        if self.names is not None:
            self.names.add(socket.gethostname().lower())
            if _takes_loopback(listen_host):
                self.names.add("localhost")

    def allows(self, host: str | None) -> bool:
        if self.names is None or host is None:
            return True
        host = host.strip().lower()
        if host.startswith("["):  # [v6]:port
            name = host[1:host.find("]")] if "]" in host else host
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name.rstrip(".") in self.names


def _takes_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() == "localhost"
    return ip.is_loopback or ip.is_unspecified


#: /process/PID: a PID is at most 10 ASCII digits (pid_max is at most 2^22); anything else
#: is not a page (`²` passes str.isdigit, and int() of 5,000 digits raises).
_PROCESS_PATH = re.compile(r"/process/([0-9]{1,10})")


@dataclass(frozen=True)
class WebOptions:
    """The --web.* flags that shape what is served."""
    show_cmdline: bool = False  # full command lines on the pages (default: secrets masked)
    pages: bool = True  # False: / and /process/PID answer 404; /metrics and /healthz stay
    allowed_hosts: tuple | None = ()  # names accepted in Host besides IP literals; None: no check


class _Handler(BaseHTTPRequestHandler):
    """The standard library's request handler, run by ExporterServer._serve on a head the
    acceptor read: `self.server` is the ExporterServer, set there."""
    server_version = f"gil-exporter/{__version__}"
    protocol_version = "HTTP/1.1"

    def _authorized(self) -> bool:
        auth = self.server.web.current().auth
        if auth is None:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user = password = None
            if user is not None and auth.check(user, password):
                return True
        self._send(401, "text/plain; charset=utf-8", b"unauthorized\n",
                   (("WWW-Authenticate", 'Basic realm="gil-exporter"'),))
        return False

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._sent = False
        try:
            self._dispatch()
        except Exception as e:  # noqa: BLE001 (one page's failure, not the connection's)
            log.error("%s failed: %s: %s", self.path[:200], type(e).__name__, e)
            if not self._sent:
                self._send(500, "text/plain; charset=utf-8", b"internal error\n")
            self.close_connection = True

    def _dispatch(self):
        server = self.server
        if not server.hosts.allows(self.headers.get("Host")):
            self._send(421, "text/plain; charset=utf-8",
                       b"host not allowed: use an IP address, or a name given with "
                       b"--web.allowed-hosts\n")
            return
        path = urlsplit(self.path).path
        # /healthz says "ok" and nothing else: open, so that the kubelet's probes (which
        # carry no credentials) keep working with basic auth on.
        if path != "/healthz" and not self._authorized():
            return
        process = _PROCESS_PATH.fullmatch(path)
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
        elif path == "/healthz":
            self._send(200, "text/plain; charset=utf-8", b"ok\n")
        elif not server.options.pages and (path == "/" or process):
            self._send(404, "text/plain; charset=utf-8",
                       b"pages are switched off (--web.disable-pages)\n")
        elif path == "/":
            server.monitor.refresh()  # figures at most a tick old, as for a scrape
            page = landing_page(server.monitor, server.metrics_path,
                                server.options.show_cmdline).encode()
            self._send(200, "text/html; charset=utf-8", page)
        elif process:
            server.monitor.refresh()
            page = process_page(server.monitor, int(process.group(1)), server.metrics_path,
                                server.threads, server.options.show_cmdline)
            if page is None:
                self._send(404, "text/plain; charset=utf-8", b"no such process\n")
            else:
                self._send(200, "text/html; charset=utf-8", page.encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def _send(self, code: int, content_type: str, body: bytes, extra=()) -> None:
        self._sent = True
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (*extra, *self.server.web.current().headers):
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.debug("http %s %s", self.address_string(), fmt % args)


class ExporterServer:
    """Serves one registry and the landing page; stops cleanly on request."""

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, monitor: Monitor,
                 metrics_path: str = "/metrics", web: WebConfig | WebConfigFile | None = None,
                 collector=None, options: WebOptions = WebOptions(),
                 limits: ServerLimits = ServerLimits()):
        self.registry = registry
        self.monitor = monitor
        self.rendered = RenderedMetrics(registry, monitor, collector) if collector is not None else None
        sampling = monitor.config.sampling
        # per-process pages sample their process's threads while they are looked at
        self.threads = SamplerPool(sampling.rate_hz, read_gil=sampling.enabled)
        self.metrics_path = metrics_path
        self.options = options
        self.hosts = AllowedHosts(options.allowed_hosts, address[0])
        # a WebConfigFile is re-read when it or a file it names changes (at most once a second)
        self.web = web if isinstance(web, WebConfigFile) else WebConfigFile.fixed(web or WebConfig())
        self.limits = limits
        self.handler = _Handler
        self.httpd = ConnectionServer(address, self._serve, tls=lambda: self.web.current().ssl_context,
                                      limits=limits)

    @property
    def scheme(self) -> str:
        return "https" if self.web.current().ssl_context is not None else "http"

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def _serve(self, req: Request) -> bool:
        """One complete request, in a worker: the standard library's request handler run on
        the head the acceptor read; True keeps the connection open."""
        h = self.handler.__new__(self.handler)
        h.request, h.client_address, h.server = req.sock, req.address, self
        h.rfile = io.BytesIO(req.head)
        h.wfile = ResponseWriter(req.sock, self.limits.write_timeout)
        h.close_connection = True
        h.handle_one_request()
        return not h.close_connection

    def start(self) -> None:
        self.httpd.start()

    def stop(self) -> None:
        self.httpd.stop()
        self.threads.close()
