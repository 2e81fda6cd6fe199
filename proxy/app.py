"""Builds the aiohttp Application from a Config; start-up and clean-up in one ordered place.

Start-up: mock upstream (if asked for), store (recovery happens here), upstream client pool,
sessions. Shutdown (SIGTERM/SIGINT, after aiohttp closed the listening sockets): live
upstream reads get `server.shutdown_grace` to finish while their readers keep receiving;
the rest end `interrupted`; then the client pool, the store (flushed and synced) and the
mock close, in reverse order of start.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from .access import cors_middleware, cors_on_prepare
from .api import EVENTS_SENT, SESSION_ID, Api
from .config import Config
from .errors import MethodNotAllowed, ProxyError, as_proxy_error, error_body
from .metrics import Metrics
from .mock import MockServer, serve_mock
from .responses import BackgroundResponses
from .sessions import SessionManager
from .storage import open_store
from .storage.base import SessionExists, SessionMissing, SessionStore, StorageError
from .upstream import Origin

log = logging.getLogger("proxy.app")
access_log = logging.getLogger("proxy.access")

STARTED = web.RequestKey("started", web.StreamResponse)
LINGER = 1.0  # seconds aiohttp reads a body nobody wanted after the answer, before closing
CONFIG = web.AppKey("config", Config)
API = web.AppKey("api", Api)
RESPONSES = web.AppKey("responses", BackgroundResponses)
METRICS = web.AppKey("metrics", Metrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(error_body(code, message), status=status)


async def _note_started(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: remember the response whose status line is going out."""
    request[STARTED] = response


def _already_started(request: web.Request, exc: BaseException) -> web.StreamResponse | None:
    """An error after a response was prepared cannot become an error response: its status
    line is out, and JSON written now would land inside its body (a second HTTP response
    that breaks every client's parser). The connection is closed instead, so the client
    sees a cut body; readers of event streams get their final error event in the API."""
    started = request.get(STARTED)
    if started is None:
        return None
    log.error(
        "error on %s %s after its response started: %s; closing the connection",
        request.method,
        request.path,
        exc,
        exc_info=not isinstance(exc, ProxyError | StorageError),
    )
    if request.transport is not None:
        request.transport.close()
    return started


async def _send_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send an error whose request body is not (all) read, then end the connection.

    Closing at once could reset the connection (unread bytes make the kernel send RST)
    before the client reads the answer, so our side is shut (FIN) right after the answer;
    aiohttp then reads and drops what is left of the body for at most LINGER seconds (its
    default of 10 s is what a client trickling a body forever wants) and closes.
    """
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    transport = request.transport
    if transport is not None and not transport.is_closing() and transport.can_write_eof():
        transport.write_eof()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where exceptions become the contract's JSON error shape."""
    try:
        return await handler(request)
    except (ProxyError, StorageError, SessionMissing, SessionExists) as caught:
        if (started := _already_started(request, caught)) is not None:
            return started
        if isinstance(caught, StorageError):
            log.error("storage unavailable on %s %s: %s", request.method, request.path, caught)
        exc = as_proxy_error(caught)
        if exc.status in (502, 504):
            # The upstream failed us (unreachable, no fds left to reach it, no answer): the
            # operator must be able to see it, not only the client.
            log.warning("%s %s: %s: %s", request.method, request.path, exc.code, exc.message)
        response = web.json_response(exc.body(), status=exc.status)
        if exc.closes_connection:
            await _send_and_close(request, response)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if (started := _already_started(request, exc)) is not None:
            return started
        code = exc.reason.lower().replace(" ", "_")
        return _json_error(exc.status, code, exc.reason)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise
    except Exception as exc:
        if (started := _already_started(request, exc)) is not None:
            return started
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _json_error(500, "internal_error", "internal error in resumable-proxy")


def _access_middleware(metrics: Metrics, json_lines: bool) -> Callable[..., Awaitable[object]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            metrics.request_done(status)
            if access_log.isEnabledFor(logging.INFO):
                _log_access(request, status, time.monotonic() - started, json_lines)

    return middleware


def _log_access(request: web.Request, status: int, seconds: float, json_lines: bool) -> None:
    """One line per request: no headers, no bodies, no credentials."""
    fields = {
        "method": request.method,
        "path": request.path,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "session_id": request.get(SESSION_ID),
        "events": request.get(EVENTS_SENT),
    }
    if json_lines:
        access_log.info(json.dumps(fields))
    else:
        access_log.info(
            "%s %s %s %.1fms session=%s events=%s",
            fields["method"],
            fields["path"],
            status,
            fields["duration_ms"],
            fields["session_id"] or "-",
            "-" if fields["events"] is None else fields["events"],
        )


async def _method_not_allowed(request: web.Request) -> web.StreamResponse:
    raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}")


def _add_owned(app: web.Application, path: str, **methods: Handler) -> None:
    resource = app.router.add_resource(path)
    for method, handler in methods.items():
        resource.add_route(method, handler)
    resource.add_route("*", _method_not_allowed)


def _add_routes(app: web.Application, api: Api, responses: BackgroundResponses) -> None:
    """Bind every path to its handler, a method of the objects `_lifecycle` built.

    Done at start-up, once those exist: aiohttp freezes the router only after the startup
    hooks ran. The catch-all relay route comes last.
    """
    _add_owned(app, "/sessions", GET=api.list_sessions)
    _add_owned(app, "/sessions/{session_id}", GET=api.get_session, DELETE=api.delete_session)
    _add_owned(app, "/sessions/{session_id}/events", GET=api.session_events)
    _add_owned(app, "/sessions/{session_id}/cancel", POST=api.cancel_session)
    _add_owned(app, "/healthz", GET=api.healthz)
    _add_owned(app, "/metrics", GET=api.metrics_text)
    _add_owned(app, "/resume.js", GET=api.resume_js)
    _add_owned(app, "/demo", GET=api.demo)
    # Background responses: these pass upstream whenever the proxy does not serve them
    # (no `background: true`, an id it does not know, another method).
    app.router.add_route("POST", "/v1/responses", responses.create)
    app.router.add_route("*", "/v1/responses/{response_id}", responses.by_id)
    app.router.add_route("*", "/v1/responses/{response_id}/cancel", responses.cancel)
    app.router.add_route("*", "/{tail:.*}", api.proxy)


def _wire_gauges(metrics: Metrics, manager: SessionManager, store: SessionStore) -> None:
    """The gauges metrics reads at scrape time, from the parts that own the values."""
    metrics.add_gauge(
        "live_sessions", "Sessions whose upstream is being read now", lambda: manager.live_count
    )
    metrics.add_gauge("storage_healthy", "1 while the store can write", lambda: int(store.healthy))
    metrics.add_gauge(
        "storage_bytes",
        "Bytes the store keeps: segment files on disk, or what Redis reports using",
        store.stored_bytes,
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]
    mock: MockServer | None = None
    upstream_url = config.upstream.url
    if config.upstream.is_mock:
        mock = await serve_mock(tokens=config.mock.tokens, interval_ms=config.mock.interval_ms)
        upstream_url = mock.url
    store = open_store(config.storage)
    store.set_fsync_observer(metrics.fsync_seconds.observe)
    await store.start()
    client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True),
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=config.upstream.connect_timeout,
            sock_read=config.upstream.idle_timeout,
        ),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )
    manager = SessionManager(config, store, metrics)
    _wire_gauges(metrics, manager, store)
    token_key: bytes | None = None
    if config.session.tokens:
        secret = config.session.token_secret
        token_key = secret.encode() if secret is not None else await store.token_secret()
    app[API] = Api(
        config, manager, client, upstream_url, Origin.parse(upstream_url), metrics, token_key
    )
    app[RESPONSES] = BackgroundResponses(app[API])
    _add_routes(app, app[API], app[RESPONSES])
    log.info("relaying to %s, data in %s", upstream_url, config.storage.dir)
    _settle_heap()
    try:
        yield
    finally:
        await client.close()
        await store.close()
        if mock is not None:
            await mock.close()


def _settle_heap() -> None:
    """Keep the cyclic GC off the relay's back once start-up is done.

    Everything alive now (modules, the recovered index) is moved out of the collector's
    reach, and collections run after 20,000 net allocations instead of 700: per event the
    relay allocates a handful of short-lived objects that reference counting frees, and a
    young-generation pass every few hundred events was a steady source of p99 stalls.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def _shutdown(app: web.Application) -> None:
    api = app.get(API)
    if api is not None:
        await api.manager.shutdown(app[CONFIG].server.shutdown_grace)


def build_app(config: Config) -> web.Application:
    metrics = Metrics()
    app = web.Application(
        middlewares=[
            _access_middleware(metrics, config.server.log_format == "json"),
            cors_middleware(config),
            error_middleware,
        ],
        client_max_size=config.server.max_body_bytes + 1,
        handler_args={"max_field_size": 65536, "max_line_size": 65536, "lingering_time": LINGER},
    )
    app[CONFIG] = config
    app[METRICS] = metrics
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_shutdown)
    app.on_response_prepare.append(cors_on_prepare(config))
    app.on_response_prepare.append(_note_started)
    return app
