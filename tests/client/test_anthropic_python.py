"""anthropic-python, unmodified, through the proxy to the mock's `/v1/messages`: it streams,
and with `ResumingTransport` a stream survives cuts with one upstream call, its session bound
to whichever credential header the client sent (`x-api-key` as in Anthropic's own examples,
or the `Authorization: Bearer` the SDK sends for `api_key`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import pytest

from proxy.client import AsyncResumingTransport, ResumingTransport
from tests.helpers import RunningProxy, make_config, run_proxy

from .middlebox import cutting

PROMPT = "what does a torn tail look like"
REQUEST: dict[str, Any] = {
    "model": "claude-mock",
    "max_tokens": 1000,
    "messages": [{"role": "user", "content": PROMPT}],
    "extra_body": {"mock_tokens": 50, "mock_interval_ms": 5},
}


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[RunningProxy]:
    async with run_proxy(make_config(tmp_path / "data", "mock")) as running:
        yield running


async def mock_calls(proxy: RunningProxy) -> dict[str, int]:
    async with httpx.AsyncClient() as client:
        calls: dict[str, int] = (await client.get(proxy.url + "/mock/calls")).json()
    return calls


def stream_sync(url: str, credential: dict[str, Any]) -> tuple[str, str, str | None]:
    """(streamed text, final message text, session id) with the sync client."""
    http_client = httpx2.Client(transport=ResumingTransport(backoff=0.01))
    with anthropic.Anthropic(
        base_url=url, max_retries=0, http_client=http_client, **credential
    ) as client:
        with client.messages.stream(**REQUEST) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
            session_id = stream.response.headers.get("X-Resume-Session-Id")
        block = final.content[0]
        assert block.type == "text"
        return text, block.text, session_id


async def test_anthropic_python_streams_through_the_proxy_and_survives_cuts(
    proxy: RunningProxy,
) -> None:
    async with cutting(proxy.url, [900, 1700, 50, 1200]) as box:
        text, final, session_id = await asyncio.to_thread(
            stream_sync, box.url, {"api_key": "sk-ant-python"}
        )
    assert len(box.cut_connections()) == 4
    assert text == final and len(text.split()) == 50
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url, api_key="sk-ant-python", max_retries=0
    ) as client:
        plain = await client.messages.create(**REQUEST)
    assert plain.content[0].text == text  # type: ignore[union-attr]
    assert await mock_calls(proxy) == {"/v1/messages": 2}  # the stream once, the plain one
    async with httpx.AsyncClient() as client:
        url = f"{proxy.url}/sessions/{session_id}"
        owner = await client.get(url, headers={"Authorization": "Bearer sk-ant-python"})
        assert owner.status_code == 200 and owner.json()["state"] == "complete"


async def test_a_session_bound_by_x_api_key_opens_to_that_key_only(proxy: RunningProxy) -> None:
    """The client authenticates with `x-api-key` only (as Anthropic's curl examples do); the
    resumes after the cuts carry it, and the session opens to it and to nothing else."""
    credential = {"api_key": None, "default_headers": {"X-Api-Key": "sk-ant-key-1"}}
    async with cutting(proxy.url, [1100, 800]) as box:
        text, final, session_id = await asyncio.to_thread(stream_sync, box.url, credential)
    assert len(box.cut_connections()) == 2 and text == final
    async with httpx.AsyncClient() as client:
        url = f"{proxy.url}/sessions/{session_id}"
        answers = {
            name: (await client.get(url, headers=headers)).status_code
            for name, headers in {
                "owner": {"x-api-key": "sk-ant-key-1"},
                "another key": {"x-api-key": "sk-ant-key-2"},
                "no key": {},
                "the key as Authorization": {"Authorization": "Bearer sk-ant-key-1"},
            }.items()
        }
        listing = await client.get(proxy.url + "/sessions", headers={"x-api-key": "sk-ant-key-1"})
    assert answers == {
        "owner": 200,
        "another key": 404,
        "no key": 404,
        "the key as Authorization": 404,
    }
    assert [s["id"] for s in listing.json()["data"]] == [session_id]
    assert await mock_calls(proxy) == {"/v1/messages": 1}


async def test_async_anthropic_client_with_the_async_transport(proxy: RunningProxy) -> None:
    async with (
        cutting(proxy.url, [1300, 700]) as box,
        anthropic.AsyncAnthropic(
            base_url=box.url,
            api_key="sk-ant-async",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=AsyncResumingTransport(backoff=0.01)),
        ) as client,
    ):
        async with client.messages.stream(**REQUEST) as stream:
            text = "".join([delta async for delta in stream.text_stream])
    assert len(box.cut_connections()) == 2 and len(text.split()) == 50
    assert await mock_calls(proxy) == {"/v1/messages": 1}
