from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config

from .helpers import ProxyProcess, ScriptedUpstream, make_config, run_proxy
from .redis_server import RedisClusterServers, RedisServer, redis_available


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


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    """Proxy processes a test starts (append them); each is killed when the test ends."""
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.kill()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the module's tests (they flush it as they need)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


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
