"""redact.py: secrets in a command line are masked, its shape is kept (a parser of argv: unit tier)."""
from __future__ import annotations

import pytest

from exporter.redact import MASK, redact_argv, redact_cmdline, shown_cmdline


@pytest.mark.parametrize("argv,expected", [
    (["app", "--db-password=hunter2"], ["app", "--db-password=***"]),
    (["app", "--token", "abc", "--port", "80"], ["app", "--token", "***", "--port", "80"]),
    (["app", "-token", "abc"], ["app", "-token", "***"]),
    (["env", "PASSWORD=x", "AWS_SECRET_ACCESS_KEY=y", "HOME=/root", "python", "a.py"],
     ["env", "PASSWORD=***", "AWS_SECRET_ACCESS_KEY=***", "HOME=/root", "python", "a.py"]),
    (["app", "--apikey=k", "--api-key", "k", "--Auth-Header=Bearer", "--credentials=c"],
     ["app", "--apikey=***", "--api-key", "***", "--Auth-Header=***", "--credentials=***"]),
    (["app", "--passwd", "--verbose"], ["app", "--passwd", "--verbose"]),  # no value to mask
    (["app", "--secret"], ["app", "--secret"]),
    (["app", "-p", "hunter2"], ["app", "-p", "hunter2"]),  # a letter names nothing
    (["app", "--dsn=postgres://app:pw@db:5432/x"], ["app", "--dsn=postgres://app:***@db:5432/x"]),
    (["redis-cli", "-u", "redis://:pw@cache:6379/0"], ["redis-cli", "-u", "redis://:***@cache:6379/0"]),
    (["curl", "https://user@host/x"], ["curl", "https://user@host/x"]),  # no password there
    (["gunicorn", "-w", "4", "app:app", "--bind=0.0.0.0:80"],
     ["gunicorn", "-w", "4", "app:app", "--bind=0.0.0.0:80"]),
    (["python3", "-c", "print(1)"], ["python3", "-c", "print(1)"]),
    ([], []),
])
def test_redact_argv(argv, expected):
    assert redact_argv(argv) == expected


def test_secret_values_never_survive():
    argv = ["svc", "--db-password=hunter2", "--token", "t0k3n", "SECRET=s3", "--url=http://a:pw9@h/"]
    shown = " ".join(redact_argv(argv))
    for secret in ("hunter2", "t0k3n", "s3", "pw9"):
        assert secret not in shown
    assert shown.count(MASK) == 4


def test_cmdline_keeps_its_shape():
    line = "python3 -m app --token=abc --name shop  --password x"
    out = redact_cmdline(line)
    assert out == "python3 -m app --token=*** --name shop  --password ***"
    assert len(out.split(" ")) == len(line.split(" "))
    assert redact_cmdline("") == ""


def test_shown_cmdline_flag():
    assert shown_cmdline("a --token=x", show_full=True) == "a --token=x"
    assert shown_cmdline("a --token=x") == "a --token=***"
