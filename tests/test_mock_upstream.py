"""The mock upstream speaks OpenAI's wire format well enough for the real openai SDK.

Everything runs against a real server on a free port, through the SDK or raw HTTP, because
that is how the proxy and the benchmarks use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from proxy.mock import MockServer, serve_mock

from .helpers import ROOT

TOKENS = 6
MISSING, TYPE, VALUE = "missing_required_parameter", "invalid_type", "invalid_value"
Json = dict[str, Any]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    server = await serve_mock(tokens=TOKENS, interval_ms=1)
    yield server
    await server.close()


@pytest.fixture
async def client(mock: MockServer) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def chat_text(client: AsyncOpenAI, content: str | list[Json], **extra: Any) -> str:
    completion = await client.chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": content}], **extra
    )
    return completion.choices[0].message.content or ""


async def http_chunks(response: aiohttp.ClientResponse) -> list[bytes]:
    """The body as the HTTP chunks the server wrote, to see how events were framed and flushed."""
    chunks, current = [], b""
    async for data, end_of_chunk in response.content.iter_chunks():
        current += data
        if end_of_chunk:
            chunks.append(current)
            current = b""
    assert current == b""
    return chunks


async def test_chat_stream_with_usage_has_openai_chunk_sequence(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="mock-gpt", messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [chunk.choices[0].delta.content for chunk in chunks[1:-2]]
    assert len(deltas) == TOKENS
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == TOKENS
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert "".join(deltas) == await chat_text(client, "hello there")


async def test_chat_stream_bytes_are_one_data_event_per_http_chunk(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "mock-gpt", "messages": CHAT, "stream": True}
    async with http.post(mock.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert "Content-Length" not in response.headers
        assert response.headers["Transfer-Encoding"] == "chunked"
        chunks = await http_chunks(response)

    # role, tokens, finish, [DONE]: each its own write, each exactly `data: ...\n\n`.
    assert len(chunks) == 1 + TOKENS + 1 + 1
    for chunk in chunks:
        assert chunk.startswith(b"data: ")
        assert chunk.endswith(b"\n\n")
        assert chunk.count(b"\n") == 2
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert all("usage" not in json.loads(chunk[6:]) for chunk in chunks[:-1])


async def test_chat_non_stream_is_a_chat_completion(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT)

    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == TOKENS
    assert len((completion.choices[0].message.content or "").split()) == TOKENS


async def test_legacy_completions_stream_and_non_stream_agree(client: AsyncOpenAI) -> None:
    whole = await client.completions.create(model="mock-gpt", prompt="once upon")
    stream = await client.completions.create(
        model="mock-gpt", prompt="once upon", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "stop"
    assert (
        "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    )
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == TOKENS


async def test_responses_stream_parses_into_typed_events_ending_completed(
    client: AsyncOpenAI,
) -> None:
    whole = await client.responses.create(model="mock-gpt", input="tell me")
    stream = await client.responses.create(model="mock-gpt", input="tell me", stream=True)
    events = [event async for event in stream]

    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * TOKENS,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.status == "completed"
    assert final.response.output_text == whole.output_text
    assert final.response.usage is not None
    assert final.response.usage.output_tokens == TOKENS


async def test_background_mode_is_refused_with_400_like_most_compatible_servers(
    client: AsyncOpenAI, mock: MockServer
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(
                model="mock-gpt", input="tell me", background=True, stream=stream
            )
        assert refused.value.body["param"] == "background"
        assert refused.value.body["code"] == "unsupported_parameter"
    assert mock.app["calls"]["/v1/responses"] == 2


async def test_responses_stream_helper_accumulates_the_same_text(client: AsyncOpenAI) -> None:
    """`responses.stream` rebuilds the response from the events, so it checks their fields."""
    messages = [{"role": "user", "content": [{"type": "input_text", "text": "tell me"}]}]
    async with client.responses.stream(model="mock-gpt", input=messages) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()

    assert (
        final.output_text == (await client.responses.create(model="x", input="tell me")).output_text
    )


async def test_responses_stream_bytes_are_typed_events(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "mock-gpt", "input": "hi", "stream": True}
    async with http.post(mock.url + "/v1/responses", json=body) as response:
        chunks = await http_chunks(response)

    for chunk in chunks:
        event_line, data_line, blank, end = chunk.split(b"\n")
        kind = event_line.removeprefix(b"event: ").decode()
        assert json.loads(data_line.removeprefix(b"data: "))["type"] == kind
        assert (blank, end) == (b"", b"")


async def test_max_output_tokens_ends_the_response_incomplete(client: AsyncOpenAI) -> None:
    stream = await client.responses.create(
        model="mock-gpt", input="tell me", stream=True, max_output_tokens=2
    )
    events = [event async for event in stream]

    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details is not None
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert len(events[-1].response.output_text.split()) == 2


async def test_models_list_and_retrieve(client: AsyncOpenAI) -> None:
    assert [model.id async for model in client.models.list()] == ["mock-gpt"]
    assert (await client.models.retrieve("mock-gpt")).owned_by == "resumable-proxy"
    with pytest.raises(openai.NotFoundError) as raised:
        await client.models.retrieve("gpt-9")
    assert raised.value.code == "model_not_found"


async def test_same_prompt_same_answer_and_different_prompts_differ(client: AsyncOpenAI) -> None:
    first = await chat_text(client, "what is a log?")
    assert await chat_text(client, "what is a log?") == first
    assert await chat_text(client, "what is a segment?") != first
    multipart = [{"type": "text", "text": "what is a log?"}]
    assert await chat_text(client, multipart) == first


async def test_request_knobs_and_length_limits_set_the_answer_length(client: AsyncOpenAI) -> None:
    long = await chat_text(client, "q", extra_body={"mock_tokens": 40})
    assert len(long.split()) == 40
    assert (await chat_text(client, "q", extra_body={"mock_tokens": 3})).split() == long.split()[:3]

    for limit in ({"max_tokens": 2}, {"max_completion_tokens": 2}):
        completion = await client.chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "q"}], **limit
        )
        assert completion.choices[0].finish_reason == "length"
        assert len((completion.choices[0].message.content or "").split()) == 2


async def test_mock_interval_ms_paces_token_events(client: AsyncOpenAI) -> None:
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model="mock-gpt",
        messages=CHAT,
        stream=True,
        extra_body={"mock_tokens": 5, "mock_interval_ms": 40},
    )
    _ = [chunk async for chunk in stream]
    assert time.monotonic() - started >= 4 * 0.040


async def test_call_counter_counts_each_request_by_path(
    mock: MockServer, client: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    await chat_text(client, "one")
    stream = await client.responses.create(model="mock-gpt", input="two", stream=True)
    _ = [event async for event in stream]
    await chat_text(client, "three")

    async with http.get(mock.url + "/mock/calls") as response:
        calls = await response.json()
    assert calls == {"/v1/chat/completions": 2, "/v1/responses": 1}
    assert mock.app["calls"] == calls


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "param", "code"),
    [
        ("/v1/chat/completions", b"{not json", {}, 400, None, None),
        ("/v1/chat/completions", b"[1, 2]", {}, 400, None, None),
        ("/v1/chat/completions", b'{"messages": []}', {}, 400, "model", MISSING),
        ("/v1/chat/completions", b'{"model": "m"}', {}, 400, "messages", MISSING),
        ("/v1/chat/completions", b'{"model": "m", "messages": "hi"}', {}, 400, "messages", TYPE),
        ("/v1/responses", b'{"model": "m", "mock_tokens": "9"}', {}, 400, "mock_tokens", VALUE),
        ("/v1/responses", b'{"model": "m"}', {"Authorization": "Basic abc"}, 401, None, None),
        ("/v1/responses", b'{"model": "m"}', {"Authorization": "Bearer"}, 401, None, None),
        ("/v1/nowhere", b"{}", {}, 404, None, None),
    ],
)  # fmt: skip
async def test_bad_requests_get_openai_error_bodies(
    mock: MockServer,
    http: aiohttp.ClientSession,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    async with http.post(mock.url + path, data=body, headers=headers) as response:
        assert response.status == status
        error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


async def test_sdk_raises_its_typed_errors(client: AsyncOpenAI, mock: MockServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(
            model="mock-gpt", messages=CHAT, extra_body={"mock_tokens": -1}
        )
    assert (bad.value.param, bad.value.code) == ("mock_tokens", "invalid_value")

    headers = {"Authorization": "Token sk-test"}
    async with AsyncOpenAI(
        base_url=mock.url + "/v1", api_key="x", default_headers=headers
    ) as wrong_scheme:
        with pytest.raises(openai.AuthenticationError):
            await wrong_scheme.models.list()


async def test_client_hanging_up_mid_stream_logs_no_traceback(
    mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = mock.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "m", "messages": CHAT, "stream": True, "mock_interval_ms": 5})
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, int(port))
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        )
        writer.write(request.encode())
        assert b"data: " in await reader.readuntil(b"\n\n")
        writer.transport.abort()
    await asyncio.sleep(0.1)

    assert not [record for record in caplog.records if record.exc_info]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_the_mock_upstream_command_serves_its_answers_and_exits_on_sigterm() -> None:
    """`resumable-proxy mock-upstream --port P --tokens N --interval-ms MS`, as a process."""
    command = [sys.executable, "-m", "proxy", "mock-upstream", "--port", "0"]
    command += ["--tokens", "3", "--interval-ms", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("mock upstream listening on http://127.0.0.1:")
        url = line.split()[-1]
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        reply = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        assert len((reply.choices[0].message.content or "").split()) == 3
        stream = sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert len(text.split()) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        process.kill()
        process.wait()
