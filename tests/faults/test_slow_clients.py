"""Slow clients: many readers that take a byte a second from live sessions, through a small
receive window. The proxy's memory stays bounded (a slow reader holds one batch, never the
session) and fast readers of the same sessions get every event. How the upstream's pace and
the fast readers' time compare with and without the slow readers is recorded here and
measured by `benchmarks/bench_isolation.py`; it is not asserted (tests assert behaviour).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from ..helpers import ProxyProcess, mock_stream_body
from .figures import SCALES, Scale, record

AUTH = {"Authorization": "Bearer sk-slow"}
SESSIONS = 4
TOKENS = 600  # about 145 KiB a session: more than a reader's write buffer, so hoarding shows
# Upstream events per second, summed over sessions, times readers: the fan-out this 2-core
# box sustains whatever the readers' speed (200 fast readers on 2,000 events/s slow the
# upstream exactly as much as 200 slow ones). The pace is set to stay inside it, so the test
# measures slowness, not capacity: 10 ms between events for 200 readers, 50 ms for 1,000.
READER_EVENTS_PER_S = 20_000
READER_BUFFER = 64 * 1024  # aiohttp's write-buffer high-water mark: what one reader may hold


def pace(readers: int) -> tuple[int, float]:
    """(tokens, interval_ms) of each session for `readers` slow readers."""
    return TOKENS, max(10.0, 1000 * readers / READER_EVENTS_PER_S)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyProcess]:
    process = ProxyProcess(tmp_path / "data").start()
    yield process
    process.kill()


async def fast_read(
    http: aiohttp.ClientSession, url: str, session: list[str], body: dict[str, object]
) -> tuple[float, bytes]:
    """Start a session (its id goes into `session`) and read it to the end at full speed."""
    started = time.monotonic()
    async with http.post(url + "/v1/chat/completions", json=body, headers=AUTH) as response:
        session.append(response.headers["X-Resume-Session-Id"])
        body = await response.read()
    return time.monotonic() - started, body


async def slow_reader(port: int, session_id: str, stop: asyncio.Event) -> int:
    """Follow a session through a 4 KiB receive buffer, taking one byte a second."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = (
            f"GET /sessions/{session_id}/events HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {AUTH['Authorization']}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        received = 0
        while not stop.is_set():
            received += len(await loop.sock_recv(sock, 1))
            await asyncio.wait([asyncio.ensure_future(stop.wait())], timeout=1.0)
        return received
    finally:
        sock.close()


async def session_info(http: aiohttp.ClientSession, url: str, session_id: str) -> dict[str, object]:
    async with http.get(f"{url}/sessions/{session_id}", headers=AUTH) as response:
        return await response.json()


@dataclass
class Run:
    upstream_ms: float  # the slowest session's upstream read, first byte sent to end
    fast_s: float  # the slowest fast reader, request to last byte
    bodies: list[bytes]
    peak_kib: int
    slow_received: list[int]


async def run_sessions(
    http: aiohttp.ClientSession,
    proxy: ProxyProcess,
    body: dict[str, object],
    slow_readers: int,
    pid: int,
) -> Run:
    """SESSIONS sessions, each read by its fast creator, plus `slow_readers` slow readers."""
    ids: list[str] = []
    fast = [asyncio.create_task(fast_read(http, proxy.url, ids, body)) for _ in range(SESSIONS)]
    while len(ids) < SESSIONS:
        await asyncio.sleep(0.01)
    stop = asyncio.Event()
    slow = [
        asyncio.create_task(slow_reader(proxy.port, ids[n % SESSIONS], stop))
        for n in range(slow_readers)
    ]
    peak = rss_kib(pid)
    while not all(task.done() for task in fast):
        peak = max(peak, rss_kib(pid))
        await asyncio.sleep(0.1)
    for _ in range(10):  # slow readers still connected, blocked on full windows
        peak = max(peak, rss_kib(pid))
        await asyncio.sleep(0.1)
    stop.set()
    received = await asyncio.gather(*slow)
    results = [task.result() for task in fast]
    infos = [await session_info(http, proxy.url, session_id) for session_id in ids]
    assert all(info["state"] == "complete" for info in infos)
    return Run(
        upstream_ms=max(float(info["duration_ms"]) for info in infos),
        fast_s=max(seconds for seconds, _ in results),
        bodies=[body for _, body in results],
        peak_kib=peak,
        slow_received=received,
    )


@pytest.mark.parametrize("scale", SCALES)
async def test_slow_readers_keep_memory_bounded_and_every_fast_reader_gets_each_session_whole(
    scale: Scale, proxy: ProxyProcess
) -> None:
    assert proxy.process is not None
    pid = proxy.process.pid
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        body = mock_stream_body(*pace(scale.slow_readers))
        alone = await run_sessions(http, proxy, body, 0, pid)
        await asyncio.sleep(0.5)
        before = rss_kib(pid)
        loaded = await run_sessions(http, proxy, body, scale.slow_readers, pid)
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
    session_bytes = len(alone.bodies[0])
    record(
        f"slow_readers[{scale.name}]",
        slow_readers=scale.slow_readers,
        sessions=SESSIONS,
        upstream_events_per_s=round(SESSIONS * 1000 / pace(scale.slow_readers)[1]),
        session_kib=session_bytes // 1024,
        rss_before_mib=round(before / 1024, 1),
        rss_peak_mib=round(loaded.peak_kib / 1024, 1),
        rss_after_mib=round(after / 1024, 1),
        upstream_without_slow_readers_ms=alone.upstream_ms,
        upstream_with_slow_readers_ms=loaded.upstream_ms,
        fast_reader_without_slow_readers_s=round(alone.fast_s, 2),
        fast_reader_with_slow_readers_s=round(loaded.fast_s, 2),
    )
    assert all(len(body) == session_bytes for body in loaded.bodies)
    assert all(count > 0 for count in loaded.slow_received)
    # A slow reader may hold its write buffer, never its session.
    assert session_bytes > 2 * READER_BUFFER
    assert (loaded.peak_kib - before) * 1024 < scale.slow_readers * READER_BUFFER
