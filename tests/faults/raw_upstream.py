"""An upstream written at the byte level, so a test can break HTTP or SSE anywhere.

`ScriptedUpstream` (tests/helpers.py) speaks correct HTTP through aiohttp; the faults here
need what aiohttp will not produce: a chunked body cut between chunks, a second status line in
the middle of a body, a peer that accepts and never answers, one byte per second. Each route
is a coroutine that gets the connection's writer after the request was read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tests.helpers import free_port

Route = Callable[[asyncio.StreamWriter], Awaitable[None]]

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (RFC 9112 §7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_event(n: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"t%d "}}]}\n\n' % n


def paced_stream(events: int, pause: float) -> Route:
    """A well-formed stream: `events` events `pause` seconds apart, then [DONE]."""

    async def route(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        for n in range(events):
            writer.write(chunk(sse_event(n)))
            await writer.drain()
            await asyncio.sleep(pause)
        writer.write(chunk(b"data: [DONE]\n\n") + LAST_CHUNK)
        await writer.drain()

    return route


@dataclass
class RawUpstream:
    routes: dict[str, Route]
    url: str = ""
    connections: int = 0
    completed: int = 0  # routes that ran to their end (the proxy read the whole answer)
    heads: list[bytes] = field(default_factory=list)  # each request's head, as received
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> RawUpstream:
        port = free_port()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aenter__(self) -> RawUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            path = request_line.split(" ")[1]
            length = 0
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            route = self.routes.get(path)
            if route is None:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            else:
                await route(writer)
            await writer.drain()
            self.completed += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the proxy hung up, which several faults provoke on purpose
        except asyncio.CancelledError:
            # `stop` ends routes that would wait forever; ending the task normally keeps
            # asyncio's start_server callback from logging the cancellation as an error.
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            self._handlers.discard(task)
