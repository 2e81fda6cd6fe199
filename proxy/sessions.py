"""Sessions: the upstream read each stream owns, and the readers that follow it.

A session's upstream read runs in its own task, not in the request that started it: the
client that asked may leave, refresh, or be joined by others, and the read goes on to the end
(bounded by `session.max_duration`), logging every event. Every client, the first included,
is a reader: it replays from the store and then follows live. Readers never slow the upstream
read: each one pulls at its own pace, from the store's in-memory tail when it keeps up and
from the log when it falls behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from .config import SESSION_ID_PATTERN, Config
from .errors import ERROR_TYPE, InvalidSessionId, SessionNotFound, ShuttingDown
from .metrics import Metrics
from .sse import KEEPALIVE, MalformedStream, SSEFramer
from .storage.base import (
    CANCELLED,
    COMPLETE,
    ENDED_WITH_ERROR,
    FAILED,
    INTERRUPTED,
    STREAMING,
    SessionInfo,
    SessionMeta,
    SessionStore,
    StorageError,
)
from .trace import TRACE

log = logging.getLogger("proxy.sessions")

# A resume's first write goes out after a small read, so the time to first replayed byte does
# not grow with the session; later reads are large, so a long replay is few syscalls.
FIRST_READ_BYTES = 16 * 1024
READ_BATCH_BYTES = 256 * 1024
INFLATE_SLICE = 1024 * 1024  # most bytes one compressed upstream read inflates to at once
ARRIVAL_KEEP = 5.0  # seconds a finished session's last arrival time is kept for its readers
STALLED = "upstream stalled past upstream.idle_timeout"
_ERROR_MESSAGES = {
    FAILED: "the upstream stream failed before it completed",
    CANCELLED: "the stream was cancelled",
    INTERRUPTED: "the proxy stopped while this stream was running",
}


def new_session_id() -> str:
    """128 random bits, URL-safe, 22 characters."""
    return secrets.token_urlsafe(16)


def check_session_id(session_id: str) -> str:
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise InvalidSessionId("session id must match ^[A-Za-z0-9_-]{8,128}$")
    return session_id


def error_event(state: str, reason: str) -> bytes:
    """The final event of a replay of a session that did not complete.

    It has no `id:` line, so a client's last event id stays that of the last real event.
    """
    message = _ERROR_MESSAGES[state]
    if reason:
        message = f"{message}: {reason}"
    body = {"error": {"message": message, "type": ERROR_TYPE, "code": state}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def deleted_event() -> bytes:
    """How a reader learns that the session it follows was deleted (`DELETE /sessions/{id}`),
    live or finished: the same `cancelled` event a reader of a cancelled session gets."""
    return error_event(CANCELLED, "the session was deleted")


COMPRESSED = ("gzip", "x-gzip", "deflate")


async def inflated(reads: AsyncIterator[bytes], encoding: str) -> AsyncIterator[bytes]:
    """Undo gzip/deflate on a stream upstream compressed although we asked it not to.

    Output comes in slices of at most INFLATE_SLICE bytes (far below the log's largest
    record), with a turn of the loop between slices: one small compressed read may inflate
    to gigabytes, which must neither be held in memory at once nor hold the loop while
    other streams wait. Data that does not inflate is a MalformedStream.
    """
    wbits = 31 if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    inflate = zlib.decompressobj(wbits)
    try:
        async for chunk in reads:
            piece = inflate.decompress(chunk, INFLATE_SLICE)
            while True:
                if piece:
                    yield piece
                if not inflate.unconsumed_tail and len(piece) < INFLATE_SLICE:
                    break
                await asyncio.sleep(0)
                piece = inflate.decompress(inflate.unconsumed_tail, INFLATE_SLICE)
    except zlib.error as exc:
        raise MalformedStream(f"the {encoding} body does not inflate: {exc}") from None


class SessionManager:
    """Owns the running upstream reads; the store owns everything that was logged."""

    def __init__(self, config: Config, store: SessionStore, metrics: Metrics) -> None:
        self._config = config
        self.store = store
        self._metrics = metrics
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._stop_as: dict[str, tuple[str, str]] = {}
        self._last_arrival: dict[str, int] = {}
        self._closed = False  # the shutdown grace is over: no session starts any more
        store.set_stop_handler(self._stop_local)

    @property
    def live_count(self) -> int:
        return len(self._pumps)

    def last_arrival_ns(self, session_id: str) -> int | None:
        """When the newest events of a live session arrived from upstream."""
        return self._last_arrival.get(session_id)

    def start(self, meta: SessionMeta, upstream: aiohttp.ClientResponse) -> SessionInfo:
        """Log the new session and start reading its upstream in a task of its own."""
        if self._closed:
            upstream.close()
            raise ShuttingDown("the proxy is shutting down; send the request again")
        info = self.store.create(meta)
        session_id = meta.session_id
        task = asyncio.create_task(self._pump(meta, upstream))
        self._pumps[session_id] = task
        task.add_done_callback(lambda _: self._forget(session_id))
        self._metrics.session_started()
        return info

    def _forget(self, session_id: str) -> None:
        self._pumps.pop(session_id, None)
        # Readers woken by the last batch write it after the pump is done; they still need
        # its arrival time for the added-latency figure, so it is kept a moment longer.
        asyncio.get_running_loop().call_later(
            ARRIVAL_KEEP, self._last_arrival.pop, session_id, None
        )

    async def stop(self, session_id: str, state: str, reason: str) -> bool:
        """End a live upstream read with the given state, here or on the replica reading it;
        False if no one reads it any more."""
        if await self._stop_local(session_id, state, reason):
            return True
        return await self.store.request_stop(session_id, state, reason)

    async def _stop_local(self, session_id: str, state: str, reason: str) -> bool:
        task = self._pumps.get(session_id)
        if task is None:
            return False
        self._stop_as[session_id] = (state, reason)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
        return True

    async def shutdown(self, grace: float) -> None:
        """Let live reads finish for up to `grace` seconds, then end the rest interrupted.

        Requests accepted before the listener closed can still start sessions meanwhile:
        those are waited for too, and once the grace is over no session starts any more.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._pumps:
            log.info("waiting up to %.1fs for %d live streams", grace, len(self._pumps))
        while self._pumps and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._pumps.values()), timeout=left)
        self._closed = True
        rest = list(self._pumps)
        if rest:
            log.warning("%d streams still live after the grace period: interrupted", len(rest))
        await asyncio.gather(
            *(self.stop(sid, INTERRUPTED, "proxy shut down") for sid in rest),
            return_exceptions=True,
        )
        await self.store.flush()

    async def _pump(self, meta: SessionMeta, upstream: aiohttp.ClientResponse) -> None:
        session_id = meta.session_id
        config = self._config
        metrics = self._metrics
        last_arrival = self._last_arrival
        previous = meta.request_ns
        store = self.store
        framer = SSEFramer(event_ids=config.session.event_ids)
        encoding = upstream.headers.get("Content-Encoding", "identity").lower()
        reads = upstream.content.iter_any()
        if encoding in COMPRESSED:
            reads = inflated(reads, encoding)
        state, reason = COMPLETE, ""
        clock = time.time_ns
        watch = _StallWatch(config.upstream.idle_timeout)
        try:
            async with asyncio.timeout(config.session.max_duration):
                async for chunk in reads:
                    watch.reads += 1
                    arrival = clock()
                    first = framer.next_id
                    data, ends = framer.feed(chunk)
                    if ends:
                        store.append(session_id, first, data, ends, arrival)
                        last_arrival[session_id] = arrival
                        metrics.batch_logged(len(ends), len(data), arrival - previous, first == 1)
                        previous = arrival
            data, ends, clean = framer.finish()
            if ends:
                store.append(session_id, framer.next_id - len(ends), data, ends, clock())
            if not clean:
                state, reason = FAILED, "upstream ended in the middle of an event"
        except MalformedStream as exc:
            state, reason = FAILED, f"malformed stream: {exc}"
        except aiohttp.ServerTimeoutError:
            state, reason = FAILED, STALLED
        except TimeoutError:
            state, reason = FAILED, "stream exceeded session.max_duration"
        except (aiohttp.ClientError, ConnectionError) as exc:
            state, reason = FAILED, f"upstream connection broke: {type(exc).__name__}"
        except StorageError as exc:
            upstream.close()  # nothing more can be logged, so nothing more can be shown
            state, reason = FAILED, f"storage error: {exc}"
        except asyncio.CancelledError:
            if not watch.fired or session_id in self._stop_as:
                state, reason = self._stop_as.pop(session_id, (INTERRUPTED, "proxy shut down"))
                store.end(session_id, state, reason, clock())
                metrics.session_ended(state)
                upstream.close()
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            upstream.close()
            state, reason = FAILED, STALLED
        finally:
            watch.close()
            upstream.release()
        if state != COMPLETE:
            log.warning("session %s ended %s: %s", session_id, state, reason)
        store.end(session_id, state, reason, clock())
        metrics.session_ended(state)


class EventStreamResponse(web.StreamResponse):
    """A stream response whose headers leave with its first events, in one write.

    aiohttp's `Response` already defers headers this way; a `StreamResponse` sends them on
    `prepare`, which costs a syscall per stream. `follow` sends them alone, with an empty
    write, only when it is about to wait for events that are not there yet, so a client
    still learns the session id at once while an upstream thinks.
    """

    _send_headers_immediately = False


class _StallWatch:
    """Ends a pump whose upstream has sent nothing for `upstream.idle_timeout`.

    aiohttp's sock_read timer covers most stalls but not all: when its C parser rejects a
    chunked body mid-stream it drops that timer and never ends the payload. Re-arming a timer
    on every read would put a timer on the hot path per event; instead each read bumps a
    counter, and a timer ticking four times per idle period cancels the pump once the counter
    has not moved for four ticks (so a stall ends between 1 and 1.25 idle periods in).
    """

    __slots__ = ("_handle", "_loop", "_period", "_quiet", "_seen", "_task", "fired", "reads")
    TICKS = 4

    def __init__(self, idle: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._period = idle / self.TICKS
        self.reads = 0
        self.fired = False
        self._seen = 0
        self._quiet = 0
        self._handle = self._loop.call_later(self._period, self._tick)

    def _tick(self) -> None:
        if self.reads != self._seen:
            self._seen = self.reads
            self._quiet = 0
        else:
            self._quiet += 1
            if self._quiet >= self.TICKS and self._task is not None:
                self.fired = True
                self._task.cancel()
                return
        self._handle = self._loop.call_later(self._period, self._tick)

    def close(self) -> None:
        self._handle.cancel()


async def follow(
    request: web.Request,
    response: web.StreamResponse,
    store: SessionStore,
    session_id: str,
    offset: int,
    keepalive: float,
    on_write: Callable[[int, bool], None] | None = None,
) -> None:
    """Replay events offset+1.. from the store, then follow the session live to its end.

    No gap and no duplicate at the switch from replay to live: there is no switch. A reader
    only ever asks the store for "events from n", whether they were logged an hour ago or a
    millisecond ago, and waits when there are none yet.
    """
    next_event = offset + 1
    last_write = time.monotonic()
    write: Callable[[bytes], Awaitable[None]] = response.write
    live = False  # True when the events about to be written were waited for, not replayed
    headers_sent = False
    budget = FIRST_READ_BYTES
    while True:
        try:
            data, count = await store.read(session_id, next_event, budget)
        except SessionNotFound:
            await write(deleted_event())
            return
        if count:
            if TRACE is not None:
                TRACE.client_write(session_id, next_event + count - 1)
            await write(data)
            headers_sent = True
            budget = READ_BATCH_BYTES
            next_event += count
            last_write = time.monotonic()
            if on_write is not None:
                on_write(count, live)
            live = False
            continue
        info = await store.get(session_id)
        if info is None:
            await write(deleted_event())
            return
        if info.state != STREAMING:
            if info.events >= next_event:
                continue  # its last events became readable together with its end
            if info.state in ENDED_WITH_ERROR:
                await write(error_event(info.state, info.reason))
            return
        idle = keepalive - (time.monotonic() - last_write)
        if idle <= 0:
            await write(KEEPALIVE)
            last_write = time.monotonic()
            continue
        if not headers_sent:
            await write(b"")  # the headers, so the client has the session id while it waits
            headers_sent = True
        await store.wait(session_id, next_event - 1, idle)
        live = True
