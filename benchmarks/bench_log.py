"""How fast is the disk log? Appends per fsync mode, replay of a session, start-up recovery.

    python benchmarks/bench_log.py [--quick] [--json PATH]

Prints a markdown table. Events are 200 bytes. "1/batch" writers append one event per
append and yield to the loop after each (one upstream read per loop turn, as an LLM stream
does); "20/batch" writers append 20 events per append. Appends/s counts events until a final
`flush()` made them all readable (and durable under `always`). Replay reads one finished
session from the page cache with 256 KiB reads. Recovery opens a data dir of finished
sessions, with the segments' index caches and with them deleted (a full scan).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from proxy.config import StorageConfig
from proxy.storage.base import COMPLETE, SessionMeta
from proxy.storage.disk import DiskStore

EVENT_BYTES = 200


def make_meta(session_id: str) -> SessionMeta:
    now = time.time_ns()
    return SessionMeta(session_id, "POST", "/v1/chat/completions", "0" * 64, "", now, now, 200, ())


def make_batch(per_batch: int) -> tuple[bytes, list[int]]:
    event = b"id: 1\ndata: " + b"x" * (EVENT_BYTES - 14) + b"\n\n"
    assert len(event) == EVENT_BYTES
    return event * per_batch, [EVENT_BYTES * (i + 1) for i in range(per_batch)]


async def bench_appends(
    root: Path, fsync: str, writers: int, per_batch: int, total_events: int
) -> float:
    directory = Path(tempfile.mkdtemp(dir=root))
    store = DiskStore(StorageConfig(dir=directory, fsync=fsync))
    await store.start()
    data, ends = make_batch(per_batch)
    appends_each = max(1, total_events // (writers * per_batch))

    async def writer(session_id: str) -> None:
        store.create(make_meta(session_id))
        event = 1
        for _ in range(appends_each):
            store.append(session_id, event, data, ends, time.time_ns())
            event += per_batch
            await asyncio.sleep(0)

    started = time.perf_counter()
    await asyncio.gather(*(writer(f"writer-{n:05d}") for n in range(writers)))
    await store.flush()
    elapsed = time.perf_counter() - started
    await store.close()
    shutil.rmtree(directory)
    return appends_each * writers * per_batch / elapsed


async def fill(directory: Path, sessions: int, target_bytes: int, per_batch: int) -> None:
    """Finished sessions, interleaved in the log like concurrent streams."""
    store = DiskStore(StorageConfig(dir=directory, fsync="never"))
    await store.start()
    data, ends = make_batch(per_batch)
    ids = [f"session-{n:06d}" for n in range(sessions)]
    for session_id in ids:
        store.create(make_meta(session_id))
    rounds = max(1, target_bytes // (sessions * len(data)))
    for round_number in range(rounds):
        first = round_number * per_batch + 1
        for session_id in ids:
            store.append(session_id, first, data, ends, time.time_ns())
        await asyncio.sleep(0)
    for session_id in ids:
        store.end(session_id, COMPLETE, "", time.time_ns())
    await store.close()


async def bench_replay(root: Path, megabytes: int, per_batch: int) -> float:
    directory = Path(tempfile.mkdtemp(dir=root))
    await fill(directory, 1, megabytes * 1024 * 1024, per_batch)
    store = DiskStore(StorageConfig(dir=directory))
    await store.start()
    info = await store.get("session-000000")
    assert info is not None
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        position, total = 1, 0
        while position <= info.events:
            chunk, count = await store.read("session-000000", position, 256 * 1024)
            position += count
            total += len(chunk)
        best = max(best, total / (time.perf_counter() - started) / 1e6)
    await store.close()
    shutil.rmtree(directory)
    return best


async def bench_recovery(root: Path, megabytes: int) -> tuple[float, float, float, int]:
    directory = Path(tempfile.mkdtemp(dir=root))
    started = time.perf_counter()
    await fill(directory, 1000, megabytes * 1024 * 1024, 1)
    built = time.perf_counter() - started
    size = sum(p.stat().st_size for p in directory.glob("*.log"))

    async def open_once() -> float:
        begin = time.perf_counter()
        store = DiskStore(StorageConfig(dir=directory))
        await store.start()
        elapsed = time.perf_counter() - begin
        assert len(await store.list()) == 1000
        await store.close()
        return elapsed

    with_index = await open_once()
    for index in directory.glob("*.idx"):
        index.unlink()
    full_scan = await open_once()  # this start rewrites the caches
    shutil.rmtree(directory)
    return with_index, full_scan, built, size


async def main(quick: bool, json_path: str | None) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-log-"))
    results: dict[str, float | int | str] = {}
    rows: list[tuple[str, str, str]] = []
    try:
        total = 40_000 if quick else 200_000
        for fsync in ("never", "interval", "always"):
            for writers in (1, 100):
                for per_batch in (1, 20):
                    rate = await bench_appends(root, fsync, writers, per_batch, total)
                    key = f"appends_{fsync}_{writers}w_{per_batch}pb"
                    results[key] = round(rate)
                    rows.append(
                        (
                            f"appends, fsync={fsync}, {writers} writer(s), {per_batch}/batch",
                            f"{rate:,.0f} events/s",
                            _target(fsync, writers, rate),
                        )
                    )
        replay_mb = 64 if quick else 256
        for per_batch in (1, 20):
            rate = await bench_replay(root, replay_mb, per_batch)
            results[f"replay_{per_batch}pb_MBps"] = round(rate, 1)
            rows.append(
                (
                    f"replay of one {replay_mb} MiB session, {per_batch} event(s)/record",
                    f"{rate:,.0f} MB/s",
                    "target >= 300 MB/s: " + ("met" if rate >= 300 else "MISSED"),
                )
            )
        recovery_mb = 128 if quick else 1024
        with_index, full_scan, built, size = await bench_recovery(root, recovery_mb)
        results.update(
            recovery_dir_bytes=size,
            recovery_with_index_s=round(with_index, 3),
            recovery_full_scan_s=round(full_scan, 3),
            recovery_build_s=round(built, 1),
        )
        verdict = "met" if with_index <= 2 else "MISSED"
        rows.append(
            (
                f"start-up recovery, {size / 2**20:,.0f} MiB dir, 1000 sessions, 1 event/record",
                f"{with_index:.3f} s with index caches",
                "quick: dir below 1 GiB, target not judged"
                if size < 2**30
                else f"target 1 GiB <= 2 s: {verdict}",
            )
        )
        rows.append(
            (
                "start-up recovery, same dir, index caches deleted (full scan)",
                f"{full_scan:.3f} s",
                f"(building the dir took {built:.1f} s)",
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"| measure ({'quick' if quick else 'full'}) | result | note |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")


def _target(fsync: str, writers: int, rate: float) -> str:
    if fsync == "never" and writers == 1:
        return "target >= 500k/s: " + ("met" if rate >= 500_000 else "MISSED")
    if fsync == "always" and writers == 100:
        return "target >= 50k/s: " + ("met" if rate >= 50_000 else "MISSED")
    return ""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (recovery: 128 MiB)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.quick, arguments.json))
