"""--web.config.file: real HTTPS, mTLS and basic auth; scrapers under load, huge headers, slow clients."""
from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import yaml
from harness import exporter_command, write_config
from workloads import start_workload

CHART_VALUES = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "gil-exporter" / "values.yaml"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=10)).decode().replace("$2b$", "$2y$", 1)


def _ctx(pki, client_cert=False):
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client_cert:
        ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return ctx


def _get(url, ctx=None, user=None, password=None, timeout=10):
    req = urllib.request.Request(url)
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def _targets(tmp_path):
    return write_config(tmp_path, """
targets:
  - name: web
    match:
      cmdline: 'gil-workload .* web-sec$'
scan_interval_seconds: 1
window_seconds: 3
""")


def test_tls_and_basic_auth(exporter, tmp_path, pki):
    web = write_config(tmp_path, f"""
tls_server_config:
  cert_file: {pki}/server.crt
  key_file: {pki}/server.key
basic_auth_users:
  prometheus: '{HASH}'
""", "web.yaml")
    with start_workload("sleep", threads=1, argv_tag="web-sec") as w:
        exp = exporter("--config", str(_targets(tmp_path)), "--web.config.file", str(web))
        assert exp.base.startswith("https://")
        ctx = _ctx(pki)
        assert _get(exp.base + "/metrics", ctx)[0] == 401
        assert _get(exp.base + "/metrics", ctx, "prometheus", "wrong")[0] == 401
        assert _get(exp.base + "/metrics", ctx, "nobody", "s3cret")[0] == 401
        for _ in range(20):
            status, body = _get(exp.base + "/metrics", ctx, "prometheus", "s3cret")
            assert status == 200
            if f'pid="{w.pid}"' in body:
                break
            time.sleep(0.5)
        assert f'pygil_process_threads{{pid="{w.pid}",target="web"}}' in body
        # Plain HTTP to the TLS port: refused, and the server keeps serving.
        plain = exp.base.replace("https://", "http://")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(plain + "/metrics", timeout=5).read()
        assert _get(exp.base + "/healthz", ctx, "prometheus", "s3cret") == (200, "ok\n")


def _kubelet_probe(url, method="GET"):
    """What the kubelet's httpGet probe sends: no credentials and, over HTTPS, no certificate
    check (it skips verification by design)."""
    ctx = None
    if url.startswith("https://"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_probes_pass_with_basic_auth_on(exporter, tmp_path, pki, tls):
    """The chart's liveness and readiness probes (their path read from the chart's values.yaml)
    answer 200 without credentials with basic auth on, while /, /metrics and /process/PID still
    answer 401 without them (with a wrong password too) and 200 with them."""
    values = yaml.safe_load(CHART_VALUES.read_text())
    paths = {values[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    tls_block = f"""
tls_server_config:
  cert_file: {pki}/server.crt
  key_file: {pki}/server.key
""" if tls else ""
    web = write_config(tmp_path, tls_block + f"""
basic_auth_users:
  prometheus: '{HASH}'
""", "web.yaml")
    with start_workload("sleep", threads=1, argv_tag="web-sec") as w:
        exp = exporter("--config", str(_targets(tmp_path)), "--web.config.file", str(web))
        assert exp.base.startswith("https://" if tls else "http://")
        ctx = _ctx(pki) if tls else None
        for path in paths:
            assert _kubelet_probe(exp.base + path) == (200, "ok\n"), path
            assert _kubelet_probe(exp.base + path, "HEAD")[0] == 200, path
            assert _get(exp.base + path, ctx, "prometheus", "wrong") == (200, "ok\n"), path
        # The scrape must find the workload before its page exists (generous: a busy host).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, body = _get(exp.base + "/metrics", ctx, "prometheus", "s3cret")
            if status == 200 and f'pid="{w.pid}"' in body:
                break
            time.sleep(0.5)
        assert f'pid="{w.pid}"' in body
        for path in ("/", "/metrics", f"/process/{w.pid}", "/healthz/../metrics", "/nonexistent"):
            assert _kubelet_probe(exp.base + path)[0] == 401, path
            assert _kubelet_probe(exp.base + path, "HEAD")[0] == 401, path
            assert _get(exp.base + path, ctx, "prometheus", "wrong")[0] == 401, path
        for path in ("/", "/metrics", f"/process/{w.pid}"):
            assert _get(exp.base + path, ctx, "prometheus", "s3cret")[0] == 200, path


@pytest.mark.parametrize("client_auth", ["NoClientCert", "RequireAndVerifyClientCert"])
def test_rendered_chart_secures_a_real_exporter(exporter, tmp_path, pki, client_auth):
    """The chart's own output run for real: the web config Secret it renders from an inline
    webConfig.config becomes the exporter's --web.config.file, and the probes it renders pass
    as the kubelet makes them (HTTPS GET /healthz without credentials; a TCP connect when client
    certificates are required), while the ServiceMonitor's scheme with credentials scrapes and
    without them gets 401 (or no handshake)."""
    import base64

    from test_helm import render, with_repository
    web = {"tls_server_config": {"cert_file": f"{pki}/server.crt", "key_file": f"{pki}/server.key",
                                 "client_auth_type": client_auth, "client_ca_file": f"{pki}/ca.crt"},
           "basic_auth_users": {"prometheus": HASH}}
    secret_ref = {"name": "scrape", "key": "k"}
    res = render(with_repository({"webConfig": {"config": web}, "serviceMonitor": {
        "enabled": True, "basicAuth": {"username": secret_ref, "password": secret_ref}}}))
    ds = res.one("DaemonSet")["spec"]["template"]["spec"]
    (c,) = ds["containers"]
    (arg,) = [a for a in c["args"] if a.startswith("--web.config.file=")]
    secret = res.one("Secret")
    web_file = tmp_path / Path(arg.split("=", 1)[1]).name
    web_file.write_bytes(base64.b64decode(secret["data"][web_file.name]))
    exp = exporter("--config", str(_targets(tmp_path)), "--web.config.file", str(web_file))
    host, port = exp.base.split("//", 1)[1].rsplit(":", 1)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for name in ("livenessProbe", "readinessProbe"):
        probe = c[name]
        if client_auth == "NoClientCert":
            get = probe["httpGet"]
            assert get["port"] in ports and get["scheme"] == "HTTPS"
            assert _kubelet_probe(f"https://{host}:{port}{get['path']}") == (200, "ok\n"), name
        else:
            assert "httpGet" not in probe and probe["tcpSocket"]["port"] in ports
            socket.create_connection((host, int(port)), timeout=10).close()
    ep = res.one("ServiceMonitor")["spec"]["endpoints"][0]
    assert ep["scheme"] == "https"
    ctx = _ctx(pki, client_cert=client_auth != "NoClientCert")
    url = f"{ep['scheme']}://{host}:{port}{ep['path']}"
    assert _get(url, ctx, "prometheus", "s3cret")[0] == 200
    assert _get(url, ctx)[0] == 401
    if client_auth != "NoClientCert":
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError, OSError)):
            _get(url, _ctx(pki), "prometheus", "s3cret")


def test_mutual_tls(exporter, tmp_path, pki):
    web = write_config(tmp_path, f"""
tls_server_config:
  cert_file: {pki}/server.crt
  key_file: {pki}/server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki}/ca.crt
""", "web.yaml")
    exp = exporter("--config", str(_targets(tmp_path)), "--web.config.file", str(web))
    assert _get(exp.base + "/healthz", _ctx(pki, client_cert=True)) == (200, "ok\n")
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError, OSError)):
        _get(exp.base + "/healthz", _ctx(pki, client_cert=False))
    # The kubelet has no client certificate, so an httpGet probe fails here; the chart renders
    # tcpSocket probes instead (webConfig mode mtls), and a TCP connect is what they do.
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError, OSError)):
        _kubelet_probe(exp.base + "/healthz")
    host, port = exp.base.split("//", 1)[1].rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=10).close()


@pytest.mark.parametrize("text,fragment", [
    ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n", "cannot load"),
    ("basic_auth_users:\n  bob: plaintext\n", "not a bcrypt hash"),
    ("tls_config: {}\n", "unknown key"),
    ("basic_auth_users: [\n", "not valid YAML"),
])
def test_bad_web_config_exits_2(tmp_path, text, fragment):
    web = write_config(tmp_path, text, "web.yaml")
    r = subprocess.run(exporter_command() + ["--web.config.file", str(web), "--web.listen-address", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.startswith(str(web)) and fragment in r.stderr and "Traceback" not in r.stderr


def test_tls_files_that_are_fifos_are_refused_not_opened(tmp_path):
    """cert_file or key_file naming a FIFO: ssl's plain open() would block the start for good;
    the web config is refused with one line and exit 2, quickly."""
    fifo = tmp_path / "server.crt"
    os.mkfifo(fifo)
    web = write_config(tmp_path, f"tls_server_config:\n  cert_file: {fifo}\n  key_file: {fifo}\n", "web.yaml")
    t = time.monotonic()
    r = subprocess.run(exporter_command() + ["--web.config.file", str(web), "--web.listen-address", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"{web}:") and "not a regular file (a FIFO)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - t < 20


def test_fifty_concurrent_scrapers_slow_clients_and_huge_headers(exporter, tmp_path):
    """Bounded load on loopback: 50 scrapers for 30 s while slow and oversized clients misbehave."""
    with start_workload("cpu", threads=3, argv_tag="web-sec") as w:
        exp = exporter("--config", str(_targets(tmp_path)))
        exp.wait_for(lambda: exp.value("pygil_process_threads", pid=w.pid) == 4.0)
        host, port = exp.base.rsplit("/", 1)[1].rsplit(":", 1)
        port = int(port)

        # 20 slow clients: connect, send half a request line, then stall.
        slow = []
        for _ in range(20):
            s = socket.create_connection((host, port))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        # A request with a 1 MiB header: rejected without harm.
        big = socket.create_connection((host, port))
        big.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        big_reply = big.recv(64)
        big.close()
        assert big_reply.startswith(b"HTTP/1.") and b" 200 " not in big_reply

        results = {"ok": 0, "bad": 0, "latencies": []}
        lock = threading.Lock()
        deadline = time.monotonic() + 30

        def scraper():
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    status, body = _get(exp.base + "/metrics", timeout=10)
                    good = status == 200 and f'pygil_process_threads{{pid="{w.pid}",target="web"}} 4.0' in body \
                        and body.rstrip().endswith(tuple("0123456789"))
                except OSError:
                    good = False
                with lock:
                    results["ok" if good else "bad"] += 1
                    results["latencies"].append(time.perf_counter() - t0)

        threads = [threading.Thread(target=scraper) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for s in slow:
            s.close()
        lat = sorted(results["latencies"])
        p99 = lat[int(0.99 * (len(lat) - 1))]
        print(f"load: {results['ok']} good scrapes, {results['bad']} bad, p50 {lat[len(lat) // 2] * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms with 50 scrapers + 20 stalled clients")
        assert results["bad"] == 0
        assert results["ok"] > 50
        assert exp.proc.poll() is None
