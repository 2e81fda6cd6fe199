"""httpx transports that make a dropped resumable-proxy stream invisible to the app.

Sync OpenAI SDK (``httpx2.Client`` works the same way as ``httpx.Client``)::

    import httpx
    from openai import OpenAI
    from proxy.client import ResumingTransport

    client = OpenAI(
        base_url="http://localhost:8080/v1",
        http_client=httpx.Client(transport=ResumingTransport()),
    )
    for chunk in client.chat.completions.create(model=..., messages=..., stream=True):
        ...  # every chunk once, in order, however often the connection drops

Async::

    client = AsyncOpenAI(
        base_url="http://localhost:8080/v1",
        http_client=httpx.AsyncClient(transport=AsyncResumingTransport()),
    )

How it works. A response that is ``text/event-stream`` and carries the session header is the
proxy's: its body is handed to the SDK one whole event at a time (a cut in the middle of an
event never leaks half an event), and the transport remembers the last event's ``id:``. When
the connection breaks (reset, EOF before the end of the chunked body, read timeout) it asks
``GET {origin}/sessions/{id}/events`` with ``Last-Event-ID`` and the original request's headers
(the session is bound to its ``Authorization``, ``x-api-key`` or ``api-key``; a request with
none of them sends the session's ``X-Resume-Token`` as ``?token=``) and splices that
continuation into the same body. The proxy ends a stream by closing the body cleanly, so a
clean end is the end, and so is a ``204`` to a resume (the break came after the last event);
every break is an exception from httpx.

Retries: the first resume is sent at once (a dropped connection is the usual cause and the
proxy is still there), later ones after an exponential backoff with jitter. At most
``max_retries`` attempts in a row may fail; any event that arrives resets that count, so a
long stream survives any number of drops as long as each resume makes progress. When the
attempts run out, or the proxy answers that the session cannot be resumed (404: deleted,
expired, another credential), the error that broke the stream is raised, exactly as without
the transport. A session that ended ``failed``/``cancelled``/``interrupted`` ends with an
``{"error": ...}`` event, which passes through and becomes the SDK's ``APIError``.

Not resumed: a drop before the response headers arrive (there is no session id yet, and
sending the request again would call the model again; the SDK's own retry policy decides),
compressed streams, and anything that is not a proxy stream, which passes through untouched.

httpx and httpx2 (the fork openai 3.x uses) have the same API but distinct classes, and a
client asserts that a response stream is an instance of its own module's byte-stream class.
So the transport looks at which module built the request and answers with that module's
types, wrapping a default transport of that module unless ``inner`` is given.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

import anyio

# A blank line ends an event; LF, CRLF and CR line ends as in WHATWG HTML §9.2.6 (the proxy
# relays upstream's line ends unchanged). `\r(?!\n)` keeps a CRLF whole.
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_ID_LINE = re.compile(rb"(?:^|[\r\n])id(?::\x20?([^\r\n]*))?(?=[\r\n]|$)")
_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")
_TOKEN_HEADER = "X-Resume-Token"
# Headers that described the original request's body or routing, not the caller.
_NOT_CARRIED = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "accept",
        "accept-encoding",
        "last-event-id",
        "connection",
    }
)


@dataclass(frozen=True, slots=True)
class _Policy:
    max_retries: int
    backoff: float
    max_backoff: float
    session_header: str

    def delay(self, attempt: int) -> float:
        """Attempt 0 goes at once; then backoff, 2*backoff, ... capped, times 0.5-1 jitter."""
        if attempt == 0:
            return 0.0
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1)


def _module_of(request: Any) -> ModuleType:
    """`httpx` or `httpx2`, whichever built the request."""
    return sys.modules[type(request).__module__.partition(".")[0]]


def _resumable_errors(module: ModuleType) -> tuple[type[Exception], ...]:
    return (module.NetworkError, module.TimeoutException, module.RemoteProtocolError)


def _proxy_session(response: Any, policy: _Policy) -> str | None:
    """The session id when `response` is a resumable-proxy stream we can splice, else None."""
    headers = response.headers
    if response.status_code != 200:
        return None
    if not headers.get("content-type", "").startswith("text/event-stream"):
        return None
    if headers.get("content-encoding", "identity").lower() != "identity":
        return None
    session_id: str | None = headers.get(policy.session_header)
    return session_id


class _Splice:
    """One proxy stream's position and the request that continues it.

    `feed` turns raw reads into whole events and keeps the number of the last one: its `id:`
    when it has one, else one more than the previous (with `session.event_ids: false` the
    offset is the count of events).
    """

    def __init__(self, request: Any, response: Any, session_id: str, policy: _Policy) -> None:
        self.module = _module_of(request)
        self.errors = _resumable_errors(self.module)
        self.session_id = session_id
        self.token: str | None = response.headers.get(_TOKEN_HEADER)
        self.offset = 0
        self._request = request
        self._policy = policy
        self._pending = b""
        self._failures = 0  # resume attempts since the last event arrived

    def feed(self, chunk: bytes) -> bytes:
        """The whole events completed by `chunk`, as bytes for the SDK; b"" if none yet."""
        buffer = self._pending + chunk if self._pending else chunk
        # A trailing CR may be the first half of a CRLF still in flight.
        searchable = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
        start = 0
        for boundary in _BOUNDARY.finditer(buffer, 0, searchable):
            ids = _ID_LINE.findall(buffer[start : boundary.start()])
            self.offset = int(ids[-1]) if ids and ids[-1].isdigit() else self.offset + 1
            start = boundary.end()
        if start == 0:
            self._pending = buffer
            return b""
        self._pending = buffer[start:]
        self._failures = 0
        return buffer[:start]

    def finish(self) -> bytes:
        """Whatever followed the last event when the stream ended cleanly (a keep-alive)."""
        rest, self._pending = self._pending, b""
        return rest

    def next_delay(self) -> float | None:
        """Seconds to wait before the next resume attempt; None when the budget is spent."""
        if self._failures >= self._policy.max_retries:
            return None
        self._failures += 1
        return self._policy.delay(self._failures - 1)

    def resume_request(self) -> Any:
        """`GET /sessions/{id}/events` at the proxy's origin, as the original caller.

        Half an event may have arrived before the break; it is dropped and comes again whole.
        """
        self._pending = b""
        original = self._request
        headers = [
            (name, value)
            for name, value in original.headers.multi_items()
            if name.lower() not in _NOT_CARRIED
            and name.lower() != self._policy.session_header.lower()
        ]
        headers += [
            ("Accept", "text/event-stream"),
            ("Accept-Encoding", "identity"),
            ("Last-Event-ID", str(self.offset)),
        ]
        url = original.url.join(f"/sessions/{self.session_id}/events")
        if self.token and not any(name in original.headers for name in _CREDENTIAL_HEADERS):
            url = url.copy_merge_params({"token": self.token})
        return self.module.Request(
            "GET",
            url,
            headers=headers,
            extensions=dict(original.extensions),
        )

    def continues(self, response: Any) -> bool | None:
        """True: splice it in (a 204's empty body ends the stream). False: try again later.
        None: the session is out of reach."""
        if response.status_code == 204 or _proxy_session(response, self._policy) == self.session_id:
            return True
        status = response.status_code
        return False if status == 429 or status >= 500 else None

    def give_up(self, error: Exception) -> Exception:
        error.add_note(
            f"resumable-proxy: could not resume session {self.session_id} after event "
            f"{self.offset} ({self._failures} attempts)"
        )
        return error


class _SyncStream:
    """The response body: the first connection's events, then each continuation's."""

    def __init__(self, inner: Any, splice: _Splice, body: Any) -> None:
        self._inner = inner
        self._splice = splice
        self._body = body  # the byte stream of the connection being read

    def __iter__(self) -> Iterator[bytes]:
        splice = self._splice
        while True:
            try:
                for chunk in self._body:
                    events = splice.feed(chunk)
                    if events:
                        yield events
            except splice.errors as error:
                self._body = self._reconnect(error)
                continue
            rest = splice.finish()
            if rest:
                yield rest
            return

    def _reconnect(self, error: Exception) -> Any:
        splice = self._splice
        self.close()
        while (delay := splice.next_delay()) is not None:
            time.sleep(delay)
            try:
                response = self._inner.handle_request(splice.resume_request())
            except splice.errors:
                continue
            verdict = splice.continues(response)
            if verdict:
                return response.stream
            response.close()
            if verdict is None:
                break
        raise splice.give_up(error)

    def close(self) -> None:
        with contextlib.suppress(*self._splice.errors):
            self._body.close()


class _AsyncStream:
    """`_SyncStream` for async clients; same logic, awaited."""

    def __init__(self, inner: Any, splice: _Splice, body: Any) -> None:
        self._inner = inner
        self._splice = splice
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splice = self._splice
        while True:
            try:
                async for chunk in self._body:
                    events = splice.feed(chunk)
                    if events:
                        yield events
            except splice.errors as error:
                self._body = await self._reconnect(error)
                continue
            rest = splice.finish()
            if rest:
                yield rest
            return

    async def _reconnect(self, error: Exception) -> Any:
        splice = self._splice
        await self.aclose()
        while (delay := splice.next_delay()) is not None:
            await anyio.sleep(delay)
            try:
                response = await self._inner.handle_async_request(splice.resume_request())
            except splice.errors:
                continue
            verdict = splice.continues(response)
            if verdict:
                return response.stream
            await response.aclose()
            if verdict is None:
                break
        raise splice.give_up(error)

    async def aclose(self) -> None:
        with contextlib.suppress(*self._splice.errors):
            await self._body.aclose()


@functools.cache
def _stream_type(implementation: type, base: type) -> type:
    """`implementation` as a subclass of the client module's byte-stream class, which the
    client asserts every transport response has."""
    return type(f"Resuming{base.__name__}", (implementation, base), {})


class _Resuming:
    """What both transports keep: the inner transport and the resume policy.

    `inner` is the transport that does the I/O (default: the client module's own, made on the
    first request). `max_retries` bounds consecutive failed resume attempts,
    `backoff`/`max_backoff` (seconds) shape the waits between them.
    """

    def __init__(
        self,
        inner: Any = None,
        *,
        max_retries: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        session_header: str = "X-Resume-Session-Id",
    ) -> None:
        self._inner = inner
        self._policy = _Policy(max_retries, backoff, max_backoff, session_header)


class ResumingTransport(_Resuming):
    """A sync httpx/httpx2 transport that resumes broken resumable-proxy streams
    (default inner: the module's `HTTPTransport()`)."""

    def __init__(self, inner: Any = None, **policy: Any) -> None:
        super().__init__(inner, **policy)
        self._lock = threading.Lock()

    def _inner_for(self, request: Any) -> Any:
        with self._lock:
            if self._inner is None:
                self._inner = _module_of(request).HTTPTransport()
            return self._inner

    def handle_request(self, request: Any) -> Any:
        inner = self._inner_for(request)
        response = inner.handle_request(request)
        session_id = _proxy_session(response, self._policy)
        if session_id is not None:
            splice = _Splice(request, response, session_id, self._policy)
            stream_type = _stream_type(_SyncStream, splice.module.SyncByteStream)
            response.stream = stream_type(inner, splice, response.stream)
        return response

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()

    def __enter__(self) -> ResumingTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.close()


class AsyncResumingTransport(_Resuming):
    """The async twin of `ResumingTransport` (default inner: `AsyncHTTPTransport()`)."""

    async def handle_async_request(self, request: Any) -> Any:
        # No lock: nothing awaits between the check and the assignment.
        if self._inner is None:
            self._inner = _module_of(request).AsyncHTTPTransport()
        inner = self._inner
        response = await inner.handle_async_request(request)
        session_id = _proxy_session(response, self._policy)
        if session_id is not None:
            splice = _Splice(request, response, session_id, self._policy)
            stream_type = _stream_type(_AsyncStream, splice.module.AsyncByteStream)
            response.stream = stream_type(inner, splice, response.stream)
        return response

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()

    async def __aenter__(self) -> AsyncResumingTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()
