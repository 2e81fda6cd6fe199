"""The log's pure parts, driven synchronously: framing, scanning, the index cache, reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.storage.base import SessionMeta, StorageError
from proxy.storage.index import decode_index, encode_index, scan_segment
from proxy.storage.log import Log, segment_name
from proxy.storage.records import HEADER
from proxy.storage.tail import take_events


def make_meta(session_id: str) -> SessionMeta:
    return SessionMeta(session_id, "POST", "/v1/chat", "b" * 64, "", 1, 2, 200, (("a", "b"),))


def event(session_id: str, number: int, size: int = 24) -> bytes:
    head = b"id: %d\ndata: %s " % (number, session_id.encode())
    return head + b"x" * max(0, size - len(head) - 2) + b"\n\n"


class SyncWriter:
    """Writes through `Log.write` the way DiskStore does, minus the event loop."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.next_event: dict[str, int] = {}

    def batch(self, items: list[tuple[str, int]]) -> None:
        """Append, in one write, `count` events for each (session_id, count)."""
        for session_id, count in items:
            slog = self.log.sessions.get(session_id)
            if slog is None:
                slog = self.log.open_session(make_meta(session_id))
                self.next_event[session_id] = 1
            first = self.next_event[session_id]
            data = b"".join(event(session_id, first + i) for i in range(count))
            ends = [len(event(session_id, first)) * (i + 1) for i in range(count)]
            self.log.append_events(slog, first, data, ends, 1000 + first)
            self.next_event[session_id] = first + count
        result = self.log.write()
        assert result.error is None
        assert not self.log.buf and not self.log.pending
        for segment in result.sealed:
            self.log.seal_job(segment, fsync=False)()
            self.log.sealed(segment)


def open_log(directory: Path, segment_bytes: int = 1 << 20, read_only: bool = False) -> Log:
    log = Log(directory, segment_bytes, read_only=read_only)
    log.recover()
    return log


def events_of(log: Log, session_id: str) -> list[int]:
    slog = log.sessions[session_id]
    numbers: list[int] = []
    for run in slog.event_runs:
        for first, count in zip(run.first_events, run.counts, strict=True):
            numbers.extend(range(first, first + count))
    return numbers


def test_take_events_returns_whole_events_within_budget_but_at_least_one() -> None:
    ends = [10, 20, 30, 40]
    assert take_events(ends, 5, 5, 100, 1000, 0) == (0, 40, 4)
    assert take_events(ends, 5, 7, 100, 1000, 0) == (20, 40, 2)
    assert take_events(ends, 5, 5, 6, 1000, 0) == (0, 20, 2)  # readable end
    assert take_events(ends, 5, 5, 100, 25, 0) == (0, 20, 2)
    assert take_events(ends, 5, 5, 100, 3, 0) == (0, 10, 1)  # one event over budget
    assert take_events(ends, 5, 5, 100, 3, 1) == (0, 0, 0)


def test_written_records_scan_back_to_the_same_index(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    writer = SyncWriter(log)
    writer.batch([("session-a", 3), ("session-b", 1)])
    writer.batch([("session-a", 2)])
    result = scan_segment(tmp_path / segment_name(0), 0, 1 << 24)
    assert result.problem is None
    assert result.records == 5
    assert result.size == (tmp_path / segment_name(0)).stat().st_size
    by_id = {run.session_id: run for run in result.runs}
    assert list(by_id["session-a"].first_events) == [1, 4]
    assert list(by_id["session-a"].counts) == [3, 2]
    live = log.sessions["session-a"].runs[0]
    assert list(by_id["session-a"].offsets) == list(live.offsets)
    assert list(by_id["session-a"].lengths) == list(live.lengths)
    log.close()


def test_index_file_round_trips_and_rejects_damage(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    SyncWriter(log).batch([("session-a", 3), ("session-b", 2)])
    segment = log.segments[0]
    segment.runs[1].alias = "resp_b"
    data = encode_index(segment.size, segment.records, segment.runs)
    size, records, runs = decode_index(data, 0)
    assert (size, records) == (segment.size, segment.records)
    assert [list(run.first_events) for run in runs] == [[1], [1]]
    assert runs[0].meta == segment.runs[0].meta
    assert [run.alias for run in runs] == [None, "resp_b"]
    damaged = bytearray(data)
    damaged[20] ^= 1
    with pytest.raises(ValueError):
        decode_index(bytes(damaged), 0)
    log.close()


def test_roll_names_segments_by_first_record_and_recovery_uses_the_index(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=400)
    writer = SyncWriter(log)
    for _ in range(12):
        writer.batch([("session-a", 2)])
    names = sorted(p.name for p in tmp_path.glob("*.log"))
    assert names[0] == segment_name(0)
    assert len(names) > 3
    bases = [int(name[:20]) for name in names]
    assert bases == sorted(bases)
    for name in names[:-1]:  # a record never spans two segments
        assert (tmp_path / name).stat().st_size <= 400
    # the seal of each rolled segment wrote its cache; recovery uses them
    for segment in list(log.segments.values())[:-1]:
        assert segment.sealed and segment.fd == -1 and not segment.runs
        assert decode_index(segment.index_path.read_bytes(), segment.base)[0] == segment.size
    log.close()
    reopened = open_log(tmp_path, segment_bytes=400)
    assert events_of(reopened, "session-a") == list(range(1, 25))
    reopened.close()


def test_read_events_checks_the_checksum_of_what_it_returns(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    SyncWriter(log).batch([("session-a", 4)])
    slog = log.sessions["session-a"]
    data, count = log.read_events(slog, 2, 4, 1 << 20)
    assert count == 3
    assert data == b"".join(event("session-a", n) for n in (2, 3, 4))
    offset = slog.event_runs[0].offsets[0]
    with open(tmp_path / segment_name(0), "r+b") as file:
        file.seek(offset + HEADER.size + 40)
        byte = file.read(1)
        file.seek(offset + HEADER.size + 40)
        file.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(StorageError, match="corrupt record"):
        log.read_events(slog, 1, 4, 1 << 20)
    log.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(
        st.lists(
            st.tuples(st.sampled_from(["sess-aaaa", "sess-bbbb", "sess-cccc"]), st.integers(1, 4)),
            min_size=1,
            max_size=3,
        ),
        min_size=1,
        max_size=12,
    ),
    cut=st.floats(0, 1),
)
def test_any_prefix_of_a_log_recovers_a_prefix_of_each_session(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[tuple[str, int]]], cut: float
) -> None:
    directory = tmp_path_factory.mktemp("log")
    log = open_log(directory)
    writer = SyncWriter(log)
    for items in batches:
        writer.batch(items)
    appended = {sid: list(range(1, n)) for sid, n in writer.next_event.items()}
    log.close()
    path = directory / segment_name(0)
    size = path.stat().st_size
    os.truncate(path, int(size * cut))
    recovered = open_log(directory)
    for session_id, events in appended.items():
        if session_id in recovered.sessions:
            got = events_of(recovered, session_id)
            assert got == events[: len(got)]
    assert path.stat().st_size <= int(size * cut)
    recovered.close()
    again = scan_segment(path, 0, 1 << 24)
    assert again.problem is None  # the torn tail is gone for good
