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
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from proxy.trace import ENV as TRACE_ENV

from ..helpers import ProxyProcess, event_ids, mock_stream_body, split_whole_events
from .figures import CI, SCALES, Scale, record

AUTH = {"Authorization": "Bearer sk-crash-loop"}


LONG = mock_stream_body(100_000, 10)  # still streaming at every kill
SHORT = mock_stream_body(5, 1)  # complete before the kill


@dataclass
class Stream:
    short: bool
    session_id: str = ""
    seen: bytearray = field(default_factory=bytearray)
    done: bool = False


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
    seen = split_whole_events(bytes(stream.seen))
    replayed = split_whole_events(replay)
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


@dataclass
class LoopResult:
    sessions: int
    events_checked: int
    startup_s: list[float]


async def crash_loop(
    name: str,
    rounds: int,
    streams: int,
    proxies: list[ProxyProcess],
    tmp_path: Path,
    config_text: str,
    env: dict[str, str] | None = None,
) -> LoopResult:
    """`rounds` times: start the proxy on one data dir, check every session of the round
    before, start `streams` streams, kill -9 it while they run. Asserts as it goes."""
    data_dir = tmp_path / "data"
    config = tmp_path / "proxy.yaml"
    config.write_text(config_text)
    rng = random.Random(10)
    startup: list[float] = []
    replays: dict[str, str] = {}  # session id -> sha256 of its replay when first resumed
    checked = lost = 0
    pending: list[Stream] = []
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)  # every stream at once, not 100 at a time
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        for round_number in range(rounds + 1):
            began = time.monotonic()
            proxy = ProxyProcess(data_dir, extra_args=["--config", str(config)], env=env or {})
            proxies.append(proxy)
            proxy.start(timeout=60)
            startup.append(round(time.monotonic() - began, 3))
            for stream in pending:
                seen, missing, digest = await verify(http, proxy.url, stream)
                checked += seen
                lost += missing
                replays[stream.session_id] = digest
            listing = await list_all(http, proxy.url)
            missing_sessions = len(set(replays) - {s["id"] for s in listing})
            record(
                name,
                rounds=round_number,
                streams_per_round=streams,
                sessions=len(replays),
                events_checked=checked,
                events_lost=lost,
                sessions_missing=missing_sessions,
                startup_s=startup,
            )
            assert lost == 0
            assert missing_sessions == 0, f"round {round_number}: sessions gone from the list"
            assert not [s for s in listing if s["state"] == "streaming"]
            if round_number == rounds:
                break
            pending = [Stream(short=n % 5 == 0) for n in range(streams)]
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
    return LoopResult(len(replays), checked, startup)


async def list_all(http: aiohttp.ClientSession, url: str) -> list[dict[str, object]]:
    """Every session of the caller, page by page (GET /sessions pages at 1,000 at most)."""
    listing: list[dict[str, object]] = []
    query = "?limit=1000"
    while True:
        async with http.get(url + "/sessions" + query, headers=AUTH) as response:
            page = await response.json()
        listing += page["data"]
        if not page["has_more"]:
            return listing
        query = f"?limit=1000&after={page['last_id']}"


@pytest.mark.parametrize("scale", SCALES)
async def test_kill9_loop_loses_no_event_any_client_saw(
    scale: Scale, proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    # Small segments: every round rolls some, and reopens one.
    await crash_loop(
        f"crash_loop[{scale.name}]",
        scale.rounds,
        scale.streams,
        proxies,
        tmp_path,
        "storage:\n  segment_bytes: 256KiB\n",
    )


def check_fsync_order(trace: Path) -> tuple[int, int]:
    """Replay one process's ordering trace (`proxy/trace.py`): every client write of an event
    must come after the fsync that covers the write of that event, or, for events an earlier
    process logged, after the start-up fsync. Returns (client writes, fsyncs) checked."""
    written: dict[str, tuple[list[int], list[int]]] = {}  # session -> (last events, commits)
    durable = -1
    writes = fsyncs = 0
    lines = trace.read_bytes().split(b"\n")[:-1]  # a kill -9 may tear the last line
    for line in lines:
        kind, *fields = line.split()
        if kind == b"W":
            lasts, commits = written.setdefault(fields[0].decode(), ([], []))
            lasts.append(int(fields[1]))
            commits.append(int(fields[2]))
        elif kind == b"F":
            durable = max(durable, int(fields[0]))
            fsyncs += 1
        elif kind == b"C":
            session_id, last = fields[0].decode(), int(fields[1])
            lasts, commits = written.get(session_id, ([], []))
            position = bisect_left(lasts, last)
            needed = commits[position] if position < len(lasts) else 0
            assert needed <= durable, (
                f"{trace.name}: session {session_id} event {last} went to a client before "
                f"fsync {needed} returned (last fsync returned: {durable})"
            )
            writes += 1
    return writes, fsyncs


async def test_kill9_loop_under_fsync_always_shows_no_event_before_its_fsync(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    """The same crash loop with `storage.fsync: always`, plus the ordering proof: each
    process traces its fsync returns and its client writes, and the trace is replayed."""
    traces = tmp_path / "traces"
    traces.mkdir()
    rounds = max(3, CI.rounds // 2)
    result = await crash_loop(
        "crash_loop[fsync_always]",
        rounds,
        CI.streams,
        proxies,
        tmp_path,
        "storage:\n  segment_bytes: 256KiB\n  fsync: always\n",
        env={TRACE_ENV: str(traces)},
    )
    files = sorted(traces.glob("trace-*.log"))
    assert len(files) == rounds + 1  # one per process
    writes = fsyncs = 0
    for trace in files:
        checked_writes, checked_fsyncs = check_fsync_order(trace)
        writes += checked_writes
        fsyncs += checked_fsyncs
    record(
        "crash_loop[fsync_always]",
        client_writes_checked_after_fsync=writes,
        fsyncs_traced=fsyncs,
    )
    assert result.events_checked > 0
    assert writes >= result.sessions  # every stream was written to at least once
