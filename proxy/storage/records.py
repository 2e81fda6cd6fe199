"""Record framing and scanning: the byte layout of FORMAT.md, and nothing else.

Pure functions over bytes: no files opened, no index kept, no clock read. `log.py` frames
into its buffer with these and `index.py` turns a scan into runs, so a newcomer changing
the layout of a record changes this module (and FORMAT.md) alone. What a record holds of a
session's meta and of its event ends is encoded by `codec.py`, which the Redis store shares.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from typing import Protocol

from proxy.storage.codec import decode_meta, ends_bytes

HEADER = struct.Struct("<IIB")  # crc32 over (length, type, payload), payload length, type
OPEN, EVENTS, END, DELETE, ALIAS = 1, 2, 3, 4, 5
RECORD_TYPES = frozenset((OPEN, EVENTS, END, DELETE, ALIAS))
LENGTH_TYPE = struct.Struct("<IB")
CRC = struct.Struct("<I")
EVENTS_FIXED = struct.Struct("<QIQ")  # first_event, count, arrival_ns
U64 = struct.Struct("<Q")
# The smallest limit on one record's payload; a batch is one upstream read, far below it.
MIN_MAX_RECORD = 16 * 1024 * 1024


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


def frame_events(
    buf: bytearray,
    key: bytes,
    first_event: int,
    arrival_ns: int,
    ends: Sequence[int],
    data: bytes,
) -> int:
    """The hot-path record: framed in one pass (one join, two crc32 calls, one header pack)."""
    fixed = EVENTS_FIXED.pack(first_event, len(ends), arrival_ns)
    payload = b"".join((key, fixed, ends_bytes(ends), data))
    length = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(LENGTH_TYPE.pack(length, EVENTS)))
    buf += HEADER.pack(crc, length, EVENTS)
    buf += payload
    return HEADER.size + length


def frame_open(buf: bytearray, key: bytes, meta_json: bytes) -> int:
    return _frame(buf, OPEN, (key, meta_json))


def frame_end(buf: bytearray, key: bytes, state: str, reason: str, ended_ns: int) -> int:
    text = json.dumps([state, reason], separators=(",", ":")).encode()
    return _frame(buf, END, (key, U64.pack(ended_ns), text))


def frame_delete(buf: bytearray, key: bytes, deleted_ns: int) -> int:
    return _frame(buf, DELETE, (key, U64.pack(deleted_ns)))


def frame_alias(buf: bytearray, key: bytes, alias: str) -> int:
    return _frame(buf, ALIAS, (key, alias.encode("ascii")))


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
