"""Power cuts of the log engine, simulated at 1,000 random points of one recorded run.

A file layer under the log (its `osio` calls) records every file creation, write and fsync.
A cut after operation k keeps, of each segment, what an fsync covered by then plus a random
part (often ending inside a record) of what was written after it; and a segment created
since the last fsync of the data dir may be gone as a whole (its name was never durable):
what a disk may hold after the power goes. The `.idx` caches are left out (deleting them is
always safe, FORMAT.md).

- `fsync: always`: no event a reader was given (pushed to a live follower, which happens
  only after the fsync covering it) is lost, and recovery always starts.
- `fsync: interval`: an event may be lost only if no fsync of its segment ran between its
  write and the cut: the events younger than the ticker's last pass.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.config import StorageConfig
from proxy.storage import log as log_module
from proxy.storage.base import SessionMeta, StorageError
from proxy.storage.disk import DiskStore
from proxy.storage.log import Log

SESSIONS = ("session-cut-a", "session-cut-b", "session-cut-c")
CUTS = 1000
BATCHES = 240


@dataclass
class Recorder:
    """Every write and fsync the log makes, in order, with what each fd names."""

    ops: list[tuple[str, str, bytes]] = field(default_factory=list)
    paths: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # fsync runs on a thread

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_write, real_fsync = os.open, os.write, os.fsync

        def open_(path: Any, flags: int, *args: Any) -> int:
            created = bool(flags & os.O_CREAT) and not os.path.exists(path)
            fd = real_open(path, flags, *args)
            with self.lock:
                self.paths[fd] = os.fspath(path)
                if created:
                    self.ops.append(("create", os.fspath(path), b""))
            return fd

        def write(fd: int, data: Any) -> int:
            done = real_write(fd, data)
            with self.lock:
                self.ops.append(("write", self.paths[fd], bytes(memoryview(data)[:done])))
            return done

        def fsync(fd: int) -> None:
            real_fsync(fd)
            with self.lock:
                self.ops.append(("fsync", self.paths[fd], b""))

        monkeypatch.setattr(log_module.osio, "open", open_)
        monkeypatch.setattr(log_module.osio, "write", write)
        monkeypatch.setattr(log_module.osio, "fsync", fsync)


@dataclass
class Follower:
    """A live reader: records, at each push, how many operations had happened by then."""

    recorder: Recorder
    session_id: str
    given: list[tuple[int, str, int]]
    next_event: int = 1

    def push(self, first_event: int, data: bytes, count: int, arrival_ns: int) -> bool:
        assert first_event == self.next_event
        self.next_event += count
        self.given.append((len(self.recorder.ops), self.session_id, self.next_event - 1))
        return True

    def detach(self) -> None:
        return None


@dataclass
class Run:
    ops: list[tuple[str, str, bytes]]
    given: list[tuple[int, str, int]]  # (ops done at the push, session, last event given)
    written_at: dict[tuple[str, int], int]  # (session, event) -> index of the op writing it
    payload: dict[str, list[bytes]]  # each session's events, in order


def event(session_id: str, number: int, rng: random.Random) -> bytes:
    return b"id: %d\ndata: %s %s\n\n" % (number, session_id.encode(), b"x" * rng.randint(1, 300))


async def record_run(directory: Path, fsync: str, monkeypatch: pytest.MonkeyPatch) -> Run:
    recorder = Recorder()
    recorder.install(monkeypatch)
    config = StorageConfig(dir=directory, fsync=fsync, fsync_interval_ms=5, segment_bytes=4096)
    store = DiskStore(config)
    await store.start()
    rng = random.Random(7)
    given: list[tuple[int, str, int]] = []
    payload: dict[str, list[bytes]] = {}
    for number, session_id in enumerate(SESSIONS):
        store.create(SessionMeta(session_id, "POST", "/v1/chat", "b" * 64, "", number, 0, 200, ()))
        assert store.follow_live(session_id, Follower(recorder, session_id, given))
        payload[session_id] = []
    next_event = dict.fromkeys(SESSIONS, 1)
    for _ in range(BATCHES):
        session_id = rng.choice(SESSIONS)
        first = next_event[session_id]
        events = [event(session_id, first + i, rng) for i in range(rng.randint(1, 3))]
        ends = [sum(len(e) for e in events[: i + 1]) for i in range(len(events))]
        store.append(session_id, first, b"".join(events), ends, 1000 + first)
        payload[session_id].extend(events)
        next_event[session_id] = first + len(events)
        if rng.random() < 0.3:
            await asyncio.sleep(rng.choice((0, 0, 0.002)))
    await store.close()
    monkeypatch.undo()
    written_at: dict[tuple[str, int], int] = {}
    for index, (kind, _, data) in enumerate(recorder.ops):
        if kind == "write":
            for session_id in SESSIONS:
                key = session_id.encode()
                for number in range(1, next_event[session_id]):
                    if (session_id, number) not in written_at and b"id: %d\ndata: %s " % (
                        number,
                        key,
                    ) in data:
                        written_at[session_id, number] = index
    return Run(recorder.ops, given, written_at, payload)


def names_durable(ops: list[tuple[str, str, bytes]]) -> dict[str, bool]:
    """For each file created in `ops`: whether an fsync of its directory followed."""
    durable: dict[str, bool] = {}
    for kind, path, _ in ops:
        if kind == "create":
            durable[path] = False
        elif kind == "fsync":
            for created in durable:
                if os.path.dirname(created) == path:
                    durable[created] = True
    return durable


def disk_after_cut(run: Run, cut: int, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """Each segment as the disk may hold it after a power cut following operation `cut`."""
    content: dict[str, bytearray] = {}
    synced: dict[str, int] = {}
    for kind, path, data in run.ops[:cut]:
        if kind == "write":
            content.setdefault(path, bytearray()).extend(data)
        elif kind == "fsync":
            synced[path] = len(content.get(path, b""))
    durable = names_durable(run.ops[:cut])
    for path, data in content.items():
        if not durable.get(path, True) and rng.random() < 0.5:
            continue  # the directory entry never reached the disk: the whole file is gone
        floor = synced.get(path, 0)
        yield path, bytes(data[: rng.randint(floor, len(data))])


def recovered_events(directory: Path, run: Run) -> dict[str, int]:
    """Recover the cut data dir and count each session's events readable from event 1 on,
    checking their bytes. A read stops at a gap (records of an older segment lost while a
    newer one's stayed): the server ends such a replay with the `failed` event there."""
    log = Log(directory, 4096, read_only=True)
    log.recover()
    counts = {}
    for session_id, events in run.payload.items():
        slog = log.sessions.get(session_id)
        total = 0 if slog is None or slog.info is None else slog.info.events
        got = b""
        readable = 0
        while slog is not None and readable < total:
            try:
                data, count = log.read_events(slog, readable + 1, total, 1 << 20)
            except StorageError:
                break
            assert count
            got += data
            readable += count
        assert got == b"".join(events[:readable]), session_id
        counts[session_id] = readable
    log.close()
    return counts


@pytest.mark.parametrize("fsync", ["always", "interval"])
async def test_power_cuts_lose_only_what_the_fsync_mode_allows(
    tmp_path: Path, fsync: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = await record_run(tmp_path / "run", fsync, monkeypatch)
    assert run.given and len(run.ops) > 100
    rng = random.Random(11)
    lost_somewhere = 0
    for number in range(CUTS):
        cut = rng.randint(0, len(run.ops))
        directory = tmp_path / f"cut-{number}"
        directory.mkdir()
        for path, data in disk_after_cut(run, cut, rng):
            (directory / Path(path).name).write_bytes(data)
        counts = recovered_events(directory, run)
        if fsync == "always":
            for done, session_id, last in run.given:
                if done <= cut:
                    assert counts[session_id] >= last, (cut, session_id, last)
        else:
            fsynced_after = {
                path: index
                for index, (kind, path, _) in enumerate(run.ops[:cut])
                if kind == "fsync"
            }
            durable = names_durable(run.ops[:cut])
            for (session_id, event_number), index in run.written_at.items():
                if index >= cut or counts[session_id] >= event_number:
                    continue
                lost_somewhere += 1
                path = run.ops[index][1]
                synced = fsynced_after.get(path, -1) > index and durable.get(path, True)
                assert not synced, (cut, session_id, event_number)
        if number % 100 == 0:  # the whole store starts on it too (lock, sync, interrupted)
            store = DiskStore(StorageConfig(dir=directory, fsync=fsync, segment_bytes=4096))
            await store.start()
            await store.close()
    if fsync == "interval":
        assert lost_somewhere, "no cut fell between a write and its fsync: the test saw nothing"
