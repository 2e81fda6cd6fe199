"""The mock server: routes, pacing of a stream, the call counter, start and stop.

Part of the mock upstream (`proxy/mock/__init__.py` says what it is for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_exceptions import NotAppKeyWarning

from proxy.eventloop import new_event_loop
from proxy.mock.anthropic import anthropic_message, anthropic_stream
from proxy.mock.chat import chat_choice, chat_stream, chat_usage, chunk_header
from proxy.mock.completions import completion_stream, text_choice
from proxy.mock.requests import (
    LENGTH_LIMITS,
    AnthropicError,
    InvalidRequest,
    anthropic_body,
    check_authorization,
    include_usage,
    input_text,
    last_user_text,
    non_negative,
    read_body,
    require,
)
from proxy.mock.responses import ResponseIds, response_object, response_stream
from proxy.mock.wire import MODEL, MODEL_ID, Answer, EventPlan, Json, answer_tokens

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STREAM_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


# Streams still running when the mock stops are cut after this; it is a test double, not a
# service whose clients deserve a long drain.
_SHUTDOWN_TIMEOUT_S = 1.0


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
        count = non_negative(body, "mock_tokens")
        count = self.tokens if count is None else count
        limits = [non_negative(body, name) for name in LENGTH_LIMITS]
        limit = min((value for value in limits if value is not None), default=count)
        interval_ms = non_negative(body, "mock_interval_ms", (int, float))
        interval_ms = self.interval_ms if interval_ms is None else interval_ms
        return Answer(
            tokens=answer_tokens(prompt, min(count, limit)),
            finish_reason="length" if limit < count else "stop",
            prompt_tokens=max(1, len(prompt.split())),
            interval_s=interval_ms / 1000,
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        messages = require(body, "messages", list, "an array of messages")
        answer = self.answer(body, last_user_text(messages))
        if body.get("stream") is True:
            plan = chat_stream(answer, body["model"], include_usage=include_usage(body))
            return await _send_stream(request, plan, answer.interval_s)
        completion = chunk_header("chatcmpl-", "chat.completion", body["model"])
        completion.update(choices=[chat_choice(answer)], usage=chat_usage(answer))
        return web.json_response(completion)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        prompt = body.get("prompt", "")
        answer = self.answer(body, prompt if isinstance(prompt, str) else json.dumps(prompt))
        if body.get("stream") is True:
            plan = completion_stream(answer, body["model"], include_usage=include_usage(body))
            return await _send_stream(request, plan, answer.interval_s)
        completion = chunk_header("cmpl-", "text_completion", body["model"])
        completion.update(
            choices=[text_choice(answer.text, answer.finish_reason)], usage=chat_usage(answer)
        )
        return web.json_response(completion)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        if body.get("background") is True:
            # What vLLM, Ollama, LM Studio and most compatible servers do: the proxy has to
            # serve background mode itself, and the tests prove it does.
            raise InvalidRequest(
                "Background mode is not supported by this server.",
                param="background",
                code="unsupported_parameter",
            )
        answer = self.answer(body, input_text(body.get("input")))
        if body.get("stream") is True:
            return await _send_stream(request, response_stream(body, answer), answer.interval_s)
        return web.json_response(response_object(body, answer, ResponseIds.new(), done=True))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API; `max_tokens` is required there and cuts the answer."""
        try:
            body = await anthropic_body(request)
            answer = self.answer(body, last_user_text(body["messages"]))
        except InvalidRequest as error:
            return AnthropicError(error.message, status=error.status).response()
        if body.get("stream") is True:
            return await _send_stream(request, anthropic_stream(body, answer), answer.interval_s)
        return web.json_response(anthropic_message(body, answer, done=True))

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [MODEL]})

    async def model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model"]
        if model_id != MODEL_ID:
            raise InvalidRequest(
                f"The model '{model_id}' does not exist",
                param="model",
                code="model_not_found",
                status=404,
            )
        return web.json_response(MODEL)

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
        check_authorization(request)
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
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve_until_signal(host, port, tokens, interval_ms))
