"""Readers: one client following one session, from any offset to the session's end.

A reader replays what the store has, then follows live. Live events are pushed: once a
reader has everything readable it registers a `LiveWriter` with the store, and the store
writes each new batch straight to the reader's socket at the moment the batch becomes
readable (after the log has it), in the same synchronous pass that wrote the log. The reader's
own task sleeps meanwhile; it wakes only when it leaves the push path (its client's buffer
filled, the session ended, was deleted, or the store cannot push), and then catches up from
the store at its client's pace, and rejoins.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from .errors import error_body
from .sse import KEEPALIVE
from .storage.base import (
    CANCELLED,
    ENDED_WITH_ERROR,
    FAILED,
    INTERRUPTED,
    STREAMING,
    SessionInfo,
    SessionMissing,
    SessionStore,
)
from .trace import TRACE

# A resume's first write goes out after a small read, so the time to first replayed byte does
# not grow with the session; later reads are large, so a long replay is few syscalls and few
# trips through aiohttp's writer (512 KiB measured ~10% faster than 256 KiB for batched
# records, `benchmarks/bench_log.py`). A replaying reader holds at most one such chunk
# unsent: the next read waits for the transport to drain.
FIRST_READ_BYTES = 16 * 1024
READ_BATCH_BYTES = 512 * 1024
# Data this large is written as three parts, not framed into one new `bytes` (`send`), and
# replayed reads this large skip aiohttp's writer: below it, the copy costs less than the
# two extra transport writes.
DIRECT_WRITE_BYTES = 64 * 1024
# Past this many bytes unsent in a client's socket buffer, a reader leaves the push path:
# one slow client holds at most this much memory and never delays the others.
PUSH_HIGH_WATER = 64 * 1024
_ERROR_MESSAGES = {
    FAILED: "the upstream stream failed before it completed",
    CANCELLED: "the stream was cancelled",
    INTERRUPTED: "the proxy stopped while this stream was running",
}

OnWrite = Callable[[int, int | None], None]
"""Called per write with the number of events and, for live events, their arrival time."""


def error_message(state: str, reason: str) -> str:
    """Why a session that did not complete ended, in words (error events and snapshots)."""
    message = _ERROR_MESSAGES[state]
    return f"{message}: {reason}" if reason else message


def deleted_event() -> bytes:
    """How a reader learns that the session it follows was deleted (`DELETE /sessions/{id}`),
    live or finished: the same `cancelled` event a reader of a cancelled session gets."""
    return error_event(CANCELLED, "the session was deleted")


def error_event(state: str, reason: str) -> bytes:
    """The final event of a replay of a session that did not complete.

    It has no `id:` line, so a client's last event id stays that of the last real event.
    """
    body = error_body(state, error_message(state, reason))
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class EventStreamResponse(web.StreamResponse):
    """A stream response whose headers leave with its first events, in one write.

    aiohttp's `Response` already defers headers this way; a `StreamResponse` sends them on
    `prepare`, which costs a syscall per stream. `follow` sends them alone, with an empty
    write, only when it is about to wait for events that are not there yet, so a client
    still learns the session id at once while an upstream thinks.
    """

    _send_headers_immediately = False


class LiveWriter:
    """The push end of a caught-up reader: the store calls `push` per readable batch.

    Writes go to the transport directly, framed as HTTP/1.1 chunks when the response is
    chunked (aiohttp's own writer would cost a coroutine and a drain check per batch). Every
    chunk is whole, so the stream stays valid when aiohttp's writer takes over again for
    the catch-up and the end.
    """

    __slots__ = (
        "_chunked",
        "_done",
        "_on_write",
        "_session_id",
        "_timer",
        "_transport",
        "keepalive",
        "last_write",
        "next_event",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        next_event: int,
        chunked: bool,
        keepalive: float,
        on_write: OnWrite,
        session_id: str = "",
    ) -> None:
        self._session_id = session_id  # for the ordering trace only
        self._transport = transport
        self._chunked = chunked
        self._on_write = on_write
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None
        self.keepalive = keepalive
        self.last_write = time.monotonic()
        self.next_event = next_event

    def push(self, first_event: int, data: bytes, count: int, arrival_ns: int) -> bool:
        transport = self._transport
        if (
            first_event != self.next_event
            or transport.is_closing()
            or transport.get_write_buffer_size() > PUSH_HIGH_WATER
        ):
            return False
        if TRACE is not None:
            TRACE.client_write(self._session_id, first_event + count - 1)
        send(transport, data, self._chunked)
        self.next_event = first_event + count
        self.last_write = time.monotonic()
        self._on_write(count, arrival_ns)
        return True

    def detach(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    async def wait(self) -> None:
        """Until the store lets go of this writer; writes keep-alives meanwhile."""
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.keepalive, self._tick)
        try:
            await self._done
        finally:
            self._timer.cancel()

    def _tick(self) -> None:
        idle = time.monotonic() - self.last_write
        if idle >= self.keepalive:
            transport = self._transport
            if transport.is_closing():
                self.detach()
                return
            send(transport, KEEPALIVE, self._chunked)
            self.last_write = time.monotonic()
            idle = 0.0
        self._timer = asyncio.get_running_loop().call_later(self.keepalive - idle, self._tick)


async def replay(
    store: SessionStore,
    session_id: str,
    next_event: int,
    budget: int,
    write: Callable[[bytes, int, int], Awaitable[None]],
) -> int:
    """Write every event readable now from `next_event` on, one store read at a time, as
    `write(data, count, last event)`; returns the event after the last one written.

    The replay of the server (`follow`) and of `resumable-proxy sessions cat`: the first
    read takes `budget` bytes (small, `FIRST_READ_BYTES`, so the first bytes leave early),
    later ones `READ_BATCH_BYTES`. Raises SessionMissing if the session goes.
    """
    size = budget
    while True:
        data, count = await store.read(session_id, next_event, size)
        if not count:
            return next_event
        next_event += count
        await write(data, count, next_event - 1)
        size = READ_BATCH_BYTES


def final_event(info: SessionInfo) -> bytes:
    """What a reader gets after the last event of a finished session: the error event of
    one that did not complete, nothing for a complete one."""
    return error_event(info.state, info.reason) if info.state in ENDED_WITH_ERROR else b""


async def follow(
    request: web.Request,
    response: web.StreamResponse,
    store: SessionStore,
    session_id: str,
    offset: int,
    keepalive: float,
    on_write: OnWrite,
) -> None:
    """Replay events offset+1.. from the store, then follow the session live to its end.

    No gap and no duplicate at the switch from replay to live: the push path takes a
    reader only when its next event is exactly the next one to become readable, and pushes
    batches only in order; anything else sends it back to reading "events from n".
    """
    next_event = offset + 1
    last_write = time.monotonic()
    headers_sent = False
    chunked = _is_chunked(response)
    budget = FIRST_READ_BYTES  # until the first events are out, then READ_BATCH_BYTES

    async def write(data: bytes, count: int, last: int) -> None:
        nonlocal headers_sent, last_write, budget
        if TRACE is not None:
            TRACE.client_write(session_id, last)
        transport = request.transport
        if headers_sent and len(data) >= DIRECT_WRITE_BYTES and transport is not None:
            send(transport, data, chunked)
            await request.writer.drain()  # aiohttp's back-pressure: waits while paused
        else:
            await response.write(data)
        if not headers_sent:
            headers_sent = True
            # uvloop sends a write below its high-water mark only when the loop turn ends:
            # without a turn here, the first events would wait for the next (large) read.
            await asyncio.sleep(0)
        budget = READ_BATCH_BYTES
        last_write = time.monotonic()
        on_write(count, None)

    while True:
        try:
            next_event = await replay(store, session_id, next_event, budget, write)
        except SessionMissing:
            await response.write(deleted_event())
            return
        info = await store.get(session_id)
        if info is None:
            await response.write(deleted_event())
            return
        if info.state != STREAMING:
            if info.events >= next_event:
                continue  # its last events became readable together with its end
            final = final_event(info)
            if final:
                await response.write(final)
            return
        if not headers_sent:
            await response.write(b"")  # the headers, so the client has the session id at once
            headers_sent = True
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        writer = LiveWriter(transport, next_event, chunked, keepalive, on_write, session_id)
        writer.last_write = last_write
        if store.follow_live(session_id, writer):
            try:
                await writer.wait()
            finally:
                store.unfollow(session_id, writer)
            next_event = writer.next_event
            last_write = writer.last_write
            await _room(transport)
            continue
        idle = keepalive - (time.monotonic() - last_write)
        if idle <= 0:
            await response.write(KEEPALIVE)
            last_write = time.monotonic()
            continue
        await store.wait(session_id, next_event - 1, idle)


def send(transport: asyncio.Transport, data: bytes, chunked: bool) -> None:
    """`data` straight to the client's transport, as one whole HTTP/1.1 chunk when the
    response is chunked, so aiohttp's writer can take over again at any chunk boundary.

    Small data is framed into one `bytes` (one write). Large data goes as three writes
    that the transport takes in order without copying it (uvloop gathers them into one
    `writev`): aiohttp's own writer would join them into a new `bytes` first (on Python
    < 3.12.9, where `writelines` is unsafe), a copy of every replayed byte.
    """
    if not chunked:
        transport.write(data)
    elif len(data) < DIRECT_WRITE_BYTES:
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
    else:
        transport.write(b"%x\r\n" % len(data))
        transport.write(data)
        transport.write(b"\r\n")


async def _room(transport: asyncio.Transport) -> None:
    """Until a client's buffer has drained below a quarter of the high-water mark.

    Only a reader sent back by a full buffer waits here. asyncio tells only the protocol
    (aiohttp's) when a buffer drains, so this polls, backing off to 100 ms: a slow client
    costs a few timer wake-ups a second, never a busy loop.
    """
    delay = 0.002
    while not transport.is_closing() and transport.get_write_buffer_size() > PUSH_HIGH_WATER // 4:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def _is_chunked(response: web.StreamResponse) -> bool:
    return response.headers.get("Transfer-Encoding", "").lower() == "chunked"
