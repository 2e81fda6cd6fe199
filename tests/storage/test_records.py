"""Table-driven corruption of the split modules: `records.scan_records` stops at exactly the
first bad record and says why, and `index.decode_index` refuses any damaged cache."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.storage.base import SessionMeta
from proxy.storage.codec import encode_meta
from proxy.storage.index import decode_index, encode_index, scan_runs
from proxy.storage.log import Log
from proxy.storage.records import (
    HEADER,
    MIN_MAX_RECORD,
    frame_alias,
    frame_end,
    frame_events,
    frame_open,
    session_key,
)

KEY = session_key("session-r")


def good_log() -> tuple[bytearray, list[int]]:
    """OPEN, two EVENTS, ALIAS, END; and the offset each record starts at."""
    buf = bytearray()
    starts = [0]
    meta = SessionMeta("session-r", "POST", "/v1/chat", "b" * 64, "", 1, 2, 200, ())
    starts.append(starts[-1] + frame_open(buf, KEY, encode_meta(meta)))
    starts.append(starts[-1] + frame_events(buf, KEY, 1, 10, [5, 10], b"aaaaabbbbb"))
    starts.append(starts[-1] + frame_events(buf, KEY, 3, 20, [3], b"ccc"))
    starts.append(starts[-1] + frame_alias(buf, KEY, "resp_1"))
    frame_end(buf, KEY, "complete", "", 30)
    return buf, starts


def reframe(buf: bytearray, start: int, end: int, payload: bytes, rtype: int) -> bytearray:
    """Replace one record by a validly checksummed one with `payload`: damage the checksum
    cannot catch, so the scan's own checks must."""
    length_type = struct.pack("<IB", len(payload), rtype)
    crc = zlib.crc32(payload, zlib.crc32(length_type))
    return buf[:start] + struct.pack("<I", crc) + length_type + payload + buf[end:]


def _flip(at: int) -> Callable[[bytearray, list[int]], bytearray]:
    def damage(buf: bytearray, starts: list[int]) -> bytearray:
        buf[starts[at] + HEADER.size + 3] ^= 0x01
        return buf

    return damage


def _cut(at: int, keep: int) -> Callable[[bytearray, list[int]], bytearray]:
    return lambda buf, starts: buf[: starts[at] + keep]


def _bad_type(buf: bytearray, starts: list[int]) -> bytearray:
    buf[starts[2] + 8] = 9
    return buf


def _huge_length(buf: bytearray, starts: list[int]) -> bytearray:
    struct.pack_into("<I", buf, starts[2] + 4, MIN_MAX_RECORD + 1)
    return buf


def _ends_overrun(buf: bytearray, starts: list[int]) -> bytearray:
    payload = KEY + struct.pack("<QIQ", 3, 1000, 20) + b"ccc"
    return reframe(buf, starts[2], starts[3], payload, 2)


def _empty_alias(buf: bytearray, starts: list[int]) -> bytearray:
    return reframe(buf, starts[3], starts[4], KEY, 5)


def _bad_meta(buf: bytearray, starts: list[int]) -> bytearray:
    return reframe(buf, starts[0], starts[1], KEY + b"{not json", 1)


def _id_overrun(buf: bytearray, starts: list[int]) -> bytearray:
    return reframe(buf, starts[3], starts[4], bytes((200,)) + b"resp", 5)


# (damage, records kept whole, the reason the scan gives)
CASES = [
    (lambda buf, starts: buf, 5, None),
    (_cut(2, 4), 2, "torn record header at byte"),
    (_cut(2, HEADER.size + 5), 2, "torn record at byte"),
    (_flip(2), 2, "checksum mismatch at byte"),
    (_bad_type, 2, "invalid record header at byte"),
    (_huge_length, 2, "invalid record header at byte"),
    (_ends_overrun, 2, "malformed record at byte"),
    (_empty_alias, 3, "malformed record at byte"),
    (_bad_meta, 0, "malformed record at byte"),
    (_id_overrun, 3, "malformed record at byte"),
]


@pytest.mark.parametrize(("damage", "kept", "problem"), CASES)
def test_scan_stops_at_the_first_bad_record_with_its_reason(
    damage: Callable[[bytearray, list[int]], bytearray], kept: int, problem: str | None
) -> None:
    buf, starts = good_log()
    damaged = bytes(damage(buf, starts))
    result = scan_runs(damaged, 0, MIN_MAX_RECORD)
    assert result.records == kept
    assert result.size == [*starts, len(buf)][kept]
    if problem is None:
        assert result.problem is None
    else:
        assert result.problem is not None and result.problem.startswith(problem)
        assert f"at byte {result.size}" in result.problem
    events = sum(len(run.first_events) for run in result.runs)
    assert events == min(max(kept - 1, 0), 2)


def _index_bytes(tmp_path: Path) -> tuple[bytes, int]:
    buf, _ = good_log()
    result = scan_runs(bytes(buf), 0, MIN_MAX_RECORD)
    return encode_index(result.size, result.records, result.runs), result.size


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-1],
        lambda data: data[:10],
        lambda data: b"RPIDX1L\0" + data[8:],
        lambda data: data[:20] + bytes((data[20] ^ 1,)) + data[21:],
        lambda data: data + b"\0",
        lambda data: b"",
    ],
)
def test_index_codec_refuses_every_damaged_cache(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    data, size = _index_bytes(tmp_path)
    assert decode_index(data, 0)[:2] == (size, 5)
    with pytest.raises(ValueError):
        decode_index(damage(data), 0)


def test_engine_recovers_the_whole_prefix_of_a_damaged_newest_segment(tmp_path: Path) -> None:
    for damage, kept, _ in CASES:
        directory = tmp_path / f"case-{kept}-{id(damage)}"
        directory.mkdir()
        buf, starts = good_log()
        (directory / "00000000000000000000.log").write_bytes(bytes(damage(buf, starts)))
        log = Log(directory, 1 << 20)
        log.recover()
        assert log.current is not None and log.current.size == [*starts, len(buf)][kept]
        assert log.next_record == kept
        log.close()
