"""Request parsing for the mock: bodies, fields, authorization, and the 4xx errors of a bad one.

Part of the mock upstream (`proxy/mock/__init__.py` says what it is for).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.mock.wire import Json

LENGTH_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class InvalidRequest(Exception):
    """A request the real API answers with a 4xx and its `{"error": {...}}` body."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status

    def response(self) -> web.Response:
        error = {
            "message": self.message,
            "type": "invalid_request_error",
            "param": self.param,
            "code": self.code,
        }
        return web.json_response({"error": error}, status=self.status)


async def read_body(request: web.Request) -> Json:
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "object as the request body."
        )
    require(body, "model", str, "a string")
    return body


def require(body: Json, name: str, kind: type, kind_name: str) -> Any:
    value = body.get(name)
    if value is None:
        raise InvalidRequest(
            f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
        )
    if not isinstance(value, kind):
        raise InvalidRequest(
            f"Invalid type for '{name}': expected {kind_name}.", param=name, code="invalid_type"
        )
    return value


def non_negative(body: Json, name: str, kinds: tuple[type, ...] = (int,)) -> Any:
    """An optional numeric field; bools are ints to Python but not to the API."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        raise InvalidRequest(
            f"Invalid value for '{name}': expected a non-negative number.",
            param=name,
            code="invalid_value",
        )
    return value


def text_of(content: Any) -> str:
    """Message content is a string or a list of parts; the text parts are what the user typed."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return "\n".join(text for text in texts if isinstance(text, str))
    return ""


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def input_text(given: Any) -> str:
    """The Responses API `input` is a plain string or a list of message items."""
    if isinstance(given, str):
        return given
    return last_user_text(given) if isinstance(given, list) else ""


def include_usage(body: Json) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def check_authorization(request: web.Request) -> None:
    """No key is needed, but a malformed one is refused so clients' auth handling is exercised."""
    value = request.headers.get("Authorization")
    if value is None:
        return
    scheme, _, key = value.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise InvalidRequest(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            status=401,
        )


class AnthropicError(InvalidRequest):
    """Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`."""

    def response(self) -> web.Response:
        error = {"type": "invalid_request_error", "message": self.message}
        return web.json_response({"type": "error", "error": error}, status=self.status)


async def anthropic_body(request: web.Request) -> Json:
    """The request checks Anthropic makes that clients meet first, in its error shape."""
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise AnthropicError("messages: the request body must be a JSON object")
    for name, kind, kind_name in (
        ("model", str, "a string"),
        ("max_tokens", int, "an integer"),
        ("messages", list, "a list"),
    ):
        value = body.get(name)
        if value is None:
            raise AnthropicError(f"{name}: Field required")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise AnthropicError(f"{name}: Input should be {kind_name}")
    return body
