"""Who may read a session: binding by any of `session.bind_headers`, capability tokens and
their scope, and CORS with a wildcard. Real proxy on a real port, real HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.config import Config, ConfigError

from .helpers import event_ids, make_config, mock_stream_body, read_sse, run_proxy

ADMIN = "admin-token-for-access-tests"


async def start(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], **extra: str
) -> tuple[str, str, bytes]:
    """A finished session: (id, its X-Resume-Token, the streamed body)."""
    response, body = await read_sse(
        http,
        url + "/v1/chat/completions",
        method="POST",
        json=mock_stream_body(5, 0),
        headers={**headers, **extra},
    )
    assert response.status == 200
    return response.headers["X-Resume-Session-Id"], response.headers["X-Resume-Token"], body


async def status(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str] | None = None
) -> int:
    async with http.request(method, url, headers=headers or {}) as response:
        await response.read()
        return response.status


@pytest.mark.parametrize("header", ["x-api-key", "api-key", "Authorization"])
async def test_a_session_is_bound_to_whichever_credential_header_created_it(
    config_for: Callable[..., Config], header: str
) -> None:
    owner = {header: "Bearer key-of-the-owner"}
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        session_id, _, body = await start(http, proxy.url, owner)
        url = f"{proxy.url}/sessions/{session_id}"
        assert await status(http, "GET", url, owner) == 200
        async with http.get(url + "/events", headers=owner) as response:
            assert await response.read() == body
        for stranger in ({header: "Bearer key-of-another"}, {}, {"X-Other": owner[header]}):
            for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel")):
                assert await status(http, method, url + path, stranger) == 404
            async with http.get(proxy.url + "/sessions", headers=stranger) as listing:
                listed = await listing.json() if listing.status == 200 else {"data": []}
                assert session_id not in [s["id"] for s in listed["data"]]
        async with http.get(proxy.url + "/sessions", headers=owner) as listing:
            assert [s["id"] for s in (await listing.json())["data"]] == [session_id]


async def test_the_first_bind_header_present_is_the_credential(
    config_for: Callable[..., Config],
) -> None:
    """Authorization comes before x-api-key in the default list: a client sending both is
    bound to Authorization, and x-api-key alone does not open its session."""
    both = {"Authorization": "Bearer sk-first", "x-api-key": "sk-second"}
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        session_id, _, _ = await start(http, proxy.url, both)
        url = f"{proxy.url}/sessions/{session_id}"
        assert await status(http, "GET", url, {"Authorization": "Bearer sk-first"}) == 200
        assert await status(http, "GET", url, {"x-api-key": "sk-second"}) == 404


async def test_bind_headers_are_configurable(config_for: Callable[..., Config]) -> None:
    config = config_for(**{"session.bind_headers": ["X-Tenant-Key"]})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        session_id, _, _ = await start(
            http, proxy.url, {"X-Tenant-Key": "tenant-1", "Authorization": "Bearer shared"}
        )
        url = f"{proxy.url}/sessions/{session_id}"
        assert await status(http, "GET", url, {"X-Tenant-Key": "tenant-1"}) == 200
        assert await status(http, "GET", url, {"Authorization": "Bearer shared"}) == 404


async def test_a_session_created_without_credential_opens_only_to_its_token_or_the_admin(
    config_for: Callable[..., Config],
) -> None:
    async with (
        run_proxy(config_for(**{"admin.token": ADMIN})) as proxy,
        aiohttp.ClientSession() as http,
    ):
        session_id, token, body = await start(http, proxy.url, {})
        url = f"{proxy.url}/sessions/{session_id}"
        assert await status(http, "GET", url) == 404
        assert await status(http, "GET", url + "/events") == 404
        repeat = await http.post(
            proxy.url + "/v1/chat/completions",
            json=mock_stream_body(5, 0),
            headers={"X-Resume-Session-Id": session_id},
        )
        assert repeat.status == 404
        async with http.get(url + "/events", params={"token": token}) as response:
            assert response.status == 200
            assert await response.read() == body
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert await status(http, "GET", url, admin) == 200


async def test_a_token_opens_its_own_sessions_events_and_nothing_else(
    config_for: Callable[..., Config],
) -> None:
    owner = {"Authorization": "Bearer sk-owner"}
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        first, token, body = await start(http, proxy.url, owner)
        second, other_token, _ = await start(http, proxy.url, owner)
        assert token != other_token
        base = f"{proxy.url}/sessions"
        query = f"?token={token}"
        refused = [
            ("GET", f"{base}/{second}/events{query}"),  # another session
            ("GET", f"{base}/{first}{query}"),  # metadata
            ("POST", f"{base}/{first}/cancel{query}"),
            ("DELETE", f"{base}/{first}{query}"),
            ("GET", f"{base}{query}"),  # the list
            ("GET", f"{base}/{first}/events?token={token[:-1]}"),
            ("GET", f"{base}/{first}/events?token={other_token}"),
            ("GET", f"{base}/{first}/events?token="),
        ]
        for method, url in refused:
            assert await status(http, method, url) == 404, (method, url)
        async with http.get(f"{base}/{first}", headers=owner) as response:
            assert (await response.json())["state"] == "complete"  # cancel/delete did nothing
        async with http.get(f"{base}/{first}/events{query}&offset=2") as response:
            assert event_ids(await response.read()) == list(range(3, event_ids(body)[-1] + 1))
        async with http.get(f"{base}/{first}/events{query}", headers={"Last-Event-ID": "4"}) as r:
            assert event_ids(await r.read())[0] == 5


async def test_the_token_is_an_hmac_of_the_id_under_the_configured_secret(
    config_for: Callable[..., Config],
) -> None:
    """Replicas configured with one `session.token_secret` accept each other's tokens."""
    secret = "a-shared-secret-of-replicas"
    async with (
        run_proxy(config_for(**{"session.token_secret": secret})) as proxy,
        aiohttp.ClientSession() as http,
    ):
        session_id, token, _ = await start(http, proxy.url, {"x-api-key": "k"})
    digest = hmac.new(secret.encode(), session_id.encode(), hashlib.sha256).digest()
    assert token == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def test_tokens_outlive_a_restart_and_the_key_file_is_private(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        session_id, token, body = await start(http, proxy.url, {})
    key_file = tmp_path / "data" / "token.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        async with http.get(
            f"{proxy.url}/sessions/{session_id}/events", params={"token": token}
        ) as response:
            assert response.status == 200
            assert await response.read() == body
        again, again_token, _ = await start(http, proxy.url, {})
    assert again_token != token and again != session_id


async def test_tokens_off_means_no_header_no_access_by_token_and_no_key_file(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path / "data", **{"session.tokens": False})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        response, _ = await read_sse(
            http, proxy.url + "/v1/chat/completions", method="POST", json=mock_stream_body(3, 0)
        )
        assert "X-Resume-Token" not in response.headers
        session_id = response.headers["X-Resume-Session-Id"]
        url = f"{proxy.url}/sessions/{session_id}/events?token=anything-at-all"
        assert await status(http, "GET", url) == 404
    assert not (tmp_path / "data" / "token.key").exists()


async def test_cors_wildcard_answers_star_and_never_allows_credentials(
    config_for: Callable[..., Config],
) -> None:
    config = config_for(**{"server.cors_origins": ["https://trusted.example", "*"]})
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        url = proxy.url + "/v1/chat/completions"
        anywhere = {"Origin": "https://anywhere.example"}
        async with http.options(url, headers={**anywhere, **preflight}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "Access-Control-Allow-Credentials" not in r.headers
            assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        async with http.post(url, json=mock_stream_body(2, 0), headers=anywhere) as r:
            await r.read()
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "Access-Control-Allow-Credentials" not in r.headers
            exposed = {h.strip() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
            assert {"X-Resume-Session-Id", "X-Resume-Token"} <= exposed
        # A listed origin is still echoed, with credentials.
        trusted = {"Origin": "https://trusted.example"}
        async with http.get(proxy.url + "/healthz", headers=trusted) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "https://trusted.example"
            assert r.headers["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (
            {"session.bind_header": "Authorization"},
            "config: session.bind_header: renamed to session.bind_headers",
        ),
        ({"session.bind_headers": []}, "config: session.bind_headers: expected at least one"),
        ({"session.bind_headers": ["bad header"]}, "config: session.bind_headers: expected an"),
        ({"session.token_secret": "short"}, "config: session.token_secret: expected at least"),
        ({"session.tokens": "maybe"}, "config: session.tokens: expected true or false"),
    ],
)
def test_session_access_keys_are_validated(
    tmp_path: Path, overrides: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        make_config(tmp_path / "data", **overrides)
    assert any(line.startswith(problem) for line in raised.value.problems), raised.value
