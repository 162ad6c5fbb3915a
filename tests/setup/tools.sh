#!/usr/bin/env bash
# Idempotent: Debian tools the tests use, installed only when missing.
#   strace   - the read-only proof (tests/test_readonly.py)
#   openssl  - certificates for the TLS tests
#   gcc      - builds the fake-mapping target in tests/test_hostile_targets.py
#   binutils - strip, for the stripped-libpython target
#   tmux     - drives `gil-exporter top` in a terminal (tests/test_top.py)
set -euo pipefail
missing=()
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v strip >/dev/null 2>&1 || missing+=(binutils)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
if [ ${#missing[@]} -eq 0 ]; then
    echo "tools.sh: strace, openssl, gcc, strip and tmux present"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends "${missing[@]}"
