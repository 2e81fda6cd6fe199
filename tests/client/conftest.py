from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from proxy.config import Config
from tests.helpers import RunningProxy, run_proxy


@pytest.fixture
async def proxy(config_for: Callable[..., Config]) -> AsyncIterator[RunningProxy]:
    """The real proxy over the built-in mock: 40 tokens, 5 ms apart (long enough to cut)."""
    async with run_proxy(config_for(**{"mock.tokens": 40, "mock.interval_ms": 5})) as running:
        yield running
