"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit format.

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # or NoClientCert (default), RequireAnyClientCert,
      client_ca_file: ca.crt                         #    VerifyClientCertIfGiven
      min_version: TLS12                             # TLS10..TLS13
    basic_auth_users:
      alice: $2y$10$...                              # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')

    http_server_config:
      headers:                                       # added to every response
        Strict-Transport-Security: max-age=31536000

Relative paths are relative to the web config file, as in exporter-toolkit. Keys of
exporter-toolkit that would not be applied here (cipher_suites, curve_preferences,
http2: true) are refused with FILE:LINE rather than silently ignored. The file, and the
files it names, are re-read when one of them changes (WebConfigFile), so that certificates
and passwords rotate without a restart.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import yaml

from exporter import targetfile
from exporter.config import MAX_FILE_BYTES

log = logging.getLogger(__name__)


class WebConfigError(Exception):
    """A problem with the web config; str() is one line, FILE:LINE: message."""


_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3,
}
_KNOWN_TOP = {"tls_server_config", "basic_auth_users", "http_server_config"}
_KNOWN_TLS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version",
              "prefer_server_cipher_suites"}
_KNOWN_HTTP = {"headers", "http2"}
#: exporter-toolkit keys that would not be applied by Python's ssl module as the toolkit
#: means them: refused, so that nobody believes them in force.
_NOT_APPLIED = {
    "cipher_suites": "cipher_suites is not applied here (Go's suite names; OpenSSL's defaults "
                     "for TLS 1.2 and every TLS 1.3 suite are used): remove it",
    "curve_preferences": "curve_preferences is not applied here (OpenSSL's default groups are "
                         "used): remove it",
}
#: response headers the web config may not set: they frame or authenticate the response
_RESERVED_HEADERS = {"content-length", "content-type", "transfer-encoding", "connection",
                     "www-authenticate", "authorization", "date", "server", "set-cookie"}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict = field(default_factory=dict)  # user -> bcrypt hash (bytes)
    headers: tuple = ()  # (name, value) added to every response
    files: tuple = ()  # the files it was read from: the config and the files it names
    auth: BasicAuth | None = None


class _Lines:
    """Where each key of the document is, for FILE:LINE messages."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.lines: dict[tuple, int] = {}
        try:
            self._walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
        except yaml.YAMLError:
            pass

    def _walk(self, node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + (str(k.value),)
                self.lines[key] = k.start_mark.line + 1
                self._walk(v, key)

    def at(self, *keys) -> str:
        while keys and keys not in self.lines:
            keys = keys[:-1]
        return f"{self.path}:{self.lines[keys]}" if keys else f"{self.path}:1"


def load_web_config(path: str) -> WebConfig:
    try:
        raw = targetfile.read_head(path, MAX_FILE_BYTES + 1, follow_symlinks=True)  # never blocks
        if len(raw) > MAX_FILE_BYTES:
            raise WebConfigError(f"{path}:0: cannot read: larger than {MAX_FILE_BYTES} bytes")
        text = raw.decode("utf-8")
        doc = yaml.safe_load(text)
    except OSError as e:
        raise WebConfigError(f"{path}:0: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise WebConfigError(f"{path}:0: not valid YAML: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else f"{path}:0"
        raise WebConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    doc = doc or {}
    lines = _Lines(path, text)
    if not isinstance(doc, dict):
        raise WebConfigError(f"{path}:1: expected a mapping at the top level")
    for key in doc:
        if key not in _KNOWN_TOP:
            raise WebConfigError(f"{lines.at(str(key))}: unknown key {key!r}")
    base = os.path.dirname(os.path.abspath(path))
    files = [os.path.abspath(path)]
    ctx = _tls(lines, base, doc.get("tls_server_config"), files)
    users = _users(lines, doc.get("basic_auth_users"))
    headers = _http(lines, doc.get("http_server_config"))
    return WebConfig(ctx, users, headers, tuple(files), BasicAuth(users) if users else None)


def _tls(lines: _Lines, base: str, tls, files: list) -> ssl.SSLContext | None:
    if tls is None:
        return None
    where = lambda *k: lines.at("tls_server_config", *k)  # noqa: E731
    _tls_keys(tls, where)

    def rel(p: str) -> str:
        return _tls_file(p, base, files, where)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(rel(tls["cert_file"]), rel(tls["key_file"]))
    except (OSError, ssl.SSLError) as e:
        raise WebConfigError(f"{where('cert_file')}: cannot load cert_file/key_file: {e}") from None
    _tls_versions(ctx, tls, where)
    prefer = tls.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise WebConfigError(f"{where('prefer_server_cipher_suites')}: prefer_server_cipher_suites "
                             f"must be true or false")
    if prefer:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    _client_auth(ctx, tls, where, rel)
    return ctx


def _tls_keys(tls, where) -> None:
    """tls_server_config is a mapping of known keys, with a certificate and its key."""
    if not isinstance(tls, dict):
        raise WebConfigError(f"{where()}: tls_server_config must be a mapping")
    for key in tls:
        if key in _NOT_APPLIED:
            raise WebConfigError(f"{where(key)}: {_NOT_APPLIED[key]}")
        if key not in _KNOWN_TLS:
            raise WebConfigError(f"{where(str(key))}: unknown key {key!r} in tls_server_config")
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise WebConfigError(f"{where()}: tls_server_config needs cert_file and key_file")


def _tls_file(p: str, base: str, files: list, where) -> str:
    """A file the TLS config names, relative to the web config's directory; noted in `files`
    (re-read when they change)."""
    full = p if os.path.isabs(p) else os.path.join(base, p)
    files.append(full)
    # ssl opens it with a plain open(): a FIFO there would block the start or the re-read
    try:
        os.close(targetfile.open_regular(full, follow_symlinks=True))
    except targetfile.NotRegularFile as e:
        raise WebConfigError(f"{where()}: {full}: {e.strerror}") from None
    except OSError:
        pass  # missing or unreadable: ssl's own error names it
    return full


def _tls_versions(ctx: ssl.SSLContext, tls, where) -> None:
    for key in ("min_version", "max_version"):
        version = tls.get(key)
        if version is None:
            continue
        if version not in _TLS_VERSIONS:
            raise WebConfigError(f"{where(key)}: {key} must be one of {', '.join(_TLS_VERSIONS)}")
        try:
            setattr(ctx, "minimum_version" if key == "min_version" else "maximum_version",
                    _TLS_VERSIONS[version])
        except ValueError as e:
            raise WebConfigError(f"{where(key)}: {key} {version}: {e}") from None
    if ctx.maximum_version != ssl.TLSVersion.MAXIMUM_SUPPORTED and ctx.maximum_version < ctx.minimum_version:
        raise WebConfigError(f"{where('max_version')}: max_version is below min_version")


def _client_auth(ctx: ssl.SSLContext, tls, where, rel) -> None:
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{where('client_auth_type')}: client_auth_type must be one of "
                             f"{', '.join(_CLIENT_AUTH)}")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    ca = tls.get("client_ca_file")
    if ca:
        try:
            ctx.load_verify_locations(rel(ca))
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(f"{where('client_ca_file')}: cannot load client_ca_file: {e}") from None
    elif auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        raise WebConfigError(f"{where('client_auth_type')}: client_auth_type {auth} needs client_ca_file")


def _users(lines: _Lines, users) -> dict:
    if users is None:
        return {}
    if not isinstance(users, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in users.items()):
        raise WebConfigError(f"{lines.at('basic_auth_users')}: basic_auth_users must map user names "
                             f"to bcrypt hashes")
    for user, hashed in users.items():
        if not re.fullmatch(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}", hashed):
            raise WebConfigError(f"{lines.at('basic_auth_users', user)}: basic_auth_users.{user} "
                                 f"is not a bcrypt hash")
    if users:
        import bcrypt  # noqa: F401  (fail at start, not at the first request, if it is missing)
    return {u: h.encode() for u, h in users.items()}


def _http(lines: _Lines, http) -> tuple:
    if http is None:
        return ()
    where = lambda *k: lines.at("http_server_config", *k)  # noqa: E731
    if not isinstance(http, dict):
        raise WebConfigError(f"{where()}: http_server_config must be a mapping")
    for key in http:
        if key not in _KNOWN_HTTP:
            raise WebConfigError(f"{where(str(key))}: unknown key {key!r} in http_server_config")
    if http.get("http2", False) not in (False, None):
        raise WebConfigError(f"{where('http2')}: http2: true is not applied here (HTTP/1.1 only): "
                             f"remove it or set it to false")
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise WebConfigError(f"{where('headers')}: headers must map header names to values")
    out = []
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name) or not isinstance(value, str) \
                or any(c in value for c in "\r\n\0"):
            raise WebConfigError(f"{where('headers', str(name))}: headers.{name}: a header name and "
                                 f"a one-line value")
        if name.lower() in _RESERVED_HEADERS:
            raise WebConfigError(f"{where('headers', name)}: headers.{name}: set by the server itself")
        out.append((name, value))
    return tuple(out)


def _signature(files) -> tuple:
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class WebConfigFile:
    """The web config in force: re-read, at most once per CHECK_SECONDS and when a request
    asks for it, when the file or one it names (certificate, key, CA) changed its inode, size
    or mtime. A re-read that fails is logged and the running config kept."""

    CHECK_SECONDS = 1.0

    def __init__(self, path: str | None, config: WebConfig | None = None):
        self.path = path
        self._config = config if config is not None else load_web_config(path)
        self._signature = _signature(self._config.files)
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def fixed(cls, config: WebConfig) -> WebConfigFile:
        return cls(None, config)

    def current(self) -> WebConfig:
        if self.path is None or time.monotonic() - self._checked < self.CHECK_SECONDS:
            return self._config
        if not self._lock.acquire(blocking=False):
            return self._config  # another thread is checking
        try:
            self._checked = time.monotonic()
            signature = _signature(self._config.files)
            if signature != self._signature:
                self._signature = signature
                try:
                    new = load_web_config(self.path)
                except WebConfigError as e:
                    log.error("web config re-read failed, keeping the running one: %s", e)
                else:
                    self._config = new
                    self._signature = _signature(new.files)
                    log.info("web config re-read from %s", self.path)
        finally:
            self._lock.release()
        return self._config


_DUMMY_PASSWORD = b"not the password of any user"
_dummies: dict[bytes, bytes] = {}


def _dummy_hash(users: dict) -> bytes:
    """A bcrypt hash of the cost most users' hashes have, checked for a user name that is not
    configured, so that an unknown name takes as long as a wrong password (exporter-toolkit
    does the same): response times do not tell which names exist."""
    import bcrypt
    costs = Counter(h[4:6] for h in users.values())
    cost = costs.most_common(1)[0][0] if costs else b"10"
    if cost not in _dummies:
        _dummies[cost] = bcrypt.hashpw(_DUMMY_PASSWORD, bcrypt.gensalt(rounds=int(cost)))
    return _dummies[cost]


class BasicAuth:
    """Checks credentials against bcrypt hashes. bcrypt is slow by design, so: every result,
    success or failure, is cached (a bounded LRU keyed by a SHA-256 of user, password and
    hash, never the password itself), one bcrypt runs at a time in the whole process (a burst
    of bad passwords costs at most one core), and an unknown user is checked against a dummy
    hash of the same cost."""

    CACHE_ENTRIES = 1024
    _bcrypt = threading.Lock()  # one bcrypt at a time, across web config re-reads too

    def __init__(self, users: dict):
        self.users = users
        self._dummy = _dummy_hash(users)
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, user: str, password: str) -> bool:
        import bcrypt
        hashed = self.users.get(user)
        known = hashed is not None
        if not known:
            hashed = self._dummy
        key = hashlib.sha256(user.encode() + b"\0" + password.encode() + b"\0" + hashed).digest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        with BasicAuth._bcrypt:
            try:
                ok = bcrypt.checkpw(password.encode(), hashed)
            except ValueError:  # a password bcrypt refuses (over 72 bytes, NUL)
                ok = False
        ok = ok and known
        with self._lock:
            self._cache[key] = ok
            while len(self._cache) > self.CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return ok
