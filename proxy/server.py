"""Running the proxy: the loop, the workers, the listening socket, the connection cap, the fd
limit, and the one line a start-up failure prints (the CLI only maps flags to a Config).

aiohttp's `run_app` gives no hook between the listening socket and its connections, and the
contract caps open client connections at `server.max_connections`: past it, new connections
get a `503` at once, logged once per burst, instead of taking the file descriptors that
upstream connections and the log need (near the fd limit those fail first, as `502`s with no
log line). So the proxy starts its site itself, with the same signal handling and shutdown
order as `run_app`: SIGTERM/SIGINT stop the listener, then the app's shutdown (the grace for
live streams) and cleanup run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import sys
from collections.abc import Callable

from aiohttp import web

from .app import build_app
from .config import Config
from .errors import TooManyConnections
from .eventloop import new_event_loop
from .logs import setup_logging
from .storage.base import StorageError
from .workers import supervise

log = logging.getLogger("proxy.server")

BACKLOG = 4096  # aiohttp's 128 drops SYNs when a burst of clients (a reconnect storm) arrives
_REFUSAL_LINGER = 2.0  # seconds a refused connection is kept open to read its request head


def _refusal() -> bytes:
    error = TooManyConnections("too many open connections (server.max_connections); retry")
    body = json.dumps(error.body()).encode()
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    return head + body


_REFUSAL = _refusal()


class _Refused(asyncio.Protocol):
    """A connection past the cap: answer 503 and close once the client's request head is in
    (closing with unread bytes would reset the connection and lose the answer)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(_REFUSAL)
        asyncio.get_running_loop().call_later(_REFUSAL_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        self._head = (self._head + data)[-4:]
        if b"\r\n\r\n" in self._head and self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # close our side too


class ConnectionCap:
    """The protocol factory of the listening socket: aiohttp's, up to `limit` connections.

    Counting is exact without reaching into aiohttp: `created` grows by one per accepted
    connection, and only when it would pass the limit is it re-read from the server's list
    of open connections (a copy, O(n)), so below the limit an accept costs nothing extra.
    """

    def __init__(self, server: web.Server, limit: int) -> None:
        self._server = server
        self._limit = limit
        self._open = 0  # connections open at the last count, plus those accepted since
        self._refused = 0  # in the current burst

    def __call__(self) -> asyncio.BaseProtocol:
        if self._open >= self._limit:
            self._open = len(self._server.connections)
        if self._open >= self._limit:
            if not self._refused:
                log.warning(
                    "server.max_connections (%d) reached: new connections get 503", self._limit
                )
            self._refused += 1
            return _Refused()
        if self._refused:
            log.warning("accepting connections again; %d were refused", self._refused)
            self._refused = 0
        self._open += 1
        return self._server()


class ProxySite(web.BaseSite):
    """A TCP site like aiohttp's `TCPSite`, with `ConnectionCap` in front of its server."""

    __slots__ = ("_host", "_limit", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        backlog: int = BACKLOG,
        reuse_port: bool | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._limit = max_connections
        self._reuse_port = reuse_port

    @property
    def port(self) -> int:
        """The bound port (the asked one until started; useful with port 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            ConnectionCap(server, self._limit),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; returns the limit now in force.

    Each stream holds two sockets (client and upstream), so a default soft limit of 1024
    caps the proxy near 500 streams long before `server.max_connections`.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft
    return hard


async def _serve(
    app: web.Application, config: Config, announce: Callable[[], None], reuse_port: bool
) -> None:
    server = config.server
    runner = web.AppRunner(
        app, access_log=None, handle_signals=True, shutdown_timeout=server.shutdown_grace + 5
    )
    await runner.setup()
    try:
        site = ProxySite(
            runner,
            server.host,
            server.port,
            max_connections=server.max_connections,
            reuse_port=reuse_port or None,
        )
        await site.start()
        announce()
        await asyncio.Event().wait()  # until SIGTERM/SIGINT (GracefulExit) cancels us
    finally:
        await runner.cleanup()


def serve(config: Config) -> int:
    """Run the proxy (one process, or `server.workers` of them on one port) until SIGTERM or
    SIGINT; the process exit code. Prints the banner once listening, or the one line that
    says why it could not start (exit 2)."""
    setup_logging(config.server.log_level, config.server.log_format)
    listening = f"http://{config.server.host}:{config.server.port}"
    upstream = "built-in mock upstream" if config.upstream.is_mock else config.upstream.url
    banner = f"resumable-proxy listening on {listening} -> {upstream}"
    count = config.server.workers
    if count == 1:
        return _serve_one(config, lambda: _say(banner))

    def worker(ready: Callable[[], None]) -> int:
        return _serve_one(config, ready, reuse_port=True)

    return supervise(count, worker, lambda: _say(f"{banner} ({count} workers)"))


def _serve_one(config: Config, ready: Callable[[], None], reuse_port: bool = False) -> int:
    try:
        run(build_app(config), config, announce=ready, reuse_port=reuse_port)
    except StorageError as exc:
        _say(f"error: storage: {exc}")
        return 2
    except OSError as exc:
        _say(f"error: cannot listen on {config.server.host}:{config.server.port}: {exc.strerror}")
        return 2
    return 0


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run(
    app: web.Application, config: Config, announce: Callable[[], None], reuse_port: bool = False
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down in order (what `web.run_app` does).
    `reuse_port`: bind with SO_REUSEPORT, beside the other workers of `server.workers`."""
    limit = raise_fd_limit()
    log.debug("open-file limit %d", limit)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, config, announce, reuse_port))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        main.cancel()  # its `finally` runs the shutdown: grace, then cleanup
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main)
    finally:
        _cancel_rest(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)


def _cancel_rest(loop: asyncio.AbstractEventLoop) -> None:
    rest = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in rest:
        task.cancel()
    if rest:
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
