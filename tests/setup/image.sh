#!/usr/bin/env bash
# Idempotent: what tests/test_image.py needs to build and run the real Dockerfile with no
# container registry: buildah (vfs storage, chroot isolation, no daemon) and a local base image
# made from Debian's own packages (debootstrap bookworm minbase + python3), which stands in for
# the public python:3.x-slim through the Dockerfile's BASE_IMAGE build argument; and a builder
# image, that base plus gcc and python3-dev from Debian, which stands in for the public
# python:3.x (the Dockerfile's BUILDER_IMAGE, whose stage compiles the sampler's C loop).
#
# Everything slow is cached outside the clone, under ${GIL_EXPORTER_CACHE:-/var/cache/gil-exporter}:
#   buildah/root, buildah/run   buildah's storage (the base image, the test build's layers)
#   buildah/base-image          the name of the current base image, read by the tests
#   buildah/builder-image       the name of the current builder image (on top of the base)
#   buildah/unavailable         present when buildah cannot run here: the one-line reason
# A warm run checks that the base image exists and exits.
set -euo pipefail

CACHE="${GIL_EXPORTER_CACHE:-/var/cache/gil-exporter}"
STORE="$CACHE/buildah"
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
# Bump RECIPE when the steps below change what goes into the base image.
RECIPE=1
KEY="$(printf '%s\n' "$SUITE" "$PACKAGES" "$RECIPE" "$(dpkg --print-architecture 2>/dev/null || uname -m)" \
       | sha256sum | cut -c1-12)"
BASE="localhost/gil-exporter-base:$SUITE-$KEY"
# The builder: the base's own python3 with its headers and a compiler, so that the wheel built
# there is for exactly the runtime's Python. Keyed by the base it is made from.
BUILDER_PACKAGES="gcc libc6-dev python3-dev"
BUILDER_RECIPE=1
BUILDER="localhost/gil-exporter-builder:$SUITE-$(printf '%s\n' "$KEY" "$BUILDER_PACKAGES" "$BUILDER_RECIPE" \
          | sha256sum | cut -c1-12)"

mkdir -p "$STORE"
exec 9>"$STORE/lock"
flock 9  # other worktrees on this machine share the cache

bah() { buildah --root "$STORE/root" --runroot "$STORE/run" --storage-driver vfs "$@"; }

unavailable() {
    echo "$1" >"$STORE/unavailable"
    echo "image.sh: $1 (tests/test_image.py will skip)"
    exit 0
}

missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

if [ "$(id -u)" != "0" ]; then
    unavailable "buildah with chroot isolation and debootstrap need root here (uid $(id -u))"
fi

ctr=""
work=""
cleanup() {
    if [ -n "$ctr" ]; then bah rm "$ctr" >/dev/null 2>&1 || true; fi
    if [ -n "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

# The builder image, from the base: Debian's gcc and python3-dev installed with apt in a
# container of the base (apt's lists and caches removed again).
builder() {
    if bah inspect --type image "$BUILDER" >/dev/null 2>&1; then
        echo "$BUILDER" >"$STORE/builder-image"
        echo "image.sh: builder image $BUILDER cached in $STORE"
        return
    fi
    local start=$SECONDS out
    ctr="$(bah from --pull=never "$BASE")" || unavailable "buildah cannot create a container from $BASE"
    if ! out="$(bah run --isolation chroot "$ctr" -- sh -c "export DEBIAN_FRONTEND=noninteractive && \
            apt-get update -q && apt-get install -y -q --no-install-recommends $BUILDER_PACKAGES && \
            apt-get clean && rm -rf /var/lib/apt/lists/* && \
            python3 -c 'import sysconfig, os, sys; h = sysconfig.get_paths()[\"include\"]; \
sys.exit(0 if os.path.exists(h + \"/Python.h\") else \"no Python.h in \" + h)' && gcc --version | head -1" 2>&1)"; then
        echo "$out" | tail -20 >&2
        echo "image.sh: installing $BUILDER_PACKAGES into the builder failed" >&2
        exit 1
    fi
    bah config --label org.opencontainers.image.description="$BASE + $BUILDER_PACKAGES (gil-exporter test builder)" "$ctr"
    bah commit --quiet "$ctr" "$BUILDER" >/dev/null
    bah rm "$ctr" >/dev/null
    ctr=""
    echo "$BUILDER" >"$STORE/builder-image"
    echo "image.sh: builder image $BUILDER ($(echo "$out" | tail -1)) built in $((SECONDS - start)) s"
}

if bah inspect --type image "$BASE" >/dev/null 2>&1; then
    rm -f "$STORE/unavailable"
    echo "$BASE" >"$STORE/base-image"
    echo "image.sh: base image $BASE cached in $STORE"
    builder
    exit 0
fi

work="$(mktemp -d "$CACHE/debootstrap.XXXXXX")"

start=$SECONDS
# Debootstrap's default mirror unless GIL_EXPORTER_DEBIAN_MIRROR names another.
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work/rootfs" \
    ${GIL_EXPORTER_DEBIAN_MIRROR:+"$GIL_EXPORTER_DEBIAN_MIRROR"} >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; echo "image.sh: debootstrap failed" >&2; exit 1; }
# What python:*-slim leaves out too: apt lists and caches, docs, man pages.
chroot "$work/rootfs" apt-get clean
rm -rf "$work/rootfs"/var/lib/apt/lists/* "$work/rootfs"/usr/share/doc/* "$work/rootfs"/usr/share/man/* \
       "$work/rootfs"/usr/share/info/* "$work/rootfs"/var/log/*.log "$work/rootfs"/var/cache/debconf/*-old
echo "image.sh: debootstrap $SUITE minbase + $PACKAGES: $((SECONDS - start)) s"

ctr="$(bah from scratch)" || unavailable "buildah cannot create a container here"
mnt="$(bah mount "$ctr")" || unavailable "buildah cannot mount a container's root filesystem here"
cp -a "$work/rootfs/." "$mnt/"
bah umount "$ctr" >/dev/null
bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 \
    --label org.opencontainers.image.description="Debian $SUITE minbase + $PACKAGES (gil-exporter test base)" "$ctr"
if ! out="$(bah run --isolation chroot "$ctr" -- python3 -c 'import sys, venv; print(sys.version.split()[0])' 2>&1)"; then
    unavailable "buildah run --isolation chroot fails here: $(echo "$out" | tail -1)"
fi
bah commit --quiet "$ctr" "$BASE" >/dev/null
bah rm "$ctr" >/dev/null
ctr=""
rm -f "$STORE/unavailable"
echo "$BASE" >"$STORE/base-image"
echo "image.sh: base image $BASE (python $out) built in $((SECONDS - start)) s, stored in $STORE"
builder
