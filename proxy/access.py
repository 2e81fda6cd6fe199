"""Who may see a session: credential binding, the admin token, and CORS.

A session is bound to the SHA-256 of the bind header (`Authorization` by default) of the
request that created it. Any other caller gets the same 404 as for an id that never existed,
so probing ids reveals nothing. Digests are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from .config import Config
from .storage.base import SessionInfo

CORS_ORIGIN = web.RequestKey("cors_origin", str)


def credential_digest(request: web.Request, config: Config) -> str:
    """Hex SHA-256 of the bind header's value; "" when the caller sent none."""
    value = request.headers.get(config.session.bind_header)
    if value is None:
        return ""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def is_admin(request: web.Request, config: Config) -> bool:
    token = config.admin.token
    if not token:
        return False
    presented = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    return hmac.compare_digest(presented.encode(), expected.encode())


def may_access(request: web.Request, config: Config, info: SessionInfo) -> bool:
    if is_admin(request, config):
        return True
    return hmac.compare_digest(credential_digest(request, config), info.meta.credential_sha256)


_CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


def _allowed_origin(request: web.Request, config: Config) -> str | None:
    origin = request.headers.get("Origin")
    origins = config.server.cors_origins
    if origin is None or not origins:
        return None
    if "*" in origins:
        return origin
    return origin if origin in origins else None


def cors_middleware(config: Config) -> web.middleware:
    """Answers preflights itself and marks the origin for `add_cors_headers`."""

    @web.middleware
    async def middleware(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        origin = _allowed_origin(request, config)
        if origin is None:
            return await handler(request)
        request[CORS_ORIGIN] = origin
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
            requested = request.headers.get("Access-Control-Request-Headers")
            if requested:
                response.headers["Access-Control-Allow-Headers"] = requested
            response.headers["Access-Control-Max-Age"] = "600"
            return response
        return await handler(request)

    return middleware


def cors_on_prepare(config: Config):  # type: ignore[no-untyped-def]
    """An `on_response_prepare` hook: streamed responses are prepared inside handlers, after
    a middleware could touch them, so the headers go on here, just before they are sent."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.get(CORS_ORIGIN)
        if origin is None:
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = config.session.header
        vary = response.headers.get("Vary")
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"

    return hook
