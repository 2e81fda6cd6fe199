"""Child servers of a benchmark run: start, wait for the port, read CPU and RSS, always stop.

Every process started here is registered for an `atexit` stop as well as the caller's
`finally`, so a run that fails half-way leaves nothing listening.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
_running: list[Server] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pid_tree(pid: int) -> list[int]:
    """The pid and its descendants (nginx's worker is a child of its master)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                pids.extend(_pid_tree(int(child)))
    return pids


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of the process and its children still running."""
    total = 0
    for each in _pid_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """A child process serving on 127.0.0.1:`port`, output to `log_path`."""

    def __init__(
        self, name: str, args: list[str], port: int, log_path: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        _running.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within {timeout:.0f}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal, wait, then SIGKILL: never leaves the child behind."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self in _running:
            _running.remove(self)


def redis_missing() -> str | None:
    """Why the proxy-redis columns cannot run, or None when they can.

    They need Debian's `redis-server` and the `redis` and `hiredis` packages in this
    interpreter, which is also the one that runs the proxy (`serve` with `storage.backend:
    redis` exits at start-up without them).
    """
    if not Path(REDIS_SERVER).exists():
        return "redis-server not found"
    for package in ("redis", "hiredis"):
        if importlib.util.find_spec(package) is None:
            return f"the {package} package is not installed (pip install 'resumable-proxy[redis]')"
    return None


def start_redis(work_dir: Path, name: str = "redis-server", *extra: str) -> Server:
    """A `redis-server` on a free loopback port, no persistence, its files in `work_dir`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work_dir)]
    args += ["--save", "", "--appendonly", "no", "--daemonize", "no", *extra]
    return Server(name, args, port, work_dir / "redis.log", {}).wait_ready()


def start_redis_cluster(work_dir: Path, primaries: int = 3) -> list[Server]:
    """A Redis Cluster of `primaries` nodes (no replicas: the column measures the routing,
    not replication), made with `redis-cli --cluster create`, ready when every node says ok."""
    nodes = [
        start_redis(
            work_dir / f"node{n}",
            f"redis-cluster-{n}",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(work_dir / f"node{n}" / "nodes.conf"),
            "--cluster-port",
            str(free_port()),
        )
        for n in range(primaries)
    ]
    addresses = [f"127.0.0.1:{node.port}" for node in nodes]
    create = [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0"]
    subprocess.run([*create, "--cluster-yes"], check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    for node in nodes:
        while True:
            info = subprocess.run(
                [REDIS_CLI, "-p", str(node.port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            if "cluster_state:ok" in info:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster node {node.port} not ok: {info}")
            time.sleep(0.1)
    return nodes


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop(signal.SIGKILL, timeout=5)
