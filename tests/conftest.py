from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config

from .helpers import ScriptedUpstream, make_config, run_proxy
from .redis_server import RedisClusterServers, redis_available


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    server = await ScriptedUpstream().start()
    yield server
    await server.stop()


@pytest.fixture
def config_for(tmp_path: Path) -> Callable[..., Config]:
    def build(upstream: str = "mock", **overrides: Any) -> Config:
        return make_config(tmp_path / "data", upstream, **overrides)

    return build


@pytest.fixture
def proxy_for() -> Callable[[Config], Any]:
    """`async with proxy_for(config) as proxy:` runs the real app on a free port."""
    return run_proxy


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One real 3-primary, 3-replica Redis Cluster for every test that only uses it (tests
    that fail a primary over start their own)."""
    if not redis_available():
        pytest.skip("redis-server is not installed")
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


def cluster_storage(cluster: RedisClusterServers) -> dict[str, Any]:
    """The storage overrides for the Redis backend on `cluster`."""
    return {
        "storage.backend": "redis",
        "storage.redis_url": cluster.url,
        "storage.redis_cluster": True,
        "storage.redis_wait_replicas": 1,
    }
