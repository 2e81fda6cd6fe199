"""The whole sessions-and-resume suite (`test_sessions.py`) again, on a real Redis Cluster.

Three primaries with a replica each (`redis-cli --cluster create`), the proxy pointed at one
node with `storage.redis_cluster: true` and waiting for one replica per write: every rule of
the contract holds when a session's keys live on whichever primary serves its hash tag.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config

from . import test_sessions
from .conftest import cluster_storage
from .helpers import make_config
from .redis_server import RedisClusterServers

globals().update(
    {name: test for name, test in vars(test_sessions).items() if name.startswith("test_")}
)


@pytest.fixture
def config_for(tmp_path: Path, redis_cluster: RedisClusterServers) -> Callable[..., Config]:
    redis_cluster.flushall()
    (tmp_path / "data").mkdir()

    def build(upstream: str = "mock", **overrides: Any) -> Config:
        return make_config(
            tmp_path / "data", upstream, **{**cluster_storage(redis_cluster), **overrides}
        )

    return build
