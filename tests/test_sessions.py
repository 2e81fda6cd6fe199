"""Sessions and resume: replay from any offset, follow live, never call the upstream again."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import Config

from .helpers import CUT, ScriptedUpstream, event_ids, read_sse, run_proxy

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
    seen = b""
    async with asyncio.timeout(20):
        while seen.count(b"\n\n") < read_events:
            seen += await response.content.readany()
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
    assert whole.startswith(seen[: seen.rindex(b"\n\n") + 2])
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
    assert info["ttft_ms"] >= 0 and info["duration_ms"] >= 80
    assert 15 <= info["inter_event_ms"]["p50"] <= 500
    assert info["inter_event_ms"]["max"] >= info["inter_event_ms"]["p99"]
    assert info["events_per_s"] > 0
