"""Calibration: the thinnest relay Python can be, to tell our cost from the language's.

    python benchmarks/floor_relay.py LISTEN_PORT UPSTREAM_PORT

A uvloop server that forwards each connection's bytes to the upstream and back verbatim: no
HTTP parsing beyond the end of the request head, no framing, no log, no numbering. Run it as
an extra column next to nginx (it answers the benchmark's load generator like a relay does)
to see what one event costs a Python process on this machine for its socket reads and
writes alone. On 2026-12-01 it measured 21-26 µs of CPU per paced event against nginx's
15-25 µs (one read, one write, one poll per event in both), so a target of 1.5x nginx's
CPU per event leaves the proxy almost nothing for framing, logging and pushing.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.early = b""
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: _Upstream(self), "127.0.0.1", self.upstream_port
        )
        self.upstream = upstream
        if self.early and upstream.transport is not None:
            upstream.transport.write(self.early)

    def data_received(self, data: bytes) -> None:
        if self.upstream is None or self.upstream.transport is None:
            self.early += data
        else:
            self.upstream.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def _serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: _Client(upstream_port), "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
