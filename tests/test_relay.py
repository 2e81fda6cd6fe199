"""The relay: transparent to the real openai SDK, unbuffered, header-faithful, clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import Config

from .faults.raw_upstream import RawUpstream, paced_stream
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


async def test_unreachable_upstream_is_502_and_logged(
    config_for: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with run_proxy(config_for(dead)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        with (
            caplog.at_level(logging.WARNING, logger="proxy.app"),
            pytest.raises(openai.InternalServerError) as caught,
        ):
            await client.chat.completions.create(**CHAT)
        await client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.app"]
    error = caught.value.body["message"]  # type: ignore[index]
    assert lines == [f"POST /v1/chat/completions: upstream_unavailable: {error}"]
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_unavailable"
    assert caught.value.body["type"] == "resumable_proxy_error"


_LINES = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")


def relayed_by_the_contract(raw: bytes) -> tuple[bytes, bool]:
    """What the contract says a relay of `raw` is, worked out line by line and independent
    of the proxy's framer: each event (its lines up to a blank line) keeps its bytes, loses
    its upstream `id` lines and gets `id: <n>` first, with the line end its last line has;
    blocks without a `data` field and stray blank lines are dropped (SDK safety). Returns
    the bytes and whether `raw` ended on an event boundary (a torn tail is not relayed)."""
    out: list[bytes] = []
    block: list[bytes] = []
    number = 1
    consumed = 0
    for line in _LINES.findall(raw):
        consumed += len(line)
        if line not in (b"\n", b"\r\n", b"\r"):
            block.append(line)
            continue
        fields = [item.rstrip(b"\r\n").split(b":", 1)[0] for item in block]
        if b"data" in fields:
            eol = block[-1][len(block[-1].rstrip(b"\r\n")) :]
            kept = [item for item, name in zip(block, fields, strict=True) if name != b"id"]
            out.append(b"id: %d%s%s%s" % (number, eol, b"".join(kept), line))
            number += 1
        block = []
    return b"".join(out), not block and consumed == len(raw)


@pytest.mark.parametrize("fixture", sorted(path.name for path in FIXTURES.glob("*.sse")))
async def test_fixture_streams_relay_with_ids_and_nothing_else_changed(
    fixture: str, upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    raw = (FIXTURES / fixture).read_bytes()
    upstream.script = [raw[i : i + 37] for i in range(0, len(raw), 37)]
    expected, clean = relayed_by_the_contract(raw)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        async with http.post(proxy.base_url + "/chat/completions", data=b"{}") as response:
            body = await response.read()
    assert expected
    if clean:
        assert body == expected
    else:
        assert fixture == "torn-tail.sse"
        assert body.startswith(expected)
        assert body[len(expected) :].startswith(b'data: {"error":')
        assert body.endswith(b'"code":"failed"}}\n\n')


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


@contextlib.asynccontextmanager
async def raw_request(
    port: int, head: bytes
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A request head written as bytes, for what aiohttp's client would not send as is."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    try:
        yield reader, writer
    finally:
        writer.close()


async def test_expect_100_continue_is_answered_here_and_never_forwarded(
    config_for: Callable[..., Config],
) -> None:
    """An upstream that never sends `100 Continue` (most do not) must not hold the request:
    the proxy answers the client's Expect itself and sends the request on without it."""
    body = b'{"stream": true}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    async with (
        RawUpstream({"/v1/chat/completions": paced_stream(3, 0)}) as upstream,
        run_proxy(config_for(upstream.url)) as proxy,
        raw_request(proxy.port, head) as (reader, writer),
    ):
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" in answer
    assert len(upstream.heads) == 1 and b"expect:" not in upstream.heads[0].lower()


async def test_header_bytes_past_ascii_reach_upstream_none_dropped(
    config_for: Callable[..., Config],
) -> None:
    """UTF-8 header values arrive byte for byte; other obs-text bytes (0x80-0xFF) arrive
    as the characters they are in ISO-8859-1, none dropped (aiohttp's client writes header
    values as UTF-8 text, so a byte that is no UTF-8 cannot be sent on as it came)."""
    head = (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"X-Utf8: caf\xc3\xa9 \xe2\x82\xac\r\nX-Latin: caf\xe9 \xff\x80!\r\n\r\n"
    )
    async with (
        RawUpstream({"/v1/models": paced_stream(0, 0)}) as upstream,
        run_proxy(config_for(upstream.url)) as proxy,
        raw_request(proxy.port, head) as (reader, _),
    ):
        answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 200")
    sent = upstream.heads[0]
    assert b"\r\nX-Utf8: caf\xc3\xa9 \xe2\x82\xac\r\n" in sent
    latin = sent.split(b"\r\nX-Latin: ", 1)[1].split(b"\r\n", 1)[0]
    assert latin.decode("utf-8") == "caf\xe9 \xff\x80!"


async def test_upstream_5xx_passes_through_verbatim_and_makes_no_session(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.status = 503
    upstream.content_type = "text/event-stream"  # even an event-stream type: an error is no stream
    upstream.headers = {"Retry-After": "30", "X-Request-Id": "req-503"}
    error = b'{"error": {"message": "overloaded", "type": "server_error", "code": null}}'
    upstream.script = [error]
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        body = {**CHAT, "stream": True}
        caller = {"Authorization": "Bearer sk-5xx"}
        async with http.post(
            proxy.base_url + "/chat/completions", json=body, headers=caller
        ) as response:
            assert response.status == 503
            assert await response.read() == error
            assert response.headers["Retry-After"] == "30"
            assert response.headers["X-Request-Id"] == "req-503"
            assert "X-Resume-Session-Id" not in response.headers
        async with http.get(proxy.url + "/sessions", headers=caller) as r:
            assert (await r.json())["data"] == []


async def test_an_upstream_that_never_accepts_is_502_after_connect_timeout(
    config_for: Callable[..., Config],
) -> None:
    """A listener whose accept queue is full drops SYNs, so a connect hangs: the proxy gives
    up after `upstream.connect_timeout`, long before `idle_timeout` (300 s here)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # fills the accept queue
    config = config_for(f"http://127.0.0.1:{port}", **{"upstream.connect_timeout": "300ms"})
    try:
        async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
            async with asyncio.timeout(20):
                async with http.post(proxy.base_url + "/chat/completions", json=CHAT) as r:
                    assert r.status == 502
                    error = (await r.json())["error"]
    finally:
        queued.close()
        listener.close()
    assert error["code"] == "upstream_unavailable"
    assert "did not accept a connection" in error["message"]


async def test_a_gzip_encoded_upstream_stream_is_relayed_decoded_with_ids(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    raw = (FIXTURES / "openai-chat-usage.sse").read_bytes()
    packed = gzip.compress(raw)
    upstream.headers = {"Content-Encoding": "gzip"}
    upstream.script = [packed[i : i + 50] for i in range(0, len(packed), 50)]
    async with run_proxy(config_for(upstream.url)) as proxy:
        caller = {"Authorization": "Bearer sk-gzip"}
        async with aiohttp.ClientSession(auto_decompress=False, headers=caller) as http:
            body = {**CHAT, "stream": True}
            async with http.post(proxy.base_url + "/chat/completions", json=body) as response:
                relayed = await response.read()
                assert "Content-Encoding" not in response.headers
            session_id = response.headers["X-Resume-Session-Id"]
            async with http.get(f"{proxy.url}/sessions/{session_id}/events") as response:
                replayed = await response.read()
    expected, clean = relayed_by_the_contract(raw)
    assert clean and relayed == expected == replayed
    assert upstream.requests[0]["headers"].get("Accept-Encoding", "identity") == "identity"
