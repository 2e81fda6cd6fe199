"""The JavaScript clients, unmodified from npm, against the real proxy and the cutting middlebox:
openai-node and @anthropic-ai/sdk with `resumingFetch`, the Vercel AI SDK's `streamText`, the
`useChat({ resume: true })` recipe, and every example in `examples/` run as written.

Each script runs in Node as a child process while the proxy serves in this test's event loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import Config
from tests.helpers import CUT, RunningProxy, ScriptedUpstream, run_proxy

from .middlebox import cutting
from .node import Workspace, require_node
from .test_transport import API_KEY, PROMPT, chunk_event, logged_events, upstream_calls

# Per connection: mid-event in the first response, then mid-event in a resume, inside a
# resume's headers, and twice more in bodies.
CUTS: list[int | bytes] = [1500, 777, 60, 2222, 150, 3001]


@pytest.fixture
async def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "node", require_node())


async def run_json(workspace: Workspace, script: str, **env: str) -> dict[str, Any]:
    result = await workspace.run(script, env=env)
    assert result.returncode == 0, result.stderr
    output: dict[str, Any] = json.loads(result.stdout)
    return output


async def openai_chat(workspace: Workspace, url: str, **env: str) -> dict[str, Any]:
    """openai-node's chat stream of PROMPT through `url` (with resumingFetch unless
    RESUMING="0"): its chunks, session id, and the error it ended with, if any."""
    return await run_json(
        workspace, "tests/client/js/openai_chat.mjs", PROXY_URL=url, API_KEY=API_KEY,
        PROMPT=PROMPT, **env,
    )  # fmt: skip


async def direct_answer(proxy: RunningProxy, prompt: str) -> str:
    """The mock's answer to `prompt`, asked without streaming and without the proxy's log."""
    async with httpx.AsyncClient() as client:
        response = await client.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "mock-gpt", "messages": [{"role": "user", "content": prompt}]},
        )
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


async def test_openai_node_with_resuming_fetch_survives_repeated_cuts_with_one_upstream_call(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    async with cutting(proxy.url, CUTS) as box:
        out = await openai_chat(workspace, box.url)
    assert "error" not in out, out
    assert len(box.cut_connections()) == len(CUTS)
    assert any(c.body and not c.body.endswith(b"\n\n") for c in box.cut_connections())
    assert out["chunks"] == await logged_events(proxy, out["sessionId"])
    assert len(out["chunks"]) == 40 + 2  # role chunk, 40 tokens, finish chunk
    assert await upstream_calls(proxy) == 1


async def test_openai_node_without_resuming_fetch_sees_the_cut(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    async with cutting(proxy.url, CUTS) as box:
        out = await openai_chat(workspace, box.url, RESUMING="0")
    assert "error" in out and out["error"]["name"] != "APIError"
    assert len(box.connections) == 1


async def test_openai_node_sees_a_failed_session_as_api_error_after_a_resume(
    config_for: Callable[..., Config], upstream: ScriptedUpstream, workspace: Workspace
) -> None:
    upstream.script = [*(chunk_event(i) for i in range(6)), 0.3, CUT]
    async with (
        run_proxy(config_for(upstream.url)) as proxy,
        cutting(proxy.url, [700]) as box,
    ):
        out = await openai_chat(workspace, box.url)
    assert out["error"]["name"] == "APIError", out
    assert "failed" in out["error"]["message"]
    assert [c["choices"][0]["delta"]["content"] for c in out["chunks"]] == [
        f"{i} " for i in range(6)
    ]
    assert box.cut_connections() and upstream.calls == 1


async def test_anthropic_node_sdk_streams_through_the_mock_and_resumes_across_cuts(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    async with cutting(proxy.url, [1400, 900]) as box:
        out = await run_json(
            workspace, "tests/client/js/anthropic_messages.mjs", PROXY_URL=box.url,
            API_KEY="sk-ant-node", PROMPT=PROMPT,
        )  # fmt: skip
    assert len(box.cut_connections()) == 2
    kinds = [event["type"] for event in out["events"]]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") == 40
    assert out["text"] == out["final"]["content"][0]["text"]
    assert out["final"]["stop_reason"] == "end_turn"
    assert out["events"][-2]["delta"]["stop_reason"] == "end_turn"
    # @anthropic-ai/sdk 1.x sends its apiKey as `Authorization: Bearer`; the session is bound
    # to it (the resumes above carried it).
    async with httpx.AsyncClient() as client:
        url = f"{proxy.url}/sessions/{out['sessionId']}"
        owner = await client.get(url, headers={"Authorization": "Bearer sk-ant-node"})
        stranger = await client.get(url, headers={"x-api-key": "sk-ant-node"})
    assert owner.status_code == 200 and owner.json()["state"] == "complete"
    assert stranger.status_code == 404
    # One streamed and one plain message; the resumes never reached the mock.
    assert (await httpx.AsyncClient().get(proxy.url + "/mock/calls")).json() == {"/v1/messages": 2}


async def test_openai_node_example_runs_as_written_through_cuts(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    async with cutting(proxy.url, [1200, 500]) as box:
        result = await workspace.run("examples/openai-node.mjs", PROMPT, env={"PROXY_URL": box.url})
    assert result.returncode == 0, result.stderr
    assert len(box.cut_connections()) == 2
    assert result.stdout == await direct_answer(proxy, PROMPT) + "\n"
    assert result.stderr.startswith("session ")
    assert await upstream_calls(proxy) == 2  # the stream, and the direct answer above


async def test_vercel_stream_text_through_the_proxy_then_a_repeat_replays_it(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    env = {"PROXY_URL": proxy.url, "SESSION_ID": "vercel-stream-text-1"}
    first = await workspace.run("examples/vercel-ai/stream-text.mjs", PROMPT, env=env)
    assert first.returncode == 0, first.stderr
    assert await upstream_calls(proxy) == 1
    again = await workspace.run("examples/vercel-ai/stream-text.mjs", PROMPT, env=env)
    assert again.returncode == 0, again.stderr
    assert await upstream_calls(proxy) == 1, "the repeat called the model"
    assert first.stdout == again.stdout == await direct_answer(proxy, PROMPT) + "\n"
    assert "session vercel-stream-text-1" in first.stderr


async def test_vercel_stream_text_survives_cuts(proxy: RunningProxy, workspace: Workspace) -> None:
    async with cutting(proxy.url, CUTS) as box:
        result = await workspace.run(
            "examples/vercel-ai/stream-text.mjs", PROMPT, env={"PROXY_URL": box.url}
        )
    assert result.returncode == 0, result.stderr
    assert len(box.cut_connections()) == len(CUTS)
    assert result.stdout == await direct_answer(proxy, PROMPT) + "\n"
    assert await upstream_calls(proxy) == 2


async def test_use_chat_resume_recipe_replays_the_answer_instead_of_calling_the_model(
    config_for: Callable[..., Config], workspace: Workspace
) -> None:
    config = config_for(**{"mock.tokens": 60, "mock.interval_ms": 20})
    async with run_proxy(config) as proxy:
        out = await run_json(
            workspace, "tests/client/js/use_chat_resume.mjs", PROXY_URL=proxy.url,
            CHAT_ID="chat-7Hq2xYpL", PROMPT=PROMPT, READ_FIRST="6",
        )  # fmt: skip
        answer = await direct_answer(proxy, PROMPT)
        calls = await upstream_calls(proxy)
    assert 0 < len(out["first"]) < len(answer), "the reload was not mid-answer"
    assert answer.startswith(out["first"])
    assert out["resumed"] == answer
    assert out["saved"] == answer
    assert out["afterEnd"] == 204
    assert calls == 2  # the chat's one model call, and the direct answer above


async def test_the_page_api_runs_in_node_and_resumes_across_cuts(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    """No sessionStorage and no location in Node: startStream still streams and resumes;
    there is simply nothing saved to resume after a restart."""
    async with cutting(proxy.url, CUTS) as box:
        out = await run_json(
            workspace, "tests/client/js/page_api.mjs", PROXY_URL=box.url, API_KEY=API_KEY,
            PROMPT=PROMPT,
        )  # fmt: skip
    assert len(box.cut_connections()) == len(CUTS)
    ids = [int(event["id"]) for event in out["events"]]
    assert ids == list(range(1, len(ids) + 1)) and out["events"][-1]["data"] == "[DONE]"
    async with httpx.AsyncClient() as client:
        sessions = await client.get(
            proxy.url + "/sessions", headers={"Authorization": f"Bearer {API_KEY}"}
        )
    session_id = sessions.json()["data"][0]["id"]
    logged = await logged_events(proxy, session_id)
    assert [json.loads(event["data"]) for event in out["events"][:-1]] == logged
    assert out["saved"] is None and out["resumed"] is None
    assert await upstream_calls(proxy) == 1


async def test_resuming_fetch_passes_only_whole_events_for_any_split_and_cut(
    workspace: Workspace,
) -> None:
    """resumingFetch over generated streams with every line ending, split at every size from
    1 to 9 bytes and at random, and cut at random points with a resume from the last event."""
    out = await run_json(workspace, "tests/client/js/splits.mjs")
    assert out["failures"] == []
    assert out["cases"] >= 1000
