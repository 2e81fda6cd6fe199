"""How the Redis store reaches Redis, one server or a Cluster: clients, routing, retries.

Three kinds of connection, each named `rp:<replica>:<role>` in Redis's CLIENT LIST so that
an operator sees who does what: redis-py clients for everything but the hot path (`main`,
and `control` for the control stream's blocking read); one hand-packed write connection per
primary (`wire.py`, `write`), which carries the appends; and a pool of `follow` connections
per primary for the XREAD BLOCKs of followed sessions (a connection blocks while it waits).

A failure of Redis is a StorageError to the sessions layer. On a Cluster a failure that a
failover explains is retried, with the topology read again, for up to FAILOVER_WINDOW
seconds, so readers and writers wait out a primary's failover instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from itertools import chain
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from proxy.storage.base import StorageError
from proxy.storage.redis.wire import Address, WireConnection

log = logging.getLogger("proxy.storage.redis")

FAILOVER_WINDOW = 30.0  # Cluster: how long a call is retried while a primary fails over
FOLLOW_POOL = 1024  # idle follow connections kept per primary (a socket each)
MAX_CONCURRENT_CALLS = 64  # below redis-py's pool size (100), so calls wait, never fail
# Everything the redis-py clients raise that means Redis (not our request) failed.
FAILURES = (RedisError, RedisClusterException, OSError)
_TRANSIENT = (  # what a Cluster failover looks like to a client, retried on a Cluster
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    ClusterError,
    TryAgainError,
    AskError,
    MasterDownError,
    ReadOnlyError,
    SlotNotCoveredError,
    OSError,
)

Client = Redis | RedisCluster


def redacted(url: str) -> str:
    """The URL without its password, fit for an error line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class Connections:
    """Every connection one store holds to Redis, and which primary serves which key."""

    def __init__(self, url: str, cluster: bool, replica_id: str, socket_timeout: float) -> None:
        self.url = url
        self.cluster = cluster
        self.socket_timeout = socket_timeout
        self._replica_id = replica_id
        self._main: Client | None = None
        self.control: Client | None = None  # the control stream's XREAD BLOCK
        self.writers: dict[str, WireConnection] = {}  # primary name -> its write connection
        self._follow_pool: dict[str, list[WireConnection]] = {}  # idle XREAD connections
        self._follow_name = f"rp:{replica_id}:follow"
        # Calls waiting for a pooled connection queue here instead of failing: redis-py
        # raises "Too many connections" past its pool's size (100, per node on a Cluster),
        # which a burst of readers catching up from Redis (1,000 streams on a saturated
        # proxy) reached, ending their streams with a storage error.
        self._calls = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        # Set at close: loops end and calls stop retrying (redis-py can swallow a
        # cancellation that lands inside a command, so the loops watch this too).
        self.closing = False

    def client(self) -> Client:
        if self._main is None:
            raise StorageError("the redis store is not started")
        return self._main

    @property
    def started(self) -> bool:
        return self._main is not None

    def _connect(self, role: str, socket_timeout: float | None) -> Any:
        common: dict[str, Any] = {
            "socket_connect_timeout": self.socket_timeout,
            "socket_timeout": socket_timeout,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            "client_name": f"rp:{self._replica_id}:{role}",
        }
        if self.cluster:
            return RedisCluster.from_url(self.url, **common)
        return Redis.from_url(self.url, health_check_interval=10, **common)

    async def open(self) -> None:
        """Connect, check that `storage.redis_cluster` matches what the URL names, and open
        the write connections; Redis's own errors propagate (the caller words them)."""
        self._main = self._connect("main", self.socket_timeout)
        self.control = self._connect("control", None)
        await self._check_mode()
        await self.refresh_writers()

    async def _check_mode(self) -> None:
        """One clear line when `storage.redis_cluster` does not match what the URL names."""
        client = self.client()
        if isinstance(client, RedisCluster):
            await client.initialize()
            return
        try:
            info = await client.info("cluster")
        except ResponseError:  # INFO renamed or refused (some managed services): cannot tell
            return
        if info.get("cluster_enabled"):
            raise StorageError(
                f"{redacted(self.url)} is a Redis Cluster node: set storage.redis_cluster: true"
            )

    async def close(self) -> None:
        for wire in [*self.writers.values(), *chain.from_iterable(self._follow_pool.values())]:
            wire.close()
        self._follow_pool = {}
        clients: list[Any] = [self._main, self.control]
        for client in clients:
            if client is not None:
                with contextlib.suppress(*FAILURES):
                    await client.aclose()
        self._main = self.control = None
        self.writers = {}

    async def used_memory(self) -> int:
        """Bytes Redis reports using (`INFO memory`), summed over a Cluster's primaries; 0
        when Redis refuses INFO (some managed services do)."""
        client = self.client()
        try:
            if isinstance(client, RedisCluster):
                by_node = await client.info("memory", target_nodes=RedisCluster.PRIMARIES)
                return sum(int(info.get("used_memory", 0)) for info in by_node.values())
            return int((await client.info("memory")).get("used_memory", 0))
        except ResponseError:
            return 0

    # --- routing: which primary serves a key -----------------------------------------------

    def primary_of(self, key: str) -> str:
        """The name of the primary serving `key` ("" on one Redis)."""
        client = self.client()
        if not isinstance(client, RedisCluster):
            return ""
        return str(client.nodes_manager.get_node_from_slot(key_slot(key.encode())).name)

    def address_of(self, key: str) -> tuple[str, Address]:
        """The primary serving `key`: its name ("" on one Redis) and how to reach it."""
        client = self.client()
        if not isinstance(client, RedisCluster):
            return "", Address.from_url(self.url)
        node = client.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        return str(node.name), Address.from_url(self.url, node.host, int(node.port))

    async def refresh_writers(self, reread: bool = False) -> None:
        """A write connection per primary; after a failover, read the topology again."""
        client = self.client()
        name = f"rp:{self._replica_id}:write"
        if not isinstance(client, RedisCluster):
            if "" not in self.writers:
                address = Address.from_url(self.url)
                self.writers[""] = WireConnection(address, name, self.socket_timeout)
            return
        if reread:
            await client.nodes_manager.initialize()
        primaries = {node.name: node for node in client.get_primaries()}
        for gone in [node for node in self.writers if node not in primaries]:
            self.writers.pop(gone).close()
        for node_name, node in primaries.items():
            if node_name not in self.writers:
                address = Address.from_url(self.url, node.host, int(node.port))
                self.writers[node_name] = WireConnection(address, name, self.socket_timeout)

    async def reroute(self) -> None:
        """After a Cluster write or read failed: the topology again, if Redis answers."""
        if self.cluster:
            with contextlib.suppress(*FAILURES):
                await self.refresh_writers(reread=True)

    def follow_connection(self, node: str, address: Address) -> WireConnection:
        """An idle follow connection to `node`, or a new one; give it back when done."""
        pool = self._follow_pool.setdefault(node, [])
        if pool:
            return pool.pop()
        return WireConnection(address, self._follow_name, self.socket_timeout)

    def give_back(self, node: str, wire: WireConnection) -> None:
        pool = self._follow_pool.setdefault(node, [])
        if len(pool) < FOLLOW_POOL:
            pool.append(wire)
        else:
            wire.close()

    # --- calls -----------------------------------------------------------------------------

    def may_retry(self, deadline: float) -> bool:
        """On a Cluster any failed call may be a failover (a primary down, a slot moved, the
        cluster briefly down): worth another try on the topology read again."""
        return self.cluster and not self.closing and time.monotonic() < deadline

    async def call(self, command: Callable[[Client], Awaitable[Any]]) -> Any:
        """One Redis call; its failure is a StorageError to the sessions layer, retried on a
        Cluster for up to FAILOVER_WINDOW seconds when a failover explains it."""
        deadline = time.monotonic() + FAILOVER_WINDOW
        backoff = 0.05
        while True:
            try:
                async with self._calls:
                    return await command(self.client())
            except _TRANSIENT as exc:
                if not self.may_retry(deadline):
                    raise StorageError(f"redis: {exc}") from None
                log.debug("redis call retried: %s", exc)
            except FAILURES as exc:
                raise StorageError(f"redis: {exc}") from None
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 2)

    async def pipeline(self, build: Callable[[Any], object]) -> list[Any]:
        """`call` for a pipeline (a new one each try): `build` queues its commands."""

        async def run(client: Client) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            build(pipe)
            return await pipe.execute()

        result: list[Any] = await self.call(run)
        return result
