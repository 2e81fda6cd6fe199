"""Background responses: the OpenAI SDK's own resume calls, served by the proxy over an upstream
that refuses background mode (the built-in mock answers `background: true` with 400).

Every test drives the real proxy on a real port with the real openai SDK, once on the disk log
and once on a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from multidict import CIMultiDict
from openai import AsyncOpenAI

from proxy.app import API
from proxy.config import Config
from proxy.mock import answer_tokens
from proxy.relay import UpstreamRequest
from proxy.responses import background_request, latest_response_in
from proxy.sse import event_data, split_events

from .client.node import Workspace, require_node
from .helpers import (
    ProxyProcess,
    RunningProxy,
    ScriptedUpstream,
    config_file,
    make_config,
    run_proxy,
)

PROMPT = "tell me about background mode"
ALICE, BOB = "sk-alice", "sk-bob"
AUTH = {"Authorization": "Bearer " + ALICE}

pytestmark = pytest.mark.backends("disk", "redis")


def full_text(tokens: int) -> str:
    return "".join(answer_tokens(PROMPT, tokens))


def mock_fields(tokens: int, interval_ms: float) -> dict[str, Any]:
    return {"mock_tokens": tokens, "mock_interval_ms": interval_ms}


def background(tokens: int, interval_ms: float, stream: bool = False) -> dict[str, Any]:
    """The arguments of `responses.create` for a background response of the mock's."""
    return {
        "model": "mock-gpt",
        "input": PROMPT,
        "background": True,
        **({"stream": True} if stream else {}),
        "extra_body": mock_fields(tokens, interval_ms),
    }


@pytest.fixture
def proxy_for(
    config_for: Callable[..., Config],
) -> Callable[..., AbstractAsyncContextManager[RunningProxy]]:
    def build(upstream: str = "mock") -> AbstractAsyncContextManager[RunningProxy]:
        return run_proxy(config_for(upstream))

    return build


@pytest.fixture
async def proxy(
    proxy_for: Callable[..., AbstractAsyncContextManager[RunningProxy]],
) -> AsyncIterator[RunningProxy]:
    async with proxy_for() as running:
        yield running


def sdk(proxy_url: str, api_key: str = ALICE) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=proxy_url + "/v1", api_key=api_key, max_retries=0, timeout=30)


async def upstream_calls(proxy: RunningProxy) -> dict[str, int]:
    async with httpx.AsyncClient() as http:
        calls: dict[str, int] = (await http.get(proxy.app[API].upstream_url + "/mock/calls")).json()
    return calls


async def poll_status(client: AsyncOpenAI, response_id: str, status: str) -> Any:
    """Poll `retrieve` as an app would, until `status` (bounded: 300 polls, 15 s)."""
    for _ in range(300):
        response = await client.responses.retrieve(response_id)
        if response.status == status:
            return response
        await asyncio.sleep(0.05)
    raise AssertionError(f"{response_id} never reached {status}: {response.status}")


async def take(stream: Any, count: int) -> list[Any]:
    """The first `count` events of an SDK stream, which is then closed."""
    events = []
    async for event in stream:
        events.append(event)
        if len(events) == count:
            break
    await stream.close()
    return events


def deltas(events: list[Any]) -> str:
    return "".join(event.delta for event in events if event.type == "response.output_text.delta")


# --- the pure parts --------------------------------------------------------------------------


def upstream_request(body: bytes) -> UpstreamRequest:
    return UpstreamRequest("POST", "/v1/responses", CIMultiDict(), body, "0" * 64)


def test_background_request_strips_background_and_asks_for_a_stream() -> None:
    body = {
        "model": "m",
        "input": "hi",
        "background": True,
        "background_options": {"completion_window": "soonest"},
        "tools": [{"type": "function", "name": "f", "parameters": {}}],
        "reasoning": {"effort": "low"},
        "store": False,
    }
    plan = background_request(upstream_request(json.dumps(body).encode()))
    assert plan is not None
    sent, wants_stream = plan
    assert not wants_stream
    assert json.loads(sent.body) == {
        "model": "m",
        "input": "hi",
        "tools": [{"type": "function", "name": "f", "parameters": {}}],
        "reasoning": {"effort": "low"},
        "store": False,
        "stream": True,
    }
    assert sent.body_sha256 == "0" * 64  # the session still records the client's request
    streamed = background_request(upstream_request(b'{"background": true, "stream": true}'))
    assert streamed is not None and streamed[1]
    for other in (b'{"background": false}', b'{"model": "m"}', b'"background"', b"{nope"):
        assert background_request(upstream_request(other)) is None


def test_logged_events_split_and_their_data_is_read_as_sse_dispatches_it() -> None:
    events = [
        b'id: 1\nevent: response.created\ndata: {"type":"response.created"}\n\n',
        b"id: 2\r\ndata: line one\r\ndata:line two\r\n\r\n",
        b"id: 3\ndata\n\n",
    ]
    assert split_events(b"".join(events)) == events
    assert event_data(events[0]) == b'{"type":"response.created"}'
    assert event_data(events[1]) == b"line one\nline two"
    assert event_data(events[2]) == b""


def test_the_latest_response_of_a_batch_skips_deltas_and_lookalikes() -> None:
    def typed(kind: str, **fields: Any) -> bytes:
        return b"data: " + json.dumps({"type": kind, **fields}).encode() + b"\n\n"

    created = typed("response.created", response={"id": "r", "status": "in_progress"})
    quoted = typed("response.output_text.delta", delta='"type": "response.completed"')
    batch = created + quoted + typed("response.in_progress", response={"id": "r", "n": 2})
    assert latest_response_in(batch) == ("response.in_progress", {"id": "r", "n": 2})
    assert latest_response_in(created + quoted) == (
        "response.created",
        {"id": "r", "status": "in_progress"},
    )
    assert latest_response_in(quoted) is None


# --- create, poll, resume ---------------------------------------------------------------------


async def test_background_create_returns_before_the_answer_then_polling_completes_it(
    proxy: RunningProxy,
) -> None:
    async with sdk(proxy.url) as client:
        created = await client.responses.create(**background(40, 20))
        assert created.status in ("queued", "in_progress")
        assert created.background is True
        assert created.output == []
        done = await poll_status(client, created.id, "completed")
        polls = await asyncio.gather(*(client.responses.retrieve(created.id) for _ in range(8)))
    assert {poll.model_dump_json() for poll in polls} == {done.model_dump_json()}
    assert done.id == created.id
    assert done.output_text == full_text(40)
    assert done.background is True
    assert done.usage is not None and done.usage.output_tokens == 40
    assert (await upstream_calls(proxy)).get("/v1/responses") == 1


async def test_background_stream_resumes_after_sequence_number_with_one_upstream_call(
    proxy: RunningProxy,
) -> None:
    async with sdk(proxy.url) as client:
        stream = await client.responses.create(**background(30, 15, stream=True))
        seen = await take(stream, 10)
        response_id = seen[0].response.id
        assert [event.sequence_number for event in seen] == list(range(10))
        assert seen[0].type == "response.created"

        resumed = await client.responses.retrieve(response_id, stream=True, starting_after=9)
        rest = [event async for event in resumed]
        sequence = [event.sequence_number for event in rest]
        assert sequence == list(range(10, 10 + len(rest)))
        assert rest[-1].type == "response.completed"
        assert deltas(seen) + deltas(rest) == full_text(30)
        assert rest[-1].response.output_text == full_text(30)

        async with client.responses.stream(response_id=response_id, starting_after=20) as again:
            replayed = [event async for event in again]
            final = await again.get_final_response()
        assert [event.sequence_number for event in replayed] == sequence[11:]
        assert final.output_text == full_text(30)
    assert (await upstream_calls(proxy)).get("/v1/responses") == 1


async def test_cancel_while_streaming_is_idempotent_and_streams_end_with_api_error(
    proxy: RunningProxy,
) -> None:
    async with sdk(proxy.url) as client:
        stream = await client.responses.create(**background(2000, 10, stream=True))
        first = await stream.__anext__()
        response_id = first.response.id
        cancelled = await client.responses.cancel(response_id)
        assert cancelled.status == "cancelled"
        assert cancelled.error is not None and cancelled.error.code == "cancelled"
        with pytest.raises(openai.APIError) as live:
            async for _ in stream:  # the reader that stayed on gets the end too
                pass
        assert type(live.value) is openai.APIError and live.value.body["code"] == "cancelled"
        again = await client.responses.cancel(response_id)
        assert again.model_dump() == cancelled.model_dump()
        assert (await client.responses.retrieve(response_id)).status == "cancelled"
        replay = await client.responses.retrieve(response_id, stream=True)
        with pytest.raises(openai.APIError) as replayed:
            async for _ in replay:
                pass
        assert replayed.value.body["code"] == "cancelled"
    assert (await upstream_calls(proxy)).get("/v1/responses") == 1


async def test_cancel_after_completion_returns_the_completed_response(proxy: RunningProxy) -> None:
    async with sdk(proxy.url) as client:
        created = await client.responses.create(**background(5, 0))
        done = await poll_status(client, created.id, "completed")
        assert (await client.responses.cancel(created.id)).model_dump() == done.model_dump()


async def test_another_api_key_gets_not_found_on_every_call_and_changes_nothing(
    proxy: RunningProxy,
) -> None:
    async with sdk(proxy.url) as alice, sdk(proxy.url, BOB) as bob:
        created = await alice.responses.create(**background(20, 20))
        with pytest.raises(openai.NotFoundError):
            await bob.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await bob.responses.retrieve(created.id, stream=True, starting_after=1)
        with pytest.raises(openai.NotFoundError):
            await bob.responses.cancel(created.id)
        with pytest.raises(openai.NotFoundError):
            await bob.responses.delete(created.id)
        done = await poll_status(alice, created.id, "completed")
        assert done.output_text == full_text(20)
    calls = await upstream_calls(proxy)
    assert calls == {"/v1/responses": 1}  # no call of bob's reached upstream


async def test_delete_forgets_the_response_and_its_id_then_goes_upstream(
    proxy: RunningProxy,
) -> None:
    async with sdk(proxy.url) as client:
        created = await client.responses.create(**background(500, 10))
        async with httpx.AsyncClient() as http:
            listed = await http.get(proxy.url + "/sessions", headers=AUTH)
            (session,) = listed.json()["data"]
            deleted = await http.delete(f"{proxy.url}/v1/responses/{created.id}", headers=AUTH)
            assert deleted.json() == {"id": created.id, "object": "response", "deleted": True}
            gone = await http.get(f"{proxy.url}/sessions/{session['id']}", headers=AUTH)
            assert gone.status_code == 404
        with pytest.raises(openai.NotFoundError, match="Invalid URL"):
            await client.responses.retrieve(created.id)  # the mock's own 404
    assert (await upstream_calls(proxy)).get(f"/v1/responses/{created.id}") == 1


async def test_unknown_ids_and_plain_creates_go_upstream_unchanged(proxy: RunningProxy) -> None:
    async with sdk(proxy.url) as client:
        with pytest.raises(openai.NotFoundError, match=r"Invalid URL \(GET /v1/responses/resp_x1"):
            await client.responses.retrieve("resp_x1")
        with pytest.raises(openai.NotFoundError, match=r"POST /v1/responses/resp_x1/cancel"):
            await client.responses.cancel("resp_x1")
        with pytest.raises(openai.NotFoundError, match=r"DELETE /v1/responses/resp_x1"):
            await client.responses.delete("resp_x1")
        plain = await client.responses.create(
            model="mock-gpt", input=PROMPT, extra_body=mock_fields(4, 0)
        )
        assert plain.status == "completed" and plain.background is False
        with pytest.raises(openai.NotFoundError):  # not a background one: the proxy keeps no id
            await client.responses.retrieve(plain.id)
        streamed = await client.responses.create(
            model="mock-gpt", input=PROMPT, stream=True, extra_body=mock_fields(4, 0)
        )
        events = [event async for event in streamed]
        assert events[-1].type == "response.completed"
    calls = await upstream_calls(proxy)
    assert calls["/v1/responses"] == 2
    assert calls["/v1/responses/resp_x1"] == 2
    assert calls["/v1/responses/resp_x1/cancel"] == 1
    assert calls[f"/v1/responses/{plain.id}"] == 1


@pytest.mark.backends("redis")
async def test_another_replica_resolves_the_id_streams_and_cancels_it(
    tmp_path: Path, backend: dict[str, str]
) -> None:
    configs = [make_config(tmp_path / name, **backend) for name in ("a", "b")]
    async with run_proxy(configs[0]) as a, run_proxy(configs[1]) as b:
        async with sdk(a.url) as on_a, sdk(b.url) as on_b:
            stream = await on_a.responses.create(**background(2000, 10, stream=True))
            seen = await take(stream, 5)
            response_id = seen[0].response.id
            assert (await on_b.responses.retrieve(response_id)).status == "in_progress"
            followed = await on_b.responses.retrieve(response_id, stream=True, starting_after=4)
            tail = await take(followed, 5)
            assert [event.sequence_number for event in tail] == [5, 6, 7, 8, 9]
            assert (await on_b.responses.cancel(response_id)).status == "cancelled"
            assert (await on_a.responses.retrieve(response_id)).status == "cancelled"
        assert (await upstream_calls(a)).get("/v1/responses") == 1
        assert await upstream_calls(b) == {}


# --- what a poll sees while the answer is still coming ----------------------------------------


def typed(kind: str, sequence: int, **fields: Any) -> bytes:
    payload = {"type": kind, "sequence_number": sequence, **fields}
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(payload).encode())


def response_object(status: str, output: list[Any]) -> dict[str, Any]:
    return {
        "id": "resp_gated0001",
        "object": "response",
        "created_at": 1_700_000_000,
        "status": status,
        "background": False,
        "error": None,
        "model": "m",
        "output": output,
        "usage": None,
        "tools": [{"type": "function", "name": "lookup", "parameters": {}}],
        "reasoning": {"effort": "low", "summary": None},
        "store": False,
    }


async def test_a_poll_in_progress_holds_the_latest_response_event_and_upstream_gets_no_background(
    proxy_for: Callable[..., AbstractAsyncContextManager[RunningProxy]],
) -> None:
    gate = asyncio.Event()
    message = {
        "id": "msg_1",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Hi there", "annotations": []}],
    }
    place = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    upstream = ScriptedUpstream(
        script=[
            typed("response.created", 0, response=response_object("in_progress", [])),
            typed("response.in_progress", 1, response=response_object("in_progress", [])),
            typed("response.output_item.added", 2, output_index=0, item={**message, "content": []}),
            typed("response.output_text.delta", 3, **place, delta="Hi"),
            gate.wait,
            typed("response.output_text.delta", 4, **place, delta=" there"),
            typed("response.output_item.done", 5, output_index=0, item=message),
            typed("response.completed", 6, response=response_object("completed", [message])),
        ]
    )
    await upstream.start()
    body = {
        "model": "m",
        "input": "hi",
        "background": True,
        "tools": [{"type": "function", "name": "lookup", "parameters": {}}],
        "reasoning": {"effort": "low"},
        "store": False,
        "metadata": {"k": "v"},
    }
    try:
        async with proxy_for(upstream.url) as proxy, sdk(proxy.url) as client:
            created = await client.responses.create(**body)  # type: ignore[call-overload]
            assert created.status == "in_progress" and created.background is True
            for _ in range(200):  # until the proxy has logged the delta before the gate
                async with httpx.AsyncClient() as http:
                    listed = await http.get(proxy.url + "/sessions", headers=AUTH)
                if listed.json()["data"][0]["events"] == 4:
                    break
                await asyncio.sleep(0.02)
            polled = await client.responses.with_raw_response.retrieve(created.id)
            expected = {**response_object("in_progress", []), "background": True}
            assert polled.http_response.json() == expected
            assert polled.parse().status == "in_progress"
            gate.set()
            done = await poll_status(client, created.id, "completed")
            assert done.output_text == "Hi there" and done.background is True
    finally:
        gate.set()
        await upstream.stop()
    (sent,) = upstream.requests
    assert json.loads(sent["body"]) == {
        key: value for key, value in {**body, "stream": True}.items() if key != "background"
    }


# --- the proxy killed mid-stream -------------------------------------------------------------


def test_kill9_mid_stream_then_restart_reports_failed_and_replays_what_was_logged(
    tmp_path: Path, backend: dict[str, Any], proxies: list[ProxyProcess]
) -> None:
    # On disk (no overrides): `fsync: interval`, which a kill -9 must not cost an event.
    config = config_file(tmp_path / "proxy.yaml", backend or {"storage.fsync": "interval"})
    data_dir = tmp_path / "data"
    first = ProxyProcess(data_dir, extra_args=["--config", str(config)])
    proxies.append(first.start())
    client = openai.OpenAI(base_url=first.url + "/v1", api_key=ALICE, max_retries=0)
    stream = client.responses.create(**background(5000, 5, stream=True))
    seen = []
    for event in stream:
        seen.append(event)
        if len(seen) == 30:
            break
    first.kill()
    stream.close()
    response_id = seen[0].response.id

    second = ProxyProcess(data_dir, extra_args=["--config", str(config)])
    proxies.append(second.start())
    client = openai.OpenAI(base_url=second.url + "/v1", api_key=ALICE, max_retries=0)
    for _ in range(150):  # Redis: until another replica sees the dead one's heartbeat gone
        failed = client.responses.retrieve(response_id)
        if failed.status != "in_progress":
            break
        time.sleep(0.1)
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.code == "interrupted"
    replay = client.responses.retrieve(response_id, stream=True, starting_after=19)
    replayed = []
    with pytest.raises(openai.APIError) as ended:
        for event in replay:
            replayed.append(event)
    assert ended.value.body["code"] == "interrupted"
    sequence = [event.sequence_number for event in replayed]
    assert sequence == list(range(20, 20 + len(replayed)))
    assert len(replayed) >= 10  # every event the client saw was logged before it saw it
    assert [event.model_dump() for event in replayed[:10]] == [e.model_dump() for e in seen[20:]]


# --- openai-node -----------------------------------------------------------------------------


@pytest.fixture
def node_workspace(tmp_path: Path) -> Workspace:
    """openai-node as the client tests run it: the pinned version of `examples/package.json`,
    from the cache `.ci/run` fills (`python -m tests.client.node`)."""
    return Workspace(tmp_path / "node", require_node())


@pytest.mark.backends("disk")
async def test_openai_node_retrieve_stream_starting_after_gets_the_rest(
    proxy: RunningProxy, node_workspace: Workspace
) -> None:
    async with sdk(proxy.url) as client:
        stream = await client.responses.create(**background(25, 10, stream=True))
        seen = await take(stream, 7)
    result = await node_workspace.run(
        "tests/client/js/retrieve_response.mjs", proxy.url + "/v1", ALICE, seen[0].response.id, "6"
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [event["seq"] for event in events] == list(range(7, 7 + len(events)))
    assert events[-1]["type"] == "response.completed"
    text = deltas(seen) + "".join(
        event["delta"] for event in events if event["type"] == "response.output_text.delta"
    )
    assert text == full_text(25)
    assert (await upstream_calls(proxy)).get("/v1/responses") == 1
