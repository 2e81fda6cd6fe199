"""ResumingTransport under real cuts: the unmodified OpenAI SDK, the real proxy, a middlebox.

Each test puts `CuttingMiddlebox` between the SDK and the proxy and cuts connections at chosen
byte counts (in the middle of events, between them, in the response headers of a resume).
The SDK must see exactly the chunks the proxy logged for the session, in order, once each,
and the mock upstream must count a single call.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.client import AsyncResumingTransport, ResumingTransport
from proxy.client.transport import _Policy, _Splice
from proxy.config import Config
from tests.helpers import (
    CUT,
    ProxyProcess,
    RunningProxy,
    ScriptedUpstream,
    free_port,
    run_proxy,
)

from .middlebox import CuttingMiddlebox
from .middlebox import cutting as middlebox

API_KEY = "sk-resume-test"
MODEL = "mock-gpt"
PROMPT = "why do logs have segments"
# Per connection: two cuts mid-event in the first response, one in the headers of a resume,
# then mid-event again, in the headers, and once more in the body.
CUTS = [1500, 777, 60, 2222, 150, 3001]
HTTP_MODULES = {"httpx": httpx, "httpx2": httpx2}


def chunk_event(i: int) -> bytes:
    """A chat chunk of the OpenAI shape whose content is `<i> `."""
    return (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"%d "},"finish_reason":null}]}\n\n' % i
    )


def read_contents(url: str, module: Any, seen: list[str]) -> None:
    """The contents of a chat stream read through ResumingTransport on `module`'s client,
    into `seen` as they come (so what the app had shown is there when the SDK raises)."""
    with openai.OpenAI(
        base_url=url + "/v1",
        api_key=API_KEY,
        http_client=module.Client(transport=ResumingTransport()),
    ) as client:
        seen.extend(chunk.choices[0].delta.content for chunk in create_stream(client, "chat"))


async def upstream_calls(proxy: RunningProxy) -> int:
    """Calls the mock received (the proxy forwards `/mock/calls` to it like any path)."""
    async with httpx.AsyncClient() as client:
        counts = (await client.get(proxy.url + "/mock/calls")).json()
    return sum(counts.values())


async def logged_events(proxy: RunningProxy, session_id: str) -> list[dict[str, Any]]:
    """The session's whole log, as the JSON of each data event."""
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{proxy.url}/sessions/{session_id}/events",
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    events = []
    for block in response.content.split(b"\n\n"):
        data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
        if data and data[0] != b"[DONE]":
            events.append(json.loads(b"\n".join(data)))
    return events


def without_ids(value: Any) -> Any:
    """Fresh runs differ only in generated ids and timestamps."""
    if isinstance(value, dict):
        return {
            key: without_ids(item)
            for key, item in value.items()
            if key not in ("id", "item_id", "created", "created_at")
        }
    if isinstance(value, list):
        return [without_ids(item) for item in value]
    return value


def create_stream(client: Any, api: str) -> Any:
    """The streaming call for `api` (a coroutine for an async client)."""
    if api == "chat":
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True
        )
    return client.responses.create(model=MODEL, input=PROMPT, stream=True)


Result = tuple[str, list[dict[str, Any]]]


def run_sync(url: str, module: Any, api: str, transport: ResumingTransport | None) -> Result:
    http_client = module.Client(transport=transport) if transport else module.Client()
    with openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, http_client=http_client) as client:
        stream = create_stream(client, api)
        chunks = [chunk.to_dict() for chunk in stream]
        return stream.response.headers["X-Resume-Session-Id"], chunks


async def run_async(
    url: str, module: Any, api: str, transport: AsyncResumingTransport | None
) -> Result:
    http_client = module.AsyncClient(transport=transport) if transport else module.AsyncClient()
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=API_KEY, http_client=http_client
    ) as client:
        stream = await create_stream(client, api)
        chunks = [chunk.to_dict() async for chunk in stream]
        return stream.response.headers["X-Resume-Session-Id"], chunks


async def run_sdk(
    url: str, kind: str, api: str, *, resuming: bool = True, **options: Any
) -> Result:
    """One stream through the SDK; `kind` is "<httpx|httpx2>-<sync|async>"."""
    module_name, mode = kind.split("-")
    module = HTTP_MODULES[module_name]
    if mode == "sync":
        transport = ResumingTransport(**options) if resuming else None
        return await asyncio.to_thread(run_sync, url, module, api, transport)
    async_transport = AsyncResumingTransport(**options) if resuming else None
    return await run_async(url, module, api, async_transport)


def mid_event(box: CuttingMiddlebox) -> bool:
    """Whether some cut fell inside an event's bytes (not at a boundary, not in headers)."""
    return any(c.body and not c.body.endswith(b"\n\n") for c in box.cut_connections())


CLIENT_KINDS = ["httpx-sync", "httpx2-sync", "httpx-async", "httpx2-async"]


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("kind", CLIENT_KINDS)
async def test_sdk_sees_every_chunk_once_across_cuts_and_upstream_is_called_once(
    proxy: RunningProxy, kind: str, api: str
) -> None:
    async with middlebox(proxy.url, CUTS) as box:
        session_id, chunks = await run_sdk(box.url, kind, api)
    assert len(box.cut_connections()) == len(CUTS)
    assert mid_event(box)
    assert await upstream_calls(proxy) == 1
    assert chunks == await logged_events(proxy, session_id)

    _, uncut = await run_sdk(proxy.url, kind, api)
    assert without_ids(chunks) == without_ids(uncut)


@pytest.mark.parametrize("kind", ["httpx-sync", "httpx2-async"])
async def test_without_the_transport_the_same_cut_reaches_the_app(
    proxy: RunningProxy, kind: str
) -> None:
    async with middlebox(proxy.url, CUTS) as box:
        with pytest.raises(openai.APIConnectionError) as raised:
            await run_sdk(box.url, kind, "chat", resuming=False)
    assert isinstance(raised.value.__cause__, httpx.TransportError | httpx2.TransportError)
    assert len(box.connections) == 1


async def test_a_stream_survives_dozens_of_cuts_and_a_resume_costs_milliseconds(
    config_for: Callable[..., Config],
) -> None:
    """Every connection is cut: most after 300-1500 bytes, every fifth inside the headers."""
    rng = random.Random(6)
    cuts = [40 if i % 5 == 4 else rng.randint(300, 1500) for i in range(400)]
    config = config_for(**{"mock.tokens": 200, "mock.interval_ms": 2})
    async with run_proxy(config) as proxy, middlebox(proxy.url, cuts) as box:
        session_id, chunks = await run_sdk(box.url, "httpx2-async", "chat")
        assert chunks == await logged_events(proxy, session_id)
        assert await upstream_calls(proxy) == 1

    connections = box.connections
    cut = box.cut_connections()
    latencies = [
        (after.first_event_at() - before.cut_at) * 1000
        for before, after in itertools.pairwise(connections)
        # A cut after progress is resumed at once (a cut before any event waits a backoff).
        if before.cut_at is not None
        and b"\n\n" in before.body
        and after.first_event_at() is not None
    ]
    print(
        f"\n{len(cut)} cuts in one stream of {len(chunks)} chunks; cut to first event of the "
        f"continuation: median {statistics.median(latencies):.1f} ms, "
        f"max {max(latencies):.1f} ms over {len(latencies)} resumes"
    )
    assert len(cut) >= 30
    assert latencies  # resumes after progress happened (their cost is printed, not asserted)


async def test_a_failed_session_surfaces_as_api_error_after_a_resume(
    config_for: Callable[..., Config], upstream: ScriptedUpstream
) -> None:
    upstream.script = [*(chunk_event(i) for i in range(6)), 0.3, CUT]
    async with (
        run_proxy(config_for(upstream.url)) as proxy,
        middlebox(proxy.url, [700]) as box,
    ):
        seen: list[str] = []
        with pytest.raises(openai.APIError) as raised:
            await asyncio.to_thread(read_contents, box.url, httpx2, seen)
    assert "failed" in str(raised.value)
    assert seen == [f"{i} " for i in range(6)]
    assert box.cut_connections() and upstream.calls == 1


@pytest.mark.parametrize("module", [httpx, httpx2], ids=["httpx", "httpx2"])
async def test_a_cut_after_the_last_event_ends_the_stream_on_the_proxys_204(
    proxy: RunningProxy, module: Any
) -> None:
    """The body broke after `[DONE]` but before the chunked end (the SDK stops reading at
    `[DONE]`, so this reads the body to its end as any other client would): the resume from
    the last event is answered 204, which the transport takes as the end."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    async with middlebox(proxy.url, [b"data: [DONE]\n\n"]) as box:

        def read() -> tuple[str, bytes]:
            with (
                module.Client(transport=ResumingTransport()) as client,
                client.stream(
                    "POST", box.url + "/v1/chat/completions", json=body, headers=headers
                ) as response,
            ):
                return response.headers["X-Resume-Session-Id"], b"".join(response.iter_bytes())

        session_id, received = await asyncio.to_thread(read)
    assert len(box.cut_connections()) == 1
    assert [bytes(c.sent).split(b"\r\n", 1)[0] for c in box.connections[1:]] == [
        b"HTTP/1.1 204 No Content"
    ]
    async with httpx.AsyncClient() as client:
        logged = await client.get(f"{proxy.url}/sessions/{session_id}/events", headers=headers)
    assert received == logged.content
    assert received.endswith(b"data: [DONE]\n\n")
    assert await upstream_calls(proxy) == 1


@pytest.mark.parametrize("module", [httpx, httpx2], ids=["httpx", "httpx2"])
async def test_when_resumes_keep_failing_the_original_error_is_raised(
    proxy: RunningProxy, module: Any
) -> None:
    async with middlebox(proxy.url, [1500] + [20] * 10) as box:

        def read() -> None:
            transport = ResumingTransport(max_retries=3, backoff=0.01)
            with module.Client(transport=transport) as client:
                body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
                with client.stream(
                    "POST", box.url + "/v1/chat/completions", json={**body, "stream": True}
                ) as response:
                    for _ in response.iter_bytes():
                        pass

        with pytest.raises((module.ReadError, module.RemoteProtocolError)) as raised:
            await asyncio.to_thread(read)
    assert "could not resume session" in "".join(raised.value.__notes__)
    assert len(box.connections) == 1 + 3


async def test_other_responses_pass_through_untouched(
    proxy: RunningProxy, upstream: ScriptedUpstream
) -> None:
    """A non-stream answer, and a stream that does not come from the proxy (no session header):
    the second is cut, and the cut reaches the caller with no resume attempt."""
    upstream.script = [b"data: 1\n\n" * 50, 0.2, b"data: 2\n\n"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    async with middlebox(upstream.url, [300]) as box:
        async with httpx2.AsyncClient(transport=AsyncResumingTransport()) as client:
            plain = await client.post(proxy.url + "/v1/chat/completions", json=body)
            assert plain.json()["choices"][0]["message"]["content"]
            with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
                await client.post(box.url + "/stream", json=body)
    assert len(box.connections) == 1


@given(
    st.lists(
        st.sampled_from([b"\n", b"\r\n", b"\r"]).flatmap(
            lambda end: st.integers(1, 999).map(
                lambda n: b'id: %d%sdata: {"n": %d}%s%s' % (n, end, n, end, end)
            )
        ),
        min_size=1,
        max_size=8,
    ),
    st.data(),
)
def test_splice_passes_only_whole_events_for_any_split(events: list[bytes], data: Any) -> None:
    stream = b"".join(events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    request = httpx2.Request("GET", "http://proxy/v1/x")
    policy = _Policy(5, 0.1, 2.0, "X-Resume-Session-Id")
    splice = _Splice(request, httpx2.Response(200), "session-1", policy)
    passed = b""
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        passed += splice.feed(stream[start:end])
        whole = [n for n in range(len(events) + 1) if passed == b"".join(events[:n])]
        assert whole, "a partial event was passed on"
        assert splice.offset == (int(events[whole[0] - 1].split()[1]) if whole[0] else 0)
    assert passed + splice.finish() == stream


async def test_a_session_cancelled_while_the_transport_resumes_surfaces_as_api_error(
    config_for: Callable[..., Config], upstream: ScriptedUpstream
) -> None:
    """The connection drops mid-stream; by the time the transport has resumed, the session
    is cancelled (POST /sessions/{id}/cancel from elsewhere): the SDK raises APIError."""
    proxy_url: list[str] = []

    async def cancel_it() -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient() as client:
            listing = (await client.get(proxy_url[0] + "/sessions", headers=headers)).json()
            session_id = listing["data"][0]["id"]
            await client.post(f"{proxy_url[0]}/sessions/{session_id}/cancel", headers=headers)

    later = [step for i in range(6, 100) for step in (0.05, chunk_event(i))]  # never sent
    upstream.script = [*(chunk_event(i) for i in range(6)), 0.5, cancel_it, *later]
    async with (
        run_proxy(config_for(upstream.url)) as proxy,
        middlebox(proxy.url, [700]) as box,
    ):
        proxy_url.append(proxy.url)
        seen: list[str] = []
        with pytest.raises(openai.APIError) as raised:
            await asyncio.to_thread(read_contents, box.url, httpx, seen)
    assert raised.value.code == "cancelled"
    assert seen == [f"{i} " for i in range(6)]
    assert len(box.cut_connections()) == 1 and upstream.calls == 1


def test_a_session_interrupted_by_a_kill9_surfaces_as_api_error_after_the_restart(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    """kill -9 of the proxy mid-stream, restarted on the same port and data dir: the
    transport resumes from the restarted proxy, replays the rest of what was logged and
    then the `interrupted` event, which the SDK raises as APIError."""
    port = free_port()
    data_dir = tmp_path / "data"
    first = ProxyProcess(data_dir, port=port)
    again = ProxyProcess(data_dir, port=port)
    proxies.extend([first.start(), again])
    got_some = threading.Event()
    seen: list[str] = []

    def read() -> None:
        transport = ResumingTransport(max_retries=20, backoff=0.1, max_backoff=0.5)
        with openai.OpenAI(
            base_url=first.url + "/v1",
            api_key=API_KEY,
            http_client=httpx.Client(transport=transport),
        ) as client:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": PROMPT}],
                stream=True,
                extra_body={"mock_tokens": 100_000, "mock_interval_ms": 5},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    seen.append(chunk.choices[0].delta.content)
                if len(seen) == 10:
                    got_some.set()

    reader = ThreadPoolExecutor(1).submit(read)
    assert got_some.wait(30)
    first.kill()
    again.start()
    with pytest.raises(openai.APIError) as raised:
        reader.result(60)
    replay = httpx.get(
        f"{again.url}/sessions", headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()["data"]
    assert raised.value.code == "interrupted"
    assert len(seen) >= 10
    assert [session["state"] for session in replay] == ["interrupted"]
