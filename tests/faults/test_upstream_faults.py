"""Upstream faults: each ends in the contract's state with the right error event, and a
healthy stream relayed beside it at the same moment still gets every event in order (its
pace beside each fault is measured by `benchmarks/bench_isolation.py`, not asserted here).

Cut mid-event and between events, a stall past `upstream.idle_timeout`, malformed SSE (no
blank line at all, binary garbage, a 10 MB line against the framer's 8 MiB limit), a second
status line (a 5xx) inside a body already streaming, an upstream that accepts and never
answers, and one that trickles a byte a second.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Config
from proxy.sse import MAX_EVENT_BYTES, MalformedStream, SSEFramer

from ..helpers import event_ids, frame, run_proxy, split_at
from .figures import record
from .raw_upstream import LAST_CHUNK, SSE_HEAD, RawUpstream, Route, chunk, paced_stream, sse_event

AUTH = {"Authorization": "Bearer sk-normal"}
FAULT_AUTH = {"Authorization": "Bearer sk-faults"}
NORMAL_EVENTS = 40
NORMAL_PAUSE = 0.01


def _garbage(size: int, seed: int) -> bytes:
    """Binary noise with no line terminator in it (so it cannot end or start an event)."""
    rng = random.Random(seed)
    noise = bytes(rng.getrandbits(8) for _ in range(size))
    return noise.replace(b"\n", b"\x00").replace(b"\r", b"\x01")


def sends(*steps: bytes | float, cut: bool) -> Route:
    """Bytes are written as they are, floats are pauses; then cut or end the body cleanly."""

    async def route(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        for step in steps:
            if isinstance(step, bytes):
                writer.write(step)
                await writer.drain()
            else:
                await asyncio.sleep(step)
        if cut:
            writer.transport.abort()
        else:
            writer.write(LAST_CHUNK)

    return route


async def ten_megabyte_line(writer: asyncio.StreamWriter) -> None:
    """10 MiB without a line terminator, in 8 KiB pieces that the proxy reads one by one."""
    writer.write(SSE_HEAD + chunk(b"data: "))
    piece = chunk(b"x" * 8192)
    for _ in range(1280):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0)


async def never_answers(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def one_byte_a_second(writer: asyncio.StreamWriter) -> None:
    writer.write(SSE_HEAD + chunk(sse_event(0) + b"data: [DONE]"))
    await writer.drain()
    for byte in (b"\n", b"\n"):
        await asyncio.sleep(1.0)
        writer.write(chunk(byte))
        await writer.drain()
    writer.write(LAST_CHUNK)


GARBAGE_BLOCK = _garbage(4096, 1)
TRAILING_GARBAGE = _garbage(2048, 2)


@dataclass(frozen=True)
class Fault:
    route: Route
    upstream_events: bytes  # what upstream sent that forms whole events (framed for the check)
    state: str | None = "failed"  # None: no session, the client gets an error status
    status: int = 200
    error_code: str | None = "failed"  # the code of the final error event or error body
    idle_timeout: str = "300ms"


FAULTS = {
    "cut_mid_event": Fault(
        sends(chunk(sse_event(0)), 0.2, chunk(sse_event(1) + b'data: {"tor'), 0.2, cut=True),
        sse_event(0) + sse_event(1),
    ),
    "cut_between_events": Fault(
        sends(chunk(sse_event(0)), 0.2, chunk(sse_event(1)), 0.2, cut=True),
        sse_event(0) + sse_event(1),
    ),
    "stall_past_idle_timeout": Fault(
        sends(chunk(sse_event(0)), 5.0, chunk(sse_event(1)), cut=False), sse_event(0)
    ),
    "no_blank_lines": Fault(
        sends(*(chunk(b"data: line %d\n" % n) for n in range(2000)), cut=False), b""
    ),
    "binary_garbage": Fault(
        sends(
            chunk(sse_event(0) + GARBAGE_BLOCK + b"\n\n"),
            0.2,
            chunk(sse_event(1) + TRAILING_GARBAGE),
            cut=False,
        ),
        sse_event(0) + sse_event(1),
    ),
    "ten_megabyte_line": Fault(ten_megabyte_line, b""),
    "status_500_inside_the_body": Fault(
        sends(
            chunk(sse_event(0)),
            0.2,
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
            0.2,
            cut=False,
        ),
        sse_event(0),
    ),
    "accepts_and_never_answers": Fault(
        never_answers, b"", state=None, status=504, error_code="upstream_timeout"
    ),
    "one_byte_a_second": Fault(
        one_byte_a_second,
        sse_event(0) + b"data: [DONE]\n\n",
        state="complete",
        error_code=None,
        idle_timeout="1500ms",
    ),
}


async def timed_normal_stream(
    http: aiohttp.ClientSession, url: str, delay: float = 0.0
) -> tuple[float, bytes]:
    await asyncio.sleep(delay)
    started = time.monotonic()
    async with http.post(url + "/normal", data=b"{}", headers=AUTH) as response:
        body = await response.read()
    return time.monotonic() - started, body


async def read_fault(http: aiohttp.ClientSession, url: str) -> tuple[aiohttp.ClientResponse, bytes]:
    async with http.post(url + "/fault", data=b"{}", headers=FAULT_AUTH) as response:
        return response, await response.read()


@pytest.mark.parametrize("name", list(FAULTS))
async def test_upstream_fault_ends_in_contract_state_and_a_stream_beside_it_is_whole(
    name: str, config_for: Callable[..., Config]
) -> None:
    fault = FAULTS[name]
    upstream = await RawUpstream(
        {"/fault": fault.route, "/normal": paced_stream(NORMAL_EVENTS, NORMAL_PAUSE)}
    ).start()
    config = config_for(upstream.url, **{"upstream.idle_timeout": fault.idle_timeout})
    expected_events, _ = SSEFramer().feed(fault.upstream_events)
    try:
        async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
            alone, _ = await timed_normal_stream(http, proxy.url)
            started = time.monotonic()
            async with asyncio.timeout(60):
                (response, body), (beside, normal) = await asyncio.gather(
                    read_fault(http, proxy.url),
                    timed_normal_stream(http, proxy.url, delay=0.05),
                )
            fault_seconds = time.monotonic() - started
            assert response.status == fault.status
            if fault.state is None:
                error: dict[str, Any] = json.loads(body)["error"]
                assert error["code"] == fault.error_code
                assert "X-Resume-Session-Id" not in response.headers
                async with http.get(proxy.url + "/sessions", headers=FAULT_AUTH) as listing:
                    assert (await listing.json())["data"] == []
            else:
                session_id = response.headers["X-Resume-Session-Id"]
                assert body.startswith(expected_events)
                rest = body[len(expected_events) :]
                if fault.error_code is None:
                    assert rest == b""
                else:
                    final = json.loads(rest.removeprefix(b"data: "))
                    assert final["error"]["code"] == fault.error_code
                    assert final["error"]["type"] == "resumable_proxy_error"
                async with http.get(f"{proxy.url}/sessions/{session_id}", headers=FAULT_AUTH) as r:
                    info = await r.json()
                assert info["state"] == fault.state
                assert info["events"] == len(event_ids(expected_events))
                async with http.get(
                    f"{proxy.url}/sessions/{session_id}/events", headers=FAULT_AUTH
                ) as r:
                    assert await r.read() == body
    finally:
        await upstream.stop()
    assert event_ids(normal) == list(range(1, NORMAL_EVENTS + 2))
    assert normal.endswith(b"data: [DONE]\n\n")
    record(
        f"upstream_fault[{name}]",
        state=fault.state or f"{fault.status}",
        fault_s=round(fault_seconds, 2),
        normal_alone_s=round(alone, 3),
        normal_beside_s=round(beside, 3),
    )


long_line = st.integers(min_value=60_000, max_value=150_000).map(lambda n: b"data: " + b"x" * n)
short_line = st.sampled_from([b"data: a", b": comment", b"id: 7", b"", b"event: e"])


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(st.one_of(long_line, short_line), min_size=1, max_size=8),
    eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=600_000), max_size=40),
)
def test_events_longer_than_a_read_frame_the_same_under_any_split(
    lines: list[bytes], eol: bytes, cuts: list[int]
) -> None:
    data = eol.join(lines) + eol + eol
    assert frame(split_at(data, cuts)) == frame([data])


def test_a_line_past_the_limit_in_small_reads_is_rejected_at_the_limit() -> None:
    """The read that takes an unfinished event past MAX_EVENT_BYTES is the one refused.
    (That this costs linear time, not the quadratic re-joining it once did, is measured by
    `benchmarks/bench_isolation.py`.)"""
    framer = SSEFramer()
    framer.feed(b"data: ")
    piece = b"x" * 1024
    accepted = len(b"data: ")
    with pytest.raises(MalformedStream):
        while accepted <= MAX_EVENT_BYTES:
            framer.feed(piece)
            accepted += len(piece)
    assert accepted <= MAX_EVENT_BYTES < accepted + len(piece)  # the read that crossed it


# 700 events of 60 KB and [DONE]: 42 MB that gzip packs into 45 KB.
GZIP_BOMB = (b"data: " + b"x" * 60_000 + b"\n\n") * 700 + b"data: [DONE]\n\n"
GZIP_HEAD = SSE_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n")


def gzip_stream(body: bytes) -> Route:
    async def route(writer: asyncio.StreamWriter) -> None:
        writer.write(GZIP_HEAD + chunk(body) + LAST_CHUNK)
        await writer.drain()

    return route


async def gzip_session(
    config_for: Callable[..., Config], packed: bytes, timeout: float
) -> tuple[aiohttp.ClientResponse, bytes, dict[str, Any]]:
    """The answer (relayed as it came, not inflated by the client) to a request whose
    upstream sends `packed` as one gzip body, and then its session's JSON."""
    async with (
        RawUpstream({"/fault": gzip_stream(packed)}) as upstream,
        run_proxy(config_for(upstream.url)) as proxy,
        aiohttp.ClientSession(auto_decompress=False) as http,
    ):
        async with asyncio.timeout(timeout):
            response, body = await read_fault(http, proxy.url)
        session_id = response.headers["X-Resume-Session-Id"]
        async with http.get(f"{proxy.url}/sessions/{session_id}", headers=FAULT_AUTH) as r:
            return response, body, await r.json()


async def test_a_gzip_read_inflating_far_past_the_largest_record_is_relayed_and_logged_whole(
    config_for: Callable[..., Config],
) -> None:
    """45 KB of gzip in one read inflate to 42 MB of events, past the largest log record (the
    32 MiB segment): inflated a slice at a time, every event is relayed and logged and the
    session completes, where that one read used to leave the session streaming forever."""
    plain = GZIP_BOMB
    packed = gzip.compress(plain, 9)
    assert len(packed) < 64 * 1024 and len(plain) > 40 * 10**6
    response, body, info = await gzip_session(config_for, packed, timeout=60)
    assert response.status == 200 and "Content-Encoding" not in response.headers
    expected, _ = SSEFramer().feed(plain)
    assert body == expected  # every event, numbered, decoded
    assert (info["state"], info["events"]) == ("complete", 701)


async def test_gzip_that_does_not_inflate_ends_the_session_failed(
    config_for: Callable[..., Config],
) -> None:
    broken = gzip.compress(sse_event(0) * 50)[:40] + b"\x00not deflate at all" * 20
    _, body, info = await gzip_session(config_for, broken, timeout=30)
    assert info["state"] == "failed" and "does not inflate" in info["reason"]
    final = json.loads(body[body.rindex(b'data: {"error"') + 6 :])
    assert final["error"]["code"] == "failed"
