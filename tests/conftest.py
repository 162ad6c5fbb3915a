import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Exporter  # noqa: E402


@pytest.fixture
def exporter():
    """Factory: start the real daemon with CLI args; every one started is stopped after the test."""
    started = []

    def start(*args, env=None):
        e = Exporter(list(args), env=env)
        started.append(e)
        return e

    yield start
    for e in started:
        e.close()
