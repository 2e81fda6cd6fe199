"""Record framing and scanning: the byte layout of FORMAT.md, and nothing else.

Pure functions over bytes: no files opened, no index kept, no clock read. `log.py` frames
into its buffer with these and `index.py` turns a scan into runs, so a newcomer changing
the layout of a record changes this module (and FORMAT.md) alone.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import fields as dataclass_fields
from typing import Protocol

from proxy.storage.base import SessionMeta

HEADER = struct.Struct("<IIB")  # crc32 over (length, type, payload), payload length, type
OPEN, EVENTS, END, DELETE, ALIAS = 1, 2, 3, 4, 5
RECORD_TYPES = frozenset((OPEN, EVENTS, END, DELETE, ALIAS))
LENGTH_TYPE = struct.Struct("<IB")
CRC = struct.Struct("<I")
U32 = struct.Struct("<I")
EVENTS_FIXED = struct.Struct("<QIQ")  # first_event, count, arrival_ns
U64 = struct.Struct("<Q")
# The smallest limit on one record's payload; a batch is one upstream read, far below it.
MIN_MAX_RECORD = 16 * 1024 * 1024
LITTLE_ENDIAN = sys.byteorder == "little"


# --- framing ----------------------------------------------------------------------------


def session_key(session_id: str) -> bytes:
    """The length-prefixed id every record payload starts with (ids are ASCII, <= 128)."""
    raw = session_id.encode("ascii")
    return bytes((len(raw),)) + raw


def _frame(buf: bytearray, rtype: int, parts: Sequence[bytes]) -> int:
    """Append one record to `buf`; returns its size on disk, header included."""
    length = 0
    for part in parts:
        length += len(part)
    length_type = LENGTH_TYPE.pack(length, rtype)
    crc = zlib.crc32(length_type)
    for part in parts:
        crc = zlib.crc32(part, crc)
    buf += CRC.pack(crc)
    buf += length_type
    for part in parts:
        buf += part
    return HEADER.size + length


def ends_bytes(ends: Sequence[int]) -> bytes:
    """The packed little-endian u32 array of event end offsets."""
    packed = ends if isinstance(ends, array) and ends.typecode == "I" else array("I", ends)
    if not LITTLE_ENDIAN:
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
    packed_ends = U32.pack(ends[0]) if count == 1 else ends_bytes(ends)
    payload = b"".join((key, EVENTS_FIXED.pack(first_event, count, arrival_ns), packed_ends, data))
    length = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(LENGTH_TYPE.pack(length, EVENTS)))
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
    return _frame(buf, END, (key, U64.pack(ended_ns), text))


def frame_delete(buf: bytearray, key: bytes, deleted_ns: int) -> int:
    return _frame(buf, DELETE, (key, U64.pack(deleted_ns)))


def frame_alias(buf: bytearray, key: bytes, alias: str) -> int:
    return _frame(buf, ALIAS, (key, alias.encode("ascii")))


def ends_view(raw: memoryview) -> Sequence[int]:
    """The u32 end offsets of an EVENTS record, without a copy on little-endian hosts."""
    if LITTLE_ENDIAN:
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


# --- scanning ---------------------------------------------------------------------------


class RecordVisitor(Protocol):
    """What a scan reports, one call per whole, valid record, in log order. `key` is the
    length-prefixed session id; a visitor may raise ValueError to reject a record."""

    def events(
        self, key: bytes, pos: int, end: int, first: int, count: int, arrival: int, data: int
    ) -> None: ...

    def opened(self, key: bytes, meta: bytes) -> None: ...

    def aliased(self, key: bytes, alias: str) -> None: ...

    def ended(self, key: bytes, state: str, reason: str, ended_ns: int) -> None: ...

    def deleted(self, key: bytes, deleted_ns: int) -> None: ...


def scan_records(
    data: bytes | memoryview, max_record: int, visit: RecordVisitor
) -> tuple[int, int, str | None]:
    """Check every record of `data` from the start, reporting each to `visit`, up to the end
    or the first torn, damaged or malformed record.

    Returns (bytes of whole valid records, their count, why the scan stopped early or None).
    `data` is a segment's bytes (an mmap in practice, so nothing is copied but the parts a
    visitor keeps).
    """
    unpack_header = HEADER.unpack_from
    unpack_fixed = EVENTS_FIXED.unpack_from
    crc32 = zlib.crc32
    pos = records = 0
    total = len(data)
    problem = None
    while pos < total:
        if total - pos < HEADER.size:
            problem = f"torn record header at byte {pos}"
            break
        crc, length, rtype = unpack_header(data, pos)
        if rtype not in RECORD_TYPES or length < 2 or length > max_record:
            problem = f"invalid record header at byte {pos}"
            break
        end = pos + HEADER.size + length
        if end > total:
            problem = f"torn record at byte {pos}"
            break
        if crc32(data[pos + 4 : end]) != crc:
            problem = f"checksum mismatch at byte {pos}"
            break
        body = pos + HEADER.size + 1 + data[pos + HEADER.size]
        key = bytes(data[pos + HEADER.size : body])
        try:
            if body > end:
                raise ValueError("session id overruns the record")
            key[1:].decode("ascii")
            if rtype == EVENTS:
                first, count, arrival = unpack_fixed(data, body)
                data_start = body + EVENTS_FIXED.size + 4 * count
                if data_start > end:
                    raise ValueError("event offsets overrun the record")
                visit.events(key, pos, end, first, count, arrival, data_start)
            elif rtype == OPEN:
                meta = bytes(data[body:end])
                decode_meta(meta)
                visit.opened(key, meta)
            elif rtype == ALIAS:
                alias = bytes(data[body:end]).decode("ascii")
                if not alias:
                    raise ValueError("empty alias")
                visit.aliased(key, alias)
            else:
                (stamp,) = U64.unpack_from(data, body)
                if rtype == END:
                    state, reason = json.loads(bytes(data[body + 8 : end]))
                    visit.ended(key, state, reason, stamp)
                else:
                    visit.deleted(key, stamp)
        except (ValueError, TypeError, KeyError, struct.error) as exc:
            problem = f"malformed record at byte {pos}: {exc}"
            break
        records += 1
        pos = end
    return pos, records, problem
