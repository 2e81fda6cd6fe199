"""The proxy's exceptions, each carrying the HTTP status and code the contract gives it.

Handlers raise these; one middleware in `app.py` turns them into the contract's JSON shape
`{"error": {"message", "type", "code"}}`, so no handler builds error bodies by hand.
"""

from __future__ import annotations

ERROR_TYPE = "resumable_proxy_error"


class ProxyError(Exception):
    status = 500
    code = "internal_error"
    closes_connection = False  # True: the connection is closed after the error is sent

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"message": self.message, "type": ERROR_TYPE, "code": self.code}}


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
