"""The log's pure parts, driven synchronously: framing, scanning, the index cache, reads."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.storage.base import SessionMeta, StorageError
from proxy.storage.index import decode_index, encode_index, scan_segment
from proxy.storage.log import Log, segment_name
from proxy.storage.records import EVENTS_FIXED, HEADER
from proxy.storage.tail import take_events


def make_meta(session_id: str) -> SessionMeta:
    return SessionMeta(session_id, "POST", "/v1/chat", "b" * 64, "", 1, 2, 200, (("a", "b"),))


def event(session_id: str, number: int, size: int = 24) -> bytes:
    head = b"id: %d\ndata: %s " % (number, session_id.encode())
    return head + b"x" * max(0, size - len(head) - 2) + b"\n\n"


class SyncWriter:
    """Writes through `Log.write` the way DiskStore does, minus the event loop.

    `size(n)` is the size of event n (24 bytes when not given); `logged` keeps every
    session's events, to compare reads with.
    """

    def __init__(self, log: Log, size: Callable[[int], int] | None = None) -> None:
        self.log = log
        self.size = size
        self.next_event: dict[str, int] = {}
        self.logged: dict[str, list[bytes]] = {}

    def batch(self, items: list[tuple[str, int]]) -> None:
        """Append, in one write, `count` events for each (session_id, count)."""
        for session_id, count in items:
            slog = self.log.sessions.get(session_id)
            if slog is None:
                slog = self.log.open_session(make_meta(session_id))
                self.next_event[session_id] = 1
                self.logged[session_id] = []
            first = self.next_event[session_id]
            sizes = self.size or (lambda number: 24)
            batch = [event(session_id, first + i, sizes(first + i)) for i in range(count)]
            ends = list(accumulate(len(one) for one in batch))
            self.log.append_events(slog, first, b"".join(batch), ends, 1000 + first)
            self.logged[session_id] += batch
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


# --- reads: what a replay gets is exactly the logged bytes ------------------------------

# (name, events per record, segment size): one event per record (a paced LLM stream) and
# many, in one open segment and across segment rolls (sealed segments plus the open one).
READ_SHAPES = [
    ("one event per record, one segment", lambda rng: 1, 1 << 20),
    ("one event per record, rolled segments", lambda rng: 1, 4096),
    ("batched records, one segment", lambda rng: rng.randint(2, 7), 1 << 20),
    ("batched records, rolled segments", lambda rng: rng.randint(2, 7), 4096),
    ("mixed records, rolled segments", lambda rng: rng.choice((1, 1, 3, 9)), 4096),
]


def write_sessions(
    directory: Path, per_record: Callable[[random.Random], int], segment_bytes: int
) -> tuple[Log, dict[str, list[bytes]]]:
    """Three sessions interleaved in the log, events of 20-300 bytes; ended open."""
    rng = random.Random(segment_bytes ^ per_record(random.Random(1)))
    log = open_log(directory, segment_bytes=segment_bytes)
    writer = SyncWriter(log, size=lambda number: rng.randint(20, 300))
    sessions = ["read-aaaa", "read-bbbbbbbb", "read-c"]
    for _ in range(40):
        writer.batch([(rng.choice(sessions), per_record(rng)) for _ in range(rng.randint(1, 3))])
    return log, writer.logged


def budgets_at_boundaries(events: list[bytes], start: int) -> list[int]:
    """Budgets just under, at and over the end of each of the next events from `start`."""
    budgets = {1, 1 << 20}
    for end in accumulate(len(one) for one in events[start - 1 : start + 9]):
        budgets.update((end - 1, end, end + 1))
    return sorted(budgets)


def check_read(
    log: Log, session_id: str, events: list[bytes], start: int, last: int, budget: int
) -> int:
    data, count = log.read_events(log.sessions[session_id], start, last, budget)
    assert count >= 1
    assert start + count - 1 <= last
    assert data == b"".join(events[start - 1 : start - 1 + count])
    assert count == 1 or len(data) <= budget
    return count


@pytest.mark.parametrize(
    ("per_record", "segment_bytes"),
    [shape[1:] for shape in READ_SHAPES],
    ids=[shape[0] for shape in READ_SHAPES],
)
@pytest.mark.parametrize("reopened", [False, True], ids=["as written", "recovered"])
def test_a_read_from_any_event_with_any_budget_is_exactly_the_logged_events(
    tmp_path: Path,
    per_record: Callable[[random.Random], int],
    segment_bytes: int,
    reopened: bool,
) -> None:
    """Every start event, budgets at each event boundary (and one byte either side), the
    readable end at the last event and before it: the bytes are the logged events exactly,
    at least one, within the budget unless a single event is bigger."""
    log, logged = write_sessions(tmp_path, per_record, segment_bytes)
    if segment_bytes < 1 << 20:
        assert len(log.segments) > 3
    if reopened:
        log.close()
        for index in list(tmp_path.glob("*.idx"))[::2]:
            index.unlink()  # half the sealed segments scanned, half from their index
        log = open_log(tmp_path, segment_bytes=segment_bytes)
    for session_id, events in logged.items():
        total = len(events)
        for start in range(1, total + 1):
            for last in sorted({total, min(total, start + 2)}):
                for budget in budgets_at_boundaries(events, start):
                    check_read(log, session_id, events, start, last, budget)
    log.close()


@pytest.mark.parametrize(
    ("per_record", "segment_bytes"),
    [shape[1:] for shape in READ_SHAPES],
    ids=[shape[0] for shape in READ_SHAPES],
)
@pytest.mark.parametrize("budget", [1, 200, 1000, 16 * 1024, 1 << 20])
def test_reads_one_after_another_replay_each_session_whole(
    tmp_path: Path,
    per_record: Callable[[random.Random], int],
    segment_bytes: int,
    budget: int,
) -> None:
    log, logged = write_sessions(tmp_path, per_record, segment_bytes)
    for start_offset in (0, 1, 5):
        for session_id, events in logged.items():
            position = start_offset + 1
            while position <= len(events):
                position += check_read(log, session_id, events, position, len(events), budget)
    log.close()


@pytest.mark.parametrize("per_record", [1, 3], ids=["one event per record", "batched"])
@pytest.mark.parametrize("reopened", [False, True], ids=["as written", "recovered"])
def test_reads_of_sessions_far_apart_in_their_segment_are_exactly_the_logged_events(
    tmp_path: Path, per_record: int, reopened: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sessions whose records lie between another session's big ones (and sometimes
    next to each other): the reads that pread cluster by cluster (`_read_sparse`) give
    the logged bytes exactly, from every event, with budgets at every boundary, and one
    read after another replays each session whole."""
    rng = random.Random(per_record)
    log = open_log(tmp_path, segment_bytes=8 << 20)
    writer = SyncWriter(log, size=lambda number: rng.randint(20, 300))
    for _ in range(60):
        items = [(rng.choice(("far-aaaa", "far-bbbbbb")), per_record)]
        if rng.random() < 0.7:
            items.append(("far-filler", 1))
        writer.batch(items)
        if items[-1][0] == "far-filler":
            writer.size, size = (lambda number: 40 * 1024), writer.size
            writer.batch([("far-filler", 1)])
            writer.size = size
    if reopened:
        log.close()
        log = open_log(tmp_path, segment_bytes=8 << 20)
    sparse_reads = 0
    read_sparse = Log._read_sparse

    def counted(self: Log, *args: object) -> tuple[bytes, int]:
        nonlocal sparse_reads
        sparse_reads += 1
        return read_sparse(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Log, "_read_sparse", counted)
    for session_id in ("far-aaaa", "far-bbbbbb"):
        events = writer.logged[session_id]
        total = len(events)
        for start in range(1, total + 1):
            for last in sorted({total, min(total, start + 2)}):
                for budget in budgets_at_boundaries(events, start):
                    check_read(log, session_id, events, start, last, budget)
        for budget in (1, 500, 1 << 20):
            position = 1
            while position <= total:
                position += check_read(log, session_id, events, position, total, budget)
    assert sparse_reads > 100
    log.close()


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=30),
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=30),
    start=st.integers(1, 30),
    budget=st.integers(1, 3000),
)
def test_any_batching_of_events_reads_back_byte_for_byte(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    cuts: list[int],
    start: int,
    budget: int,
) -> None:
    """Events of any sizes, cut into records of any counts: a replay from any event with any
    budget, read after read, is the logged bytes from that event on."""
    directory = tmp_path_factory.mktemp("reads")
    log = open_log(directory, segment_bytes=4096)
    writer = SyncWriter(log, size=lambda number: max(sizes[(number - 1) % len(sizes)], 16))
    for count in cuts:
        writer.batch([("prop-session", count), ("prop-other", 1)])
    events = writer.logged["prop-session"]
    position = min(start, len(events))
    replayed = []
    while position <= len(events):
        data, count = log.read_events(log.sessions["prop-session"], position, len(events), budget)
        assert count >= 1 and (count == 1 or len(data) <= budget)
        replayed.append(data)
        position += count
    assert b"".join(replayed) == b"".join(events[min(start, len(events)) - 1 :])
    log.close()


@pytest.mark.parametrize("event_bytes", [24, 200, 2000])
def test_a_read_of_a_session_alone_in_its_segment_fills_most_of_its_budget(
    tmp_path: Path, event_bytes: int
) -> None:
    """Replay speed comes from few, large reads: with one event per record (the record
    headers then weigh most for small events) a read that is not at the end of the
    session returns at least half of its budget."""
    log = open_log(tmp_path, segment_bytes=32 << 20)
    writer = SyncWriter(log, size=lambda number: event_bytes)
    for _ in range(3000):
        writer.batch([("dense-session", 1)])
    events = writer.logged["dense-session"]
    budget = 64 * 1024
    position = 1
    while position <= len(events):
        data, count = log.read_events(log.sessions["dense-session"], position, len(events), budget)
        position += count
        if position <= len(events):
            assert len(data) >= budget // 2
    log.close()


# Where in a record a byte is flipped: every part of the header and the payload.
CORRUPT_AT = {
    "crc": 0,
    "length": 4,
    "type": 8,
    "session id length": HEADER.size,
    "session id": HEADER.size + 3,
    "first event": HEADER.size + 1 + 9 + 2,
    "event count": HEADER.size + 1 + 9 + 8,
    "event ends": HEADER.size + 1 + 9 + EVENTS_FIXED.size,
    "event bytes": -5,
}


@pytest.mark.parametrize("where", list(CORRUPT_AT), ids=list(CORRUPT_AT))
@pytest.mark.parametrize(
    ("record", "start", "budget"),
    [(0, 1, 1 << 20), (3, 1, 1 << 20), (3, 11, 1 << 20), (3, 1, 24 * 10)],
    ids=["first record", "a record read whole", "a record read from inside", "a record cut"],
)
def test_a_damaged_record_is_a_storage_error_wherever_the_damage_and_the_read(
    tmp_path: Path, where: str, record: int, start: int, budget: int
) -> None:
    log = open_log(tmp_path)
    writer = SyncWriter(log)
    for _ in range(6):
        writer.batch([("damaged-1", 3)])  # session id of 9 bytes: the offsets above
    slog = log.sessions["damaged-1"]
    run = slog.event_runs[0]
    offset = run.offsets[record] + CORRUPT_AT[where] % run.lengths[record]
    with open(tmp_path / segment_name(0), "r+b") as file:
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x10]))
    with pytest.raises(StorageError, match="corrupt record"):
        position = start
        while position <= 18:
            position += log.read_events(slog, position, 18, budget)[1]
    log.close()


def test_a_read_stops_at_a_gap_of_events_that_were_never_stored(tmp_path: Path) -> None:
    """A batch the disk refused leaves a hole in the session's numbering: reads return the
    events before it, report the hole itself, and go on after it."""
    log = open_log(tmp_path)
    writer = SyncWriter(log)
    writer.batch([("gapped-session", 1)])
    writer.batch([("gapped-session", 2)])
    writer.next_event["gapped-session"] += 2  # events 4 and 5 never reached the log
    writer.batch([("gapped-session", 1)])
    writer.batch([("gapped-session", 3)])
    slog = log.sessions["gapped-session"]
    logged = writer.logged["gapped-session"]
    assert log.read_events(slog, 1, 9, 1 << 20) == (b"".join(logged[:3]), 3)
    assert log.read_events(slog, 2, 9, 1 << 20) == (b"".join(logged[1:3]), 2)
    with pytest.raises(StorageError, match="event 4 is not in the log"):
        log.read_events(slog, 4, 9, 1 << 20)
    assert log.read_events(slog, 6, 9, 1 << 20) == (b"".join(logged[3:]), 4)
    log.close()


@pytest.mark.parametrize("per_record", [1, 4])
def test_reads_between_appends_see_each_new_record_of_a_growing_run(
    tmp_path: Path, per_record: int
) -> None:
    """A live session is read while its run in the open segment grows: the running totals
    a first read built are extended, never stale."""
    log = open_log(tmp_path)
    writer = SyncWriter(log, size=lambda number: 20 + number % 7 * 30)
    for _ in range(12):
        writer.batch([("growing-session", per_record), ("other-session", 1)])
        events = writer.logged["growing-session"]
        for start in range(1, len(events) + 1):
            for budget in (1, 100, 1 << 20):
                check_read(log, "growing-session", events, start, len(events), budget)
    assert len(log.segments) == 1
    log.close()
