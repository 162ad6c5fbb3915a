#!/usr/bin/env bash
# Idempotent: create .venv-helm (pyenv's Python 3.12) with helm-sdkpy for chart lint/template tests.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${HELM_VENV:-$ROOT/.venv-helm}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import helm_sdkpy' 2>/dev/null; then
    echo "helm.sh: $VENV already has helm-sdkpy"
    exit 0
fi

PY=""
if command -v pyenv >/dev/null 2>&1; then
    for cand in "$(pyenv root)"/versions/3.12*/bin/python; do
        if [ -x "$cand" ]; then PY="$cand"; fi
    done
fi
if [ -z "$PY" ]; then
    for cand in python3.12 python3.13 python3; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
            PY="$(command -v "$cand")"; break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "helm.sh: no Python >= 3.12 found (pyenv versions/3.12* or python3.12)" >&2
    exit 1
fi

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet helm-sdkpy
"$VENV/bin/python" -c 'import helm_sdkpy; print("helm-sdkpy", getattr(helm_sdkpy, "__version__", "?"))'
