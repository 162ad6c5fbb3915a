#!/usr/bin/env bash
# Idempotent: Debian's chromium, for the landing page screenshot tests (tests/test_landing.py),
# installed only when missing.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium.sh: $(chromium --version 2>/dev/null | head -1)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
