"""What both stores keep in memory of a live session: its newest batches, and its waiters.

Readers near the head of a live session (a client back after a blip, a follower that fell a
little behind, the readers of another process's session a follow read brought in) take
their events from a `Tail` without a syscall or a Redis round trip, as the very `bytes` the
upstream read produced, shared and not copied. The disk store keeps one per streaming
session; the Redis store one per session it streams and one per session another process
streams that readers here follow. Readers that fell further behind read the log (or Redis),
which cut events by the same rule, `take_events`.

`Waiters` parks readers until a session has news (more readable events, its end, its
delete) or their timeout passes; the store wakes a session's waiters where that news becomes
readable.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence

Batch = tuple[int, bytes, Sequence[int]]  # first event, the events' bytes, their end offsets


def take_events(
    ends: Sequence[int], first: int, start_event: int, last_event: int, budget: int, have: int
) -> tuple[int, int, int]:
    """Which events of one batch a read returns: (byte start, byte end, event count).

    `ends[i]` ends event `first + i`. Events before `start_event` or after `last_event` (the
    readable end) are left out; whole events are taken while they fit in `budget` bytes, but
    at least one when the read has none yet (`have` == 0), so a single event larger than the
    budget still makes progress.
    """
    skip = start_event - first if start_event > first else 0
    stop = min(len(ends), last_event - first + 1)
    if skip >= stop:
        return 0, 0, 0
    lo = ends[skip - 1] if skip else 0
    fit = bisect_right(ends, lo + budget, skip, stop)
    if fit == skip:
        if have:
            return lo, lo, 0
        fit = skip + 1
    return lo, ends[fit - 1], fit - skip


class Tail:
    """The newest batches of one session, oldest first, about `budget` bytes of them.

    One tuple per batch (per upstream read), nothing per event. Batches come in order and
    without gaps (the stores append them as the upstream read produced them).
    """

    __slots__ = ("_batches", "budget", "nbytes")

    def __init__(self, budget: int) -> None:
        self._batches: deque[Batch] = deque()
        self.budget = budget
        self.nbytes = 0  # bytes of the batches held

    def append(self, first_event: int, data: bytes, ends: Sequence[int]) -> None:
        """Keep a batch; it may not be readable yet (`trim` keeps it until it is)."""
        self._batches.append((first_event, data, ends))
        self.nbytes += len(data)

    def trim(self, readable: int) -> None:
        """Drop the oldest batches while over budget, but never the newest one, nor one with
        an event beyond `readable`: a batch not yet readable may be the only copy a reader
        will get (Redis missed it, or its write is still on the way)."""
        batches = self._batches
        while self.nbytes > self.budget and len(batches) > 1:
            first, data, ends = batches[0]
            if first + len(ends) - 1 > readable:
                return
            batches.popleft()
            self.nbytes -= len(data)

    def read(self, start_event: int, last_event: int, max_bytes: int) -> tuple[bytes, int] | None:
        """Events start_event..last_event: at least one whole event if any is readable, then
        whole events up to max_bytes, and how many; None when the tail no longer holds
        start_event (the caller reads the log).

        The batch holding start_event is looked for from the newest end: a live reader asks
        for the newest events, so that is one step however long the tail.
        """
        batches = self._batches
        holder = len(batches) - 1
        while holder >= 0 and batches[holder][0] > start_event:
            holder -= 1
        if holder < 0:
            return None
        parts: list[bytes] = []
        events = 0
        budget = max_bytes
        expected = start_event
        for position in range(holder, len(batches)):
            first, data, ends = batches[position]
            if first > last_event:
                break  # not readable yet
            if first > expected:
                break  # a gap would break the no-gap promise: the read ends before it
            lo, hi, taken = take_events(ends, first, expected, last_event, budget, events)
            if taken:
                parts.append(data if hi - lo == len(data) else data[lo:hi])
                events += taken
                budget -= hi - lo
                expected += taken
            if expected <= first + len(ends) - 1:
                break  # the budget, or the readable end, is inside this batch
        return b"".join(parts), events


class Waiters:
    """Readers parked per session until `wake` or their timeout: one future each, no task."""

    __slots__ = ("_parked",)

    def __init__(self) -> None:
        self._parked: dict[str, list[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        """Sessions with a parked reader (a reader that timed out leaves nothing behind)."""
        return len(self._parked)

    async def wait(self, session_id: str, timeout: float) -> None:
        """Until the session's waiters are woken, or `timeout` seconds passed. The caller
        checks first that there is nothing to read yet, with no await in between."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        parked = self._parked.setdefault(session_id, [])
        parked.append(waiter)
        timer = loop.call_later(timeout, release, (waiter,))
        try:
            await waiter
        finally:
            timer.cancel()
            current = self._parked.get(session_id)
            if current is not None and waiter in current:
                current.remove(waiter)
                if not current:
                    del self._parked[session_id]

    def wake(self, session_id: str) -> None:
        """The session has news: every reader parked on it returns."""
        parked = self._parked.pop(session_id, None)
        if parked:
            release(parked)

    def wake_all(self) -> None:
        parked, self._parked = self._parked, {}
        for waiters in parked.values():
            release(waiters)


def release(waiters: Sequence[asyncio.Future[None]]) -> None:
    """Resolve futures nobody resolved yet (a timer and a wake may race for one)."""
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
