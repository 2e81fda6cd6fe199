"""The index of the log: runs, each session's and each segment's records, the `.idx` codec.

A run is where one session incarnation's records sit in one segment, as parallel integer
columns; a `SessionLog` lists a session's runs in log order and a `Segment` the runs it
holds. Built in two ways only: by `scan_segment` (recovery) and by `Log` as it writes; read
by `Log.read_events` and `offline.py`. No file is written here.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from operator import add, mul, sub
from pathlib import Path
from typing import Any, NamedTuple

from proxy.storage.base import SessionInfo
from proxy.storage.codec import LITTLE_ENDIAN, decode_meta
from proxy.storage.records import (
    ALIAS,
    CRC,
    END,
    EVENTS,
    OPEN,
    scan_records,
    session_key,
)

logger = logging.getLogger("proxy.storage")


def _column() -> array[int]:
    return array("q")


@dataclass(slots=True, eq=False)
class Run:
    """The records of one session (one incarnation of its id) inside one segment.

    Parallel arrays, one slot per EVENTS record, so the index costs a few machine words per
    batch and no Python object per event; the same shape is what a segment's `.idx` file
    stores, so loading a sealed segment is a handful of `array.frombytes` calls.
    """

    session_id: str
    segment: int
    first_events: array[int] = field(default_factory=_column)
    counts: array[int] = field(default_factory=_column)
    offsets: array[int] = field(default_factory=_column)
    lengths: array[int] = field(default_factory=_column)
    arrivals: array[int] = field(default_factory=_column)
    event_bytes: int = 0
    meta: bytes | None = None  # OPEN payload (JSON) when the incarnation opens here
    end: tuple[str, str, int] | None = None  # END: state, reason, ended_ns
    deleted: bool = False
    alias: str | None = None  # the newest ALIAS of the incarnation in this segment
    updated_ns: int = 0
    totals: tuple[array[int], array[int]] | None = None  # see `running_totals`

    def columns(self) -> tuple[array[int], ...]:
        return (self.first_events, self.counts, self.offsets, self.lengths, self.arrivals)

    def running_totals(self, framing: int) -> tuple[array[int], array[int]]:
        """Running totals of the events' bytes and of the event counts (slot i: the records
        before record i), so a read sizes any records i..j with two subtractions and picks
        the records that fit a budget with one bisect. Built at the run's first read (a
        replay) and extended as it grows; a run never read costs nothing.

        An EVENTS record is `framing` bytes (header, id, fixed fields), 4 bytes per event,
        then its events.
        """
        totals = self.totals
        if totals is None:
            totals = self.totals = (array("q", (0,)), array("q", (0,)))
        event_bytes, counts = totals
        done = len(counts) - 1
        if done < len(self.counts):
            added = self.counts[done:]
            sizes = map(
                sub, self.lengths[done:], map(add, map(mul, added, repeat(4)), repeat(framing))
            )
            event_bytes.extend(accumulate(sizes, initial=event_bytes.pop()))
            counts.extend(accumulate(added, initial=counts.pop()))
        return totals


@dataclass(slots=True, eq=False)
class SessionLog:
    """One incarnation of a session id: its summary and where its records are.

    `info` is None for the remains of a session whose OPEN record was already reclaimed:
    such records are dead, but they still pin the reclaim order (see `Log.reclaim`).
    """

    session_id: str
    info: SessionInfo | None
    key: bytes = b""
    runs: list[Run] = field(default_factory=list)  # in log order, at most one per segment
    event_runs: list[Run] = field(default_factory=list)  # runs holding EVENTS records
    event_starts: list[int] = field(default_factory=list)  # first event of each, to bisect
    ended: bool = False  # an END was queued (its state is published once written)
    deleted: bool = False

    def __post_init__(self) -> None:
        self.key = session_key(self.session_id)

    def add_run(self, run: Run) -> None:
        self.runs.append(run)
        if len(run.first_events):
            self.event_runs.append(run)
            self.event_starts.append(run.first_events[0])


@dataclass(slots=True, eq=False)
class Segment:
    """One `.log` file. `fd` is the write descriptor while it is current or being sealed."""

    base: int
    path: Path
    size: int = 0
    records: int = 0
    fd: int = -1
    sealed: bool = True
    runs: list[Run] = field(default_factory=list)  # kept until sealed, for the index file
    holders: set[SessionLog] = field(default_factory=set)

    @property
    def index_path(self) -> Path:
        return self.path.with_suffix(".idx")


_INDEX_MAGIC = b"RPIDX2" + (b"L\0" if LITTLE_ENDIAN else b"B\0")
_INDEX_HEAD = struct.Struct("<8sQQI")  # magic, segment size, records, runs
# sid length, flags (1 meta, 2 end, 4 deleted, 8 alias), batches, event bytes, updated_ns,
# meta length, end length, alias length
_RUN_HEAD = struct.Struct("<BBIQQIII")


def encode_index(size: int, records: int, runs: Sequence[Run]) -> bytes:
    """A sealed segment's index: a cache that saves recovery from reading the segment."""
    out = bytearray(_INDEX_HEAD.pack(_INDEX_MAGIC, size, records, len(runs)))
    for run in runs:
        sid = run.session_id.encode("ascii")
        meta = run.meta or b""
        end = json.dumps(list(run.end)).encode() if run.end else b""
        alias = run.alias.encode("ascii") if run.alias is not None else b""
        flags = (
            (run.meta is not None)
            | (run.end is not None) << 1
            | run.deleted << 2
            | (run.alias is not None) << 3
        )
        out += _RUN_HEAD.pack(
            len(sid),
            flags,
            len(run.first_events),
            run.event_bytes,
            run.updated_ns,
            len(meta),
            len(end),
            len(alias),
        )
        out += sid + meta + end + alias
        for column in run.columns():
            out += column.tobytes()
    out += CRC.pack(zlib.crc32(out))
    return bytes(out)


def decode_index(data: bytes, segment: int) -> tuple[int, int, list[Run]]:
    """(segment size, records, runs); ValueError for anything but a whole, valid index."""
    if len(data) < _INDEX_HEAD.size + 4 or CRC.unpack_from(data, len(data) - 4)[0] != (
        zlib.crc32(memoryview(data)[:-4])
    ):
        raise ValueError("index checksum mismatch")
    magic, size, records, count = _INDEX_HEAD.unpack_from(data)
    if magic != _INDEX_MAGIC:
        raise ValueError("index of another version or byte order")
    pos = _INDEX_HEAD.size
    runs = []
    for _ in range(count):
        sid_len, flags, batches, event_bytes, updated_ns, meta_len, end_len, alias_len = (
            _RUN_HEAD.unpack_from(data, pos)
        )
        pos += _RUN_HEAD.size
        run = Run(data[pos : pos + sid_len].decode("ascii"), segment)
        pos += sid_len
        if flags & 1:
            run.meta = data[pos : pos + meta_len]
        pos += meta_len
        if flags & 2:
            state, reason, ended_ns = json.loads(data[pos : pos + end_len])
            run.end = (state, reason, ended_ns)
        pos += end_len
        if flags & 8:
            run.alias = data[pos : pos + alias_len].decode("ascii")
        pos += alias_len
        run.deleted = bool(flags & 4)
        run.event_bytes, run.updated_ns = event_bytes, updated_ns
        for column in run.columns():
            column.frombytes(data[pos : pos + 8 * batches])
            pos += 8 * batches
        runs.append(run)
    if pos != len(data) - 4:
        raise ValueError("index length mismatch")
    return size, records, runs


class Pending(NamedTuple):
    """A record framed into the write buffer, waiting for its write (and maybe fsync)."""

    rtype: int
    slog: SessionLog
    start: int  # offset of the record in the write buffer
    length: int  # size on disk, header included
    first_event: int
    count: int
    stamp_ns: int  # arrival_ns, ended_ns or deleted_ns
    data_len: int
    extra: Any  # OPEN: meta JSON; END: (state, reason, ended_ns); ALIAS: the alias


def index_written(record: Pending, segment: Segment, shift: int) -> None:
    """Add a record just written at `record.start + shift` of `segment` to the index."""
    slog = record.slog
    runs = slog.runs
    if runs and runs[-1].segment == segment.base:
        run = runs[-1]
    else:
        run = Run(slog.session_id, segment.base)
        runs.append(run)
        segment.runs.append(run)
        segment.holders.add(slog)
    rtype = record.rtype
    if rtype == EVENTS:
        if not run.first_events:
            slog.event_runs.append(run)
            slog.event_starts.append(record.first_event)
        run.first_events.append(record.first_event)
        run.counts.append(record.count)
        run.offsets.append(record.start + shift)
        run.lengths.append(record.length)
        run.arrivals.append(record.stamp_ns)
        run.event_bytes += record.data_len
    elif rtype == OPEN:
        run.meta = record.extra
    elif rtype == END:
        run.end = record.extra
    elif rtype == ALIAS:
        run.alias = record.extra
    else:
        run.deleted = True
    run.updated_ns = max(run.updated_ns, record.stamp_ns)


# reading


def apply_run(
    sessions: dict[str, SessionLog], aliases: dict[str, str], run: Run, segment: Segment
) -> None:
    """Fold one recovered run into the session index (recovery, in log order)."""
    slog = sessions.get(run.session_id)
    if run.meta is not None:
        try:
            meta = decode_meta(run.meta)
        except (ValueError, TypeError, KeyError) as exc:
            logger.error("storage: %s: unreadable session metadata: %s", segment.path, exc)
            meta = None
        info = None if meta is None else SessionInfo(meta=meta, updated_ns=meta.created_ns)
        slog = sessions[run.session_id] = SessionLog(run.session_id, info)
        slog.deleted = info is None
    elif slog is None:
        slog = sessions[run.session_id] = SessionLog(run.session_id, None, deleted=True)
    slog.add_run(run)
    segment.holders.add(slog)
    info = slog.info
    if info is not None and not slog.deleted:
        batches = len(run.first_events)
        if batches:
            last = run.first_events[batches - 1] + run.counts[batches - 1] - 1
            info.events = max(info.events, last)
            info.bytes += run.event_bytes
            if info.first_event_ns is None and run.first_events[0] == 1:
                info.first_event_ns = run.arrivals[0]
        if run.end is not None:
            info.state, info.reason = run.end[0], run.end[1]
            slog.ended = True
        if run.alias is not None:
            info.alias = run.alias
            aliases[run.alias] = run.session_id
        info.updated_ns = max(info.updated_ns, run.updated_ns)
    if run.deleted:
        slog.deleted = True


# writing


# --- scanning ---------------------------------------------------------------------------


class ScanResult(NamedTuple):
    runs: list[Run]
    size: int  # bytes of whole, valid records from the start
    records: int
    problem: str | None  # why the scan stopped before the end of the file


class _RunBuilder:
    """Collects the records a scan reports into one run per session key (in first-seen
    order), the same runs the writer builds for the segment."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.runs: list[Run] = []
        self._current: dict[bytes, Run] = {}

    def _run(self, key: bytes) -> Run:
        run = self._current.get(key)
        if run is None:
            run = self._current[key] = Run(key[1:].decode("ascii"), self.base)
            self.runs.append(run)
        return run

    def events(
        self, key: bytes, pos: int, end: int, first: int, count: int, arrival: int, data: int
    ) -> None:
        run = self._run(key)
        run.first_events.append(first)
        run.counts.append(count)
        run.offsets.append(pos)
        run.lengths.append(end - pos)
        run.arrivals.append(arrival)
        run.event_bytes += end - data
        run.updated_ns = arrival

    def opened(self, key: bytes, meta: bytes) -> None:
        run = self._current[key] = Run(key[1:].decode("ascii"), self.base, meta=meta)
        self.runs.append(run)

    def aliased(self, key: bytes, alias: str) -> None:
        self._run(key).alias = alias

    def ended(self, key: bytes, state: str, reason: str, ended_ns: int) -> None:
        run = self._run(key)
        run.end = (state, reason, ended_ns)
        run.updated_ns = ended_ns

    def deleted(self, key: bytes, deleted_ns: int) -> None:
        run = self._run(key)
        run.deleted = True
        run.updated_ns = deleted_ns


def scan_runs(data: bytes | memoryview, base: int, max_record: int) -> ScanResult:
    """The runs of a segment's bytes, up to its end or its first invalid record."""
    builder = _RunBuilder(base)
    size, records, problem = scan_records(data, max_record, builder)
    return ScanResult(builder.runs, size, records, problem)


def scan_segment(path: Path, base: int, max_record: int) -> ScanResult:
    """Read a segment to its end or its first invalid record, checking every checksum."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return ScanResult([], 0, 0, None)
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return scan_runs(mm, base, max_record)
