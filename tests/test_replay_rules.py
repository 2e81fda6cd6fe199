"""What a resume gets at the edges: a repeat whose body is the same JSON value replays (and
another value is 409), sessions logged with the older raw-bytes hash still replay, and an
offset at the end of a complete session is 204 No Content."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import aiohttp
import pytest

from proxy.app import API
from proxy.config import Config
from proxy.storage.base import COMPLETE, SessionMeta

from .helpers import (
    CUT,
    ScriptedUpstream,
    event_ids,
    mock_stream_body,
    read_sse,
    run_proxy,
)

OWNER = {"Authorization": "Bearer sk-owner"}


async def calls(http: aiohttp.ClientSession, proxy_url: str) -> int:
    async with http.get(proxy_url + "/mock/calls") as response:
        return sum((await response.json()).values())


async def test_a_repeat_with_the_same_json_in_another_key_order_replays(
    config_for: Callable[..., Config],
) -> None:
    body = mock_stream_body(6, 0)
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2).encode()
    assert reordered != json.dumps(body).encode()
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        url = proxy.url + "/v1/chat/completions"
        first, original = await read_sse(http, url, method="POST", json=body, headers=OWNER)
        session = {**OWNER, "X-Resume-Session-Id": first.headers["X-Resume-Session-Id"]}
        headers = {**session, "Content-Type": "application/json"}
        repeat, replayed = await read_sse(http, url, method="POST", data=reordered, headers=headers)
        assert repeat.status == 200 and replayed == original
        changed = {**body, "messages": [{"role": "user", "content": "another question"}]}
        async with http.post(url, json=changed, headers=session) as conflict:
            assert conflict.status == 409
            assert (await conflict.json())["error"]["code"] == "session_conflict"
        assert await calls(http, proxy.url) == 1


@pytest.mark.parametrize(
    ("original", "repeat", "replays"),
    [
        (b"not json {", b"not json {", True),
        (b"not json {", b"not json  {", False),
        (b'{"a": 1, "b": [1, 2]}', b'{"b":[1,2],"a":1}', True),
        (b'{"a": 1, "b": [1, 2]}', b'{"b":[2,1],"a":1}', False),
        (b'{"a": 1}', b'{"a": 1.0}', False),
        (b'{"text": "\\u00e9"}', '{"text": "é"}'.encode(), True),
    ],
)
async def test_json_bodies_compare_as_values_and_other_bodies_as_bytes(
    upstream: ScriptedUpstream,
    config_for: Callable[..., Config],
    original: bytes,
    repeat: bytes,
    replays: bool,
) -> None:
    upstream.script = [b"data: one\n\n", b"data: two\n\n"]
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        first, body = await read_sse(
            http, proxy.url + "/x", method="POST", data=original, headers=OWNER
        )
        headers = {**OWNER, "X-Resume-Session-Id": first.headers["X-Resume-Session-Id"]}
        async with http.post(proxy.url + "/x", data=repeat, headers=headers) as response:
            assert response.status == (200 if replays else 409)
            if replays:
                assert await response.read() == body
    assert upstream.calls == 1


async def test_a_session_logged_with_the_raw_body_hash_still_replays(
    config_for: Callable[..., Config],
) -> None:
    """Sessions written before bodies were hashed as JSON hold sha256 of the bytes sent."""
    raw = b'{"model": "m",  "stream": true}'
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        store = proxy.app[API].store
        now = time.time_ns()
        meta = SessionMeta(
            session_id="logged-by-an-older-proxy",
            method="POST",
            path="/v1/chat/completions",
            body_sha256=hashlib.sha256(raw).hexdigest(),
            credential_sha256=hashlib.sha256(OWNER["Authorization"].encode()).hexdigest(),
            created_ns=now,
            request_ns=now,
            upstream_status=200,
            headers=(("Content-Type", "text/event-stream"),),
        )
        store.create(meta)
        store.append(meta.session_id, 1, b"id: 1\ndata: old\n\n", [17], now)
        store.end(meta.session_id, COMPLETE, "", now)
        await store.flush()
        headers = {**OWNER, "X-Resume-Session-Id": meta.session_id}
        response, body = await read_sse(
            http, proxy.url + "/v1/chat/completions", method="POST", data=raw, headers=headers
        )
        assert response.status == 200 and body == b"id: 1\ndata: old\n\n"
        async with http.post(
            proxy.url + "/v1/chat/completions", data=b'{"stream": true, "model": "m"}',
            headers=headers,
        ) as reordered:  # fmt: skip
            assert reordered.status == 409  # its hash says nothing about the JSON value
        assert await calls(http, proxy.url) == 0


async def test_the_end_of_a_finished_session_is_204_and_past_it_416(
    config_for: Callable[..., Config],
) -> None:
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        first, body = await read_sse(
            http,
            proxy.url + "/v1/chat/completions",
            method="POST",
            json=mock_stream_body(4, 0),
            headers=OWNER,
        )
        last = event_ids(body)[-1]
        session_id = first.headers["X-Resume-Session-Id"]
        url = f"{proxy.url}/sessions/{session_id}/events"
        for request in ({"params": {"offset": last}}, {"headers": {"Last-Event-ID": str(last)}}):
            headers = {**OWNER, **request.get("headers", {})}
            async with http.get(url, params=request.get("params"), headers=headers) as response:
                assert response.status == 204
                assert await response.read() == b""
        async with http.get(url, params={"offset": last - 1}, headers=OWNER) as response:
            assert response.status == 200 and event_ids(await response.read()) == [last]
        async with http.get(url, params={"offset": last + 1}, headers=OWNER) as response:
            assert response.status == 416


async def test_a_failed_session_at_its_end_still_answers_its_error_event(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    """A client that had every event of a session whose upstream broke (or whose proxy died)
    resumes at the end: it must get the error, not a 204 that would pass for a clean end."""
    upstream.script = [b"data: one\n\n", b"data: two\n\n", CUT]
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        first, body = await read_sse(http, proxy.url + "/x", method="POST", headers=OWNER)
        assert body.endswith(b'"code":"failed"}}\n\n')
        url = f"{proxy.url}/sessions/{first.headers['X-Resume-Session-Id']}/events"
        response, rest = await read_sse(http, url, headers={**OWNER, "Last-Event-ID": "2"})
    assert response.status == 200
    assert rest.startswith(b"data: {") and rest.endswith(b'"code":"failed"}}\n\n')


async def test_a_live_session_at_its_current_end_is_followed_not_204(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = [b"data: one\n\n", 0.5, b"data: two\n\n"]
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        async with http.post(proxy.url + "/x", headers=OWNER) as live:
            await live.content.readuntil(b"\n\n")
            url = f"{proxy.url}/sessions/{live.headers['X-Resume-Session-Id']}/events"
            response, rest = await read_sse(http, url, params={"offset": 1}, headers=OWNER)
    assert response.status == 200 and rest == b"id: 2\ndata: two\n\n"
