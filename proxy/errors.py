"""The proxy's exceptions, each carrying the HTTP status and code the contract gives it.

Handlers raise these; one middleware in `app.py` turns them into the contract's JSON shape
`{"error": {"message", "type", "code"}}`, so no handler builds error bodies by hand. The
store raises its own errors (`proxy/storage/base.py`); `as_proxy_error` is the one mapping
of those to HTTP, and `error_body` the one builder of the JSON shape.
"""

from __future__ import annotations

from .storage.base import SessionExists, SessionMissing, StorageError

ERROR_TYPE = "resumable_proxy_error"


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The contract's error shape; every error the proxy sends (HTTP or SSE) is built here."""
    return {"error": {"message": message, "type": ERROR_TYPE, "code": code}}


class ProxyError(Exception):
    status = 500
    code = "internal_error"
    closes_connection = False  # True: the connection is closed after the error is sent

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, dict[str, str]]:
        return error_body(self.code, self.message)


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class InvalidSessionId(BadRequest):
    code = "invalid_session_id"


class InvalidOffset(BadRequest):
    code = "invalid_offset"


class InvalidState(BadRequest):
    code = "invalid_state"


class InvalidLimit(BadRequest):
    code = "invalid_limit"


class InvalidCursor(BadRequest):
    code = "invalid_cursor"


class SessionNotFound(ProxyError):
    status = 404
    code = "session_not_found"


class ResponseNotFound(ProxyError):
    status = 404
    code = "response_not_found"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"


class SessionConflict(ProxyError):
    status = 409
    code = "session_conflict"


class RequestTimeout(ProxyError):
    status = 408
    code = "request_timeout"
    closes_connection = True  # the rest of the body may still trickle in


class BodyTooLarge(ProxyError):
    status = 413
    code = "body_too_large"
    closes_connection = True  # closing beats reading the rest of the body to discard it


class OffsetOutOfRange(ProxyError):
    status = 416
    code = "offset_out_of_range"


class UpstreamUnavailable(ProxyError):
    status = 502
    code = "upstream_unavailable"


class UpstreamBadResponse(ProxyError):
    status = 502
    code = "bad_upstream_response"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"


class StorageUnavailable(ProxyError):
    status = 503
    code = "storage_unavailable"


class ShuttingDown(ProxyError):
    status = 503
    code = "shutting_down"


class TooManyConnections(ProxyError):
    status = 503
    code = "too_many_connections"
    closes_connection = True


def as_proxy_error(exc: ProxyError | StorageError | SessionMissing | SessionExists) -> ProxyError:
    """The one mapping from the store's errors to the contract's HTTP errors."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, SessionMissing):
        return SessionNotFound(str(exc) or "no such session")
    if isinstance(exc, SessionExists):
        return SessionConflict(str(exc) or "session already exists")
    return StorageUnavailable("the session store is unavailable; try again shortly")
