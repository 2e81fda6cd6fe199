"""The processes sharing one Redis: who is alive, who streams what, and stop requests.

Every process (replica, or worker of `server.workers`) heartbeats `rp:hb:<replica>`, a key
with a short TTL, and lists the sessions whose upstream it reads in `rp:owned:<replica>`. A
process that stops heartbeating has its streaming sessions marked `interrupted` by whichever
process notices first: on access (`is_alive` then `interrupt`), or in the sweep every
process runs once per heartbeat. A stop request for a session another process streams goes
to that process's control stream `rp:ctl:<replica>`, and its answer comes back on ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.storage.base import STREAMING, StopHandler, StorageError
from proxy.storage.redis import scripts
from proxy.storage.redis.connection import FAILURES, Connections
from proxy.storage.redis.keys import (
    REPLICAS,
    control_key,
    events_key,
    heartbeat_key,
    meta_key,
    owned_key,
)

log = logging.getLogger("proxy.storage.redis")

STOP_ACK_TIMEOUT = 10.0  # how long request_stop waits for the owner to confirm
CONTROL_EXPIRY_MS = 60_000  # a control stream outlives its reader by this much


class Replicas:
    """This process's part in the coordination: its heartbeat, its control stream, and what
    it learns of the others'."""

    def __init__(
        self,
        redis: Connections,
        replica_id: str,
        *,
        heartbeat_interval: float,
        heartbeat_ttl_ms: int,
        ended_ttl_ms: int,
        flush: Callable[[], Awaitable[None]],
    ) -> None:
        self._redis = redis
        self.replica_id = replica_id
        self.heartbeat_interval = heartbeat_interval
        self._heartbeat_ttl_ms = heartbeat_ttl_ms
        self._ended_ttl_ms = ended_ttl_ms  # the expiry of an interrupted session's keys
        self._flush = flush  # the store's: a stop is answered once its end is written
        self.stop_handler: StopHandler | None = None
        self.serving: set[asyncio.Task[None]] = set()  # stop requests being carried out
        self._acks: dict[str, asyncio.Future[bool]] = {}
        self._alive_until: dict[str, float] = {}  # replica -> monotonic time its beat was seen

    # --- heartbeats ------------------------------------------------------------------------

    async def beat(self) -> bool:
        """Refresh our heartbeat; False when Redis had forgotten it (restarted, or flushed)."""
        pipe = self._redis.client().pipeline(transaction=False)
        pipe.set(heartbeat_key(self.replica_id), b"1", px=self._heartbeat_ttl_ms, get=True)
        pipe.sadd(REPLICAS, self.replica_id)
        previous, _ = await pipe.execute()
        return previous is not None

    async def leave(self) -> None:
        """At close: our heartbeat, name and control stream go (a failure is left to expiry)."""
        with contextlib.suppress(*FAILURES):
            pipe = self._redis.client().pipeline(transaction=False)
            pipe.delete(heartbeat_key(self.replica_id))
            pipe.srem(REPLICAS, self.replica_id)
            pipe.delete(control_key(self.replica_id))
            await pipe.execute()

    async def is_alive(self, replica: str) -> bool:
        if replica == self.replica_id:
            return True
        now = time.monotonic()
        if self._alive_until.get(replica, 0.0) > now:
            return True
        key = heartbeat_key(replica)
        alive = bool(await self._redis.call(lambda client: client.exists(key)))
        if alive:
            self._alive_until[replica] = now + self.heartbeat_interval
        return alive

    async def interrupt(self, session_id: str, owner: str) -> bool:
        """End a session whose owner is gone `interrupted`; False if it was not (any more)."""
        keys = [meta_key(session_id), events_key(session_id)]
        args = [owner, f"replica {owner} stopped heartbeating", time.time_ns(), self._ended_ttl_ms]
        redis = self._redis
        done = await redis.call(lambda client: client.eval(scripts.INTERRUPT, 2, *keys, *args))
        await redis.call(lambda client: client.srem(owned_key(owner), session_id))
        if done:
            log.warning(
                "session %s interrupted: replica %s stopped heartbeating", session_id, owner
            )
        return bool(done)

    async def sweep(self) -> None:
        """Mark `interrupted` the streaming sessions of every process whose heartbeat is gone."""
        client = self._redis.client()
        replicas = [r.decode() for r in await client.smembers(REPLICAS)]
        others = [r for r in replicas if r != self.replica_id]
        if not others:
            return
        pipe = client.pipeline(transaction=False)
        for replica in others:
            pipe.exists(heartbeat_key(replica))
        for replica, alive in zip(others, await pipe.execute(), strict=True):
            if alive:
                continue
            for raw in await client.smembers(owned_key(replica)):
                await self.interrupt(raw.decode(), replica)
            if not await client.scard(owned_key(replica)):
                await client.srem(REPLICAS, replica)

    # --- stop requests ---------------------------------------------------------------------

    async def request_stop(self, session_id: str, state: str, reason: str) -> bool:
        """Ask the live process streaming the session to end it; True once it was asked
        (and answered, or STOP_ACK_TIMEOUT passed), False when no other live process
        streams it."""
        key = meta_key(session_id)
        fields = await self._redis.call(lambda client: client.hmget(key, "state", "owner"))
        current, owner_raw = fields
        owner = owner_raw.decode() if owner_raw else ""
        if current != STREAMING.encode() or not owner or owner == self.replica_id:
            return False
        if not await self.is_alive(owner):
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
        key = control_key(replica)
        body = {"m": json.dumps(message)}
        await self._redis.pipeline(
            lambda pipe: pipe.xadd(key, body, maxlen=1000, approximate=True).pexpire(
                key, CONTROL_EXPIRY_MS
            )
        )

    async def control_loop(self) -> None:
        """Stop requests for our sessions and answers to our own requests, from our stream."""
        redis = self._redis
        assert redis.control is not None
        key = control_key(self.replica_id)
        cursor = "0-0"
        while not redis.closing:
            try:
                reply = await redis.control.xread({key: cursor}, count=100, block=1000)
            except FAILURES as exc:
                log.debug("control stream: %s", exc)
                await asyncio.sleep(self.heartbeat_interval)
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
            self.serving.add(task)
            task.add_done_callback(self.serving.discard)
        elif "ack" in body:
            answer = self._acks.get(body["ack"])
            if answer is not None and not answer.done():
                answer.set_result(bool(body.get("ok")))

    async def _serve_stop(self, body: dict[str, Any]) -> None:
        stopped = False
        if self.stop_handler is not None:
            try:
                stopped = await self.stop_handler(body["stop"], body["state"], body["reason"])
            except Exception:
                log.exception("stop request for session %s failed", body["stop"])
        await self._flush()
        with contextlib.suppress(StorageError):
            await self._send_control(body["reply"], {"ack": body["id"], "ok": stopped})
