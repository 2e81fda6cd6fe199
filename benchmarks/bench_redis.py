"""How fast is the Redis store? Appends, and replay from Redis, beside `bench_log.py`'s disk log.

    python benchmarks/bench_redis.py [--quick] [--redis-url URL] [--json PATH]

Without `--redis-url` it starts its own `redis-server` (loopback, free port, no
persistence) and stops it at the end. Events are 200 bytes, as in bench_log.py: "1/batch"
writers append one event per append and yield to the loop after each (one upstream read per
loop turn), "20/batch" writers append 20 events per append. Appends/s counts events until a
final `flush()` saw Redis acknowledge them all. Replay reads one finished session through a
second store (another replica, so every read is an XRANGE, not the local tail) with 256 KiB
reads, like a resuming client.

The paced rows are the hot path as a proxy sees it: 100 sessions each appending one event
every 20 ms (5,000 events/s, as in run.py's latency workload), every session followed by one
reader that does what `proxy.readers.follow` does (read; once caught up, take pushed events
where the store pushes them, else wait and read again). Readers are on the owning store
("local": pushed from its memory as Redis acknowledges) or on a second store ("remote":
another replica, woken by its XREAD). Each row gives the delay from `append` to the reader
holding the event (p50/p99), this process's CPU per event (writers and readers together)
and, with its own redis-server, that server's CPU per event and the Redis calls per event by
kind. The same local row on the disk store (`fsync: interval`) is the baseline the Redis
store is held to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_log import make_batch, make_meta
from procs import Server, cpu_seconds, start_redis
from redis.asyncio import Redis

from proxy.config import StorageConfig
from proxy.storage.base import COMPLETE, STREAMING, SessionStore
from proxy.storage.disk import DiskStore
from proxy.storage.redis import RedisStore

READ_BYTES = 256 * 1024


async def opened(url: str) -> RedisStore:
    store = RedisStore(StorageConfig(backend="redis", redis_url=url))
    await store.start()
    return store


async def bench_appends(url: str, writers: int, per_batch: int, total_events: int) -> float:
    store = await opened(url)
    data, ends = make_batch(per_batch)
    appends_each = max(1, total_events // (writers * per_batch))
    run = time.monotonic_ns()

    async def writer(session_id: str) -> None:
        store.create(make_meta(session_id))
        event = 1
        for _ in range(appends_each):
            store.append(session_id, event, data, ends, time.time_ns())
            event += per_batch
            await asyncio.sleep(0)
        store.end(session_id, COMPLETE, "", time.time_ns())

    started = time.perf_counter()
    await asyncio.gather(*(writer(f"w{run}-{n:05d}") for n in range(writers)))
    await store.flush()
    elapsed = time.perf_counter() - started
    await store.close()
    return appends_each * writers * per_batch / elapsed


async def bench_replay(url: str, megabytes: int, per_batch: int) -> float:
    writer = await opened(url)
    session_id = f"replay-{per_batch}-{time.monotonic_ns()}"
    writer.create(make_meta(session_id))
    data, ends = make_batch(per_batch)
    event = 1
    for _ in range(megabytes * 1024 * 1024 // len(data)):
        writer.append(session_id, event, data, ends, time.time_ns())
        event += per_batch
        if event % 2000 < per_batch:
            await writer.flush()  # keep pipelines to a sane size
    writer.end(session_id, COMPLETE, "", time.time_ns())
    await writer.flush()
    await writer.close()

    reader = await opened(url)
    info = await reader.get(session_id)
    assert info is not None and info.events == event - 1
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        position, total = 1, 0
        while position <= info.events:
            chunk, count = await reader.read(session_id, position, READ_BYTES)
            position += count
            total += len(chunk)
        best = max(best, total / (time.perf_counter() - started) / 1e6)
    await reader.close()
    return best


async def bench_remote_get(url: str, rounds: int) -> float:
    """get() of a streaming session owned by another replica: what a remote live follower
    pays per wake-up besides the read."""
    owner, other = await opened(url), await opened(url)
    owner.create(make_meta("get-probe"))
    data, ends = make_batch(1)
    owner.append("get-probe", 1, data, ends, time.time_ns())
    await owner.flush()
    started = time.perf_counter()
    for _ in range(rounds):
        await other.get("get-probe")
    elapsed = time.perf_counter() - started
    await other.close()
    await owner.close()
    return elapsed / rounds * 1e6


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _command_calls(url: str) -> dict[str, int]:
    client = Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return {name[len("cmdstat_") :]: int(row["calls"]) for name, row in stats.items()}


class _Pushed:
    """A caught-up reader the store pushes events to (`proxy.readers.LiveWriter`'s part in
    `follow_live`), recording each event's delay instead of writing it to a client."""

    def __init__(self, next_event: int, sent: list[int], delays: list[float]) -> None:
        self.next_event = next_event
        self._sent = sent
        self._delays = delays
        self.detached = asyncio.get_running_loop().create_future()

    def push(self, first_event: int, data: bytes, count: int, arrival_ns: int) -> bool:
        if first_event != self.next_event:
            return False
        now = time.perf_counter_ns()
        self._delays.extend(
            (now - self._sent[n]) / 1e6 for n in range(first_event, first_event + count)
        )
        self.next_event += count
        return True

    def detach(self) -> None:
        if not self.detached.done():
            self.detached.set_result(None)


async def _follow(
    store: SessionStore, session_id: str, sent: list[int], delays: list[float]
) -> None:
    """What `proxy.readers.follow` asks of a store, without the HTTP around it: read until
    caught up, then take pushed events where the store pushes, else wait and read."""
    next_event = 1
    while True:
        _, count = await store.read(session_id, next_event, 256 * 1024)
        if count:
            now = time.perf_counter_ns()
            delays.extend((now - sent[n]) / 1e6 for n in range(next_event, next_event + count))
            next_event += count
            continue
        info = await store.get(session_id)
        if info is None or (info.state != STREAMING and info.events < next_event):
            return
        if info.state != STREAMING:
            continue
        pushed = _Pushed(next_event, sent, delays)
        if store.follow_live(session_id, pushed):
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pushed.detached), 15.0)
            finally:
                store.unfollow(session_id, pushed)
            next_event = pushed.next_event
            continue
        await store.wait(session_id, next_event - 1, 15.0)


async def bench_paced(
    open_writer: Callable[[], Any],
    open_reader: Callable[[], Any] | None,
    sessions: int,
    seconds: float,
    redis: tuple[str, int | None] | None,
) -> dict[str, Any]:
    """`sessions` streams at 50 events/s for `seconds`, one reader each (see the docstring).

    Every stream first logs one event and waits until its reader has it, so connections and
    first reads are made before the clocks start: the figures are the steady state.
    """
    writer_store: SessionStore = await open_writer()
    reader_store: SessionStore = await open_reader() if open_reader else writer_store
    data, ends = make_batch(1)
    interval = 0.02
    per_session = int(seconds / interval) + 1
    run = time.monotonic_ns()
    delays: list[float] = []
    warm = asyncio.Event()
    ready: list[int] = []
    loop = asyncio.get_running_loop()

    async def stream(index: int) -> None:
        session_id = f"paced-{run}-{index:04d}"
        sent = [0] * (per_session + 1)
        writer_store.create(make_meta(session_id))
        sent[1] = time.perf_counter_ns()
        writer_store.append(session_id, 1, data, ends, time.time_ns())
        await writer_store.flush()
        seen: list[float] = []
        reader = asyncio.create_task(_follow(reader_store, session_id, sent, seen))
        while not seen:
            if reader.done():  # it failed, or found no session: say so instead of waiting
                reader.result()
                raise RuntimeError(f"the reader of {session_id} ended before its first event")
            await asyncio.sleep(0.005)
        ready.append(index)
        if len(ready) == sessions:
            warm.set()
        await warm.wait()
        seen.clear()
        start = loop.time() + interval * index / sessions  # out of phase, as real streams are
        for n in range(2, per_session + 1):
            await asyncio.sleep(max(0.0, start + n * interval - loop.time()))
            sent[n] = time.perf_counter_ns()
            writer_store.append(session_id, n, data, ends, time.time_ns())
        writer_store.end(session_id, COMPLETE, "", time.time_ns())
        await reader
        delays.extend(seen)

    streams = [asyncio.create_task(stream(n)) for n in range(sessions)]
    await warm.wait()
    calls_before = await _command_calls(redis[0]) if redis else {}
    redis_cpu = cpu_seconds(redis[1]) if redis and redis[1] else 0.0
    cpu = time.process_time()
    await asyncio.gather(*streams)
    cpu = time.process_time() - cpu
    events = sessions * (per_session - 1)
    figures: dict[str, Any] = {
        "events": len(delays),
        "p50_ms": round(_percentile(delays, 0.5), 3),
        "p99_ms": round(_percentile(delays, 0.99), 3),
        "cpu_us_per_event": round(cpu / events * 1e6, 1),
    }
    if redis:
        after = await _command_calls(redis[0])
        figures["redis_calls_per_event"] = {
            name: round((calls - calls_before.get(name, 0)) / events, 2)
            for name, calls in after.items()
            if name not in ("info", "ping") and calls > calls_before.get(name, 0)
        }
        if redis[1]:
            figures["redis_cpu_us_per_event"] = round(
                (cpu_seconds(redis[1]) - redis_cpu) / events * 1e6, 1
            )
    if reader_store is not writer_store:
        await reader_store.close()
    await writer_store.close()
    return figures


def _paced_row(label: str, figures: dict[str, Any]) -> tuple[str, str]:
    text = (
        f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, "
        f"{figures['cpu_us_per_event']:.0f} µs CPU/event"
    )
    if "redis_cpu_us_per_event" in figures:
        text += f" (+ redis-server {figures['redis_cpu_us_per_event']:.0f} µs)"
    if figures.get("redis_calls_per_event"):
        calls = ", ".join(f"{k} {v:g}" for k, v in sorted(figures["redis_calls_per_event"].items()))
        text += f"; calls/event: {calls}"
    return label, text


async def run_paced(
    url: str, redis_pid: int | None, quick: bool
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    rows: list[tuple[str, str]] = []
    results: dict[str, Any] = {}
    seconds = 2.0 if quick else 8.0
    sessions = 100
    directory = Path(tempfile.mkdtemp(prefix="bench-redis-disk-"))

    async def disk() -> DiskStore:
        store = DiskStore(StorageConfig(dir=directory))
        await store.start()
        return store

    try:
        figures = await bench_paced(disk, None, sessions, seconds, None)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    results["paced_disk_local"] = figures
    rows.append(_paced_row(f"paced, {sessions} x 50 ev/s, disk store, local readers", figures))
    for where in ("local", "remote"):
        figures = await bench_paced(
            lambda: opened(url),
            (lambda: opened(url)) if where == "remote" else None,
            sessions,
            seconds,
            (url, redis_pid),
        )
        results[f"paced_redis_{where}"] = figures
        rows.append(
            _paced_row(f"paced, {sessions} x 50 ev/s, redis store, {where} readers", figures)
        )
    return rows, results


async def run(url: str, quick: bool) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    rows: list[tuple[str, str]] = []
    results: dict[str, Any] = {}
    total = 40_000 if quick else 200_000
    for writers in (1, 100):
        for per_batch in (1, 20):
            rate = await bench_appends(url, writers, per_batch, total)
            results[f"appends_{writers}w_{per_batch}pb"] = round(rate)
            rows.append(
                (f"appends, {writers} writer(s), {per_batch}/batch", f"{rate:,.0f} events/s")
            )
    replay_mb = 16 if quick else 64
    for per_batch in (1, 20):
        rate = await bench_replay(url, replay_mb, per_batch)
        results[f"replay_{per_batch}pb_MBps"] = round(rate, 1)
        rows.append(
            (
                f"replay of one {replay_mb} MiB session from another replica, "
                f"{per_batch} event(s)/batch",
                f"{rate:,.0f} MB/s",
            )
        )
    micros = await bench_remote_get(url, 2000)
    results["remote_get_us"] = round(micros, 1)
    rows.append(("get() of a session streamed by another replica", f"{micros:,.0f} µs"))
    return rows, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (CI smoke)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    server: Server | None = None
    url = args.redis_url
    try:
        if url is None:
            server = start_redis(directory)
            url = f"redis://127.0.0.1:{server.port}/0"
        rows, results = asyncio.run(run(url, args.quick))
        paced_rows, paced = asyncio.run(
            run_paced(url, server.pid if server is not None else None, args.quick)
        )
        rows += paced_rows
        results.update(paced)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    print(f"| measure ({'quick' if args.quick else 'full'}) | result |")
    print("| --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
