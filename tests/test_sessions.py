"""Sessions and resume: replay from any offset, follow live, never call the upstream again.

The contract's rules (event ids, states, the final error event, credential binding, 404, 409,
416, cancel, delete) must not depend on the store, so every test here runs on each: the disk
log, a real redis-server, and a real Redis Cluster (three primaries with a replica each, every
write waiting for one replica), each emptied before the test.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import Config

from .helpers import (
    CUT,
    ScriptedUpstream,
    aread_events,
    dechunk,
    event_ids,
    read_sse,
    run_proxy,
    whole_events,
)

pytestmark = pytest.mark.backends("disk", "redis", "redis-cluster")

AUTH = {"Authorization": "Bearer sk-alice"}
BODY = {"model": "m", "messages": [{"role": "user", "content": "tell me"}], "stream": True}


def chunk(n: int) -> bytes:
    """An OpenAI chat chunk whose content is `t<n> `."""
    delta = b'{"index":0,"delta":{"content":"t%d "},"finish_reason":null}' % n
    head = b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":['
    return b"data: " + head + delta + b"]}\n\n"


def paced_script(events: int, pause: float) -> list[Any]:
    script: list[Any] = []
    for n in range(events):
        script += [chunk(n), pause]
    return [*script, b"data: [DONE]\n\n"]


async def start_stream(
    http: aiohttp.ClientSession, proxy_url: str, read_events: int, headers: dict[str, str] = AUTH
) -> tuple[str, bytes]:
    """Start a stream, read `read_events` events, then drop the connection."""
    response = await http.post(proxy_url + "/v1/chat/completions", json=BODY, headers=headers)
    session_id = response.headers["X-Resume-Session-Id"]
    async with asyncio.timeout(20):
        seen = await aread_events(response, read_events)
    response.close()
    return session_id, seen


async def wait_state(
    http: aiohttp.ClientSession,
    url: str,
    session_id: str,
    state: str,
    headers: dict[str, str] = AUTH,
) -> dict[str, Any]:
    for _ in range(200):
        async with http.get(f"{url}/sessions/{session_id}", headers=headers) as response:
            info = await response.json()
        if info.get("state") == state:
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"session {session_id} never reached {state}: {info}")


async def test_resume_after_client_drop_replays_rest_without_new_upstream_call(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(30, 0.01)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        session_id, seen = await start_stream(http, proxy.url, 5)
        last = event_ids(seen)[-1]
        _, rest = await read_sse(
            http, f"{proxy.url}/sessions/{session_id}/events?offset={last}", headers=AUTH
        )
        _, whole = await read_sse(http, f"{proxy.url}/sessions/{session_id}/events", headers=AUTH)
    assert event_ids(rest) == list(range(last + 1, 32))
    assert whole.startswith(whole_events(seen))
    assert whole.endswith(rest)
    assert upstream.calls == 1


async def test_last_event_id_wins_over_offset(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(10, 0)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await start_stream(http, proxy.url, 1)
        await wait_state(http, proxy.url, session_id, "complete")
        _, body = await read_sse(
            http,
            f"{proxy.url}/sessions/{session_id}/events?offset=2",
            headers={**AUTH, "Last-Event-ID": "7"},
        )
    assert event_ids(body) == [8, 9, 10, 11]


async def test_repeating_the_request_with_session_header_replays_and_409_on_change(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(6, 0)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        url = proxy.url + "/v1/chat/completions"
        _, original = await read_sse(http, url, method="POST", json=BODY, headers=AUTH)
        session_id = _.headers["X-Resume-Session-Id"]
        resume = {**AUTH, "X-Resume-Session-Id": session_id}
        response, again = await read_sse(http, url, method="POST", json=BODY, headers=resume)
        assert response.headers["X-Resume-Session-Id"] == session_id
        _, tail = await read_sse(
            http, url, method="POST", json=BODY, headers={**resume, "Last-Event-ID": "4"}
        )
        changed = {**BODY, "messages": [{"role": "user", "content": "else"}]}
        async with http.post(url, json=changed, headers=resume) as response:
            assert response.status == 409
            assert (await response.json())["error"]["code"] == "session_conflict"
        async with http.post(url + "?x=1", json=BODY, headers=resume) as response:
            assert response.status == 409
    assert again == original
    assert event_ids(tail) == [5, 6, 7]
    assert upstream.calls == 1


async def test_openai_sdk_with_session_header_replays_identical_chunks(
    config_for: Callable[..., Config],
) -> None:
    async with run_proxy(config_for()) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-bob", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        session_id = raw.headers["x-resume-session-id"]
        first = [c.model_dump() async for c in raw.parse()]
        replay = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"X-Resume-Session-Id": session_id},
        )
        second = [c.model_dump() async for c in replay]
        calls = await _mock_calls(proxy)
        await client.close()
    assert second == first and len(first) > 10
    assert calls == 1


async def _mock_calls(proxy: Any) -> int:
    from proxy.app import API

    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.app[API].upstream_url + "/mock/calls") as response:
            counts = await response.json()
    return sum(counts.values())


async def test_client_chosen_session_id_is_used(config_for: Callable[..., Config]) -> None:
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        headers = {**AUTH, "X-Resume-Session-Id": "my-own-id_123"}
        body = {**BODY, "mock_tokens": 3}
        response, _ = await read_sse(
            http, proxy.url + "/v1/chat/completions", method="POST", json=body, headers=headers
        )
        assert response.headers["X-Resume-Session-Id"] == "my-own-id_123"
        info = await wait_state(http, proxy.url, "my-own-id_123", "complete")
        assert info["events"] == 6


async def test_eight_concurrent_readers_receive_identical_streams(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(40, 0.005)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await start_stream(http, proxy.url, 1)
        url = f"{proxy.url}/sessions/{session_id}/events"
        bodies = await asyncio.gather(*(read_sse(http, url, headers=AUTH) for _ in range(8)))
    streams = {body for _, body in bodies}
    assert len(streams) == 1
    assert event_ids(streams.pop()) == list(range(1, 42))


async def test_readers_joining_at_the_switch_point_see_no_gap_or_duplicate(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    """Readers join at random moments while events arrive in bursts: each must get every
    event from its offset exactly once."""
    script: list[Any] = []
    for n in range(120):
        script += [chunk(n)] + ([0.002] if n % 3 == 0 else [])
    upstream.script = [*script, b"data: [DONE]\n\n"]
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await start_stream(http, proxy.url, 1)
        url = f"{proxy.url}/sessions/{session_id}/events"

        async def join(delay: float, offset: int) -> list[int]:
            await asyncio.sleep(delay)
            _, body = await read_sse(http, f"{url}?offset={offset}", headers=AUTH)
            return event_ids(body)

        joins = [join(i * 0.004, i % 7) for i in range(40)]
        results = await asyncio.gather(*joins)
    for index, ids in enumerate(results):
        offset = index % 7
        assert ids == list(range(offset + 1, 122)), f"reader {index}"


async def test_upstream_is_read_to_the_end_after_every_client_left(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(20, 0.01)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await start_stream(http, proxy.url, 1)
        info = await wait_state(http, proxy.url, session_id, "complete")
    assert info["events"] == 21


async def test_upstream_cut_mid_stream_makes_the_sdk_raise_api_error(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = [chunk(0), chunk(1), b'data: {"partial', CUT]
    async with run_proxy(config_for(upstream.url)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        got = []
        with pytest.raises(openai.APIError) as caught:
            stream = await client.chat.completions.create(**{**BODY, "stream": True})
            async for item in stream:
                got.append(item.choices[0].delta.content)
        await client.close()
    assert got == ["t0 ", "t1 "]
    assert "failed" in str(caught.value)


async def test_stall_past_idle_timeout_ends_failed(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = [chunk(0), 3.0, chunk(1)]
    config = config_for(upstream.url, **{"upstream.idle_timeout": "300ms"})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        _, body = await read_sse(
            http, proxy.url + "/v1/chat/completions", method="POST", json=BODY, headers=AUTH
        )
        session_id = _.headers["X-Resume-Session-Id"]
        info = await wait_state(http, proxy.url, session_id, "failed")
    assert event_ids(body) == [1]
    assert "idle_timeout" in info["reason"]
    assert body.endswith(b'"code":"failed"}}\n\n')


async def test_cancel_stops_upstream_and_keeps_the_log(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(500, 0.01)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await start_stream(http, proxy.url, 3)
        async with http.post(f"{proxy.url}/sessions/{session_id}/cancel", headers=AUTH) as r:
            assert r.status == 200
            assert (await r.json())["state"] == "cancelled"
        _, body = await read_sse(http, f"{proxy.url}/sessions/{session_id}/events", headers=AUTH)
    ids = event_ids(body)
    assert ids[:3] == [1, 2, 3] and len(ids) < 500
    error = json.loads(body[body.rindex(b"data: ") + 6 :])
    assert error["error"]["code"] == "cancelled"
    assert error["error"]["type"] == "resumable_proxy_error"


async def test_delete_cancels_and_forgets(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(500, 0.01)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await start_stream(http, proxy.url, 2)
        async with http.delete(f"{proxy.url}/sessions/{session_id}", headers=AUTH) as r:
            assert r.status == 200
        for path in ("", "/events"):
            async with http.get(f"{proxy.url}/sessions/{session_id}{path}", headers=AUTH) as r:
                assert r.status == 404
        async with http.get(f"{proxy.url}/sessions", headers=AUTH) as r:
            assert session_id not in {s["id"] for s in (await r.json())["data"]}
        for _ in range(100):  # the upstream read was cancelled: upstream saw the hang-up
            if upstream.hung_up:
                break
            await asyncio.sleep(0.05)
    assert (upstream.calls, upstream.hung_up) == (1, 1)


async def raw_replay(
    port: int, session_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A reader of a replay through a 4 KiB receive window, so the proxy is still writing
    a large session to it long after the request (the kernel cannot buffer it all)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(
        f"GET /sessions/{session_id}/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: {AUTH['Authorization']}\r\n\r\n".encode()
    )
    return reader, writer


async def test_delete_of_a_finished_session_ends_its_replaying_readers_cancelled(
    config_for: Callable[..., Config],
) -> None:
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        body = {**BODY, "mock_tokens": 20_000, "mock_interval_ms": 0}
        response, original = await read_sse(
            http, proxy.url + "/v1/chat/completions", method="POST", json=body, headers=AUTH
        )
        session_id = response.headers["X-Resume-Session-Id"]
        reader, writer = await raw_replay(proxy.port, session_id)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            started = await asyncio.wait_for(reader.readexactly(16384), 10)
            async with http.delete(f"{proxy.url}/sessions/{session_id}", headers=AUTH) as r:
                assert r.status == 200
            rest = await asyncio.wait_for(reader.read(), 30)
        finally:
            writer.close()
    replayed = dechunk(started + rest)
    ids = event_ids(replayed)
    assert ids == list(range(1, len(ids) + 1)) and 0 < len(ids) < event_ids(original)[-1]
    final = json.loads(replayed[replayed.rindex(b'data: {"error"') + 6 :])
    assert final["error"]["code"] == "cancelled"
    assert replayed.startswith(original[: replayed.rindex(b'data: {"error"')])


async def test_concurrent_requests_with_one_client_chosen_id_make_one_upstream_call(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    """An SDK retry reusing its id while the first request still waits for upstream's
    headers: the second waits too and replays the first, for 50 such pairs at once."""
    upstream.head_delay = 0.3
    upstream.script = paced_script(3, 0)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        url = proxy.url + "/v1/chat/completions"

        async def send(session_id: str) -> tuple[int, bytes]:
            headers = {**AUTH, "X-Resume-Session-Id": session_id}
            response, body = await read_sse(http, url, method="POST", json=BODY, headers=headers)
            return response.status, body

        pairs = [f"chat-{n:04d}-retry" for n in range(50)]
        answers = await asyncio.gather(*(send(sid) for sid in pairs for _ in range(2)))
    assert [status for status, _ in answers] == [200] * 100
    for first, second in zip(answers[::2], answers[1::2], strict=True):
        assert first[1] == second[1] and event_ids(first[1]) == [1, 2, 3, 4]
    assert upstream.calls == 50


async def test_a_bad_session_id_in_the_request_header_is_400_before_any_upstream_call(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(1, 0)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        for bad in ("short", "a" * 129, "has space in it", "dots.are.out", "ünïcode-id"):
            headers = {**AUTH, "X-Resume-Session-Id": bad}
            async with http.post(
                proxy.url + "/v1/chat/completions", json=BODY, headers=headers
            ) as r:
                assert r.status == 400, bad
                assert (await r.json())["error"]["code"] == "invalid_session_id"
    assert upstream.calls == 0


async def test_a_custom_session_header_names_chooses_and_resumes_sessions(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(2, 0)
    config = config_for(upstream.url, **{"session.header": "X-Chat-Id"})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        url = proxy.url + "/v1/chat/completions"
        chosen = {**AUTH, "X-Chat-Id": "chat-id-of-mine"}
        response, first = await read_sse(http, url, method="POST", json=BODY, headers=chosen)
        assert response.headers["X-Chat-Id"] == "chat-id-of-mine"
        assert "X-Resume-Session-Id" not in response.headers
        again, second = await read_sse(
            http, url, method="POST", json=BODY, headers={**chosen, "Last-Event-ID": "1"}
        )
        assert again.headers["X-Chat-Id"] == "chat-id-of-mine"
    assert event_ids(second) == [2, 3] and first.endswith(second)
    assert upstream.calls == 1
    assert "X-Chat-Id" not in upstream.requests[0]["headers"]  # ours, never forwarded


async def test_max_duration_ends_a_stream_that_runs_longer_failed(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(200, 0.05)  # ten seconds of answer
    config = config_for(upstream.url, **{"session.max_duration": "500ms"})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        response, body = await read_sse(
            http, proxy.url + "/v1/chat/completions", method="POST", json=BODY, headers=AUTH
        )
        info = await wait_state(http, proxy.url, response.headers["X-Resume-Session-Id"], "failed")
    assert "session.max_duration" in info["reason"]
    assert 0 < len(event_ids(body)) < 200
    assert json.loads(body[body.rindex(b'data: {"error"') + 6 :])["error"]["code"] == "failed"
    for _ in range(100):  # and its upstream read was stopped
        if upstream.hung_up:
            break
        await asyncio.sleep(0.05)
    assert upstream.hung_up == 1


async def test_listing_is_newest_first_in_pages_and_refuses_bad_filters(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(1, 0)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        made = []
        for _ in range(3):
            response, _ = await read_sse(
                http, proxy.url + "/v1/chat/completions", method="POST", json=BODY, headers=AUTH
            )
            made.append(response.headers["X-Resume-Session-Id"])
        listing = f"{proxy.url}/sessions"
        async with http.get(listing, headers=AUTH) as r:
            everything = await r.json()
        assert [s["id"] for s in everything["data"]] == made[::-1]
        assert everything["has_more"] is False
        async with http.get(listing + "?limit=2", headers=AUTH) as r:
            first = await r.json()
        assert [s["id"] for s in first["data"]] == made[:0:-1]
        assert (first["has_more"], first["last_id"]) == (True, made[1])
        async with http.get(listing + f"?limit=2&after={first['last_id']}", headers=AUTH) as r:
            second = await r.json()
        assert [s["id"] for s in second["data"]] == made[:1] and second["has_more"] is False
        stranger = {"Authorization": "Bearer sk-mallory"}
        for query, headers, code in [
            ("?state=bogus", AUTH, "invalid_state"),
            ("?state=", AUTH, "invalid_state"),
            ("?limit=0", AUTH, "invalid_limit"),
            ("?limit=1001", AUTH, "invalid_limit"),
            ("?limit=ten", AUTH, "invalid_limit"),
            ("?after=nosuchsession", AUTH, "invalid_cursor"),
            (f"?after={made[0]}", stranger, "invalid_cursor"),  # the same 400: reveals nothing
        ]:
            async with http.get(listing + query, headers=headers) as r:
                assert r.status == 400, query
                assert (await r.json())["error"]["code"] == code, query


async def test_sessions_are_bound_to_the_credential(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(3, 0)
    config = config_for(upstream.url, **{"admin.token": "root-token"})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await start_stream(http, proxy.url, 1)
        await wait_state(http, proxy.url, session_id, "complete")
        base = f"{proxy.url}/sessions/{session_id}"
        strangers = [{}, {"Authorization": "Bearer sk-mallory"}]
        for headers in strangers:
            for method, path in (
                ("GET", ""),
                ("GET", "/events"),
                ("DELETE", ""),
                ("POST", "/cancel"),
            ):
                async with http.request(method, base + path, headers=headers) as r:
                    assert r.status == 404, (method, path, headers)
                    assert session_id not in await r.text()
            async with http.get(f"{proxy.url}/sessions", headers=headers) as r:
                listed = [] if r.status == 404 else (await r.json())["data"]
                assert session_id not in {s["id"] for s in listed}
            replay = {**headers, "X-Resume-Session-Id": session_id}
            async with http.post(
                proxy.url + "/v1/chat/completions", json=BODY, headers=replay
            ) as r:
                assert r.status == 404
        async with http.get(f"{proxy.url}/sessions", headers=AUTH) as r:
            assert [s["id"] for s in (await r.json())["data"]] == [session_id]
        async with http.get(
            f"{proxy.url}/sessions", headers={"Authorization": "Bearer root-token"}
        ) as r:
            assert [s["id"] for s in (await r.json())["data"]] == [session_id]
        async with http.get(f"{proxy.url}/sessions") as r:
            assert r.status == 404
    assert upstream.calls == 1


async def test_second_device_finds_the_live_answer_by_listing(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(100, 0.01)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await start_stream(http, proxy.url, 2)
        async with http.get(f"{proxy.url}/sessions?state=streaming", headers=AUTH) as r:
            live = (await r.json())["data"]
        async with http.get(f"{proxy.url}/sessions?state=complete", headers=AUTH) as r:
            done = (await r.json())["data"]
    assert [s["id"] for s in live] == [session_id] and done == []


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/sessions/short", 400, "invalid_session_id"),
        ("/sessions/" + "a" * 129, 400, "invalid_session_id"),
        ("/sessions/%2e%2e%2f%2e%2e%2fetc", 400, "invalid_session_id"),
        ("/sessions/..%2F..%2Fdata", 400, "invalid_session_id"),
        ("/sessions/h%C3%A9llo-world", 400, "invalid_session_id"),
        ("/sessions/abcdefgh%0A", 400, "invalid_session_id"),  # `$` takes a final newline
        ("/sessions/aaaaaaaaaaaa", 404, "session_not_found"),
        ("/sessions/aaaaaaaaaaaa/events?offset=-1", 404, "session_not_found"),
    ],
)
async def test_bad_ids_get_clear_errors_and_never_touch_the_file_system(
    path: str, status: int, code: str, config_for: Callable[..., Config], tmp_path: Path
) -> None:
    config = config_for()
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        before = sorted(p.name for p in config.storage.dir.rglob("*"))
        async with http.get(proxy.url + path, headers=AUTH) as r:
            assert r.status == status
            assert (await r.json())["error"]["code"] == code
        after = sorted(p.name for p in config.storage.dir.rglob("*"))
    assert before == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


async def test_offset_errors(upstream: ScriptedUpstream, config_for: Callable[..., Config]) -> None:
    upstream.script = paced_script(3, 0)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await start_stream(http, proxy.url, 1)
        await wait_state(http, proxy.url, session_id, "complete")
        url = f"{proxy.url}/sessions/{session_id}/events"
        for query, headers, status in [
            ("?offset=abc", {}, 400),
            ("?offset=-3", {}, 400),
            ("", {"Last-Event-ID": "x1"}, 400),
            ("?offset=5", {}, 416),
            ("?offset=99", {}, 416),
        ]:
            async with http.get(url + query, headers={**AUTH, **headers}) as r:
                assert r.status == status, query
                assert (await r.json())["error"]["type"] == "resumable_proxy_error"
        _, body = await read_sse(http, url + "?offset=4", headers=AUTH)
        assert body == b""


async def test_keepalive_is_a_single_comment_line(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = [chunk(0), 0.5, chunk(1), b"data: [DONE]\n\n"]
    config = config_for(upstream.url, **{"session.keepalive": "100ms"})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        _, body = await read_sse(
            http, proxy.url + "/v1/chat/completions", method="POST", json=BODY, headers=AUTH
        )
    assert b": keepalive\n" in body
    assert b": keepalive\n\n" not in body
    assert event_ids(body) == [1, 2, 3]


async def test_event_ids_off_resumes_by_offset(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(4, 0)
    config = config_for(upstream.url, **{"session.event_ids": "false"})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        response, body = await read_sse(
            http, proxy.url + "/v1/chat/completions", method="POST", json=BODY, headers=AUTH
        )
        session_id = response.headers["X-Resume-Session-Id"]
        _, rest = await read_sse(
            http, f"{proxy.url}/sessions/{session_id}/events?offset=3", headers=AUTH
        )
    assert b"id:" not in body
    assert rest == chunk(3) + b"data: [DONE]\n\n"


async def test_session_json_has_contract_fields_and_latency_figures(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    upstream.script = paced_script(5, 0.02)
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await start_stream(http, proxy.url, 1)
        info = await wait_state(http, proxy.url, session_id, "complete")
    for key in ("id", "state", "events", "bytes", "created_at", "updated_at", "method", "path"):
        assert key in info
    assert info["upstream_status"] == 200
    assert info["method"] == "POST" and info["path"] == "/v1/chat/completions"
    figures = info["inter_event_ms"]
    assert isinstance(info["ttft_ms"], float) and isinstance(info["duration_ms"], float)
    # Each event came in a read of its own after a pause, so no gap is the 0 of one read.
    assert 0 < figures["p50"] <= figures["p99"] <= figures["max"]
    # The rate is the events over the span from the first to the last arrival.
    span_s = (info["duration_ms"] - info["ttft_ms"]) / 1000
    assert info["events_per_s"] == pytest.approx(info["events"] / span_s, rel=0.01)
