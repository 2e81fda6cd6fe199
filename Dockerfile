# resumable-proxy as a sidecar: non-root, /data as the log volume, health-checked.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid proxy --home-dir /nonexistent --shell /usr/sbin/nologin proxy

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
# The local package is what gets installed; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[fast,redis]'

RUN mkdir -p /data && chown proxy:proxy /data && chmod 0700 /data
VOLUME ["/data"]

USER 10001:10001
EXPOSE 8080

# Every key can also come from the environment through ${VAR} in a mounted YAML file.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]

ENTRYPOINT ["resumable-proxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
