"""The fixtures every test may ask for, over the real parts in `helpers.py` and
`redis_server.py`: a scripted upstream, configs and proxies, real Redis servers, and the
`backend` a test's store runs on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxy.config import Config

from .helpers import ProxyProcess, ScriptedUpstream, make_config, run_proxy
from .redis_server import RedisClusterServers, RedisServer, require_redis

BACKENDS = ("disk", "redis", "redis-cluster")
RedisServerT = TypeVar("RedisServerT", RedisServer, RedisClusterServers)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `backends(...)` (itself, or its module through `pytestmark`; the closest
    mark wins) runs once per store it names, if it uses `backend`; unmarked, on disk only."""
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is None or "backend" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(BACKENDS)
    if unknown or not marker.args:
        raise pytest.UsageError(f"backends() takes some of {BACKENDS}, got {marker.args}")
    metafunc.parametrize("backend", marker.args, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `storage.*` overrides of the store this test runs on: none for the disk log, or
    a real redis-server or Redis Cluster, emptied for the test. `config_for` applies them,
    so a module marked `backends("disk", "redis", "redis-cluster")` runs on all three."""
    name = getattr(request, "param", "disk")
    if name == "disk":
        return {}
    server: RedisServer | RedisClusterServers = request.getfixturevalue(
        "redis_server" if name == "redis" else "redis_cluster"
    )
    server.flushall()
    return server.storage


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    server = await ScriptedUpstream().start()
    yield server
    await server.stop()


@pytest.fixture
def config_for(tmp_path: Path, backend: dict[str, Any]) -> Callable[..., Config]:
    """`config_for(upstream_url, **overrides)`: the config of a proxy on this test's store,
    logging (on disk) under tmp_path/data."""
    if backend:
        (tmp_path / "data").mkdir()  # as the disk log would: nothing else may appear there

    def build(upstream: str = "mock", **overrides: Any) -> Config:
        return make_config(tmp_path / "data", upstream, **{**backend, **overrides})

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


def running(server: RedisServerT) -> Iterator[RedisServerT]:
    """The body of a Redis fixture: `server` started, then stopped after its tests."""
    require_redis()
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the module's tests (each empties it as it needs)."""
    yield from running(RedisServer(tmp_path_factory.mktemp("redis")))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill and restart."""
    yield from running(RedisServer(tmp_path / "redis"))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One real 3-primary, 3-replica Redis Cluster for every test that only uses it."""
    yield from running(RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")))


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A Redis Cluster of this test's own, whose primaries it may fail over."""
    yield from running(RedisClusterServers(tmp_path / "cluster"))
