"""The mock's Anthropic Messages API (`/v1/messages`): the real anthropic SDK parses it, and its
stream has the shape of the byte-exact provider fixture (same event names, same fields)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import pytest

from proxy.mock import MockServer, serve_mock

from .helpers import FIXTURES

Json = dict[str, Any]
PROMPT = "how do segments roll"


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    server = await serve_mock(tokens=70, interval_ms=0)
    yield server
    await server.close()


def named_events(raw: bytes) -> list[tuple[str, Json]]:
    events = []
    for block in raw.strip().split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        events.append((lines[b"event"].decode(), json.loads(lines[b"data"])))
    return events


def shape(value: Any) -> Any:
    """Field names and nesting without the values (texts and counts differ by design)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value[:1]]
    return type(value).__name__ if value is not None else None


async def stream_bytes(mock: MockServer, **body: Any) -> bytes:
    request = {
        "model": "claude-mock",
        "max_tokens": 1000,
        "stream": True,
        "messages": [{"role": "user", "content": PROMPT}],
        **body,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(mock.url + "/v1/messages", json=request) as response,
    ):
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return await response.read()


async def test_stream_has_the_fixtures_event_sequence_and_fields(mock: MockServer) -> None:
    fixture = named_events((FIXTURES / "anthropic-messages.sse").read_bytes())
    events = named_events(await stream_bytes(mock, mock_tokens=5))
    assert all(name == data["type"] for name, data in events)
    assert [name for name, _ in events] == [name for name, _ in fixture]
    fixture_shapes = {name: shape(data) for name, data in fixture}
    for name, data in events:
        expected = fixture_shapes[name]
        # The mock's usage carries the cache and tier fields today's API adds to the fixture's.
        assert {k: v for k, v in shape(data).items() if k != "message"} == {
            k: v for k, v in expected.items() if k != "message"
        }
        if name == "message_start":
            assert set(expected["message"]) <= set(shape(data)["message"])


async def test_long_streams_carry_pings_between_deltas(mock: MockServer) -> None:
    names = [name for name, _ in named_events(await stream_bytes(mock, mock_tokens=70))]
    deltas = [i for i, name in enumerate(names) if name == "content_block_delta"]
    pings = [i for i, name in enumerate(names) if name == "ping"]
    assert len(deltas) == 70
    assert len(pings) == 3  # after the block opens, then every 32 tokens
    assert deltas[0] < pings[1] < deltas[-1]


async def test_the_anthropic_sdk_streams_and_gets_the_same_message_unstreamed(
    mock: MockServer,
) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=mock.url, api_key="sk-ant-test", max_retries=0
    ) as client:
        request: Any = {
            "model": "claude-mock",
            "max_tokens": 1000,
            "messages": [{"role": "user", "content": PROMPT}],
        }
        async with client.messages.stream(**request) as stream:
            text = "".join([delta async for delta in stream.text_stream])
            final = await stream.get_final_message()
        plain = await client.messages.create(**request)
        truncated = await client.messages.create(**{**request, "max_tokens": 3})
    assert text == final.content[0].text == plain.content[0].text  # type: ignore[union-attr]
    assert len(text.split()) == 70
    assert final.stop_reason == plain.stop_reason == "end_turn"
    assert final.usage.output_tokens == 70
    assert plain.id.startswith("msg_") and plain.role == "assistant"
    assert truncated.stop_reason == "max_tokens" and truncated.usage.output_tokens == 3


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "claude-mock", "messages": []}, "max_tokens: Field required"),
        (
            {"model": "claude-mock", "messages": [], "max_tokens": "many"},
            "max_tokens: Input should be an integer",
        ),
        ({"max_tokens": 5, "messages": []}, "model: Field required"),
    ],
)
async def test_bad_requests_get_anthropic_error_bodies(
    mock: MockServer, body: Json, message: str
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(mock.url + "/v1/messages", json=body) as response,
    ):
        assert response.status == 400
        assert await response.json() == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": message},
        }
