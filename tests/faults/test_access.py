"""Access: another caller learns nothing. Every owned path answers a missing or wrong
credential with the same 404 as for an id that never existed, changes nothing, and leaves no
trace in the log, the metrics or the error text that tells the two apart; the admin list takes
exactly its token, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy import access
from proxy.config import Config

from ..helpers import event_ids, mock_stream_body, run_proxy
from .figures import record

OWNER = "Bearer sk-owner"
ADMIN_TOKEN = "admin-secret-token"
STRANGERS = [
    None,
    "Bearer sk-mallory",
    "bearer sk-owner",
    "Bearer sk-owne",
    "Bearer sk-owner2",
    f"Bearer {ADMIN_TOKEN}x",
    f"Bearer {ADMIN_TOKEN[:-1]}",
    ADMIN_TOKEN,
]
GHOST = "ghost-session-id-0000"


def owned_requests(session_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/sessions/{session_id}"),
        ("GET", f"/sessions/{session_id}/events"),
        ("GET", f"/sessions/{session_id}/events?offset=1"),
        ("POST", f"/sessions/{session_id}/cancel"),
        ("DELETE", f"/sessions/{session_id}"),
    ]


def headers_for(credential: str | None) -> dict[str, str]:
    return {} if credential is None else {"Authorization": credential}


async def start_live(http: aiohttp.ClientSession, url: str) -> tuple[str, aiohttp.ClientResponse]:
    response = await http.post(
        url + "/v1/chat/completions", json=mock_stream_body(150, 10), headers=headers_for(OWNER)
    )
    await response.content.readuntil(b"\n\n")
    return response.headers["X-Resume-Session-Id"], response


async def finished(http: aiohttp.ClientSession, url: str, tokens: int) -> tuple[str, bytes]:
    """A session of the owner's, read to its end: its id and what its client got."""
    async with http.post(
        url + "/v1/chat/completions", json=mock_stream_body(tokens, 0), headers=headers_for(OWNER)
    ) as response:
        return response.headers["X-Resume-Session-Id"], await response.read()


async def answer(
    http: aiohttp.ClientSession, url: str, method: str, path: str, credential: str | None
) -> tuple[int, bytes]:
    async with http.request(method, url + path, headers=headers_for(credential)) as response:
        return response.status, await response.read()


@pytest.fixture
def config(config_for: Callable[..., Config]) -> Config:
    return config_for(**{"admin.token": ADMIN_TOKEN})


async def test_every_owned_path_answers_404_to_a_stranger_and_changes_nothing(
    config: Config,
) -> None:
    attempts = 0
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        done_id, done = await finished(http, proxy.url, 5)
        live_id, live = await start_live(http, proxy.url)
        for credential in STRANGERS:
            for session_id in (done_id, live_id):
                for (method, path), (_, ghost_path) in zip(
                    owned_requests(session_id), owned_requests(GHOST), strict=True
                ):
                    real = await answer(http, proxy.url, method, path, credential)
                    ghost = await answer(http, proxy.url, method, ghost_path, credential)
                    attempts += 1
                    assert real[0] == 404, (method, path, credential, real)
                    assert real == ghost  # the same bytes: existence is not revealed
                repeat = {**headers_for(credential), "X-Resume-Session-Id": session_id}
                async with http.post(
                    proxy.url + "/v1/chat/completions", json=mock_stream_body(5, 0), headers=repeat
                ) as response:
                    assert response.status == 404
                    assert session_id not in (await response.text())
                    attempts += 1
            async with http.get(proxy.url + "/sessions", headers=headers_for(credential)) as r:
                listed = "" if r.status == 404 else await r.text()
            assert done_id not in listed and live_id not in listed
        rest = await live.read()
        live.close()
        async with http.get(
            f"{proxy.url}/sessions/{done_id}/events", headers=headers_for(OWNER)
        ) as response:
            assert await response.read() == done
        async with http.get(
            f"{proxy.url}/sessions/{live_id}", headers=headers_for(OWNER)
        ) as response:
            assert (await response.json())["state"] == "complete"
    assert rest.endswith(b"data: [DONE]\n\n") and event_ids(rest)[-1] == 153
    record("access", stranger_attempts_all_404=attempts)


def normalised(lines: list[str], session_id: str) -> list[str]:
    return [re.sub(r"\d+(\.\d+)?ms", "<ms>", line.replace(session_id, "<id>")) for line in lines]


async def test_a_strangers_attempts_log_nothing_that_tells_a_real_id_from_a_ghost(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await finished(http, proxy.url, 5)
        logs: dict[str, list[str]] = {}
        for probed in (session_id, GHOST):
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="proxy"):
                for method, path in owned_requests(probed):
                    await answer(http, proxy.url, method, path, "Bearer sk-mallory")
            logs[probed] = normalised([r.getMessage() for r in caplog.records], probed)
    assert logs[session_id] == logs[GHOST]
    secrets = ["sk-mallory", "sk-owner", hashlib.sha256(OWNER.encode()).hexdigest()]
    assert not [line for line in logs[session_id] for s in secrets if s in line]


async def test_metrics_carry_no_session_id_or_credential(config: Config) -> None:
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        ids = []
        for tokens in (3, 0):
            ids.append((await finished(http, proxy.url, tokens))[0])
        live_id, live = await start_live(http, proxy.url)
        ids.append(live_id)
        for method, path in owned_requests(live_id):
            await answer(http, proxy.url, method, path, "Bearer sk-mallory")
        async with http.get(proxy.url + "/metrics") as response:
            metrics = await response.text()
        live.close()
    assert "resumable_proxy_" in metrics
    leaked = [s for s in [*ids, "sk-owner", "sk-mallory"] if s in metrics]
    assert leaked == []


async def test_admin_list_takes_exactly_its_token_compared_in_constant_time(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[Any, Any]] = []
    real_compare = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", spy)
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await finished(http, proxy.url, 3)
        for credential in STRANGERS:
            compared.clear()
            _, body = await answer(http, proxy.url, "GET", "/sessions", credential)
            assert session_id.encode() not in body, credential
            if credential is not None:
                assert (credential.encode(), f"Bearer {ADMIN_TOKEN}".encode()) in compared
        status, body = await answer(http, proxy.url, "GET", "/sessions", f"Bearer {ADMIN_TOKEN}")
        assert status == 200 and session_id.encode() in body


async def test_without_an_admin_token_no_bearer_value_lists_everything(
    config_for: Callable[..., Config],
) -> None:
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        session_id, _ = await finished(http, proxy.url, 3)
        for credential in ["Bearer ", "Bearer", "Bearer None", "Bearer null", ""]:
            _, body = await answer(http, proxy.url, "GET", "/sessions", credential)
            assert session_id.encode() not in body, credential
