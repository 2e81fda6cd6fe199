"""Sessions: the upstream read each stream owns, from its first byte to its final state.

A session's upstream read is not tied to the request that started it: the client that asked
may leave, refresh, or be joined by others, and the read goes on to the end (bounded by
`session.max_duration`), logging every event. The read is driven by the upstream socket
itself: each read is framed and appended to the store in the callback that received it
(`upstream.py`), and the store pushes it to the readers that are caught up (`readers.py`)
once the log has it. Clients never slow the upstream read.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import zlib
from collections.abc import Callable, Iterator

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from .config import SESSION_ID_PATTERN, Config
from .errors import InvalidSessionId, ShuttingDown
from .metrics import Metrics
from .sse import MalformedStream, SSEFramer
from .storage.base import (
    COMPLETE,
    FAILED,
    INTERRUPTED,
    SessionInfo,
    SessionMeta,
    SessionMissing,
    SessionStore,
    StorageError,
)
from .upstream import UpstreamConnection

log = logging.getLogger("proxy.sessions")

STALLED = "upstream stalled past upstream.idle_timeout"


def new_session_id() -> str:
    """128 random bits, URL-safe, 22 characters."""
    return secrets.token_urlsafe(16)


def check_session_id(session_id: str) -> str:
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise InvalidSessionId("session id must match ^[A-Za-z0-9_-]{8,128}$")
    return session_id


INFLATE_SLICE = 1024 * 1024  # most bytes one compressed upstream read inflates to at once


class _Decoder:
    """Undoes gzip/deflate on a stream upstream compressed although we asked it not to.

    One small compressed read may inflate to gigabytes: it comes out in slices of at most
    INFLATE_SLICE bytes (far below the log's largest record), each framed and logged before
    the next is inflated, so memory stays bounded by a slice. Data that does not inflate is
    a MalformedStream.
    """

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        wbits = 31 if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
        self._inflate = zlib.decompressobj(wbits)

    def __call__(self, chunk: bytes) -> Iterator[bytes]:
        inflate = self._inflate
        try:
            piece = inflate.decompress(chunk, INFLATE_SLICE)
            while True:
                if piece:
                    yield piece
                if not inflate.unconsumed_tail and len(piece) < INFLATE_SLICE:
                    return
                piece = inflate.decompress(inflate.unconsumed_tail, INFLATE_SLICE)
        except zlib.error as exc:
            raise MalformedStream(f"the {self._encoding} body does not inflate: {exc}") from None


class SessionManager:
    """Owns the running upstream reads; the store owns everything that was logged."""

    def __init__(self, config: Config, store: SessionStore, metrics: Metrics) -> None:
        self._config = config
        self.store = store
        self._metrics = metrics
        self._pumps: dict[str, Pump] = {}
        self._closed = False  # the shutdown grace is over: no session starts any more
        store.set_stop_handler(self._stop_local)

    @property
    def live_count(self) -> int:
        return len(self._pumps)

    def start(
        self, meta: SessionMeta, upstream: UpstreamConnection | aiohttp.ClientResponse
    ) -> SessionInfo:
        """Log the new session and start reading its upstream."""
        if self._closed:
            upstream.close()
            raise ShuttingDown("the proxy is shutting down; send the request again")
        info = self.store.create(meta)
        pump = Pump(self._config, self.store, self._metrics, meta, upstream.headers)
        self._pumps[meta.session_id] = pump
        pump.done.add_done_callback(lambda _: self._pumps.pop(meta.session_id, None))
        self._metrics.session_started()
        if isinstance(upstream, UpstreamConnection):
            pump.watch(upstream)
            upstream.attach(pump)
        else:
            pump.drain(upstream)
        return info

    async def stop(self, session_id: str, state: str, reason: str) -> bool:
        """End a live upstream read with the given state, here or on the replica reading it;
        False if no one reads it any more."""
        if await self._stop_local(session_id, state, reason):
            return True
        return await self.store.request_stop(session_id, state, reason)

    async def _stop_local(self, session_id: str, state: str, reason: str) -> bool:
        pump = self._pumps.get(session_id)
        if pump is None:
            return False
        pump.stop(state, reason)
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
            await asyncio.wait([pump.done for pump in self._pumps.values()], timeout=left)
        self._closed = True
        rest = list(self._pumps)
        if rest:
            log.warning("%d streams still live after the grace period: interrupted", len(rest))
        await asyncio.gather(
            *(self.stop(sid, INTERRUPTED, "proxy shut down") for sid in rest),
            return_exceptions=True,
        )
        await self.store.flush()


class Pump:
    """One session's upstream read: each read is framed and logged as it arrives.

    It is the body sink of the upstream connection, so `feed` runs inside the socket's
    `data_received`: no task wakes up per read. Whatever ends the read (the end of the body,
    a broken connection, a stall, `max_duration`, a cancel) ends the session exactly once.
    """

    __slots__ = (
        "_close_upstream",
        "_config",
        "_deadline",
        "_decode",
        "_framer",
        "_metrics",
        "_previous",
        "_session_id",
        "_stall",
        "_store",
        "done",
        "reads",
    )

    def __init__(
        self,
        config: Config,
        store: SessionStore,
        metrics: Metrics,
        meta: SessionMeta,
        headers: CIMultiDictProxy[str] | CIMultiDict[str],
    ) -> None:
        loop = asyncio.get_running_loop()
        self._config = config
        self._store = store
        self._metrics = metrics
        self._session_id = meta.session_id
        self._previous = meta.request_ns
        self._framer = SSEFramer(event_ids=config.session.event_ids)
        encoding = headers.get("Content-Encoding", "identity").lower()
        self._decode = _Decoder(encoding) if encoding in ("gzip", "x-gzip", "deflate") else None
        self._close_upstream: Callable[[], None] = _nothing
        self._stall: _StallWatch | None = None
        self._deadline = loop.call_later(
            config.session.max_duration, self.fail, "stream exceeded session.max_duration"
        )
        self.done: asyncio.Future[None] = loop.create_future()
        self.reads = 0  # bumped per read, for the stall watch

    # the upstream side

    def watch(self, upstream: UpstreamConnection) -> None:
        """Read a raw connection: closing it is the way to stop."""
        self._close_upstream = upstream.close
        self._stall = _StallWatch(self._config.upstream.idle_timeout, self)

    def drain(self, upstream: aiohttp.ClientResponse) -> None:
        """Read an aiohttp response (requests that did not look like streams) in a task.

        aiohttp's sock_read timer covers most stalls but not all: when its C parser rejects
        a chunked body mid-stream it drops that timer and never ends the payload, so the
        stall watch covers this path too.
        """
        task = asyncio.create_task(_read_aiohttp(upstream, self))

        def close() -> None:
            task.cancel()
            upstream.close()

        self._close_upstream = close
        self._stall = _StallWatch(self._config.upstream.idle_timeout, self)

    def feed(self, chunk: bytes) -> None:
        if self._decode is None:
            self._frame(chunk)
            return
        try:
            for piece in self._decode(chunk):
                self._frame(piece)
                if self.done.done():
                    return
        except MalformedStream as exc:
            self.fail(f"malformed stream: {exc}")

    def _frame(self, chunk: bytes) -> None:
        if self.done.done():
            return
        self.reads += 1
        arrival = time.time_ns()
        framer = self._framer
        first = framer.next_id
        try:
            data, ends = framer.feed(chunk)
            if ends:
                self._store.append(self._session_id, first, data, ends, arrival)
        except MalformedStream as exc:
            self.fail(f"malformed stream: {exc}")
            return
        except StorageError as exc:
            self.fail(f"storage error: {exc}")
            return
        if ends:
            self._metrics.batch_logged(len(ends), len(data), arrival - self._previous, first == 1)
            self._previous = arrival

    def finish(self) -> None:
        if self.done.done():
            return
        data, ends, clean = self._framer.finish()
        if ends:
            try:
                self._store.append(
                    self._session_id, self._framer.next_id - len(ends), data, ends, time.time_ns()
                )
            except StorageError as exc:
                self.fail(f"storage error: {exc}")
                return
        if clean:
            self._end(COMPLETE, "")
        else:
            self.fail("upstream ended in the middle of an event")

    def fail(self, reason: str) -> None:
        if not self.done.done():
            log.warning("session %s ended %s: %s", self._session_id, FAILED, reason)
            self._end(FAILED, reason)

    def stop(self, state: str, reason: str) -> None:
        """End the read from our side (cancel, delete, shutdown)."""
        self._end(state, reason)

    def _end(self, state: str, reason: str) -> None:
        if self.done.done():
            return
        self._deadline.cancel()
        if self._stall is not None:
            self._stall.close()
        self._close_upstream()
        try:
            self._store.end(self._session_id, state, reason, time.time_ns())
        except (SessionMissing, StorageError) as exc:  # deleted meanwhile, or the store broke
            log.debug("session %s: no end record written: %s", self._session_id, exc)
        self._metrics.session_ended(state)
        self.done.set_result(None)


def _nothing() -> None:
    return None


async def _read_aiohttp(upstream: aiohttp.ClientResponse, pump: Pump) -> None:
    try:
        async for chunk in upstream.content.iter_any():
            pump.feed(chunk)
            if pump.done.done():
                return
        pump.finish()
    except aiohttp.ServerTimeoutError:
        pump.fail(STALLED)
    except (aiohttp.ClientError, ConnectionError) as exc:
        pump.fail(f"upstream connection broke: {type(exc).__name__}")
    finally:
        upstream.release()


class _StallWatch:
    """Fails a pump whose upstream has sent nothing for `upstream.idle_timeout`.

    Re-arming a timer on every read would put a timer on the hot path per event; instead
    each read bumps the pump's counter, and a timer ticking four times per idle period
    fails the pump once the counter has not moved for four ticks (so a stall ends between
    1 and 1.25 idle periods in).
    """

    __slots__ = ("_handle", "_loop", "_period", "_pump", "_quiet", "_seen")
    TICKS = 4

    def __init__(self, idle: float, pump: Pump) -> None:
        self._loop = asyncio.get_running_loop()
        self._pump = pump
        self._period = idle / self.TICKS
        self._seen = pump.reads
        self._quiet = 0
        self._handle = self._loop.call_later(self._period, self._tick)

    def _tick(self) -> None:
        reads = self._pump.reads
        if reads != self._seen:
            self._seen = reads
            self._quiet = 0
        else:
            self._quiet += 1
            if self._quiet >= self.TICKS:
                self._pump.fail(STALLED)
                return
        self._handle = self._loop.call_later(self._period, self._tick)

    def close(self) -> None:
        self._handle.cancel()
