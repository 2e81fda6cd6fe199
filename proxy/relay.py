"""Forwarding one request upstream and relaying a non-stream answer back.

Streams (`text/event-stream`) leave this module at `is_event_stream`: they become sessions
(`sessions.py`), whose upstream read outlives the request that started it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import Config, UpstreamConfig
from .errors import BodyTooLarge, RequestTimeout, UpstreamTimeout, UpstreamUnavailable
from .upstream import Origin, UpstreamConnection, open_stream

log = logging.getLogger("proxy.relay")

# RFC 9110 §7.6.1 connection-specific fields, plus those a proxy must not forward by
# RFC 9112 (Transfer-Encoding is per hop) and the de facto Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """A client request as it will be sent upstream, plus what a session logs about it."""

    method: str
    path: str  # raw path and query, as the client sent them
    headers: CIMultiDict[str]
    body: bytes
    body_sha256: str


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", []):
        tokens.update(token.strip().lower() for token in value.split(",") if token.strip())
    return tokens


def header_text(value: str) -> str:
    """A header value as aiohttp's writers can send it on without losing a byte.

    aiohttp's parsers decode field values as UTF-8 with surrogate escapes and its writers
    silently skip the surrogates, so obs-text bytes (0x80-0xFF, RFC 9110 §5.5) that are not
    UTF-8 would vanish from a header it sends. Such a value is read as ISO-8859-1 instead,
    so every byte arrives as its character; UTF-8 values are left as they are. (Requests on
    the raw upstream connection, `upstream.py`, send the bytes exactly as they came.)
    """
    if value.isascii():
        return value
    raw = value.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
    return value


def forward_headers(request: web.Request, config: Config) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop ones, Host, Content-Length and our session header.

    `Accept-Encoding: identity` is requested when the body asks for a stream, because the
    framer needs plain bytes and re-sending a stream under a stale encoding would break it.
    `Expect` is never forwarded: the proxy answers `100-continue` itself (aiohttp's expect
    handler) and has the whole body before it calls upstream, where an `Expect` would make
    the client wait for a `100` that an upstream may never send.
    """
    dropped = HOP_BY_HOP | _connection_tokens(request.headers)
    own = {"host", "content-length", "expect", config.session.header.lower()}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lowered = name.lower()
        if lowered in dropped or lowered in own:
            continue
        headers.add(name, value)
    if config.upstream.api_key and "Authorization" not in headers:
        headers["Authorization"] = f"Bearer {config.upstream.api_key}"
    return headers


def response_headers(
    upstream: aiohttp.ClientResponse | UpstreamConnection, *, stream: bool
) -> CIMultiDict[str]:
    """Upstream response headers to send on; streams lose the length and gain no-cache."""
    dropped = HOP_BY_HOP | _connection_tokens(upstream.headers)
    if stream:
        dropped = dropped | {"content-length", "content-encoding", "cache-control"}
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        if name.lower() not in dropped:
            headers.add(name, header_text(value))
    if stream:
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
    return headers


def is_event_stream(upstream: aiohttp.ClientResponse | UpstreamConnection) -> bool:
    if upstream.status >= 400:
        return False
    return upstream.content_type == "text/event-stream"


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refusing more than `limit` bytes before reading them."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(_READ_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _target_path(request: web.Request) -> str:
    """The request's path and query as sent, to append to `upstream.url`.

    An absolute-form target (`GET http://host/x`, RFC 9112 §3.2.2) must not be appended
    whole: `https://api.example.co` + `m://...` would name another host, which would then
    receive the client's credentials. Its authority is ignored and only its path is kept.
    """
    raw = request.raw_path
    return raw if raw.startswith("/") else request.rel_url.raw_path_qs


async def build_upstream_request(request: web.Request, config: Config) -> UpstreamRequest:
    timeout = config.server.body_timeout
    try:
        async with asyncio.timeout(timeout):
            body = await read_body(request, config.server.max_body_bytes)
    except TimeoutError:
        # A client trickling its body would hold a connection (and a file descriptor)
        # for as long as it likes otherwise.
        raise RequestTimeout(
            f"the request body was not received within server.body_timeout ({timeout:g}s)"
        ) from None
    return UpstreamRequest(
        method=request.method,
        path=_target_path(request),
        headers=forward_headers(request, config),
        body=body,
        body_sha256=hashlib.sha256(body).hexdigest(),
    )


def may_stream(outgoing: UpstreamRequest) -> bool:
    """Whether the answer may be an event stream: a POST whose body asks for one.

    Such requests go over a raw connection (`upstream.py`) that hands each read to the
    session without a task switch; the rest use aiohttp's pooled client, which still handles
    a stream it did not expect.
    """
    return outgoing.method == "POST" and b'"stream"' in outgoing.body


def _stream_headers(outgoing: UpstreamRequest) -> CIMultiDict[str]:
    headers = outgoing.headers
    if b'"stream"' in outgoing.body and "Accept-Encoding" in headers:
        headers = headers.copy()
        headers["Accept-Encoding"] = "identity"
    return headers


async def open_upstream_stream(
    origin: Origin, outgoing: UpstreamRequest, config: UpstreamConfig
) -> tuple[UpstreamConnection, int]:
    """Send a may-stream request on a raw connection; returns it (headers read) and the wall
    time it was sent."""
    sent_ns = time.time_ns()
    connection = await open_stream(
        origin,
        outgoing.method,
        outgoing.path,
        _stream_headers(outgoing),
        outgoing.body,
        connect_timeout=config.connect_timeout,
        head_timeout=config.idle_timeout,
    )
    return connection, sent_ns


async def send_upstream(
    client: aiohttp.ClientSession, base_url: str, outgoing: UpstreamRequest
) -> tuple[aiohttp.ClientResponse, int]:
    """Send the request; returns the response (headers read) and the wall time it was sent."""
    url = URL(base_url + outgoing.path, encoded=True)
    headers = CIMultiDict(
        (name, header_text(value)) for name, value in _stream_headers(outgoing).items()
    )
    sent_ns = time.time_ns()
    try:
        response = await client.request(
            outgoing.method,
            url,
            headers=headers,
            data=outgoing.body if outgoing.body else None,
            allow_redirects=False,
        )
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        if isinstance(exc, aiohttp.ConnectionTimeoutError) or "connect" in str(exc).lower():
            raise UpstreamUnavailable(f"upstream did not accept a connection: {exc}") from None
        raise UpstreamTimeout("upstream sent no response headers in time") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"upstream unreachable: {type(exc).__name__}") from None
    return response, sent_ns


async def relay_plain(
    request: web.Request, upstream: aiohttp.ClientResponse | UpstreamConnection
) -> web.StreamResponse:
    """Relay a non-stream answer as it comes: status, headers and body bytes unchanged."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
    response.headers.extend(response_headers(upstream, stream=False))
    chunks = (
        upstream.chunks()
        if isinstance(upstream, UpstreamConnection)
        else upstream.content.iter_any()
    )
    try:
        await response.prepare(request)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        log.debug("client left during a plain response to %s", request.path)
    except (TimeoutError, ConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientError):
        # Headers are already sent, so the only honest signal left is a cut connection.
        log.warning("upstream broke off a plain response to %s", request.path)
        if request.transport is not None:
            request.transport.close()
    finally:
        if isinstance(upstream, UpstreamConnection):
            upstream.close()
        else:
            upstream.release()
    return response
