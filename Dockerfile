# resumable-proxy as a sidecar: non-root, /data as the log volume, health-checked.
#
# BASE is any Debian-based image with Python 3.11+ and its venv module: python:3.11-slim (the
# default), or e.g. one made from Debian's own packages (tests/test_container.py makes one
# with mmdebstrap). WHEELS, when set, names a directory holding a wheel of every dependency
# (mounted into the build, `podman build --volume $PWD/wheels:/wheels --build-arg
# WHEELS=/wheels`); pip then installs from it alone and the build needs no network. Without
# it, pip installs from the package index.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG WHEELS=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/resumable-proxy \
    PATH=/opt/resumable-proxy/bin:$PATH

# Debian's base passwd already has a `proxy` user and group (uid/gid 13), so the image's user
# takes a name and ids of its own.
RUN groupadd --system --gid 10001 resumable-proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin resumable-proxy

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# A venv: Debian's own python has no `python` command and refuses system-wide pip installs.
# pip and setuptools (23 MB, unused at run time) leave it once the proxy is in.
# The local package is what gets installed; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install ${WHEELS:+--no-index --find-links "$WHEELS"} '.[fast,redis]' \
    && pip uninstall --yes --quiet pip setuptools \
    && rm -rf /src

RUN mkdir -p /data && chown 10001:10001 /data && chmod 0700 /data
VOLUME ["/data"]

USER 10001:10001
WORKDIR /data
EXPOSE 8080

# The check reads the serving process's own flags, config file and environment, so it follows
# the port however it was set (`serve --port`, a mounted YAML file, ${VAR} in it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-m", "proxy.healthcheck"]

# Exec form: the proxy is PID 1 and gets `docker stop`'s SIGTERM itself, which lets live
# streams finish for server.shutdown_grace (10s) before it exits 0. Give the container a stop
# timeout above the grace (`--stop-timeout 20`, compose `stop_grace_period: 20s`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["resumable-proxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
