"""Incremental SSE framing: upstream bytes in, whole numbered events out.

The relay never decodes JSON; it only needs event boundaries (a blank line, WHATWG HTML
§9.2.6, with LF, CRLF or CR line ends) and the fields `data` and `id`. Every event that
carries data leaves exactly as upstream sent it, except that upstream `id:` lines are removed
and `id: <n>` is put first. Blocks without a `data` field (comment keep-alives, a lone
`retry:`) and stray blank lines are dropped, because openai-python turns any blank-line block
after an `id` into an event with empty data and then fails on `json.loads("")`.

Work is per read, not per event: `feed` takes whatever one socket read produced and returns
one `bytes` with all of that read's events plus their end offsets, ready for one socket write
and one log append.
"""

from __future__ import annotations

import re
from itertools import accumulate

MAX_EVENT_BYTES = 8 * 1024 * 1024
KEEPALIVE = b": keepalive\n"
# An unfinished event this long is held as a list of reads instead of being re-joined and
# re-scanned on every read: that would cost O(n²) loop time on a long line (an 8 MiB line in
# 16 KiB reads is seconds of CPU during which no other stream is served).
_HOLD_BYTES = 64 * 1024
_BLANK_LINE_PAIRS = (b"\n\n", b"\r\r", b"\n\r")  # every blank line contains one of these

_BOM = b"\xef\xbb\xbf"
# A blank line: one line terminator followed by another. `\r(?!\n)` keeps a CRLF whole, so
# "a\r\nb" is never read as a line ended by CR followed by an empty line ended by LF.
_BOUNDARY = re.compile(rb"(\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)?")


class MalformedStream(Exception):
    """Upstream sent something that cannot be an SSE stream (an event over the size limit)."""


def _clean(block: bytes) -> bytes | None:
    """The block without `id` fields, or None when it carries no `data` field.

    The common shapes (`data: ...`, `event: x` + `data: ...`, no id) are settled by two
    substring checks in C; only unusual blocks are walked line by line.
    """
    if (block.startswith(b"data:") or b"\ndata:" in block or b"\rdata:" in block) and not (
        block.startswith(b"id") or b"\nid" in block or b"\rid" in block
    ):
        return block
    kept: list[bytes] = []
    has_data = False
    for match in _LINE.finditer(block):
        line = match.group()
        if not line:
            continue
        content = line.rstrip(b"\r\n")
        colon = content.find(b":")
        name = content if colon < 0 else content[:colon]
        if name == b"id":
            continue
        if name == b"data":
            has_data = True
        kept.append(line)
    if not has_data:
        return None
    cleaned = b"".join(kept)
    # Dropping a trailing id line leaves the previous line's terminator at the end; the
    # boundary we append brings its own, and two would make a stray blank line.
    if cleaned.endswith(b"\r\n"):
        return cleaned[:-2]
    if cleaned.endswith((b"\n", b"\r")):
        return cleaned[:-1]
    return cleaned


class SSEFramer:
    """Frames one upstream stream. Not thread-safe; one per stream."""

    __slots__ = (
        "_buffer",
        "_crlf_mode",
        "_held",
        "_held_bytes",
        "_max_event_bytes",
        "_started",
        "event_ids",
        "next_id",
    )

    def __init__(
        self,
        *,
        event_ids: bool = True,
        first_id: int = 1,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self.event_ids = event_ids
        self.next_id = first_id
        self._buffer = b""
        self._held: list[bytes] = []  # reads of an unfinished event past _HOLD_BYTES
        self._held_bytes = 0
        self._crlf_mode = False  # becomes True at the first CR; LF-only streams take a fast path
        self._started = False
        self._max_event_bytes = max_event_bytes

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet ended by a blank line."""
        return b"".join(self._held) if self._held else self._buffer

    def feed(self, chunk: bytes) -> tuple[bytes, list[int]]:
        """Frame one read. Returns the rendered events and each one's end offset."""
        held = self._held
        if held:
            edge = held[-1][-2:] + chunk[:1]
            if not any(pair in chunk or pair in edge for pair in _BLANK_LINE_PAIRS):
                return self._hold(chunk)
            buffer = b"".join(held) + chunk
            self._held, self._held_bytes = [], 0
        else:
            buffer = self._buffer + chunk if self._buffer else chunk
        if not self._started:
            # One BOM may open the stream (WHATWG §9.2.6); it can arrive split across reads.
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer
                return b"", []
            self._started = True
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM) :]
        if not self._crlf_mode and b"\r" in chunk:
            self._crlf_mode = True
        if self._crlf_mode:
            out, ends, rest = self._frame_any_eol(buffer, final=False)
        else:
            out, ends, rest = self._frame_lf(buffer)
        self._buffer = b""
        if len(rest) >= _HOLD_BYTES or len(rest) > self._max_event_bytes:
            self._hold(rest)
        else:
            self._buffer = rest
        return out, ends

    def _hold(self, piece: bytes) -> tuple[bytes, list[int]]:
        """Keep a piece of an unfinished event that no blank line can end yet."""
        if not self._crlf_mode and b"\r" in piece:
            self._crlf_mode = True
        self._held.append(piece)
        self._held_bytes += len(piece)
        if self._held_bytes > self._max_event_bytes:
            raise MalformedStream(
                f"an event grew past {self._max_event_bytes} bytes without a blank line"
            )
        return b"", []

    def finish(self) -> tuple[bytes, list[int], bool]:
        """At upstream EOF: events still held back, and whether the stream ended cleanly.

        Only a CR held back at the very end (it might have been the first half of a CRLF)
        can complete an event here; any other leftover non-blank bytes are a torn event.
        """
        out, ends, rest = b"", [], self.pending
        self._held, self._held_bytes = [], 0
        if self._crlf_mode and rest:
            out, ends, rest = self._frame_any_eol(rest, final=True)
        self._buffer = b""
        return out, ends, not rest.strip(b"\r\n")

    def _frame_lf(self, buffer: bytes) -> tuple[bytes, list[int], bytes]:
        blocks = buffer.split(b"\n\n")
        rest = blocks.pop()
        if not blocks:
            return b"", [], rest
        # One scan of the whole read settles `id` lines for all its events; then an event
        # that starts with `data:` needs no further look (OpenAI chat sends only those).
        id_free = not buffer.startswith(b"id") and b"\nid" not in buffer
        event_ids = self.event_ids
        if id_free and event_ids and all([block.startswith(b"data:") for block in blocks]):
            # The common read: every block is a plain `data:` event, framed by
            # comprehensions instead of the general loop below.
            number = self.next_id
            events = [
                b"id: %d\n%b\n\n" % item
                for item in zip(range(number, number + len(blocks)), blocks, strict=True)
            ]
            self.next_id = number + len(blocks)
            return b"".join(events), list(accumulate(map(len, events))), rest
        parts: list[bytes] = []
        ends: list[int] = []
        size = 0
        number = self.next_id
        for raw in blocks:
            if id_free and raw.startswith(b"data:"):
                block: bytes | None = raw
            else:
                block = _clean(raw.lstrip(b"\n")) if raw else None
                if block is None:
                    continue
            event = b"id: %d\n%s\n\n" % (number, block) if event_ids else block + b"\n\n"
            number += 1
            parts.append(event)
            size += len(event)
            ends.append(size)
        self.next_id = number
        return b"".join(parts), ends, rest

    def _frame_any_eol(self, buffer: bytes, *, final: bool) -> tuple[bytes, list[int], bytes]:
        parts: list[bytes] = []
        ends: list[int] = []
        size = 0
        number = self.next_id
        start = 0
        for match in _BOUNDARY.finditer(buffer):
            # A CR at the very end may be half of a CRLF whose LF has not arrived yet.
            if not final and match.end() == len(buffer) and buffer.endswith(b"\r"):
                break
            block = _clean(buffer[start : match.start()].lstrip(b"\r\n"))
            terminators = match.group()
            start = match.end()
            if block is None:
                continue
            if self.event_ids:
                event = b"id: %d%s%s%s" % (number, match.group(1), block, terminators)
            else:
                event = block + terminators
            number += 1
            parts.append(event)
            size += len(event)
            ends.append(size)
        self.next_id = number
        rest = buffer[start:]
        return b"".join(parts), ends, rest


def split_events(data: bytes) -> list[bytes]:
    """Logged events one by one, each with its blank line (what `feed` joined, split again).

    Not for the relay: it is for the few places that look inside a logged event (the
    Responses API's ids and snapshots), where a Python object per event is affordable.
    """
    events: list[bytes] = []
    start = 0
    for match in _BOUNDARY.finditer(data):
        events.append(data[start : match.end()])
        start = match.end()
    return events


def event_data(event: bytes) -> bytes:
    """The value of an event's `data` field: its `data` lines joined by LF (WHATWG §9.2.6)."""
    values: list[bytes] = []
    for match in _LINE.finditer(event):
        name, _, value = match.group().rstrip(b"\r\n").partition(b":")
        if name == b"data":
            values.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(values)
