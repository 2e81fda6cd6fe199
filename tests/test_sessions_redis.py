"""The whole sessions-and-resume suite (`test_sessions.py`) again, on the Redis backend.

The contract's rules (event ids, states, the final error event, credential binding, 404, 409,
416, cancel, delete) must not depend on the store, so the same tests run unchanged: this
module collects every test of `test_sessions` and overrides the one fixture that builds the
config, pointing `storage` at a real redis-server that is emptied before each test.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config

from . import test_sessions
from .helpers import make_config
from .redis_server import RedisServer, redis_available

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

globals().update(
    {name: test for name, test in vars(test_sessions).items() if name.startswith("test_")}
)


@pytest.fixture
def config_for(tmp_path: Path, redis_server: RedisServer) -> Callable[..., Config]:
    redis_server.flushall()
    (tmp_path / "data").mkdir()  # the disk backend would make it; nothing else may appear

    def build(upstream: str = "mock", **overrides: Any) -> Config:
        overrides = {"storage.backend": "redis", "storage.redis_url": redis_server.url, **overrides}
        return make_config(tmp_path / "data", upstream, **overrides)

    return build
