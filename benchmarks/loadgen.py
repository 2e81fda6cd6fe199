"""The load generator: worker processes, each a raw-asyncio HTTP/1.1 client on its own loop.

Raw protocols, not aiohttp, because the generator shares the machine with what it measures:
the less CPU it burns per event, the less it disturbs the relay and the less it limits the
direct run. Each worker reports its own CPU time so the report can show the generator was not
the bottleneck. Every receive is stamped with `time.monotonic_ns()` once per socket read; the
latency of an event is that stamp minus the `"t":<ns>` the upstream wrote into it.

The parent drives workers through pipes with four commands: `streams` (concurrent SSE
streams, closed loop until a deadline, optionally collecting latencies), `sequence` (one
request after another, timing each), `hold` (open streams and keep them open) and `release`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import resource
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

_STAMP = re.compile(rb'"t":(\d+)')
SESSION_HEADER = "x-resume-session-id"
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


class EventSink:
    """Counts events (blank-line ends) across reads; optionally collects per-event latency.

    Events never contain a blank line inside, so carrying one byte between reads is enough
    to count exactly; latency parsing keeps the unfinished tail instead.
    """

    __slots__ = ("_last_newline", "_tail", "events", "latencies", "stamps", "window")

    def __init__(
        self, latencies: array[int] | None = None, window: tuple[int, int] = (0, 0)
    ) -> None:
        self.events = 0
        self.latencies = latencies
        self.window = window
        self.stamps = latencies is not None
        self._last_newline = False
        self._tail = b""

    def feed(self, payload: bytes, now: int) -> None:
        self.events += payload.count(b"\n\n")
        if self._last_newline and payload[:1] == b"\n":
            self.events += 1
        self._last_newline = payload[-1:] == b"\n"
        if not self.stamps:
            return
        buffer = self._tail + payload if self._tail else payload
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._tail = buffer
            return
        self._tail = buffer[end + 2 :]
        low, high = self.window
        if low <= now <= high:
            latencies = self.latencies
            assert latencies is not None
            latencies.extend(now - int(stamp) for stamp in _STAMP.findall(buffer, 0, end))


@dataclass(slots=True)
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    sent_ns: int = 0
    first_byte_ns: int = 0
    end_ns: int = 0
    body_bytes: int = 0


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection; one request at a time.

    Bodies are de-chunked and handed to the sink as they arrive, never buffered whole.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._state = _DONE
        self._buffer = b""
        self._left = 0
        self._sink: EventSink | None = None
        self._response = Response()
        self._done: asyncio.Future[Response] | None = None

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, "127.0.0.1", port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _UNTIL_CLOSE:
            self._finish(time.monotonic_ns())
        elif self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError("connection closed mid-response"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def request(self, raw: bytes, sink: EventSink) -> asyncio.Future[Response]:
        assert self.transport is not None and self._state == _DONE
        self._done = asyncio.get_running_loop().create_future()
        self._sink = sink
        self._response = Response(sent_ns=time.monotonic_ns())
        self._state = _HEAD
        self._buffer = b""
        self.transport.write(raw)
        return self._done

    def _body(self, piece: bytes, now: int) -> None:
        response = self._response
        if not response.first_byte_ns:
            response.first_byte_ns = now
        response.body_bytes += len(piece)
        assert self._sink is not None
        self._sink.feed(piece, now)

    def _finish(self, now: int) -> None:
        self._state = _DONE
        self._response.end_ns = now
        if self._done is not None and not self._done.done():
            self._done.set_result(self._response)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        pos, size = 0, len(data)
        while pos < size:
            state = self._state
            if state in (_CHUNK_DATA, _LENGTH, _UNTIL_CLOSE):
                take = size - pos if state == _UNTIL_CLOSE else min(self._left, size - pos)
                self._body(data[pos : pos + take] if pos or take < size else data, now)
                pos += take
                self._left -= take
                if state == _LENGTH and self._left == 0:
                    self._finish(now)
                elif state == _CHUNK_DATA and self._left == 0:
                    self._state = _CHUNK_END
            elif state in (_CHUNK_SIZE, _CHUNK_END, _TRAILER):
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    self._buffer = data[pos:]
                    return
                line = data[pos:line_end]
                pos = line_end + 2
                if state == _CHUNK_END:
                    self._state = _CHUNK_SIZE
                elif state == _TRAILER:
                    if not line:
                        self._finish(now)
                else:
                    self._left = int(line.split(b";", 1)[0], 16)
                    self._state = _CHUNK_DATA if self._left else _TRAILER
            elif state == _HEAD:
                head_end = data.find(b"\r\n\r\n", pos)
                if head_end < 0:
                    self._buffer = data[pos:]
                    return
                self._head(data[pos:head_end])
                pos = head_end + 4
                if self._state == _LENGTH and self._left == 0:
                    self._finish(now)
            else:
                return  # bytes after a complete response: none are expected

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        response = self._response
        response.status = int(lines[0].split(" ", 2)[1])
        headers = response.headers
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            self._state = _CHUNK_SIZE
        elif "content-length" in headers:
            self._state = _LENGTH
            self._left = int(headers["content-length"])
        else:
            self._state = _UNTIL_CLOSE


def build_request(port: int, method: str, path: str, body: bytes = b"") -> bytes:
    """The bytes of one request, as an OpenAI client would send it (bearer token, JSON)."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Authorization: Bearer bench-key\r\nAccept: */*\r\n"
    )
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def stream_body(events: int, per_write: int = 1, rate: float = 0.0) -> bytes:
    return (
        b'{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}],'
        b'"events":%d,"per_write":%d,"rate":%r}' % (events, per_write, rate)
    )


PLAIN_BODY = b'{"model":"bench","stream":false,"messages":[{"role":"user","content":"hi"}]}'


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class Worker:
    """The state of one generator process: the commands, and streams held open between them."""

    def __init__(self) -> None:
        self._held: list[HttpConnection] = []
        self._held_tasks: list[asyncio.Future[Response]] = []

    async def streams(self, p: dict[str, Any]) -> dict[str, Any]:
        """`streams` concurrent slots; each sends a stream request and, while `until` (a
        monotonic time) has not passed, another after it on the same connection."""
        port, raw = p["port"], build_request(p["port"], "POST", p["path"], p["body"])
        expected = p["expected_events"]
        latencies: array[int] | None = array("q") if p.get("window") else None
        window = tuple(p["window"]) if p.get("window") else (0, 0)
        result = {"streams": 0, "events": 0, "bytes": 0, "errors": 0, "short": 0}
        ends: list[int] = []
        starts: list[int] = []
        first_bytes = array("q")

        async def slot(offset: float) -> None:
            await _sleep_until(p["start_at"] + offset)
            connection = await HttpConnection.open(port)
            try:
                while True:
                    sink = EventSink(latencies, window)  # type: ignore[arg-type]
                    response = await asyncio.wait_for(connection.request(raw, sink), p["timeout"])
                    starts.append(response.sent_ns)
                    ends.append(response.end_ns)
                    first_bytes.append(response.first_byte_ns - response.sent_ns)
                    result["streams"] += 1
                    result["events"] += sink.events
                    result["bytes"] += response.body_bytes
                    if response.status != 200 or sink.events != expected:
                        result["short"] += 1
                    if time.monotonic() >= p["until"] or connection.closed:
                        return
            finally:
                connection.close()

        cpu = _cpu_seconds()
        ramp = p.get("ramp", 0.0)
        outcomes = await asyncio.gather(
            *(slot(random.uniform(0, ramp)) for _ in range(p["streams"])),
            return_exceptions=True,
        )
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        result["errors"] = len(failures)
        result["error_kinds"] = dict(
            Counter(f"{type(failure).__name__}: {failure}"[:120] for failure in failures)
        )
        result["cpu_s"] = _cpu_seconds() - cpu
        result["first_ns"] = min(starts, default=0)
        result["last_ns"] = max(ends, default=0)
        result["latencies"] = latencies.tobytes() if latencies is not None else b""
        result["first_bytes"] = first_bytes.tobytes()
        return result

    async def burst(self, p: dict[str, Any]) -> dict[str, Any]:
        """Every request at once, each on a connection of its own opened beforehand (many
        clients coming back together); rows as `sequence` gives them."""
        port = p["port"]
        connections = [await HttpConnection.open(port) for _ in p["requests"]]
        try:
            started = time.monotonic_ns()
            responses = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        connection.request(build_request(port, method, path, body), EventSink())
                        for connection, (method, path, body) in zip(
                            connections, p["requests"], strict=True
                        )
                    )
                ),
                p["timeout"],
            )
        finally:
            for connection in connections:
                connection.close()
        rows = [
            (
                r.status,
                r.first_byte_ns - r.sent_ns,
                r.end_ns - r.sent_ns,
                r.body_bytes,
                r.headers.get(SESSION_HEADER, ""),
            )
            for r in responses
        ]
        return {"rows": rows, "started_ns": started}

    async def sequence(self, p: dict[str, Any]) -> dict[str, Any]:
        """Requests one after another; with `reconnect`, each on a new connection, and the
        connect is part of its time (a client coming back after a drop)."""
        port = p["port"]
        rows: list[tuple[int, int, int, int, str]] = []
        connection: HttpConnection | None = None
        cpu = _cpu_seconds()
        try:
            for method, path, body in p["requests"]:
                started = time.monotonic_ns()
                if connection is None or p["reconnect"] or connection.closed:
                    if connection is not None:
                        connection.close()
                    connection = await HttpConnection.open(port)
                raw = build_request(port, method, path, body)
                response = await asyncio.wait_for(
                    connection.request(raw, EventSink()), p["timeout"]
                )
                if not p["reconnect"]:
                    started = response.sent_ns
                rows.append(
                    (
                        response.status,
                        response.first_byte_ns - started,
                        response.end_ns - started,
                        response.body_bytes,
                        response.headers.get(SESSION_HEADER, ""),
                    )
                )
        finally:
            if connection is not None:
                connection.close()
        return {"rows": rows, "cpu_s": _cpu_seconds() - cpu}

    async def hold(self, p: dict[str, Any]) -> dict[str, Any]:
        """Open one request per entry and keep it open; returns once each has its headers
        (and, with `first_byte`, its first body bytes), with the session ids."""
        port = p["port"]

        async def one(method: str, path: str, body: bytes) -> str:
            connection = await HttpConnection.open(port)
            self._held.append(connection)
            done = connection.request(build_request(port, method, path, body), EventSink())
            self._held_tasks.append(done)
            while not connection._response.status or (
                p["first_byte"] and not connection._response.first_byte_ns
            ):
                if done.done():
                    break
                await asyncio.sleep(0.01)
            return connection._response.headers.get(SESSION_HEADER, "")

        async with asyncio.timeout(p["timeout"]):
            ids = await asyncio.gather(*(one(*request) for request in p["requests"]))
        return {"session_ids": ids}

    async def release(self, p: dict[str, Any]) -> dict[str, Any]:
        for connection in self._held:
            connection.close()
        for done in self._held_tasks:
            if not done.done():
                done.cancel()
        self._held.clear()
        self._held_tasks.clear()
        return {}


async def _serve(pipe: multiprocessing.connection.Connection) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker()
    commands: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()

    def readable() -> None:
        os.set_blocking(fd, True)  # the loop made it non-blocking; a message is read whole
        try:
            commands.put_nowait(pipe.recv())
        except EOFError:
            loop.remove_reader(fd)
            commands.put_nowait(None)

    fd = pipe.fileno()
    loop.add_reader(fd, readable)
    while (command := await commands.get()) is not None:
        name, params = command
        try:
            result = await getattr(worker, name)(params)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.set_blocking(fd, True)  # results can exceed the pipe's buffer
        pipe.send(result)
    await worker.release({})


def _worker_main(pipe: multiprocessing.connection.Connection) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(pipe))
    else:
        uvloop.run(_serve(pipe))


class Generator:
    """The parent's handle on the worker processes; one command at a time, all workers."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("fork")
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for _ in range(workers):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_worker_main, args=(child_end,), daemon=True)
            process.start()
            child_end.close()
            self._pipes.append(parent_end)
            self._processes.append(process)

    @property
    def size(self) -> int:
        return len(self._pipes)

    def run(self, name: str, params: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        """Send each worker its params (fewer params: fewer workers busy); wait for all."""
        busy = self._pipes[: len(params)]
        for pipe, p in zip(busy, params, strict=True):
            pipe.send((name, p))
        results = []
        deadline = time.monotonic() + timeout
        for pipe in busy:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"load generator command {name} took over {timeout:.0f}s")
            result = pipe.recv()
            if "error" in result:
                raise RuntimeError(f"load generator {name}: {result['error']}")
            results.append(result)
        return results

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.close()
        for process in self._processes:
            process.join(3)
            if process.is_alive():
                process.kill()
                process.join(3)


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal non-zero shares (fewer parts when total is small)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
