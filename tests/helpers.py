"""Real parts for tests: free ports, the proxy in-process or as a process, a scripted upstream.

Nothing here mocks a component of the proxy: the proxy runs exactly as `serve` builds it, on
real TCP on 127.0.0.1, and the scripted upstream is a real HTTP server the tests control.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp
import httpx
import pytest
import yaml
from aiohttp import web

from proxy.app import build_app
from proxy.config import Config, load_config
from proxy.server import ProxySite
from proxy.sse import SSEFramer

T = TypeVar("T")
POLL_SECONDS = 0.05


def missing_tool(reason: str) -> NoReturn:
    """Skip a test whose tool (redis-server, node, strace, a tmpfs mount...) this machine
    lacks; under CI (`CI` set: `.ci/run` installs every one, as root) fail it instead, so
    no test passes there by skipping."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run must provide it")
    pytest.skip(reason)


def eventually(condition: Callable[[], T], seconds: float, what: str) -> T:
    """Poll `condition` until it gives something truthy, and return that. `seconds` only
    stops a hang (an AssertionError naming `what`): tests assert what happens, not how fast."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not so after {seconds:g} s")
        time.sleep(POLL_SECONDS)
    return value


async def aeventually(condition: Callable[[], Awaitable[T]], seconds: float, what: str) -> T:
    """`eventually` for a condition that is awaited, without blocking the loop."""
    deadline = time.monotonic() + seconds
    while not (value := await condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not so after {seconds:g} s")
        await asyncio.sleep(POLL_SECONDS)
    return value


ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "sse"  # kept in the repo: the shared fixtures, copied


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config(data_dir: Path, upstream: str = "mock", **overrides: Any) -> Config:
    """A Config as the CLI would build it; overrides are dotted keys, e.g. session.keepalive."""
    values = {"storage.dir": str(data_dir), "upstream.url": upstream, "server.port": 0}
    values.update(overrides)
    return load_config(None, values, environ={})


def config_file(path: Path, overrides: Mapping[str, Any]) -> Path:
    """`overrides` (dotted keys, as `make_config` takes them) written as the YAML file that
    `serve --config` reads, for tests that run the proxy as a process."""
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    path.write_text(yaml.safe_dump(tree))
    return path


@dataclass
class RunningProxy:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        await self.runner.cleanup()


@contextlib.asynccontextmanager
async def run_proxy(config: Config) -> AsyncIterator[RunningProxy]:
    """The real app on a real port in this event loop (fast to start, easy to inspect)."""
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.server.shutdown_grace)
    await runner.setup()
    site = ProxySite(runner, "127.0.0.1", 0, max_connections=config.server.max_connections)
    await site.start()
    proxy = RunningProxy(f"http://127.0.0.1:{site.port}", app, runner)
    try:
        yield proxy
    finally:
        await runner.cleanup()


@dataclass
class ProxyProcess:
    """`resumable-proxy serve` as a real child process, for kill -9 and signal tests."""

    data_dir: Path
    upstream: str = "mock"
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    command_prefix: list[str] = field(default_factory=list)  # e.g. strace and its options
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        args = [
            *self.command_prefix,
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--data-dir",
            str(self.data_dir),
            "--upstream",
            self.upstream,
            *self.extra_args,
        ]
        self.log_path = self.data_dir.parent / f"proxy-{self.port}.log"
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            cwd=ROOT,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited at start-up:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"proxy did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


Step = bytes | float | Callable[[], Any]


@dataclass
class ScriptedUpstream:
    """An upstream whose answer is a script: bytes are written, floats are pauses (seconds),
    `CUT` drops the connection, and callables run (e.g. to set an asyncio.Event).

    `calls` counts requests; `requests` keeps each request's method, path, headers and body.
    """

    script: list[Step] = field(default_factory=list)
    status: int = 200
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)
    head_delay: float = 0.0  # seconds before the response headers (an upstream thinking)
    calls: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    hung_up: int = 0  # answers the client (the proxy) broke off before the script's end
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> ScriptedUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        self.requests.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "body": await request.read(),
            }
        )
        if self.head_delay:
            await asyncio.sleep(self.head_delay)
        response = web.StreamResponse(status=self.status)
        response.content_type = self.content_type
        for name, value in self.headers.items():
            response.headers[name] = value
        try:
            await response.prepare(request)
            for step in self.script:
                if step is CUT:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if isinstance(step, bytes):
                    await response.write(step)
                elif isinstance(step, float | int):
                    await asyncio.sleep(step)
                else:
                    result = step()
                    if asyncio.iscoroutine(result):
                        await result
            await response.write_eof()
        except ConnectionResetError:
            self.hung_up += 1
        return response


CUT: Any = object()


async def read_sse(
    session: aiohttp.ClientSession, url: str, *, method: str = "GET", **kwargs: Any
) -> tuple[aiohttp.ClientResponse, bytes]:
    """The whole body of a (finite) stream, with a hard time bound."""
    async with asyncio.timeout(30):
        async with session.request(method, url, **kwargs) as response:
            return response, await response.read()


def mock_stream_body(tokens: int, interval_ms: float) -> dict[str, object]:
    """A chat request the built-in mock answers with `tokens` deltas `interval_ms` apart."""
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "a long answer"}],
        "stream": True,
        "mock_tokens": tokens,
        "mock_interval_ms": interval_ms,
    }


def chat_stream(
    proxy_url: str,
    tokens: int,
    interval_ms: float,
    headers: Mapping[str, str],
    timeout: float = 30.0,
) -> AbstractContextManager[httpx.Response]:
    """`with chat_stream(...) as response:` the built-in mock's answer of `tokens` deltas
    `interval_ms` apart, streamed on a connection of its own (a new one each time, so behind
    one port the kernel may give it to any worker)."""
    return httpx.stream(
        "POST",
        proxy_url + "/v1/chat/completions",
        json=mock_stream_body(tokens, interval_ms),
        headers=dict(headers),
        timeout=timeout,
    )


def event_ids(body: bytes) -> list[int]:
    return [int(line[4:]) for line in body.split(b"\n") if line.startswith(b"id: ")]


class ThreadedProxy:
    """The real app in its own event loop on a background thread, so synchronous clients
    (the sync openai SDK, httpx) can drive it from the test's thread exactly as users do."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._context: Any = None
        self.proxy: RunningProxy | None = None

    def __enter__(self) -> ThreadedProxy:
        self._thread.start()
        self._context = run_proxy(self.config)
        self.proxy = self.call(self._context.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self._context.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def call(self, coroutine: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the proxy's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def url(self) -> str:
        assert self.proxy is not None
        return self.proxy.url

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def port(self) -> int:
        assert self.proxy is not None
        return self.proxy.port

    @property
    def upstream_url(self) -> str:
        from proxy.app import API

        assert self.proxy is not None
        return self.proxy.app[API].upstream_url


def read_events(chunks: Iterable[bytes], count: int) -> bytes:
    """Bytes as the client got them, until at least `count` whole events arrived."""
    seen = b""
    for chunk in chunks:
        seen += chunk
        if seen.count(b"\n\n") >= count:
            break
    return seen


async def aread_events(response: aiohttp.ClientResponse, count: int) -> bytes:
    """`read_events` for an aiohttp response; a stream that ends short of `count` fails."""
    seen = b""
    while seen.count(b"\n\n") < count:
        chunk = await response.content.readany()
        assert chunk, f"the stream ended before {count} events: {seen!r}"
        seen += chunk
    return seen


def whole_events(seen: bytes) -> bytes:
    """`seen` up to the end of its last whole event (a cut read ends mid-event)."""
    return seen[: seen.rindex(b"\n\n") + 2]


def split_whole_events(body: bytes) -> list[bytes]:
    """The whole events of `body`, each with its blank line; a torn last one is left out."""
    return [event + b"\n\n" for event in body.split(b"\n\n")[:-1]]


def frame(chunks: list[bytes], **options: object) -> tuple[bytes, list[int], bool]:
    """Feed chunks to one SSEFramer; return all rendered bytes, absolute event ends, and
    whether the stream ended clean."""
    framer = SSEFramer(**options)  # type: ignore[arg-type]
    out = bytearray()
    ends: list[int] = []
    for chunk in [*chunks, None]:
        if chunk is None:
            data, rel, clean = framer.finish()
        else:
            data, rel = framer.feed(chunk)
        ends.extend(len(out) + end for end in rel)
        out += data
    return bytes(out), ends, clean


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at each of `cuts` (taken modulo its length + 1), as reads would bring it."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body (RFC 9112 §7.1) as the bytes it carries, up to its last
    chunk; for answers read off a raw socket."""
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)
