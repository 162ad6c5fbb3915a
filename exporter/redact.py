"""Command lines with their secrets masked, for the pages and `diagnose`.

A process's argv is written by whoever started it and often carries credentials
(`--db-password=…`, `TOKEN=…`, `postgres://app:pw@db/…`). What is shown keeps the command's
shape, so that rows can still be told apart, and masks:

- the value of an option whose name looks secret: `--token=x` and `--token x` become
  `--token=***` and `--token ***`;
- the value of an environment-style pair whose name looks secret: `DB_PASSWORD=x`;
- the password of a URL's `user:password@`.

A name looks secret when it contains one of SECRET_WORDS (case-insensitive). Short options
(`-p x`) are not masked: a letter says nothing about what it is.
"""
from __future__ import annotations

import re

MASK = "***"
SECRET_WORDS = ("pass", "pwd", "token", "secret", "key", "auth", "credential", "cred",
                "cookie", "session", "private", "signature")
_SECRET = re.compile("|".join(SECRET_WORDS), re.I)
# --name=value, -name=value or NAME=value (an environment-style pair)
_PAIR = re.compile(r"^(-{0,2})([A-Za-z_][A-Za-z0-9_.-]*)=(.*)$", re.S)
# --name (a long option whose value is the next argument)
_LONG = re.compile(r"^--?([A-Za-z][A-Za-z0-9_.-]+)$")
# scheme://user:password@ (the user may be empty: redis://:pw@host)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):([^/\s@]*)@")


def secret_name(name: str) -> bool:
    return bool(_SECRET.search(name))


def _url(arg: str) -> str:
    return _USERINFO.sub(lambda m: f"{m.group(1)}:{MASK}@", arg)


def redact_argv(argv) -> list[str]:
    """argv with secret values masked, one element per element given."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            mask_next = False
            if arg and not arg.startswith("-"):
                out.append(MASK)
                continue
        m = _PAIR.match(arg)
        if m and secret_name(m.group(2)):
            out.append(f"{m.group(1)}{m.group(2)}={MASK}")
            continue
        long = _LONG.match(arg)
        if long and len(long.group(1)) > 1 and secret_name(long.group(1)):
            mask_next = True
        out.append(_url(arg))
    return out


def redact_cmdline(cmdline: str) -> str:
    """A command line as the exporter keeps it (argv joined by single spaces), masked. Split
    on the same spaces, so the shape is kept exactly; a value that itself held spaces is
    masked up to its first one only when given as `--name value`, whole when `--name=value`
    (the rest of the line is what followed)."""
    if not cmdline:
        return cmdline
    return " ".join(redact_argv(cmdline.split(" ")))


def shown_cmdline(cmdline: str, show_full: bool = False) -> str:
    return cmdline if show_full else redact_cmdline(cmdline)
