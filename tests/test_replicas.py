"""Three proxy replicas as real processes on one real Redis, as behind a load balancer, and
on a real Redis Cluster (3 primaries, 3 replicas).

A stream started on A is followed live from B byte for byte, cancelled from C, survives A's
kill -9 (B and C replay every event a client saw, and it ends `interrupted`), and a Redis
restart mid-stream costs the health check, never the process or the client's stream. On the
Cluster, the primary that holds a live session is failed over both ways (`CLUSTER FAILOVER`
on its replica, and kill -9 of the primary with the replica promoted by the cluster): the
streaming client and a follower on another replica read on through it, and afterwards every
event either of them saw is in Redis, in order, byte for byte.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.sse import KEEPALIVE

from .helpers import (
    ProxyProcess,
    chat_stream,
    config_file,
    event_ids,
    eventually,
    mock_stream_body,
    read_events,
    whole_events,
)
from .redis_server import RedisClusterServers, RedisServer

# Replicas share one store: the disk log has none to share.
pytestmark = pytest.mark.backends("redis", "redis-cluster")

AUTH = {"Authorization": "Bearer sk-dave"}


@pytest.fixture
def replicas(
    tmp_path: Path, backend: dict[str, Any], proxies: list[ProxyProcess]
) -> list[ProxyProcess]:
    """Replicas A, B and C: same config, same Redis, the built-in mock upstream each."""
    return start_replicas(proxies, tmp_path, backend)


def start_replicas(
    proxies: list[ProxyProcess],
    tmp_path: Path,
    storage: dict[str, Any],
    names: str = "abc",
    upstream: str = "mock",
) -> list[ProxyProcess]:
    """Proxy processes sharing one config: `storage` (dotted overrides) and 1 s keep-alives."""
    config = config_file(tmp_path / "proxy.yaml", {**storage, "session.keepalive": "1s"})
    started = []
    for name in names:
        data_dir = tmp_path / name / "data"
        data_dir.parent.mkdir()
        proxy = ProxyProcess(data_dir, upstream, extra_args=["--config", str(config)])
        proxies.append(proxy)
        started.append(proxy.start())
    return started


@contextlib.contextmanager
def streaming(
    proxy: ProxyProcess, tokens: int, interval_ms: float, timeout: float = 30
) -> Iterator[tuple[str, Iterator[bytes]]]:
    """A chat stream on `proxy`: its session id, and its bytes as they come."""
    with chat_stream(proxy.url, tokens, interval_ms, AUTH, timeout) as response:
        yield response.headers["X-Resume-Session-Id"], response.iter_bytes()


def cancel(proxy: ProxyProcess, session_id: str) -> httpx.Response:
    return httpx.post(f"{proxy.url}/sessions/{session_id}/cancel", headers=AUTH, timeout=20)


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
    with streaming(a, 80, 15) as (session_id, chunks):
        seen = read_events(chunks, 3)

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
    with streaming(a, 2000, 10) as (session_id, chunks):
        seen = whole_events(read_events(chunks, 40))
        a.kill()
    seen_ids = event_ids(seen)
    eventually(  # the contract's 30 s for noticing a dead owner
        lambda: session_json(c, session_id)["state"] != "streaming", 30, "the owner's death seen"
    )
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
    with streaming(a, 2000, 10) as (session_id, chunks):
        read_events(chunks, 5)
        cancelled = cancel(c, session_id)
        assert cancelled.status_code == 200
        assert cancelled.json()["state"] == "cancelled"
        rest = b"".join(chunks)
    assert error_code(rest) == "cancelled"
    assert session_json(a, session_id)["state"] == "cancelled"
    assert error_code(replay(b, session_id)) == "cancelled"

    with streaming(a, 2000, 10) as (session_id, chunks):
        read_events(chunks, 5)
        deleted = httpx.delete(f"{b.url}/sessions/{session_id}", headers=AUTH, timeout=20)
        assert deleted.status_code == 200
        b"".join(chunks)
    for proxy in (a, b, c):
        gone = httpx.get(f"{proxy.url}/sessions/{session_id}", headers=AUTH, timeout=10)
        assert gone.status_code == 404


def test_redis_restart_mid_stream_fails_health_then_recovers_and_the_stream_goes_on(
    tmp_path: Path, own_redis: RedisServer, proxies: list[ProxyProcess]
) -> None:
    replicas = start_replicas(proxies, tmp_path, own_redis.storage)
    a, b, _ = replicas

    def health() -> int:
        return httpx.get(f"{a.url}/healthz", timeout=10).status_code

    assert health() == 200
    with streaming(a, 300, 20) as (session_id, chunks):
        seen = read_events(chunks, 10)
        own_redis.kill()
        eventually(lambda: health() == 503, 10, "/healthz 503 with Redis gone")
        seen += read_events(chunks, 20)  # still relayed, from memory
        own_redis.start()
        eventually(lambda: health() == 200, 20, "/healthz 200 with Redis back")
        seen += b"".join(chunks)
    ids = event_ids(seen)
    assert ids == list(range(1, len(ids) + 1)) and len(ids) > 300
    for proxy in replicas:
        assert proxy.process is not None and proxy.process.poll() is None
    info = session_json(a, session_id)
    assert info["state"] == "failed"
    assert "redis" in str(info["reason"])
    # Control reconnected too: a new stream on A can be cancelled from B.
    with streaming(a, 2000, 10) as (session_id, chunks):
        read_events(chunks, 5)
        cancelled = cancel(b, session_id)
        assert cancelled.json()["state"] == "cancelled"
        assert error_code(b"".join(chunks)) == "cancelled"


class SlowHeadersUpstream:
    """An SSE upstream that waits `delay` seconds before its headers, so requests sent to
    two replicas at once are both upstream when either could create its session."""

    def __init__(self, delay: float) -> None:
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                upstream.calls += 1
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for n in range(5):
                    self.wfile.write(b'data: {"n": %d, "from": %d}\n\n' % (n, upstream.calls))
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

            def log_message(self, *args: object) -> None:
                del args

        self.calls = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SlowHeadersUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_one_client_id_sent_to_two_replicas_at_once_is_created_once_the_other_gets_409(
    tmp_path: Path, backend: dict[str, Any], proxies: list[ProxyProcess]
) -> None:
    session_id = "client-chosen-id-0001"
    body = mock_stream_body(5, 0)
    with SlowHeadersUpstream(0.5) as upstream:
        a, b, c = start_replicas(proxies, tmp_path, backend, upstream=upstream.url)
        answers: dict[str, tuple[int, bytes]] = {}

        def send(proxy: ProxyProcess) -> None:
            headers = {**AUTH, "X-Resume-Session-Id": session_id}
            url = f"{proxy.url}/v1/chat/completions"
            with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as response:
                answers[proxy.url] = (response.status_code, response.read())

        senders = [threading.Thread(target=send, args=(proxy,)) for proxy in (a, b)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(30)
        assert upstream.calls == 2  # both were upstream before either created the session
        statuses = sorted(status for status, _ in answers.values())
        assert statuses == [200, 409]
        won = next(body for status, body in answers.values() if status == 200)
        lost = next(body for status, body in answers.values() if status == 409)
        assert json.loads(lost)["error"]["code"] == "session_conflict"
        assert event_ids(won) == [1, 2, 3, 4, 5, 6]
        assert replay(c, session_id) == won  # the winner's stream is the session, everywhere


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


@pytest.mark.parametrize("kill", [False, True], ids=["cluster-failover", "kill9-primary"])
def test_failover_of_the_primary_holding_a_live_session_loses_nothing_a_client_saw(
    tmp_path: Path, own_cluster: RedisClusterServers, proxies: list[ProxyProcess], kill: bool
) -> None:
    a, b, c = start_replicas(proxies, tmp_path, own_cluster.storage)
    followed: dict[str, bytes] = {}
    with streaming(a, 400, 10, timeout=60) as (session_id, chunks):
        seen = read_events(chunks, 20)

        def follow() -> None:
            followed["b"] = replay(b, session_id)

        follower = threading.Thread(target=follow)
        follower.start()
        seen += read_events(chunks, 40)
        old_primary = own_cluster.primary_for(f"rp:{{{session_id}}}:events")
        new_primary = own_cluster.failover(f"rp:{{{session_id}}}:events", kill=kill)
        assert new_primary.port != old_primary.port
        assert own_cluster.primary_for(f"rp:{{{session_id}}}:events").port == new_primary.port
        seen += b"".join(chunks)
        follower.join(60)
    # Readers waiting out the failover got keep-alives (every 1 s here); the events are
    # what must match.
    seen = seen.replace(KEEPALIVE, b"")
    followed["b"] = followed["b"].replace(KEEPALIVE, b"")
    ids = event_ids(seen)
    assert ids == list(range(1, len(ids) + 1)) and len(ids) > 400
    assert error_code(seen) is None  # the stream completed, through the failover
    assert followed["b"] == seen  # the follower on B read on through it, byte for byte
    assert session_json(c, session_id)["state"] == "complete"
    assert replay(c, session_id) == seen  # and Redis kept every event: C replays them all
    assert replay(c, session_id, 250) == seen[seen.index(b"id: 251\n") :]
