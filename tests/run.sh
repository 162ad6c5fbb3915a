#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine:
#   ./tests/run.sh [pytest args]
#   ./tests/run.sh --fast [pytest args]   the unit tier only (-m unit): no system setup, no live
#                                         processes; the venv is set up, nothing else
# Sets up .venv (the exporter and test deps, Helm's SDK among them; the [test] extra also
# brings the real servers the verdict tests load over loopback: gunicorn, uvicorn + FastAPI,
# waitress, python-dateutil), Debian's prometheus (promtool and the server, never started as a
# service), buildah with a local base image, the Debian root filesystems with CPython 3.14 and
# 3.15 (both cached outside the clone) and Debian's chromium (landing page screenshots), then
# runs pytest. .ci/run calls exactly this, with no flag.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

FAST=0
if [ "${1:-}" = "--fast" ]; then
    FAST=1
    shift
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Install again only when the package's metadata changed since the last install.
stamp=.venv/.gil-exporter-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || [ exporter/_hotloop.c -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test]'
    touch "$stamp"
fi

if [ "$FAST" = 1 ]; then
    exec .venv/bin/python -m pytest -p no:cacheprovider -m unit -q "$@"
fi

bash tests/setup/tools.sh
bash tests/setup/prometheus.sh
bash tests/setup/image.sh
bash tests/setup/rootfs.sh
bash tests/setup/chromium.sh

# --durations: where the suite's time goes, printed after every run (the 25 slowest steps)
exec .venv/bin/python -m pytest -v -p no:cacheprovider --durations=25 "$@"
