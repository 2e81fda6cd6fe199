"""A real `redis-server` for tests: loopback only, a free port, a temp dir, no persistence.

Tests that need Redis start one of these instead of mocking it; `restart()` brings a fresh,
empty server up on the same port (what a Redis restart without persistence looks like).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .helpers import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_available() -> bool:
    """Whether redis-server is here. Under CI (`CI` set, where `.ci/run` installs it) a
    missing one is an error, so these tests can never pass by skipping there."""
    if Path(REDIS_SERVER).exists():
        return True
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must install redis-server ({REDIS_SERVER} is missing)")
    return False


@dataclass
class RedisServer:
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited at start-up:\n{log}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING in {timeout}s")

    def command(self, line: bytes) -> bytes:
        """One inline command, its first reply line (enough for PING and FLUSHALL)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(line + b"\r\n")
            return sock.recv(256)

    def ping(self) -> bool:
        with contextlib.suppress(OSError):
            return self.command(b"PING").startswith(b"+PONG")
        return False

    def flushall(self) -> None:
        assert self.command(b"FLUSHALL").startswith(b"+OK")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go; waits so the port is free again."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()
