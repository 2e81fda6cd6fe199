"""How fast is the Redis store? Appends, and replay from Redis, beside `bench_log.py`'s disk log.

    python benchmarks/bench_redis.py [--quick] [--redis-url URL] [--json PATH]

Without `--redis-url` it starts its own `redis-server` (loopback, free port, no
persistence) and stops it at the end. Events are 200 bytes, as in bench_log.py: "1/batch"
writers append one event per append and yield to the loop after each (one upstream read per
loop turn), "20/batch" writers append 20 events per append. Appends/s counts events until a
final `flush()` saw Redis acknowledge them all. Replay reads one finished session through a
second store (another replica, so every read is an XRANGE, not the local tail) with 256 KiB
reads, like a resuming client; live-tail reads from the owning replica's memory are not
measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench_log import make_batch, make_meta
from procs import Server, start_redis

from proxy.config import StorageConfig
from proxy.storage.base import COMPLETE
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


async def run(url: str, quick: bool) -> tuple[list[tuple[str, str]], dict[str, float]]:
    rows: list[tuple[str, str]] = []
    results: dict[str, float] = {}
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
