#!/usr/bin/env bash
# Idempotent: Debian root filesystems that tests start interpreters in (chroot, pivot_root),
# built once with debootstrap and cached OUTSIDE the clone, keyed by suite and packages:
#   debian-sid-python3.14-python3.15   Debian unstable's CPython 3.14 and 3.15 (glibc 2.4x)
#   debian-bookworm-python3            Debian 12's CPython 3.11 (glibc 2.36, as the host)
# A second run costs nothing. Prints the interpreters each root holds.
#   GIL_EXPORTER_CACHE  cache directory (default /var/cache/gil-exporter)
#   DEBIAN_MIRROR       mirror (default http://deb.debian.org/debian)
set -euo pipefail
CACHE="${GIL_EXPORTER_CACHE:-/var/cache/gil-exporter}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

need() {
    local missing=()
    for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd"); done
    if [ ${#missing[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q --no-install-recommends debootstrap util-linux
    fi
}

# build NAME SUITE PACKAGES: $CACHE/rootfs/NAME, made atomically (a half-built root never counts)
build() {
    local name="$1" suite="$2" packages="$3"
    local dir="$CACHE/rootfs/$name"
    if [ -f "$dir/.gil-exporter-rootfs" ]; then
        echo "rootfs.sh: $dir cached: $(cat "$dir/.gil-exporter-rootfs")"
        return
    fi
    need debootstrap unshare pivot_root
    $SUDO mkdir -p "$CACHE/rootfs"
    local tmp="$dir.tmp.$$"
    $SUDO rm -rf "$tmp"
    local started=$SECONDS
    $SUDO debootstrap --variant=minbase --include="$packages" "$suite" "$tmp" "$MIRROR" >"$tmp.log" 2>&1 || {
        tail -20 "$tmp.log" >&2; echo "rootfs.sh: debootstrap $suite failed" >&2; exit 1; }
    # mount points the tests bind-mount into (pivot_root's old root, pyenv's interpreters)
    $SUDO mkdir -p "$tmp/.oldroot"
    local versions
    versions="$($SUDO chroot "$tmp" dpkg-query -W -f '${Package}=${Version} ' ${packages//,/ } libc6)"
    echo "$suite: $versions" | $SUDO tee "$tmp/.gil-exporter-rootfs" >/dev/null
    $SUDO rm -rf "$dir" "$tmp.log"
    $SUDO mv "$tmp" "$dir"
    echo "rootfs.sh: built $dir in $((SECONDS - started)) s: $versions"
}

build debian-sid-python3.14-python3.15 sid python3.14,python3.15
build debian-bookworm-python3 bookworm python3
