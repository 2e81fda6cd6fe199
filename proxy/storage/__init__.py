"""Stores that keep sessions: the on-disk segmented log (default) and Redis Streams."""

from __future__ import annotations

from ..config import StorageConfig
from .base import SessionStore, StorageError


def open_store(config: StorageConfig) -> SessionStore:
    """The store `storage.backend` names, not yet started."""
    if config.backend == "redis":
        try:
            from .redis import RedisStore
        except ImportError as exc:
            raise StorageError(
                f"storage.backend redis needs the redis package ({exc.name} is missing): "
                "pip install 'resumable-proxy[redis]'"
            ) from None
        return RedisStore(config)
    from .disk import DiskStore

    return DiskStore(config)
