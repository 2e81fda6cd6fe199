"""Does one stream's trouble slow the others? The timing claims the fault tests used to assert.

    python benchmarks/bench_isolation.py [--quick] [--json PATH]

1. Upstream faults (`tests/faults/test_upstream_faults.py`): a normal 40-event stream, paced
   10 ms, alone and then beside each fault (cut mid-event, stall past idle_timeout, a 10 MB
   line, binary garbage, ..., and one gzip read that inflates to 42 MB), through the
   in-process proxy. Reported: seconds alone and beside, and their ratio (1.0: the fault
   costs its neighbour nothing).
2. The framer on an unfinished event fed in 1 KiB reads: seconds for 2 MiB and for 8 MiB.
   Linear framing takes about 4x as long for 4x the bytes; re-joining the event per read
   (what it once did) takes about 16x.
3. Slow readers (`tests/faults/test_slow_clients.py`): the proxy as a process, 4 sessions
   read at full speed, then the same with slow readers (4 KiB window, 1 byte/s) beside
   them. Reported: the slowest upstream read and the slowest fast reader, both ways.

Figures go to stdout as a table, and to PATH as JSON with `--json`. Run it on a quiet
machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.sse import SSEFramer  # noqa: E402
from tests.faults import test_slow_clients as slow  # noqa: E402
from tests.faults.raw_upstream import RawUpstream, paced_stream  # noqa: E402
from tests.faults.test_upstream_faults import (  # noqa: E402
    FAULTS,
    NORMAL_EVENTS,
    NORMAL_PAUSE,
    Fault,
    gzip_stream,
    read_fault,
    timed_normal_stream,
)
from tests.faults.test_upstream_faults import GZIP_BOMB as GZIP_BOMB_PLAIN  # noqa: E402
from tests.helpers import ProxyProcess, make_config, mock_stream_body, run_proxy  # noqa: E402

# 42 MB of events in 45 KB of gzip: one upstream read that inflates past a log record.
GZIP_BOMB = Fault(gzip_stream(gzip.compress(GZIP_BOMB_PLAIN, 9)), b"")


async def fault_pace(name: str, runs: int) -> dict[str, Any]:
    fault = GZIP_BOMB if name == "gzip_bomb" else FAULTS[name]
    upstream = await RawUpstream(
        {"/fault": fault.route, "/normal": paced_stream(NORMAL_EVENTS, NORMAL_PAUSE)}
    ).start()
    alone: list[float] = []
    beside: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = make_config(
                Path(tmp) / "data", upstream.url, **{"upstream.idle_timeout": fault.idle_timeout}
            )
            async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
                for _ in range(runs):
                    alone.append((await timed_normal_stream(http, proxy.url))[0])
                    _, (seconds, _) = await asyncio.gather(
                        read_fault(http, proxy.url),
                        timed_normal_stream(http, proxy.url, delay=0.05),
                    )
                    beside.append(seconds)
    finally:
        await upstream.stop()
    return {
        "alone_s": round(min(alone), 3),
        "beside_s": round(min(beside), 3),
        "ratio": round(min(beside) / min(alone), 3),
    }


def framer_line(size: int) -> float:
    """Seconds to frame an unfinished event of `size` bytes arriving in 1 KiB reads."""
    framer = SSEFramer(max_event_bytes=size + 4096)
    piece = b"x" * 1024
    started = time.perf_counter()
    framer.feed(b"data: ")
    for _ in range(size // len(piece)):
        framer.feed(piece)
    framer.feed(b"\n\n")
    return time.perf_counter() - started


async def slow_reader_pace(readers: int, tmp: Path) -> dict[str, Any]:
    proxy = ProxyProcess(tmp / "data").start()
    try:
        assert proxy.process is not None
        pid = proxy.process.pid
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            body = mock_stream_body(*slow.pace(readers))
            alone = await slow.run_sessions(http, proxy, body, 0, pid)
            loaded = await slow.run_sessions(http, proxy, body, readers, pid)
    finally:
        proxy.kill()
    return {
        "slow_readers": readers,
        "upstream_alone_ms": alone.upstream_ms,
        "upstream_beside_ms": loaded.upstream_ms,
        "fast_reader_alone_s": round(alone.fast_s, 3),
        "fast_reader_beside_s": round(loaded.fast_s, 3),
    }


async def run(quick: bool) -> dict[str, Any]:
    names = ["cut_mid_event", "gzip_bomb"] if quick else [*FAULTS, "gzip_bomb"]
    results: dict[str, Any] = {"faults": {}}
    for name in names:
        results["faults"][name] = await fault_pace(name, 1 if quick else 3)
        print(f"fault {name}: {results['faults'][name]}", file=sys.stderr)
    small, large = 2 << 20, 8 << 20
    results["framer"] = {
        "line_2MiB_s": round(framer_line(small), 4),
        "line_8MiB_s": round(framer_line(large), 4),
    }
    results["framer"]["ratio_4x_bytes"] = round(
        results["framer"]["line_8MiB_s"] / results["framer"]["line_2MiB_s"], 2
    )
    with tempfile.TemporaryDirectory() as tmp:
        results["slow_readers"] = await slow_reader_pace(20 if quick else 200, Path(tmp))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two faults, 20 slow readers")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    results = asyncio.run(run(args.quick))
    print("| fault | normal stream alone s | beside the fault s | ratio |")
    print("| --- | --- | --- | --- |")
    for name, row in results["faults"].items():
        print(f"| {name} | {row['alone_s']} | {row['beside_s']} | {row['ratio']} |")
    print(f"\nframer: {results['framer']}\nslow readers: {results['slow_readers']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
