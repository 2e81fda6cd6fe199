"""What the sessions layer needs from a store, and nothing about how a store keeps it.

Two stores implement `SessionStore`: the on-disk segmented log (`storage.backend: disk`) and
Redis Streams (`storage.backend: redis`). The sessions layer talks only to this interface.

Event numbers are 1-based positions in a session. A batch of events is one `bytes` object,
the concatenation of the events exactly as clients receive them (the `id: n` line and the
terminating blank line included), plus the end offset of each event inside it; one batch is
whatever one upstream read produced, so the hot path does one append per read, not per event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

STREAMING = "streaming"
COMPLETE = "complete"
FAILED = "failed"
CANCELLED = "cancelled"
INTERRUPTED = "interrupted"
STATES = (STREAMING, COMPLETE, FAILED, CANCELLED, INTERRUPTED)
ENDED_WITH_ERROR = (FAILED, CANCELLED, INTERRUPTED)


class StorageError(Exception):
    """The store cannot take or give data (disk full, I/O error, Redis gone, lock held)."""


class SessionMissing(Exception):
    """No live session has this id (never made, deleted, or reclaimed).

    Storage says what happened in its own words; the HTTP layer decides what that means to a
    client (`proxy.errors.as_proxy_error`), so storage never imports it.
    """


class SessionExists(Exception):
    """A session with this id is already in the store (create is not idempotent)."""


@dataclass(frozen=True, slots=True)
class SessionMeta:
    """What is fixed when a session opens; logged once, first of all its records."""

    session_id: str
    method: str
    path: str  # path and query string, as the client sent them
    body_sha256: str  # hex digest of the request body, canonical JSON when it parses as JSON
    credential_sha256: str  # hex digest of the caller's credential, "" when absent
    created_ns: int  # wall clock, time.time_ns(), when the request arrived
    request_ns: int  # wall clock when the request was sent upstream (base of ttft)
    upstream_status: int
    headers: tuple[tuple[str, str], ...]  # response headers a replay sends again


@dataclass(slots=True)
class SessionInfo:
    """A session's current summary; the store owns and updates it."""

    meta: SessionMeta
    state: str = STREAMING
    reason: str = ""
    events: int = 0  # events readable now (handed to the OS, or fsynced under `always`)
    bytes: int = 0  # sum of the readable events' bytes
    updated_ns: int = 0  # wall clock of the last record
    first_event_ns: int | None = None  # arrival time of event 1
    storage_error: str | None = None  # set when the store failed to keep some of it
    alias: str | None = None  # a second name, learnt after the session opened (add_alias)

    @property
    def session_id(self) -> str:
        return self.meta.session_id


class Follower(Protocol):
    """A reader that is caught up with a live session and takes its next events pushed.

    The store calls `push` from the point where a batch becomes readable (after its write,
    or its fsync under `always`), synchronously, for every follower of the session: no task
    wakes up per event. A follower that cannot take the batch at once (its client's buffer
    is full, its client left, or the batch is not the one it expects next) returns False;
    the store then drops it and calls `detach`, and the reader catches up at its own pace.
    `detach` is also called when the session ends or is deleted.
    """

    next_event: int  # the event the follower expects next

    def push(self, first_event: int, data: bytes, count: int, arrival_ns: int) -> bool: ...

    def detach(self) -> None: ...


class SessionStore(Protocol):
    """The storage contract; see `proxy/storage/FORMAT.md` for the disk log's layout."""

    @property
    def healthy(self) -> bool:
        """False while the store cannot write (reported by /healthz)."""

    def stored_bytes(self) -> int:
        """Bytes the store keeps (the storage_bytes gauge), cheap enough for every scrape:
        the segment files on disk, or what Redis reports using."""
        ...

    def set_fsync_observer(self, observer: Callable[[float], None]) -> None:
        """Where the duration of each fsync goes, in seconds (the log_fsync_seconds
        histogram); set before `start`. A store that never fsyncs itself keeps none."""

    async def check_health(self) -> bool:
        """`healthy` for /healthz, re-checked (rate-limited) while it is False, so the store
        can report recovery even when no traffic writes."""

    async def start(self) -> None:
        """Open or recover; sessions found `streaming` become `interrupted`."""

    async def close(self) -> None:
        """Write and sync everything appended, release files, locks and connections."""

    async def claim(self, meta: SessionMeta) -> None:
        """Reserve a client-chosen id before `create(meta)`, atomically for every process
        sharing the store: SessionExists when another session has it (or just took it).

        Ids the proxy makes are 128 random bits and skip this; a client's own id may reach
        two replicas (or workers) at once, and exactly one of them may create it.
        """

    def create(self, meta: SessionMeta) -> SessionInfo:
        """Log a new session (state streaming). The id must not exist."""

    def append(
        self,
        session_id: str,
        first_event: int,
        data: bytes,
        ends: Sequence[int],
        arrival_ns: int,
    ) -> None:
        """Queue one batch: events first_event .. first_event+len(ends)-1.

        `ends[i]` is the end offset in `data` of event first_event+i. Never blocks: the bytes
        are written on the next loop turn (one write for every append of that turn), and
        readers are woken once they are readable. Batches of a session come in order.
        """

    def end(self, session_id: str, state: str, reason: str, ended_ns: int) -> None:
        """Queue the final state; readers are woken once it is written."""

    async def flush(self) -> None:
        """Return once everything appended so far is readable (and durable per fsync mode)."""

    async def delete(self, session_id: str) -> None:
        """Forget the session (404 from then on) once the delete is durable: a crash after
        this returns never brings it back. Its bytes are reclaimed per FORMAT.md."""

    async def get(self, session_id: str) -> SessionInfo | None: ...

    async def add_alias(self, session_id: str, alias: str) -> None:
        """Give a session a second name (one per session; the newest wins, for the session and
        for the name). Returns once `resolve_alias` finds it on every replica, durably in the
        sense of the fsync mode. The name lives and dies with the session.

        This is how a Responses API id, known only from the stream's first event, names the
        session that was opened before it: the OPEN record is long written by then.
        """

    async def resolve_alias(self, alias: str) -> str | None:
        """The id of the existing session this name was given to, or None."""

    async def list(self) -> list[SessionInfo]:
        """Every session, newest first."""

    async def page(
        self, after: SessionInfo | None, limit: int, keep: Callable[[SessionInfo], bool]
    ) -> tuple[list[SessionInfo], bool]:
        """Up to `limit` sessions that `keep` accepts, newest first (by created time, then
        id), all older than `after` when it is given; and whether more such sessions follow.
        The store keeps its index in this order, so a page costs no sort."""

    async def read(self, session_id: str, start_event: int, max_bytes: int) -> tuple[bytes, int]:
        """Bytes of events start_event.. (at least one whole event if any, then whole events up
        to max_bytes) and how many events that is; (b"", 0) when none are readable yet."""

    async def wait(self, session_id: str, after_event: int, timeout: float) -> None:
        """Until the session has more than `after_event` readable events, or has ended, or
        `timeout` seconds passed, or it was deleted. Returns without saying which."""

    async def arrivals(self, session_id: str) -> list[tuple[int, int, int]]:
        """(first_event, count, arrival_ns) per logged batch, for the latency figures."""

    async def token_secret(self) -> bytes:
        """The key of capability tokens, made once and kept for good: in the data dir, or in
        the shared store so that every replica checks the others' tokens."""

    def follow_live(self, session_id: str, follower: Follower) -> bool:
        """Push the session's events from `follower.next_event` on, as they become readable.

        Only when that event is the next one to be logged (the follower has read everything
        readable) and the session is streaming; False otherwise, or when the store cannot
        push (then the reader waits and reads as before).
        """

    def unfollow(self, session_id: str, follower: Follower) -> None:
        """Stop pushing to `follower` (no-op if it already left)."""

    def set_stop_handler(self, handler: StopHandler) -> None:
        """Where stop requests go (the local SessionManager.stop): those of other replicas,
        and the store's own for a session it can no longer log (it then ends `failed`)."""

    async def request_stop(self, session_id: str, state: str, reason: str) -> bool:
        """Ask whichever replica reads this session's upstream to end it with `state`.

        Only called when this process does not read it. A single-process store has no other
        replica and returns False; a shared store returns True once the request is delivered.
        """


StopHandler = Callable[[str, str, str], Awaitable[bool]]


def check_alias(alias: str) -> str:
    """Aliases are printable ASCII without spaces, 1 to 255 characters: they go into record
    payloads and Redis key names as they are."""
    if not 0 < len(alias) < 256 or not alias.isascii() or not alias.isprintable() or " " in alias:
        raise ValueError(f"invalid alias {alias[:40]!r}")
    return alias


def push_batch(
    followers: list[Follower], first: int, data: bytes, count: int, arrival_ns: int
) -> None:
    """Hand one batch to every caught-up follower; those that cannot take it leave."""
    gone: list[Follower] | None = None
    for follower in followers:
        if not follower.push(first, data, count, arrival_ns):
            if gone is None:
                gone = []
            gone.append(follower)
    if gone is not None:
        for follower in gone:
            followers.remove(follower)
            follower.detach()


def detach_all(followers: list[Follower] | None) -> None:
    if followers:
        for follower in followers:
            follower.detach()
