"""`DiskStore`: the SessionStore on one shared segmented log (`log.py`), driven by the loop.

Timing is the whole job of this module. Appends only frame bytes into a buffer; one
`os.write` per loop turn drains it; fsync runs on one dedicated thread (group commit under
`always`, a ticker under `interval`, nothing under `never`); readers are woken once the
records they wait for are readable in the sense of the fsync mode. Live readers near the
head are served from a small per-session tail in memory (`tail.py`). A record the disk
refuses ends its session `failed` for its readers right after its last logged event
(`_refused`), and a delete is durable before the session leaves the index
(`_delete_durably`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from proxy.config import StorageConfig
from proxy.storage.base import (
    FAILED,
    INTERRUPTED,
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
from proxy.storage.index import Pending, Segment, SessionLog
from proxy.storage.log import (
    Log,
    fsync_all,
    probe_writable,
    sync_paths,
)
from proxy.storage.records import DELETE, END, EVENTS
from proxy.storage.tail import Tail, Waiters, release
from proxy.trace import TRACE

logger = logging.getLogger("proxy.storage")

_WRITE_NOW_BYTES = 1024 * 1024  # a buffer this big is written at once, not at turn end
PROBE_INTERVAL = 1.0  # seconds between writability probes of an unhealthy store
PROBE_WAIT = 2.0  # how long /healthz waits for a probe (a hung disk stays unhealthy)
INTERRUPTED_REASON = "proxy stopped while streaming"
TOKEN_KEY_FILE = "token.key"  # the capability-token key, 32 random bytes, mode 0600


class DiskStore:
    """SessionStore on the segmented log; see FORMAT.md for what lands on disk."""

    def __init__(
        self,
        config: StorageConfig,
        *,
        clock: Callable[[], int] = time.time_ns,
        tail_bytes: int = 32768,
        read_only: bool = False,
    ) -> None:
        self._config = config
        self._directory = Path(config.dir)
        self._clock = clock
        self._tail_bytes = tail_bytes
        self._read_only = read_only
        self._log = Log(self._directory, config.segment_bytes, read_only=read_only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd = -1
        self._write_scheduled = False
        self._tails: dict[str, Tail] = {}
        # (created_ns, id) of every session, ascending: GET /sessions pages newest first
        # without sorting per call (create and delete keep it sorted with a bisect).
        self._order: list[tuple[int, str]] = []
        self._waiters = Waiters()
        self._followers: dict[str, list[Follower]] = {}
        self._dirty: dict[int, Segment] = {}  # segments written since their last fsync
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="proxy-storage-fsync")
        # Group commit (`always`): batches written but not yet covered by an fsync.
        self._commit_queue: list[tuple[list[Pending], str | None]] = []
        self._fsync_running = False
        self._written_seq = 0
        self._durable_seq = 0
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sealing: set[asyncio.Future[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._healthy = True
        self._stop: StopHandler | None = None
        self._stopping: set[asyncio.Task[bool]] = set()
        self._probe: asyncio.Future[None] | None = None
        self._probed_at = -1e9
        self._on_fsync: Callable[[float], None] | None = None  # seconds per fsync, for metrics

    @classmethod
    def open_readonly(cls, directory: str | Path) -> DiskStore:
        """Index a data dir for offline reading (the CLI): no lock, no writes, no truncation.

        Safe beside a running proxy; what it sees is the log as of this call.
        """
        store = cls(StorageConfig(dir=Path(directory)), read_only=True)
        store._recover()
        return store

    @property
    def healthy(self) -> bool:
        return self._healthy

    # lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._read_only:
            self._recover()
            return
        try:
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(
                self._directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise StorageError(
                f"cannot open data dir {self._directory}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise StorageError(f"data dir {self._directory} is in use by another process") from exc
        try:
            await asyncio.to_thread(self._log.recover)
            self._index_order()
            if self._config.fsync != "never":
                # An earlier process may have died between a write and its fsync; what it
                # left is synced before any of it is served again.
                await asyncio.to_thread(sync_paths, self._log.unsynced)
                if TRACE is not None:
                    TRACE.fsynced(0)
        except OSError as exc:
            raise StorageError(f"cannot recover {self._directory}: {exc}") from exc
        now = self._clock()
        for slog in list(self._log.sessions.values()):
            if slog.info is not None and slog.info.state == STREAMING:
                self.end(slog.session_id, INTERRUPTED, INTERRUPTED_REASON, now)
        await self.flush()
        if self._config.fsync == "interval":
            self._tasks.append(asyncio.create_task(self._fsync_ticker()))
        self._tasks.append(asyncio.create_task(self._retention_ticker()))

    def _recover(self) -> None:
        if not self._directory.is_dir():
            raise StorageError(f"data dir {self._directory} does not exist")
        try:
            self._log.recover()
        except OSError as exc:
            raise StorageError(f"cannot read {self._directory}: {exc}") from exc
        self._index_order()

    def _index_order(self) -> None:
        self._order = sorted(
            (slog.info.meta.created_ns, session_id)
            for session_id, slog in self._log.sessions.items()
            if slog.info is not None
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if not self._read_only and self._loop is not None:
            await self.flush()
            current = self._log.current
            if current is not None and self._config.fsync != "never":
                fds = self._take_unsynced()
                if current.fd not in fds:
                    fds.insert(0, current.fd)
                try:
                    await self._loop.run_in_executor(self._executor, fsync_all, fds)
                except OSError as exc:
                    self._trouble(exc, "fsync")
        self._executor.shutdown(wait=True)
        self._log.close()
        self._waiters.wake_all()
        for followers in self._followers.values():
            detach_all(followers)
        self._followers.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # the write side: never blocks, frames into the buffer

    async def claim(self, meta: SessionMeta) -> None:
        """One process owns the data dir (the lock), so the index here is the whole truth and
        `create` right after (no await between) cannot be raced."""
        if meta.session_id in self._log.sessions:
            raise SessionExists(f"session {meta.session_id} already exists")

    def create(self, meta: SessionMeta) -> SessionInfo:
        session_id = meta.session_id
        if session_id in self._log.sessions:
            raise SessionExists(f"session {session_id} already exists")
        slog = self._log.open_session(meta)
        insort(self._order, (meta.created_ns, session_id))
        self._tails[session_id] = Tail(self._tail_bytes)
        self._queued(len(self._log.buf))
        assert slog.info is not None
        return slog.info

    def append(
        self,
        session_id: str,
        first_event: int,
        data: bytes,
        ends: Sequence[int],
        arrival_ns: int,
    ) -> None:
        slog = self._live(session_id)
        info = slog.info
        if info is not None and info.storage_error is not None:
            raise StorageError(
                f"session {session_id}: the log stopped taking it: {info.storage_error}"
            )
        buffered = self._log.append_events(slog, first_event, data, ends, arrival_ns)
        tail = self._tails.get(session_id)
        if tail is not None and info is not None:
            tail.append(first_event, data, ends)
            tail.trim(info.events)
        self._queued(buffered)

    def end(self, session_id: str, state: str, reason: str, ended_ns: int) -> None:
        slog = self._live(session_id)
        if slog.ended:
            return
        error = slog.info.storage_error if slog.info is not None else None
        if error is not None:
            state, reason = FAILED, f"storage error: {error}"
        self._queued(self._log.append_end(slog, state, reason, ended_ns))

    async def add_alias(self, session_id: str, alias: str) -> None:
        slog = self._live(session_id)
        self._queued(self._log.append_alias(slog, check_alias(alias)))
        await self.flush()

    async def resolve_alias(self, alias: str) -> str | None:
        return self._log.aliases.get(alias)

    async def flush(self) -> None:
        if self._loop is None or self._read_only:
            return
        self._write()
        if self._durable_seq < self._written_seq:
            waiter = self._loop.create_future()
            self._flush_waiters.append((self._written_seq, waiter))
            await waiter
        if self._sealing:
            await asyncio.gather(*self._sealing, return_exceptions=True)

    def _live(self, session_id: str) -> SessionLog:
        slog = self._log.sessions.get(session_id)
        if slog is None or slog.info is None:
            raise SessionMissing(f"session {session_id} not found")
        return slog

    def _queued(self, buffered: int) -> None:
        """A record was framed (`buffered` bytes wait): write now, or at the turn's end."""
        if self._read_only:
            raise StorageError("the store was opened read-only")
        if buffered >= _WRITE_NOW_BYTES:
            self._write()
        elif not self._write_scheduled:
            self._write_scheduled = True
            assert self._loop is not None, "DiskStore.start() was not awaited"
            self._loop.call_soon(self._write)

    def _write(self) -> None:
        """Drain the buffer with one os.write, then publish or hand over to the fsync thread."""
        self._write_scheduled = False
        if not self._log.pending:
            return
        records, result_written, error, sealed, touched = self._log.write()
        for segment in touched:
            self._dirty[segment.base] = segment
        for segment in sealed:
            self._seal(segment)
        ok = records[:result_written]
        failed = records[result_written:]
        message = None
        if error is not None:
            message = self._trouble(error, "write")
            for record in failed:
                if record.slog.info is not None:
                    record.slog.info.storage_error = message
        else:
            self._recovered()
        if self._config.fsync == "always":
            if ok:
                self._commit_queue.append((ok, None))
            if failed:
                self._commit_queue.append((failed, message))
            self._written_seq += 1
            if TRACE is not None:
                _trace_written(ok, self._written_seq)
            self._kick_fsync()
        else:
            self._publish(ok, None)
            self._publish(failed, message)

    def _seal(self, segment: Segment) -> None:
        assert self._loop is not None
        self._dirty.pop(segment.base, None)
        job = self._loop.run_in_executor(
            self._executor, self._log.seal_job(segment, self._config.fsync != "never")
        )
        self._sealing.add(job)
        job.add_done_callback(partial(self._sealed, segment))

    def _sealed(self, segment: Segment, job: asyncio.Future[None]) -> None:
        self._sealing.discard(job)
        error = job.exception()
        if isinstance(error, OSError):
            self._trouble(error, "fsync at segment roll")
        elif error is not None:
            logger.error("storage: sealing %s failed: %r", segment.path, error)
        self._log.sealed(segment)

    def _take_unsynced(self) -> list[int]:
        """What the next fsync covers: the segments written since their last fsync, then the
        data dir if a segment was created since (its name must be as durable as its bytes)."""
        fds = [segment.fd for segment in self._dirty.values()]
        self._dirty.clear()
        directory = self._log.take_directory_fd()
        if directory is not None:
            fds.append(directory)
        return fds

    def _kick_fsync(self) -> None:
        """Start one fsync covering every batch queued so far, unless one is running."""
        if self._fsync_running or not self._commit_queue:
            return
        assert self._loop is not None
        batches, self._commit_queue = self._commit_queue, []
        fds = self._take_unsynced()
        self._fsync_running = True
        job = self._loop.run_in_executor(self._executor, fsync_all, fds)
        job.add_done_callback(partial(self._fsynced, batches, self._written_seq))

    def _fsynced(
        self, batches: list[tuple[list[Pending], str | None]], seq: int, job: asyncio.Future[None]
    ) -> None:
        self._fsync_running = False
        error = job.exception()
        message = self._trouble(error, "fsync") if isinstance(error, OSError) else None
        if error is not None and message is None:
            logger.error("storage: fsync failed: %r", error)
            message = repr(error)
        if error is None:
            self._observe_fsync(job.result())
            if TRACE is not None:
                TRACE.fsynced(seq)
        for records, write_error in batches:
            self._publish(records, write_error or message)
        self._durable_seq = seq
        ready = [waiter for target, waiter in self._flush_waiters if target <= seq]
        self._flush_waiters = [item for item in self._flush_waiters if item[0] > seq]
        release(ready)
        self._kick_fsync()

    def _publish(self, records: Sequence[Pending], error: str | None) -> None:
        """Make written records visible: update the sessions' infos, push new events to the
        followers that are caught up, and wake the readers waiting for them.

        This is the one point where an event becomes readable (after its `os.write`, or
        after the fsync covering it under `always`), so it is also the only place a live
        event is handed to clients: no client can see an event the log does not have.
        """
        waiters = self._waiters
        followers = self._followers
        for record in records:
            slog = record.slog
            rtype = record.rtype
            if rtype == DELETE:
                _settle(record.extra, error)
                continue
            info = slog.info
            if info is None:
                continue
            if error is not None:
                self._refused(slog, info, error)
                continue
            if info.storage_error is not None and rtype == EVENTS:
                continue  # the log refused an earlier batch: readers stop before the gap
            session_id = slog.session_id
            if rtype == EVENTS:
                first = record.first_event
                last = first + record.count - 1
                if last > info.events:
                    info.events = last
                info.bytes += record.data_len
                if first == 1:
                    info.first_event_ns = record.stamp_ns
                info.updated_ns = record.stamp_ns
                live = followers.get(session_id)
                if live and not slog.deleted:
                    push_batch(live, first, record.extra, record.count, record.stamp_ns)
            elif rtype == END:
                info.state, info.reason, info.updated_ns = record.extra
                self._tails.pop(session_id, None)
                detach_all(followers.pop(session_id, None))
            else:
                continue
            if not slog.deleted:
                waiters.wake(session_id)

    def _refused(self, slog: SessionLog, info: SessionInfo, error: str) -> None:
        """The log could not keep a record of this session (disk full, I/O error, fsync).

        An event reaches clients only once the log has it, so the session ends `failed` for
        its readers right after its last logged event (live followers are let go, to catch
        up and see the end); its upstream read is stopped too (no later event could be shown
        after the gap).
        """
        info.storage_error = error
        session_id = slog.session_id
        if info.state == STREAMING:
            info.state, info.reason = FAILED, f"storage error: {error}"
            info.updated_ns = self._clock()
            if self._stop is not None and self._loop is not None:
                task = self._loop.create_task(self._stop(session_id, info.state, info.reason))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        detach_all(self._followers.pop(session_id, None))
        if not slog.deleted:
            self._waiters.wake(session_id)

    def follow_live(self, session_id: str, follower: Follower) -> bool:
        slog = self._log.sessions.get(session_id)
        info = None if slog is None else slog.info
        if (
            info is None
            or info.state != STREAMING
            or slog is None
            or slog.ended
            or info.events != follower.next_event - 1
        ):
            return False
        self._followers.setdefault(session_id, []).append(follower)
        return True

    def unfollow(self, session_id: str, follower: Follower) -> None:
        live = self._followers.get(session_id)
        if live is not None and follower in live:
            live.remove(follower)
            if not live:
                del self._followers[session_id]

    def set_fsync_observer(self, observer: Callable[[float], None]) -> None:
        self._on_fsync = observer

    def _observe_fsync(self, seconds: float) -> None:
        if self._on_fsync is not None:
            self._on_fsync(seconds)

    def stored_bytes(self) -> int:
        """Bytes of segment files on disk (the data-dir size metric)."""
        return self._log.total_bytes()

    def _trouble(self, error: OSError, action: str) -> str:
        """Note a disk failure; logged once per episode, not once per write."""
        message = f"{action} failed: {error.strerror or error}"
        if self._healthy:
            if self._loop is not None:
                self._probed_at = self._loop.time()  # the first probe waits an interval
            logger.error(
                "storage: %s in %s; the sessions it held end failed, /healthz answers 503 "
                "until the disk takes writes again",
                message,
                self._directory,
            )
            self._healthy = False
        return message

    async def check_health(self) -> bool:
        """`healthy`, re-checked by a probe while it is False.

        Only a successful write turns the store healthy again, and while `/healthz` says 503
        a load balancer may send no traffic that would write: so an unhealthy store probes
        the data dir itself (a tiny write and fsync off the loop, at most once per
        `PROBE_INTERVAL`), and freeing disk space is enough to get back to 200.
        """
        if self._healthy or self._read_only or self._loop is None:
            return self._healthy
        self._start_probe()
        if self._probe is not None:
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(asyncio.shield(self._probe), PROBE_WAIT)
        return self._healthy

    def _start_probe(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        if self._probe is None and now - self._probed_at >= PROBE_INTERVAL:
            self._probed_at = now
            probe = self._loop.run_in_executor(None, probe_writable, self._directory)
            probe.add_done_callback(self._probed)
            self._probe = probe

    def _probed(self, probe: asyncio.Future[None]) -> None:
        self._probe = None
        if not probe.cancelled() and probe.exception() is None and not self._healthy:
            self._healthy = True
            logger.warning("storage: writes to %s succeed again", self._directory)

    def _recovered(self) -> None:
        """A write went through. On a disk that was full, a small record may fit in what a
        truncated failed write freed, so only the probe (room for PROBE_BYTES) says healthy."""
        if not self._healthy:
            self._start_probe()

    # background tasks

    async def _fsync_ticker(self) -> None:
        assert self._loop is not None
        interval = self._config.fsync_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            if not self._dirty:
                continue
            fds = self._take_unsynced()
            try:
                elapsed = await self._loop.run_in_executor(self._executor, fsync_all, fds)
            except OSError as exc:
                self._trouble(exc, "fsync")
            else:
                self._observe_fsync(elapsed)

    async def _retention_ticker(self) -> None:
        period = max(0.5, min(60.0, self._config.retention.ttl / 10))
        while True:
            await asyncio.sleep(period)
            try:
                await self.retention_pass()
            except StorageError as exc:
                logger.warning("storage: retention pass left for later: %s", exc)
            except Exception:  # retention must never stop for good
                logger.exception("storage: retention pass failed")

    async def retention_pass(self, now_ns: int | None = None) -> int:
        """Delete finished sessions past the ttl, then oldest first while over max_bytes;
        reclaim the segments that frees. Returns how many sessions were deleted.

        Every victim's DELETE record is on disk before any of them leaves the index or any
        segment is unlinked, so a crash inside a pass brings sessions back whole or not at
        all (`_delete_durably`).
        """
        now = self._clock() if now_ns is None else now_ns
        ttl_ns = int(self._config.retention.ttl * 1e9)
        finished = sorted(
            (
                slog
                for slog in self._log.sessions.values()
                if slog.info is not None and slog.info.state != STREAMING
            ),
            key=lambda slog: slog.info.updated_ns if slog.info is not None else 0,
        )
        victims: list[SessionLog] = []
        for slog in finished:
            info = slog.info
            assert info is not None
            if now - info.updated_ns <= ttl_ns:
                break
            victims.append(slog)
        max_bytes = self._config.retention.max_bytes
        if max_bytes is not None:
            freeable = _Freeable(self._log)
            for slog in victims:
                freeable.add(slog)
            for slog in finished[len(victims) :]:
                if self._log.total_bytes() - freeable.bytes <= max_bytes:
                    break
                victims.append(slog)
                freeable.add(slog)
        if victims:
            await self._delete_durably(victims, now)
        self._log.reclaim(list(self._log.segments.values()))
        return len(victims)

    # the read side

    async def delete(self, session_id: str) -> None:
        slog = self._log.sessions.get(session_id)
        if slog is not None:
            await self._delete_durably([slog], self._clock())

    async def _delete_durably(self, slogs: Sequence[SessionLog], now_ns: int) -> None:
        """Log a DELETE record per session, wait until the records are on disk (fsynced,
        even under `interval`, unless `never`), and only then forget the sessions and
        unlink the segments they alone held.

        Until then the sessions stay readable: a crash before this returns finds them whole
        after the restart (the delete was never acknowledged), a crash after it never finds
        them. Raises StorageError, forgetting nothing, when the records cannot be written.
        """
        assert self._loop is not None, "DiskStore.start() was not awaited"
        written: list[asyncio.Future[str | None]] = []
        for slog in slogs:
            done: asyncio.Future[str | None] = self._loop.create_future()
            self._queued(self._log.append_delete(slog, now_ns, done))
            written.append(done)
        errors = await asyncio.gather(*written)
        error = next((message for message in errors if message is not None), None)
        if error is None and self._config.fsync == "interval":
            error = await self._fsync_now()
        if error is not None:
            raise StorageError(f"cannot log the delete: {error}")
        for slog in slogs:
            self._forget(slog)
        segments = self._log.segments
        held = {run.segment for slog in slogs for run in slog.runs}
        self._log.reclaim([segments[base] for base in held if base in segments])

    async def _fsync_now(self) -> str | None:
        """fsync every segment written since its last fsync, now rather than at the next
        tick; the error message, or None. It queues behind any fsync already running on the
        fsync thread, so it also waits for that one."""
        assert self._loop is not None
        if self._sealing:
            await asyncio.gather(*self._sealing, return_exceptions=True)
        fds = self._take_unsynced()
        try:
            elapsed = await self._loop.run_in_executor(self._executor, fsync_all, fds)
        except OSError as exc:
            return self._trouble(exc, "fsync")
        self._observe_fsync(elapsed)
        return None

    def _forget(self, slog: SessionLog) -> None:
        """Drop a session whose DELETE record is durable: 404 from now on, readers woken."""
        if self._log.forget(slog) and slog.info is not None:
            key = (slog.info.meta.created_ns, slog.session_id)
            position = bisect_left(self._order, key)
            if position < len(self._order) and self._order[position] == key:
                del self._order[position]
        self._tails.pop(slog.session_id, None)
        detach_all(self._followers.pop(slog.session_id, None))
        self._waiters.wake(slog.session_id)

    async def get(self, session_id: str) -> SessionInfo | None:
        slog = self._log.sessions.get(session_id)
        return None if slog is None else slog.info

    async def list(self) -> list[SessionInfo]:
        sessions = self._log.sessions
        infos = (sessions[session_id].info for _, session_id in reversed(self._order))
        return [info for info in infos if info is not None]

    async def page(
        self, after: SessionInfo | None, limit: int, keep: Callable[[SessionInfo], bool]
    ) -> tuple[list[SessionInfo], bool]:
        order = self._order
        sessions = self._log.sessions
        position = len(order)
        if after is not None:
            position = bisect_left(order, (after.meta.created_ns, after.session_id))
        found: list[SessionInfo] = []
        while position > 0:
            position -= 1
            slog = sessions.get(order[position][1])
            info = None if slog is None else slog.info
            if info is not None and keep(info):
                if len(found) == limit:
                    return found, True
                found.append(info)
        return found, False

    async def read(self, session_id: str, start_event: int, max_bytes: int) -> tuple[bytes, int]:
        slog = self._live(session_id)
        info = slog.info
        assert info is not None
        start_event = max(start_event, 1)
        last = info.events
        if start_event > last:
            return b"", 0
        tail = self._tails.get(session_id)
        if tail is not None:
            held = tail.read(start_event, last, max_bytes)
            if held is not None:
                return held
        return self._log.read_events(slog, start_event, last, max_bytes)

    async def wait(self, session_id: str, after_event: int, timeout: float) -> None:
        slog = self._log.sessions.get(session_id)
        if slog is None or slog.info is None or self._loop is None:
            return
        info = slog.info
        if info.events > after_event or info.state != STREAMING or timeout <= 0:
            return
        await self._waiters.wait(session_id, timeout)

    async def arrivals(self, session_id: str) -> list[tuple[int, int, int]]:
        slog = self._live(session_id)
        assert slog.info is not None
        readable = slog.info.events
        return [
            (first, count, arrival)
            for run in slog.event_runs
            for first, count, arrival in zip(
                run.first_events, run.counts, run.arrivals, strict=True
            )
            if first <= readable
        ]

    def set_stop_handler(self, handler: StopHandler) -> None:
        """One process owns the data dir (the lock), so every live session is read here and
        stop requests never come from other replicas; the store itself uses the handler to
        end the upstream read of a session the log refused (`_refused`)."""
        self._stop = handler

    async def token_secret(self) -> bytes:
        """Made on the first start and kept beside the log, so tokens outlive restarts."""
        return await asyncio.to_thread(load_or_create_key, self._directory / TOKEN_KEY_FILE)

    async def request_stop(self, session_id: str, state: str, reason: str) -> bool:
        return False


class _Freeable:
    """Bytes that reclaiming would free once the sessions added here are deleted.

    Retention under `max_bytes` picks its victims before deleting any (their DELETE records
    must be durable first), so it cannot watch the log shrink as it goes; this counts the
    sealed segments whose every holder is deleted or picked.
    """

    def __init__(self, log: Log) -> None:
        self._log = log
        self._picked: set[SessionLog] = set()
        self._counted: set[int] = set()
        self.bytes = 0

    def add(self, slog: SessionLog) -> None:
        self._picked.add(slog)
        for run in slog.runs:
            segment = self._log.segments.get(run.segment)
            if (
                segment is None
                or segment.base in self._counted
                or segment is self._log.current
                or not segment.sealed
            ):
                continue
            if all(holder.deleted or holder in self._picked for holder in segment.holders):
                self._counted.add(segment.base)
                self.bytes += segment.size


def load_or_create_key(path: Path) -> bytes:
    """The key in `path`, or a new random one put there.

    The key is written whole to a temporary file first and then linked into place, so a crash
    at any moment leaves either no key or a complete one, never a short one that would change
    every token after the restart; `link` fails if another process got there first.
    """
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != 32:
        raise StorageError(f"{path}: expected a 32-byte key, found {len(key)} bytes")
    return key


def _trace_written(records: Sequence[Pending], commit: int) -> None:
    assert TRACE is not None
    for record in records:
        if record.rtype == EVENTS:
            TRACE.written(record.slog.session_id, record.first_event + record.count - 1, commit)


def _settle(done: asyncio.Future[str | None], error: str | None) -> None:
    """Tell a durable delete whether its record reached the disk."""
    if not done.done():
        done.set_result(error)
