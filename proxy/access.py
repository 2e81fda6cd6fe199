"""Who may see a session: credential binding, capability tokens, the admin token, and CORS.

A session is bound to the SHA-256 of the first `session.bind_headers` header (Authorization,
x-api-key, api-key by default) of the request that created it. Any other caller gets the same
404 as for an id that never existed, so probing ids reveals nothing. A session created with
none of those headers is bound to no one: only its capability token or the admin token read
it (an empty credential must not match every other caller without one).

The capability token (`X-Resume-Token`) is HMAC-SHA256 of the session id under a secret key,
so any replica holding the key checks it without a lookup, and it stays valid across
restarts. It opens `GET /sessions/{id}/events` of that session and nothing else. Digests and
tokens are compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from aiohttp import web

from .config import Config
from .storage.base import SessionInfo

CORS_ORIGIN = web.RequestKey("cors_origin", str)


TOKEN_HEADER = "X-Resume-Token"


def credential(request: web.Request, config: Config) -> str | None:
    """The value of the first bind header the caller sent, None when it sent none."""
    headers = request.headers
    for name in config.session.bind_headers:
        value = headers.get(name)
        if value is not None:
            return value
    return None


def credential_digest(request: web.Request, config: Config) -> str:
    """Hex SHA-256 of the caller's credential; "" when the caller sent none."""
    value = credential(request, config)
    if value is None:
        return ""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def session_token(key: bytes, session_id: str) -> str:
    """The capability token of one session: unguessable without `key`, 43 URL-safe chars."""
    digest = hmac.new(key, session_id.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def token_opens(key: bytes | None, session_id: str, presented: str) -> bool:
    """Whether `presented` is this session's token (False whenever tokens are off)."""
    if key is None:
        return False
    expected = session_token(key, session_id).encode("ascii")
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), expected)


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
    bound_to = info.meta.credential_sha256
    caller = credential_digest(request, config)
    # Both sides are compared even for an unbound session, so timing says nothing either.
    same = hmac.compare_digest(caller, bound_to)
    return same and bound_to != ""


_CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


def _allowed_origin(request: web.Request, config: Config) -> str | None:
    origin = request.headers.get("Origin")
    origins = config.server.cors_origins
    if origin is None or not origins:
        return None
    if origin in origins:
        return origin
    # Any other origin under "*" gets the wildcard, which browsers never pair with credentials.
    return "*" if "*" in origins else None


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
        exposed = f"{config.session.header}, {TOKEN_HEADER}"
        response.headers["Access-Control-Expose-Headers"] = exposed
        vary = response.headers.get("Vary")
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
        if origin != "*":
            # The Fetch standard refuses credentials with a wildcard, and echoing any origin
            # with credentials instead would let every site read a logged-in caller's sessions.
            response.headers["Access-Control-Allow-Credentials"] = "true"

    return hook
