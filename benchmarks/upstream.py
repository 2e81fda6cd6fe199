"""The benchmark upstream: an OpenAI-shaped SSE server fast enough never to be the limit.

It is raw asyncio (uvloop when importable), not aiohttp, because every microsecond it spends
is taken from the same cores as the relay under test. Each event carries `"t":<ns>`, the
sender's `time.monotonic_ns()` just before the write, which the load generator subtracts from
its own clock on arrival (one Linux machine, one monotonic clock for every process).

The request body says what to send, so one server serves every workload:
`{"stream": true, "events": 200, "per_write": 1, "rate": 0}` — `per_write` events go out in
one write (1 is how LLM APIs send; 20 makes the relay the limit), `rate` paces the stream in
events per second (0: as fast as the socket takes them). `"stream": false` answers a small
chat-completion JSON. Responses are chunked HTTP/1.1 with keep-alive, as an API's are.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from typing import cast

_EVENT_HEAD = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench","choices":[{"index":0,"delta":{"content":" token"},'
    b'"finish_reason":null}],"t":'
)
_EVENT_TAIL = b"}\n\n"
_DONE = b"data: [DONE]\n\n"
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
    },
    separators=(",", ":"),
).encode()
_PLAIN_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_COMPLETION), _COMPLETION)
)
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024
MAX_EVENTS = 10_000_000


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class _Stream:
    """One SSE answer in flight, driven by loop callbacks (cheaper than a coroutine per
    stream when a thousand of them tick fifty times a second)."""

    __slots__ = ("_conn", "_interval_ns", "_next_ns", "_per_write", "_remaining")

    def __init__(self, conn: _Connection, events: int, per_write: int, rate: float) -> None:
        self._conn = conn
        self._remaining = events
        self._per_write = per_write
        self._interval_ns = int(per_write * 1e9 / rate) if rate > 0 else 0
        self._next_ns = time.monotonic_ns()

    def send_next(self) -> None:
        conn = self._conn
        if conn.closed:
            return
        if conn.paused:
            conn.on_resume = self.send_next
            return
        count = min(self._per_write, self._remaining)
        event = _EVENT_HEAD + str(time.monotonic_ns()).encode() + _EVENT_TAIL
        payload = event * count
        self._remaining -= count
        if self._remaining == 0:
            conn.transport.write(_chunk(payload + _DONE) + b"0\r\n\r\n")
            conn.stream_done()
            return
        conn.transport.write(_chunk(payload))
        loop = conn.loop
        if self._interval_ns:
            self._next_ns += self._interval_ns
            delay = (self._next_ns - time.monotonic_ns()) / 1e9
            loop.call_later(max(delay, 0.0), self.send_next)
        else:
            loop.call_soon(self.send_next)


class _Connection(asyncio.Protocol):
    """One keep-alive client connection, one request at a time (no pipelining needed)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport
        self.closed = False
        self.paused = False
        self.on_resume: object = None
        self._buffer = b""
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        callback, self.on_resume = self.on_resume, None
        if callable(callback):
            callback()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_HEAD_BYTES + 1024 * 1024:
            self._reject()
            return
        self._next_request()

    def stream_done(self) -> None:
        self._busy = False
        self._next_request()

    def _reject(self) -> None:
        self.transport.write(_BAD_REQUEST)
        self.transport.close()
        self.closed = True

    def _next_request(self) -> None:
        if self._busy or self.closed:
            return
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._reject()
            return
        head = self._buffer[:head_end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body_end = head_end + 4 + length
        if len(self._buffer) < body_end:
            return
        body = self._buffer[head_end + 4 : body_end]
        self._buffer = self._buffer[body_end:]
        self._answer(body)

    def _answer(self, body: bytes) -> None:
        try:
            request = json.loads(body) if body else {}
            stream = bool(request.get("stream"))
            events = min(int(request.get("events", 20)), MAX_EVENTS)
            per_write = max(1, int(request.get("per_write", 1)))
            rate = float(request.get("rate", 0))
        except (ValueError, TypeError, AttributeError):
            self._reject()
            return
        if not stream:
            self.transport.write(_PLAIN_RESPONSE)
            self._next_request()
            return
        self._busy = True
        self.transport.write(_STREAM_HEAD)
        if events <= 0:
            self.transport.write(_chunk(_DONE) + b"0\r\n\r\n")
            self.stream_done()
            return
        _Stream(self, events, per_write, rate).send_next()


async def serve(port: int) -> None:
    """Serve until SIGTERM/SIGINT; prints `ready <port>` once listening."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Connection, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"ready {bound}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port))
    else:
        uvloop.run(serve(port))


if __name__ == "__main__":
    main()
