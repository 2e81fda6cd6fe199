"""How fast is the disk log? Appends per fsync mode, replay of a session, start-up recovery.

    python benchmarks/bench_log.py [--quick] [--json PATH]

Prints a markdown table. Events are 200 bytes. "1/batch" writers append one event per
append and yield to the loop after each (one upstream read per loop turn, as an LLM stream
does); "20/batch" writers append 20 events per append. Appends/s counts events until a final
`flush()` made them all readable (and durable under `always`).

Replay is measured twice for each record shape (one event per record, the paced LLM case,
and 20 per record): in the store (`DiskStore.read` with the readers' batch size, from the
page cache), and end to end as a user sees it: the same data dir served by a real proxy
process (`python -m proxy serve`) on 127.0.0.1, read by one HTTP client with
`GET /sessions/{id}/events?offset=0`, body bytes per second from the request to the last
byte. Resume is the time from before a new connection to the first replayed byte of
`GET /sessions/{id}/events?offset=N` with 500 events left (as in `run.py`), p50 of 50.
Recovery opens a data dir of finished sessions, with the segments' index caches and with
them deleted (a full scan).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from loadgen import build_request
from procs import Server, cpu_seconds, free_port

from proxy.config import StorageConfig
from proxy.readers import READ_BATCH_BYTES
from proxy.storage.base import COMPLETE, SessionMeta
from proxy.storage.disk import DiskStore

EVENT_BYTES = 200
ROOT = Path(__file__).resolve().parent.parent
# Sessions are bound to the credential loadgen's requests carry, so the HTTP reader may read.
CREDENTIAL = hashlib.sha256(b"Bearer bench-key").hexdigest()
RESUME_SAMPLES = 50
RESUME_EVENTS_LEFT = 500


def make_meta(session_id: str) -> SessionMeta:
    now = time.time_ns()
    path = "/v1/chat/completions"
    return SessionMeta(session_id, "POST", path, "0" * 64, CREDENTIAL, now, now, 200, ())


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


class ReplayFigures(NamedTuple):
    store_mb_per_s: float  # DiskStore.read alone
    http_mb_per_s: float  # one HTTP reader through a proxy process
    http_mb_per_cpu_s: float  # the same bytes per CPU second of the proxy process
    resume_p50_ms: float
    resume_p99_ms: float


async def bench_replay(root: Path, megabytes: int, per_batch: int) -> ReplayFigures:
    """Replay of one finished session: in the store, then over HTTP from a proxy process."""
    directory = Path(tempfile.mkdtemp(dir=root))
    data_dir = directory / "data"
    await fill(data_dir, 1, megabytes * 1024 * 1024, per_batch)
    store = DiskStore(StorageConfig(dir=data_dir))
    await store.start()
    info = await store.get("session-000000")
    assert info is not None
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        position, total = 1, 0
        while position <= info.events:
            chunk, count = await store.read("session-000000", position, READ_BATCH_BYTES)
            position += count
            total += len(chunk)
        assert total == info.bytes
        best = max(best, total / (time.perf_counter() - started) / 1e6)
    await store.close()
    try:
        http, per_cpu, resumes = _replay_over_http(directory, data_dir, info.events, info.bytes)
    finally:
        shutil.rmtree(directory)
    cuts = statistics.quantiles(resumes, n=100, method="inclusive")
    return ReplayFigures(best, http, per_cpu, statistics.median(resumes), cuts[98])


def _replay_over_http(
    directory: Path, data_dir: Path, events: int, size: int
) -> tuple[float, float, list[float]]:
    """(best MB/s of three full replays, best MB per proxy CPU second, resume first-byte
    times in ms) from a proxy process serving `data_dir`, on the loop `serve` picks (uvloop
    when installed). The CPU figure is the one to compare across runs on a busy machine:
    other processes lengthen the wall time, not the proxy's own work."""
    port = free_port()
    args = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--upstream", "http://127.0.0.1:9", "--data-dir", str(data_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = Server("proxy", args, port, directory / "proxy.log", env).wait_ready()
    try:
        path = "/sessions/session-000000/events?offset="
        best = per_cpu = 0.0
        for _ in range(3):
            cpu = cpu_seconds(server.pid)
            reply = http_get(port, path + "0")
            per_cpu = max(per_cpu, size / max(cpu_seconds(server.pid) - cpu, 0.01) / 1e6)
            if reply.status != 200 or reply.body_bytes != size:
                raise RuntimeError(
                    f"replay over HTTP: status {reply.status} and {reply.body_bytes} bytes; "
                    f"expected {size}"
                )
            best = max(best, size / ((reply.end_ns - reply.sent_ns) / 1e9) / 1e6)
        resumes = []
        offset = str(max(0, events - RESUME_EVENTS_LEFT))
        for _ in range(RESUME_SAMPLES):
            reply = http_get(port, path + offset)
            left = min(events, RESUME_EVENTS_LEFT) * EVENT_BYTES
            if reply.status != 200 or reply.body_bytes != left:
                raise RuntimeError(
                    f"resume over HTTP: status {reply.status} and {reply.body_bytes} bytes; "
                    f"expected {left}"
                )
            resumes.append((reply.first_byte_ns - reply.connect_ns) / 1e6)
    finally:
        server.stop()
    return best, per_cpu, resumes


class Reply(NamedTuple):
    status: int
    body_bytes: int
    connect_ns: int  # before the connect
    sent_ns: int  # the request written
    first_byte_ns: int  # the first body byte received
    end_ns: int  # the end of the body


def http_get(port: int, path: str) -> Reply:
    """GET on a new connection, reading the chunked body into one reused buffer.

    A blocking socket, no copies of the body and nothing counted in it (`bytes.count` of
    blank lines alone runs at 0.7 GB/s here): loadgen's asyncio client costs over a CPU
    second per GB, so on two cores it, not the proxy, would set the batched figure. The
    body's length is exact, and checked against the store's.
    """
    connect_ns = time.monotonic_ns()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(build_request(port, "GET", path))
        sent_ns = time.monotonic_ns()
        buffer = bytearray(1 << 20)
        head = b""
        while b"\r\n\r\n" not in head:
            received = sock.recv_into(buffer)
            if not received:
                raise RuntimeError("connection closed in the response head")
            head += buffer[:received]
        head, _, rest = head.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        body = _ChunkedBody()
        if b"transfer-encoding: chunked" not in head.lower():
            return Reply(status, 0, connect_ns, sent_ns, 0, time.monotonic_ns())
        size = len(rest)
        buffer[:size] = rest
        first_byte_ns = now = time.monotonic_ns()
        while True:
            body.feed(buffer, size)
            if not body.body_bytes:
                first_byte_ns = 0
            elif not first_byte_ns:
                first_byte_ns = now
            if body.done:
                end_ns = time.monotonic_ns()
                return Reply(status, body.body_bytes, connect_ns, sent_ns, first_byte_ns, end_ns)
            size = sock.recv_into(buffer)
            now = time.monotonic_ns()
            if not size:
                raise RuntimeError("connection closed in the body")


class _ChunkedBody:
    """Decodes `Transfer-Encoding: chunked` block by block, counting the body's bytes; chunk
    data is skipped over in the block, never copied."""

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self.body_bytes = 0
        self.done = False
        self._state = self._SIZE
        self._left = 0  # bytes of the current chunk still to come
        self._line = b""  # the part of a line that an earlier block ended in

    def feed(self, block: bytearray, size: int) -> None:
        pos = 0
        while pos < size and not self.done:
            if self._state == self._DATA:
                take = min(self._left, size - pos)
                self.body_bytes += take
                self._left -= take
                pos += take
                if not self._left:
                    self._state = self._DATA_END
                continue
            piece = bytes(block[pos : min(size, pos + 64)])
            line = self._line + piece
            end = line.find(b"\r\n")
            if end < 0:
                self._line = line
                pos += len(piece)
                continue
            pos += end + 2 - len(self._line)
            self._line, line = b"", line[:end]
            if self._state == self._SIZE:
                self._left = int(line.split(b";", 1)[0], 16)
                self._state = self._DATA if self._left else self._TRAILER
            elif self._state == self._DATA_END:
                self._state = self._SIZE
            elif not line:  # the blank line ending the trailer
                self.done = True


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


async def main(quick: bool, json_path: str | None, only: str | None) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-log-"))
    results: dict[str, float | int | str] = {}
    rows: list[tuple[str, str, str]] = []
    try:
        if only in (None, "appends"):
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
        if only in (None, "replay"):
            replay_mb = 64 if quick else 256
            for per_batch in (1, 20):
                figures = await bench_replay(root, replay_mb, per_batch)
                target = 300 if per_batch == 1 else 1000
                shape = f"{per_batch} event(s)/record"
                results[f"replay_{per_batch}pb_MBps"] = round(figures.store_mb_per_s, 1)
                results[f"replay_http_{per_batch}pb_MBps"] = round(figures.http_mb_per_s, 1)
                results[f"replay_http_{per_batch}pb_MB_per_cpu_s"] = round(
                    figures.http_mb_per_cpu_s
                )
                results[f"resume_first_byte_{per_batch}pb_p50_ms"] = round(figures.resume_p50_ms, 3)
                results[f"resume_first_byte_{per_batch}pb_p99_ms"] = round(figures.resume_p99_ms, 3)
                rows.append(
                    (
                        f"replay of one {replay_mb} MiB session, {shape}, in the store",
                        f"{figures.store_mb_per_s:,.0f} MB/s",
                        "",
                    )
                )
                rows.append(
                    (
                        f"replay of the same session, {shape}, one HTTP reader via a proxy process",
                        f"{figures.http_mb_per_s:,.0f} MB/s",
                        f"target >= {target:,} MB/s: "
                        + ("met" if figures.http_mb_per_s >= target else "MISSED")
                        + f"; {figures.http_mb_per_cpu_s:,.0f} MB per proxy CPU second",
                    )
                )
                rows.append(
                    (
                        f"resume first byte, new connection, {shape}, p50 / p99 of "
                        f"{RESUME_SAMPLES}",
                        f"{figures.resume_p50_ms:.2f} / {figures.resume_p99_ms:.2f} ms",
                        "",
                    )
                )
        if only in (None, "recovery"):
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
                    f"start-up recovery, {size / 2**20:,.0f} MiB dir, 1000 sessions, "
                    "1 event/record",
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
    parser.add_argument(
        "--only", choices=("appends", "replay", "recovery"), help="run one part of the table"
    )
    arguments = parser.parse_args()
    asyncio.run(main(arguments.quick, arguments.json, arguments.only))
