"""Command line: the daemon (`gil-exporter`) and `gil-exporter diagnose PID`."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from exporter import __version__

DEFAULT_PORT = 10057
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"

log = logging.getLogger("gil-exporter")


class _LogfmtFormatter(logging.Formatter):
    """node_exporter-style logfmt lines: ts=... level=... msg=..."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage().replace('"', '\\"')
        line = f'ts={ts} level={record.levelname.lower()} source={record.module} msg="{msg}"'
        if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
            line += "\n" + self.formatException(record.exc_info)
        return line


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]")
    return (host or "0.0.0.0", int(port))


def _daemon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gil-exporter",
        usage="%(prog)s [options]\n       %(prog)s diagnose PID [--seconds N] [--rate-hz HZ] [--json] [--stacks] [--show-cmdline]"
              "\n       %(prog)s diagnose --pod NAMESPACE/POD[/CONTAINER] [--seconds N] [--json] [--stacks]"
              "\n       %(prog)s top [--config FILE] [--refresh SECONDS] [--namespace NS]",
        description="Prometheus exporter for CPython GIL contention, read from outside the target processes.",
        epilog="One process at a terminal: `gil-exporter diagnose PID [--seconds N] [--json]` measures it "
               "for N seconds (default 5) and prints the figures and a verdict with what to change; "
               "exit 0: no contention, 1: contention, 2: no verdict (not Python, exited, not enough "
               "data); --stacks adds the code that held the GIL while other threads waited. Every "
               "process at once, live: `gil-exporter top`. `gil-exporter diagnose --help` and "
               "`gil-exporter top --help` for their options.")
    p.add_argument("--config", "--config.file", dest="config", metavar="FILE",
                   help="YAML config of target processes (default: every CPython process)")
    p.add_argument("--web.listen-address", dest="listen", type=_listen_address, default=DEFAULT_LISTEN,
                   metavar="HOST:PORT", help=f"address to serve on (default {DEFAULT_LISTEN})")
    p.add_argument("--web.telemetry-path", dest="metrics_path", default="/metrics", metavar="PATH",
                   help="path of the metrics endpoint (default /metrics)")
    p.add_argument("--web.config.file", dest="web_config", metavar="FILE",
                   help="TLS and basic auth, in the Prometheus exporter-toolkit format")
    p.add_argument("--web.show-cmdline", dest="show_cmdline", action="store_true",
                   help="show full command lines on the pages (default: the values of secret-looking "
                        "options and variables, and URL passwords, masked)")
    p.add_argument("--web.disable-pages", dest="disable_pages", action="store_true",
                   help="serve no HTML pages (/ and /process/PID answer 404); /metrics and /healthz stay")
    p.add_argument("--web.allowed-hosts", dest="allowed_hosts", action="append", metavar="NAMES",
                   help="host names accepted in the Host header besides IP literals, this host's "
                        "name and localhost (comma-separated, repeatable); '*' turns the check off")
    p.add_argument("--log.level", dest="log_level", default="info",
                   choices=["debug", "info", "warn", "warning", "error"], help="log level (default info)")
    p.add_argument("--config.check", dest="check", action="store_true",
                   help="validate the config file and exit (0 valid, 2 invalid)")
    p.add_argument("--version", action="version", version=f"gil-exporter {__version__}")
    return p


def _diagnose_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gil-exporter diagnose",
                                description="Measure one process for a while and say whether the GIL holds it back. "
                                            "Exit 0: no contention, 1: contention, 2: error.")
    p.add_argument("pid", type=int, nargs="?", help="process to examine (the node's PID on Kubernetes)")
    p.add_argument("--pod", metavar="NAMESPACE/POD[/CONTAINER]",
                   help="instead of a PID: every Python process of that pod (or of one of its "
                        "containers), found through this node's pod list; run it in the "
                        "exporter's pod on the target's node")
    p.add_argument("--seconds", type=float, default=5.0, help="how long to measure (default 5)")
    p.add_argument("--rate-hz", type=float, default=100.0, help="GIL samples per second (default 100)")
    p.add_argument("--json", action="store_true", help="print the figures and verdict as JSON")
    p.add_argument("--show-cmdline", action="store_true",
                   help="print the full command line (default: secret-looking values masked)")
    p.add_argument("--stacks", action="store_true",
                   help="also sample the Python stack of the thread holding the GIL while others wait, "
                        "and print the top functions by share of that time (CPython 3.11+)")
    p.add_argument("--log.level", dest="log_level", default="warning",
                   choices=["debug", "info", "warn", "warning", "error"])
    return p


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gil-exporter top",
                                description="Live view of every Python process the exporter can see, most GIL-contended "
                                            "first; enter shows one process's threads and which one holds the GIL. "
                                            "Keys: up/down, enter, esc, q. Needs `pip install 'gil-exporter[top]'`.")
    p.add_argument("--config", "--config.file", dest="config", metavar="FILE",
                   help="YAML config of target processes, as for the daemon (default: every CPython process)")
    p.add_argument("--refresh", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--namespace", metavar="NS",
                   help="only the processes of pods in Kubernetes namespace NS (in the exporter's "
                        "pod; key n: the next namespace)")
    p.add_argument("--log.level", dest="log_level", default="critical",
                   choices=["debug", "info", "warn", "warning", "error", "critical"])
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "top":
        args = _top_parser().parse_args(argv[1:])
        _setup_logging(args.log_level)
        from exporter.config import ConfigError
        from exporter.top import run_top
        try:
            config = _load(args.config)
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return 2
        from exporter.kube import not_in_cluster
        why = not_in_cluster()
        if args.namespace is not None and why:
            print(f"gil-exporter top: --namespace needs the exporter's pod: {why}", file=sys.stderr)
            return 2
        return run_top(config, args.refresh, args.namespace, None if why else _pod_resolver())
    if argv and argv[0] == "diagnose":
        parser = _diagnose_parser()
        args = parser.parse_args(argv[1:])
        if (args.pid is None) == (args.pod is None):
            parser.error("give either a PID or --pod NAMESPACE/POD[/CONTAINER]")
        _setup_logging(args.log_level)
        from exporter.diagnose import run_diagnose, run_diagnose_pod
        if args.pod is not None:
            return run_diagnose_pod(args.pod, args.seconds, args.rate_hz, args.json, args.stacks,
                                    show_cmdline=args.show_cmdline)
        return run_diagnose(args.pid, args.seconds, args.rate_hz, args.json, args.stacks,
                            show_cmdline=args.show_cmdline)
    args = _daemon_parser().parse_args(argv)
    _setup_logging(args.log_level)
    return run_daemon(args)


def _load(path: str | None):
    from exporter.config import default_config, load_config
    return default_config() if path is None else load_config(path)


def run_daemon(args) -> int:
    from exporter.config import ConfigError
    from exporter.monitor import Monitor
    from exporter.webconfig import WebConfigError, WebConfigFile

    try:
        config = _load(args.config)
        web = WebConfigFile(args.web_config) if args.web_config else None
    except (ConfigError, WebConfigError) as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config or 'default config'}: OK")
        return 0

    monitor = Monitor(config, pod_resolver=_pod_resolver())
    try:
        server = _server(args, monitor, web)
    except OSError as e:
        print(f"gil-exporter: cannot listen on {args.listen[0]}:{args.listen[1]}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    signals = _Signals()
    signals.install()

    monitor.start()
    server.start()
    _announce(args, server, monitor)
    _run_until_stopped(args, monitor, signals)

    log.info("shutting down")
    server.stop()
    monitor.stop()
    return 0


def _server(args, monitor, web):
    """The HTTP server over a registry holding the one collector; raises OSError if it cannot listen."""
    from prometheus_client import CollectorRegistry

    from exporter.collector import GilCollector
    from exporter.http import ExporterServer

    registry = CollectorRegistry(auto_describe=False)
    collector = GilCollector(monitor)
    registry.register(collector)
    return ExporterServer(args.listen, registry, monitor, args.metrics_path, web, collector,
                          _web_options(args))


class _Signals:
    """What SIGTERM/SIGINT (stop) and SIGHUP (reload) asked for. The handlers only set flags:
    taking a lock in a handler (Event.set) can deadlock the main thread if the signal lands
    while that thread holds the same lock."""

    def __init__(self) -> None:
        self.stop = False
        self.reload = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum, frame) -> None:
        self.stop = True

    def _on_hup(self, signum, frame) -> None:
        self.reload = True


def _announce(args, server, monitor) -> None:
    """Where the pages and metrics are, on the log and on stderr, and which loop samples."""
    from exporter.collector import sampler_loop

    host, port = server.address
    shown = f"[{host}]" if ":" in host else host
    url = f"{server.scheme}://{shown}:{port}"
    log.info("gil-exporter %s listening; landing page %s/ metrics %s%s; config: %s",
             __version__, url, url, args.metrics_path, args.config or "every CPython process")
    # One write: print() writes the line and its newline apart, and a log line from the monitor
    # thread could land between them.
    sys.stderr.write(f"gil-exporter {__version__}: landing page {url}/  metrics {url}{args.metrics_path}\n")
    sys.stderr.flush()
    # Which loop samples the GILs: "python" means the install had no C compiler (1.9x the CPU).
    log.info("sampler loop: %s%s", sampler_loop(monitor),
             "" if monitor.sampler is not None else " (sampling.enabled: false: not sampling)")


def _run_until_stopped(args, monitor, signals: _Signals) -> None:
    """Wait for a stop signal, reloading the config on each SIGHUP (a bad one keeps the running one)."""
    from exporter.config import ConfigError

    while not signals.stop:
        time.sleep(0.1)
        if signals.reload:
            signals.reload = False
            try:
                new = _load(args.config)
            except ConfigError as e:
                log.error("reload failed, keeping the running config: %s", e)
                continue
            monitor.reload(new)
            log.info("config reloaded from %s", args.config or "defaults")


def _web_options(args):
    from exporter.http import WebOptions
    hosts = [h.strip() for arg in (args.allowed_hosts or ()) for h in arg.split(",") if h.strip()]
    return WebOptions(show_cmdline=args.show_cmdline, pages=not args.disable_pages,
                      allowed_hosts=None if "*" in hosts else tuple(hosts))


def _pod_resolver():
    """Labels pods on Kubernetes; None elsewhere."""
    try:
        from exporter import kube
    except ImportError:
        return None
    resolver = kube.PodResolver.from_environment()
    if resolver is None:
        return None

    def labels(pid: int):
        from exporter import procfs
        ref = kube.parse_cgroup(procfs.cgroup(pid))
        if ref is None:
            return ()
        meta = resolver.resolve(ref)
        if meta is None:
            return ()
        return meta.labels()

    return labels


if __name__ == "__main__":
    raise SystemExit(main())
