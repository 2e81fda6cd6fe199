"""The push path: caught-up readers get live events written by the store as it logs them.

Each test drives the real app on a real port with real sockets; what they prove is the
behaviour the push path must keep: a reader stuck behind a full socket holds nobody up and
loses nothing, readers joining at the live edge see no gap and no duplicate, no client
gets an event before the log has it, and the stock asyncio loop serves it all as uvloop does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import API
from proxy.config import Config
from proxy.storage.base import COMPLETE, SessionMeta
from proxy.storage.disk import DiskStore

from .helpers import (
    ROOT,
    ScriptedUpstream,
    dechunk,
    event_ids,
    free_port,
    mock_stream_body,
    read_sse,
    run_proxy,
)

EVENT = b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n'
AUTH = {"Authorization": "Bearer sk-test"}  # sessions are readable only with their credential


def events(n: int, pad: int = 0) -> list[bytes]:
    return [EVENT % (b"x" * pad + b"%d" % i) for i in range(1, n + 1)]


async def _raw_request(port: int, body: bytes, rcvbuf: int) -> tuple[socket.socket, bytes]:
    """POST on a blocking-free raw socket with a tiny receive buffer; returns it and the head."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer sk-test\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    await loop.sock_sendall(sock, head + body)
    return sock, head


async def _read_all(sock: socket.socket, until: bytes, limit: float = 30.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(limit):
        while until not in data:
            piece = await loop.sock_recv(sock, 1 << 16)
            if not piece:
                break
            data += piece
    return bytes(data)


async def test_reader_stalled_behind_a_full_socket_slows_no_one_and_loses_nothing(
    upstream: ScriptedUpstream,
    config_for: Callable[..., Config],
    proxy_for: Callable[[Config], Any],
) -> None:
    total = 400
    script: list[Any] = []
    for event in events(total, pad=900):  # ~1 KB events: 400 KB, far over any socket buffer
        script += [event, 0.001]
    upstream.script = script
    body = json.dumps(mock_stream_body(1, 0)).encode()
    async with proxy_for(config_for(upstream.url)) as proxy:
        stalled, _ = await _raw_request(proxy.port, body, rcvbuf=4096)
        head = await _read_all(stalled, b"\r\n\r\n")
        session_id = next(
            line.split(b": ", 1)[1].decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"x-resume-session-id")
        )
        async with aiohttp.ClientSession(headers=AUTH) as client:
            url = f"{proxy.url}/sessions/{session_id}/events?offset=0"
            fast = await asyncio.gather(*(read_sse(client, url) for _ in range(5)))
            for response, data in fast:
                assert response.status == 200
                assert event_ids(data) == list(range(1, total + 1))
            async with client.get(f"{proxy.url}/sessions/{session_id}") as response:
                info = await response.json()
        # The upstream was read to its end and every fast reader finished while the stalled
        # reader had not read a byte past its head.
        assert info["state"] == "complete" and info["events"] == total
        rest = await _read_all(stalled, b"\r\n0\r\n\r\n")
        stalled.close()
    relayed = dechunk((head + rest).partition(b"\r\n\r\n")[2])
    assert event_ids(relayed) == list(range(1, total + 1))
    assert relayed.count(b"x" * 900) == total


async def test_readers_joining_at_the_live_edge_get_no_gap_and_no_duplicate(
    config_for: Callable[..., Config], proxy_for: Callable[[Config], Any]
) -> None:
    tokens = 300
    rng = random.Random(7)
    async with proxy_for(config_for()) as proxy, aiohttp.ClientSession(headers=AUTH) as client:
        async with asyncio.timeout(60):
            response = await client.post(
                proxy.base_url + "/chat/completions", json=mock_stream_body(tokens, 5)
            )
            session_id = response.headers["X-Resume-Session-Id"]
            seen = 0
            joins: list[asyncio.Task[tuple[int, bytes]]] = []

            async def join(offset: int) -> tuple[int, bytes]:
                url = f"{proxy.url}/sessions/{session_id}/events?offset={offset}"
                _response, data = await read_sse(client, url)
                return offset, data

            async for line in response.content:
                if line.startswith(b"id: "):
                    seen = int(line[4:])
                    # Join at the live edge (the creator's last id), just behind it and at
                    # random earlier points, hundreds of times while the stream runs.
                    for offset in (seen, seen, max(0, seen - 1), rng.randint(0, seen)):
                        joins.append(asyncio.create_task(join(offset)))
            response.release()
            results = await asyncio.gather(*joins)
    assert seen > tokens
    assert len(results) >= 4 * tokens
    for offset, data in results:
        assert event_ids(data) == list(range(offset + 1, seen + 1)), offset


class _FileCheckingFollower:
    """Checks, at the moment an event is pushed, that the log file already holds it."""

    def __init__(self, directory: Path, fsyncs: list[int] | None) -> None:
        self.next_event = 1
        self.directory = directory
        self.fsyncs = fsyncs
        self.pushed: list[int] = []
        self.checked_after_fsync: list[bool] = []

    def push(self, first_event: int, data: bytes, count: int, arrival_ns: int) -> bool:
        on_disk = b"".join(path.read_bytes() for path in sorted(self.directory.glob("*.log")))
        assert data in on_disk, f"event {first_event} pushed before the log had it"
        if self.fsyncs is not None:
            self.checked_after_fsync.append(bool(self.fsyncs))
        self.pushed.extend(range(first_event, first_event + count))
        self.next_event = first_event + count
        return True

    def detach(self) -> None:
        return None


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
async def test_log_has_every_event_before_any_follower_gets_it(
    tmp_path: Path, fsync: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.config import StorageConfig
    from proxy.storage import disk

    fsyncs: list[int] = []
    real_fsync_all = disk.fsync_all

    def counting_fsync_all(fds: list[int]) -> float:
        elapsed = real_fsync_all(fds)
        fsyncs.append(len(fds))
        return elapsed

    monkeypatch.setattr(disk, "fsync_all", counting_fsync_all)
    store = DiskStore(StorageConfig(dir=tmp_path / "data", fsync=fsync))
    await store.start()
    meta = SessionMeta("session-push", "POST", "/v1/x", "", "", 1, 1, 200, ())
    store.create(meta)
    follower = _FileCheckingFollower(tmp_path / "data", fsyncs if fsync == "always" else None)
    assert store.follow_live("session-push", follower)
    for n in range(1, 51):
        event = b"id: %d\ndata: %d\n\n" % (n, n)
        store.append("session-push", n, event, [len(event)], time.time_ns())
        if n % 7 == 0:
            await asyncio.sleep(0)  # some batches alone in a loop turn, some together
    await store.flush()
    assert follower.pushed == list(range(1, 51))
    if fsync == "always":
        assert follower.checked_after_fsync and all(follower.checked_after_fsync)
    store.unfollow("session-push", follower)
    await store.close()


def test_stock_asyncio_loop_serves_streams_and_resumes(tmp_path: Path) -> None:
    """`serve` without uvloop (blocked at import, as where it is not installed)."""
    port = free_port()
    code = "import sys; sys.modules['uvloop'] = None; from proxy.cli import main; main()"
    args = [sys.executable, "-c", code, "serve", "--port", str(port), "--host", "127.0.0.1"]
    args += ["--data-dir", str(tmp_path / "data"), "--upstream", "mock"]
    log = (tmp_path / "proxy.log").open("wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ)
    try:
        import httpx

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"mock_tokens": 20, "mock_interval_ms": 1},
        )
        session_id = raw.headers["X-Resume-Session-Id"]
        text = "".join(
            chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices
        )
        assert text
        replay = httpx.get(
            f"http://127.0.0.1:{port}/sessions/{session_id}/events?offset=0",
            headers={"Authorization": "Bearer sk-test"},
            timeout=10,
        )
        ids = event_ids(replay.content)
        assert ids == list(range(1, len(ids) + 1)) and len(ids) > 20
    finally:
        process.terminate()
        assert process.wait(30) == 0
        log.close()
    assert "uvloop" not in Path(tmp_path / "proxy.log").read_text()


def _logged_session(
    store: DiskStore, session_id: str, rng: random.Random, per_record: Callable[[], int]
) -> Callable[[], list[bytes] | None]:
    """A session in the store whose events are appended one record at a time (by calling
    the result, which returns None while it has more to append, then all its events)."""
    now = time.time_ns()
    credential = hashlib.sha256(AUTH["Authorization"].encode()).hexdigest()
    store.create(
        SessionMeta(session_id, "POST", "/v1/chat/completions", "0" * 64, credential,
                    now, now, 200, (("Content-Type", "text/event-stream"),))
    )  # fmt: skip
    events: list[bytes] = []

    def append() -> list[bytes] | None:
        first = len(events) + 1
        batch = [
            b"id: %d\ndata: %s\n\n" % (number, b"x" * rng.randint(10, 300))
            for number in range(first, first + per_record())
        ]
        store.append(session_id, first, b"".join(batch), list(accumulate(map(len, batch))), now)
        events.extend(batch)
        if len(events) < 150:
            return None
        store.end(session_id, COMPLETE, "", now)
        return events

    return append


async def test_a_replay_from_any_offset_is_the_logged_bytes_for_both_record_shapes(
    config_for: Callable[..., Config],
) -> None:
    """Two finished sessions, one with an event per record (a paced stream), one with many,
    their records interleaved across 4 KiB segments: after a restart (so every byte comes
    from the segment files), `GET /sessions/{id}/events?offset=N` for every N, and the
    offline `sessions cat`, which replays through the same code, give the logged bytes."""
    config = config_for(**{"storage.segment_bytes": "4KiB"})
    rng = random.Random(17)
    logged: dict[str, list[bytes]] = {}
    async with run_proxy(config) as proxy:
        store = proxy.app[API].store
        assert isinstance(store, DiskStore)
        shapes = {
            "replay-one-per-record": lambda: 1,
            "replay-batched-records": lambda: rng.randint(2, 9),
        }
        appenders = {
            session_id: _logged_session(store, session_id, rng, per_record)
            for session_id, per_record in shapes.items()
        }
        while appenders:
            for session_id, append in list(appenders.items()):
                events = append()
                if events is not None:
                    logged[session_id] = events
                    del appenders[session_id]
            await store.flush()
    assert len(list(config.storage.dir.glob("*.log"))) > 8
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        for session_id, events in logged.items():
            assert sum(map(len, events)) > 16 * 1024  # more than the first read of a replay
            for offset in range(len(events)):
                url = f"{proxy.url}/sessions/{session_id}/events?offset={offset}"
                async with http.get(url, headers=AUTH) as response:
                    assert response.status == 200
                    assert await response.read() == b"".join(events[offset:]), offset
    for session_id, events in logged.items():
        for offset in (0, 77):
            cat = subprocess.run(
                [sys.executable, "-m", "proxy", "sessions", "cat", session_id,
                 "--offset", str(offset), "--data-dir", str(config.storage.dir)],
                capture_output=True, timeout=60, cwd=ROOT,
            )  # fmt: skip
            assert cat.returncode == 0, cat.stderr
            assert cat.stdout == b"".join(events[offset:])
