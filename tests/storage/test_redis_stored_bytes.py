"""`RedisStore.stored_bytes()`, the storage_bytes gauge of the Redis backend: what Redis
reports using (`used_memory`), re-read once per heartbeat, summed over a Cluster's primaries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from proxy.config import StorageConfig
from proxy.storage.base import SessionMeta
from proxy.storage.redis import RedisStore

from ..redis_server import RedisClusterServers, RedisServer

HEARTBEAT = 0.05


def meta(session_id: str) -> SessionMeta:
    now = time.time_ns()
    return SessionMeta(session_id, "POST", "/v1/chat/completions", "ab" * 32, "", now, now, 200, ())


async def used_memory(port: int) -> int:
    client = Redis(port=port)
    try:
        return int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the gauge never showed it"
        await asyncio.sleep(HEARTBEAT)


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    opened = RedisStore(
        StorageConfig(backend="redis", redis_url=redis_server.url), heartbeat_interval=HEARTBEAT
    )
    await opened.start()
    yield opened
    await opened.close()


async def test_stored_bytes_is_what_redis_reports_and_follows_what_is_stored(
    store: RedisStore, redis_server: RedisServer
) -> None:
    before = store.stored_bytes()
    assert before > 0  # read at start, before any heartbeat
    store.create(meta("session-big"))
    event = b"id: 1\ndata: " + b"x" * (1 << 20) + b"\n\n"
    store.append("session-big", 1, event, [len(event)], time.time_ns())
    await store.flush()
    await until(lambda: store.stored_bytes() >= before + len(event))
    assert abs(store.stored_bytes() - await used_memory(redis_server.port)) < len(event) // 2
    await store.delete("session-big")
    await until(lambda: store.stored_bytes() < before + len(event) // 2)


async def test_on_a_cluster_stored_bytes_adds_up_every_primary(
    redis_cluster: RedisClusterServers,
) -> None:
    store = RedisStore(
        StorageConfig(backend="redis", redis_url=redis_cluster.url, redis_cluster=True),
        heartbeat_interval=HEARTBEAT,
    )
    await store.start()
    try:
        primaries = [
            int(row["port"]) for row in redis_cluster.topology() if "master" in row["flags"]
        ]
        assert len(primaries) == 3
        each = [await used_memory(port) for port in primaries]
        # Every primary holds about the same baseline; one alone is far below the sum.
        assert store.stored_bytes() > sum(each) - min(each) // 2
    finally:
        await store.close()
