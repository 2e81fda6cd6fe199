"""Clients that hold connections: a body trickled forever, a flood of idle connections.

Each held connection is a file descriptor the proxy also needs for upstream connections and
its log. `server.body_timeout` ends a body that does not arrive (408), `server.max_connections`
answers connections past the cap with 503 at once (logged once per burst), and start-up
raises the soft open-file limit to the hard one so the cap, not the OS, is what clients meet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.config import Config

from ..helpers import ProxyProcess, ScriptedUpstream, missing_tool, run_proxy

AUTH = b"Authorization: Bearer sk-limits\r\n"
# Lowers the soft open-file limit, then runs the rest of its arguments as the command.
LOW_SOFT_LIMIT = (
    "import os, resource, sys; "
    "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, object], bytes]:
    """Status, JSON body, and whatever follows it before the server closes (b"" if it did)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    after = await asyncio.wait_for(reader.read(), 10)
    return int(head.split(b" ", 2)[1]), json.loads(body), after


async def test_a_body_trickled_past_body_timeout_gets_408_and_a_closed_connection(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    config = config_for(upstream.url, **{"server.body_timeout": "300ms"})
    async with run_proxy(config) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + AUTH
                + b"Content-Length: 1000\r\n\r\n"
                + b'{"stream": true, '
            )
            status, error, after = await read_answer(reader)
        finally:
            writer.close()
    assert status == 408
    assert error["error"]["code"] == "request_timeout"  # type: ignore[index]
    assert "server.body_timeout" in error["error"]["message"]  # type: ignore[index]
    assert after == b""  # the connection was closed, not kept for the rest of the body
    assert upstream.calls == 0


async def test_connections_past_max_connections_get_503_logged_once_then_room_again(
    config_for: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(**{"server.max_connections": "5"})
    async with run_proxy(config) as proxy:
        port = proxy.port
        held = []
        for _ in range(5):  # idle connections that never finish their request head
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            held.append(writer)
        await asyncio.sleep(0.2)  # the proxy has accepted them all
        with caplog.at_level(logging.WARNING, logger="proxy.server"):
            refused = []
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                refused.append(await read_answer(reader))
                writer.close()
        for writer in held:
            writer.close()
        async with aiohttp.ClientSession() as http:
            for _ in range(50):  # the held ones close on the proxy's side a moment later
                async with http.get(proxy.url + "/healthz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert response.status == 200
    for status, error, after in refused:
        assert status == 503
        assert error["error"]["code"] == "too_many_connections"  # type: ignore[index]
        assert after == b""
    reached = [r for r in caplog.records if "server.max_connections (5) reached" in r.message]
    assert len(reached) == 1  # once per burst, not once per connection


def test_start_up_raises_the_soft_open_file_limit_to_the_hard_one(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        missing_tool(f"the hard open-file limit here ({hard}) leaves nothing to raise")
    proxy = ProxyProcess(tmp_path / "data", command_prefix=[sys.executable, "-c", LOW_SOFT_LIMIT])
    proxies.append(proxy.start())
    assert proxy.process is not None
    limits = Path(f"/proc/{proxy.process.pid}/limits").read_text()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    now_soft, now_hard = line.split()[3:5]
    assert now_soft == now_hard != "256"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(12) == b"HTTP/1.1 200"
