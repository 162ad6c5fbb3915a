#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine:
#   ./tests/run.sh [pytest args]
# Sets up .venv (the exporter and test deps, Helm's SDK among them; the [test] extra also
# brings the real servers the verdict tests load over loopback: gunicorn, uvicorn + FastAPI,
# waitress, python-dateutil), Debian's prometheus (promtool and the server, never started as a
# service), buildah with a local base image, the Debian root filesystems with CPython 3.14 and
# 3.15 (both cached outside the clone) and Debian's chromium (landing page screenshots), then
# runs pytest. .ci/run calls exactly this.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

bash tests/setup/tools.sh
bash tests/setup/prometheus.sh
bash tests/setup/image.sh
bash tests/setup/rootfs.sh
bash tests/setup/chromium.sh

exec .venv/bin/python -m pytest -v -p no:cacheprovider "$@"
