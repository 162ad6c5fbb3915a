#!/usr/bin/env bash
# Idempotent: install Debian's prometheus package (promtool + server) only when missing.
# Never leaves Prometheus running as a system service: tests start their own server
# on 127.0.0.1 with a temporary storage directory.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "prometheus.sh: promtool and prometheus already installed: $(command -v promtool)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

# Keep the package's maintainer scripts from starting the service during install.
POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" = 1 ]; then $SUDO rm -f "$POLICY"; fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends prometheus

# If a service got started anyway (no policy-rc.d honoured, systemd present), stop and disable it.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl stop prometheus.service 2>/dev/null || true
    $SUDO systemctl disable prometheus.service 2>/dev/null || true
fi
if [ -x /etc/init.d/prometheus ]; then
    $SUDO /etc/init.d/prometheus stop 2>/dev/null || true
fi
if command -v update-rc.d >/dev/null 2>&1; then
    $SUDO update-rc.d prometheus disable 2>/dev/null || true
fi

command -v promtool
command -v prometheus
promtool --version | head -1
