"""The relay: transparent to the real openai SDK, unbuffered, header-faithful, clear errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import Config

from .helpers import CUT, FIXTURES, ScriptedUpstream, ThreadedProxy, free_port, run_proxy

CHAT: dict[str, Any] = {"model": "mock-gpt", "messages": [{"role": "user", "content": "resume?"}]}


_VOLATILE = {"id", "item_id", "created", "created_at", "completed_at"}


def stable(value: Any) -> Any:
    """The mock stamps fresh ids and times on every answer; everything else must match."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def dumps(items: list[Any]) -> list[dict[str, Any]]:
    return [stable(item.model_dump()) for item in items]


def sync_transcript(base_url: str) -> tuple[Any, ...]:
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=20)
    with client:
        streamed = dumps(list(client.chat.completions.create(**CHAT, stream=True)))
        plain = stable(client.chat.completions.create(**CHAT).model_dump())
        events = dumps(list(client.responses.create(model="m", input="hi", stream=True)))
        response = client.responses.create(model="m", input="hi").output_text
        legacy = dumps(list(client.completions.create(model="m", prompt="x", stream=True)))
        models = [m.id for m in client.models.list()]
    return streamed, plain["choices"], events, response, legacy, models


def test_sync_sdk_through_proxy_equals_direct(config_for: Callable[..., Config]) -> None:
    with ThreadedProxy(config_for()) as proxy:
        direct = sync_transcript(proxy.upstream_url + "/v1")
        proxied = sync_transcript(proxy.base_url)
    assert proxied == direct
    assert len(direct[0]) > 3


async def async_transcript(base_url: str) -> tuple[Any, ...]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=20)
    async with client:
        stream = await client.chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )
        streamed = dumps([chunk async for chunk in stream])
        stream = await client.responses.create(model="m", input="hello", stream=True)
        events = dumps([event async for event in stream])
    return streamed, events


def test_async_sdk_through_proxy_equals_direct(config_for: Callable[..., Config]) -> None:
    with ThreadedProxy(config_for()) as proxy:
        direct = asyncio.run(async_transcript(proxy.upstream_url + "/v1"))
        proxied = asyncio.run(async_transcript(proxy.base_url))
    assert proxied == direct
    assert proxied[0][-1]["usage"] is not None
    assert proxied[1][-1]["type"] == "response.completed"


async def test_each_event_reaches_the_sdk_before_upstream_sends_the_next(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    """Upstream holds event k+1 until the SDK has event k: a buffering relay deadlocks."""
    gates = [asyncio.Event() for _ in range(3)]
    chunk = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"%d"},"finish_reason":null}]}\n\n'  # noqa: E501

    def waiter(gate: asyncio.Event) -> Callable[[], Any]:
        return lambda: asyncio.wait_for(gate.wait(), 10)

    upstream.script = []
    for number, gate in enumerate(gates):
        upstream.script += [chunk % number, waiter(gate)]
    upstream.script.append(b"data: [DONE]\n\n")
    async with run_proxy(config_for(upstream.url)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        seen = []
        async with asyncio.timeout(15):
            stream = await client.chat.completions.create(**CHAT, stream=True)
            async for item in stream:
                seen.append(item.choices[0].delta.content)
                gates[len(seen) - 1].set()
        await client.close()
    assert seen == ["0", "1", "2"]


async def test_headers_pass_through_and_hop_by_hop_are_dropped(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.content_type = "application/json"
    upstream.script = [b'{"ok": true}']
    async with run_proxy(config_for(upstream.url, **{"upstream.api_key": "sk-env"})) as proxy:
        async with aiohttp.ClientSession() as http:
            sent = {
                "Authorization": "Bearer sk-user",
                "OpenAI-Organization": "org-1",
                "OpenAI-Project": "proj-1",
                "OpenAI-Beta": "assistants=v2",
                "X-Custom": "yes",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "must not pass",
                "Keep-Alive": "timeout=5",
            }
            async with http.post(proxy.url + "/v1/things?a=1&b=%20", data=b"{}", headers=sent) as r:
                assert r.status == 200
                assert await r.read() == b'{"ok": true}'
            async with http.get(proxy.url + "/v1/models") as r:
                await r.read()
    first, second = upstream.requests
    headers = first["headers"]
    for name in (
        "Authorization",
        "OpenAI-Organization",
        "OpenAI-Project",
        "OpenAI-Beta",
        "X-Custom",
    ):
        assert headers[name] == sent[name]
    assert "X-Hop" not in headers and "Keep-Alive" not in headers
    assert headers["Host"] == upstream.url.removeprefix("http://")
    assert first["path"] == "/v1/things?a=1&b=%20"
    assert first["body"] == b"{}"
    assert second["headers"]["Authorization"] == "Bearer sk-env"  # api_key fills a missing one


async def test_upstream_errors_pass_through_verbatim_without_session(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.status = 429
    upstream.content_type = "application/json"
    upstream.headers = {"Retry-After": "7"}
    upstream.script = [b'{"error": {"message": "slow down", "type": "rate_limit"}}']
    async with run_proxy(config_for(upstream.url)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(**CHAT, stream=True)
        await client.close()
        response = caught.value.response
        assert response.headers["retry-after"] == "7"
        assert "x-resume-session-id" not in response.headers
        assert caught.value.body == {"message": "slow down", "type": "rate_limit"}


async def test_stream_response_headers(config_for: Callable[..., Config]) -> None:
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        body = {**CHAT, "stream": True, "mock_tokens": 3}
        async with http.post(proxy.base_url + "/chat/completions", json=body) as response:
            await response.read()
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Accel-Buffering"] == "no"
            assert "Content-Length" not in response.headers
            assert len(response.headers["X-Resume-Session-Id"]) >= 22


async def test_plain_response_keeps_status_headers_and_length(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.status = 201
    upstream.content_type = "application/json"
    upstream.headers = {"X-Request-Id": "req-9", "Content-Encoding": "gzip"}
    upstream.script = [b"\x1f\x8b opaque compressed bytes"]
    async with run_proxy(config_for(upstream.url)) as proxy:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            async with http.post(proxy.url + "/v1/files", data=b"x") as response:
                assert response.status == 201
                assert response.headers["X-Request-Id"] == "req-9"
                assert response.headers["Content-Encoding"] == "gzip"
                assert await response.read() == b"\x1f\x8b opaque compressed bytes"


async def test_body_over_limit_is_413(config_for: Callable[..., Config]) -> None:
    async with run_proxy(config_for(**{"server.max_body_bytes": "1KiB"})) as proxy:
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy.base_url + "/chat/completions", data=b"x" * 2048) as r:
                assert r.status == 413
                assert (await r.json())["error"]["code"] == "body_too_large"

            async def chunked() -> Any:
                for _ in range(4):
                    yield b"y" * 512

            async with http.post(proxy.base_url + "/chat/completions", data=chunked()) as r:
                assert r.status == 413


async def test_unreachable_upstream_is_502(config_for: Callable[..., Config]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with run_proxy(config_for(dead)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(**CHAT)
        await client.close()
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_unavailable"
    assert caught.value.body["type"] == "resumable_proxy_error"


@pytest.mark.parametrize("fixture", sorted(path.name for path in FIXTURES.glob("*.sse")))
async def test_fixture_streams_relay_with_ids_and_nothing_else_changed(
    fixture: str, upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    from proxy.sse import SSEFramer

    raw = (FIXTURES / fixture).read_bytes()
    upstream.script = [raw[i : i + 37] for i in range(0, len(raw), 37)]
    expected, _ = SSEFramer().feed(raw)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        async with http.post(proxy.base_url + "/chat/completions", data=b"{}") as response:
            body = await response.read()
    if fixture == "torn-tail.sse":
        assert body.startswith(expected)
        assert body[len(expected) :].startswith(b'data: {"error":')
        assert body.endswith(b'"code":"failed"}}\n\n')
    else:
        assert body == expected


async def test_malformed_stream_relays_whole_events_then_ends(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = [b"data: one\n\n", b"data: two\n\ndata: torn", CUT]
    owner = {"Authorization": "Bearer sk-owner"}
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        async with http.post(proxy.base_url + "/x", data=b"{}", headers=owner) as response:
            body = await response.read()
            session_id = response.headers["X-Resume-Session-Id"]
        assert body.startswith(b"id: 1\ndata: one\n\nid: 2\ndata: two\n\n")
        assert b'"code":"failed"' in body
        async with http.get(f"{proxy.url}/sessions/{session_id}", headers=owner) as response:
            assert (await response.json())["state"] == "failed"


async def test_cors_preflight_and_exposed_session_header(config_for: Callable[..., Config]) -> None:
    config = config_for(**{"server.cors_origins": ["https://app.example"]})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        preflight = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with http.options(proxy.base_url + "/chat/completions", headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        body = {**CHAT, "stream": True, "mock_tokens": 2}
        origin = {"Origin": "https://app.example"}
        async with http.post(proxy.base_url + "/chat/completions", json=body, headers=origin) as r:
            await r.read()
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "X-Resume-Session-Id" in r.headers["Access-Control-Expose-Headers"]
        async with http.get(
            proxy.url + "/healthz", headers={"Origin": "https://evil.example"}
        ) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
