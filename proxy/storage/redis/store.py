"""`RedisStore`: sessions in Redis Streams, so every replica behind a load balancer (and every
worker of `server.workers`) can resume and follow live any session, whichever process reads
its upstream. One Redis, or a Redis Cluster (`storage.redis_cluster: true`). What lives in
which key is `keys.py`'s; how Redis is reached, `connection.py`'s; the other processes,
`replicas.py`'s.

Writing. Appends are queued and written once per loop turn (group commit), one pipeline per
Redis primary on a connection of its own (`wire.py`): an XADD per batch of every session on
that primary, so a turn costs one round trip per primary, not one per event. With
`storage.redis_wait_replicas: N` the pipeline ends with `WAIT N`, so what a client is shown is
on N replicas too and survives the loss of the primary. When Redis has acknowledged a batch,
it is pushed to the caught-up local readers (`follow_live`) and kept in a small in-memory
tail (`tail.py`) for the others: local readers never read from Redis.

Following from another process: one `XREAD BLOCK` per session and wake-up, shared by all of
that process's readers of the session, returns the new entries themselves; they are kept in
a tail like the owner's, so the readers take them from memory, and the session's state is
known from them (an end marker) without asking Redis again.

Failures. On one Redis, a write Redis refuses or misses makes the session `failed` (in Redis,
once it is back) while local readers go on from memory, and `healthy` is False in between.
On a Cluster, a write that fails because a primary is failing over is retried, with the
topology read again, for up to FAILOVER_WINDOW seconds (local readers wait meanwhile) before
that. A process that stops heartbeating has its streaming sessions marked `interrupted` by
whichever process notices first (`replicas.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisClusterException

from proxy.config import StorageConfig
from proxy.storage.base import (
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
from proxy.storage.codec import encode_meta, ends_bytes, ends_count, ends_view
from proxy.storage.redis import scripts
from proxy.storage.redis.connection import (
    FAILOVER_WINDOW,
    FAILURES,
    Connections,
    redacted,
)
from proxy.storage.redis.keys import (
    INDEX,
    TOKEN_KEY,
    alias_key,
    entry_last_event,
    events_key,
    info_from,
    meta_key,
    owned_key,
)
from proxy.storage.redis.replicas import Replicas
from proxy.storage.redis.wire import Arg, ReplyError
from proxy.storage.tail import Tail, Waiters

log = logging.getLogger("proxy.storage.redis")

TAIL_BYTES = 64 * 1024  # per live session: what local readers get without asking Redis
ARRIVAL_PAGE = 1024  # batches per XRANGE when collecting arrival times
FOLLOW_COUNT = 256  # entries per XREAD of a follower
LOST_KEEP = 60.0  # seconds an ended session Redis missed stays readable from memory
LIVE_EXPIRY = 8 * 86400.0  # beyond session.max_duration (at most 7 days): no key lives forever
WAIT_TIMEOUT_MS = 100  # WAIT's bound when a primary has fewer replicas than asked for
REMOTE_IDLE = 30.0  # a followed session nobody waited on for this long leaves memory
_LOST_REDIS = "redis was unreachable, events from {n} were not stored"
_LOST_KEYS = "redis lost this session's keys (restarted without persistence?)"
_LOST_ID = "another process created session {id} first"


@dataclass(slots=True, eq=False)
class _Live:
    """A session whose upstream this process reads: its local view and recent batches."""

    info: SessionInfo
    tail: Tail = field(default_factory=lambda: Tail(TAIL_BYTES))
    stored_events: int = 0  # acknowledged by Redis
    stored_bytes: int = 0
    queued_events: int = 0  # number of the last event appended so far
    queued_bytes: int = 0  # bytes of every batch appended so far
    lost: str | None = None  # why Redis stopped receiving this session's writes
    settled: bool = False  # its `failed` end is in Redis
    deleted: bool = False
    alias: str | None = None
    followers: list[Follower] = field(default_factory=list)  # caught up: events are pushed


@dataclass(slots=True, eq=False)
class _Followed:
    """A session another process streams and readers here follow: what the last XREAD
    brought, so those readers take it from memory and one XREAD serves them all."""

    info: SessionInfo
    fetched: float  # monotonic time `info` was read from Redis in full
    cursor: bytes  # id of the newest stream entry seen
    tail: Tail = field(default_factory=lambda: Tail(TAIL_BYTES))
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


class RedisStore:
    """SessionStore on Redis; see the module docstring for the timing."""

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
        self._wait_replicas = config.redis_wait_replicas
        self._ttl_ms = max(1, int(config.retention.ttl * 1000))
        self._live_expiry_ms = int((config.retention.ttl + LIVE_EXPIRY) * 1000)
        self._heartbeat_interval = heartbeat_interval
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._redis = Connections(
            config.redis_url, config.redis_cluster, self.replica_id, socket_timeout
        )
        self._replicas = Replicas(
            self._redis,
            self.replica_id,
            heartbeat_interval=heartbeat_interval,
            heartbeat_ttl_ms=max(1, int(heartbeat_ttl * 1000)),
            ended_ttl_ms=self._ttl_ms,
            flush=self.flush,
        )
        self._healthy = False
        self._used_memory = 0  # what Redis reported at the last heartbeat
        self._live: dict[str, _Live] = {}
        self._followed: dict[str, _Followed] = {}
        self._waiters = Waiters()  # readers of sessions in `_live`
        self._creates: list[_Live] = []
        self._batches: list[tuple[_Live, int, bytes, Sequence[int], int]] = []
        self._ends: list[tuple[_Live, str, str, int]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self._short_of_replicas: set[str] = set()  # primaries whose WAIT came back short

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def check_health(self) -> bool:
        """The heartbeat (every second, traffic or not) already re-checks Redis."""
        return self._healthy

    def stored_bytes(self) -> int:
        """What Redis reports using (`used_memory`, summed over the primaries of a Cluster),
        as of the last heartbeat: every session of every replica, not only this one's."""
        return self._used_memory

    def set_fsync_observer(self, observer: Callable[[float], None]) -> None:
        """Redis makes its writes durable itself (appendfsync): no fsync here to observe."""

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        redis = self._redis
        try:
            async with asyncio.timeout(redis.socket_timeout * 3):
                await redis.open()
                await self._replicas.beat()
                self._healthy = True
                await self._replicas.sweep()
                self._used_memory = await redis.used_memory()
        except StorageError:
            await redis.close()
            raise
        except (*FAILURES, TimeoutError) as exc:
            await redis.close()
            self._healthy = False
            reason = str(exc) or type(exc).__name__
            raise StorageError(f"cannot reach redis at {redacted(redis.url)}: {reason}") from None
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="redis-heartbeat"),
            asyncio.create_task(self._replicas.control_loop(), name="redis-control"),
        ]
        kind = "redis cluster" if redis.cluster else "redis"
        log.info("%s store at %s, replica %s", kind, redacted(redis.url), self.replica_id)

    async def close(self) -> None:
        await self.flush()
        # redis-py can swallow a cancellation that lands inside a command, so the loops also
        # watch `closing`; the wait is bounded either way.
        self._redis.closing = True
        tasks = [*self._tasks, *self._replicas.serving]
        tasks += [f.reading for f in self._followed.values() if f.reading is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._redis.socket_timeout + self._heartbeat_interval)
        self._tasks = []
        if self._redis.started and self._healthy:
            await self._replicas.leave()
        await self._redis.close()
        self._healthy = False

    # --- writing ---------------------------------------------------------------------------

    async def claim(self, meta: SessionMeta) -> None:
        """Make a client-chosen id this process's at once, atomically in Redis: of two
        processes creating one id, the second gets SessionExists (a 409)."""
        session_id = meta.session_id
        if session_id in self._live:
            raise SessionExists(f"session {session_id} already exists")
        created = await self._redis.call(
            lambda client: client.eval(
                scripts.CREATE,
                1,
                meta_key(session_id),
                encode_meta(meta),
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
        live.tail.append(first_event, data, ends)
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
                if error is None or not self._redis.may_retry(deadline):
                    self._apply(unit, error)
                else:
                    failed.append(unit)
            if not failed:
                return
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 2)
            await self._redis.reroute()
            units = self._route(
                [live for unit in failed for live in unit.creates],
                [batch for unit in failed for batch in unit.batches],
                [end for unit in failed for end in unit.ends],
                side=any(unit.node is None for unit in failed),
            )

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
                node = self._redis.primary_of(events_key(live.info.session_id))
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
        if not self._healthy and not self._redis.cluster:
            return "unreachable"
        if unit.node is None:
            return await self._write_side(unit)
        writer = self._redis.writers.get(unit.node)
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
            key = events_key(live.info.session_id)
            entry_id = b"%d-0" % (first + len(event_ends) - 1)
            offsets = ends_bytes(event_ends)
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
            if isinstance(result, ReplyError) and scripts.DUPLICATE not in str(result)
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
            scripts.CREATE,
            1,
            meta_key(meta.session_id),
            encode_meta(meta),
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
                node or redacted(self._redis.url),
                acked,
                self._wait_replicas,
            )

    async def _write_side(self, unit: _Unit) -> str | None:
        """The session index and the owner set: single-key commands, routed by key."""
        pipe = self._redis.client().pipeline(transaction=False)
        owned = owned_key(self.replica_id)
        for live in unit.creates:
            if live.lost is None:
                meta = live.info.meta
                pipe.zadd(INDEX, {meta.session_id: meta.created_ns}, nx=True)
                pipe.sadd(owned, meta.session_id)
        for live, _, _, _ in unit.ends:
            if live.lost is None and not live.deleted:
                pipe.srem(owned, live.info.session_id)
                if live.alias is not None:
                    pipe.pexpire(alias_key(live.alias), self._ttl_ms)
        if not len(pipe):
            return None
        try:
            await pipe.execute()
        except FAILURES as exc:
            return str(exc) or type(exc).__name__
        return None

    def _end_command(self, live: _Live, state: str, reason: str, ended_ns: int) -> tuple[Arg, ...]:
        session_id = live.info.session_id
        first_ns = live.info.first_event_ns
        return (
            "EVAL",
            scripts.END,
            2,
            meta_key(session_id),
            events_key(session_id),
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
        hash_key = meta_key(session_id)
        self._followed.pop(session_id, None)  # its cached hash lacks the alias
        # The HSET keeps the hash's expiry (NX gives one only to a hash that expired just
        # before it); the alias key is its own slot on a Cluster, a command of its own.
        await self._redis.pipeline(
            lambda pipe: (
                pipe.hset(hash_key, "alias", alias)
                .pexpire(hash_key, expiry, nx=True)
                .set(alias_key(alias), session_id, px=expiry)
            )
        )

    async def resolve_alias(self, alias: str) -> str | None:
        key = alias_key(alias)
        raw = await self._redis.call(lambda client: client.get(key))
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
            live.tail.trim(live.info.events)
            self._waiters.wake(live.info.session_id)

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
            if self._redis.cluster:
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
            and not await self._replicas.is_alive(owner)
            and await self._replicas.interrupt(session_id, owner)
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
        fields, last = await self._redis.pipeline(
            lambda pipe: pipe.hgetall(meta_key(session_id)).xrevrange(
                events_key(session_id), "+", "-", count=1
            )
        )
        return info_from(fields, last), fields.get(b"owner", b"").decode()

    async def list(self) -> list[SessionInfo]:
        raw_ids = await self._redis.call(lambda client: client.zrevrange(INDEX, 0, -1))
        remote = [sid for sid in (raw.decode() for raw in raw_ids) if sid not in self._live]
        hashes: list[dict[bytes, bytes]] = []
        if remote:
            hashes = await self._redis.pipeline(
                lambda pipe: [pipe.hgetall(meta_key(session_id)) for session_id in remote]
            )
        gone = [sid for sid, fields in zip(remote, hashes, strict=True) if b"meta" not in fields]
        if gone:
            await self._redis.call(lambda client: client.zrem(INDEX, *gone))
        # Streaming sessions need their live event count, and a look at their owner.
        streaming = [
            (sid, fields[b"owner"].decode())
            for sid, fields in zip(remote, hashes, strict=True)
            if fields.get(b"state") == STREAMING.encode() and b"owner" in fields
        ]
        lasts: dict[str, list[Any]] = {}
        if streaming:
            found = await self._redis.pipeline(
                lambda pipe: [
                    pipe.xrevrange(events_key(session_id), "+", "-", count=1)
                    for session_id, _ in streaming
                ]
            )
            lasts = dict(zip((sid for sid, _ in streaming), found, strict=True))
            alive = {
                owner: await self._replicas.is_alive(owner) for owner in {o for _, o in streaming}
            }
            for session_id, owner in streaming:
                if not alive[owner] and await self._replicas.interrupt(session_id, owner):
                    lasts[session_id] = []
                    key = meta_key(session_id)
                    refreshed = await self._redis.call(lambda client, key=key: client.hgetall(key))
                    hashes[remote.index(session_id)] = refreshed
        infos = [live.info for live in self._live.values() if not live.deleted]
        for session_id, fields in zip(remote, hashes, strict=True):
            info = info_from(fields, lasts.get(session_id, []))
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
            held = live.tail.read(start_event, live.info.events, max_bytes)
            if held is not None:
                return held
            if start_event > live.stored_events:
                raise StorageError(
                    f"session {session_id}: events from {start_event} were not stored "
                    f"({live.lost}) and left memory"
                )
        followed = self._followed.get(session_id)
        if followed is not None:
            if start_event > followed.info.events and not followed.ended:
                return b"", 0
            held = followed.tail.read(start_event, followed.info.events, max_bytes)
            if held is not None and held[1]:
                return held
        key = events_key(session_id)
        data, count = await self._redis.call(
            lambda client: client.eval(scripts.READ, 1, key, start_event, max_bytes)
        )
        return data, int(count)

    async def wait(self, session_id: str, after_event: int, timeout: float) -> None:
        if timeout <= 0:
            return
        live = self._live.get(session_id)
        if live is not None:
            if live.info.events > after_event or live.info.state != STREAMING:
                return
            await self._waiters.wait(session_id, timeout)
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
        key = events_key(followed.info.session_id)
        try:
            node, address = self._redis.address_of(key)
        except RedisClusterException:  # the slot has no primary right now: a failover
            await asyncio.sleep(min(timeout, self._heartbeat_interval))
            return
        wire = self._redis.follow_connection(node, address)
        block_ms = max(1, int(timeout * 1000))
        command = ("XREAD", "COUNT", FOLLOW_COUNT, "BLOCK", block_ms, "STREAMS", key)
        try:
            (reply,) = await wire.send(
                [(*command, followed.cursor)], timeout + self._redis.socket_timeout
            )
        except (OSError, TimeoutError) as exc:
            wire.close()
            log.debug("follower of %s: %s", key, exc)
            await asyncio.sleep(min(timeout, self._heartbeat_interval))
            return
        except BaseException:
            wire.close()  # cancelled mid-command: its reply must not reach the next user
            raise
        self._redis.give_back(node, wire)
        if isinstance(reply, ReplyError):  # MOVED, CLUSTERDOWN: a failover under way
            log.debug("follower of %s: %s", key, reply)
            await self._redis.reroute()
            await asyncio.sleep(min(timeout, self._heartbeat_interval))
            return
        for _, entries in reply or ():  # type: ignore[attr-defined]
            for entry_id, flat in entries:
                self._take_entry(followed, entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    def _take_entry(self, followed: _Followed, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        followed.cursor = entry_id
        info = followed.info
        data = fields.get(b"d")
        if data is None:
            followed.ended = True  # the end marker: the final state is in the hash
            return
        ends = ends_view(fields[b"e"])
        last = entry_last_event(entry_id)
        followed.tail.append(last - len(ends) + 1, data, ends)
        followed.tail.trim(last)
        info.events, info.bytes, info.updated_ns = last, int(fields[b"b"]), int(fields[b"t"])

    async def arrivals(self, session_id: str) -> list[tuple[int, int, int]]:
        result: list[tuple[int, int, int]] = []
        key = events_key(session_id)
        start = "-"
        while True:
            entries = await self._redis.call(
                lambda client, start=start: client.xrange(key, start, "+", ARRIVAL_PAGE)
            )
            for entry_id, fields in entries:
                if b"d" in fields:
                    count = ends_count(fields[b"e"])
                    last = entry_last_event(entry_id)
                    result.append((last - count + 1, count, int(fields[b"t"])))
            if len(entries) < ARRIVAL_PAGE:
                return result
            start = "(" + entries[-1][0].decode()

    async def delete(self, session_id: str) -> None:
        await self.flush()
        live = self._live.pop(session_id, None)
        if live is not None:
            live.deleted = True
            self._waiters.wake(session_id)
            followers, live.followers = live.followers, []
            detach_all(followers)
        self._followed.pop(session_id, None)
        await self._redis.pipeline(
            lambda pipe: (
                pipe.delete(meta_key(session_id))
                .delete(events_key(session_id))
                .zrem(INDEX, session_id)
            )
        )

    async def token_secret(self) -> bytes:
        """The first process's random key wins the `SET NX`; every process then reads it."""
        proposed = secrets.token_hex(32)
        await self._redis.call(lambda client: client.set(TOKEN_KEY, proposed, nx=True))
        stored = await self._redis.call(lambda client: client.get(TOKEN_KEY))
        return bytes.fromhex(stored.decode("ascii"))

    # --- followers and stop requests -------------------------------------------------------

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
        self._replicas.stop_handler = handler

    async def request_stop(self, session_id: str, state: str, reason: str) -> bool:
        self._followed.pop(session_id, None)  # its state is about to change
        return await self._replicas.request_stop(session_id, state, reason)

    # --- upkeep, once per heartbeat --------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        redis = self._redis
        while not redis.closing:
            await asyncio.sleep(self._heartbeat_interval)
            try:
                remembered = await self._replicas.beat()
                # On a Cluster the flusher says when writes go through again.
                if not self._healthy and (not redis.cluster or self._flusher is None):
                    log.warning("redis reachable again")
                    self._healthy = True
                if not remembered:
                    await self._check_kept()
                await self._settle()
                await self._replicas.sweep()
                self._forget_idle_followed()
                self._used_memory = await redis.used_memory()
            except (*FAILURES, StorageError) as exc:
                self._set_unhealthy(None, exc)
                await redis.reroute()

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
        pipe = self._redis.client().pipeline(transaction=False)
        for session in live:
            pipe.exists(meta_key(session.info.session_id))
        for session, exists in zip(live, await pipe.execute(), strict=True):
            if not exists:
                self._lose(session, _LOST_KEYS)

    async def _settle(self) -> None:
        """Tell Redis that the sessions it missed writes of `failed`, keeping the events it
        does have when they start at event 1 (a gap would break resume's promise)."""
        unsettled = [live for live in self._live.values() if live.lost and not live.settled]
        for live in unsettled:
            session_id = live.info.session_id
            hash_key, stream_key = meta_key(session_id), events_key(session_id)
            client = self._redis.client()
            pipe = client.pipeline(transaction=False)
            pipe.xrange(stream_key, "-", "+", count=1)
            pipe.xrevrange(stream_key, "+", "-", count=1)
            head, last = await pipe.execute()
            events, size = 0, 0
            if head and last:
                first_id, first_fields = head[0]
                first_count = ends_count(first_fields[b"e"])
                if entry_last_event(first_id) - first_count + 1 == 1:
                    events, size = entry_last_event(last[0][0]), int(last[0][1][b"b"])
            now = time.time_ns()
            info = live.info
            pipe = client.pipeline(transaction=False)
            if not events:
                pipe.delete(stream_key)
            pipe.hset(
                hash_key,
                mapping={
                    "meta": encode_meta(info.meta),
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
            pipe.xadd(stream_key, {"b": size, "t": now}, id=f"{events}-1")
            pipe.zadd(INDEX, {session_id: info.meta.created_ns})
            pipe.srem(owned_key(self.replica_id), session_id)
            pipe.pexpire(hash_key, self._ttl_ms)
            pipe.pexpire(stream_key, self._ttl_ms)
            await pipe.execute()
            live.settled = True
            log.warning(
                "session %s ended failed in redis: %s (%d events kept)",
                session_id,
                live.lost,
                events,
            )
