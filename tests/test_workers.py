"""`server.workers: 2` as a real process tree on a real Redis: two workers on one port.

What is observed comes from outside, never from a test-only hook: which worker owns a
session is in Redis (its `owner` names the worker's pid), and a worker that follows a
session streamed by the other shows up in Redis's CLIENT LIST as a connection named
`rp:<worker>:follow` blocked in XREAD.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from .helpers import (
    ROOT,
    ProxyProcess,
    chat_stream,
    config_file,
    event_ids,
    eventually,
    free_port,
)
from .redis_server import RedisServer

AUTH = {"Authorization": "Bearer sk-workers"}


@pytest.fixture
def workers(tmp_path: Path, redis_server: RedisServer) -> Iterator[ProxyProcess]:
    """`serve` with two workers on an emptied Redis; `.process` is the parent."""
    redis_server.flushall()
    port = free_port()
    config = config_file(
        tmp_path / "proxy.yaml",
        {
            "server.workers": 2,
            "server.port": port,
            "server.shutdown_grace": "20s",
            **redis_server.storage,
            "session.keepalive": "1s",
        },
    )
    (tmp_path / "data").mkdir()
    proxy = ProxyProcess(tmp_path / "data", port=port, extra_args=["--config", str(config)])
    proxy.start()
    eventually(  # the parent's line once both listen
        lambda: "(2 workers)" in proxy.log(), 30, f"both workers listening:\n{proxy.log()}"
    )
    try:
        yield proxy
    finally:
        if proxy.process is not None and proxy.process.poll() is None:
            proxy.terminate()
        for pid in worker_pids(proxy):  # only if the parent could not stop them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def worker_pids(proxy: ProxyProcess) -> list[int]:
    assert proxy.process is not None
    children = Path(f"/proc/{proxy.process.pid}/task/{proxy.process.pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def owner_pid(owner: str) -> int:
    """Replica ids are `<hostname>-<pid>-<random>`."""
    return int(owner.rsplit("-", 2)[1])


def owners(redis: Redis, session_ids: list[str]) -> dict[str, str]:
    return {sid: redis.hget(f"rp:{{{sid}}}:meta", "owner").decode() for sid in session_ids}


def start_stream(proxy: ProxyProcess, tokens: int, interval_ms: float) -> tuple[str, bytes]:
    """A new connection (so the kernel picks a worker), the session id and its first event."""
    with chat_stream(proxy.url, tokens, interval_ms, AUTH) as response:
        chunks = response.iter_bytes()
        first = next(chunks)
        return response.headers["X-Resume-Session-Id"], first


def test_two_workers_share_the_port_and_a_resume_on_the_other_worker_follows_live(
    workers: ProxyProcess, redis_server: RedisServer
) -> None:
    redis = Redis.from_url(redis_server.url)
    pids = worker_pids(workers)
    assert len(pids) == 2
    # Sessions on new connections land on both workers.
    started = [start_stream(workers, 50, 1)[0] for _ in range(12)]
    found = owners(redis, started)
    assert {owner_pid(owner) for owner in found.values()} == set(pids)

    # A long live session, followed from new connections until one lands on the worker that
    # does not stream it (seen in Redis as that worker's follower blocked in XREAD), then
    # cancelled through whichever worker takes that request.
    session_id = start_stream(workers, 3000, 10)[0]
    owner = owners(redis, [session_id])[session_id]
    other = next(o for o in set(found.values()) if o != owner)
    followed: list[bytes] = []

    def follow() -> None:
        url = f"{workers.url}/sessions/{session_id}/events?offset=0"
        with httpx.stream("GET", url, headers=AUTH, timeout=60) as response:
            assert response.status_code == 200
            followed.append(response.read())

    followers: list[threading.Thread] = []
    on_other = False
    for _ in range(30):
        follower = threading.Thread(target=follow)
        follower.start()
        followers.append(follower)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and not on_other:
            on_other = any(
                client["name"] == f"rp:{other}:follow" and client["cmd"] == "xread"
                for client in redis.client_list()
            )
            time.sleep(0.05)
        if on_other:
            break
    assert on_other, "no follower ever landed on the worker that does not stream the session"
    cancelled = httpx.post(f"{workers.url}/sessions/{session_id}/cancel", headers=AUTH, timeout=20)
    assert cancelled.json()["state"] == "cancelled"
    for follower in followers:
        follower.join(30)
    assert len(followed) == len(followers)
    whole = followed[0].replace(b": keepalive\n", b"")
    ids = event_ids(whole)
    assert ids == list(range(1, len(ids) + 1)) and len(ids) > 10
    assert whole.endswith(b'"code":"cancelled"}}\n\n')
    for body in followed:
        assert body.replace(b": keepalive\n", b"") == whole  # same bytes on either worker
    redis.close()


def test_sigterm_reaches_every_worker_live_streams_finish_and_the_parent_exits_0(
    workers: ProxyProcess, redis_server: RedisServer
) -> None:
    pids = worker_pids(workers)
    bodies: list[bytes] = []

    def stream() -> None:
        with chat_stream(workers.url, 150, 10, AUTH) as response:
            bodies.append(response.read())

    streams = [threading.Thread(target=stream) for _ in range(8)]
    for thread in streams:
        thread.start()
    redis = Redis.from_url(redis_server.url)
    eventually(lambda: redis.zcard("rp:sessions") >= len(streams), 10, "every stream logged")
    assert workers.terminate() == 0
    for thread in streams:
        thread.join(30)
    assert len(bodies) == len(streams)
    for body in bodies:
        ids = event_ids(body)
        assert ids == list(range(1, len(ids) + 1)) and len(ids) > 150
        assert body.endswith(b"data: [DONE]\n\n")
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert redis.smembers("rp:replicas") == set()  # each worker signed off
    redis.close()


def test_workers_on_the_disk_backend_stop_start_up_with_one_line_saying_why(
    tmp_path: Path,
) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(f"server:\n  workers: 2\n  port: {free_port()}\n")
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("config: server.workers: 2 workers need storage.backend redis")
