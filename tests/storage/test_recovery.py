"""Recovery after damage and after kill -9: exactly the whole records survive."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.config import StorageConfig
from proxy.storage.base import INTERRUPTED, SessionMeta, StorageError
from proxy.storage.disk import DiskStore
from proxy.storage.log import segment_name
from proxy.storage.records import HEADER

SESSION = "session-aaaa"
OTHER = "session-bbbb"
ALIAS = "resp_0123456789abcdef"


def make_meta(session_id: str) -> SessionMeta:
    return SessionMeta(session_id, "POST", "/v1/chat", "0" * 64, "", 1, 2, 200, ())


def event(number: int) -> bytes:
    return b'id: %03d\ndata: {"token": %03d}\n\n' % (number, number)


@dataclass
class Written:
    """Where each event's record landed: event number -> (segment path, offset, length),
    and where the session's ALIAS record did, if it got one."""

    directory: Path
    records: dict[int, tuple[Path, int, int]]
    alias: tuple[Path, int, int] | None = None

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("*.log"))


async def write_session(
    directory: Path, events: int, segment_bytes: int = 1 << 20, alias_after: int | None = None
) -> Written:
    """One session, one event per record; a second session shares the segments. With
    `alias_after` n, the session gets the alias ALIAS right after its event n."""
    store = DiskStore(StorageConfig(dir=directory, fsync="never", segment_bytes=segment_bytes))
    await store.start()
    store.create(make_meta(SESSION))
    store.create(make_meta(OTHER))
    alias = None
    for number in range(1, events + 1):
        store.append(SESSION, number, event(number), [len(event(number))], 1000 + number)
        store.append(OTHER, number, event(number), [len(event(number))], 1000 + number)
        await store.flush()
        if number == alias_after:
            current = store._log.current
            assert current is not None
            before = current.size
            await store.add_alias(SESSION, ALIAS)
            alias = (current.path, before, current.size - before)
    slog = store._log.sessions[SESSION]
    records = {}
    for run in slog.event_runs:
        path = directory / segment_name(run.segment)
        for first, offset, length in zip(run.first_events, run.offsets, run.lengths, strict=True):
            records[first] = (path, offset, length)
    await store.close()
    return Written(directory, records, alias)


@contextlib.asynccontextmanager
async def recovered(directory: Path) -> AsyncIterator[tuple[list[int], DiskStore]]:
    """The store reopened on `directory` (its start is the recovery), and the events of
    SESSION that survived; closed afterwards."""
    store = DiskStore(StorageConfig(dir=directory, fsync="never"))
    await store.start()
    try:
        arrivals = await store.arrivals(SESSION)
        yield [first for first, _, _ in arrivals], store
    finally:
        await store.close()


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x10]))


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as file:
        file.write(data)


Damage = Callable[[Written], None]


def torn_header(w: Written) -> None:
    path, offset, _ = w.records[10]
    os.truncate(path, offset + 4)


def torn_payload(w: Written) -> None:
    path, offset, _ = w.records[10]
    os.truncate(path, offset + HEADER.size + 7)


def flipped_bit(w: Written) -> None:
    path, offset, length = w.records[6]
    flip(path, offset + length - 3)


def zero_filled_tail(w: Written) -> None:
    append_bytes(w.segments()[-1], bytes(4096))


def garbage_tail(w: Written) -> None:
    append_bytes(w.segments()[-1], os.urandom(777))


def truncated_segment(w: Written) -> None:
    path, offset, _ = w.records[4]
    os.truncate(path, offset + 1)


CASES: list[tuple[str, Damage, list[int]]] = [
    ("torn header", torn_header, list(range(1, 10))),
    ("torn payload", torn_payload, list(range(1, 10))),
    ("flipped bit", flipped_bit, list(range(1, 6))),
    ("zero-filled tail", zero_filled_tail, list(range(1, 11))),
    ("garbage tail", garbage_tail, list(range(1, 11))),
    ("truncated segment", truncated_segment, list(range(1, 4))),
]


@pytest.mark.parametrize(("damage", "survivors"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_damaged_newest_segment_recovers_exactly_the_whole_records(
    tmp_path: Path, damage: Damage, survivors: list[int]
) -> None:
    written = await write_session(tmp_path, 10)
    damage(written)
    async with recovered(tmp_path) as (events, store):
        assert events == survivors
        info = await store.get(SESSION)
        assert info is not None
        assert info.state == INTERRUPTED
        assert info.reason == "proxy stopped while streaming"
        assert info.events == survivors[-1]
        data, count = await store.read(SESSION, 1, 1 << 20)
        assert count == len(survivors)
        assert data == b"".join(event(n) for n in survivors)


def alias_record(w: Written) -> tuple[Path, int, int]:
    assert w.alias is not None
    return w.alias


def torn_alias_header(w: Written) -> None:
    path, offset, _ = alias_record(w)
    os.truncate(path, offset + 5)


def torn_alias_payload(w: Written) -> None:
    path, offset, length = alias_record(w)
    os.truncate(path, offset + length - 2)


def flipped_bit_in_alias(w: Written) -> None:
    path, offset, length = alias_record(w)
    flip(path, offset + length - 1)


def zero_filled_alias(w: Written) -> None:
    path, offset, length = alias_record(w)
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(bytes(length))


def no_damage(w: Written) -> None:
    alias_record(w)


# An ALIAS record (type 5) torn or damaged in the newest segment: recovery cuts the log there
# like at any bad record, so the session keeps the events before it and has no alias.
ALIAS_CASES: list[tuple[str, Damage, list[int], str | None]] = [
    ("intact", no_damage, list(range(1, 11)), ALIAS),
    ("torn alias header", torn_alias_header, list(range(1, 6)), None),
    ("torn alias payload", torn_alias_payload, list(range(1, 6)), None),
    ("flipped bit in alias", flipped_bit_in_alias, list(range(1, 6)), None),
    ("zero-filled alias", zero_filled_alias, list(range(1, 6)), None),
]


@pytest.mark.parametrize(
    ("damage", "survivors", "alias"), [c[1:] for c in ALIAS_CASES], ids=[c[0] for c in ALIAS_CASES]
)
async def test_damaged_alias_record_recovers_exactly_the_whole_records(
    tmp_path: Path, damage: Damage, survivors: list[int], alias: str | None
) -> None:
    written = await write_session(tmp_path, 10, alias_after=5)
    damage(written)
    async with recovered(tmp_path) as (events, store):
        assert events == survivors
        info = await store.get(SESSION)
        assert info is not None
        assert (info.state, info.events, info.alias) == (INTERRUPTED, survivors[-1], alias)
        assert await store.resolve_alias(ALIAS) == (SESSION if alias else None)
        other = await store.get(OTHER)
        assert other is not None and other.alias is None


async def test_missing_newest_segment_keeps_the_older_ones(tmp_path: Path) -> None:
    written = await write_session(tmp_path, 30, segment_bytes=1024)
    segments = written.segments()
    assert len(segments) >= 3
    segments[-1].unlink()
    lost_from = min(n for n, (path, _, _) in written.records.items() if path == segments[-1])
    async with recovered(tmp_path) as (events, store):
        assert events == list(range(1, lost_from))
        data, _count = await store.read(SESSION, 1, 1 << 20)
        assert data.startswith(event(1))
        info = await store.get(SESSION)
        assert info is not None
        assert (info.state, info.events) == (INTERRUPTED, lost_from - 1)


async def test_bad_record_in_an_older_segment_is_logged_and_its_prefix_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    written = await write_session(tmp_path, 30, segment_bytes=1024)
    first_segment = written.segments()[0]
    in_first = sorted(n for n, (path, _, _) in written.records.items() if path == first_segment)
    bad = in_first[len(in_first) // 2]
    path, offset, length = written.records[bad]
    flip(path, offset + length - 3)
    for index in tmp_path.glob("*.idx"):
        index.unlink()  # the cache would hide the damage; the scan must find it
    with caplog.at_level(logging.ERROR, logger="proxy.storage"):
        async with recovered(tmp_path) as (events, store):
            later = sorted(n for n, (p, _, _) in written.records.items() if p != first_segment)
            assert events == [n for n in in_first if n < bad] + later
            assert any("sealed segment" in record.getMessage() for record in caplog.records)
            assert first_segment.stat().st_size > offset  # the old segment is left as it was
            with pytest.raises(StorageError):
                await store.read(SESSION, bad, 1 << 20)


async def test_corrupt_record_behind_a_valid_index_raises_on_read(tmp_path: Path) -> None:
    written = await write_session(tmp_path, 30, segment_bytes=1024)
    first_segment = written.segments()[0]
    path, offset, length = written.records[2]
    assert path == first_segment
    flip(path, offset + length - 3)
    async with recovered(tmp_path) as (events, store):
        assert events == list(range(1, 31))
        with pytest.raises(StorageError, match="corrupt record"):
            await store.read(SESSION, 1, 1 << 20)


@pytest.mark.parametrize("fsync", ["interval", "always"])
async def test_resume_after_kill9_keeps_every_flushed_event(tmp_path: Path, fsync: str) -> None:
    helper = Path(__file__).with_name("kill9_writer.py")
    process = subprocess.Popen(
        [sys.executable, str(helper), str(tmp_path), fsync],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    printed = 0
    deadline = time.monotonic() + 20
    try:
        while printed < 400 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            printed = int(line)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
    assert printed >= 400, "the writer did not get going"
    store = DiskStore(StorageConfig(dir=tmp_path))
    await store.start()
    try:
        info = await store.get("killed-session")
        assert info is not None
        assert info.state == INTERRUPTED
        assert info.events >= printed
        # A read returns one segment's events; the writer's segments are 64 KiB, and how
        # many it filled before the kill depends on how busy the machine was.
        data, position = b"", 1
        while position <= info.events:
            chunk, count = await store.read("killed-session", position, 1 << 24)
            assert count > 0
            data += chunk
            position += count
        expected = b"".join(
            b'id: %d\ndata: {"token": %d}\n\n' % (n, n) for n in range(1, info.events + 1)
        )
        assert data == expected
    finally:
        await store.close()
