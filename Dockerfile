# gil-exporter image, in two stages: a builder with a C compiler and Python's headers builds the
# wheel with the sampler's C loop (exporter/_hotloop.c, through setup.py); the runtime stage has
# no compiler and installs that wheel into a venv. glibc-based Pythons only (the GIL probe does
# not support musl, so no Alpine).
#   docker build -t gil-exporter .
#   docker run --rm --pid=host --cap-drop=ALL --cap-add=SYS_PTRACE --cap-add=DAC_READ_SEARCH \
#       --user 0 -p 10057:10057 gil-exporter
# BASE_IMAGE: any Debian-based image with python3 (>= 3.9) and its venv module. BUILDER_IMAGE:
# the same Python with gcc and its headers (python3-dev); the wheel is built for that Python's
# ABI, so both must carry the same Python version. The tests build on images made from Debian's
# packages (tests/setup/image.sh), since they reach no container registry.
ARG BASE_IMAGE=python:3.12-slim-bookworm
ARG BUILDER_IMAGE=python:3.12-bookworm

FROM ${BUILDER_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY exporter/ exporter/
# The wheels of the exporter (with its `top` extra) and of every dependency, for the runtime
# stage to install offline. setup.py's extension is optional (a pip install without a compiler
# quietly goes on without it), so the build fails here if the wheel lacks the C loop.
RUN python3 -m venv /opt/build && /opt/build/bin/pip wheel --wheel-dir /wheels ".[top]" \
    && /opt/build/bin/python -c "import glob, sys, zipfile; (w,) = glob.glob('/wheels/gil_exporter-*.whl'); \
names = zipfile.ZipFile(w).namelist(); \
sys.exit(0 if any(n.startswith('exporter/_hotloop') and n.endswith('.so') for n in names) \
else 'the wheel has no exporter._hotloop: no C compiler or Python headers in BUILDER_IMAGE?')"

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="gil-exporter" \
      org.opencontainers.image.description="Prometheus exporter that measures CPython GIL contention from outside the target process" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/gil-exporter/gil-exporter" \
      org.opencontainers.image.url="https://github.com/gil-exporter/gil-exporter" \
      org.opencontainers.image.documentation="https://github.com/gil-exporter/gil-exporter#readme"

# The venv first on PATH: `kubectl exec … -- gil-exporter diagnose …` finds the console script.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/gil-exporter/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# The builder's wheels are bind-mounted for this one step only: none of them lands in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/gil-exporter \
    && /opt/gil-exporter/bin/pip install --no-index --find-links=/wheels "gil-exporter[top]" \
    && /opt/gil-exporter/bin/python -c "import exporter._hotloop, rich"

# Non-root by default: as this user it monitors processes of the same uid (Yama ptrace_scope 0)
# and every /proc figure of the others. Reading other users' processes takes two capabilities
# in the *effective* set, which a non-root process does not get from --cap-add / Kubernetes
# capabilities (no ambient capabilities), so the Helm chart runs this image as uid 0 with every
# capability dropped except these two:
#   SYS_PTRACE       the ptrace access check on /proc/PID/mem, maps, exe, root (never attaches)
#   DAC_READ_SEARCH  /proc/PID/mem is mode 0600, owned by the target's uid: without it (or
#                    DAC_OVERRIDE, which also grants writes) the open fails the file-permission
#                    check before the ptrace check is reached. Read and search only.
RUN useradd --system --uid 10057 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gil-exporter
USER 10057:10057

EXPOSE 10057
ENTRYPOINT ["/opt/gil-exporter/bin/gil-exporter"]
CMD ["--web.listen-address=:10057"]
