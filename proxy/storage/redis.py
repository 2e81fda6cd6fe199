"""`RedisStore`: sessions in Redis Streams, so every replica behind a load balancer (and every
worker of `server.workers`) can resume and follow live any session, whichever process reads
its upstream. One Redis, or a Redis Cluster (`storage.redis_cluster: true`).

Keys. Everything of one session carries the hash tag `{id}`, so on a Cluster it lives in one
slot and every script touches one slot:

- `rp:{id}:events` is a Stream with one entry per logged batch (one upstream read). The entry
  id is `<number of the batch's last event>-0`, so `XRANGE key n +` returns first the batch
  that holds event n: reading from any event is one command, and Redis itself rejects a
  batch that is out of order or repeated (which makes every write safe to retry). Fields:
  `d` the batch bytes, `e` the end offset of each event (uint32 array), `b` the session's
  byte count after it, `t` its arrival time. When the session ends, an entry `<events>-1`
  (no `d`) marks the end; a reader blocked in `XREAD` on another process wakes for it
  exactly as for new events.
- `rp:{id}:meta` is a hash written at create and at end: `meta` (the SessionMeta as JSON),
  `state`, `reason`, `owner` (the process reading the upstream), `events`, `bytes`, `alias`,
  ... While a session streams its event count comes from the stream's last entry, so an append
  costs one `XADD` and nothing else. The create script refuses an id whose hash holds other
  metadata: that is how two processes choosing the same client id at once are arbitrated.

Keys that are not one session's are each one key, read and written by single-key commands
only (never inside a script with a session's keys), so they work on a Cluster wherever they
hash: `rp:sessions` (sorted set, id -> created_ns) lists sessions; `rp:replicas` names every
process that heartbeats; `rp:hb:<replica>` is its heartbeat (a key with a short TTL);
`rp:owned:<replica>` holds the sessions it streams; `rp:ctl:<replica>` is a Stream where
stop requests for its sessions, and answers to its own requests, arrive (a Stream rather
than pub/sub: it behaves the same on one Redis and on a Cluster, and a message sent while
the reader reconnects after a failover waits for it).

- `rp:alias:{<alias>}` holds the id of the session given that alias (`add_alias`). The meta
  hash's `alias` field says which alias the session has, and a key that names a session
  which is gone or has another alias resolves to nothing, so a delete leaves the key to
  expire. It takes the session's expiry when the session ends on the process reading it;
  when another process marks the session `interrupted`, the key keeps its live expiry.
- `rp:token-key` is the capability-token key (hex), set once with `SET NX` by the first
  process that starts, so every process checks every other's tokens. It never expires.

Writing. Appends are queued and written once per loop turn (group commit), one pipeline per
Redis primary on a connection of its own (`wire.py`): an XADD per batch of every session on
that primary, so a turn costs one round trip per primary, not one per event. With
`storage.redis_wait_replicas: N` the pipeline ends with `WAIT N`, so what a client is shown is
on N replicas too and survives the loss of the primary. When Redis has acknowledged a batch,
it is pushed to the caught-up local readers (`follow_live`) and kept in a small in-memory
tail for the others: local readers never read from Redis.

Following from another process: one `XREAD BLOCK` per session and wake-up, shared by all of
that process's readers of the session, returns the new entries themselves; they are kept in
a tail like the owner's, so the readers take them from memory, and the session's state is
known from them (an end marker) without asking Redis again.

Failures. On one Redis, a write Redis refuses or misses makes the session `failed` (in Redis,
once it is back) while local readers go on from memory, and `healthy` is False in between.
On a Cluster, a write that fails because a primary is failing over is retried, with the
topology read again, for up to FAILOVER_WINDOW seconds (local readers wait meanwhile) before
that. A process that stops heartbeating has its streaming sessions marked `interrupted` by
whichever process notices first: on access, or in the sweep every process runs once per
heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
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

from ..config import StorageConfig
from .base import (
    FAILED,
    STREAMING,
    Follower,
    SessionExists,
    SessionInfo,
    SessionMeta,
    SessionMissing,
    StopHandler,
    StorageError,
    check_alias,
    detach_all,
    push_batch,
)
from .wire import Address, Arg, ReplyError, WireConnection

log = logging.getLogger("proxy.storage.redis")

TAIL_BYTES = 64 * 1024  # per live session: what local readers get without asking Redis
ARRIVAL_PAGE = 1024  # batches per XRANGE when collecting arrival times
FOLLOW_COUNT = 256  # entries per XREAD of a follower
FOLLOW_POOL = 1024  # idle follower connections kept per primary (a socket each)
LOST_KEEP = 60.0  # seconds an ended session Redis missed stays readable from memory
LIVE_EXPIRY = 8 * 86400.0  # beyond session.max_duration (at most 7 days): no key lives forever
STOP_ACK_TIMEOUT = 10.0  # how long request_stop waits for the owner to confirm
CONTROL_EXPIRY_MS = 60_000  # a control stream outlives its reader by this much
FAILOVER_WINDOW = 30.0  # Cluster: how long a write is retried while a primary fails over
WAIT_TIMEOUT_MS = 100  # WAIT's bound when a primary has fewer replicas than asked for
REMOTE_IDLE = 30.0  # a followed session nobody waited on for this long leaves memory
INDEX = "rp:sessions"
REPLICAS = "rp:replicas"
TOKEN_KEY = "rp:token-key"
_ENDS = "I"  # uint32 end offsets; a batch is far below 4 GiB
_LOST_REDIS = "redis was unreachable, events from {n} were not stored"
_LOST_KEYS = "redis lost this session's keys (restarted without persistence?)"
_LOST_ID = "another process created session {id} first"
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

# Scripts go by EVAL, not EVALSHA: Redis caches them by digest anyway, and a restarted Redis
# (which forgot every loaded script) needs no NOSCRIPT dance.

# Appends are plain XADDs, pipelined: one round trip per primary per loop turn whatever their
# number, and no script to run per batch (the connection packs commands by hand, so a
# command costs the proxy little, and Redis far less than a Lua call). A batch Redis already
# has (a write retried after a lost connection) is refused as "equal or smaller" than the
# stream's top entry: that refusal is the entry ids doing their job, not an error.
_DUPLICATE = "equal or smaller"

# A new session's hash, unless the id is another session's (1 written, 0 refused). The same
# metadata again is this process's own create repeated (a claim, then the create), not a
# conflict.
_CREATE = """
local existing = redis.call('HGET', KEYS[1], 'meta')
if existing and existing ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'state', 'streaming', 'owner', ARGV[2],
  'events', 0, 'bytes', 0, 'updated_ns', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# The final state and the end marker; repeating it (a retried write) changes nothing.
_END = """
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'reason', ARGV[2], 'events', ARGV[3],
  'bytes', ARGV[4], 'updated_ns', ARGV[5], 'first_event_ns', ARGV[6])
local reply = redis.pcall('XADD', KEYS[2], ARGV[3] .. '-1', 'b', ARGV[4], 't', ARGV[5])
if type(reply) == 'table' and reply.err and not string.find(reply.err, 'equal or smaller') then
  return reply
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return 1
"""

# Events ARGV[1].. of a stream, cut server-side to whole events within ARGV[2] bytes (at least
# one): the reply is the bytes and the count, not the entries, so a replay costs Redis a few
# string copies and costs the proxy nothing per event.
_READ = """
local expected, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
local parts, total, count = {}, 0, 0
local cursor = ARGV[1]
while true do
  local entries = redis.call('XRANGE', KEYS[1], cursor, '+', 'COUNT', 64)
  for _, entry in ipairs(entries) do
    local f, d, e = entry[2], nil, nil
    for j = 1, #f, 2 do
      if f[j] == 'd' then d = f[j + 1] elseif f[j] == 'e' then e = f[j + 1] end
    end
    if d then
      local n = #e / 4
      local first = tonumber(string.match(entry[1], '^%d+')) - n + 1
      if first > expected then return {table.concat(parts), count} end
      local skip = expected - first
      local begin = 0
      if skip > 0 then begin = struct.unpack('<I4', e, 4 * (skip - 1) + 1) end
      local stop, finish = n, #d
      if finish - begin > budget - total then
        stop, finish = skip, begin
        while stop < n do
          local at = struct.unpack('<I4', e, 4 * stop + 1)
          if at - begin > budget - total and count + stop - skip > 0 then break end
          stop, finish = stop + 1, at
        end
      end
      parts[#parts + 1] = string.sub(d, begin + 1, finish)
      total, count, expected = total + finish - begin, count + stop - skip, expected + stop - skip
      if stop < n then return {table.concat(parts), count} end
    end
  end
  if #entries < 64 then return {table.concat(parts), count} end
  cursor = '(' .. entries[#entries][1]
end
"""

# Ends a session whose owner stopped heartbeating (the caller saw its heartbeat gone), if
# nothing changed since: still streaming, same owner. The event count is the stream's, so
# events written just before the owner died are counted even if its metadata lags.
_INTERRUPT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'streaming' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local events, bytes = '0', '0'
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then
  events = string.match(last[1][1], '^%d+')
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'b' then bytes = fields[i + 1] end
  end
end
redis.call('HSET', KEYS[1], 'state', 'interrupted', 'reason', ARGV[2], 'events', events,
  'bytes', bytes, 'updated_ns', ARGV[3])
redis.call('XADD', KEYS[2], events .. '-1', 'b', bytes, 't', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""


def _meta_key(session_id: str) -> str:
    return f"rp:{{{session_id}}}:meta"


def _events_key(session_id: str) -> str:
    return f"rp:{{{session_id}}}:events"


def _alias_key(alias: str) -> str:
    return f"rp:alias:{{{alias}}}"


def _heartbeat_key(replica: str) -> str:
    return f"rp:hb:{replica}"


def _owned_key(replica: str) -> str:
    return f"rp:owned:{replica}"


def _control_key(replica: str) -> str:
    return f"rp:ctl:{replica}"


def _redacted(url: str) -> str:
    """The URL without its password, fit for an error line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _encode_meta(meta: SessionMeta) -> bytes:
    return json.dumps(asdict(meta), separators=(",", ":")).encode()


def _decode_meta(raw: bytes) -> SessionMeta:
    fields = json.loads(raw)
    fields["headers"] = tuple((str(k), str(v)) for k, v in fields["headers"])
    return SessionMeta(**fields)


def _entry_last_event(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def _ends_bytes(ends: Sequence[int]) -> bytes:
    """Event end offsets as little-endian uint32, the layout the Lua scripts unpack."""
    packed = array(_ENDS, ends)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _ends_from(raw: bytes) -> array[int]:
    ends = array(_ENDS)
    ends.frombytes(raw)
    if sys.byteorder == "big":
        ends.byteswap()
    return ends


Batch = tuple[int, bytes, Sequence[int]]  # first event, the events' bytes, their end offsets


def take_events(
    batches: Sequence[Batch], start_event: int, max_bytes: int, last_event: int | None = None
) -> tuple[bytes, int]:
    """Events start_event.. (up to last_event) from consecutive batches: at least one whole
    event if there is one, then whole events up to max_bytes.

    The batch holding start_event is looked for from the newest end: a live reader asks for
    the newest events, so that is one step, however long the tail.
    """
    index = len(batches)
    while index > 0 and batches[index - 1][0] > start_event:
        index -= 1
    if index == 0:
        return b"", 0
    parts: list[bytes] = []
    total = 0
    count = 0
    expected = start_event
    for position in range(index - 1, len(batches)):
        first, data, ends = batches[position]
        if last_event is not None and first > last_event:
            break  # not readable yet
        last = first + len(ends) - 1
        if last < expected:
            continue
        if first > expected:
            break  # never written (a gap would break the no-gap promise, so stop here)
        skip = expected - first
        begin = ends[skip - 1] if skip else 0
        stop = bisect_right(ends, begin + max_bytes - total)
        if stop <= skip:
            if count:
                break
            stop = skip + 1
        end = ends[stop - 1]
        parts.append(data[begin:end] if begin or end != len(data) else data)
        total += end - begin
        count += stop - skip
        expected += stop - skip
        if stop < len(ends):
            break
    return b"".join(parts), count


def _info_from(fields: dict[bytes, bytes], last: list[Any]) -> SessionInfo | None:
    """A SessionInfo from the meta hash and the stream's last entry (absent: None)."""
    raw_meta = fields.get(b"meta")
    if raw_meta is None:
        return None  # expired, deleted, or a partial write after Redis lost the session
    meta = _decode_meta(raw_meta)
    state = fields.get(b"state", b"streaming").decode()
    first_ns = fields.get(b"first_event_ns")
    info = SessionInfo(
        meta=meta,
        state=state,
        reason=fields.get(b"reason", b"").decode(),
        events=int(fields.get(b"events", 0)),
        bytes=int(fields.get(b"bytes", 0)),
        updated_ns=int(fields.get(b"updated_ns", meta.created_ns)),
        first_event_ns=int(first_ns) if first_ns else None,
        storage_error=fields[b"storage_error"].decode() if b"storage_error" in fields else None,
        alias=fields[b"alias"].decode() if b"alias" in fields else None,
    )
    if state == STREAMING and last:
        entry_id, entry = last[0]
        info.events = _entry_last_event(entry_id)
        info.bytes = int(entry[b"b"])
        info.updated_ns = int(entry[b"t"])
    return info


def _add_batch(tail: deque[Batch], size: int, batch: Batch) -> int:
    """Append to a tail and keep about TAIL_BYTES of it (always the newest batch)."""
    tail.append(batch)
    size += len(batch[1])
    while len(tail) > 1 and size > TAIL_BYTES:
        size -= len(tail.popleft()[1])
    return size


@dataclass(slots=True, eq=False)
class _Live:
    """A session whose upstream this process reads: its local view and recent batches."""

    info: SessionInfo
    batches: deque[Batch] = field(default_factory=deque)
    tail_bytes: int = 0
    stored_events: int = 0  # acknowledged by Redis
    stored_bytes: int = 0
    queued_events: int = 0  # number of the last event appended so far
    queued_bytes: int = 0  # bytes of every batch appended so far
    lost: str | None = None  # why Redis stopped receiving this session's writes
    settled: bool = False  # its `failed` end is in Redis
    deleted: bool = False
    alias: str | None = None
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    followers: list[Follower] = field(default_factory=list)  # caught up: events are pushed

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def trim(self) -> None:
        """Keep about TAIL_BYTES of readable batches, and always the newest."""
        readable = self.info.events
        while len(self.batches) > 1 and self.tail_bytes > TAIL_BYTES:
            first, data, ends = self.batches[0]
            if first + len(ends) - 1 > readable:
                break
            self.batches.popleft()
            self.tail_bytes -= len(data)


@dataclass(slots=True, eq=False)
class _Followed:
    """A session another process streams and readers here follow: what the last XREAD
    brought, so those readers take it from memory and one XREAD serves them all."""

    info: SessionInfo
    fetched: float  # monotonic time `info` was read from Redis in full
    cursor: bytes  # id of the newest stream entry seen
    batches: deque[Batch] = field(default_factory=deque)
    tail_bytes: int = 0
    ended: bool = False  # an end marker came: the final state must be read from Redis
    reading: asyncio.Task[None] | None = None
    used: float = 0.0


@dataclass(slots=True)
class _Unit:
    """What one flush writes to one Redis primary (or, `node` None, through the client that
    routes by key: the index and owner sets)."""

    node: str | None
    creates: list[_Live] = field(default_factory=list)
    batches: list[tuple[_Live, int, bytes, Sequence[int], int]] = field(default_factory=list)
    ends: list[tuple[_Live, str, str, int]] = field(default_factory=list)


Client = Redis | RedisCluster


class RedisStore:
    """SessionStore on Redis; see the module docstring for the layout and the timing."""

    def __init__(
        self,
        config: StorageConfig,
        *,
        heartbeat_interval: float = 1.0,
        heartbeat_ttl: float = 5.0,
        socket_timeout: float = 2.0,
    ) -> None:
        if not config.redis_url:
            raise StorageError("storage.redis_url is required for storage.backend redis")
        self._url = config.redis_url
        self._cluster = config.redis_cluster
        self._wait_replicas = config.redis_wait_replicas
        self._ttl_ms = max(1, int(config.retention.ttl * 1000))
        self._live_expiry_ms = int((config.retention.ttl + LIVE_EXPIRY) * 1000)
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_ttl_ms = max(1, int(heartbeat_ttl * 1000))
        self._socket_timeout = socket_timeout
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._redis: Client | None = None
        self._control: Client | None = None  # the control stream's XREAD BLOCK
        self._writers: dict[str, WireConnection] = {}  # primary name -> its write connection
        self._follow_pool: dict[str, list[WireConnection]] = {}  # idle XREAD connections
        self._follow_name = f"rp:{self.replica_id}:follow"
        self._healthy = False
        self._live: dict[str, _Live] = {}
        self._followed: dict[str, _Followed] = {}
        self._creates: list[_Live] = []
        self._batches: list[tuple[_Live, int, bytes, Sequence[int], int]] = []
        self._ends: list[tuple[_Live, str, str, int]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: set[asyncio.Task[None]] = set()  # stop requests being carried out
        self._stop_handler: StopHandler | None = None
        self._acks: dict[str, asyncio.Future[bool]] = {}
        self._alive_until: dict[str, float] = {}  # replica -> monotonic time its beat was seen
        self._short_of_replicas: set[str] = set()  # primaries whose WAIT came back short

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def check_health(self) -> bool:
        """The heartbeat (every second, traffic or not) already re-checks Redis."""
        return self._healthy

    def _client(self) -> Client:
        if self._redis is None:
            raise StorageError("the redis store is not started")
        return self._redis

    # --- lifecycle -------------------------------------------------------------------------

    def _connect(self, role: str, socket_timeout: float | None, url: str | None = None) -> Any:
        """A client (or, `url` given, a one-node client); its connections are named
        `rp:<replica>:<role>` in Redis's CLIENT LIST, so an operator sees who does what."""
        common: dict[str, Any] = {
            "socket_connect_timeout": self._socket_timeout,
            "socket_timeout": socket_timeout,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            "client_name": f"rp:{self.replica_id}:{role}",
        }
        if self._cluster and url is None:
            return RedisCluster.from_url(self._url, **common)
        return Redis.from_url(url or self._url, health_check_interval=10, **common)

    async def start(self) -> None:
        self._redis = self._connect("main", self._socket_timeout)
        self._control = self._connect("control", None)
        try:
            async with asyncio.timeout(self._socket_timeout * 3):
                await self._check_mode()
                await self._refresh_writers()
                await self._beat()
                self._healthy = True
                await self._sweep()
        except StorageError:
            await self._close_clients()
            raise
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            await self._close_clients()
            self._healthy = False
            reason = str(exc) or type(exc).__name__
            raise StorageError(f"cannot reach redis at {_redacted(self._url)}: {reason}") from None
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="redis-heartbeat"),
            asyncio.create_task(self._control_loop(), name="redis-control"),
        ]
        kind = "redis cluster" if self._cluster else "redis"
        log.info("%s store at %s, replica %s", kind, _redacted(self._url), self.replica_id)

    async def _check_mode(self) -> None:
        """One clear line when `storage.redis_cluster` does not match what the URL names."""
        client = self._client()
        if isinstance(client, RedisCluster):
            await client.initialize()
            return
        try:
            info = await client.info("cluster")
        except ResponseError:  # INFO renamed or refused (some managed services): cannot tell
            return
        if info.get("cluster_enabled"):
            raise StorageError(
                f"{_redacted(self._url)} is a Redis Cluster node: set storage.redis_cluster: true"
            )

    async def close(self) -> None:
        await self.flush()
        # redis-py can swallow a cancellation that lands inside a command, so the loops also
        # watch `_closing`; the wait is bounded either way.
        self._closing = True
        tasks = [*self._tasks, *self._serving]
        tasks += [f.reading for f in self._followed.values() if f.reading is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._socket_timeout + self._heartbeat_interval)
        self._tasks = []
        if self._redis is not None and self._healthy:
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                pipe = self._redis.pipeline(transaction=False)
                pipe.delete(_heartbeat_key(self.replica_id))
                pipe.srem(REPLICAS, self.replica_id)
                pipe.delete(_control_key(self.replica_id))
                await pipe.execute()
        await self._close_clients()
        self._healthy = False

    async def _close_clients(self) -> None:
        for wire in [*self._writers.values(), *chain.from_iterable(self._follow_pool.values())]:
            wire.close()
        self._follow_pool = {}
        clients: list[Any] = [self._redis, self._control]
        for client in clients:
            if client is not None:
                with contextlib.suppress(RedisError, RedisClusterException, OSError):
                    await client.aclose()
        self._redis = self._control = None
        self._writers = {}

    # --- routing: which primary gets a key's writes ----------------------------------------

    def _primary_of(self, key: str) -> str:
        """The name of the primary serving `key` ("" on one Redis)."""
        client = self._client()
        if not isinstance(client, RedisCluster):
            return ""
        return str(client.nodes_manager.get_node_from_slot(key_slot(key.encode())).name)

    async def _refresh_writers(self, reread: bool = False) -> None:
        """A write connection per primary; after a failover, read the topology again."""
        client = self._client()
        name = f"rp:{self.replica_id}:write"
        if not isinstance(client, RedisCluster):
            if "" not in self._writers:
                address = Address.from_url(self._url)
                self._writers[""] = WireConnection(address, name, self._socket_timeout)
            return
        if reread:
            await client.nodes_manager.initialize()
        primaries = {node.name: node for node in client.get_primaries()}
        for gone in [node for node in self._writers if node not in primaries]:
            self._writers.pop(gone).close()
        for node_name, node in primaries.items():
            if node_name not in self._writers:
                address = Address.from_url(self._url, node.host, int(node.port))
                self._writers[node_name] = WireConnection(address, name, self._socket_timeout)

    # --- writing ---------------------------------------------------------------------------

    async def claim(self, meta: SessionMeta) -> None:
        """Make a client-chosen id this process's at once, atomically in Redis: of two
        processes creating one id, the second gets SessionExists (a 409)."""
        session_id = meta.session_id
        if session_id in self._live:
            raise SessionExists(f"session {session_id} already exists")
        created = await self._call(
            lambda client: client.eval(
                _CREATE,
                1,
                _meta_key(session_id),
                _encode_meta(meta),
                self.replica_id,
                meta.created_ns,
                self._live_expiry_ms,
            )
        )
        if not created:
            raise SessionExists(f"session {session_id} was created by another request")

    def create(self, meta: SessionMeta) -> SessionInfo:
        session_id = meta.session_id
        if session_id in self._live:
            raise SessionExists(f"session {session_id} already exists")
        info = SessionInfo(meta=meta, updated_ns=meta.created_ns)
        live = self._live[session_id] = _Live(info)
        self._followed.pop(session_id, None)
        self._creates.append(live)
        self._schedule()
        return info

    def append(
        self,
        session_id: str,
        first_event: int,
        data: bytes,
        ends: Sequence[int],
        arrival_ns: int,
    ) -> None:
        live = self._live.get(session_id)
        if live is None or live.deleted:
            return
        live.batches.append((first_event, data, ends))
        live.tail_bytes += len(data)
        live.queued_events = first_event + len(ends) - 1
        if first_event == 1:
            live.info.first_event_ns = arrival_ns
        live.queued_bytes += len(data)
        self._batches.append((live, first_event, data, ends, arrival_ns))
        self._schedule()

    def end(self, session_id: str, state: str, reason: str, ended_ns: int) -> None:
        live = self._live.get(session_id)
        if live is None or live.deleted:
            return
        self._ends.append((live, state, reason, ended_ns))
        self._schedule()

    async def flush(self) -> None:
        while self._flusher is not None or self._flush_scheduled:
            if self._flusher is None:
                await asyncio.sleep(0)
                continue
            await asyncio.shield(self._flusher)

    def _schedule(self) -> None:
        """Write on the next loop turn, so every append of this turn shares one pipeline."""
        if not self._flush_scheduled and self._flusher is None:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flusher)

    def _start_flusher(self) -> None:
        self._flush_scheduled = False
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="redis-flush")

    async def _flush_loop(self) -> None:
        try:
            while self._creates or self._batches or self._ends:
                creates, batches, ends = self._creates, self._batches, self._ends
                self._creates, self._batches, self._ends = [], [], []
                await self._flush_once(creates, batches, ends)
        finally:
            self._flusher = None

    async def _flush_once(
        self,
        creates: list[_Live],
        batches: list[tuple[_Live, int, bytes, Sequence[int], int]],
        ends: list[tuple[_Live, str, str, int]],
    ) -> None:
        """Write one flush, a unit per primary in parallel, and make each unit readable as
        soon as its primary acknowledged it. On a Cluster a unit whose primary fails (over)
        is routed again and retried until FAILOVER_WINDOW has passed."""
        units = self._route(creates, batches, ends)
        deadline = time.monotonic() + FAILOVER_WINDOW
        backoff = 0.05
        while units:
            if len(units) == 1:  # the usual turn: one primary, appends only (no task for it)
                errors = [await self._write(units[0])]
            else:
                errors = await asyncio.gather(*(self._write(unit) for unit in units))
            failed: list[_Unit] = []
            for unit, error in zip(units, errors, strict=True):
                if error is None or not self._may_retry(deadline):
                    self._apply(unit, error)
                else:
                    failed.append(unit)
            if not failed:
                return
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 2)
            with contextlib.suppress(RedisError, RedisClusterException, OSError):
                await self._refresh_writers(reread=True)
            units = self._route(
                [live for unit in failed for live in unit.creates],
                [batch for unit in failed for batch in unit.batches],
                [end for unit in failed for end in unit.ends],
                side=any(unit.node is None for unit in failed),
            )

    def _may_retry(self, deadline: float) -> bool:
        """On a Cluster any failed write may be a failover (a primary down, a slot moved, the
        cluster briefly down): worth another try on the topology read again."""
        return self._cluster and not self._closing and time.monotonic() < deadline

    def _route(
        self,
        creates: list[_Live],
        batches: list[tuple[_Live, int, bytes, Sequence[int], int]],
        ends: list[tuple[_Live, str, str, int]],
        side: bool = True,
    ) -> list[_Unit]:
        """Group a flush by the primary that serves each session (one unit on one Redis);
        plus, when `side`, the unit of index and owner-set updates."""
        units: dict[str | None, _Unit] = {}

        def unit_of(live: _Live) -> _Unit:
            try:
                node = self._primary_of(_events_key(live.info.session_id))
            except RedisClusterException:
                node = "?"  # slot not covered now: fails and is retried
            unit = units.get(node)
            if unit is None:
                unit = units[node] = _Unit(node)
            return unit

        for live in creates:
            unit_of(live).creates.append(live)
        for batch in batches:
            unit_of(batch[0]).batches.append(batch)
        for end in ends:
            unit_of(end[0]).ends.append(end)
        if side and (creates or ends):
            units[None] = _Unit(None, creates=list(creates), ends=list(ends))
        return list(units.values())

    async def _write(self, unit: _Unit) -> str | None:
        """One pipeline for the unit; the error that kept it out of Redis, if any."""
        if not self._healthy and not self._cluster:
            return "unreachable"
        if unit.node is None:
            return await self._write_side(unit)
        writer = self._writers.get(unit.node)
        if writer is None:
            return f"no connection to primary {unit.node}"
        commands = [self._create_command(live) for live in unit.creates if live.lost is None]
        creates = len(commands)
        byte_counts: dict[_Live, int] = {}
        for live, first, data, event_ends, arrival in unit.batches:
            if live.lost is not None or live.deleted:
                continue
            total = byte_counts.get(live, live.stored_bytes) + len(data)
            byte_counts[live] = total
            key = _events_key(live.info.session_id)
            entry_id = b"%d-0" % (first + len(event_ends) - 1)
            offsets = _ends_bytes(event_ends)
            commands.append(
                ("XADD", key, entry_id, "d", data, "e", offsets, "b", total, "t", arrival)
            )
            if first == 1:
                commands.append(("PEXPIRE", key, self._live_expiry_ms))
        commands += [
            self._end_command(live, state, reason, ended_ns)
            for live, state, reason, ended_ns in unit.ends
            if live.lost is None and not live.deleted
        ]
        if not commands:
            return None
        if self._wait_replicas:
            commands.append(("WAIT", self._wait_replicas, WAIT_TIMEOUT_MS))
        try:
            results = await writer.send(commands)
        except (OSError, TimeoutError) as exc:
            self._set_unhealthy(unit.node, exc)
            return str(exc) or type(exc).__name__
        except Exception as exc:  # a bug must fail these sessions, not stall every reader
            log.exception("redis write failed")
            return f"redis write failed: {exc!r}"
        refused = [
            result
            for result in results
            if isinstance(result, ReplyError) and _DUPLICATE not in str(result)
        ]
        if refused:
            log.error("redis refused a write: %s", refused[0])
            return f"redis refused a write: {refused[0]}"
        if self._wait_replicas:
            self._note_replicas(unit.node, int(results[-1]))  # type: ignore[call-overload]
        self._note_conflicts(unit, results[:creates])
        return None

    def _create_command(self, live: _Live) -> tuple[Arg, ...]:
        meta = live.info.meta
        return (
            "EVAL",
            _CREATE,
            1,
            _meta_key(meta.session_id),
            _encode_meta(meta),
            self.replica_id,
            meta.created_ns,
            self._live_expiry_ms,
        )

    def _note_conflicts(self, unit: _Unit, results: list[object]) -> None:
        """A create the script refused: the id is another process's session."""
        creates = [live for live in unit.creates if live.lost is None]
        for live, created in zip(creates, results, strict=True):
            if not created:
                self._lose(live, _LOST_ID.format(id=live.info.session_id))
                live.settled = True  # the other session's keys are not ours to fail

    def _note_replicas(self, node: str, acked: int) -> None:
        if acked >= self._wait_replicas:
            self._short_of_replicas.discard(node)
        elif node not in self._short_of_replicas:
            self._short_of_replicas.add(node)
            log.warning(
                "redis primary %s: writes reached %d of %d replicas (storage.redis_wait_replicas)",
                node or _redacted(self._url),
                acked,
                self._wait_replicas,
            )

    async def _write_side(self, unit: _Unit) -> str | None:
        """The session index and the owner set: single-key commands, routed by key."""
        pipe = self._client().pipeline(transaction=False)
        owned = _owned_key(self.replica_id)
        for live in unit.creates:
            if live.lost is None:
                meta = live.info.meta
                pipe.zadd(INDEX, {meta.session_id: meta.created_ns}, nx=True)
                pipe.sadd(owned, meta.session_id)
        for live, _, _, _ in unit.ends:
            if live.lost is None and not live.deleted:
                pipe.srem(owned, live.info.session_id)
                if live.alias is not None:
                    pipe.pexpire(_alias_key(live.alias), self._ttl_ms)
        if not len(pipe):
            return None
        try:
            await pipe.execute()
        except (RedisError, RedisClusterException, OSError) as exc:
            return str(exc) or type(exc).__name__
        return None

    def _end_command(self, live: _Live, state: str, reason: str, ended_ns: int) -> tuple[Arg, ...]:
        session_id = live.info.session_id
        first_ns = live.info.first_event_ns
        return (
            "EVAL",
            _END,
            2,
            _meta_key(session_id),
            _events_key(session_id),
            state,
            reason,
            live.queued_events,
            live.queued_bytes,
            ended_ns,
            first_ns if first_ns is not None else "",
            self._ttl_ms,
        )

    async def add_alias(self, session_id: str, alias: str) -> None:
        """Written at once, not with the next flush: the caller waits for it anyway, and only
        after the session's own keys are in Redis may a name point at them."""
        check_alias(alias)
        await self.flush()
        live = self._live.get(session_id)
        if live is not None:
            if live.lost is not None:
                raise StorageError(f"session {session_id}: {live.lost}")
            live.alias = live.info.alias = alias
            expiry = self._live_expiry_ms
        elif await self.get(session_id) is None:
            raise SessionMissing(f"session {session_id} not found")
        else:
            expiry = self._ttl_ms  # it ended already; its keys have their final expiry
        meta_key = _meta_key(session_id)
        self._followed.pop(session_id, None)  # its cached hash lacks the alias
        # The HSET keeps the hash's expiry (NX gives one only to a hash that expired just
        # before it); the alias key is its own slot on a Cluster, a command of its own.
        await self._pipeline(
            lambda pipe: (
                pipe.hset(meta_key, "alias", alias)
                .pexpire(meta_key, expiry, nx=True)
                .set(_alias_key(alias), session_id, px=expiry)
            )
        )

    async def resolve_alias(self, alias: str) -> str | None:
        key = _alias_key(alias)
        raw = await self._call(lambda client: client.get(key))
        if raw is None:
            return None
        session_id: str = raw.decode()
        live = self._live.get(session_id)
        info = live.info if live is not None else (await self._fetch(session_id))[0]
        return session_id if info is not None and info.alias == alias else None

    def _apply(self, unit: _Unit, error: str | None) -> None:
        """Make what was written (or, Redis failing, what local readers may still have)
        readable, and wake the readers."""
        if unit.node is None:
            if error is not None:
                log.error("redis: the session index or owner set missed a write: %s", error)
            return
        if error is None and not self._healthy:
            log.warning("redis reachable again")
            self._healthy = True
        touched: set[_Live] = set()
        if error is not None:
            for live in unit.creates:
                self._lose(live, _LOST_REDIS.format(n=1) + f": {error}")
        for live, first, data, event_ends, arrival in unit.batches:
            if live.deleted:
                continue
            if error is not None:
                self._lose(live, _LOST_REDIS.format(n=first) + f": {error}")
            info = live.info
            count = len(event_ends)
            if live.lost is None:
                live.stored_events += count
                live.stored_bytes += len(data)
            info.events = first + count - 1
            info.bytes += len(data)
            info.updated_ns = arrival
            if live.followers:
                push_batch(live.followers, first, data, count, arrival)
            touched.add(live)
        for live, state, reason, ended_ns in unit.ends:
            if live.deleted:
                continue
            if error is not None:
                self._lose(live, _LOST_REDIS.format(n=live.stored_events + 1) + f": {error}")
            info = live.info
            if live.lost is not None and state != FAILED:
                state, reason = FAILED, f"storage: {live.lost}"
            info.state, info.reason, info.updated_ns = state, reason, ended_ns
            followers, live.followers = live.followers, []
            detach_all(followers)
            touched.add(live)
            if live.lost is None:
                self._live.pop(info.session_id, None)
            else:
                self._release_later(live)
        for live in touched:
            live.trim()
            live.wake()

    def _release_later(self, live: _Live) -> None:
        """Forget an ended session Redis missed events of, once it has been told it failed
        and local readers had LOST_KEEP seconds to take the rest from memory (Redis cannot
        give it to them)."""

        def release() -> None:
            if not live.settled:
                self._release_later(live)
            elif self._live.get(live.info.session_id) is live:
                del self._live[live.info.session_id]

        asyncio.get_running_loop().call_later(LOST_KEEP, release)

    def _lose(self, live: _Live, reason: str) -> None:
        """Redis no longer gets this session's writes: local readers go on from the tail,
        and Redis is told it `failed` as soon as it can be (see `_settle`)."""
        if live.lost is None:
            live.lost = reason
            live.info.storage_error = reason
            log.error("session %s: %s", live.info.session_id, reason)

    def _set_unhealthy(self, node: str | None, exc: object) -> None:
        if self._healthy:
            where = f" (primary {node})" if node else ""
            if self._cluster:
                log.error(
                    "redis unreachable%s, writes wait up to %.0fs for a failover: %s",
                    where,
                    FAILOVER_WINDOW,
                    exc,
                )
            else:
                log.error("redis unreachable%s, sessions stream from memory only: %s", where, exc)
        self._healthy = False

    # --- reading ---------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionInfo | None:
        live = self._live.get(session_id)
        if live is not None:
            return live.info
        followed = self._followed.get(session_id)
        if (
            followed is not None
            and not followed.ended
            and time.monotonic() - followed.fetched < self._heartbeat_interval
        ):
            return followed.info  # kept current by the XREADs of its followers
        info, owner = await self._fetch(session_id)
        if (
            info is not None
            and info.state == STREAMING
            and not await self._is_alive(owner)
            and await self._interrupt(session_id, owner)
        ):
            info, owner = await self._fetch(session_id)
        if followed is not None:
            if info is None or info.state != STREAMING:
                self._followed.pop(session_id, None)
            else:
                followed.info, followed.fetched = info, time.monotonic()
        return info

    async def _fetch(self, session_id: str) -> tuple[SessionInfo | None, str]:
        """The session as Redis has it, and the process that reads its upstream."""
        fields, last = await self._pipeline(
            lambda pipe: pipe.hgetall(_meta_key(session_id)).xrevrange(
                _events_key(session_id), "+", "-", count=1
            )
        )
        return _info_from(fields, last), fields.get(b"owner", b"").decode()

    async def list(self) -> list[SessionInfo]:
        raw_ids = await self._call(lambda client: client.zrevrange(INDEX, 0, -1))
        remote = [sid for sid in (raw.decode() for raw in raw_ids) if sid not in self._live]
        hashes: list[dict[bytes, bytes]] = []
        if remote:
            hashes = await self._pipeline(
                lambda pipe: [pipe.hgetall(_meta_key(session_id)) for session_id in remote]
            )
        gone = [sid for sid, fields in zip(remote, hashes, strict=True) if b"meta" not in fields]
        if gone:
            await self._call(lambda client: client.zrem(INDEX, *gone))
        # Streaming sessions need their live event count, and a look at their owner.
        streaming = [
            (sid, fields[b"owner"].decode())
            for sid, fields in zip(remote, hashes, strict=True)
            if fields.get(b"state") == STREAMING.encode() and b"owner" in fields
        ]
        lasts: dict[str, list[Any]] = {}
        if streaming:
            found = await self._pipeline(
                lambda pipe: [
                    pipe.xrevrange(_events_key(session_id), "+", "-", count=1)
                    for session_id, _ in streaming
                ]
            )
            lasts = dict(zip((sid for sid, _ in streaming), found, strict=True))
            alive = {owner: await self._is_alive(owner) for owner in {o for _, o in streaming}}
            for session_id, owner in streaming:
                if not alive[owner] and await self._interrupt(session_id, owner):
                    lasts[session_id] = []
                    key = _meta_key(session_id)
                    refreshed = await self._call(lambda client, key=key: client.hgetall(key))
                    hashes[remote.index(session_id)] = refreshed
        infos = [live.info for live in self._live.values() if not live.deleted]
        for session_id, fields in zip(remote, hashes, strict=True):
            info = _info_from(fields, lasts.get(session_id, []))
            if info is not None:
                infos.append(info)
        infos.sort(key=lambda info: info.meta.created_ns, reverse=True)
        return infos

    async def page(
        self, after: SessionInfo | None, limit: int, keep: Callable[[SessionInfo], bool]
    ) -> tuple[list[SessionInfo], bool]:
        """Pages of `list()`, in the disk store's order (created time, then id)."""
        infos = await self.list()
        infos.sort(key=lambda info: (info.meta.created_ns, info.session_id), reverse=True)
        if after is not None:
            cursor = (after.meta.created_ns, after.session_id)
            infos = [i for i in infos if (i.meta.created_ns, i.session_id) < cursor]
        kept = [info for info in infos if keep(info)]
        return kept[:limit], len(kept) > limit

    async def read(self, session_id: str, start_event: int, max_bytes: int) -> tuple[bytes, int]:
        live = self._live.get(session_id)
        if live is not None:
            if start_event > live.info.events:
                return b"", 0
            if live.batches and start_event >= live.batches[0][0]:
                return take_events(live.batches, start_event, max_bytes, live.info.events)
            if start_event > live.stored_events:
                raise StorageError(
                    f"session {session_id}: events from {start_event} were not stored "
                    f"({live.lost}) and left memory"
                )
        followed = self._followed.get(session_id)
        if followed is not None:
            if start_event > followed.info.events and not followed.ended:
                return b"", 0
            if followed.batches and start_event >= followed.batches[0][0]:
                data, count = take_events(followed.batches, start_event, max_bytes)
                if count:
                    return data, count
        key = _events_key(session_id)
        data, count = await self._call(
            lambda client: client.eval(_READ, 1, key, start_event, max_bytes)
        )
        return data, int(count)

    async def wait(self, session_id: str, after_event: int, timeout: float) -> None:
        if timeout <= 0:
            return
        live = self._live.get(session_id)
        loop = asyncio.get_running_loop()
        if live is not None:
            if live.info.events > after_event or live.info.state != STREAMING:
                return
            waiter = loop.create_future()
            live.waiters.append(waiter)
            timer = loop.call_later(timeout, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
            return
        await self._wait_followed(session_id, after_event, timeout)

    async def _wait_followed(self, session_id: str, after_event: int, timeout: float) -> None:
        """Until the session another process streams has news: one XREAD BLOCK (started by
        the first waiter) serves every reader here; it brings the entries themselves."""
        followed = self._followed.get(session_id)
        now = time.monotonic()
        if followed is None:
            try:
                info = await self.get(session_id)
            except StorageError:
                # Redis is gone: let the reader look again later instead of spinning.
                await asyncio.sleep(min(timeout, self._heartbeat_interval))
                return
            if info is None or info.state != STREAMING or session_id in self._live:
                return
            followed = self._followed.get(session_id)
            if followed is None:
                followed = self._followed[session_id] = _Followed(
                    info=info, fetched=now, cursor=b"%d-0" % info.events
                )
        followed.used = now
        if followed.info.events > after_event or followed.ended:
            return
        if followed.reading is None or followed.reading.done():
            followed.reading = asyncio.create_task(self._follow_read(followed, timeout))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(followed.reading)

    async def _follow_read(self, followed: _Followed, timeout: float) -> None:
        """One XREAD BLOCK on a connection of our own to the session's primary (a connection
        blocks while it waits, so each followed session in flight has one, from a pool)."""
        key = _events_key(followed.info.session_id)
        try:
            node, address = self._address_of(key)
        except RedisClusterException:  # the slot has no primary right now: a failover
            await asyncio.sleep(min(timeout, self._heartbeat_interval))
            return
        pool = self._follow_pool.setdefault(node, [])
        wire = (
            pool.pop() if pool else WireConnection(address, self._follow_name, self._socket_timeout)
        )
        block_ms = max(1, int(timeout * 1000))
        command = ("XREAD", "COUNT", FOLLOW_COUNT, "BLOCK", block_ms, "STREAMS", key)
        try:
            (reply,) = await wire.send(
                [(*command, followed.cursor)], timeout + self._socket_timeout
            )
        except (OSError, TimeoutError) as exc:
            wire.close()
            log.debug("follower of %s: %s", key, exc)
            await asyncio.sleep(min(timeout, self._heartbeat_interval))
            return
        except BaseException:
            wire.close()  # cancelled mid-command: its reply must not reach the next user
            raise
        if len(pool) < FOLLOW_POOL:
            pool.append(wire)
        else:
            wire.close()
        if isinstance(reply, ReplyError):  # MOVED, CLUSTERDOWN: a failover under way
            log.debug("follower of %s: %s", key, reply)
            if self._cluster:
                with contextlib.suppress(RedisError, RedisClusterException, OSError):
                    await self._refresh_writers(reread=True)
            await asyncio.sleep(min(timeout, self._heartbeat_interval))
            return
        for _, entries in reply or ():  # type: ignore[attr-defined]
            for entry_id, flat in entries:
                self._take_entry(followed, entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    def _address_of(self, key: str) -> tuple[str, Address]:
        """The primary serving `key`: its name ("" on one Redis) and how to reach it."""
        client = self._client()
        if not isinstance(client, RedisCluster):
            return "", Address.from_url(self._url)
        node = client.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        return str(node.name), Address.from_url(self._url, node.host, int(node.port))

    def _take_entry(self, followed: _Followed, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        followed.cursor = entry_id
        info = followed.info
        data = fields.get(b"d")
        if data is None:
            followed.ended = True  # the end marker: the final state is in the hash
            return
        ends = _ends_from(fields[b"e"])
        last = _entry_last_event(entry_id)
        followed.tail_bytes = _add_batch(
            followed.batches, followed.tail_bytes, (last - len(ends) + 1, data, ends)
        )
        info.events, info.bytes, info.updated_ns = last, int(fields[b"b"]), int(fields[b"t"])

    async def arrivals(self, session_id: str) -> list[tuple[int, int, int]]:
        result: list[tuple[int, int, int]] = []
        key = _events_key(session_id)
        start = "-"
        while True:
            entries = await self._call(
                lambda client, start=start: client.xrange(key, start, "+", ARRIVAL_PAGE)
            )
            for entry_id, fields in entries:
                if b"d" in fields:
                    count = len(fields[b"e"]) // array(_ENDS).itemsize
                    last = _entry_last_event(entry_id)
                    result.append((last - count + 1, count, int(fields[b"t"])))
            if len(entries) < ARRIVAL_PAGE:
                return result
            start = "(" + entries[-1][0].decode()

    async def delete(self, session_id: str) -> None:
        await self.flush()
        live = self._live.pop(session_id, None)
        if live is not None:
            live.deleted = True
            live.wake()
            followers, live.followers = live.followers, []
            detach_all(followers)
        self._followed.pop(session_id, None)
        await self._pipeline(
            lambda pipe: (
                pipe.delete(_meta_key(session_id))
                .delete(_events_key(session_id))
                .zrem(INDEX, session_id)
            )
        )

    async def token_secret(self) -> bytes:
        """The first process's random key wins the `SET NX`; every process then reads it."""
        proposed = secrets.token_hex(32)
        await self._call(lambda client: client.set(TOKEN_KEY, proposed, nx=True))
        stored = await self._call(lambda client: client.get(TOKEN_KEY))
        return bytes.fromhex(stored.decode("ascii"))

    async def _call(self, command: Callable[[Client], Awaitable[Any]]) -> Any:
        """One Redis call; its failure is a StorageError to the sessions layer. On a Cluster
        a failure that a failover explains is retried for up to FAILOVER_WINDOW seconds, so
        readers wait out a primary's failover instead of failing."""
        deadline = time.monotonic() + FAILOVER_WINDOW
        backoff = 0.05
        while True:
            try:
                return await command(self._client())
            except _TRANSIENT as exc:
                if not self._may_retry(deadline):
                    raise StorageError(f"redis: {exc}") from None
                log.debug("redis call retried: %s", exc)
            except (RedisError, RedisClusterException, OSError) as exc:
                raise StorageError(f"redis: {exc}") from None
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 2)

    async def _pipeline(self, build: Callable[[Any], object]) -> list[Any]:
        """`_call` for a pipeline (a new one each try): `build` queues its commands."""

        async def run(client: Client) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            build(pipe)
            return await pipe.execute()

        result: list[Any] = await self._call(run)
        return result

    # --- replicas: stop requests, heartbeats, the sweep ------------------------------------

    def follow_live(self, session_id: str, follower: Follower) -> bool:
        """Readers of a session this process streams take its events pushed from `_apply`,
        the moment Redis acknowledged them; readers of another process's session wait on
        its XREAD and read (False)."""
        live = self._live.get(session_id)
        if (
            live is None
            or live.deleted
            or live.info.state != STREAMING
            or live.info.events != follower.next_event - 1
        ):
            return False
        live.followers.append(follower)
        return True

    def unfollow(self, session_id: str, follower: Follower) -> None:
        live = self._live.get(session_id)
        if live is not None and follower in live.followers:
            live.followers.remove(follower)

    def set_stop_handler(self, handler: StopHandler) -> None:
        self._stop_handler = handler

    async def request_stop(self, session_id: str, state: str, reason: str) -> bool:
        self._followed.pop(session_id, None)  # its state is about to change
        key = _meta_key(session_id)
        fields = await self._call(lambda client: client.hmget(key, "state", "owner"))
        current, owner_raw = fields
        owner = owner_raw.decode() if owner_raw else ""
        if current != STREAMING.encode() or not owner or owner == self.replica_id:
            return False
        if not await self._is_alive(owner):
            return False
        request_id = secrets.token_hex(8)
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks[request_id] = answer
        message = {
            "stop": session_id,
            "state": state,
            "reason": reason,
            "id": request_id,
            "reply": self.replica_id,
        }
        try:
            await self._send_control(owner, message)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_ACK_TIMEOUT):
                    await answer
            return True
        finally:
            self._acks.pop(request_id, None)

    async def _send_control(self, replica: str, message: dict[str, Any]) -> None:
        key = _control_key(replica)
        body = {"m": json.dumps(message)}
        await self._pipeline(
            lambda pipe: pipe.xadd(key, body, maxlen=1000, approximate=True).pexpire(
                key, CONTROL_EXPIRY_MS
            )
        )

    async def _control_loop(self) -> None:
        """Stop requests for our sessions and answers to our own requests, from our stream."""
        assert self._control is not None
        key = _control_key(self.replica_id)
        cursor = "0-0"
        while not self._closing:
            try:
                reply = await self._control.xread({key: cursor}, count=100, block=1000)
            except (RedisError, RedisClusterException, OSError) as exc:
                log.debug("control stream: %s", exc)
                await asyncio.sleep(self._heartbeat_interval)
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    cursor = entry_id.decode()
                    self._on_control(fields.get(b"m", b""))

    def _on_control(self, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            return
        if "stop" in body:
            task = asyncio.create_task(self._serve_stop(body))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        elif "ack" in body:
            answer = self._acks.get(body["ack"])
            if answer is not None and not answer.done():
                answer.set_result(bool(body.get("ok")))

    async def _serve_stop(self, body: dict[str, Any]) -> None:
        stopped = False
        if self._stop_handler is not None:
            try:
                stopped = await self._stop_handler(body["stop"], body["state"], body["reason"])
            except Exception:
                log.exception("stop request for session %s failed", body["stop"])
        await self.flush()
        with contextlib.suppress(StorageError):
            await self._send_control(body["reply"], {"ack": body["id"], "ok": stopped})

    async def _is_alive(self, replica: str) -> bool:
        if replica == self.replica_id:
            return True
        now = time.monotonic()
        if self._alive_until.get(replica, 0.0) > now:
            return True
        key = _heartbeat_key(replica)
        alive = bool(await self._call(lambda client: client.exists(key)))
        if alive:
            self._alive_until[replica] = now + self._heartbeat_interval
        return alive

    async def _interrupt(self, session_id: str, owner: str) -> bool:
        """End a session whose owner is gone `interrupted`; False if it was not (any more)."""
        keys = [_meta_key(session_id), _events_key(session_id)]
        args = [owner, f"replica {owner} stopped heartbeating", time.time_ns(), self._ttl_ms]
        done = await self._call(lambda client: client.eval(_INTERRUPT, 2, *keys, *args))
        await self._call(lambda client: client.srem(_owned_key(owner), session_id))
        if done:
            log.warning(
                "session %s interrupted: replica %s stopped heartbeating", session_id, owner
            )
        return bool(done)

    async def _beat(self) -> bool:
        """Refresh our heartbeat; False when Redis had forgotten it (restarted, or flushed)."""
        pipe = self._client().pipeline(transaction=False)
        pipe.set(_heartbeat_key(self.replica_id), b"1", px=self._heartbeat_ttl_ms, get=True)
        pipe.sadd(REPLICAS, self.replica_id)
        previous, _ = await pipe.execute()
        return previous is not None

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._heartbeat_interval)
            try:
                remembered = await self._beat()
                # On a Cluster the flusher says when writes go through again.
                if not self._healthy and (not self._cluster or self._flusher is None):
                    log.warning("redis reachable again")
                    self._healthy = True
                if not remembered:
                    await self._check_kept()
                await self._settle()
                await self._sweep()
                self._forget_idle_followed()
            except (RedisError, RedisClusterException, OSError, StorageError) as exc:
                self._set_unhealthy(None, exc)
                if self._cluster:
                    with contextlib.suppress(RedisError, RedisClusterException, OSError):
                        await self._refresh_writers(reread=True)

    def _forget_idle_followed(self) -> None:
        now = time.monotonic()
        for session_id, followed in list(self._followed.items()):
            idle = followed.reading is None or followed.reading.done()
            if idle and now - followed.used > REMOTE_IDLE:
                del self._followed[session_id]

    async def _check_kept(self) -> None:
        """Redis forgot our heartbeat, so it may have forgotten our sessions too."""
        live = [live for live in self._live.values() if live.lost is None and not live.deleted]
        if not live:
            return
        pipe = self._client().pipeline(transaction=False)
        for session in live:
            pipe.exists(_meta_key(session.info.session_id))
        for session, exists in zip(live, await pipe.execute(), strict=True):
            if not exists:
                self._lose(session, _LOST_KEYS)

    async def _settle(self) -> None:
        """Tell Redis that the sessions it missed writes of `failed`, keeping the events it
        does have when they start at event 1 (a gap would break resume's promise)."""
        unsettled = [live for live in self._live.values() if live.lost and not live.settled]
        for live in unsettled:
            session_id = live.info.session_id
            meta_key, events_key = _meta_key(session_id), _events_key(session_id)
            client = self._client()
            pipe = client.pipeline(transaction=False)
            pipe.xrange(events_key, "-", "+", count=1)
            pipe.xrevrange(events_key, "+", "-", count=1)
            head, last = await pipe.execute()
            events, size = 0, 0
            if head and last:
                first_id, first_fields = head[0]
                first_count = len(first_fields[b"e"]) // array(_ENDS).itemsize
                if _entry_last_event(first_id) - first_count + 1 == 1:
                    events, size = _entry_last_event(last[0][0]), int(last[0][1][b"b"])
            now = time.time_ns()
            info = live.info
            pipe = client.pipeline(transaction=False)
            if not events:
                pipe.delete(events_key)
            pipe.hset(
                meta_key,
                mapping={
                    "meta": _encode_meta(info.meta),
                    "state": FAILED,
                    "reason": f"storage: {live.lost}",
                    "owner": self.replica_id,
                    "events": events,
                    "bytes": size,
                    "updated_ns": now,
                    "first_event_ns": info.first_event_ns if events else "",
                    "storage_error": live.lost or "",
                },
            )
            pipe.xadd(events_key, {"b": size, "t": now}, id=f"{events}-1")
            pipe.zadd(INDEX, {session_id: info.meta.created_ns})
            pipe.srem(_owned_key(self.replica_id), session_id)
            pipe.pexpire(meta_key, self._ttl_ms)
            pipe.pexpire(events_key, self._ttl_ms)
            await pipe.execute()
            live.settled = True
            log.warning(
                "session %s ended failed in redis: %s (%d events kept)",
                session_id,
                live.lost,
                events,
            )

    async def _sweep(self) -> None:
        """Mark `interrupted` the streaming sessions of every process whose heartbeat is gone."""
        client = self._client()
        replicas = [r.decode() for r in await client.smembers(REPLICAS)]
        others = [r for r in replicas if r != self.replica_id]
        if not others:
            return
        pipe = client.pipeline(transaction=False)
        for replica in others:
            pipe.exists(_heartbeat_key(replica))
        for replica, alive in zip(others, await pipe.execute(), strict=True):
            if alive:
                continue
            for raw in await client.smembers(_owned_key(replica)):
                await self._interrupt(raw.decode(), replica)
            if not await client.scard(_owned_key(replica)):
                await client.srem(REPLICAS, replica)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
