"""A real `redis-server` for tests: loopback only, a free port, a temp dir, no persistence.

Tests that need Redis start one of these instead of mocking it; `restart()` brings a fresh,
empty server up on the same port (what a Redis restart without persistence looks like).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .helpers import free_port, missing_tool

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def require_redis() -> None:
    """Skip the test where redis-server is not installed; under CI (`CI` set, where
    `.ci/run` installs it) fail it instead, so no Redis test can pass there by skipping."""
    missing = [path for path in (REDIS_SERVER, REDIS_CLI) if not Path(path).exists()]
    if not missing:
        return
    missing_tool(f"redis-server is not installed ({', '.join(missing)} missing)")


@dataclass
class RedisServer:
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def storage(self) -> dict[str, Any]:
        """The config overrides that put the proxy's store on this server."""
        return {"storage.backend": "redis", "storage.redis_url": self.url}

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
            *self.extra_args,
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


@dataclass
class RedisClusterServers:
    """A real Redis Cluster: `masters` primaries, each with one replica, on free loopback
    ports (client and cluster-bus ports alike), built with `redis-cli --cluster create`.

    `failover(key)` promotes the replica of the primary holding `key`, gracefully
    (`CLUSTER FAILOVER`) or by kill -9 of the primary (then the replica takes over once the
    others have seen the primary fail, after `node_timeout_ms`).
    """

    directory: Path
    masters: int = 3
    node_timeout_ms: int = 1000
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A start-up node; the client finds the others itself."""
        return f"redis://127.0.0.1:{self._alive()[0].port}"

    @property
    def storage(self) -> dict[str, Any]:
        """The config overrides that put the proxy's store on this cluster, each write
        waiting for one replica (so a failover loses nothing that was acknowledged)."""
        return {
            "storage.backend": "redis",
            "storage.redis_url": self.url,
            "storage.redis_cluster": True,
            "storage.redis_wait_replicas": 1,
        }

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        for index in range(self.masters * 2):
            node = RedisServer(self.directory / f"node{index}")
            node.extra_args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node.directory / "nodes.conf"),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--cluster-port",
                str(free_port()),
                # Replicas take over even when they lagged (tests kill primaries on purpose).
                "--cluster-replica-validity-factor",
                "0",
            ]
            self.nodes.append(node)
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "1"]
        created = subprocess.run(
            [*create, "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}")
        self.wait_healthy(timeout)
        return self

    def cli(self, node: RedisServer, *args: str) -> str:
        done = subprocess.run(
            [REDIS_CLI, "-p", str(node.port), *args], capture_output=True, text=True, timeout=10
        )
        return done.stdout

    def topology(self) -> list[dict[str, str]]:
        """`CLUSTER NODES` as seen by a live node: id, port, role, master id, flags."""
        alive = self._answering()
        rows = []
        for line in self.cli(alive, "cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) < 8:
                continue
            rows.append(
                {
                    "id": fields[0],
                    "port": fields[1].split("@")[0].rsplit(":", 1)[1],
                    "flags": fields[2],
                    "master": fields[3],
                    "link": fields[7],
                }
            )
        return rows

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says `cluster_state:ok` and every primary has a replica
        that is connected: the shape a failover test needs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states_ok = all(
                "cluster_state:ok" in self.cli(node, "cluster", "info") for node in self._alive()
            )
            rows = self.topology() if states_ok else []
            masters = [r for r in rows if "master" in r["flags"] and "fail" not in r["flags"]]
            replicas = [r for r in rows if "slave" in r["flags"] and "fail" not in r["flags"]]
            shaped = len(masters) == self.masters and len(replicas) >= self.masters
            if states_ok and shaped and all(self._replica_in_sync(r) for r in replicas):
                return
            time.sleep(0.1)
        raise RuntimeError(f"redis cluster not healthy within {timeout}s: {self.topology()}")

    def _replica_in_sync(self, row: dict[str, str]) -> bool:
        node = self.node(int(row["port"]))
        return "master_link_status:up" in self.cli(node, "info", "replication")

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def primary_for(self, key: str) -> RedisServer:
        """The live primary whose slot ranges (in `CLUSTER NODES`) hold `key`'s slot."""
        alive = self._answering()
        slot = int(self.cli(alive, "cluster", "keyslot", key).strip())
        for line in self.cli(alive, "cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) < 9 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if not part.startswith("[") and int(low) <= slot <= int(high or low):
                    return self.node(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        raise RuntimeError(f"no live primary serves slot {slot}")

    def replica_of(self, primary: RedisServer) -> RedisServer:
        rows = self.topology()
        primary_id = next(r["id"] for r in rows if r["port"] == str(primary.port))
        row = next(r for r in rows if r["master"] == primary_id and "fail" not in r["flags"])
        return self.node(int(row["port"]))

    def failover(self, key: str, kill: bool) -> RedisServer:
        """Promote the replica of `key`'s primary; return the new primary."""
        primary = self.primary_for(key)
        replica = self.replica_of(primary)
        if kill:
            primary.kill()
        else:
            assert "OK" in self.cli(replica, "cluster", "failover")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            promoted = "role:master" in self.cli(replica, "info", "replication")
            if promoted and all(self._sees_primary(node, replica) for node in self._alive()):
                return replica
            time.sleep(0.05)
        raise RuntimeError(f"replica {replica.port} was not promoted: {self.topology()}")

    def _alive(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None]

    def _answering(self) -> RedisServer:
        """A live node that answers PING, to ask about the cluster."""
        return next(node for node in self._alive() if node.ping())

    def _sees_primary(self, node: RedisServer, primary: RedisServer) -> bool:
        """Whether `node`'s view of the cluster has `primary` as a primary, and is ok."""
        if "cluster_state:ok" not in self.cli(node, "cluster", "info"):
            return False
        for line in self.cli(node, "cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[1].split("@")[0].endswith(f":{primary.port}"):
                return "master" in fields[2] and "fail" not in fields[2]
        return False

    def flushall(self) -> None:
        for row in self.topology():
            if "master" in row["flags"] and "fail" not in row["flags"]:
                assert "OK" in self.cli(self.node(int(row["port"])), "flushall")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
