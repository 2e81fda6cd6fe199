"""The segmented log under the disk store: record framing, segments, recovery, the index.

Everything here is synchronous and knows nothing of asyncio, so each step can be tested (and
reasoned about) one call at a time; `disk.py` decides *when* these calls run and on which
thread. The byte layout and the deletion rules are in FORMAT.md, which this module implements.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import re
import struct
import sys
import time
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, NamedTuple

from proxy.storage.base import SessionInfo, SessionMeta, StorageError

logger = logging.getLogger("proxy.storage")

HEADER = struct.Struct("<IIB")  # crc32 over (length, type, payload), payload length, type
OPEN, EVENTS, END, DELETE, ALIAS = 1, 2, 3, 4, 5
RECORD_TYPES = frozenset((OPEN, EVENTS, END, DELETE, ALIAS))
_LENGTH_TYPE = struct.Struct("<IB")
_CRC = struct.Struct("<I")
_U32 = struct.Struct("<I")
_EVENTS_FIXED = struct.Struct("<QIQ")  # first_event, count, arrival_ns
_U64 = struct.Struct("<Q")
# The smallest limit on one record's payload; a batch is one upstream read, far below it.
MIN_MAX_RECORD = 16 * 1024 * 1024
_SEGMENT_NAME = re.compile(r"(\d{20})\.log\Z")
_READ_FDS = 64  # read descriptors kept open for sealed segments
_LITTLE_ENDIAN = sys.byteorder == "little"


class _OsCalls:
    """The OS calls the log makes, behind one object so tests can inject ENOSPC or EIO
    without patching the `os` module the event loop itself relies on."""

    def __init__(self) -> None:
        self.open: Callable[..., int] = os.open
        self.write: Callable[[int, Any], int] = os.write
        self.pread: Callable[[int, int, int], bytes] = os.pread
        self.fsync: Callable[[int], None] = os.fsync
        self.ftruncate: Callable[[int, int], None] = os.ftruncate


osio = _OsCalls()


def segment_name(base: int) -> str:
    return f"{base:020d}.log"


# --- record framing ---------------------------------------------------------------------


def session_key(session_id: str) -> bytes:
    """The length-prefixed id every record payload starts with (ids are ASCII, <= 128)."""
    raw = session_id.encode("ascii")
    return bytes((len(raw),)) + raw


def _frame(buf: bytearray, rtype: int, parts: Sequence[bytes]) -> int:
    """Append one record to `buf`; returns its size on disk, header included."""
    length = 0
    for part in parts:
        length += len(part)
    length_type = _LENGTH_TYPE.pack(length, rtype)
    crc = zlib.crc32(length_type)
    for part in parts:
        crc = zlib.crc32(part, crc)
    buf += _CRC.pack(crc)
    buf += length_type
    for part in parts:
        buf += part
    return HEADER.size + length


def ends_bytes(ends: Sequence[int]) -> bytes:
    """The packed little-endian u32 array of event end offsets."""
    packed = ends if isinstance(ends, array) and ends.typecode == "I" else array("I", ends)
    if not _LITTLE_ENDIAN:
        packed = array("I", packed)
        packed.byteswap()
    return packed.tobytes()


def frame_events(
    buf: bytearray,
    key: bytes,
    first_event: int,
    arrival_ns: int,
    ends: Sequence[int],
    data: bytes,
) -> int:
    """The hot-path record: framed in one pass (one join, two crc32 calls, one header pack)."""
    count = len(ends)
    packed_ends = _U32.pack(ends[0]) if count == 1 else ends_bytes(ends)
    payload = b"".join((key, _EVENTS_FIXED.pack(first_event, count, arrival_ns), packed_ends, data))
    length = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(_LENGTH_TYPE.pack(length, EVENTS)))
    buf += HEADER.pack(crc, length, EVENTS)
    buf += payload
    return HEADER.size + length


def encode_meta(meta: SessionMeta) -> bytes:
    """JSON of the meta; fields listed by hand because `dataclasses.asdict` deep-copies
    recursively, which showed up per stream in the relay's profile."""
    values = {name: getattr(meta, name) for name in _META_FIELDS}
    return json.dumps(values, separators=(",", ":")).encode()


_META_FIELDS = tuple(item.name for item in dataclass_fields(SessionMeta))


def decode_meta(raw: bytes) -> SessionMeta:
    fields = json.loads(raw)
    fields["headers"] = tuple((str(k), str(v)) for k, v in fields["headers"])
    return SessionMeta(**fields)


def frame_open(buf: bytearray, key: bytes, meta_json: bytes) -> int:
    return _frame(buf, OPEN, (key, meta_json))


def frame_end(buf: bytearray, key: bytes, state: str, reason: str, ended_ns: int) -> int:
    text = json.dumps([state, reason], separators=(",", ":")).encode()
    return _frame(buf, END, (key, _U64.pack(ended_ns), text))


def frame_delete(buf: bytearray, key: bytes, deleted_ns: int) -> int:
    return _frame(buf, DELETE, (key, _U64.pack(deleted_ns)))


def frame_alias(buf: bytearray, key: bytes, alias: str) -> int:
    return _frame(buf, ALIAS, (key, alias.encode("ascii")))


def _ends_view(raw: memoryview) -> Sequence[int]:
    if _LITTLE_ENDIAN:
        return raw.cast("I")
    ends = array("I", raw.tobytes())
    ends.byteswap()
    return ends


def take_events(
    ends: Sequence[int], first: int, start_event: int, last_event: int, budget: int, have: int
) -> tuple[int, int, int]:
    """Which events of one batch a read returns: (byte start, byte end, event count).

    Events before `start_event` or after `last_event` (the readable end) are left out; whole
    events are taken while they fit in `budget` bytes, but at least one when the read has
    none yet (`have` == 0), so a single event larger than the budget still makes progress.
    """
    skip = start_event - first if start_event > first else 0
    stop = min(len(ends), last_event - first + 1)
    if skip >= stop:
        return 0, 0, 0
    lo = ends[skip - 1] if skip else 0
    fit = bisect_right(ends, lo + budget, skip, stop)
    if fit == skip:
        if have:
            return lo, lo, 0
        fit = skip + 1
    return lo, ends[fit - 1], fit - skip


# --- the index ------------------------------------------------------------------------


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

    def columns(self) -> tuple[array[int], ...]:
        return (self.first_events, self.counts, self.offsets, self.lengths, self.arrivals)


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


_INDEX_MAGIC = b"RPIDX2" + (b"L\0" if _LITTLE_ENDIAN else b"B\0")
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
    out += _CRC.pack(zlib.crc32(out))
    return bytes(out)


def decode_index(data: bytes, segment: int) -> tuple[int, int, list[Run]]:
    """(segment size, records, runs); ValueError for anything but a whole, valid index."""
    if len(data) < _INDEX_HEAD.size + 4 or _CRC.unpack_from(data, len(data) - 4)[0] != (
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


# --- scanning -------------------------------------------------------------------------


class ScanResult(NamedTuple):
    runs: list[Run]
    size: int  # bytes of whole, valid records from the start
    records: int
    problem: str | None  # why the scan stopped before the end of the file


def scan_segment(path: Path, base: int, max_record: int) -> ScanResult:
    """Read a segment to its end or its first invalid record, checking every checksum."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return ScanResult([], 0, 0, None)
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _scan(mm, base, max_record)


def _scan(mm: mmap.mmap, base: int, max_record: int) -> ScanResult:
    runs: list[Run] = []
    current: dict[bytes, Run] = {}
    unpack_header = HEADER.unpack_from
    unpack_fixed = _EVENTS_FIXED.unpack_from
    crc32 = zlib.crc32
    pos = records = 0
    total = len(mm)
    problem = None
    while pos < total:
        if total - pos < HEADER.size:
            problem = f"torn record header at byte {pos}"
            break
        crc, length, rtype = unpack_header(mm, pos)
        if rtype not in RECORD_TYPES or length < 2 or length > max_record:
            problem = f"invalid record header at byte {pos}"
            break
        end = pos + HEADER.size + length
        if end > total:
            problem = f"torn record at byte {pos}"
            break
        if crc32(mm[pos + 4 : end]) != crc:
            problem = f"checksum mismatch at byte {pos}"
            break
        body = pos + HEADER.size + 1 + mm[pos + HEADER.size]
        key = mm[pos + HEADER.size : body]
        try:
            if body > end:
                raise ValueError("session id overruns the record")
            if rtype == EVENTS:
                first, count, arrival = unpack_fixed(mm, body)
                data_start = body + _EVENTS_FIXED.size + 4 * count
                if data_start > end:
                    raise ValueError("event offsets overrun the record")
                run = current.get(key)
                if run is None:
                    run = current[key] = Run(key[1:].decode("ascii"), base)
                    runs.append(run)
                run.first_events.append(first)
                run.counts.append(count)
                run.offsets.append(pos)
                run.lengths.append(end - pos)
                run.arrivals.append(arrival)
                run.event_bytes += end - data_start
                run.updated_ns = arrival
            elif rtype == OPEN:
                meta = mm[body:end]
                decode_meta(meta)
                run = current[key] = Run(key[1:].decode("ascii"), base, meta=meta)
                runs.append(run)
            elif rtype == ALIAS:
                alias = mm[body:end].decode("ascii")
                if not alias:
                    raise ValueError("empty alias")
                run = current.get(key)
                if run is None:
                    run = current[key] = Run(key[1:].decode("ascii"), base)
                    runs.append(run)
                run.alias = alias
            else:
                (stamp,) = _U64.unpack_from(mm, body)
                run = current.get(key)
                if run is None:
                    run = current[key] = Run(key[1:].decode("ascii"), base)
                    runs.append(run)
                if rtype == END:
                    state, reason = json.loads(mm[body + 8 : end])
                    run.end = (state, reason, stamp)
                else:
                    run.deleted = True
                run.updated_ns = stamp
        except (ValueError, TypeError, KeyError, struct.error) as exc:
            problem = f"malformed record at byte {pos}: {exc}"
            break
        records += 1
        pos = end
    return ScanResult(runs, pos, records, problem)


# --- the log --------------------------------------------------------------------------


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


class WriteResult(NamedTuple):
    written: int  # records at the front of the batch that are now in the log
    error: OSError | None  # why the rest were not written
    sealed: list[Segment]  # segments rolled away in this write, to fsync and index
    touched: list[Segment]  # segments written to


class Log:
    """Segments on disk plus the in-memory index of every session's records."""

    def __init__(self, directory: Path, segment_bytes: int, *, read_only: bool = False) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.read_only = read_only
        self.max_record = max(segment_bytes, MIN_MAX_RECORD)
        self.sessions: dict[str, SessionLog] = {}  # live sessions by id
        self.aliases: dict[str, str] = {}  # alias -> id of the live session it names
        self.segments: dict[int, Segment] = {}  # by base, ascending
        self.current: Segment | None = None
        self.next_record = 0
        self._read_fds: OrderedDict[int, int] = OrderedDict()
        self._broken = False  # the current segment may hold a torn tail: roll before writing
        self.unsynced: list[Path] = []  # segments recovery scanned: maybe never fsynced

    # recovery

    def recover(self) -> None:
        """Rebuild the index; truncate a torn tail of the newest segment (unless read-only)."""
        bases = sorted(
            int(match.group(1))
            for name in os.listdir(self.directory)
            if (match := _SEGMENT_NAME.match(name))
        )
        if not self.read_only:
            self._remove_stale_indexes(set(bases))
        for position, base in enumerate(bases):
            newest = position == len(bases) - 1
            segment = Segment(base, self.directory / segment_name(base))
            runs = None if newest else self._load_index(segment)
            if runs is None:
                # No valid index: the newest segment, or one whose seal (fsync, then index)
                # an earlier process did not finish.
                runs = self._scan(segment, newest)
                self.unsynced.append(segment.path)
            if newest:
                # It becomes current again: its index, written when it is sealed, must list
                # what earlier runs of the proxy wrote to it, not only what this one adds.
                segment.runs = runs
            self.segments[base] = segment
            for run in runs:
                self._apply(run, segment)
        for session_id in [sid for sid, slog in self.sessions.items() if slog.deleted]:
            del self.sessions[session_id]
        self.aliases = {
            alias: session_id
            for alias, session_id in self.aliases.items()
            if (slog := self.sessions.get(session_id)) is not None
            and slog.info is not None
            and slog.info.alias == alias
        }
        if bases:
            newest_segment = self.segments[bases[-1]]
            self.next_record = newest_segment.base + newest_segment.records
            if not self.read_only:
                newest_segment.fd = osio.open(
                    newest_segment.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
                )
                newest_segment.sealed = False
                self.current = newest_segment

    def _remove_stale_indexes(self, bases: set[int]) -> None:
        for name in os.listdir(self.directory):
            stem, _, suffix = name.partition(".")
            stale = suffix == "idx.tmp" or (
                suffix == "idx" and (not stem.isdigit() or int(stem) not in bases)
            )
            if stale:
                (self.directory / name).unlink(missing_ok=True)

    def _load_index(self, segment: Segment) -> list[Run] | None:
        try:
            data = segment.index_path.read_bytes()
            size, records, runs = decode_index(data, segment.base)
            if size != segment.path.stat().st_size:
                return None
        except (OSError, ValueError, UnicodeDecodeError, struct.error):
            return None
        segment.size, segment.records = size, records
        return runs

    def _scan(self, segment: Segment, newest: bool) -> list[Run]:
        result = scan_segment(segment.path, segment.base, self.max_record)
        segment.records = result.records
        segment.size = result.size if newest else segment.path.stat().st_size
        if result.problem and newest:
            logger.warning(
                "storage: %s: %s; dropping the torn tail (%d bytes kept)",
                segment.path,
                result.problem,
                result.size,
            )
            if not self.read_only:
                os.truncate(segment.path, result.size)
        elif result.problem:
            logger.error(
                "storage: %s: %s in a sealed segment; keeping the %d bytes before it and "
                "ignoring the rest of this segment",
                segment.path,
                result.problem,
                result.size,
            )
        elif not newest and not self.read_only:
            write_index(segment.index_path, encode_index(result.size, result.records, result.runs))
        return result.runs

    def _apply(self, run: Run, segment: Segment) -> None:
        slog = self.sessions.get(run.session_id)
        if run.meta is not None:
            try:
                meta = decode_meta(run.meta)
            except (ValueError, TypeError, KeyError) as exc:
                logger.error("storage: %s: unreadable session metadata: %s", segment.path, exc)
                meta = None
            info = None if meta is None else SessionInfo(meta=meta, updated_ns=meta.created_ns)
            slog = self.sessions[run.session_id] = SessionLog(run.session_id, info)
            slog.deleted = info is None
        elif slog is None:
            slog = self.sessions[run.session_id] = SessionLog(run.session_id, None, deleted=True)
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
                self.aliases[run.alias] = run.session_id
            info.updated_ns = max(info.updated_ns, run.updated_ns)
        if run.deleted:
            slog.deleted = True

    # writing

    def write(self, buf: bytearray, records: Sequence[Pending]) -> WriteResult:
        """Write the framed records in `buf` (one os.write per segment touched)."""
        sealed: list[Segment] = []
        touched: list[Segment] = []
        written = 0
        view = memoryview(buf)
        try:
            total = len(records)
            while written < total:
                segment = self._segment_for(records[written].length, sealed)
                chunk_start = records[written].start
                stop = written + 1
                chunk = records[written].length
                while (
                    stop < total
                    and segment.size + chunk + records[stop].length <= self.segment_bytes
                ):
                    chunk += records[stop].length
                    stop += 1
                self._write_all(segment, view[chunk_start : chunk_start + chunk])
                shift = segment.size - chunk_start
                for position in range(written, stop):
                    self._index(records[position], segment, shift)
                segment.size += chunk
                segment.records += stop - written
                self.next_record += stop - written
                if not touched or touched[-1] is not segment:
                    touched.append(segment)
                written = stop
        except OSError as exc:
            return WriteResult(written, exc, sealed, touched)
        finally:
            view.release()
        return WriteResult(written, None, sealed, touched)

    def _segment_for(self, length: int, sealed: list[Segment]) -> Segment:
        current = self.current
        if (
            current is not None
            and not self._broken
            and (current.size == 0 or current.size + length <= self.segment_bytes)
        ):
            return current
        segment = Segment(self.next_record, self.directory / segment_name(self.next_record))
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC | os.O_CLOEXEC
        segment.fd = osio.open(segment.path, flags, 0o600)
        segment.sealed = False
        if current is not None:
            if current.base == segment.base:  # a broken segment that never took a record
                os.close(current.fd)
                del self.segments[current.base]
            else:
                sealed.append(current)
        self.segments[segment.base] = segment
        self.current = segment
        self._broken = False
        return segment

    def _write_all(self, segment: Segment, data: memoryview) -> None:
        done = 0
        try:
            while done < len(data):
                done += osio.write(segment.fd, data[done:])
        except OSError:
            try:
                osio.ftruncate(segment.fd, segment.size)
            except OSError:
                self._broken = True
            raise

    def _index(self, record: Pending, segment: Segment, shift: int) -> None:
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

    def read_events(
        self, slog: SessionLog, start_event: int, last_event: int, max_bytes: int
    ) -> tuple[bytes, int]:
        """Whole events from `start_event` (<= `last_event`) out of one segment, one pread."""
        which = bisect_right(slog.event_starts, start_event) - 1
        run = slog.event_runs[which] if which >= 0 else None
        batch = bisect_right(run.first_events, start_event) - 1 if run is not None else -1
        if run is None or start_event >= run.first_events[batch] + run.counts[batch]:
            raise StorageError(
                f"session {slog.session_id}: event {start_event} is not in the log "
                "(it was not stored)"
            )
        offsets, lengths = run.offsets, run.lengths
        origin = offsets[batch]
        stop = batch + 1
        limit = bisect_right(run.first_events, last_event)
        wanted = lengths[batch]
        while stop < limit and wanted < max_bytes:
            span = offsets[stop] + lengths[stop] - origin
            if span > 4 * max_bytes + 65536:
                break
            wanted += lengths[stop]
            stop += 1
        span = offsets[stop - 1] + lengths[stop - 1] - origin
        segment = self.segments[run.segment]
        try:
            raw = osio.pread(self._read_fd(segment), span, origin)
        except OSError as exc:
            raise StorageError(f"cannot read {segment.path}: {exc.strerror or exc}") from exc
        if len(raw) != span:
            raise StorageError(f"{segment.path} is shorter than its index says")
        return _events_from(
            raw,
            origin,
            offsets,
            lengths,
            batch,
            stop,
            segment.path,
            start_event,
            last_event,
            max_bytes,
        )

    def _read_fd(self, segment: Segment) -> int:
        if segment.fd >= 0:
            return segment.fd
        fd = self._read_fds.get(segment.base)
        if fd is not None:
            self._read_fds.move_to_end(segment.base)
            return fd
        fd = osio.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
        self._read_fds[segment.base] = fd
        if len(self._read_fds) > _READ_FDS:
            os.close(self._read_fds.popitem(last=False)[1])
        return fd

    # reclaiming

    def total_bytes(self) -> int:
        return sum(segment.size for segment in self.segments.values())

    def reclaim(self, candidates: Iterable[Segment]) -> int:
        """Unlink sealed segments that hold only deleted sessions; returns bytes freed.

        A segment holding a session's DELETE record goes only after every older segment of
        that session: otherwise a restart would find the OPEN without the DELETE and bring
        the session back.
        """
        freed = 0
        for segment in sorted(set(candidates), key=lambda s: s.base):
            if (
                segment is self.current
                or not segment.sealed
                or segment.base not in self.segments
                or not all(holder.deleted for holder in segment.holders)
                or any(
                    holder.runs[-1].segment == segment.base
                    and holder.runs[-1].deleted
                    and len(holder.runs) > 1
                    for holder in segment.holders
                )
            ):
                continue
            try:
                segment.path.unlink()
                segment.index_path.unlink(missing_ok=True)
            except OSError as exc:
                logger.error("storage: cannot remove %s: %s", segment.path, exc.strerror)
                continue
            fd = self._read_fds.pop(segment.base, None)
            if fd is not None:
                os.close(fd)
            del self.segments[segment.base]
            freed += segment.size
            for holder in segment.holders:
                holder.runs = [run for run in holder.runs if run.segment != segment.base]
            segment.holders.clear()
        return freed

    def close(self) -> None:
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        for segment in self.segments.values():
            if segment.fd >= 0:
                os.close(segment.fd)
                segment.fd = -1
        self.current = None


def _events_from(
    raw: bytes,
    origin: int,
    offsets: array[int],
    lengths: array[int],
    batch: int,
    stop: int,
    path: Path,
    start_event: int,
    last_event: int,
    max_bytes: int,
) -> tuple[bytes, int]:
    """Check each record's checksum and cut whole events out of `raw` (records batch..stop)."""
    view = memoryview(raw)
    parts = []
    events = 0
    budget = max_bytes
    for position in range(batch, stop):
        pos = offsets[position] - origin
        crc, length, rtype = HEADER.unpack_from(raw, pos)
        end = pos + HEADER.size + length
        if (
            rtype != EVENTS
            or end - pos != lengths[position]
            or zlib.crc32(view[pos + 4 : end]) != crc
        ):
            raise StorageError(f"corrupt record in {path} at byte {offsets[position]}")
        body = pos + HEADER.size + 1 + raw[pos + HEADER.size]
        first, count, _ = _EVENTS_FIXED.unpack_from(raw, body)
        data_start = body + _EVENTS_FIXED.size + 4 * count
        if first > start_event and events:
            break  # a gap: events that were never stored; the next read reports it
        if first == start_event and first + count - 1 <= last_event and end - data_start <= budget:
            parts.append(view[data_start:end])  # the common case: the whole batch
            events += count
            budget -= end - data_start
            if first + count - 1 == last_event:
                break
            start_event = first + count
            continue
        ends = _ends_view(view[body + _EVENTS_FIXED.size : data_start])
        lo, hi, taken = take_events(ends, first, start_event, last_event, budget, events)
        if taken:
            parts.append(view[data_start + lo : data_start + hi])
            events += taken
            budget -= hi - lo
        available = min(first + count - 1, last_event) - max(start_event, first) + 1
        if taken < available or first + count - 1 >= last_event:
            break
        start_event = first + count
    return b"".join(parts), events


def write_index(path: Path, index: bytes) -> None:
    """Write a segment's index cache atomically; failing to is only a slower next start."""
    temporary = path.with_suffix(".idx.tmp")
    try:
        temporary.write_bytes(index)
        os.replace(temporary, path)
    except OSError as exc:
        logger.warning("storage: cannot write index %s: %s", path, exc.strerror)
        temporary.unlink(missing_ok=True)


def sync_paths(paths: Sequence[Path]) -> None:
    """fsync files by path (at start-up, before recovered records are served again)."""
    for path in paths:
        fd = osio.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            osio.fsync(fd)
        finally:
            os.close(fd)


def fsync_all(fds: Sequence[int]) -> float:
    """fsync each fd; returns the seconds it took (the fsync-duration metric)."""
    started = time.perf_counter()
    for fd in fds:
        osio.fsync(fd)
    return time.perf_counter() - started


PROBE_NAME = "PROBE"
PROBE_BYTES = 64 * 1024  # room for a few batches, not just the block a failed write freed


def probe_writable(directory: Path) -> None:
    """Write and fsync PROBE_BYTES in the data dir, then remove them; OSError if the disk
    refuses. Runs off the loop, for the health check of a store whose last write failed."""
    path = directory / PROBE_NAME
    fd = osio.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if osio.write(fd, bytes(PROBE_BYTES)) != PROBE_BYTES:
            raise OSError(errno.ENOSPC, "short write to the probe file")
        osio.fsync(fd)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()


def seal_segment(fd: int, index_path: Path, index: bytes, fsync: bool) -> None:
    """Runs in the fsync thread at roll: the segment is trusted only once it is synced."""
    if fsync:
        osio.fsync(fd)
    write_index(index_path, index)
