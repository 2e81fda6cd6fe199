"""The log engine under the disk store: it owns the write buffer, frames every record into
it (`append_*`, the one place a `Pending` is built), writes it (`write`), seals rolled
segments, deletes, recovers, reads and reclaims.

Everything here is synchronous and knows nothing of asyncio, so each step can be tested (and
reasoned about) one call at a time; `disk.py` decides *when* these calls run and on which
thread. Record bytes are `records.py`'s, the index is `index.py`'s; the layout and the
deletion rules are in FORMAT.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
import time
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import repeat
from operator import sub
from pathlib import Path
from typing import Any, NamedTuple

from proxy.storage.base import SessionInfo, SessionMeta, StorageError
from proxy.storage.codec import encode_meta, ends_view
from proxy.storage.index import (
    Pending,
    Run,
    Segment,
    SessionLog,
    apply_run,
    decode_index,
    encode_index,
    index_written,
    scan_segment,
)
from proxy.storage.records import (
    ALIAS,
    CRC,
    DELETE,
    END,
    EVENTS,
    EVENTS_FIXED,
    HEADER,
    MIN_MAX_RECORD,
    OPEN,
    frame_alias,
    frame_delete,
    frame_end,
    frame_events,
    frame_open,
)
from proxy.storage.tail import take_events

logger = logging.getLogger("proxy.storage")

_SEGMENT_NAME = re.compile(r"(\d{20})\.log\Z")
_READ_FDS = 64  # read descriptors kept open for sealed segments
# Room a batch's framing takes beyond its bytes and ends (header, id, fixed fields).
_EVENTS_OVERHEAD = 160
# A read whose records lie on average farther apart than this is sparse (`_read_sparse`):
# it preads clusters of records at most this far apart, at most SPARSE_READS of them. A
# pread and its pass through `_events_from` cost about what copying 64 KiB does, so records
# closer than that are cheaper to read together, the other sessions' bytes between them too;
# a dense read takes one pread of at most 4 x its budget + SPARSE_GAP.
SPARSE_GAP = 64 * 1024
SPARSE_READS = 1024


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


def segment_bases(directory: Path) -> list[int]:
    """The bases of the segment files in a data dir, in log order (FORMAT.md's names)."""
    names = os.listdir(directory)
    return sorted(int(match.group(1)) for name in names if (match := _SEGMENT_NAME.match(name)))


# --- the log --------------------------------------------------------------------------


class WriteResult(NamedTuple):
    records: list[Pending]  # every record the write took from the buffer, in order
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
        self._directory_fd = -1
        self._directory_dirty = False  # a segment was created since the last directory fsync
        # The write buffer: records framed by `append_*`, written together by `write`.
        self.buf = bytearray()
        self.pending: list[Pending] = []

    # appending: frame into the buffer; nothing touches the disk until `write`

    def open_session(self, meta: SessionMeta) -> SessionLog:
        """A new session incarnation in the index, and its OPEN record in the buffer."""
        session_id = meta.session_id
        info = SessionInfo(meta=meta, updated_ns=meta.created_ns)
        slog = self.sessions[session_id] = SessionLog(session_id, info)
        meta_json = encode_meta(meta)
        start = len(self.buf)
        length = frame_open(self.buf, slog.key, meta_json)
        self.pending.append(Pending(OPEN, slog, start, length, 0, 0, meta.created_ns, 0, meta_json))
        return slog

    def append_events(
        self, slog: SessionLog, first_event: int, data: bytes, ends: Sequence[int], arrival_ns: int
    ) -> int:
        """Frame one batch; returns the bytes now buffered (the caller's cue to write)."""
        if len(data) + 4 * len(ends) + _EVENTS_OVERHEAD > self.max_record:
            raise StorageError(
                f"session {slog.session_id}: a batch of {len(data)} bytes is too big"
            )
        buf = self.buf
        start = len(buf)
        length = frame_events(buf, slog.key, first_event, arrival_ns, ends, data)
        self.pending.append(
            Pending(
                EVENTS, slog, start, length, first_event, len(ends), arrival_ns, len(data), data
            )
        )
        return start + length

    def append_end(self, slog: SessionLog, state: str, reason: str, ended_ns: int) -> int:
        """Frame the END of a session (once: `slog.ended` marks it queued)."""
        slog.ended = True
        start = len(self.buf)
        length = frame_end(self.buf, slog.key, state, reason, ended_ns)
        self.pending.append(
            Pending(END, slog, start, length, 0, 0, ended_ns, 0, (state, reason, ended_ns))
        )
        return start + length

    def append_alias(self, slog: SessionLog, alias: str) -> int:
        """Frame an ALIAS and name the session by it at once (the alias map is the log's)."""
        info = slog.info
        assert info is not None
        start = len(self.buf)
        length = frame_alias(self.buf, slog.key, alias)
        self.pending.append(Pending(ALIAS, slog, start, length, 0, 0, 0, 0, alias))
        aliases = self.aliases
        if info.alias is not None and aliases.get(info.alias) == slog.session_id:
            del aliases[info.alias]
        info.alias = alias
        aliases[alias] = slog.session_id
        return start + length

    def append_delete(self, slog: SessionLog, deleted_ns: int, done: Any) -> int:
        """Frame a DELETE; `done` rides along to the publisher, who settles it."""
        start = len(self.buf)
        length = frame_delete(self.buf, slog.key, deleted_ns)
        self.pending.append(Pending(DELETE, slog, start, length, 0, 0, deleted_ns, 0, done))
        return start + length

    def forget(self, slog: SessionLog) -> bool:
        """Drop a session whose DELETE is durable from the index; False if already gone."""
        slog.deleted = True
        alias = slog.info.alias if slog.info is not None else None
        if alias is not None and self.aliases.get(alias) == slog.session_id:
            del self.aliases[alias]
        if self.sessions.get(slog.session_id) is not slog:
            return False
        del self.sessions[slog.session_id]
        return True

    # sealing: a rolled segment is fsynced and indexed on the fsync thread

    def seal_job(self, segment: Segment, fsync: bool) -> Callable[[], None]:
        """What the fsync thread runs for a rolled segment: fsync, then its `.idx`.

        The index is encoded there, not on the loop: a segment of 32 MiB can hold tens of
        thousands of runs. The runs are handed over whole; the segment starts a fresh list.
        """
        runs, segment.runs = segment.runs, []
        return partial(
            _encode_and_seal,
            segment.fd,
            segment.index_path,
            segment.size,
            segment.records,
            runs,
            fsync,
        )

    def sealed(self, segment: Segment) -> None:
        """The seal job ran (or failed): the write descriptor goes, reads use their own."""
        os.close(segment.fd)
        segment.fd = -1
        segment.sealed = True

    # recovery

    def recover(self) -> None:
        """Rebuild the index; truncate a torn tail of the newest segment (unless read-only)."""
        bases = segment_bases(self.directory)
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
                apply_run(self.sessions, self.aliases, run, segment)
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

    def write(self) -> WriteResult:
        """Write the buffered records (one os.write per segment touched) and empty the buffer.

        An unexpected error is logged and reported like an OSError: a bug here must not
        leave records in limbo, neither written nor refused.
        """
        buf, records = self.buf, self.pending
        self.buf, self.pending = bytearray(), []
        try:
            return self._write(buf, records)
        except Exception as exc:
            logger.exception("storage: unexpected error while writing the log")
            return WriteResult(records, 0, OSError(str(exc)), [], [])

    def _write(self, buf: bytearray, records: list[Pending]) -> WriteResult:
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
                    index_written(records[position], segment, shift)
                segment.size += chunk
                segment.records += stop - written
                self.next_record += stop - written
                if not touched or touched[-1] is not segment:
                    touched.append(segment)
                written = stop
        except OSError as exc:
            return WriteResult(records, written, exc, sealed, touched)
        finally:
            view.release()
        return WriteResult(records, written, None, sealed, touched)

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
        self._directory_dirty = True
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

    def read_events(
        self, slog: SessionLog, start_event: int, last_event: int, max_bytes: int
    ) -> tuple[bytes, int]:
        """Whole events from `start_event` (<= `last_event`) out of one segment, one pread
        (or, for records far apart, one per cluster of them: `_read_sparse`).

        Which records to read is decided from the index alone, in bisects over its running
        totals (no loop per record): those whose events fit in `max_bytes`, and the next
        one (its first events may).
        """
        which = bisect_right(slog.event_starts, start_event) - 1
        run = slog.event_runs[which] if which >= 0 else None
        batch = bisect_right(run.first_events, start_event) - 1 if run is not None else -1
        if run is None or start_event >= run.first_events[batch] + run.counts[batch]:
            raise StorageError(
                f"session {slog.session_id}: event {start_event} is not in the log "
                "(it was not stored)"
            )
        offsets, lengths = run.offsets, run.lengths
        head = HEADER.size + len(slog.key) + EVENTS_FIXED.size
        totals = run.running_totals(head)
        event_totals = totals[0]
        origin = offsets[batch]
        limit = bisect_right(run.first_events, last_event)
        fit = bisect_right(event_totals, event_totals[batch] + max_bytes, batch, limit + 1) - 1
        stop = min(fit + 1, limit)
        span = offsets[stop - 1] + lengths[stop - 1] - origin
        count_totals = totals[1]
        records = (
            event_totals[stop]
            - event_totals[batch]
            + head * (stop - batch)
            + 4 * (count_totals[stop] - count_totals[batch])
        )
        segment = self.segments[run.segment]
        if span - records > SPARSE_GAP * (stop - batch - 1):
            return self._read_sparse(
                segment, run, totals, batch, stop, head, start_event, last_event, max_bytes
            )
        near = bisect_right(offsets, origin + 4 * max_bytes + SPARSE_GAP, batch + 1, stop)
        stop = min(stop, near)
        raw = self._pread(segment, origin, offsets[stop - 1] + lengths[stop - 1] - origin)
        return _events_from(
            raw,
            origin,
            run,
            totals,
            batch,
            stop,
            head,
            segment.path,
            start_event,
            last_event,
            max_bytes,
        )

    def _read_sparse(
        self,
        segment: Segment,
        run: Run,
        totals: tuple[array[int], array[int]],
        batch: int,
        stop: int,
        head: int,
        start_event: int,
        last_event: int,
        max_bytes: int,
    ) -> tuple[bytes, int]:
        """`read_events` for a session whose records lie far apart in the segment (many
        sessions streamed at once, their records interleaved): one pread per cluster of
        records no more than SPARSE_GAP apart, instead of one that reads mostly the other
        sessions' bytes. A cluster after the first starts only with a record that fits the
        budget whole; gaps and `last_event` are `_events_from`'s, as for one pread."""
        offsets, lengths, first_events = run.offsets, run.lengths, run.first_events
        event_totals = totals[0]
        parts: list[bytes] = []
        next_event, budget, position = start_event, max_bytes, batch
        for _ in range(SPARSE_READS):
            if position >= stop:
                break
            if parts and event_totals[position + 1] - event_totals[position] > budget:
                break  # `_events_from` would take its first event whatever the budget
            origin = offsets[position]
            reach = origin + 4 * max_bytes + SPARSE_GAP  # one pread reads at most this far
            end = position + 1
            while (
                end < stop
                and offsets[end] - offsets[end - 1] - lengths[end - 1] <= SPARSE_GAP
                and offsets[end] + lengths[end] <= reach
            ):
                end += 1
            raw = self._pread(segment, origin, offsets[end - 1] + lengths[end - 1] - origin)
            data, taken = _events_from(
                raw,
                origin,
                run,
                totals,
                position,
                end,
                head,
                segment.path,
                next_event,
                last_event,
                budget,
            )
            if not taken:
                break
            parts.append(data)
            next_event += taken
            budget -= len(data)
            if next_event != first_events[end - 1] + run.counts[end - 1]:
                break  # the cluster was cut (budget, last_event or a gap)
            position = end
        return b"".join(parts), next_event - start_event

    def _pread(self, segment: Segment, origin: int, span: int) -> bytes:
        try:
            raw = osio.pread(self._read_fd(segment), span, origin)
        except OSError as exc:
            raise StorageError(f"cannot read {segment.path}: {exc.strerror or exc}") from exc
        if len(raw) != span:
            raise StorageError(f"{segment.path} is shorter than its index says")
        return raw

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

    def take_directory_fd(self) -> int | None:
        """The data dir's descriptor when a segment was created since the last call, for the
        next fsync to cover: a new file's name is durable only once its directory is synced
        (POSIX; without it a power cut may drop a whole fsynced segment)."""
        if not self._directory_dirty:
            return None
        if self._directory_fd < 0:
            self._directory_fd = osio.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        self._directory_dirty = False
        return self._directory_fd

    def close(self) -> None:
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        if self._directory_fd >= 0:
            os.close(self._directory_fd)
            self._directory_fd = -1
        for segment in self.segments.values():
            if segment.fd >= 0:
                os.close(segment.fd)
                segment.fd = -1
        self.current = None


def _events_from(
    raw: bytes,
    origin: int,
    run: Run,
    totals: tuple[array[int], array[int]],
    batch: int,
    stop: int,
    head: int,
    path: Path,
    start_event: int,
    last_event: int,
    max_bytes: int,
) -> tuple[bytes, int]:
    """Check each record's checksum and cut whole events out of `raw` (records batch..stop,
    read from `origin`).

    A replay spends its time here, so the records taken whole (all but perhaps the first and
    the last of a read) are chosen from the index first (`_whole_until`: no gap, none past
    `last_event`, within the budget), then go through a loop that does per record only what
    cannot be done for all at once: check the checksum and slice out the events, whose start
    is known from the index (header, id, fixed fields, 4 bytes per event). The checksum
    covers the header, so a record whose length or type is not the index's fails it. A
    record cut by `start_event`, `last_event` or the budget is read through its own event
    ends (`_part_of`).
    """
    view = memoryview(raw)
    parts: list[bytes | memoryview] = []
    budget = max_bytes
    next_event = start_event
    position = batch
    first_events, counts, lengths = run.first_events, run.counts, run.lengths
    if first_events[batch] < start_event:  # a resume inside a batch: its first events go
        next_event, budget = _part_of(
            raw, view, origin, run, batch, head, path, parts, next_event, last_event, budget
        )
        if next_event <= min(first_events[batch] + counts[batch] - 1, last_event):
            return b"".join(parts), next_event - start_event
        position += 1
    whole = _whole_until(run, totals, position, stop, next_event, last_event, budget)
    if whole > position:
        stored = CRC.unpack_from
        crc32 = zlib.crc32
        append = parts.append
        events = totals[0][whole] - totals[0][position]
        # The join copies the events out either way; slicing `raw` copies them once more,
        # which is cheaper than the join's buffer lookup per part only for small parts.
        source = view if events > 1024 * (whole - position) else raw
        for pos, length, count in zip(
            map(sub, run.offsets[position:whole], repeat(origin)),
            lengths[position:whole],
            counts[position:whole],
            strict=True,
        ):
            end = pos + length
            if crc32(view[pos + 4 : end]) != stored(raw, pos)[0]:
                raise StorageError(f"corrupt record in {path} at byte {origin + pos}")
            append(source[pos + head + 4 * count : end])
        next_event = first_events[whole - 1] + counts[whole - 1]
        budget -= events
    if whole < stop and first_events[whole] == next_event and next_event <= last_event:
        next_event, budget = _part_of(
            raw, view, origin, run, whole, head, path, parts, next_event, last_event, budget
        )
    return b"".join(parts), next_event - start_event


def _whole_until(
    run: Run,
    totals: tuple[array[int], array[int]],
    position: int,
    stop: int,
    next_event: int,
    last_event: int,
    budget: int,
) -> int:
    """The end of the records from `position` that a read takes whole: the first is event
    `next_event`, no gap follows (events that were never stored), none goes past
    `last_event`, and their events fit in `budget`.

    Each test is a few lookups in the index; whether records position..j all qualify only
    gets truer as j shrinks, so when `stop` is too far a bisection finds j.
    """
    first_events, counts = run.first_events, run.counts
    event_totals, count_totals = totals

    def whole(end: int) -> bool:
        last = first_events[end - 1] + counts[end - 1] - 1
        return (
            first_events[position] == next_event
            and last <= last_event
            and last - next_event + 1 == count_totals[end] - count_totals[position]
            and event_totals[end] - event_totals[position] <= budget
        )

    if stop == position or whole(stop):
        return stop
    return bisect_right(range(position + 1, stop), False, key=lambda end: not whole(end)) + position


def _part_of(
    raw: bytes,
    view: memoryview,
    origin: int,
    run: Run,
    position: int,
    head: int,
    path: Path,
    parts: list[bytes | memoryview],
    start_event: int,
    last_event: int,
    budget: int,
) -> tuple[int, int]:
    """The events of one record from `start_event` on that fit the budget (at least one if
    `parts` is empty), checked and added to `parts`; returns (next event, budget left)."""
    pos = run.offsets[position] - origin
    length = run.lengths[position]
    crc, size, rtype = HEADER.unpack_from(raw, pos)
    end = pos + length
    if rtype != EVENTS or size + HEADER.size != length or zlib.crc32(view[pos + 4 : end]) != crc:
        raise StorageError(f"corrupt record in {path} at byte {origin + pos}")
    ends_start = pos + head
    data_start = ends_start + 4 * run.counts[position]
    ends = ends_view(view[ends_start:data_start])
    first = run.first_events[position]
    lo, hi, taken = take_events(ends, first, start_event, last_event, budget, len(parts))
    if taken:
        parts.append(raw[data_start + lo : data_start + hi])
    return start_event + taken, budget - (hi - lo)


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


def _encode_and_seal(
    fd: int, index_path: Path, size: int, records: int, runs: list[Run], fsync: bool
) -> None:
    """Runs in the fsync thread at roll: the segment is trusted only once it is synced."""
    index = encode_index(size, records, runs)
    if fsync:
        osio.fsync(fd)
    write_index(index_path, index)
