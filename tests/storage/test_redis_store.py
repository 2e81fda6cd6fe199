"""RedisStore against a real redis-server: what the sessions layer relies on, and the replica
machinery (heartbeats, interruption, stop requests, losing Redis) with two stores on one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from proxy.config import RetentionConfig, StorageConfig
from proxy.storage.base import (
    CANCELLED,
    COMPLETE,
    FAILED,
    INTERRUPTED,
    STREAMING,
    SessionExists,
    SessionInfo,
    SessionMeta,
    SessionMissing,
    StorageError,
)
from proxy.storage.redis import RedisStore
from proxy.storage.tail import Tail

from ..helpers import aeventually, free_port
from ..redis_server import RedisClusterServers, RedisServer


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The module's redis-server, emptied for the test."""
    redis_server.flushall()
    return redis_server.url


def storage(url: str, ttl: float = 3600.0) -> StorageConfig:
    return StorageConfig(backend="redis", redis_url=url, retention=RetentionConfig(ttl=ttl))


@contextlib.asynccontextmanager
async def replica(url: str) -> AsyncIterator[RedisStore]:
    """A started store whose heartbeats (every 0.1 s, expiring after 0.5 s) keep tests short."""
    opened = RedisStore(storage(url), heartbeat_interval=0.1, heartbeat_ttl=0.5)
    await opened.start()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    async with replica(redis_url) as opened:
        yield opened


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[RedisStore]:
    """A second replica on the same Redis."""
    async with replica(redis_url) as opened:
        yield opened


def meta(session_id: str = "session-0001", created_ns: int | None = None) -> SessionMeta:
    now = created_ns or time.time_ns()
    return SessionMeta(
        session_id=session_id,
        method="POST",
        path="/v1/chat/completions",
        body_sha256="ab" * 32,
        credential_sha256="cd" * 32,
        created_ns=now,
        request_ns=now,
        upstream_status=200,
        headers=(("Content-Type", "text/event-stream"),),
    )


def event(n: int, size: int = 20) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (n, b"x" * size)


def batch(first: int, count: int, size: int = 20) -> tuple[bytes, list[int]]:
    data = b""
    ends = []
    for n in range(first, first + count):
        data += event(n, size)
        ends.append(len(data))
    return data, ends


def append(store: RedisStore, session_id: str, first: int, count: int, size: int = 20) -> None:
    data, ends = batch(first, count, size)
    store.append(session_id, first, data, ends, time.time_ns())


async def read_all(store: RedisStore, session_id: str, start: int = 1) -> bytes:
    out = b""
    while True:
        data, count = await store.read(session_id, start, 1 << 20)
        if not count:
            return out
        out += data
        start += count


async def test_read_from_any_event_is_exact_locally_and_on_another_replica(
    store: RedisStore, other: RedisStore
) -> None:
    store.create(meta())
    append(store, "session-0001", 1, 3)
    append(store, "session-0001", 4, 1)
    append(store, "session-0001", 5, 4)
    await store.flush()
    whole = b"".join(event(n) for n in range(1, 9))
    for start in range(1, 10):
        expected = b"".join(event(n) for n in range(start, 9))
        assert await read_all(store, "session-0001", start) == expected
        assert await read_all(other, "session-0001", start) == expected
    assert (await other.read("session-0001", 2, 1)) == (event(2), 1)
    tail = Tail(1 << 20)
    for first, count in ((1, 3), (4, 1), (5, 4)):
        tail.append(first, *batch(first, count))
    for start in range(1, 10):
        for max_bytes in (1, 40, 80, 100, 150, 400):
            # Redis cuts server-side exactly as the in-memory tail does.
            expected_cut = tail.read(start, 8, max_bytes)
            assert await other.read("session-0001", start, max_bytes) == expected_cut
    info = await other.get("session-0001")
    assert info is not None
    assert (info.state, info.events, info.bytes) == (STREAMING, 8, len(whole))


async def test_replay_from_redis_when_the_local_tail_moved_on(store: RedisStore) -> None:
    store.create(meta())
    for first in range(1, 401, 4):
        append(store, "session-0001", first, 4, size=200)
    await store.flush()
    expected = b"".join(event(n, 200) for n in range(1, 401))
    assert await read_all(store, "session-0001") == expected


async def test_hundreds_of_readers_catching_up_from_redis_at_once_all_get_every_event(
    store: RedisStore, other: RedisStore
) -> None:
    """More concurrent reads than redis-py's pool holds (100) wait for a connection instead
    of failing with "Too many connections" (which ended 193 of 1,000 benchmark streams)."""
    store.create(meta())
    for first in range(1, 401, 4):
        append(store, "session-0001", first, 4, size=200)
    await store.flush()
    expected = b"".join(event(n, 200) for n in range(1, 401))
    replays = await asyncio.gather(
        *(read_all(replica, "session-0001") for replica in [store, other] * 150)
    )
    assert all(replay == expected for replay in replays)


async def test_end_records_state_and_finished_keys_expire(redis_url: str) -> None:
    store = RedisStore(storage(redis_url, ttl=60))
    await store.start()
    try:
        store.create(meta())
        append(store, "session-0001", 1, 2)
        store.end("session-0001", COMPLETE, "", time.time_ns())
        await store.flush()
        info = await store.get("session-0001")
        assert info is not None
        assert (info.state, info.events) == (COMPLETE, 2)
        assert info.first_event_ns is not None
        client = Redis.from_url(redis_url)
        for key in ("rp:{session-0001}:meta", "rp:{session-0001}:events"):
            assert 0 < await client.pttl(key) <= 60_000
        await client.aclose()
    finally:
        await store.close()


async def test_live_session_keys_expire_eventually(store: RedisStore, redis_url: str) -> None:
    store.create(meta())
    append(store, "session-0001", 1, 1)
    await store.flush()
    client = Redis.from_url(redis_url)
    for key in ("rp:{session-0001}:meta", "rp:{session-0001}:events"):
        assert await client.pttl(key) > 3600_000
    await client.aclose()


async def test_wait_wakes_local_and_remote_readers_on_append_and_end(
    store: RedisStore, other: RedisStore
) -> None:
    store.create(meta())
    append(store, "session-0001", 1, 1)
    await store.flush()

    async def woken(waiters: list[asyncio.Task[None]]) -> None:
        """The waits (an hour long) end because of what happened, not by their timeout."""
        await asyncio.sleep(0.2)
        assert not any(task.done() for task in waiters)  # nothing to wake them yet

    waiters = [asyncio.create_task(r.wait("session-0001", 1, 3600)) for r in (store, other)]
    await woken(waiters)
    append(store, "session-0001", 2, 1)
    await asyncio.wait_for(asyncio.gather(*waiters), 30)

    waiters = [asyncio.create_task(r.wait("session-0001", 2, 3600)) for r in (store, other)]
    await woken(waiters)
    store.end("session-0001", COMPLETE, "", time.time_ns())
    await asyncio.wait_for(asyncio.gather(*waiters), 30)
    info = await other.get("session-0001")
    assert info is not None and (info.state, info.events) == (COMPLETE, 2)


async def test_wait_returns_after_timeout_when_nothing_comes(
    store: RedisStore, other: RedisStore
) -> None:
    store.create(meta())
    await store.flush()
    waiters = [asyncio.create_task(r.wait("session-0001", 0, 1.0)) for r in (store, other)]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in waiters)  # no early return without events
    await asyncio.wait_for(asyncio.gather(*waiters), 30)  # and no wait past its timeout


async def test_delete_forgets_everywhere(store: RedisStore, other: RedisStore) -> None:
    store.create(meta())
    append(store, "session-0001", 1, 2)
    store.end("session-0001", CANCELLED, "cancelled by a client", time.time_ns())
    await store.delete("session-0001")
    assert await store.get("session-0001") is None
    assert await other.get("session-0001") is None
    assert await other.read("session-0001", 1, 1024) == (b"", 0)
    assert [info.session_id for info in await other.list()] == []


async def test_list_is_newest_first_across_replicas(store: RedisStore, other: RedisStore) -> None:
    base = time.time_ns()
    store.create(meta("session-old", base))
    other.create(meta("session-mid", base + 1000))
    store.create(meta("session-new", base + 2000))
    store.end("session-old", COMPLETE, "", time.time_ns())
    await store.flush()
    await other.flush()
    for reader in (store, other):
        listed = [(info.session_id, info.state) for info in await reader.list()]
        assert listed == [
            ("session-new", STREAMING),
            ("session-mid", STREAMING),
            ("session-old", COMPLETE),
        ]


async def test_arrivals_give_one_entry_per_batch(store: RedisStore, other: RedisStore) -> None:
    store.create(meta())
    append(store, "session-0001", 1, 3)
    append(store, "session-0001", 4, 2)
    store.end("session-0001", COMPLETE, "", time.time_ns())
    await store.flush()
    arrivals = await other.arrivals("session-0001")
    assert [(first, count) for first, count, _ in arrivals] == [(1, 3), (4, 2)]


async def test_an_existing_id_is_a_conflict(store: RedisStore) -> None:
    store.create(meta())
    with pytest.raises(SessionExists):
        store.create(meta())


async def test_stop_request_reaches_the_owning_replica(
    store: RedisStore, other: RedisStore
) -> None:
    stopped: list[tuple[str, str, str]] = []

    async def handler(session_id: str, state: str, reason: str) -> bool:
        stopped.append((session_id, state, reason))
        store.end(session_id, state, reason, time.time_ns())
        return True

    store.set_stop_handler(handler)
    store.create(meta())
    append(store, "session-0001", 1, 1)
    await store.flush()
    assert await other.request_stop("session-0001", CANCELLED, "cancelled by a client")
    assert stopped == [("session-0001", CANCELLED, "cancelled by a client")]
    info = await other.get("session-0001")
    assert info is not None and (info.state, info.events) == (CANCELLED, 1)
    assert not await other.request_stop("session-0001", CANCELLED, "again")


async def test_a_dead_replicas_sessions_become_interrupted(
    store: RedisStore, other: RedisStore
) -> None:
    store.create(meta())
    append(store, "session-0001", 1, 3)
    await store.flush()
    for task in store._tasks:  # the replica freezes: no more heartbeats
        task.cancel()

    async def ended() -> SessionInfo | None:
        info = await other.get("session-0001")
        assert info is not None
        return info if info.state != STREAMING else None

    info = await aeventually(ended, 5, "the frozen replica's session ended")
    assert (info.state, info.events) == (INTERRUPTED, 3)
    assert await read_all(other, "session-0001") == b"".join(event(n) for n in range(1, 4))
    assert not await other.request_stop("session-0001", CANCELLED, "too late")


async def test_sweep_interrupts_without_anyone_asking(
    store: RedisStore, other: RedisStore, redis_url: str
) -> None:
    store.create(meta())
    await store.flush()
    for task in store._tasks:
        task.cancel()
    client = Redis.from_url(redis_url)

    async def swept() -> bool:
        return await client.hget("rp:{session-0001}:meta", "state") != b"streaming"

    await aeventually(swept, 5, "the sweep ended the session")
    assert await client.hget("rp:{session-0001}:meta", "state") == b"interrupted"
    await client.aclose()


async def test_unreachable_redis_at_start_is_one_clear_line() -> None:
    store = RedisStore(storage(f"redis://:secret@127.0.0.1:{free_port()}/0"), socket_timeout=0.5)
    with pytest.raises(StorageError) as raised:
        await store.start()
    message = str(raised.value)
    assert message.startswith("cannot reach redis at redis://:***@127.0.0.1:")
    assert "\n" not in message and "secret" not in message


async def test_losing_redis_keeps_local_readers_going_and_fails_the_session(
    own_redis: RedisServer,
) -> None:
    server = own_redis
    store = RedisStore(
        storage(server.url), heartbeat_interval=0.1, heartbeat_ttl=0.5, socket_timeout=0.5
    )
    try:
        await store.start()
        store.create(meta())
        append(store, "session-0001", 1, 2)
        await store.flush()
        server.kill()
        append(store, "session-0001", 3, 2)
        await store.flush()
        assert not store.healthy
        data, count = await store.read("session-0001", 3, 1 << 20)
        assert (data, count) == (event(3) + event(4), 2)
        await store.wait("session-0001", 4, 0.05)  # neither raises nor spins
        server.start()

        async def healthy() -> bool:
            return store.healthy

        await aeventually(healthy, 5, "the store healthy again")
        append(store, "session-0001", 5, 1)
        store.end("session-0001", COMPLETE, "", time.time_ns())
        await store.flush()
        info = await store.get("session-0001")
        assert info is not None
        assert (info.state, info.events) == (FAILED, 5)  # what local readers got
        assert "redis" in info.reason
        assert await read_all(store, "session-0001") == b"".join(event(n) for n in range(1, 6))
        client = Redis.from_url(server.url)

        async def settled() -> bool:
            return await client.hget("rp:{session-0001}:meta", "state") == b"failed"

        await aeventually(settled, 5, "the session settled as failed in Redis")
        # The restarted Redis kept nothing, so no event is claimed that it cannot give back.
        assert await client.hget("rp:{session-0001}:meta", "events") == b"0"
        await client.aclose()
    finally:
        await store.close()


async def test_on_a_cluster_a_sessions_keys_share_a_slot_and_sessions_spread_over_primaries(
    redis_cluster: RedisClusterServers,
) -> None:
    redis_cluster.flushall()
    config = StorageConfig(backend="redis", redis_url=redis_cluster.url, redis_cluster=True)
    store, other = RedisStore(config), RedisStore(config)
    await store.start()
    await other.start()
    try:
        ids = [f"spread-{n:04d}" for n in range(24)]
        for session_id in ids:
            store.create(meta(session_id))
            append(store, session_id, 1, 3)
        store.end(ids[0], COMPLETE, "", time.time_ns())
        await store.flush()
        primaries = {redis_cluster.primary_for(f"rp:{{{sid}}}:events").port for sid in ids}
        assert len(primaries) == 3  # 24 sessions on all three primaries
        for session_id in ids:
            holder = redis_cluster.primary_for(f"rp:{{{session_id}}}:meta")
            assert holder.port == redis_cluster.primary_for(f"rp:{{{session_id}}}:events").port
            assert await read_all(other, session_id) == b"".join(event(n) for n in range(1, 4))
        listed = [info.session_id for info in await other.list()]
        assert sorted(listed) == sorted(ids)
        info = await other.get(ids[0])
        assert info is not None and (info.state, info.events) == (COMPLETE, 3)
    finally:
        await other.close()
        await store.close()


async def test_a_cluster_node_named_without_redis_cluster_is_one_clear_line(
    redis_cluster: RedisClusterServers,
) -> None:
    store = RedisStore(storage(redis_cluster.url))
    with pytest.raises(StorageError) as raised:
        await store.start()
    assert str(raised.value).endswith("is a Redis Cluster node: set storage.redis_cluster: true")


async def test_an_alias_resolves_on_every_replica_and_expires_with_its_session(
    redis_url: str,
) -> None:
    store = RedisStore(storage(redis_url, ttl=60))
    other = RedisStore(storage(redis_url, ttl=60))
    await store.start()
    await other.start()
    client = Redis.from_url(redis_url)
    try:
        store.create(meta())
        append(store, "session-0001", 1, 1)
        await store.add_alias("session-0001", "resp_abc")
        assert await other.resolve_alias("resp_abc") == "session-0001"
        info = await other.get("session-0001")
        assert info is not None and info.alias == "resp_abc"
        assert await client.pttl("rp:alias:{resp_abc}") > 3600_000  # live: beyond the ttl
        store.end("session-0001", COMPLETE, "", time.time_ns())
        await store.flush()
        for key in ("rp:alias:{resp_abc}", "rp:{session-0001}:meta"):
            assert 0 < await client.pttl(key) <= 60_000
        # A newer session given the same alias takes it; the first no longer answers to it.
        store.create(meta("session-0002"))
        await store.add_alias("session-0002", "resp_abc")
        assert await other.resolve_alias("resp_abc") == "session-0002"
        await store.delete("session-0002")
        assert await other.resolve_alias("resp_abc") is None  # a stale key names nothing
        assert await other.resolve_alias("resp_never") is None
        with pytest.raises(SessionMissing):
            await other.add_alias("session-0002", "resp_late")
        with pytest.raises(ValueError):
            await store.add_alias("session-0001", "two words")
    finally:
        await client.aclose()
        await other.close()
        await store.close()


async def test_stored_bytes_is_what_redis_reports_using_and_follows_what_is_stored(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """The storage_bytes gauge: `used_memory`, re-read once per heartbeat."""
    before = store.stored_bytes()
    assert before > 0  # read at start, before any heartbeat
    store.create(meta())
    data, ends = batch(1, 1, size=1 << 20)
    store.append("session-0001", 1, data, ends, time.time_ns())
    await store.flush()

    async def grown() -> bool:
        return store.stored_bytes() >= before + len(data)

    await aeventually(grown, 10, "storage_bytes grown by the session")
    client = Redis.from_url(redis_server.url)
    try:
        reported = int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()
    assert abs(store.stored_bytes() - reported) < len(data) // 2
    await store.delete("session-0001")

    async def shrunk() -> bool:
        return store.stored_bytes() <= before + len(data) // 2

    await aeventually(shrunk, 10, "storage_bytes back down after the delete")


async def test_on_a_cluster_stored_bytes_adds_up_every_primary(
    redis_cluster: RedisClusterServers,
) -> None:
    config = StorageConfig(backend="redis", redis_url=redis_cluster.url, redis_cluster=True)
    store = RedisStore(config)
    await store.start()
    try:
        each = []
        for row in redis_cluster.topology():
            if "master" in row["flags"]:
                client = Redis(port=int(row["port"]))
                each.append(int((await client.info("memory"))["used_memory"]))
                await client.aclose()
        assert len(each) == 3
        # The primaries hold about the same baseline: one or two alone fall far short.
        assert store.stored_bytes() > sum(each) - min(each) // 2
    finally:
        await store.close()
