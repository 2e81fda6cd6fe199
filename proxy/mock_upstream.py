"""An OpenAI-compatible mock upstream: deterministic answers in the real wire shapes, no API key.

It backs `--upstream mock`, `resumable-proxy mock-upstream`, the tests and the benchmarks, so it
must look like api.openai.com to the openai SDK (the same JSON bodies and SSE events), and like
api.anthropic.com on `/v1/messages` to the Anthropic SDKs, and cost little per event (the
benchmark has to measure the proxy, not the mock).

An answer is a pure function of the last user message, so the same request always gets the same
text and a replayed stream can be compared with a fresh one. Two request-body fields, which the
real API would reject, override the server defaults per request (with the openai SDK pass them
as `extra_body={"mock_tokens": 5}`):

- `"mock_tokens": N`: the answer's length in tokens. `max_tokens`, `max_completion_tokens` and
  `max_output_tokens` still cut it short, with finish reason `length` as the real API does.
- `"mock_interval_ms": MS`: the pause between a stream's token events.

Like most OpenAI-compatible servers, it refuses `"background": true` on `/v1/responses` with
400 (the proxy serves background mode itself).

`GET /mock/calls` returns how many requests each path received (`app["calls"]`), which is how a
test proves that resuming a stream never called the upstream again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import secrets
import signal
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_exceptions import NotAppKeyWarning

MODEL_ID = "mock-gpt"
SYSTEM_FINGERPRINT = "fp_mock"

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_MODEL = {
    "id": MODEL_ID,
    "object": "model",
    "created": 1_700_000_000,
    "owned_by": "resumable-proxy",
}

# A prime number of words: any stride through them visits every word before repeating.
_WORDS = (
    "stream", "token", "proxy", "resume", "event", "offset", "session", "replay", "log",
    "segment", "record", "client", "server", "answer", "model", "prompt", "byte", "chunk",
    "buffer", "reader", "writer", "socket", "signal", "crash", "restart", "recover", "commit",
    "fsync", "disk", "memory", "latency", "throughput", "request", "response", "header", "body",
    "status", "error", "retry", "backoff", "cursor", "index", "frame", "checksum", "tail",
    "head", "queue", "batch", "flush", "append", "truncate", "snapshot", "state", "cancel",
    "finish", "begin", "follow", "deliver", "order", "exactly", "once",
)  # fmt: skip

# Templates are serialised with this placeholder where a token goes, then split around it, so a
# stream serialises its constant parts once and each event is a few byte concatenations.
_SLOT = "\x00slot\x00"
_SLOT_JSON = json.dumps(_SLOT).encode()
_DONE = b"data: [DONE]\n\n"
_STREAM_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_LENGTH_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Streams still running when the mock stops are cut after this; it is a test double, not a
# service whose clients deserve a long drain.
_SHUTDOWN_TIMEOUT_S = 1.0


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


@dataclass(frozen=True, slots=True)
class Answer:
    """What the mock "generates" for one request, and how fast a stream delivers it."""

    tokens: tuple[str, ...]
    finish_reason: str
    prompt_tokens: int
    interval_s: float

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True, slots=True)
class EventPlan:
    """A stream's SSE events: `lead` and `tail` go out at once, `tokens` one per interval.

    `tokens` is lazy so a long stream's cost is spread over its events instead of delaying the
    first one.
    """

    lead: list[bytes]
    tokens: Iterable[bytes]
    tail: list[bytes]


def answer_tokens(prompt: str, count: int) -> tuple[str, ...]:
    """Token i is word i of a walk through `_WORDS` whose start and stride come from the prompt.

    Two prompts give the same answer only if their hashes agree on both start and stride.
    """
    seed = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
    size = len(_WORDS)
    start, stride = seed % size, 1 + (seed // size) % (size - 1)
    words = [_WORDS[(start + i * stride) % size] for i in range(count)]
    return tuple(word.capitalize() if i == 0 else " " + word for i, word in enumerate(words))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(obj: Any, event: str | None = None) -> bytes:
    """One SSE event; typed (Responses API) events carry an `event:` line before `data:`."""
    head = b"event: %s\n" % event.encode() if event else b""
    return head + b"data: " + _dumps(obj) + b"\n\n"


def _template(obj: Any, event: str | None = None) -> list[bytes]:
    """The event for `obj` split at each `_SLOT`, ready to have tokens spliced in."""
    return _sse(obj, event).split(_SLOT_JSON)


@functools.cache
def _token_json(token: str) -> bytes:
    """Tokens come from a small fixed vocabulary, so each is serialised once per process."""
    return json.dumps(token).encode()


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# ---------------------------------------------------------------------------------------------
# Reading requests


async def _read_body(request: web.Request) -> Json:
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "object as the request body."
        )
    _require(body, "model", str, "a string")
    return body


def _require(body: Json, name: str, kind: type, kind_name: str) -> Any:
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


def _non_negative(body: Json, name: str, kinds: tuple[type, ...] = (int,)) -> Any:
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


def _text_of(content: Any) -> str:
    """Message content is a string or a list of parts; the text parts are what the user typed."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return "\n".join(text for text in texts if isinstance(text, str))
    return ""


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _input_text(given: Any) -> str:
    """The Responses API `input` is a plain string or a list of message items."""
    if isinstance(given, str):
        return given
    return _last_user_text(given) if isinstance(given, list) else ""


def _include_usage(body: Json) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _check_authorization(request: web.Request) -> None:
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


# ---------------------------------------------------------------------------------------------
# Chat completions and legacy completions (the same chunk scheme with different choices)


def _usage(answer: Answer) -> Json:
    completion_tokens = len(answer.tokens)
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": answer.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _header(prefix: str, kind: str, model: str) -> Json:
    return {
        "id": _new_id(prefix),
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def _chat_choice(answer: Answer) -> Json:
    message = {"role": "assistant", "content": answer.text, "refusal": None, "annotations": []}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}


def _text_choice(text: str, finish_reason: str | None) -> Json:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def _delta_choice(delta: Json, finish_reason: str | None) -> Json:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _chunk_stream(
    header: Json,
    lead: list[Json],
    token_choice: Json,
    finish_choice: Json,
    answer: Answer,
    *,
    include_usage: bool,
) -> EventPlan:
    """Chunks as OpenAI sends them: with `include_usage` every chunk has `"usage": null` and a
    last chunk with no choices carries the usage, before `[DONE]`."""
    usage: Json = {"usage": None} if include_usage else {}

    def chunk(choice: Json) -> Json:
        return {**header, "choices": [choice], **usage}

    before, after = _template(chunk(token_choice))
    tail = [_sse(chunk(finish_choice))]
    if include_usage:
        tail.append(_sse({**header, "choices": [], "usage": _usage(answer)}))
    tail.append(_DONE)
    return EventPlan(
        lead=[_sse(chunk(choice)) for choice in lead],
        tokens=(before + _token_json(token) + after for token in answer.tokens),
        tail=tail,
    )


def _chat_stream(answer: Answer, model: str, *, include_usage: bool) -> EventPlan:
    return _chunk_stream(
        _header("chatcmpl-", "chat.completion.chunk", model),
        lead=[_delta_choice({"role": "assistant", "content": "", "refusal": None}, None)],
        token_choice=_delta_choice({"content": _SLOT}, None),
        finish_choice=_delta_choice({}, answer.finish_reason),
        answer=answer,
        include_usage=include_usage,
    )


def _completion_stream(answer: Answer, model: str, *, include_usage: bool) -> EventPlan:
    return _chunk_stream(
        _header("cmpl-", "text_completion", model),
        lead=[],
        token_choice=_text_choice(_SLOT, None),
        finish_choice=_text_choice("", answer.finish_reason),
        answer=answer,
        include_usage=include_usage,
    )


# ---------------------------------------------------------------------------------------------
# The Responses API


@dataclass(frozen=True, slots=True)
class _ResponseIds:
    response_id: str
    item_id: str
    created_at: int

    @classmethod
    def new(cls) -> _ResponseIds:
        return cls(_new_id("resp_"), _new_id("msg_"), int(time.time()))


def _output_text(text: str) -> Json:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _message_item(ids: _ResponseIds, status: str, content: list[Json]) -> Json:
    return {
        "id": ids.item_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def _response_usage(answer: Answer) -> Json:
    output_tokens = len(answer.tokens)
    return {
        "input_tokens": answer.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": answer.prompt_tokens + output_tokens,
    }


def _response_object(body: Json, answer: Answer, ids: _ResponseIds, *, done: bool) -> Json:
    """The `response` object: in progress and empty while streaming, then the whole answer."""
    final_status = "incomplete" if answer.truncated else "completed"
    status = final_status if done else "in_progress"
    truncated = done and answer.truncated
    message = _message_item(ids, status, [_output_text(answer.text)])
    return {
        "id": ids.response_id,
        "object": "response",
        "created_at": ids.created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "model": body["model"],
        "output": [message] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": _response_usage(answer) if done else None,
        "user": None,
    }


def _typed_events(first: int, events: list[tuple[str, Json]]) -> list[bytes]:
    """Responses API events carry their kind twice (`event:` line and `type`) and a number."""
    return [
        _sse({"type": kind, "sequence_number": first + i, **fields}, kind)
        for i, (kind, fields) in enumerate(events)
    ]


def _response_stream(body: Json, answer: Answer) -> EventPlan:
    """The typed event sequence of one text answer, numbered by `sequence_number` from 0."""
    ids = _ResponseIds.new()
    place = {"item_id": ids.item_id, "output_index": 0, "content_index": 0}
    pending = _response_object(body, answer, ids, done=False)
    final = _response_object(body, answer, ids, done=True)
    item = final["output"][0]
    lead = _typed_events(
        0,
        [
            ("response.created", {"response": pending}),
            ("response.in_progress", {"response": pending}),
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
            ),
            ("response.content_part.added", {**place, "part": _output_text("")}),
        ],
    )
    kind = "response.output_text.delta"
    delta = {"type": kind, "sequence_number": _SLOT, **place, "delta": _SLOT, "logprobs": []}
    head, middle, end = _template(delta, kind)
    tokens = (
        head + b"%d" % (len(lead) + i) + middle + _token_json(token) + end
        for i, token in enumerate(answer.tokens)
    )
    tail = _typed_events(
        len(lead) + len(answer.tokens),
        [
            ("response.output_text.done", {**place, "text": answer.text, "logprobs": []}),
            ("response.content_part.done", {**place, "part": item["content"][0]}),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            (f"response.{final['status']}", {"response": final}),
        ],
    )
    return EventPlan(lead, tokens, tail)


# ---------------------------------------------------------------------------------------------
# Anthropic Messages (`/v1/messages`): named events, one text block, `ping`s


class AnthropicError(InvalidRequest):
    """Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`."""

    def response(self) -> web.Response:
        error = {"type": "invalid_request_error", "message": self.message}
        return web.json_response({"type": "error", "error": error}, status=self.status)


# Anthropic sends a `ping` after the first block opens and more during long answers; the mock
# puts one between every this many tokens, so clients meet them mid-stream too.
_PING_EVERY_TOKENS = 32
_PING = _sse({"type": "ping"}, "ping")


def _anthropic_usage(answer: Answer, *, done: bool) -> Json:
    return {
        "input_tokens": answer.prompt_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": len(answer.tokens) if done else 1,
        "service_tier": "standard",
    }


def _anthropic_message(body: Json, answer: Answer, *, done: bool) -> Json:
    """The Message object: empty in `message_start`, the whole answer when not streamed."""
    return {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": answer.text}] if done else [],
        "stop_reason": _stop_reason(answer) if done else None,
        "stop_sequence": None,
        "usage": _anthropic_usage(answer, done=done),
    }


def _stop_reason(answer: Answer) -> str:
    return "max_tokens" if answer.truncated else "end_turn"


def _anthropic_stream(body: Json, answer: Answer) -> EventPlan:
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}
    delta["delta"]["text"] = _SLOT
    before, after = _template(delta, "content_block_delta")

    def tokens() -> Iterable[bytes]:
        for i, token in enumerate(answer.tokens):
            if i and i % _PING_EVERY_TOKENS == 0:
                yield _PING + before + _token_json(token) + after
            else:
                yield before + _token_json(token) + after

    message_delta = {
        "type": "message_delta",
        "delta": {"stop_reason": _stop_reason(answer), "stop_sequence": None},
        "usage": {"output_tokens": len(answer.tokens)},
    }
    start = {"type": "message_start", "message": _anthropic_message(body, answer, done=False)}
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    return EventPlan(
        lead=[_sse(start, "message_start"), _sse(block, "content_block_start"), _PING],
        tokens=tokens(),
        tail=[
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(message_delta, "message_delta"),
            _sse({"type": "message_stop"}, "message_stop"),
        ],
    )


async def _anthropic_body(request: web.Request) -> Json:
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


# ---------------------------------------------------------------------------------------------
# Serving


async def _write_paced(
    response: web.StreamResponse, events: Iterable[bytes], interval_s: float
) -> None:
    """One write per event, spaced on a fixed schedule so sleep overshoot does not accumulate."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    for index, event in enumerate(events):
        if index and interval_s:
            due += interval_s
            await asyncio.sleep(max(0.0, due - loop.time()))
        await response.write(event)


async def _send_stream(
    request: web.Request, plan: EventPlan, interval_s: float
) -> web.StreamResponse:
    response = web.StreamResponse(headers=_STREAM_HEADERS)
    await response.prepare(request)
    # A client that hangs up mid-stream is normal (it is what the proxy exists for), not an error.
    with contextlib.suppress(ConnectionResetError):
        for event in plan.lead:
            await response.write(event)
        await _write_paced(response, plan.tokens, interval_s)
        for event in plan.tail:
            await response.write(event)
        await response.write_eof()
    return response


class MockApi:
    """The request handlers, holding the server-wide defaults that request fields override."""

    def __init__(self, tokens: int, interval_ms: float) -> None:
        self.tokens = tokens
        self.interval_ms = interval_ms

    def answer(self, body: Json, prompt: str) -> Answer:
        count = _non_negative(body, "mock_tokens")
        count = self.tokens if count is None else count
        limits = [_non_negative(body, name) for name in _LENGTH_LIMITS]
        limit = min((value for value in limits if value is not None), default=count)
        interval_ms = _non_negative(body, "mock_interval_ms", (int, float))
        interval_ms = self.interval_ms if interval_ms is None else interval_ms
        return Answer(
            tokens=answer_tokens(prompt, min(count, limit)),
            finish_reason="length" if limit < count else "stop",
            prompt_tokens=max(1, len(prompt.split())),
            interval_s=interval_ms / 1000,
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _read_body(request)
        messages = _require(body, "messages", list, "an array of messages")
        answer = self.answer(body, _last_user_text(messages))
        if body.get("stream") is True:
            plan = _chat_stream(answer, body["model"], include_usage=_include_usage(body))
            return await _send_stream(request, plan, answer.interval_s)
        completion = _header("chatcmpl-", "chat.completion", body["model"])
        completion.update(choices=[_chat_choice(answer)], usage=_usage(answer))
        return web.json_response(completion)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _read_body(request)
        prompt = body.get("prompt", "")
        answer = self.answer(body, prompt if isinstance(prompt, str) else json.dumps(prompt))
        if body.get("stream") is True:
            plan = _completion_stream(answer, body["model"], include_usage=_include_usage(body))
            return await _send_stream(request, plan, answer.interval_s)
        completion = _header("cmpl-", "text_completion", body["model"])
        completion.update(
            choices=[_text_choice(answer.text, answer.finish_reason)], usage=_usage(answer)
        )
        return web.json_response(completion)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await _read_body(request)
        if body.get("background") is True:
            # What vLLM, Ollama, LM Studio and most compatible servers do: the proxy has to
            # serve background mode itself, and the tests prove it does.
            raise InvalidRequest(
                "Background mode is not supported by this server.",
                param="background",
                code="unsupported_parameter",
            )
        answer = self.answer(body, _input_text(body.get("input")))
        if body.get("stream") is True:
            return await _send_stream(request, _response_stream(body, answer), answer.interval_s)
        return web.json_response(_response_object(body, answer, _ResponseIds.new(), done=True))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API; `max_tokens` is required there and cuts the answer."""
        try:
            body = await _anthropic_body(request)
            answer = self.answer(body, _last_user_text(body["messages"]))
        except InvalidRequest as error:
            return AnthropicError(error.message, status=error.status).response()
        if body.get("stream") is True:
            return await _send_stream(request, _anthropic_stream(body, answer), answer.interval_s)
        return web.json_response(_anthropic_message(body, answer, done=True))

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [_MODEL]})

    async def model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model"]
        if model_id != MODEL_ID:
            raise InvalidRequest(
                f"The model '{model_id}' does not exist",
                param="model",
                code="model_not_found",
                status=404,
            )
        return web.json_response(_MODEL)

    async def calls(self, request: web.Request) -> web.Response:
        return web.json_response(dict(request.app["calls"]))


@web.middleware
async def _count_calls(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request counts, refused ones too; reading the counter itself does not."""
    if not request.path.startswith("/mock/"):
        request.app["calls"][request.path] += 1
    return await handler(request)


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors in OpenAI's JSON shape, unknown URLs included, as the SDK expects to parse them."""
    try:
        _check_authorization(request)
        return await handler(request)
    except InvalidRequest as error:
        return error.response()
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as error:
        message = f"Invalid URL ({request.method} {request.path})"
        return InvalidRequest(message, status=error.status).response()


def build_mock_app(tokens: int = 64, interval_ms: float = 20.0) -> web.Application:
    """The mock as an aiohttp app, for `aiohttp_client` in tests or mounting in-process."""
    api = MockApi(tokens, interval_ms)
    app = web.Application(middlewares=[_count_calls, _openai_errors])
    # `app["calls"]` is the documented interface for tests and the demo; aiohttp prefers AppKey
    # objects and warns on string keys, which here is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAppKeyWarning)
        app["calls"] = Counter()
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/responses", api.responses)
    app.router.add_post("/v1/messages", api.messages)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/models/{model}", api.model)
    app.router.add_get("/mock/calls", api.calls)
    return app


@dataclass(frozen=True, slots=True)
class MockServer:
    """A running mock; `url` has no `/v1`, like `upstream.url` in the proxy's config."""

    runner: web.AppRunner
    url: str

    @property
    def app(self) -> web.Application:
        return self.runner.app

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve_mock(
    host: str = "127.0.0.1", port: int = 0, tokens: int = 64, interval_ms: float = 20.0
) -> MockServer:
    """Start the mock on `host:port` (0 picks a free port) and return once it accepts."""
    # No access log: as the benchmark's upstream, a log line per request would be its hot path.
    runner = web.AppRunner(
        build_mock_app(tokens, interval_ms), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return MockServer(runner, f"http://{url_host}:{bound_port}")


async def _serve_until_signal(host: str, port: int, tokens: int, interval_ms: float) -> None:
    server = await serve_mock(host, port, tokens, interval_ms)
    print(f"mock upstream listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


def run_mock_upstream(host: str, port: int, tokens: int, interval_ms: float) -> None:
    """Serve the mock until SIGINT or SIGTERM (`resumable-proxy mock-upstream`)."""
    asyncio.run(_serve_until_signal(host, port, tokens, interval_ms))
