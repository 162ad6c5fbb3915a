# gil-exporter image: the README's install (`python3 -m venv … && pip install .`) on a slim,
# glibc-based Python (the GIL probe does not support musl, so no Alpine).
#   docker build -t gil-exporter .
#   docker run --rm --pid=host --cap-drop=ALL --cap-add=SYS_PTRACE --user 0 -p 10057:10057 gil-exporter
# BASE_IMAGE: any Debian-based image with python3 (>= 3.9) and its venv module; the tests build
# on one made from Debian's packages, since they reach no container registry.
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
RUN python3 -m venv /opt/gil-exporter && /opt/gil-exporter/bin/pip install . && rm -rf /src
# Leave /src before the next RUN, or the runtime recreates it as that RUN's working directory.
WORKDIR /

# Non-root by default. Reading the memory of *other users'* processes needs CAP_SYS_PTRACE in
# the effective set, which a non-root process does not get from --cap-add / Kubernetes
# capabilities (no ambient capabilities): the Helm chart therefore runs this image as uid 0 with
# every capability dropped except SYS_PTRACE. As this user it still monitors processes of the
# same uid (Yama ptrace_scope 0) and every /proc figure of the others.
RUN useradd --system --uid 10057 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gil-exporter
USER 10057:10057

EXPOSE 10057
ENTRYPOINT ["/opt/gil-exporter/bin/gil-exporter"]
CMD ["--web.listen-address=:10057"]
