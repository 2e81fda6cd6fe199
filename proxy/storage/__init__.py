"""Stores that keep sessions: the on-disk segmented log (default) and Redis Streams."""

from __future__ import annotations

from ..config import StorageConfig
from .base import SessionStore


def open_store(config: StorageConfig) -> SessionStore:
    """The store `storage.backend` names, not yet started."""
    if config.backend == "redis":
        from .redis import RedisStore

        return RedisStore(config)
    from .disk import DiskStore

    return DiskStore(config)
