"""SIGTERM under load: the listener closes at once, live streams finish within
`server.shutdown_grace` while their readers keep receiving, the rest end `interrupted` with
their error event, the process exits 0, and a restart replays exactly what each client got.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from ..helpers import ProxyProcess, event_ids, mock_stream_body
from .figures import SCALES, Scale, record
from .raw_upstream import SSE_HEAD, RawUpstream, chunk, sse_event
from .test_crash_loop import Stream

AUTH = {"Authorization": "Bearer sk-shutdown"}
CASES = {
    # grace, request body, how every client's stream must end
    "within_grace": ("10s", mock_stream_body(60, 20), b"data: [DONE]\n\n"),
    "past_grace": ("500ms", mock_stream_body(100_000, 10), b'"code":"interrupted"}}\n\n'),
}


async def read_all(
    http: aiohttp.ClientSession, url: str, body: dict[str, object], stream: Stream
) -> None:
    async with http.post(url + "/v1/chat/completions", json=body, headers=AUTH) as response:
        stream.session_id = response.headers["X-Resume-Session-Id"]
        async for piece in response.content.iter_any():
            stream.seen += piece
    stream.done = True


def refuses_connections(port: int) -> bool:
    """One gentle probe (a tight loop would fill the accept queue and time out instead)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    except TimeoutError:
        pass
    time.sleep(0.05)
    return False


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scale", SCALES)
async def test_sigterm_under_load_loses_nothing_a_client_saw_and_exits_0(
    scale: Scale, case: str, proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    grace, body, ending = CASES[case]
    config = tmp_path / "proxy.yaml"
    config.write_text(f"server:\n  shutdown_grace: {grace}\n")
    data_dir = tmp_path / "data"
    proxy = ProxyProcess(data_dir, extra_args=["--config", str(config)])
    proxies.append(proxy)
    proxy.start()
    assert proxy.process is not None
    streams = [Stream(short=False) for _ in range(scale.shutdown_streams)]
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=60),
        connector=aiohttp.TCPConnector(limit=0),  # every stream at once, not 100 at a time
    ) as http:
        tasks = [asyncio.create_task(read_all(http, proxy.url, body, s)) for s in streams]
        async with asyncio.timeout(60):
            while not all(s.seen.count(b"\n\n") >= 3 for s in streams):
                await asyncio.sleep(0.02)
        proxy.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        refused = False
        while not refused and proxy.process.poll() is None:
            refused = refuses_connections(proxy.port)
        await asyncio.gather(*tasks)
        code = await asyncio.to_thread(proxy.process.wait, 30)
        exit_s = time.monotonic() - signalled
        again = ProxyProcess(data_dir)
        proxies.append(again)
        again.start()
        lost = 0
        for stream in streams:
            seen = bytes(stream.seen)
            assert seen.endswith(ending), seen[-200:]
            async with http.get(f"{again.url}/sessions/{stream.session_id}", headers=AUTH) as r:
                info = await r.json()
            async with http.get(
                f"{again.url}/sessions/{stream.session_id}/events", headers=AUTH
            ) as r:
                replay = await r.read()
            lost += replay != seen
            assert event_ids(seen) == list(range(1, info["events"] + 1))
            if case == "past_grace":
                assert info["state"] == "interrupted"
                final = json.loads(seen[seen.rindex(b"data: ") + 6 :])
                assert final["error"]["type"] == "resumable_proxy_error"
            else:
                assert info["state"] == "complete"
    record(
        f"shutdown[{case},{scale.name}]",
        streams=len(streams),
        events_checked=sum(len(event_ids(bytes(s.seen))) for s in streams),
        sessions_differing_from_client=lost,
        exit_code=code,
        exit_s=round(exit_s, 2),
    )
    assert lost == 0
    assert code == 0
    assert refused, "the listener stayed open after SIGTERM"


async def answers_late(writer: asyncio.StreamWriter) -> None:
    """Response headers only after a second, then an endless stream."""
    await asyncio.sleep(1.0)
    writer.write(SSE_HEAD)
    for n in range(1200):
        writer.write(chunk(sse_event(n)))
        await writer.drain()
        await asyncio.sleep(0.05)


async def test_sigterm_refuses_streams_whose_upstream_answers_after_the_grace(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    upstream = await RawUpstream({"/v1/chat/completions": answers_late}).start()
    config = tmp_path / "proxy.yaml"
    config.write_text("server:\n  shutdown_grace: 300ms\n")
    proxy = ProxyProcess(tmp_path / "data", upstream.url, ["--config", str(config)])
    proxies.append(proxy)
    proxy.start()
    assert proxy.process is not None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def late_request() -> tuple[int, bytes]:
                async with http.post(
                    proxy.url + "/v1/chat/completions", json={"stream": True}, headers=AUTH
                ) as response:
                    return response.status, await response.read()

            requests = [asyncio.create_task(late_request()) for _ in range(5)]
            while upstream.connections < len(requests):
                await asyncio.sleep(0.01)
            proxy.process.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*requests)
            code = await asyncio.to_thread(proxy.process.wait, 30)
            # Each late stream runs for a minute: the proxy left without reading one out.
            finished_upstream = upstream.completed
    finally:
        await upstream.stop()
    for status, body in answers:
        assert status == 503
        assert json.loads(body)["error"]["code"] == "shutting_down"
    assert code == 0
    assert finished_upstream == 0
