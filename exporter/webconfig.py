"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit format.

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # or NoClientCert (default), RequireAnyClientCert,
      client_ca_file: ca.crt                         #    VerifyClientCertIfGiven
      min_version: TLS12                             # TLS10..TLS13
    basic_auth_users:
      alice: $2y$10$...                              # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')

Relative paths are relative to the web config file, as in exporter-toolkit.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import threading
from dataclasses import dataclass, field

import yaml

from exporter import targetfile
from exporter.config import MAX_FILE_BYTES


class WebConfigError(Exception):
    """A problem with the web config; str() is one line, FILE: message."""


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
              "cipher_suites", "prefer_server_cipher_suites", "curve_preferences"}


@dataclass(frozen=True)
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict = field(default_factory=dict)  # user -> bcrypt hash (bytes)


def load_web_config(path: str) -> WebConfig:
    try:
        raw = targetfile.read_head(path, MAX_FILE_BYTES + 1, follow_symlinks=True)  # never blocks
        if len(raw) > MAX_FILE_BYTES:
            raise WebConfigError(f"{path}: cannot read: larger than {MAX_FILE_BYTES} bytes")
        doc = yaml.safe_load(raw.decode("utf-8"))
    except OSError as e:
        raise WebConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise WebConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    doc = doc or {}
    if not isinstance(doc, dict):
        raise WebConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(doc) - _KNOWN_TOP
    if unknown:
        raise WebConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    base = os.path.dirname(os.path.abspath(path))
    return WebConfig(_tls(path, base, doc.get("tls_server_config")), _users(path, doc.get("basic_auth_users")))


def _tls(path: str, base: str, tls) -> ssl.SSLContext | None:
    if tls is None:
        return None
    if not isinstance(tls, dict):
        raise WebConfigError(f"{path}: tls_server_config must be a mapping")
    unknown = set(tls) - _KNOWN_TLS
    if unknown:
        raise WebConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} in tls_server_config")
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise WebConfigError(f"{path}: tls_server_config needs cert_file and key_file")

    def rel(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(base, p)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(rel(tls["cert_file"]), rel(tls["key_file"]))
    except (OSError, ssl.SSLError) as e:
        raise WebConfigError(f"{path}: cannot load cert_file/key_file: {e}") from None
    version = tls.get("min_version")
    if version is not None:
        if version not in _TLS_VERSIONS:
            raise WebConfigError(f"{path}: min_version must be one of {', '.join(_TLS_VERSIONS)}")
        ctx.minimum_version = _TLS_VERSIONS[version]
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{path}: client_auth_type must be one of {', '.join(_CLIENT_AUTH)}")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    ca = tls.get("client_ca_file")
    if ca:
        try:
            ctx.load_verify_locations(rel(ca))
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(f"{path}: cannot load client_ca_file: {e}") from None
    elif auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        raise WebConfigError(f"{path}: client_auth_type {auth} needs client_ca_file")
    return ctx


def _users(path: str, users) -> dict:
    if users is None:
        return {}
    if not isinstance(users, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in users.items()):
        raise WebConfigError(f"{path}: basic_auth_users must map user names to bcrypt hashes")
    for user, hashed in users.items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"{path}: basic_auth_users.{user} is not a bcrypt hash")
    if users:
        import bcrypt  # noqa: F401  (fail at start, not at the first request, if it is missing)
    return {u: h.encode() for u, h in users.items()}


class BasicAuth:
    """Checks credentials against bcrypt hashes, caching successes (bcrypt is slow by design)."""

    def __init__(self, users: dict):
        self.users = users
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, user: str, password: str) -> bool:
        import bcrypt
        hashed = self.users.get(user)
        if hashed is None:
            return False
        key = hashlib.sha256(user.encode() + b"\0" + password.encode() + b"\0" + hashed).digest()
        with self._lock:
            if any(hmac.compare_digest(key, k) for k in self._ok):
                return True
        try:
            ok = bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            return False
        if ok:
            with self._lock:
                self._ok.add(key)
        return ok
