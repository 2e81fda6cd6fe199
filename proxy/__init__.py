"""resumable-proxy: a sidecar reverse proxy that makes SSE streams resumable."""

__version__ = "0.1.0"
