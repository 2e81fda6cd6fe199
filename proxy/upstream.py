"""A raw HTTP/1.1 upstream connection for requests that may answer with a stream.

aiohttp's client delivers a body through a `StreamReader` that wakes a task per read; for a
stream of tokens that is one task switch per event, more than everything else the relay
does with it. Here the upstream socket is an `asyncio.Protocol` whose `data_received` runs
httptools' response parser (as uvicorn does on its server side), and the decoded body bytes go
straight to the session that owns the stream, in the same callback: frame, log, and push to
caught-up readers, with no task in between.

Plain (non-stream) answers from such a connection are relayed as they come through
`chunks()`. Requests that cannot be streams keep using aiohttp's pooled client.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import httptools
from multidict import CIMultiDict
from yarl import URL

from .errors import UpstreamTimeout, UpstreamUnavailable

_PAUSE_BYTES = 256 * 1024  # a plain answer buffered past this pauses the upstream socket


class BodySink(Protocol):
    """Where a stream's body goes, read by read (the session's pump)."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> None:
        """The body ended cleanly."""

    def fail(self, reason: str) -> None:
        """The body broke off: connection lost, unparsable framing, stalled."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where `upstream.url` points, parsed once."""

    host: str
    port: int
    base_path: str
    host_header: str
    tls: ssl.SSLContext | None

    @classmethod
    def parse(cls, url: str) -> Origin:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"not an http(s) URL: {url}")
        tls = ssl.create_default_context() if parsed.scheme == "https" else None
        default = 443 if tls else 80
        port = parsed.port or default
        host_header = parsed.raw_host or parsed.host
        if ":" in host_header and not host_header.startswith("["):
            host_header = f"[{host_header}]"
        if port != default:
            host_header = f"{host_header}:{port}"
        return cls(parsed.host, port, parsed.raw_path.rstrip("/"), host_header, tls)


class UpstreamConnection(asyncio.Protocol):
    """One request and its answer on one connection (closed after; streams are long)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._names_values: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._sink: BodySink | None = None
        self._held: list[bytes] = []  # body read before a sink or reader took it
        self._held_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False  # the parser saw the whole answer
        self._finished = False  # ... and whoever takes the body was told
        self._in_read = False
        self._pieces: list[bytes] = []  # body pieces of the read being parsed
        self._until_close = False  # no length, not chunked: the body ends with the connection
        self._error: str | None = None
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._in_read = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken("upstream switched protocols")
        except httptools.HttpParserError as exc:
            self._broken(f"unparsable HTTP from upstream: {exc}")
        finally:
            self._in_read = False
        # One read can hold many HTTP chunks (an API flushing several events at once): the
        # session gets them as one piece, so framing, logging and pushing happen per read.
        pieces = self._pieces
        if pieces:
            self._pieces = []
            sink = self._sink
            if sink is not None:
                sink.feed(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            else:
                self._hold(pieces)
        if self._complete:
            self._ended()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._complete:
            return
        if self._head.done() and self._until_close and exc is None:
            self.on_message_complete()
            return
        reason = "upstream closed the connection" if exc is None else type(exc).__name__
        self._broken(f"upstream connection broke: {reason}")

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._names_values.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 1xx interim answers (we never send Expect); wait for the real one
            self._names_values.clear()
            self._reason = b""
            return
        self.status = status
        self.reason = self._reason.decode("latin-1")
        headers = self.headers
        for name, value in self._names_values:
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        self._names_values.clear()
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._until_close = not chunked and "Content-Length" not in headers
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        if self._complete:
            return
        self._complete = True
        if self._transport is not None:
            self._transport.close()
        if not self._in_read:  # at EOF of a body that ends with the connection
            self._ended()

    def _ended(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._sink is not None:
            self._sink.finish()
        self._wake()

    def _hold(self, pieces: list[bytes]) -> None:
        self._held.extend(pieces)
        self._held_bytes += sum(map(len, pieces))
        if self._held_bytes > _PAUSE_BYTES and self._transport is not None:
            self._transport.pause_reading()
        self._wake()

    # the two ways to take the body

    def attach(self, sink: BodySink) -> None:
        """Hand every body read, those already here first, to `sink`, synchronously."""
        held, self._held = self._held, []
        self._held_bytes = 0
        for chunk in held:
            sink.feed(chunk)
        self._sink = sink
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
        if self._finished:
            sink.finish()
        elif self._error is not None:
            sink.fail(self._error)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body read by read, for relaying a plain answer at the client's pace."""
        while True:
            if self._held:
                held, self._held = self._held, []
                self._held_bytes = 0
                if self._transport is not None and not self._transport.is_closing():
                    self._transport.resume_reading()
                for chunk in held:
                    yield chunk
                continue
            if self._finished:
                return
            if self._error is not None:
                raise ConnectionError(self._error)
            self._waiter = self._loop.create_future()
            await self._waiter

    def close(self) -> None:
        self._complete = self._finished = True  # whatever arrives now is not ours to report
        if self._transport is not None:
            self._transport.close()

    # internals

    def _broken(self, reason: str) -> None:
        if self._complete or self._error is not None:
            return
        self._error = reason
        if self._transport is not None:
            self._transport.close()
        if not self._head.done():
            self._head.set_exception(UpstreamUnavailable(reason))
            return
        if self._sink is not None:
            self._sink.fail(reason)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._waiter = None

    async def response_head(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._head
        except TimeoutError:
            self.close()
            raise UpstreamTimeout("upstream sent no response headers in time") from None

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def request_head(
    origin: Origin, method: str, path: str, headers: CIMultiDict[str], body: bytes
) -> bytes:
    """The request line and headers, as the client sent them but for Host and framing.

    Header values travel as the bytes they came as: aiohttp decodes them as UTF-8 with
    surrogate escapes, which this undoes. A CR or LF cannot survive aiohttp's parser, so none
    is checked for here.
    """
    lines = [f"{method} {origin.base_path}{path} HTTP/1.1", f"Host: {origin.host_header}"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


async def open_stream(
    origin: Origin,
    method: str,
    path: str,
    headers: CIMultiDict[str],
    body: bytes,
    *,
    connect_timeout: float,
    head_timeout: float,
) -> UpstreamConnection:
    """Connect, send the request, and return once the answer's headers are in."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            _transport, connection = await loop.create_connection(
                UpstreamConnection,
                origin.host,
                origin.port,
                ssl=origin.tls,
                server_hostname=origin.host if origin.tls else None,
            )
    except TimeoutError:
        raise UpstreamUnavailable("upstream did not accept a connection in time") from None
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamUnavailable(f"upstream unreachable: {type(exc).__name__}") from None
    transport = connection._transport
    assert transport is not None
    transport.write(request_head(origin, method, path, headers, body) + body)
    await connection.response_head(head_timeout)
    return connection
