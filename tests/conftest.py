from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config

from .helpers import ScriptedUpstream, make_config, run_proxy


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
