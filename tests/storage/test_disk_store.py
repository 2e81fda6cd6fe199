"""DiskStore behaviour through the SessionStore interface, one event loop, many sessions."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import stat
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.config import RetentionConfig, StorageConfig
from proxy.storage import disk as disk_module
from proxy.storage import log as log_module
from proxy.storage.base import (
    COMPLETE,
    FAILED,
    STREAMING,
    SessionMeta,
    SessionMissing,
    StorageError,
)
from proxy.storage.disk import DiskStore

SECOND = 1_000_000_000


def make_meta(session_id: str, created_ns: int = 1) -> SessionMeta:
    return SessionMeta(
        session_id, "POST", "/v1/chat", "0" * 64, "", created_ns, created_ns, 200, (("x", "y"),)
    )


def event(session_id: str, number: int) -> bytes:
    return b'id: %d\ndata: {"session": "%s", "n": %d}\n\n' % (
        number,
        session_id.encode(),
        number,
    )


def batch(session_id: str, first: int, count: int) -> tuple[bytes, list[int]]:
    parts = [event(session_id, first + i) for i in range(count)]
    ends = []
    total = 0
    for part in parts:
        total += len(part)
        ends.append(total)
    return b"".join(parts), ends


@pytest.fixture
def make_store(tmp_path: Path) -> AsyncIterator[Callable[..., DiskStore]]:
    """Builds started-later stores on tmp_path; the test closes them (or teardown does)."""
    created: list[DiskStore] = []

    def build(**options: object) -> DiskStore:
        store_options = {k: options.pop(k) for k in ("clock", "tail_bytes") if k in options}
        config = StorageConfig(dir=tmp_path, **options)  # type: ignore[arg-type]
        store = DiskStore(config, **store_options)  # type: ignore[arg-type]
        created.append(store)
        return store

    yield build  # type: ignore[misc]


async def append_events(store: DiskStore, session_id: str, first: int, count: int) -> None:
    data, ends = batch(session_id, first, count)
    store.append(session_id, first, data, ends, 1000 + first)


async def append_one_per_turn(store: DiskStore, session_id: str, last: int) -> None:
    """Events 1 to `last`, one append each, with a turn of the event loop between them."""
    for number in range(1, last + 1):
        await append_events(store, session_id, number, 1)
        await asyncio.sleep(0)


async def test_events_are_readable_by_position_with_their_arrivals(
    make_store: Callable[..., DiskStore],
) -> None:
    store = make_store(fsync="never", segment_bytes=4096)
    await store.start()
    info = store.create(make_meta("session-one"))
    first = 1
    for count in (1, 3, 2, 5, 1, 4) * 10:
        await append_events(store, "session-one", first, count)
        first += count
    await store.flush()
    total = first - 1
    assert info.events == total
    assert info.first_event_ns == 1001
    data, count = await store.read("session-one", 1, 1 << 20)
    assert data.startswith(event("session-one", 1))
    everything = b"".join(event("session-one", n) for n in range(1, total + 1))
    got = b""
    position = 1
    while position <= total:
        chunk, count = await store.read("session-one", position, 300)
        assert count >= 1
        assert len(chunk) <= 300 or count == 1
        got += chunk
        position += count
    assert got == everything
    assert info.bytes == len(everything)
    assert await store.read("session-one", total + 1, 100) == (b"", 0)
    arrivals = await store.arrivals("session-one")
    assert arrivals[:3] == [(1, 1, 1001), (2, 3, 1002), (5, 2, 1005)]
    store.end("session-one", COMPLETE, "", 5 * SECOND)
    await store.flush()
    assert (info.state, info.updated_ns) == (COMPLETE, 5 * SECOND)
    assert [i.session_id for i in await store.list()] == ["session-one"]
    await store.close()


@pytest.mark.parametrize("fsync", ["never", "always"])
async def test_hundred_live_readers_see_every_event_in_order_once(
    make_store: Callable[..., DiskStore], fsync: str
) -> None:
    store = make_store(fsync=fsync, segment_bytes=64 * 1024, tail_bytes=600)
    await store.start()
    sessions = [f"session-{n:04d}" for n in range(100)]
    events_each = 60
    rng = random.Random(7)

    async def writer(session_id: str) -> None:
        store.create(make_meta(session_id))
        number = 1
        while number <= events_each:
            count = min(rng.randint(1, 3), events_each - number + 1)
            await append_events(store, session_id, number, count)
            number += count
            await asyncio.sleep(0 if rng.random() < 0.8 else 0.002)
        store.end(session_id, COMPLETE, "", 10)

    async def reader(session_id: str) -> bytes:
        while await store.get(session_id) is None:
            await asyncio.sleep(0)
        received = []
        position = 1
        while True:
            data, count = await store.read(session_id, position, rng.choice((100, 4096)))
            if count:
                received.append(data)
                position += count
                if rng.random() < 0.1:
                    await asyncio.sleep(0.003)  # fall behind the in-memory tail now and then
                continue
            info = await store.get(session_id)
            assert info is not None
            if info.state != STREAMING and position > info.events:
                return b"".join(received)
            await store.wait(session_id, position - 1, 1.0)

    readers = [asyncio.create_task(reader(s)) for s in sessions]
    await asyncio.gather(*(writer(s) for s in sessions))
    results = await asyncio.wait_for(asyncio.gather(*readers), 20)
    for session_id, received in zip(sessions, results, strict=True):
        assert received == b"".join(event(session_id, n) for n in range(1, events_each + 1))
    assert len(list(Path(store._directory).glob("*.log"))) > 1
    await store.close()


async def test_always_wakes_readers_only_after_one_group_fsync(
    make_store: Callable[..., DiskStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(fsync="always")
    await store.start()
    gate = threading.Event()
    calls: list[int] = []
    real_fsync = log_module.osio.fsync

    def gated_fsync(fd: int) -> None:
        gate.wait(5)
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(log_module.osio, "fsync", gated_fsync)
    infos = [store.create(make_meta(f"session-{n:04d}")) for n in range(50)]
    for info in infos:
        await append_events(store, info.session_id, 1, 1)
    waiting = asyncio.create_task(store.wait("session-0000", 0, 5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert all(info.events == 0 for info in infos)  # written, not yet synced: not readable
    gate.set()
    await asyncio.wait_for(waiting, 5)
    await store.flush()
    assert all(info.events == 1 for info in infos)
    # Fifty appends in one loop turn, one fsync of the segment, and (the first segment was
    # just created) of the data dir in the same group commit.
    assert len(calls) == 2
    assert stat.S_ISREG(os.fstat(calls[0]).st_mode) and stat.S_ISDIR(os.fstat(calls[1]).st_mode)

    calls.clear()

    async def steady_writer(session_id: str) -> None:
        for number in range(2, 22):
            await append_events(store, session_id, number, 1)
            await store.flush()

    await asyncio.gather(*(steady_writer(info.session_id) for info in infos))
    assert all(info.events == 21 for info in infos)
    assert len(calls) <= 1000 // 10  # 1000 appends shared at most 100 fsyncs
    await store.close()


async def test_enospc_ends_the_session_failed_after_its_last_logged_event_then_recovers(
    make_store: Callable[..., DiskStore],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An event reaches readers only once the log has it: when the disk refuses a batch,
    readers get every event before it and then the session's end (`failed`), the upstream
    read is asked to stop, later batches are refused, and nothing after the gap is shown."""
    monkeypatch.setattr(disk_module, "PROBE_INTERVAL", 0.0)
    store = make_store(fsync="never")
    await store.start()
    stops: list[tuple[str, str, str]] = []

    async def stop(session_id: str, state: str, reason: str) -> bool:
        stops.append((session_id, state, reason))
        return True

    store.set_stop_handler(stop)
    info = store.create(make_meta("session-full"))
    await append_events(store, "session-full", 1, 2)
    await store.flush()
    received: list[bytes] = []

    async def follow() -> None:
        position = 1
        while True:
            data, count = await store.read("session-full", position, 1 << 20)
            received.append(data)
            position += count
            if not count and info.state != STREAMING:
                return
            if not count:
                await store.wait("session-full", position - 1, 2)

    reader = asyncio.create_task(follow())
    real_write = log_module.osio.write

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log_module.osio, "write", disk_full)
    with caplog.at_level(logging.ERROR, logger="proxy.storage"):
        await append_events(store, "session-full", 3, 1)
        await store.flush()
        with pytest.raises(StorageError, match="stopped taking it"):
            await append_events(store, "session-full", 4, 1)
        assert not await store.check_health()  # the probe is refused as well
    await asyncio.wait_for(reader, 5)
    assert b"".join(received) == event("session-full", 1) + event("session-full", 2)
    assert (info.events, info.state) == (2, FAILED)
    assert info.reason.startswith("storage error: write failed: No space left")
    assert [(sid, state) for sid, state, _ in stops] == [("session-full", FAILED)]
    assert sum("No space left" in r.getMessage() for r in caplog.records) == 1  # once
    store.end("session-full", FAILED, "the pump stopped", 99)
    await store.flush()

    monkeypatch.setattr(log_module.osio, "write", real_write)
    assert await store.check_health()  # freed: the probe says so before any new write
    store.create(make_meta("session-after"))
    await append_events(store, "session-after", 1, 1)
    await store.flush()
    assert store.healthy
    await store.close()
    assert not (store._directory / "PROBE").exists()
    reopened = DiskStore(StorageConfig(dir=store._directory))
    await reopened.start()
    after = await reopened.get("session-after")
    assert after is not None and after.events == 1
    full = await reopened.get("session-full")
    assert full is not None and full.events == 2  # exactly what its readers were shown
    await reopened.close()


async def test_second_store_on_a_dir_fails_but_readonly_opens_beside_it(
    make_store: Callable[..., DiskStore],
) -> None:
    store = make_store()
    await store.start()
    store.create(make_meta("session-lock"))
    await append_events(store, "session-lock", 1, 3)
    await store.flush()
    second = make_store()
    with pytest.raises(StorageError, match="is in use by another process"):
        await second.start()
    reader = DiskStore.open_readonly(store._directory)
    info = await reader.get("session-lock")
    assert info is not None and info.events == 3 and info.state == STREAMING
    data, count = await reader.read("session-lock", 2, 1 << 20)
    assert count == 2 and data == event("session-lock", 2) + event("session-lock", 3)
    await reader.close()
    await store.close()
    with pytest.raises(StorageError, match="does not exist"):
        DiskStore.open_readonly(store._directory / "missing")


async def test_delete_forgets_at_once_wakes_readers_and_reclaims_segments(
    make_store: Callable[..., DiskStore],
) -> None:
    store = make_store(fsync="never", segment_bytes=2048)
    await store.start()
    store.create(make_meta("session-gone"))
    await append_one_per_turn(store, "session-gone", 79)
    await store.flush()
    store.create(make_meta("session-stay"))
    await append_events(store, "session-stay", 1, 1)
    await store.flush()
    before = set(Path(store._directory).glob("*.log"))
    waiting = asyncio.create_task(store.wait("session-gone", 79, 5))
    await asyncio.sleep(0)
    await store.delete("session-gone")
    await asyncio.wait_for(waiting, 1)
    assert await store.get("session-gone") is None
    with pytest.raises(SessionMissing):
        await store.read("session-gone", 1, 100)
    after = set(Path(store._directory).glob("*.log"))
    assert len(after) < len(before) and after <= before
    await store.close()
    reopened = DiskStore(StorageConfig(dir=store._directory))
    await reopened.start()
    assert await reopened.get("session-gone") is None
    assert await reopened.get("session-stay") is not None
    await reopened.close()


async def test_retention_expires_and_evicts_finished_sessions_never_streaming(
    make_store: Callable[..., DiskStore],
) -> None:
    now = [1000 * SECOND]
    store = make_store(
        fsync="never",
        segment_bytes=2048,
        clock=lambda: now[0],
        retention=RetentionConfig(ttl=100.0, max_bytes=None),
    )
    await store.start()

    async def finished(session_id: str, at_s: int, events: int = 60) -> None:
        store.create(make_meta(session_id, at_s * SECOND))
        for number in range(1, events + 1):
            data, ends = batch(session_id, number, 1)
            store.append(session_id, number, data, ends, at_s * SECOND)
            await asyncio.sleep(0)
        store.end(session_id, COMPLETE, "", at_s * SECOND)
        await store.flush()

    store.create(make_meta("session-live", 1))  # streaming and very old: never evicted
    await append_events(store, "session-live", 1, 1)
    await finished("session-old1", 10)
    await finished("session-old2", 20)
    first_of_new = max(store._log.segments)
    await finished("session-new1", 950)
    await finished("session-new2", 960)
    await finished("session-new3", 970)
    assert await store.retention_pass(1000 * SECOND) == 2
    assert await store.get("session-old1") is None
    assert await store.get("session-old2") is None
    assert await store.get("session-live") is not None
    assert await store.get("session-new1") is not None
    # only the first segment (shared with the live session) and the new ones remain
    bases = sorted(int(p.name[:20]) for p in Path(store._directory).glob("*.log"))
    assert bases[0] == 0 and all(b >= first_of_new for b in bases[1:])

    total = store._log.total_bytes()
    store._config = StorageConfig(
        dir=store._directory,
        fsync="never",
        segment_bytes=2048,
        retention=RetentionConfig(ttl=1e9, max_bytes=total - 1),
    )
    assert await store.retention_pass(1000 * SECOND) == 1  # the oldest finished one is enough
    assert await store.get("session-new1") is None
    assert await store.get("session-new2") is not None
    assert store._log.total_bytes() <= total - 1
    store._config = StorageConfig(
        dir=store._directory,
        fsync="never",
        segment_bytes=2048,
        retention=RetentionConfig(ttl=1e9, max_bytes=1),
    )
    await store.retention_pass(1000 * SECOND)
    assert [i.session_id for i in await store.list()] == ["session-live"]
    await store.close()


async def test_wait_returns_on_timeout_end_and_for_unknown_sessions(
    make_store: Callable[..., DiskStore],
) -> None:
    store = make_store(fsync="interval", fsync_interval_ms=5)
    await store.start()
    store.create(make_meta("session-wait"))
    timed = asyncio.create_task(store.wait("session-wait", 0, 0.5))
    await asyncio.sleep(0.01)
    assert not timed.done()  # nothing came: it waits
    await asyncio.wait_for(timed, 30)  # until its timeout
    assert not store._waiters  # a timed-out waiter leaves nothing behind
    await store.wait("session-unknown", 0, 5)
    waiting = asyncio.create_task(store.wait("session-wait", 0, 5))
    await asyncio.sleep(0.01)
    store.end("session-wait", COMPLETE, "", 3)
    await asyncio.wait_for(waiting, 1)
    await asyncio.sleep(0.02)  # the interval fsync ran without trouble
    assert store.healthy
    await store.close()


async def test_delete_returns_only_once_its_record_is_fsynced_even_under_interval(
    make_store: Callable[..., DiskStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash right after an acknowledged delete must never bring the session back, so the
    DELETE record is written and fsynced before `delete` returns (the ticker is an hour
    away here) and only then does the session leave the index and its segments the disk."""
    store = make_store(fsync="interval", fsync_interval_ms=3_600_000, segment_bytes=2048)
    await store.start()
    store.create(make_meta("session-gone"))
    await append_one_per_turn(store, "session-gone", 79)
    store.end("session-gone", COMPLETE, "", 5)
    await store.flush()
    steps: list[str] = []
    real_write, real_fsync = log_module.osio.write, log_module.osio.fsync

    def write(fd: int, data: bytes) -> int:
        steps.append("write")
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        real_fsync(fd)
        steps.append("fsync")

    monkeypatch.setattr(log_module.osio, "write", write)
    monkeypatch.setattr(log_module.osio, "fsync", fsync)
    await store.delete("session-gone")
    assert steps[0] == "write" and "fsync" in steps[1:]
    assert await store.get("session-gone") is None
    await store.close()


async def test_a_delete_the_disk_refuses_raises_and_forgets_nothing(
    make_store: Callable[..., DiskStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(fsync="never", segment_bytes=2048)
    await store.start()
    store.create(make_meta("session-kept"))
    await append_one_per_turn(store, "session-kept", 79)
    store.end("session-kept", COMPLETE, "", 5)
    await store.flush()
    segments = sorted(Path(store._directory).glob("*.log"))
    real_write = log_module.osio.write

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log_module.osio, "write", disk_full)
    with pytest.raises(StorageError, match="cannot log the delete"):
        await store.delete("session-kept")
    assert sorted(Path(store._directory).glob("*.log")) == segments
    info = await store.get("session-kept")
    assert info is not None and info.events == 79
    data, count = await store.read("session-kept", 1, 1 << 20)
    assert count >= 1 and data.startswith(event("session-kept", 1))
    monkeypatch.setattr(log_module.osio, "write", real_write)
    await store.delete("session-kept")
    assert await store.get("session-kept") is None
    assert len(list(Path(store._directory).glob("*.log"))) < len(segments)
    await store.close()


@pytest.mark.parametrize("keep_indexes", [True, False], ids=["from .idx", "from a scan"])
async def test_an_alias_resolves_after_restart_and_dies_with_its_session(
    make_store: Callable[..., DiskStore], keep_indexes: bool
) -> None:
    store = make_store(fsync="never", segment_bytes=2048)
    await store.start()
    for session_id in ("session-one", "session-two", "session-six"):
        store.create(make_meta(session_id))
    await store.add_alias("session-one", "resp_one")
    await store.add_alias("session-two", "resp_two")
    await store.add_alias("session-six", "resp_old")
    await store.add_alias("session-six", "resp_six")  # the newest alias of a session wins
    for number in range(1, 60):  # the aliases end up in sealed, indexed segments
        await append_events(store, "session-one", number, 1)
        await store.flush()
    store.end("session-one", COMPLETE, "", 5000)
    await store.delete("session-two")
    assert await store.resolve_alias("resp_two") is None
    with pytest.raises(SessionMissing):
        await store.add_alias("session-two", "resp_late")
    with pytest.raises(ValueError):
        await store.add_alias("session-one", "not an alias")
    await store.close()
    assert len(list(store._directory.glob("*.idx"))) >= 2
    if not keep_indexes:
        for index in store._directory.glob("*.idx"):
            index.unlink()

    reopened = make_store(fsync="never", segment_bytes=2048)
    await reopened.start()
    assert await reopened.resolve_alias("resp_one") == "session-one"
    assert await reopened.resolve_alias("resp_six") == "session-six"
    assert await reopened.resolve_alias("resp_old") is None
    assert await reopened.resolve_alias("resp_two") is None
    info = await reopened.get("session-one")
    assert info is not None and (info.alias, info.state, info.events) == ("resp_one", COMPLETE, 59)
    await reopened.close()
