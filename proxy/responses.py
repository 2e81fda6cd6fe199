"""Background responses: OpenAI's Responses API resume (background mode), served by the proxy.

`POST /v1/responses` with `"background": true` is sent upstream as a plain stream (no
`background`, `"stream": true`), because most OpenAI-compatible servers refuse background mode
and OpenAI keeps a background stream only minutes. The stream is a session like any other: it
is read to its end whatever clients do. The Response id of its first event becomes the
session's alias (`SessionStore.add_alias`, kept with the session on disk or in Redis), and the
SDKs' resume calls on that id are answered from the log:

- `GET /v1/responses/{id}`: the Response object of the newest `response.*` event that carries
  one (the terminal event once the stream has one), with `"background": true`;
- `GET /v1/responses/{id}?stream=true&starting_after=N`: the events after sequence number N;
  event k of a session is taken to have `sequence_number` k-1, as OpenAI numbers them, so
  this is the session's replay from offset N+1;
- `POST /v1/responses/{id}/cancel` and `DELETE /v1/responses/{id}`.

JSON is parsed only off the per-event path: the request body of a create, the stream's first
event (for the id), and on a GET the few events that carry a Response object, found by a
regular expression over logged batches and remembered per session, so polling rescans only
what arrived since the last poll. Ids the proxy does not know go upstream unchanged.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from .access import may_access
from .api import SESSION_ID, Api, parse_offset
from .errors import ResponseNotFound, UpstreamBadResponse
from .readers import error_message
from .relay import UpstreamRequest, build_upstream_request, is_event_stream, relay_plain
from .sse import event_data, split_events
from .storage.base import (
    CANCELLED,
    FAILED,
    INTERRUPTED,
    STREAMING,
    SessionInfo,
    SessionMissing,
    check_alias,
)

log = logging.getLogger("proxy.responses")

Json = dict[str, Any]

# Events whose `response` field is the whole Response object; the last three end a stream.
TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})
SNAPSHOT_TYPES = TERMINAL | {"response.created", "response.queued", "response.in_progress"}
_SNAPSHOT_TYPE = re.compile(
    rb'"type"\s*:\s*"response\.(?:created|queued|in_progress|completed|failed|incomplete)"'
)
# Request fields that only mean something to a server running the response in background.
_BACKGROUND_FIELDS = ("background", "background_options")
FIRST_EVENT_BYTES = 64 * 1024
SCAN_BYTES = 256 * 1024
WAIT_SLICE = 5.0  # seconds per wait for the first event; the pump bounds the whole wait
SCANS_KEPT = 4096  # sessions whose snapshot scan is remembered


def background_request(outgoing: UpstreamRequest) -> tuple[UpstreamRequest, bool] | None:
    """For a create with `"background": true`: the request to send upstream instead (same
    body without the background fields, with `"stream": true`) and whether the client asked
    for a stream. None for any other request, which then passes through untouched."""
    if b'"background"' not in outgoing.body:
        return None
    try:
        body = json.loads(outgoing.body)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("background") is not True:
        return None
    wants_stream = body.get("stream") is True
    upstream_body = {name: value for name, value in body.items() if name not in _BACKGROUND_FIELDS}
    upstream_body["stream"] = True
    encoded = json.dumps(upstream_body, separators=(",", ":")).encode()
    return replace(outgoing, body=encoded), wants_stream


def response_of(event: bytes) -> tuple[str, Json] | None:
    """(type, Response object) of an event that carries a whole Response, else None."""
    try:
        payload = json.loads(event_data(event))
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    kind, response = payload.get("type"), payload.get("response")
    if kind not in SNAPSHOT_TYPES or not isinstance(response, dict):
        return None
    return kind, response


def latest_response_in(data: bytes) -> tuple[str, Json] | None:
    """The last event of a logged batch that carries a whole Response; the regular expression
    lets batches of deltas through without a Python object per event."""
    if _SNAPSHOT_TYPE.search(data) is None:
        return None
    for event in reversed(split_events(data)):
        if _SNAPSHOT_TYPE.search(event) is not None and (found := response_of(event)):
            return found
    return None


@dataclass(frozen=True, slots=True)
class _Scan:
    """How far a session's events were looked through, and the newest Response found."""

    events: int = 0
    latest: tuple[str, Json] | None = None


@dataclass(slots=True)
class BackgroundResponses:
    """The handlers of the Responses API paths, on top of the session machinery in `Api`."""

    api: Api
    _scans: OrderedDict[tuple[str, int], _Scan] = field(default_factory=OrderedDict)

    # --- POST /v1/responses ----------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        api = self.api
        requested_id = api.requested_id(request)
        outgoing = await build_upstream_request(request, api.config)
        background = background_request(outgoing)
        if background is None:
            return await api.forward(request, outgoing, requested_id)
        upstream_request, wants_stream = background
        if requested_id is not None and (info := await api.store.get(requested_id)) is not None:
            if wants_stream:
                return await api.forward(request, outgoing, requested_id)  # a replay
            api.check_repeat(request, info, outgoing)
            return self._json(request, await self.snapshot(info), info.session_id)
        upstream, sent_ns = await api.send(upstream_request)
        if not is_event_stream(upstream):
            return await relay_plain(request, upstream)
        # The session records the client's request, so a repeat of it replays this session.
        meta, headers = await api.open_session(request, outgoing, upstream, sent_ns, requested_id)
        session_id = meta.session_id
        created = await self._name_session(session_id)
        if wants_stream:
            return await api.serve_new_session(request, upstream, headers, session_id)
        if created is None:
            await api.manager.stop(session_id, CANCELLED, "its first event named no response")
            raise UpstreamBadResponse(
                "upstream's first event carried no Response id (expected response.created)"
            )
        return self._json(request, created, session_id)

    async def _name_session(self, session_id: str) -> Json | None:
        """Wait for the session's first event and make its Response id the session's alias;
        the Response object of that event, or None if it has none.

        The alias is stored (and on Redis visible to every replica) before the client gets
        the id, in the JSON reply or in the stream, so any id a client has can be resolved.
        """
        store = self.api.store
        try:
            while True:
                data, count = await store.read(session_id, 1, FIRST_EVENT_BYTES)
                if count:
                    break
                info = await store.get(session_id)
                if info is None or (info.state != STREAMING and info.events == 0):
                    return None
                await store.wait(session_id, 0, WAIT_SLICE)
        except SessionMissing:
            return None
        found = response_of(split_events(data)[0])
        if found is None:
            log.warning("session %s: the first event carries no Response object", session_id)
            return None
        response = found[1]
        response_id = response.get("id")
        try:
            check_alias(response_id if isinstance(response_id, str) else "")
        except ValueError:
            log.warning("session %s: unusable Response id %.60r", session_id, response_id)
            return None
        await store.add_alias(session_id, response_id)
        return {**response, "background": True}

    # --- /v1/responses/{id} and /v1/responses/{id}/cancel ------------------------------------

    async def by_id(self, request: web.Request) -> web.StreamResponse:
        """GET and DELETE of a Response the proxy serves; anything else goes upstream."""
        if request.method not in ("GET", "DELETE"):
            return await self.api.proxy(request)
        info = await self._owned(request)
        if info is None:
            return await self.api.proxy(request)
        if request.method == "DELETE":
            await self.api.delete(info.session_id)
            self._scans.pop((info.session_id, info.meta.created_ns), None)
            response_id = request.match_info["response_id"]
            deleted = {"id": response_id, "object": "response", "deleted": True}
            return self._json(request, deleted, info.session_id)
        if request.query.get("stream", "").lower() == "true":
            return await self.api._replay(request, info, _offset(request))
        return self._json(request, await self.snapshot(info), info.session_id)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """Cancel the upstream read; on an ended Response, return it unchanged."""
        info = await self._owned(request) if request.method == "POST" else None
        if info is None:
            return await self.api.proxy(request)
        if info.state == STREAMING:
            info = await self.api.cancel(info)
        return self._json(request, await self.snapshot(info), info.session_id)

    async def _owned(self, request: web.Request) -> SessionInfo | None:
        """The session the path's Response id names; None if the proxy knows no such id (the
        request then goes upstream), ResponseNotFound for a caller it is not bound to."""
        response_id = request.match_info["response_id"]
        try:
            check_alias(response_id)
        except ValueError:
            return None
        store = self.api.store
        session_id = await store.resolve_alias(response_id)
        info = None if session_id is None else await store.get(session_id)
        if info is None:
            return None
        if not may_access(request, self.api.config, info):
            raise ResponseNotFound(f"Response with id '{response_id}' not found.")
        return info

    # --- the Response object ---------------------------------------------------------------

    async def snapshot(self, info: SessionInfo) -> Json:
        """The Response as a poll sees it: the terminal event's once logged, else the newest
        one seen; a session that ended without a terminal event is `failed` or `cancelled`,
        with an `error` saying why."""
        latest = await self._latest(info)
        response: Json = latest[1] if latest is not None else _bare_response(info)
        if (latest is None or latest[0] not in TERMINAL) and info.state != STREAMING:
            if info.state == CANCELLED:
                status, code, message = CANCELLED, CANCELLED, error_message(CANCELLED, info.reason)
            elif info.state in (FAILED, INTERRUPTED):
                status, code, message = FAILED, info.state, error_message(info.state, info.reason)
            else:  # upstream ended cleanly, but before a terminal event
                status, code = FAILED, FAILED
                message = error_message(FAILED, "the stream ended without a terminal event")
            response = {**response, "status": status, "error": {"code": code, "message": message}}
        return {**response, "background": True}

    async def _latest(self, info: SessionInfo) -> tuple[str, Json] | None:
        """The newest event of the session that carries a whole Response.

        An ended session usually ends with its terminal event, so its last event is looked
        at first; otherwise the events not yet scanned are, from where the last poll left.
        """
        store = self.api.store
        session_id = info.session_id
        key = (session_id, info.meta.created_ns)
        scan = self._scans.get(key) or _Scan()
        if scan.events >= info.events:
            self._scans.move_to_end(key)
            return scan.latest
        latest = None
        if info.state != STREAMING:
            data, _ = await store.read(session_id, info.events, FIRST_EVENT_BYTES)
            latest = latest_response_in(data)
        if latest is not None and latest[0] in TERMINAL:
            scan = _Scan(info.events, latest)
        else:
            next_event, latest = scan.events + 1, scan.latest
            while next_event <= info.events:
                data, count = await store.read(session_id, next_event, SCAN_BYTES)
                if not count:
                    break
                latest = latest_response_in(data) or latest
                next_event += count
            scan = _Scan(next_event - 1, latest)
        # Polls of one session may overlap: the scan that got furthest is the one kept.
        kept = self._scans.get(key)
        if kept is None or kept.events < scan.events:
            self._scans[key] = scan
            self._scans.move_to_end(key)
            if len(self._scans) > SCANS_KEPT:
                self._scans.popitem(last=False)
        return scan.latest

    def _json(self, request: web.Request, body: Json, session_id: str) -> web.Response:
        request[SESSION_ID] = session_id  # for the access log
        response = web.json_response(body)
        response.headers[self.api.config.session.header] = session_id
        return response


def _offset(request: web.Request) -> int:
    """The replay offset of a `?stream=true` GET: events after `starting_after` N are those
    after event N+1. A `Last-Event-ID` (an event number) wins, as on `/sessions/{id}/events`."""
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id is not None:
        return parse_offset(last_event_id, "Last-Event-ID")
    starting_after = request.query.get("starting_after")
    if starting_after is None:
        return 0
    return parse_offset(starting_after, "starting_after") + 1


def _bare_response(info: SessionInfo) -> Json:
    """What is known of a Response none of whose events carried the object."""
    return {
        "id": info.alias,
        "object": "response",
        "created_at": info.meta.created_ns // 1_000_000_000,
        "status": "in_progress",
        "output": [],
        "error": None,
    }
