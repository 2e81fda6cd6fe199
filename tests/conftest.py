from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config

from .helpers import ProxyProcess, ScriptedUpstream, make_config, run_proxy
from .redis_server import RedisServer


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
