"""`codec.py`, the bytes both stores keep of a session: the meta round-trips whatever its
headers hold, its bytes are the ones older versions wrote (data dirs on disk, the Redis
create script's comparison), and event ends pack to the little-endian u32s FORMAT.md and the
Lua scripts read."""

from __future__ import annotations

import json
import struct
from array import array
from dataclasses import asdict

import pytest

from proxy.storage.base import SessionMeta
from proxy.storage.codec import decode_meta, encode_meta, ends_bytes, ends_count, ends_view


def meta(**changes: object) -> SessionMeta:
    fields: dict[str, object] = {
        "session_id": "session-c",
        "method": "POST",
        "path": "/v1/chat/completions?stream=true",
        "body_sha256": "ab" * 32,
        "credential_sha256": "cd" * 32,
        "created_ns": 1_700_000_000_123_456_789,
        "request_ns": 1_700_000_000_223_456_789,
        "upstream_status": 200,
        "headers": (("Content-Type", "text/event-stream"),),
    }
    fields.update(changes)
    return SessionMeta(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "original",
    [
        meta(),
        meta(headers=()),
        meta(credential_sha256=""),
        meta(headers=(("X-Name", "café"), ("X-Title", "日本語"), ("X-Mood", "🙂"))),
        meta(headers=(("X-Quote", 'say "hi"\\ and\nnewline'), ("x-empty", ""))),
        meta(headers=tuple((f"X-H{n}", "v" * n) for n in range(50))),
        meta(path="/v1/responses/resp_ü?x=%20", upstream_status=599),
        meta(session_id="-starts-with-a-dash", created_ns=0, request_ns=0),
    ],
    ids=["plain", "no-headers", "no-credential", "unicode", "escapes", "many", "path", "edge"],
)
def test_meta_round_trips_and_keeps_the_bytes_older_versions_wrote(original: SessionMeta) -> None:
    raw = encode_meta(original)
    assert decode_meta(raw) == original
    # The Redis store used to build these bytes with `asdict`; its create script compares a
    # session's stored meta with the one sent again, so the bytes must not have changed.
    assert raw == json.dumps(asdict(original), separators=(",", ":")).encode()
    assert raw.isascii()  # unicode goes as \\u escapes, as it always did


def test_meta_written_by_an_earlier_version_still_decodes() -> None:
    # An OPEN payload as an older proxy logged it (and the `meta` field of a Redis hash).
    old = (
        b'{"session_id":"session-old","method":"POST","path":"/v1/chat/completions",'
        b'"body_sha256":"' + b"e3" * 32 + b'","credential_sha256":"","created_ns":1,'
        b'"request_ns":2,"upstream_status":200,"headers":[["Content-Type",'
        b'"text/event-stream"],["X-Name","caf\\u00e9"]]}'
    )
    assert decode_meta(old) == SessionMeta(
        "session-old",
        "POST",
        "/v1/chat/completions",
        "e3" * 32,
        "",
        1,
        2,
        200,
        (("Content-Type", "text/event-stream"), ("X-Name", "café")),
    )


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"not json", ValueError),
        (b'{"session_id":"s","headers":[]}', TypeError),  # fields missing
        (encode_meta(meta()).replace(b'"text/event-stream"]', b"]"), ValueError),  # no pair
        (b"[]", TypeError),
        (encode_meta(meta()).replace(b'"headers"', b'"heads"'), KeyError),
    ],
)
def test_damaged_meta_is_refused_with_the_errors_a_scan_catches(
    raw: bytes, error: type[Exception]
) -> None:
    with pytest.raises(error):
        decode_meta(raw)


@pytest.mark.parametrize(
    "ends",
    [[7], [1, 2], [10, 20, 30, 40], [0xFFFFFFFF], list(range(1, 1000, 3)), array("I", [5, 9])],
    ids=["one", "two", "four", "max", "many", "array"],
)
def test_ends_pack_to_little_endian_u32_and_read_back(ends: list[int] | array[int]) -> None:
    raw = ends_bytes(ends)
    assert raw == struct.pack(f"<{len(ends)}I", *ends)  # FORMAT.md and the Lua `<I4`
    assert list(ends_view(raw)) == list(ends)
    assert list(ends_view(memoryview(b"pad" + raw)[3:])) == list(ends)  # inside a record
    assert ends_count(raw) == len(ends)
