"""A TCP middlebox that cuts connections: the network failure the resuming clients exist for.

It listens on 127.0.0.1 and forwards each connection to the proxy. The k-th connection it
accepts is cut once `cuts[k]` bytes have gone back to the client (connections past the end of
`cuts` are never cut), so a test chooses exactly where each break lands: in the response
headers, between events, or in the middle of one. A `cuts[k]` that is bytes cuts right after
those bytes have gone back (e.g. after the last event, before the end of the chunked body).
A cut alternates between a reset (RST, the client sees a connection reset) and a close (FIN
before the chunked body ended, the client sees an incomplete body), the two ways a real
connection dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

_READ_BYTES = 65536


@dataclass
class Connection:
    """What went back to the client on one connection, with the time of each write."""

    limit: int | bytes | None
    sent: bytearray = field(default_factory=bytearray)
    writes: list[tuple[float, int]] = field(default_factory=list)  # (monotonic s, total bytes)
    cut_at: float | None = None

    @property
    def body(self) -> bytes:
        return bytes(self.sent).partition(b"\r\n\r\n")[2]

    def first_event_at(self) -> float | None:
        """When the first whole event of the body had been forwarded."""
        head = bytes(self.sent).find(b"\r\n\r\n")
        end = bytes(self.sent).find(b"\n\n", head + 4) if head >= 0 else -1
        if end < 0:
            return None
        return next(at for at, total in self.writes if total >= end + 2)


@contextlib.asynccontextmanager
async def cutting(url: str, cuts: list[int | bytes]) -> AsyncIterator[CuttingMiddlebox]:
    """A middlebox in front of the proxy at `url`, stopped on exit."""
    box = await CuttingMiddlebox(int(url.rsplit(":", 1)[1]), cuts).start()
    try:
        yield box
    finally:
        await box.stop()


class CuttingMiddlebox:
    def __init__(self, target_port: int, cuts: list[int | bytes]) -> None:
        self.target_port = target_port
        self.cuts = list(cuts)
        self.connections: list[Connection] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> CuttingMiddlebox:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        """Close the listener and every open connection, then wait for the handlers to end.

        Handlers are ended by closing their sockets, not by cancelling them: asyncio logs a
        cancelled connection handler as an error."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    def cut_connections(self) -> list[Connection]:
        return [connection for connection in self.connections if connection.cut_at is not None]

    async def _accept(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client)
        index = len(self.connections)
        connection = Connection(self.cuts[index] if index < len(self.cuts) else None)
        self.connections.append(connection)
        try:
            proxy_reader, proxy = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client.close()
            self._writers.discard(client)
            self._tasks.discard(task)
            return
        self._writers.add(proxy)
        upward = asyncio.create_task(self._pipe(client_reader, proxy))
        try:
            await self._downward(proxy_reader, client, connection, reset=index % 2 == 0)
        finally:
            upward.cancel()
            await asyncio.gather(upward, return_exceptions=True)
            proxy.close()
            client.close()
            self._writers.difference_update((client, proxy))
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(_READ_BYTES):
                writer.write(data)
                await writer.drain()
            writer.write_eof()

    @staticmethod
    async def _downward(
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        connection: Connection,
        *,
        reset: bool,
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(_READ_BYTES):
                if isinstance(connection.limit, bytes):
                    found = (bytes(connection.sent) + data).find(connection.limit)
                    if found >= 0:
                        connection.limit = found + len(connection.limit)
                if isinstance(connection.limit, int):
                    data = data[: connection.limit - len(connection.sent)]
                connection.sent += data
                client.write(data)
                await client.drain()
                connection.writes.append((time.monotonic(), len(connection.sent)))
                limit = connection.limit
                if isinstance(limit, int) and len(connection.sent) >= limit:
                    connection.cut_at = time.monotonic()
                    if reset:
                        sock = client.get_extra_info("socket")
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        client.transport.abort()
                    return
