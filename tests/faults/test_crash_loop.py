"""Crash loop: kill -9 the proxy while streams run, restart it on the same data dir, resume
every session. Every whole event a client saw is in the replay at its place, byte for byte;
every interrupted session's replay ends with its `interrupted` error event; what one restart
found is still there, unchanged, after all the later crashes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from ..helpers import ProxyProcess, event_ids, mock_stream_body
from .figures import SCALES, Scale, record

AUTH = {"Authorization": "Bearer sk-crash-loop"}


LONG = mock_stream_body(100_000, 10)  # still streaming at every kill
SHORT = mock_stream_body(5, 1)  # complete before the kill


@dataclass
class Stream:
    short: bool
    session_id: str = ""
    seen: bytearray = field(default_factory=bytearray)
    done: bool = False


def whole_events(body: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in body.split(b"\n\n")[:-1]]


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.kill()


async def follow(http: aiohttp.ClientSession, url: str, stream: Stream) -> None:
    try:
        async with http.post(
            url + "/v1/chat/completions", json=SHORT if stream.short else LONG, headers=AUTH
        ) as response:
            stream.session_id = response.headers["X-Resume-Session-Id"]
            async for piece in response.content.iter_any():
                stream.seen += piece
        stream.done = True
    except (aiohttp.ClientError, ConnectionError):
        pass  # the kill


async def verify(http: aiohttp.ClientSession, url: str, stream: Stream) -> tuple[int, int, str]:
    """(events the client saw, how many of them the replay lacks, sha256 of the replay)."""
    async with http.get(f"{url}/sessions/{stream.session_id}", headers=AUTH) as response:
        info = await response.json()
    async with http.get(f"{url}/sessions/{stream.session_id}/events", headers=AUTH) as response:
        replay = await response.read()
    seen = whole_events(bytes(stream.seen))
    replayed = whole_events(replay)
    lost = sum(1 for n, event in enumerate(seen) if n >= len(replayed) or replayed[n] != event)
    assert event_ids(replay) == list(range(1, info["events"] + 1)), stream.session_id
    if stream.short:
        assert info["state"] == "complete"
        assert replay.endswith(b"data: [DONE]\n\n")
    else:
        assert info["state"] == "interrupted", info
        final = json.loads(replayed[-1].removeprefix(b"data: "))
        assert final["error"]["code"] == "interrupted"
        assert not replayed[-1].startswith(b"id:")
    return len(seen), lost, hashlib.sha256(replay).hexdigest()


@pytest.mark.parametrize("scale", SCALES)
async def test_kill9_loop_loses_no_event_any_client_saw(
    scale: Scale, proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "proxy.yaml"  # small segments: every round rolls some, and reopens one
    config.write_text("storage:\n  segment_bytes: 256KiB\n")
    rng = random.Random(10)
    startup: list[float] = []
    replays: dict[str, str] = {}  # session id -> sha256 of its replay when first resumed
    checked = lost = 0
    pending: list[Stream] = []
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)  # every stream at once, not 100 at a time
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        for round_number in range(scale.rounds + 1):
            began = time.monotonic()
            proxy = ProxyProcess(data_dir, extra_args=["--config", str(config)])
            proxies.append(proxy)
            proxy.start(timeout=60)
            startup.append(round(time.monotonic() - began, 3))
            for stream in pending:
                seen, missing, digest = await verify(http, proxy.url, stream)
                checked += seen
                lost += missing
                replays[stream.session_id] = digest
            async with http.get(proxy.url + "/sessions", headers=AUTH) as response:
                listing = (await response.json())["data"]
            missing_sessions = len(set(replays) - {s["id"] for s in listing})
            record(
                f"crash_loop[{scale.name}]",
                rounds=round_number,
                streams_per_round=scale.streams,
                sessions=len(replays),
                events_checked=checked,
                events_lost=lost,
                sessions_missing=missing_sessions,
                startup_s=startup,
            )
            assert lost == 0
            assert missing_sessions == 0, f"round {round_number}: sessions gone from the list"
            assert not [s for s in listing if s["state"] == "streaming"]
            if round_number == scale.rounds:
                break
            pending = [Stream(short=n % 5 == 0) for n in range(scale.streams)]
            tasks = [asyncio.create_task(follow(http, proxy.url, s)) for s in pending]
            async with asyncio.timeout(60):
                while not all(s.done or s.seen.count(b"\n\n") >= 2 for s in pending):
                    await asyncio.sleep(0.02)
                    for task in tasks:
                        if task.done():
                            task.result()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            proxy.kill()
            await asyncio.gather(*tasks)
        for session_id, digest in replays.items():
            async with http.get(f"{proxy.url}/sessions/{session_id}/events", headers=AUTH) as r:
                assert hashlib.sha256(await r.read()).hexdigest() == digest, session_id
