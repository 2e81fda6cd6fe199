"""Three proxy replicas as real processes on one real Redis, as behind a load balancer.

A stream started on A is followed live from B byte for byte, cancelled from C, survives A's
kill -9 (B and C replay every event a client saw, and it ends `interrupted`), and a Redis
restart mid-stream costs the health check, never the process or the client's stream.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .helpers import ProxyProcess, event_ids, mock_stream_body
from .redis_server import RedisServer, redis_available

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

AUTH = {"Authorization": "Bearer sk-dave"}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def replicas(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[ProxyProcess]]:
    """Replicas A, B and C: same config, same Redis, the built-in mock upstream each."""
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"storage:\n  backend: redis\n  redis_url: {redis_server.url}\nsession:\n  keepalive: 1s\n"
    )
    started: list[ProxyProcess] = []
    try:
        for name in "abc":
            data_dir = tmp_path / name / "data"
            data_dir.parent.mkdir()
            proxy = ProxyProcess(data_dir, extra_args=["--config", str(config)])
            started.append(proxy)
            proxy.start()
        yield started
    finally:
        for proxy in started:
            proxy.kill()


def whole_events(seen: bytes) -> bytes:
    return seen[: seen.rindex(b"\n\n") + 2]


def read_until(chunks: Iterator[bytes], count: int) -> bytes:
    seen = b""
    for chunk in chunks:
        seen += chunk
        if seen.count(b"\n\n") >= count:
            break
    return seen


def replay(proxy: ProxyProcess, session_id: str, offset: int = 0) -> bytes:
    url = f"{proxy.url}/sessions/{session_id}/events?offset={offset}"
    with httpx.stream("GET", url, headers=AUTH, timeout=30) as response:
        assert response.status_code == 200
        return response.read()


def session_json(proxy: ProxyProcess, session_id: str) -> dict[str, object]:
    response = httpx.get(f"{proxy.url}/sessions/{session_id}", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    info: dict[str, object] = response.json()
    return info


def error_code(replayed: bytes) -> str | None:
    last = replayed.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    if not last.startswith(b'data: {"error"'):
        return None
    code: str = json.loads(last[len(b"data: ") :])["error"]["code"]
    return code


def test_live_tail_from_another_replica_gets_identical_bytes(
    replicas: list[ProxyProcess],
) -> None:
    a, b, c = replicas
    tails: dict[str, bytes] = {}
    with httpx.stream(
        "POST",
        f"{a.url}/v1/chat/completions",
        json=mock_stream_body(80, 15),
        headers=AUTH,
        timeout=30,
    ) as response:
        session_id = response.headers["X-Resume-Session-Id"]
        chunks = response.iter_bytes()
        seen = read_until(chunks, 3)

        def tail(proxy: ProxyProcess) -> None:
            tails[proxy.url] = replay(proxy, session_id)

        followers = [threading.Thread(target=tail, args=(p,)) for p in (b, c)]
        for follower in followers:
            follower.start()
        assert session_json(b, session_id)["state"] == "streaming"
        seen += b"".join(chunks)
        for follower in followers:
            follower.join(30)
    assert event_ids(seen) == list(range(1, len(event_ids(seen)) + 1)) and len(seen) > 80
    assert tails == {b.url: seen, c.url: seen}
    assert session_json(c, session_id)["state"] == "complete"


def test_kill9_of_the_owner_leaves_every_seen_event_on_the_others_and_interrupts(
    replicas: list[ProxyProcess],
) -> None:
    a, b, c = replicas
    with httpx.stream(
        "POST",
        f"{a.url}/v1/chat/completions",
        json=mock_stream_body(2000, 10),
        headers=AUTH,
        timeout=30,
    ) as response:
        session_id = response.headers["X-Resume-Session-Id"]
        seen = whole_events(read_until(response.iter_bytes(), 40))
        a.kill()
    killed = time.monotonic()
    seen_ids = event_ids(seen)
    while session_json(c, session_id)["state"] == "streaming":
        assert time.monotonic() - killed < 30
        time.sleep(0.1)
    assert session_json(b, session_id)["state"] == "interrupted"
    for proxy in (b, c):
        replayed = replay(proxy, session_id)
        assert replayed.startswith(seen)
        assert event_ids(replayed)[: len(seen_ids)] == seen_ids
        assert event_ids(replayed) == list(range(1, len(event_ids(replayed)) + 1))
        assert error_code(replayed) == "interrupted"
        resumed = replay(proxy, session_id, seen_ids[-1])
        assert replayed.endswith(resumed)


def test_cancel_and_delete_from_replicas_that_do_not_own_the_stream(
    replicas: list[ProxyProcess],
) -> None:
    a, b, c = replicas
    url = f"{a.url}/v1/chat/completions"
    with httpx.stream(
        "POST", url, json=mock_stream_body(2000, 10), headers=AUTH, timeout=30
    ) as response:
        session_id = response.headers["X-Resume-Session-Id"]
        chunks = response.iter_bytes()
        read_until(chunks, 5)
        cancelled = httpx.post(f"{c.url}/sessions/{session_id}/cancel", headers=AUTH, timeout=20)
        assert cancelled.status_code == 200
        assert cancelled.json()["state"] == "cancelled"
        rest = b"".join(chunks)
    assert error_code(rest) == "cancelled"
    assert session_json(a, session_id)["state"] == "cancelled"
    assert error_code(replay(b, session_id)) == "cancelled"

    with httpx.stream(
        "POST", url, json=mock_stream_body(2000, 10), headers=AUTH, timeout=30
    ) as response:
        session_id = response.headers["X-Resume-Session-Id"]
        chunks = response.iter_bytes()
        read_until(chunks, 5)
        deleted = httpx.delete(f"{b.url}/sessions/{session_id}", headers=AUTH, timeout=20)
        assert deleted.status_code == 200
        b"".join(chunks)
    for proxy in (a, b, c):
        gone = httpx.get(f"{proxy.url}/sessions/{session_id}", headers=AUTH, timeout=10)
        assert gone.status_code == 404


def test_redis_restart_mid_stream_fails_health_then_recovers_and_the_stream_goes_on(
    replicas: list[ProxyProcess], redis_server: RedisServer
) -> None:
    a, b, _ = replicas

    def health() -> int:
        return httpx.get(f"{a.url}/healthz", timeout=10).status_code

    assert health() == 200
    with httpx.stream(
        "POST",
        f"{a.url}/v1/chat/completions",
        json=mock_stream_body(300, 20),
        headers=AUTH,
        timeout=30,
    ) as response:
        session_id = response.headers["X-Resume-Session-Id"]
        chunks = response.iter_bytes()
        seen = read_until(chunks, 10)
        redis_server.kill()
        deadline = time.monotonic() + 10
        while health() != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        seen += read_until(chunks, 20)  # still relayed, from memory
        redis_server.start()
        while health() != 200:
            assert time.monotonic() < deadline + 10
            time.sleep(0.05)
        seen += b"".join(chunks)
    ids = event_ids(seen)
    assert ids == list(range(1, len(ids) + 1)) and len(ids) > 300
    for proxy in replicas:
        assert proxy.process is not None and proxy.process.poll() is None
    info = session_json(a, session_id)
    assert info["state"] == "failed"
    assert "redis" in str(info["reason"])
    # Control reconnected too: a new stream on A can be cancelled from B.
    url = f"{a.url}/v1/chat/completions"
    with httpx.stream(
        "POST", url, json=mock_stream_body(2000, 10), headers=AUTH, timeout=30
    ) as response:
        session_id = response.headers["X-Resume-Session-Id"]
        chunks = response.iter_bytes()
        read_until(chunks, 5)
        cancelled = httpx.post(f"{b.url}/sessions/{session_id}/cancel", headers=AUTH, timeout=20)
        assert cancelled.json()["state"] == "cancelled"
        assert error_code(b"".join(chunks)) == "cancelled"


def test_a_token_made_by_one_replica_opens_the_session_on_every_other(
    replicas: list[ProxyProcess],
) -> None:
    """The token key is in Redis (set once by the first replica), so a browser holding only
    the token resumes on whichever replica the load balancer picks."""
    a, b, c = replicas
    started = httpx.post(f"{a.url}/v1/chat/completions", json=mock_stream_body(5, 0), timeout=30)
    session_id = started.headers["X-Resume-Session-Id"]
    token = started.headers["X-Resume-Token"]
    for proxy in (b, c):
        url = f"{proxy.url}/sessions/{session_id}/events"
        assert httpx.get(url, params={"token": token}, timeout=30).content == started.content
        assert httpx.get(url, timeout=30).status_code == 404
        other = httpx.post(f"{proxy.url}/v1/chat/completions", json=mock_stream_body(1, 0))
        assert other.headers["X-Resume-Token"] != token
        again = f"{a.url}/sessions/{other.headers['X-Resume-Session-Id']}/events"
        assert (
            httpx.get(again, params={"token": other.headers["X-Resume-Token"]}).status_code == 200
        )
