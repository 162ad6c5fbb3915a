#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine:
#   ./tests/run.sh [pytest args]
# Sets up .venv (the exporter and test deps), Debian's prometheus (promtool and the
# server, never started as a service), .venv-helm (pyenv's 3.12 with helm-sdkpy) and Debian's
# chromium (landing page screenshots); the [test] extra brings the real servers (gunicorn,
# uvicorn + FastAPI, waitress, python-dateutil) that the verdict tests load over loopback,
# then runs pytest. .ci/run calls exactly this.
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
bash tests/setup/helm.sh
bash tests/setup/chromium.sh

exec .venv/bin/python -m pytest -v -p no:cacheprovider "$@"
