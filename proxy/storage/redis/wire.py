"""A lean pipelined Redis connection for the Redis store's write path.

Every loop turn that logged events sends one pipeline to each primary. Through redis-py that
costs about 150 µs of CPU per pipeline on the reference machine (a Pipeline object, command
packing in Python, a task-switching reader), which at one event per turn is more than the
proxy spends on everything else an event needs; packing the few commands here by hand and
parsing the replies with hiredis inside `data_received` costs about 30 µs. Everything else
(reads, followers, heartbeats, the Cluster topology) keeps using redis-py.

Commands are pipelined: `send` writes at once and returns a future of the replies, in order.
A reply that is an error comes back as a `hiredis.ReplyError` in the list, not raised. A lost
connection fails every pending future with ConnectionError; the next `send` reconnects.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import hiredis

Arg = bytes | str | int
ReplyError = hiredis.ReplyError


def pack(command: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, int):
            value = b"%d" % arg
        elif isinstance(arg, str):
            value = arg.encode()
        else:
            value = arg
        parts += (b"$%d\r\n" % len(value), value, b"\r\n")
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Address:
    """Where a primary is and how to log in: taken from `storage.redis_url`."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: bool = False

    @classmethod
    def from_url(cls, url: str, host: str | None = None, port: int | None = None) -> Address:
        parts = urlsplit(url)
        path = parts.path.strip("/")
        return cls(
            host=host or parts.hostname or "127.0.0.1",
            port=port or parts.port or 6379,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            db=int(path) if path.isdigit() else 0,
            tls=parts.scheme == "rediss",
        )


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._pending: deque[tuple[int, list[object], asyncio.Future[list[object]]]] = deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        pending = self._pending
        while pending:
            reply = self._reader.gets()
            if reply is False:
                return
            count, replies, future = pending[0]
            replies.append(reply)
            if len(replies) == count:
                pending.popleft()
                if not future.done():
                    future.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = ConnectionError(f"redis connection lost: {exc or 'closed by the server'}")
        while self._pending:
            _, _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, commands: Sequence[Sequence[Arg]]) -> asyncio.Future[list[object]]:
        assert self.transport is not None
        future: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()
        self._pending.append((len(commands), [], future))
        self.transport.write(b"".join(pack(command) for command in commands))
        return future


class WireConnection:
    """One connection to one Redis server, (re)opened on demand."""

    def __init__(self, address: Address, name: str, timeout: float) -> None:
        self.address = address
        self._name = name
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Task[_Protocol] | None = None

    async def _open(self) -> _Protocol:
        address = self.address
        context = ssl.create_default_context() if address.tls else None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            transport, protocol = await loop.create_connection(
                _Protocol, address.host, address.port, ssl=context
            )
            protocol.transport = transport  # uvloop calls connection_made a turn later
            hello: list[list[Arg]] = []
            if address.password is not None:
                login = [address.username, address.password] if address.username else []
                hello.append(["AUTH", *(login or [address.password])])
            if address.db:
                hello.append(["SELECT", address.db])
            # Last, and allowed to fail: a name only helps operators read CLIENT LIST.
            hello.append(["CLIENT", "SETNAME", self._name])
            for reply in (await protocol.send(hello))[:-1]:
                if isinstance(reply, ReplyError):
                    assert protocol.transport is not None
                    protocol.transport.close()
                    raise ConnectionError(f"redis refused the connection: {reply}")
        return protocol

    async def send(
        self, commands: Sequence[Sequence[Arg]], timeout: float | None = None
    ) -> list[object]:
        """The replies to `commands`, sent as one pipeline; ConnectionError or TimeoutError
        when the connection fails or `timeout` (default: the connection's) passes (then it
        is closed, and the next call opens a new one)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            if self._opening is None:
                self._opening = asyncio.ensure_future(self._open())
            try:
                protocol = self._protocol = await asyncio.shield(self._opening)
            finally:
                if self._opening is not None and self._opening.done():
                    self._opening = None
        try:
            async with asyncio.timeout(timeout or self._timeout):
                return await protocol.send(commands)
        except TimeoutError:
            self.close()  # replies may still come: the next send must not take them
            raise

    def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
