"""`RedisStore`: sessions in Redis Streams, so every replica behind a load balancer can resume
(and follow live) any session, whichever replica reads its upstream.

Keys (all of one session share the hash tag `{id}`, so a Redis Cluster keeps them together):

- `rp:{id}:events` is a Stream with one entry per logged batch (one upstream read). The entry
  id is `<number of the batch's last event>-0`, so `XRANGE key n +` returns first the batch
  that holds event n: reading from any event is one command, and Redis itself rejects a
  batch that is out of order or repeated. Fields: `d` the batch bytes, `e` the end offset of
  each event (uint32 array), `b` the session's byte count after it, `t` its arrival time.
  When the session ends, an entry `<events>-1` (no `d`) marks the end; a reader blocked in
  `XREAD` on another replica wakes for it exactly as for new events.
- `rp:{id}:meta` is a hash written at create and at end: `meta` (the SessionMeta as JSON),
  `state`, `reason`, `owner` (the replica reading the upstream), `events`, `bytes`, ... While
  a session streams its event count comes from the stream's last entry, so an append costs
  one `XADD` and nothing else.
- `rp:alias:{<alias>}` holds the id of the session given that alias (`add_alias`). The meta
  hash's `alias` field says which alias the session has, and a key that names a session
  which is gone or has another alias resolves to nothing, so a delete leaves the key to
  expire. It takes the session's expiry when the session ends on the replica reading it;
  when another replica marks the session `interrupted`, the key keeps its live expiry.
- `rp:sessions` (sorted set, id -> created_ns) lists sessions; `rp:owned:<replica>` holds the
  sessions a replica streams; `rp:hb:<replica>` is its heartbeat (a key with a short TTL);
  `rp:replicas` names every replica that heartbeats; `rp:ctl:<replica>` is the pub/sub
  channel where stop requests for its sessions (and answers to its own requests) arrive.
- `rp:token-key` is the capability-token key (hex), set once with `SET NX` by the first
  replica that starts, so every replica checks every other's tokens. It never expires.

Timing: appends are queued and one pipeline per loop turn writes them (group commit); local
readers are woken when Redis has acknowledged it, and read the newest events from a small
in-memory tail instead of asking Redis again. If Redis is lost, the tail keeps live local
readers going, the sessions it could not write end `failed` in Redis once it is back, and
`healthy` is False in between. A replica that stops heartbeating has its streaming sessions
marked `interrupted` by whichever replica notices first: on access, or in the sweep every
replica runs once per heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import struct
import sys
import time
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import takewhile
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline, PubSub
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from ..config import StorageConfig
from ..errors import SessionConflict, SessionNotFound
from .base import (
    FAILED,
    STREAMING,
    Follower,
    SessionInfo,
    SessionMeta,
    StopHandler,
    StorageError,
    check_alias,
)

log = logging.getLogger("proxy.storage.redis")

TAIL_BYTES = 64 * 1024  # per live session: what local readers get without asking Redis
ARRIVAL_PAGE = 1024  # batches per XRANGE when collecting arrival times
LOST_KEEP = 60.0  # seconds an ended session Redis missed stays readable from memory
LIVE_EXPIRY = 8 * 86400.0  # beyond session.max_duration (at most 7 days): no key lives forever
STOP_ACK_TIMEOUT = 10.0  # how long request_stop waits for the owner to confirm
INDEX = "rp:sessions"
REPLICAS = "rp:replicas"
TOKEN_KEY = "rp:token-key"
_ENDS = "I"  # uint32 end offsets; a batch is far below 4 GiB
_LOST_REDIS = "redis was unreachable, events from {n} were not stored"
_LOST_KEYS = "redis lost this session's keys (restarted without persistence?)"

# Scripts go by EVAL, not EVALSHA: Redis caches them by digest anyway, and a restarted Redis
# (which forgot every loaded script) needs no NOSCRIPT dance. They name stream keys from their
# arguments, so they suit one Redis (with replicas), not a Cluster.

# Every batch of one flush, packed by `_write` into one argument (a uint32 header of six
# lengths, then the stream key, entry id, ends, data, byte count and arrival time): one
# command per flush instead of one XADD per batch, because redis-py spends far more time
# packing and parsing a command than Redis spends running it. A batch Redis already has
# (a repeat after a retried write) fails its XADD, which is what the entry ids are for.
_BATCH_HEAD = struct.Struct("<6I")
_APPEND = """
local blob = ARGV[1]
local pos = 1
while pos <= #blob do
  local kl, il, el, dl, bl, tl, p = struct.unpack('<I4I4I4I4I4I4', blob, pos)
  local key = string.sub(blob, p, p + kl - 1); p = p + kl
  local id = string.sub(blob, p, p + il - 1); p = p + il
  local e = string.sub(blob, p, p + el - 1); p = p + el
  local d = string.sub(blob, p, p + dl - 1); p = p + dl
  local b = string.sub(blob, p, p + bl - 1); p = p + bl
  local t = string.sub(blob, p, p + tl - 1); pos = p + tl
  local reply = redis.pcall('XADD', key, id, 'd', d, 'e', e, 'b', b, 't', t)
  if type(reply) == 'table' and reply.err and not string.find(reply.err, 'equal or smaller') then
    return reply
  end
end
return 0
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

# Ends a session whose owner stopped heartbeating, if nothing changed since we looked:
# still streaming, same owner, heartbeat still gone. The event count is the stream's,
# so events written just before the owner died are counted even if its metadata lags.
_INTERRUPT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'streaming' then
  redis.call('SREM', KEYS[4], ARGV[1])
  return 0
end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] or redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
local events, bytes = '0', '0'
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then
  events = string.match(last[1][1], '^%d+')
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'b' then bytes = fields[i + 1] end
  end
end
redis.call('HSET', KEYS[1], 'state', 'interrupted', 'reason', ARGV[3], 'events', events,
  'bytes', bytes, 'updated_ns', ARGV[4])
redis.call('XADD', KEYS[2], events .. '-1', 'b', bytes, 't', ARGV[4])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
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


def _control_channel(replica: str) -> str:
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


def take_events(
    batches: Iterable[tuple[int, bytes, Sequence[int]]], start_event: int, max_bytes: int
) -> tuple[bytes, int]:
    """Events start_event.. from consecutive batches (first_event, data, ends): at least one
    whole event if there is one, then whole events up to max_bytes."""
    parts: list[bytes] = []
    total = 0
    count = 0
    expected = start_event
    for first, data, ends in batches:
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


@dataclass(slots=True, eq=False)
class _Live:
    """A session whose upstream this replica reads: its local view and recent batches."""

    info: SessionInfo
    batches: deque[tuple[int, bytes, Sequence[int]]] = field(default_factory=deque)
    tail_bytes: int = 0
    stored_events: int = 0  # acknowledged by Redis
    stored_bytes: int = 0
    queued_events: int = 0  # number of the last event appended so far
    queued_bytes: int = 0  # bytes of every batch appended so far
    lost: str | None = None  # why Redis stopped receiving this session's writes
    settled: bool = False  # its `failed` end is in Redis
    deleted: bool = False
    alias: str | None = None
    waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
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
        self._ttl_ms = max(1, int(config.retention.ttl * 1000))
        self._live_expiry_ms = int((config.retention.ttl + LIVE_EXPIRY) * 1000)
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_ttl_ms = max(1, int(heartbeat_ttl * 1000))
        self._socket_timeout = socket_timeout
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._redis: Redis | None = None
        self._blocking: Redis | None = None  # XREAD BLOCK and pub/sub: no socket timeout
        self._pubsub: PubSub | None = None
        self._healthy = False
        self._live: dict[str, _Live] = {}
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

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def check_health(self) -> bool:
        """The heartbeat (every second, traffic or not) already re-checks Redis."""
        return self._healthy

    def _client(self) -> Redis:
        if self._redis is None:
            raise StorageError("the redis store is not started")
        return self._redis

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)
        common: dict[str, Any] = {
            "socket_connect_timeout": self._socket_timeout,
            "retry": retry,
            "health_check_interval": 10,
        }
        self._redis = Redis.from_url(self._url, socket_timeout=self._socket_timeout, **common)
        self._blocking = Redis.from_url(self._url, socket_timeout=None, **common)
        try:
            async with asyncio.timeout(self._socket_timeout * 3):
                await self._redis.ping()
                await self._beat()
                await self._subscribe()
                self._healthy = True
                await self._sweep()
        except (RedisError, OSError, TimeoutError) as exc:
            await self._close_clients()
            self._healthy = False
            reason = str(exc) or type(exc).__name__
            raise StorageError(f"cannot reach redis at {_redacted(self._url)}: {reason}") from None
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="redis-heartbeat"),
            asyncio.create_task(self._control_loop(), name="redis-control"),
        ]
        log.info("redis store at %s, replica %s", _redacted(self._url), self.replica_id)

    async def close(self) -> None:
        await self.flush()
        # redis-py can swallow a cancellation that lands inside a command, so the loops also
        # watch `_closing`; the wait is bounded either way.
        self._closing = True
        tasks = [*self._tasks, *self._serving]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._socket_timeout + self._heartbeat_interval)
        self._tasks = []
        if self._redis is not None and self._healthy:
            with contextlib.suppress(RedisError, OSError):
                pipe = self._redis.pipeline(transaction=False)
                pipe.delete(_heartbeat_key(self.replica_id))
                pipe.srem(REPLICAS, self.replica_id)
                await pipe.execute()
        await self._close_clients()
        self._healthy = False

    async def _subscribe(self) -> None:
        assert self._blocking is not None
        self._pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(_control_channel(self.replica_id))

    async def _unsubscribe(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def _close_clients(self) -> None:
        await self._unsubscribe()
        for client in (self._redis, self._blocking):
            if client is not None:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
        self._redis = self._blocking = None

    # --- writing ---------------------------------------------------------------------------

    def create(self, meta: SessionMeta) -> SessionInfo:
        session_id = meta.session_id
        if session_id in self._live:
            raise SessionConflict(f"session {session_id} already exists")
        info = SessionInfo(meta=meta, updated_ns=meta.created_ns)
        live = self._live[session_id] = _Live(info)
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
                error = await self._write(creates, batches, ends)
                self._apply(creates, batches, ends, error)
        finally:
            self._flusher = None

    async def _write(
        self,
        creates: list[_Live],
        batches: list[tuple[_Live, int, bytes, Sequence[int], int]],
        ends: list[tuple[_Live, str, str, int]],
    ) -> str | None:
        """One pipeline for everything queued; the error that kept it out of Redis, if any."""
        if not self._healthy:
            return "unreachable"
        pipe = self._client().pipeline(transaction=False)
        owned = _owned_key(self.replica_id)
        for live in creates:
            if live.lost is None:
                self._queue_create(pipe, live, owned)
        byte_counts: dict[_Live, int] = {}
        packed: list[bytes] = []
        started: list[str] = []
        for live, first, data, event_ends, arrival in batches:
            if live.lost is not None or live.deleted:
                continue
            total = byte_counts.get(live, live.stored_bytes) + len(data)
            byte_counts[live] = total
            key = _events_key(live.info.session_id).encode()
            entry_id = b"%d-0" % (first + len(event_ends) - 1)
            offsets = _ends_bytes(event_ends)
            size, stamp = b"%d" % total, b"%d" % arrival
            lengths = (len(key), len(entry_id), len(offsets), len(data), len(size), len(stamp))
            packed += (_BATCH_HEAD.pack(*lengths), key, entry_id, offsets, data, size, stamp)
            if first == 1:
                started.append(key.decode())
        if packed:
            pipe.eval(_APPEND, 0, b"".join(packed))
        for key in started:
            pipe.pexpire(key, self._live_expiry_ms)
        for live, state, reason, ended_ns in ends:
            if live.lost is None and not live.deleted:
                self._queue_end(pipe, live, state, reason, ended_ns, owned)
        if not len(pipe):
            return None
        try:
            results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self._set_unhealthy(exc)
            return str(exc) or type(exc).__name__
        refused = [result for result in results if isinstance(result, ResponseError)]
        if refused:
            log.error("redis refused a write: %s", refused[0])
            return f"redis refused a write: {refused[0]}"
        return None

    def _queue_create(self, pipe: Pipeline, live: _Live, owned: str) -> None:
        meta = live.info.meta
        key = _meta_key(meta.session_id)
        pipe.hset(
            key,
            mapping={
                "meta": _encode_meta(meta),
                "state": STREAMING,
                "owner": self.replica_id,
                "events": 0,
                "bytes": 0,
                "updated_ns": meta.created_ns,
            },
        )
        pipe.pexpire(key, self._live_expiry_ms)
        pipe.zadd(INDEX, {meta.session_id: meta.created_ns})
        pipe.sadd(owned, meta.session_id)

    def _queue_end(
        self,
        pipe: Pipeline,
        live: _Live,
        state: str,
        reason: str,
        ended_ns: int,
        owned: str,
    ) -> None:
        session_id = live.info.session_id
        events = live.queued_events
        meta_key, events_key = _meta_key(session_id), _events_key(session_id)
        first_ns = live.info.first_event_ns
        pipe.hset(
            meta_key,
            mapping={
                "state": state,
                "reason": reason,
                "events": events,
                "bytes": live.queued_bytes,
                "updated_ns": ended_ns,
                "first_event_ns": first_ns if first_ns is not None else "",
            },
        )
        pipe.xadd(events_key, {"b": live.queued_bytes, "t": ended_ns}, id=f"{events}-1")
        pipe.srem(owned, session_id)
        pipe.pexpire(meta_key, self._ttl_ms)
        pipe.pexpire(events_key, self._ttl_ms)
        if live.alias is not None:
            pipe.pexpire(_alias_key(live.alias), self._ttl_ms)

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
            raise SessionNotFound(f"session {session_id} not found")
        else:
            expiry = self._ttl_ms  # it ended already; its keys have their final expiry
        meta_key = _meta_key(session_id)
        pipe = self._client().pipeline(transaction=False)
        pipe.hset(meta_key, "alias", alias)
        # Keeps the hash's expiry; gives one only to a hash that expired just before the HSET.
        pipe.pexpire(meta_key, expiry, nx=True)
        pipe.set(_alias_key(alias), session_id, px=expiry)
        await self._call(pipe.execute())

    async def resolve_alias(self, alias: str) -> str | None:
        raw = await self._call(self._client().get(_alias_key(alias)))
        if raw is None:
            return None
        session_id: str = raw.decode()
        info = await self.get(session_id)
        return session_id if info is not None and info.alias == alias else None

    def _apply(
        self,
        creates: list[_Live],
        batches: list[tuple[_Live, int, bytes, Sequence[int], int]],
        ends: list[tuple[_Live, str, str, int]],
        error: str | None,
    ) -> None:
        """Make what was written (or, Redis failing, what local readers may still have)
        readable, and wake the readers."""
        touched: set[_Live] = set()
        if error is not None:
            for live in creates:
                self._lose(live, _LOST_REDIS.format(n=1) + f": {error}")
        for live, first, data, event_ends, arrival in batches:
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
            touched.add(live)
        for live, state, reason, ended_ns in ends:
            if live.deleted:
                continue
            if error is not None:
                self._lose(live, _LOST_REDIS.format(n=live.stored_events + 1) + f": {error}")
            info = live.info
            if live.lost is not None and state != FAILED:
                state, reason = FAILED, f"storage: {live.lost}"
            info.state, info.reason, info.updated_ns = state, reason, ended_ns
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

    def _set_unhealthy(self, exc: BaseException) -> None:
        if self._healthy:
            log.error("redis unreachable, sessions stream from memory only: %s", exc)
        self._healthy = False

    # --- reading ---------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionInfo | None:
        live = self._live.get(session_id)
        if live is not None:
            return live.info
        info, owner = await self._fetch(session_id)
        if (
            info is not None
            and info.state == STREAMING
            and not await self._is_alive(owner)
            and await self._interrupt(session_id, owner)
        ):
            info, owner = await self._fetch(session_id)
        return info

    async def _fetch(self, session_id: str) -> tuple[SessionInfo | None, str]:
        """The session as Redis has it, and the replica that reads its upstream."""
        pipe = self._client().pipeline(transaction=False)
        pipe.hgetall(_meta_key(session_id))
        pipe.xrevrange(_events_key(session_id), "+", "-", count=1)
        fields, last = await self._call(pipe.execute())
        return _info_from(fields, last), fields.get(b"owner", b"").decode()

    async def list(self) -> list[SessionInfo]:
        client = self._client()
        ids = [raw.decode() for raw in await self._call(client.zrevrange(INDEX, 0, -1))]
        remote = [sid for sid in ids if sid not in self._live]
        pipe = client.pipeline(transaction=False)
        for session_id in remote:
            pipe.hgetall(_meta_key(session_id))
        hashes = await self._call(pipe.execute()) if remote else []
        gone = [sid for sid, fields in zip(remote, hashes, strict=True) if b"meta" not in fields]
        if gone:
            await self._call(client.zrem(INDEX, *gone))
        streaming = [
            sid
            for sid, fields in zip(remote, hashes, strict=True)
            if fields.get(b"state") == STREAMING.encode()
        ]
        # Streaming sessions need their live event count, and a check of their owner.
        refreshed = {}
        for session_id in streaming:
            refreshed[session_id] = await self.get(session_id)
        infos = [live.info for live in self._live.values() if not live.deleted]
        for session_id, fields in zip(remote, hashes, strict=True):
            info = refreshed.get(session_id) if session_id in refreshed else _info_from(fields, [])
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
                readable = live.info.events
                batches = takewhile(lambda batch: batch[0] <= readable, live.batches)
                return take_events(batches, start_event, max_bytes)
            if start_event > live.stored_events:
                raise StorageError(
                    f"session {session_id}: events from {start_event} were not stored "
                    f"({live.lost}) and left memory"
                )
        data, count = await self._call(
            self._client().eval(_READ, 1, _events_key(session_id), start_event, max_bytes)
        )
        return data, int(count)

    async def wait(self, session_id: str, after_event: int, timeout: float) -> None:
        live = self._live.get(session_id)
        if live is not None:
            if live.info.events > after_event or live.info.state != STREAMING:
                return
            if live.waiter is None:
                live.waiter = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(live.waiter)
            return
        await self._wait_remote(session_id, after_event, timeout)

    async def _wait_remote(self, session_id: str, after_event: int, timeout: float) -> None:
        """XREAD BLOCK wakes on any entry after `after_event`: new events or the end marker."""
        assert self._blocking is not None
        block_ms = max(1, int(timeout * 1000))
        try:
            async with asyncio.timeout(timeout + self._socket_timeout):
                await self._blocking.xread(
                    {_events_key(session_id): f"{after_event}-0"}, count=1, block=block_ms
                )
        except (RedisError, OSError, TimeoutError):
            # Redis is gone or slow: let the reader look again later instead of spinning.
            await asyncio.sleep(min(timeout, self._heartbeat_interval))

    async def arrivals(self, session_id: str) -> list[tuple[int, int, int]]:
        client = self._client()
        result: list[tuple[int, int, int]] = []
        start = "-"
        while True:
            entries = await self._call(
                client.xrange(_events_key(session_id), start, "+", ARRIVAL_PAGE)
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
        pipe = self._client().pipeline(transaction=False)
        pipe.delete(_meta_key(session_id), _events_key(session_id))
        pipe.zrem(INDEX, session_id)
        await self._call(pipe.execute())

    async def token_secret(self) -> bytes:
        """The first replica's random key wins the `SET NX`; every replica then reads it."""
        client = self._client()
        await self._call(client.set(TOKEN_KEY, secrets.token_hex(32), nx=True))
        stored = await self._call(client.get(TOKEN_KEY))
        return bytes.fromhex(stored.decode("ascii"))

    async def _call(self, awaitable: Any) -> Any:
        """Await one Redis call; its failure is a StorageError to the sessions layer."""
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise StorageError(f"redis: {exc}") from None

    # --- replicas: stop requests, heartbeats, the sweep ------------------------------------

    def follow_live(self, session_id: str, follower: Follower) -> bool:
        """Not yet: readers of the Redis store wait on the stream and read."""
        return False

    def unfollow(self, session_id: str, follower: Follower) -> None:
        return None

    def set_stop_handler(self, handler: StopHandler) -> None:
        self._stop_handler = handler

    async def request_stop(self, session_id: str, state: str, reason: str) -> bool:
        client = self._client()
        fields = await self._call(client.hmget(_meta_key(session_id), "state", "owner"))
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
            delivered = await self._call(
                client.publish(_control_channel(owner), json.dumps(message))
            )
            if not delivered:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_ACK_TIMEOUT):
                    await answer
            return True
        finally:
            self._acks.pop(request_id, None)

    async def _control_loop(self) -> None:
        """Stop requests for our sessions and answers to our own requests, from pub/sub."""
        while not self._closing:
            try:
                if self._pubsub is None:
                    await self._subscribe()
                assert self._pubsub is not None
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                # A fresh subscription is the one reliable way back after Redis restarted.
                log.debug("control channel: %s", exc)
                await self._unsubscribe()
                await asyncio.sleep(self._heartbeat_interval)
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                body = json.loads(message["data"])
            except ValueError:
                continue
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
        reply = json.dumps({"ack": body["id"], "ok": stopped})
        with contextlib.suppress(RedisError, OSError):
            await self._client().publish(_control_channel(body["reply"]), reply)

    async def _is_alive(self, replica: str) -> bool:
        if replica == self.replica_id:
            return True
        now = time.monotonic()
        if self._alive_until.get(replica, 0.0) > now:
            return True
        alive = bool(await self._call(self._client().exists(_heartbeat_key(replica))))
        if alive:
            self._alive_until[replica] = now + self._heartbeat_interval
        return alive

    async def _interrupt(self, session_id: str, owner: str) -> bool:
        """End a session whose owner is gone `interrupted`; False if it was not (any more)."""
        keys = [
            _meta_key(session_id),
            _events_key(session_id),
            _heartbeat_key(owner),
            _owned_key(owner),
        ]
        args = [session_id, owner, f"replica {owner} stopped heartbeating"]
        args += [time.time_ns(), self._ttl_ms]
        done = await self._call(self._client().eval(_INTERRUPT, 4, *keys, *args))
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
                if not self._healthy:
                    log.warning("redis reachable again")
                    self._healthy = True
                if not remembered:
                    await self._check_kept()
                await self._settle()
                await self._sweep()
            except (RedisError, OSError, StorageError) as exc:
                self._set_unhealthy(exc)

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
        """Mark `interrupted` the streaming sessions of every replica whose heartbeat is gone."""
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
