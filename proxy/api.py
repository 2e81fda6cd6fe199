"""HTTP handlers: the proxied catch-all and the owned paths (/sessions..., /healthz, ...).

Handlers raise `ProxyError`s; the error middleware in `app.py` turns them into JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from importlib import resources

import aiofiles
import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .access import (
    TOKEN_HEADER,
    credential,
    credential_digest,
    is_admin,
    may_access,
    session_token,
    token_opens,
)
from .config import SESSION_ID_PATTERN, Config
from .errors import (
    InvalidCursor,
    InvalidLimit,
    InvalidOffset,
    InvalidState,
    NotFound,
    OffsetOutOfRange,
    SessionConflict,
    SessionNotFound,
)
from .metrics import Metrics
from .readers import EventStreamResponse, error_event, follow
from .relay import (
    UpstreamRequest,
    build_upstream_request,
    is_event_stream,
    may_stream,
    open_upstream_stream,
    relay_plain,
    response_headers,
    send_upstream,
)
from .sessions import SessionManager, check_session_id, new_session_id
from .storage.base import (
    COMPLETE,
    FAILED,
    STATES,
    STREAMING,
    SessionInfo,
    SessionMeta,
    SessionStore,
    StorageError,
)
from .summary import iso_time, session_details, session_summary
from .upstream import Origin, UpstreamConnection

log = logging.getLogger("proxy.api")

SESSION_ID = web.RequestKey("session_id", str)
EVENTS_SENT = web.RequestKey("events_sent", int)

_OFFSET = re.compile(r"^\s*(\d{1,18})\s*$", re.ASCII)  # `\d` alone takes "٣" as 3
DEFAULT_PAGE = 100  # sessions per GET /sessions page without ?limit=
MAX_PAGE = 1000
# Headers a replay sends again; the rest of the upstream's headers described that one reply.
_REPLAY_HEADERS = frozenset(
    {"content-type", "openai-model", "openai-organization", "openai-version", "x-request-id"}
)


def body_digest(body: bytes) -> str:
    """What a repeat must match: the JSON value when the body is JSON, else the bytes.

    SDKs and apps rebuild a request from the same data with keys in another order or other
    spacing; hashing canonical JSON (sorted keys, no whitespace) makes those repeats replay.
    """
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return hashlib.sha256(body).hexdigest()
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def parse_limit(value: str | None) -> int:
    """`?limit=` of GET /sessions: 1..MAX_PAGE, DEFAULT_PAGE when absent."""
    if value is None:
        return DEFAULT_PAGE
    match = _OFFSET.match(value)
    if match is None or not 1 <= int(match.group(1)) <= MAX_PAGE:
        raise InvalidLimit(f"limit must be an integer from 1 to {MAX_PAGE}, got {value[:40]!r}")
    return int(match.group(1))


def parse_offset(value: str, source: str) -> int:
    match = _OFFSET.match(value)
    if match is None:
        raise InvalidOffset(f"{source} must be a non-negative integer, got {value[:40]!r}")
    return int(match.group(1))


@dataclass(slots=True)
class Api:
    config: Config
    manager: SessionManager
    client: aiohttp.ClientSession
    upstream_url: str
    origin: Origin
    metrics: Metrics
    token_key: bytes | None = None  # None: capability tokens are off (session.tokens)
    # Client-chosen ids whose first request waits for upstream's headers right now.
    _creating: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    @property
    def store(self) -> SessionStore:
        return self.manager.store

    # --- the proxied catch-all -------------------------------------------------------------

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        requested_id = self.requested_id(request)
        outgoing = await build_upstream_request(request, self.config)
        return await self.forward(request, outgoing, requested_id)

    def requested_id(self, request: web.Request) -> str | None:
        """The session id the client chose (session header), checked; None if it chose none."""
        requested_id = request.headers.get(self.config.session.header)
        return None if requested_id is None else check_session_id(requested_id)

    async def forward(
        self, request: web.Request, outgoing: UpstreamRequest, requested_id: str | None
    ) -> web.StreamResponse:
        """Replay the session the client named, or send the request upstream and relay it."""
        if requested_id is None:
            return await self._forward(request, outgoing, None)
        while True:
            info = await self.store.get(requested_id)
            if info is not None:
                return await self._replay_repeat(request, info, outgoing)
            creating = self._creating.get(requested_id)
            if creating is None:
                break
            # An SDK retry (or a second tab) with the same id while the first request still
            # waits for upstream's headers: wait, then replay what it started (or, if it
            # started no session, ask upstream ourselves).
            await asyncio.shield(creating)
        creating = self._creating[requested_id] = asyncio.get_running_loop().create_future()
        try:
            return await self._forward(request, outgoing, requested_id)
        finally:
            self._created(requested_id, creating)

    async def _forward(
        self, request: web.Request, outgoing: UpstreamRequest, requested_id: str | None
    ) -> web.StreamResponse:
        upstream, sent_ns = await self.send(outgoing)
        if not is_event_stream(upstream):
            return await relay_plain(request, upstream)
        meta, headers = await self.open_session(request, outgoing, upstream, sent_ns, requested_id)
        return await self.serve_new_session(request, upstream, headers, meta.session_id)

    def _created(self, session_id: str, creating: asyncio.Future[None] | None = None) -> None:
        """Wake the requests waiting for the creation of `session_id` (it now exists in the
        store, or the request that was to create it is done)."""
        current = self._creating.get(session_id)
        if creating is None:
            creating = current
        if creating is None:
            return
        if current is creating:
            del self._creating[session_id]
        if not creating.done():
            creating.set_result(None)

    async def send(
        self, outgoing: UpstreamRequest
    ) -> tuple[aiohttp.ClientResponse | UpstreamConnection, int]:
        """Send a request upstream; its response (headers read) and the wall time it was sent."""
        if may_stream(outgoing):
            return await open_upstream_stream(self.origin, outgoing, self.config.upstream)
        return await send_upstream(self.client, self.upstream_url, outgoing)

    async def open_session(
        self,
        request: web.Request,
        outgoing: UpstreamRequest,
        upstream: aiohttp.ClientResponse | UpstreamConnection,
        sent_ns: int,
        requested_id: str | None,
    ) -> tuple[SessionMeta, CIMultiDict[str]]:
        """Log the stream as a new session and start its upstream read; the session's meta
        and the headers its first reader gets."""
        config = self.config
        headers = response_headers(upstream, stream=True)
        meta = SessionMeta(
            session_id=requested_id or new_session_id(),
            method=outgoing.method,
            path=outgoing.path,
            body_sha256=body_digest(outgoing.body),
            credential_sha256=credential_digest(request, config),
            created_ns=sent_ns,
            request_ns=sent_ns,
            upstream_status=upstream.status,
            headers=tuple((k, v) for k, v in headers.items() if k.lower() in _REPLAY_HEADERS),
        )
        if requested_id is not None:
            try:
                # Another request (here, on another replica or worker) may have created this
                # id while ours was upstream: the store lets exactly one of them have it.
                await self.store.claim(meta)
            except BaseException:
                upstream.close()
                raise
        self.manager.start(meta, upstream)
        if requested_id is not None:
            self._created(requested_id)
        return meta, headers

    async def serve_new_session(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse | UpstreamConnection,
        headers: CIMultiDict[str],
        session_id: str,
    ) -> web.StreamResponse:
        """The stream of a session just opened, to the client that asked for it."""
        response = EventStreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(headers)
        response.headers[self.config.session.header] = session_id
        self._add_token(response, session_id)
        return await self._serve_reader(request, response, session_id, 0)

    def _add_token(self, response: web.StreamResponse, session_id: str) -> None:
        if self.token_key is not None:
            response.headers[TOKEN_HEADER] = session_token(self.token_key, session_id)

    async def _replay_repeat(
        self, request: web.Request, info: SessionInfo, outgoing: UpstreamRequest
    ) -> web.StreamResponse:
        self.check_repeat(request, info, outgoing)
        offset = 0
        last_event_id = request.headers.get("Last-Event-ID")
        if last_event_id is not None:
            offset = parse_offset(last_event_id, "Last-Event-ID")
        return await self._replay(request, info, offset)

    def check_repeat(
        self, request: web.Request, info: SessionInfo, outgoing: UpstreamRequest
    ) -> None:
        """A repeat names an existing session: only its owner, and only the same request."""
        if not may_access(request, self.config, info):
            raise SessionNotFound("no such session")
        meta = info.meta
        # Sessions logged before bodies were hashed as JSON hold the hash of the raw bytes.
        same_body = meta.body_sha256 in (body_digest(outgoing.body), outgoing.body_sha256)
        if (meta.method, meta.path) != (outgoing.method, outgoing.path) or not same_body:
            raise SessionConflict(
                f"session {meta.session_id} belongs to a different request "
                f"({meta.method} {meta.path.split('?')[0]})"
            )

    # --- replay ----------------------------------------------------------------------------

    async def _replay(
        self, request: web.Request, info: SessionInfo, offset: int
    ) -> web.StreamResponse:
        if info.state != STREAMING and offset > info.events:
            raise OffsetOutOfRange(
                f"offset {offset} is past the end of session {info.session_id} "
                f"({info.events} events, {info.state})"
            )
        self.metrics.replay_started()
        response = EventStreamResponse(status=200)
        for name, value in info.meta.headers:
            response.headers.add(name, value)
        if "Content-Type" not in response.headers:
            response.headers["Content-Type"] = "text/event-stream"
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.headers[self.config.session.header] = info.session_id
        self._add_token(response, info.session_id)
        return await self._serve_reader(request, response, info.session_id, offset)

    async def _serve_reader(
        self, request: web.Request, response: web.StreamResponse, session_id: str, offset: int
    ) -> web.StreamResponse:
        request[SESSION_ID] = session_id
        metrics = self.metrics
        request[EVENTS_SENT] = 0

        def on_write(count: int, arrival_ns: int | None) -> None:
            request[EVENTS_SENT] += count
            metrics.events_written(
                count, None if arrival_ns is None else time.time_ns() - arrival_ns
            )

        metrics.reader_joined()
        try:
            await response.prepare(request)
            await follow(
                request,
                response,
                self.store,
                session_id,
                offset,
                self.config.session.keepalive,
                on_write=on_write,
            )
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            log.debug("reader of session %s left", session_id)
        except StorageError as exc:
            log.error("session %s: a reader stopped at a storage error: %s", session_id, exc)
            await end_stream(request, response, error_event(FAILED, f"storage error: {exc}"))
        finally:
            self.metrics.reader_left()
        return response

    # --- owned paths -----------------------------------------------------------------------

    async def _owned_session(self, request: web.Request, *, token: bool = False) -> SessionInfo:
        """The session of the path, if the caller may see it; `token`: its capability token
        (`?token=`) opens it too, which only the events path allows."""
        session_id = check_session_id(request.match_info["session_id"])
        info = await self.store.get(session_id)
        if info is None:
            raise SessionNotFound("no such session")
        presented = request.query.get("token") if token else None
        if presented is not None and token_opens(self.token_key, session_id, presented):
            return info
        if not may_access(request, self.config, info):
            raise SessionNotFound("no such session")
        return info

    async def session_events(self, request: web.Request) -> web.StreamResponse:
        info = await self._owned_session(request, token=True)
        last_event_id = request.headers.get("Last-Event-ID")
        if last_event_id is not None:
            offset = parse_offset(last_event_id, "Last-Event-ID")
        else:
            offset = parse_offset(request.query.get("offset", "0"), "offset")
        if info.state == COMPLETE and offset == info.events:
            # Nothing more will ever come. An EventSource stops reconnecting on a 204; on an
            # empty 200 it would poll a finished session forever. A session that ended with
            # an error still answers its final error event here: a client resuming right at
            # the end (its proxy died, say) must learn that the answer is cut, not that it
            # ended.
            request[SESSION_ID] = info.session_id
            return web.Response(status=204)
        return await self._replay(request, info, offset)

    async def get_session(self, request: web.Request) -> web.Response:
        info = await self._owned_session(request)
        arrivals = await self.store.arrivals(info.session_id)
        return web.json_response(session_details(info, arrivals))

    async def delete_session(self, request: web.Request) -> web.Response:
        info = await self._owned_session(request)
        await self.delete(info.session_id)
        return web.json_response({"id": info.session_id, "deleted": True})

    async def delete(self, session_id: str) -> None:
        """Cancel the upstream read if it is live, then forget the session."""
        await self.manager.stop(session_id, "cancelled", "deleted by a client")
        await self.store.delete(session_id)

    async def cancel_session(self, request: web.Request) -> web.Response:
        info = await self._owned_session(request)
        return web.json_response(session_summary(await self.cancel(info)))

    async def cancel(self, info: SessionInfo) -> SessionInfo:
        """Cancel the upstream read (here or on the replica reading it); the session after."""
        await self.manager.stop(info.session_id, "cancelled", "cancelled by a client")
        await self.store.flush()
        return await self.store.get(info.session_id) or info

    async def list_sessions(self, request: web.Request) -> web.Response:
        """The caller's sessions, newest first, a page at a time (`?limit=&after=<id>`).

        A page is bounded so that one listing never holds the loop for long, whatever the
        number of sessions; `after` is the last id of the previous page (`last_id`), and
        must be a session the caller may see (anything else is the same 400, so the cursor
        reveals nothing about other callers' ids).
        """
        state = request.query.get("state")
        if state is not None and state not in STATES:
            raise InvalidState(f"state must be one of {', '.join(STATES)}, got {state[:40]!r}")
        limit = parse_limit(request.query.get("limit"))
        admin = is_admin(request, self.config)
        if not admin and credential(request, self.config) is None:
            raise NotFound("no sessions for this caller")
        caller = credential_digest(request, self.config)
        after = None
        cursor = request.query.get("after")
        if cursor is not None:
            after = await self.store.get(cursor) if SESSION_ID_PATTERN.fullmatch(cursor) else None
            if after is None or not may_access(request, self.config, after):
                raise InvalidCursor(
                    f"after must be the id of one of your sessions, got {cursor[:40]!r}"
                )

        def keep(info: SessionInfo) -> bool:
            return (admin or info.meta.credential_sha256 == caller) and (
                state is None or info.state == state
            )

        page, more = await self.store.page(after, limit, keep)
        return web.json_response(
            {
                "object": "list",
                "data": [session_summary(info) for info in page],
                "first_id": page[0].session_id if page else None,
                "last_id": page[-1].session_id if page else None,
                "has_more": more,
            }
        )

    async def healthz(self, request: web.Request) -> web.Response:
        healthy = await self.store.check_health()
        body = {
            "status": "ok" if healthy else "unhealthy",
            "storage": "ok" if healthy else "unwritable",
            "live_sessions": self.manager.live_count,
            "time": iso_time(time.time_ns()),
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        payload, content_type = self.metrics.render()
        return web.Response(body=payload, headers={"Content-Type": content_type})

    async def resume_js(self, request: web.Request) -> web.Response:
        return web.Response(
            body=await client_file("resume.js"),
            content_type="text/javascript",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def demo(self, request: web.Request) -> web.Response:
        if not self.config.demo_enabled:
            raise NotFound("the demo page is off (server.demo)")
        return web.Response(
            body=await client_file("demo.html"), content_type="text/html", charset="utf-8"
        )


async def end_stream(request: web.Request, response: web.StreamResponse, final: bytes) -> None:
    """End an event stream whose headers may already be out: its status cannot change any
    more, so the reader gets the contract's final error event and the connection closes
    (a JSON error here would be a second response inside the first one's body)."""
    with contextlib.suppress(ConnectionError):
        await response.write(final)
        await response.write_eof()
    if request.transport is not None:
        request.transport.close()


_CLIENT_FILES: dict[str, bytes] = {}


async def client_file(name: str) -> bytes:
    """A file shipped in `proxy/client/`, read once off the event loop and then kept."""
    cached = _CLIENT_FILES.get(name)
    if cached is None:
        path = resources.files("proxy").joinpath("client", name)
        async with aiofiles.open(str(path), "rb") as handle:
            cached = _CLIENT_FILES[name] = await handle.read()
    return cached
