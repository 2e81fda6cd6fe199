"""The bytes both stores keep of a session: its meta as JSON and its event ends as u32s.

The disk log puts these into its records (FORMAT.md: the OPEN payload and the `ends` of an
EVENTS record) and the Redis store into its keys (the meta hash's `meta` field and a stream
entry's `e` field, which the Lua scripts unpack as `<I4`), so one encoding serves both and
a session reads back the same from either. Changing a byte here changes both layouts: old
data dirs and the Redis scripts depend on them.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import fields as dataclass_fields

from proxy.storage.base import SessionMeta

LITTLE_ENDIAN = sys.byteorder == "little"
_U32 = struct.Struct("<I")
END_SIZE = _U32.size  # bytes per event end
_META_FIELDS = tuple(item.name for item in dataclass_fields(SessionMeta))


def encode_meta(meta: SessionMeta) -> bytes:
    """Compact JSON of the meta, keys in field order (the bytes `dataclasses.asdict` gave,
    which the Redis create script compares; fields are listed by hand because `asdict`
    deep-copies recursively, which showed up per stream in the relay's profile)."""
    values = {name: getattr(meta, name) for name in _META_FIELDS}
    return json.dumps(values, separators=(",", ":")).encode()


def decode_meta(raw: bytes) -> SessionMeta:
    """The meta of `encode_meta`; ValueError, TypeError or KeyError when `raw` is not one."""
    fields = json.loads(raw)
    fields["headers"] = tuple((str(k), str(v)) for k, v in fields["headers"])
    return SessionMeta(**fields)


def ends_bytes(ends: Sequence[int]) -> bytes:
    """Event end offsets as a packed little-endian u32 array (a batch is far below 4 GiB).

    One end, the usual batch of a token stream, packs with one struct call: this runs once
    per upstream read on both stores' write paths.
    """
    if len(ends) == 1:
        return _U32.pack(ends[0])
    packed = ends if isinstance(ends, array) and ends.typecode == "I" else array("I", ends)
    if not LITTLE_ENDIAN:
        packed = array("I", packed)
        packed.byteswap()
    return packed.tobytes()


def ends_view(raw: bytes | memoryview) -> Sequence[int]:
    """The end offsets in `raw` (`ends_bytes`'s layout), without a copy on little-endian
    hosts: a view into a segment's mmap, or into a Redis reply's bytes."""
    if LITTLE_ENDIAN:
        return memoryview(raw).cast("I")
    ends = array("I", bytes(raw))
    ends.byteswap()
    return ends


def ends_count(raw: bytes | memoryview) -> int:
    """How many events the encoded ends `raw` describe."""
    return len(raw) // END_SIZE
