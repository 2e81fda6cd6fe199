"""`tail.py`, which both stores serve live readers from: any split of a session's events into
batches reads back the same for every start, readable end and byte budget; trimming keeps
every batch a reader could still need; and parked readers wake exactly when told to."""

from __future__ import annotations

import asyncio
from itertools import combinations

import pytest

from proxy.storage.tail import Tail, Waiters

# Events of different sizes, so a byte budget falls inside, at, or past an event's end.
EVENTS = [
    b"id: %d\ndata: %s\n\n" % (n, b"x" * size) for n, size in enumerate((3, 9, 1, 14, 5, 7), 1)
]
COUNT = len(EVENTS)
SIZES = sorted({1, 17, 18, 24, 30, 40, 48, 60, 100, 1 << 20} | {len(e) for e in EVENTS})


def splits(count: int) -> list[list[tuple[int, int]]]:
    """Every way to cut events 1..count into consecutive batches, as (first, last) pairs."""
    result = []
    for cuts_taken in range(count):
        for cuts in combinations(range(2, count + 1), cuts_taken):
            firsts = [1, *cuts]
            lasts = [first - 1 for first in firsts[1:]] + [count]
            result.append(list(zip(firsts, lasts, strict=True)))
    return result


def tail_of(batches: list[tuple[int, int]], budget: int = 1 << 20) -> Tail:
    tail = Tail(budget)
    for first, last in batches:
        data = b"".join(EVENTS[first - 1 : last])
        ends = []
        for n in range(first, last + 1):
            ends.append((ends[-1] if ends else 0) + len(EVENTS[n - 1]))
        tail.append(first, data, ends)
    return tail


def expected(start: int, last: int, max_bytes: int) -> tuple[bytes, int]:
    """The rule on a flat list: whole events from `start` up to `last` while they fit in
    `max_bytes`, but at least one."""
    taken: list[bytes] = []
    for event in EVENTS[start - 1 : last]:
        if taken and sum(map(len, taken)) + len(event) > max_bytes:
            break
        taken.append(event)
    return b"".join(taken), len(taken)


def test_every_split_reads_back_identically_for_every_start_end_and_budget() -> None:
    cases = 0
    for batches in splits(COUNT):
        tail = tail_of(batches)
        for last in range(1, COUNT + 1):
            for start in range(1, COUNT + 2):
                for max_bytes in SIZES:
                    got = tail.read(start, last, max_bytes)
                    assert got == expected(start, last, max_bytes), (batches, start, last)
                    cases += 1
    assert cases == 2 ** (COUNT - 1) * COUNT * (COUNT + 1) * len(SIZES)


@pytest.mark.parametrize("max_bytes", [1, 25, 64, 1 << 20])
def test_reading_on_from_each_answer_gives_every_event_once(max_bytes: int) -> None:
    for batches in splits(COUNT):
        tail = tail_of(batches)
        out, start = b"", 1
        while True:
            got = tail.read(start, COUNT, max_bytes)
            assert got is not None
            data, count = got
            if not count:
                break
            out, start = out + data, start + count
        assert out == b"".join(EVENTS), batches


def oldest_held(tail: Tail) -> int | None:
    """The first event of the oldest batch the tail still holds."""
    held = [start for start in range(1, COUNT + 1) if tail.read(start, COUNT, 1 << 20)]
    return held[0] if held else None


def size_from(first: int) -> int:
    """Bytes of events first.. (every split ends at the last event)."""
    return sum(len(event) for event in EVENTS[first - 1 :])


@pytest.mark.parametrize(
    ("batches", "budget", "readable", "oldest"),
    [
        # (first, last) of each batch appended; budget in bytes; readable end; oldest kept
        ([(1, 2), (3, 4), (5, 6)], 1 << 20, 6, 1),  # under budget: nothing goes
        ([(1, 2), (3, 4), (5, 6)], 1, 6, 5),  # over: down to the newest, never less
        ([(1, 2), (3, 4), (5, 6)], 1, 4, 5),
        ([(1, 2), (3, 4), (5, 6)], 1, 3, 3),  # event 4 is not readable: 3..4 stays
        ([(1, 2), (3, 4), (5, 6)], 1, 0, 1),  # nothing readable: all stay
        ([(1, 2), (3, 4), (5, 6)], 90, 6, 3),  # oldest first, until within budget
        ([(1, 6)], 1, 6, 1),
    ],
)
def test_trim_keeps_the_newest_batch_and_every_one_not_yet_readable(
    batches: list[tuple[int, int]], budget: int, readable: int, oldest: int
) -> None:
    tail = tail_of(batches, budget)
    tail.trim(readable)
    assert oldest_held(tail) == oldest
    assert tail.nbytes == size_from(oldest)
    for start in range(1, COUNT + 1):
        got = tail.read(start, readable, 1 << 20)
        if start < oldest:
            assert got is None  # the reader goes to the log, which has it
        else:
            assert got == expected(start, readable, 1 << 20)


def test_trim_drops_only_readable_batches_and_stops_within_budget() -> None:
    for batches in splits(COUNT):
        for budget in (1, 30, 60, 1 << 20):
            for readable in range(COUNT + 1):
                tail = tail_of(batches, budget)
                tail.trim(readable)
                oldest = oldest_held(tail)
                assert oldest is not None and oldest <= batches[-1][0]  # the newest stays
                assert all(first >= oldest for first, last in batches if last > readable)
                held = [(first, last) for first, last in batches if first >= oldest]
                assert tail.nbytes == size_from(oldest)
                # It stopped for a reason: within budget, an unreadable batch, or the last.
                assert tail.nbytes <= budget or held[0][1] > readable or len(held) == 1
                # Nothing it dropped could be needed: all of it was readable (in the log).
                assert all(last <= readable for first, last in batches if first < oldest)


def test_a_read_stops_before_a_gap_and_never_skips_events() -> None:
    tail = Tail(1 << 20)
    tail.append(1, EVENTS[0] + EVENTS[1], [len(EVENTS[0]), len(EVENTS[0]) + len(EVENTS[1])])
    tail.append(5, EVENTS[4], [len(EVENTS[4])])  # events 3 and 4 never came
    assert tail.read(1, 5, 1 << 20) == (EVENTS[0] + EVENTS[1], 2)
    assert tail.read(3, 5, 1 << 20) == (b"", 0)  # not in memory, and not to be skipped
    assert tail.read(5, 5, 1 << 20) == (EVENTS[4], 1)


def test_an_empty_tail_holds_nothing() -> None:
    assert Tail(100).read(1, 1, 100) is None


async def test_wake_returns_every_reader_of_that_session_and_no_other() -> None:
    waiters = Waiters()
    mine = [asyncio.create_task(waiters.wait("s1", 3600)) for _ in range(3)]
    other = asyncio.create_task(waiters.wait("s2", 3600))
    await asyncio.sleep(0)
    assert len(waiters) == 2
    waiters.wake("s1")
    await asyncio.wait_for(asyncio.gather(*mine), 5)
    assert not other.done() and len(waiters) == 1
    waiters.wake_all()
    await asyncio.wait_for(other, 5)
    assert len(waiters) == 0


async def test_a_timed_out_or_cancelled_reader_leaves_nothing_behind() -> None:
    waiters = Waiters()
    await asyncio.wait_for(waiters.wait("s1", 0.01), 5)
    cancelled = asyncio.create_task(waiters.wait("s1", 3600))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert len(waiters) == 0
    waiters.wake("s1")  # nobody parked: nothing to do


async def test_a_wake_before_the_wait_does_not_count_for_it() -> None:
    """Readers check for news first, then park: a wake has to reach the parked future."""
    waiters = Waiters()
    waiters.wake("s1")
    parked = asyncio.create_task(waiters.wait("s1", 3600))
    await asyncio.sleep(0.01)
    assert not parked.done()
    waiters.wake("s1")
    await asyncio.wait_for(parked, 5)
