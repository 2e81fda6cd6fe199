"""The benchmark suite: one workload, measured direct, through nginx and through the proxy.

    python benchmarks/run.py [--quick] [--out DIR] [--profile] [--with-litellm]

Everything runs on 127.0.0.1 as children of this process: the stamping upstream
(`upstream.py`), nginx (`nginx.py`), the proxy as `python -m proxy serve` with its default
config (disk log, `fsync: interval`) once on uvloop and once on the stock asyncio loop, the
proxy with the Redis backend in front of its own `redis-server`, the same with
`server.workers: 2`, and the same on a 3-primary Redis Cluster (those three in the
throughput and latency workloads only), and the load generator processes (`loadgen.py`).
Targets are interleaved workload by workload so that drift on the machine touches every
column alike. Results go to
DIR as results.json (every figure), results.md (tables) and PNG plots (`report.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import report
from loadgen import PLAIN_BODY, Generator, split, stream_body
from nginx import nginx_binary, nginx_version, start_nginx
from procs import (
    Server,
    cpu_seconds,
    free_port,
    redis_missing,
    rss_bytes,
    start_redis,
    start_redis_cluster,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHAT = "/v1/chat/completions"
DIRECT, NGINX = "direct", "nginx"
PROXY_REDIS, REDIS = "proxy-redis", "redis-server"
PROXY_ALWAYS = "proxy-always"
PROXY_REDIS_WORKERS = "proxy-redis-workers2"  # server.workers: 2 on the same redis-server
PROXY_REDIS_CLUSTER = "proxy-redis-cluster"  # storage.redis_cluster on 3 primaries
# Blocks the uvloop import so `serve` falls back to the stock loop (it uses uvloop when it can).
_WITHOUT_UVLOOP = "import sys; sys.modules['uvloop'] = None; from proxy.cli import main; main()"


@dataclass(frozen=True)
class Plan:
    """Sizes of every workload; `quick` shrinks them to a smoke test."""

    throughput_streams: int = 100
    throughput_events: int = 200
    throughput_seconds: float = 5.0
    concurrencies: tuple[int, ...] = (100, 200, 500, 1000)
    latency_rate: float = 50.0
    latency_seconds: float = 8.0
    latency_ramp: float = 1.0
    sequential_requests: int = 300
    resume_sessions: int = 50
    resume_events: int = 1000
    memory_sessions: int = 1000
    profile_seconds: float = 8.0
    # The workloads proxy-redis takes part in ("latency": at every concurrency); its ttfb,
    # resume and memory are not measured.
    redis_workloads: tuple[str, ...] = ("throughput 1", "throughput 20", "latency")

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            throughput_streams=20,
            throughput_seconds=0.5,
            concurrencies=(50, 100),
            latency_seconds=1.2,
            latency_ramp=0.2,
            sequential_requests=20,
            resume_sessions=5,
            memory_sessions=50,
            profile_seconds=2.0,
            redis_workloads=("throughput 20",),
        )


@dataclass
class Targets:
    """Where each column's requests go, and the pid whose CPU is that column's cost.

    `servers` also holds the redis-servers, which are no columns: `stores` names those whose
    CPU a Redis column's rows show. A column in `only` is measured in the workloads listed
    there and no others ("latency" stands for "latency 100", "latency 200" and so on)."""

    ports: dict[str, int] = field(default_factory=dict)
    servers: dict[str, Server] = field(default_factory=dict)
    only: dict[str, tuple[str, ...]] = field(default_factory=dict)
    stores: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # A second replica on the same store (no column of its own): resumes through it are
    # served from Redis, as when a load balancer sends the reconnect to another box.
    peers: dict[str, int] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.ports)

    def measured(self, workload: str) -> dict[str, int]:
        """The columns `workload` runs against, name to port."""
        return {
            name: port
            for name, port in self.ports.items()
            if any(
                workload == listed or workload.startswith(f"{listed} ")
                for listed in self.only.get(name, (workload,))
            )
        }

    @property
    def proxies(self) -> list[str]:
        return [name for name in self.ports if name.startswith("proxy")]


def percentiles_ms(values: list[int]) -> dict[str, float]:
    """p50/p99/p99.9/max in milliseconds (nearest rank) of nanosecond samples."""
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0, "max_ms": 0.0, "samples": 0}
    ordered = sorted(values)
    last = len(ordered) - 1

    def rank(q: float) -> float:
        return round(ordered[min(last, int(q * len(ordered)))] / 1e6, 4)

    return {
        "p50_ms": rank(0.50),
        "p99_ms": rank(0.99),
        "p999_ms": rank(0.999),
        "max_ms": round(ordered[-1] / 1e6, 4),
        "samples": len(ordered),
    }


def _deal(items: list[str], hands: int) -> list[list[str]]:
    """`items` dealt round-robin into `hands` lists, none empty."""
    return [items[i::hands] for i in range(hands) if items[i::hands]]


def _error_kinds(results: list[dict[str, Any]]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in results:
        for kind, count in r["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + count
    return kinds


class Bench:
    """Runs each workload against each target and keeps every figure in `results`."""

    def __init__(self, plan: Plan, generator: Generator, targets: Targets) -> None:
        self.plan = plan
        self.gen = generator
        self.targets = targets
        self.upstream = targets.servers[DIRECT]

    def _cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(server.pid) for name, server in self.targets.servers.items()}

    def _redis_cpu(
        self, name: str, before: dict[str, float], after: dict[str, float], wall: float
    ) -> dict[str, float]:
        """The redis-servers' CPU for a Redis column's row, which would hide it otherwise."""
        stores = self.targets.stores.get(name)
        if not stores:
            return {}
        used = sum(after[store] - before[store] for store in stores)
        return {"redis_cpu_pct": round(100 * used / wall, 1)}

    def _streams(
        self, port: int, streams: int, body: bytes, expected: int, seconds: float, **extra: Any
    ) -> tuple[list[dict[str, Any]], float]:
        start_at = time.monotonic() + 0.3
        params = [
            {
                "port": port,
                "path": CHAT,
                "body": body,
                "expected_events": expected,
                "streams": share,
                "start_at": start_at,
                "until": start_at + seconds,
                "timeout": 120.0,
                **extra,
            }
            for share in split(streams, self.gen.size)
        ]
        timeout = seconds + extra.get("ramp", 0.0) + 180.0
        return self.gen.run("streams", params, timeout), start_at

    def throughput(self, per_write: int) -> dict[str, Any]:
        plan = self.plan
        body = stream_body(plan.throughput_events, per_write)
        figures: dict[str, Any] = {}
        for name, port in self.targets.measured(f"throughput {per_write}").items():
            cpu_before = self._cpu()
            results, _ = self._streams(
                port,
                plan.throughput_streams,
                body,
                plan.throughput_events + 1,
                plan.throughput_seconds,
            )
            cpu_after = self._cpu()
            streams = sum(r["streams"] for r in results)
            events = sum(r["events"] for r in results) - streams  # minus each [DONE]
            wall = (max(r["last_ns"] for r in results) - min(r["first_ns"] for r in results)) / 1e9
            generator_cpu = sum(r["cpu_s"] for r in results)
            figures[name] = {
                "events_per_s": round(events / wall),
                "cpu_us_per_event": round(
                    (cpu_after[name] - cpu_before[name]) / max(events, 1) * 1e6, 3
                ),
                "mb_per_s": round(sum(r["bytes"] for r in results) / wall / 1e6, 2),
                "streams": streams,
                "seconds": round(wall, 3),
                "errors": sum(r["errors"] for r in results),
                "error_kinds": _error_kinds(results),
                "short_streams": sum(r["short"] for r in results),
                "generator_cpu_s": round(generator_cpu, 3),
                "generator_cpu_pct_of_core_per_worker": round(
                    100 * generator_cpu / wall / len(results), 1
                ),
                "server_cpu_pct": round(100 * (cpu_after[name] - cpu_before[name]) / wall, 1),
                "upstream_cpu_pct": round(100 * (cpu_after[DIRECT] - cpu_before[DIRECT]) / wall, 1),
                **self._redis_cpu(name, cpu_before, cpu_after, wall),
            }
            report.progress(f"throughput {per_write}/write {name}: {figures[name]}")
        return figures

    def latency(self, concurrency: int) -> dict[str, Any]:
        plan = self.plan
        events = int(plan.latency_rate * plan.latency_seconds)
        body = stream_body(events, 1, plan.latency_rate)
        figures: dict[str, Any] = {}
        for name, port in self.targets.measured(f"latency {concurrency}").items():
            cpu_before = self._cpu()
            start_at = time.monotonic() + 0.3
            # Every stream is live in this window: all have started, none has ended.
            window = (
                int((start_at + plan.latency_ramp + 0.25) * 1e9),
                int((start_at + plan.latency_seconds) * 1e9),
            )
            results, _ = self._streams(
                port,
                concurrency,
                body,
                events + 1,
                0.0,
                ramp=plan.latency_ramp,
                window=window,
            )
            cpu_after = self._cpu()
            samples: list[int] = []
            first_bytes: list[int] = []
            for r in results:
                samples.extend(array("q", r["latencies"]))
                first_bytes.extend(array("q", r["first_bytes"]))
            wall = plan.latency_seconds + plan.latency_ramp
            cpu_s = cpu_after[name] - cpu_before[name]
            relayed = sum(r["events"] for r in results)
            figures[name] = {
                **percentiles_ms(samples),
                "ttfb": percentiles_ms(first_bytes),
                "cpu_us_per_event": round(cpu_s / max(relayed, 1) * 1e6, 2),
                "errors": sum(r["errors"] for r in results),
                "error_kinds": _error_kinds(results),
                "short_streams": sum(r["short"] for r in results),
                "generator_cpu_pct_of_core_per_worker": round(
                    100 * sum(r["cpu_s"] for r in results) / wall / len(results), 1
                ),
                "server_cpu_pct": round(100 * (cpu_after[name] - cpu_before[name]) / wall, 1),
                **self._redis_cpu(name, cpu_before, cpu_after, wall),
            }
            report.progress(f"latency {concurrency} streams {name}: {figures[name]}")
        for row in figures.values():
            for key in ("p50_ms", "p99_ms", "p999_ms"):
                row[f"added_{key}"] = round(row[key] - figures[DIRECT][key], 4)
        return figures

    def _sequence(
        self, port: int, requests: list[tuple[str, str, bytes]], reconnect: bool
    ) -> list[tuple[int, int, int, int, str]]:
        params = {"port": port, "requests": requests, "reconnect": reconnect, "timeout": 30.0}
        rows: list[tuple[int, int, int, int, str]] = self.gen.run("sequence", [params], 300.0)[0][
            "rows"
        ]
        bad = [row[0] for row in rows if row[0] != 200]
        if bad:
            raise RuntimeError(f"{len(bad)} requests failed with statuses {sorted(set(bad))}")
        return rows

    def first_byte(self) -> dict[str, Any]:
        """Time to first byte of a short stream, and the whole of a small JSON POST, one
        request at a time on a kept-alive connection (no queueing, just the hop)."""
        n = self.plan.sequential_requests
        stream = [("POST", CHAT, stream_body(5))] * n
        plain = [("POST", CHAT, PLAIN_BODY)] * n
        figures: dict[str, Any] = {"ttfb": {}, "plain": {}}
        for name, port in self.targets.measured("first byte").items():
            figures["ttfb"][name] = percentiles_ms(
                [row[1] for row in self._sequence(port, stream, False)]
            )
            figures["plain"][name] = percentiles_ms(
                [row[2] for row in self._sequence(port, plain, False)]
            )
        for kind in ("ttfb", "plain"):
            direct = figures[kind][DIRECT]
            for row in figures[kind].values():
                row["added_p50_ms"] = round(row["p50_ms"] - direct["p50_ms"], 4)
                row["added_p99_ms"] = round(row["p99_ms"] - direct["p99_ms"], 4)
        report.progress(f"first byte: {figures}")
        return figures

    def resume(self) -> dict[str, Any]:
        """Reconnect-to-first-replayed-byte and replay MB/s of finished sessions, against a
        fresh call of the same answer (new connection, same 1k events) on every target."""
        plan = self.plan
        answer = stream_body(plan.resume_events, 20)
        fresh_calls = [("POST", CHAT, answer)] * plan.resume_sessions
        figures: dict[str, Any] = {}
        for name, port in self.targets.measured("resume").items():
            fresh = self._sequence(port, fresh_calls, True)
            row: dict[str, Any] = {
                "fresh_first_byte": percentiles_ms([r[1] for r in fresh]),
                "fresh_mb_per_s": round(
                    sum(r[3] for r in fresh) / sum(r[2] for r in fresh) * 1e3, 1
                ),
            }
            if name.startswith("proxy"):
                session_ids = [r[4] for r in fresh]
                middle = plan.resume_events // 2
                resumes = self._sequence(
                    port,
                    [
                        ("GET", f"/sessions/{sid}/events?offset={middle}", b"")
                        for sid in session_ids
                    ],
                    True,
                )
                replays = self._sequence(
                    port,
                    [("GET", f"/sessions/{sid}/events?offset=0", b"") for sid in session_ids],
                    False,
                )
                row["resume_first_byte"] = percentiles_ms([r[1] for r in resumes])
                peer = self.targets.peers.get(name)
                if peer is not None:
                    elsewhere = self._sequence(
                        peer,
                        [
                            ("GET", f"/sessions/{sid}/events?offset={middle}", b"")
                            for sid in session_ids
                        ],
                        True,
                    )
                    row["resume_first_byte_other_replica"] = percentiles_ms(
                        [r[1] for r in elsewhere]
                    )
                burst = self.gen.run(
                    "burst",
                    [
                        {
                            "port": port,
                            "requests": [
                                ("GET", f"/sessions/{sid}/events?offset={middle}", b"")
                                for sid in share
                            ],
                            "timeout": 60.0,
                        }
                        for share in _deal(session_ids * 2, self.gen.size)
                    ],
                    120.0,
                )
                row["resume_at_once"] = len(session_ids) * 2
                row["resume_first_byte_at_once"] = percentiles_ms(
                    [row_[1] for result in burst for row_ in result["rows"]]
                )
                row["replay_mb_per_s"] = round(
                    sum(r[3] for r in replays) / sum(r[2] for r in replays) * 1e3, 1
                )
                row["replay_bytes_per_session"] = replays[0][3]
            figures[name] = row
            report.progress(f"resume {name}: {row}")
        return figures

    def profile(self, name: str, py_spy: str, out_dir: Path) -> dict[str, Any]:
        """py-spy samples the proxy under the saturated 20-events-per-write load."""
        raw = out_dir / f"profile-{name}.txt"
        seconds = self.plan.profile_seconds
        spy = subprocess.Popen(
            [
                *(py_spy, "record", "--pid", str(self.targets.servers[name].pid)),
                *("--format", "raw", "--rate", "250", "--nonblocking"),
                *("--duration", str(int(seconds) + 1), "-o", str(raw)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            body = stream_body(self.plan.throughput_events, 20)
            self._streams(
                self.targets.ports[name],
                self.plan.throughput_streams,
                body,
                self.plan.throughput_events + 1,
                seconds,
            )
            spy.wait(seconds + 30)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(5)
        if not raw.exists():
            return {"skipped": "py-spy wrote no profile"}
        return {"file": raw.name, **report.hot_spots(raw.read_text())}


def memory(plan: Plan, gen: Generator, start: Any, upstream_port: int) -> dict[str, Any]:
    """RSS per live session and per idle reader, on a fresh proxy so that earlier workloads
    have not already grown its heap. Live sessions trickle one event per 10 s; readers join
    at the current end so they sit idle."""
    proxy: Server = start()
    try:
        port = proxy.port
        warm = [("POST", CHAT, stream_body(5))] * 20 + [("POST", CHAT, PLAIN_BODY)] * 20
        gen.run(
            "sequence", [{"port": port, "requests": warm, "reconnect": False, "timeout": 30}], 60
        )
        time.sleep(0.5)
        base = rss_bytes(proxy.pid)
        live_body = stream_body(1_000_000, 1, 0.1)
        shares = split(plan.memory_sessions, gen.size)
        results = gen.run(
            "hold",
            [
                {
                    "port": port,
                    "requests": [("POST", CHAT, live_body)] * n,
                    "first_byte": True,
                    "timeout": 120,
                }
                for n in shares
            ],
            180,
        )
        time.sleep(1.0)
        with_sessions = rss_bytes(proxy.pid)
        ids = [sid for r in results for sid in r["session_ids"]]
        readers = [("GET", f"/sessions/{sid}/events?offset=1", b"") for sid in ids]
        chunks = [readers[i :: gen.size] for i in range(gen.size)]
        gen.run(
            "hold",
            [
                {"port": port, "requests": c, "first_byte": False, "timeout": 120}
                for c in chunks
                if c
            ],
            180,
        )
        time.sleep(1.0)
        with_readers = rss_bytes(proxy.pid)
        gen.run("release", [{} for _ in range(gen.size)], 60)
    finally:
        proxy.stop(signal.SIGKILL)  # its live sessions would otherwise hold it for the grace
    sessions = len([sid for sid in ids if sid])
    return {
        "live_sessions": sessions,
        "rss_base_mib": round(base / 2**20, 1),
        "rss_with_sessions_mib": round(with_sessions / 2**20, 1),
        "rss_with_readers_mib": round(with_readers / 2**20, 1),
        "kib_per_live_session": round((with_sessions - base) / max(sessions, 1) / 1024, 1),
        "kib_per_idle_reader": round((with_readers - with_sessions) / max(sessions, 1) / 1024, 1),
    }


def bench_log(tmp: Path) -> dict[str, Any]:
    """The log engine's own micro-benchmark, run as its author meant (`--quick --json`)."""
    script = HERE / "bench_log.py"
    if not script.exists():
        return {"skipped": "benchmarks/bench_log.py is not there yet"}
    json_path = tmp / "bench_log.json"
    args = [sys.executable, str(script), "--quick", "--json", str(json_path)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"skipped": "bench_log.py took over 120 s"}
    if done.returncode != 0 or not json_path.exists():
        return {"skipped": f"bench_log.py exited {done.returncode}: {done.stderr[-500:]}"}
    parsed: dict[str, Any] = json.loads(json_path.read_text())
    return parsed


def machine_info(nginx: str | None) -> dict[str, Any]:
    import platform

    import aiohttp

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "proxy"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        import uvloop

        uvloop_version: str | None = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop_version,
        "nginx": nginx_version(nginx) if nginx else None,
        "git_commit": commit + ("-dirty" if dirty else ""),
    }


def _proxy_starter(
    tmp: Path,
    upstream_port: int,
    uvloop: bool,
    redis_url: str | None = None,
    fsync: str | None = None,
    name: str = PROXY_REDIS,
    extra_config: str = "",
) -> Any:
    """A function starting a fresh `serve` child with its own dir and the default config, or
    with the Redis backend on `redis_url` (then on uvloop when installed, as `serve` does)
    and `extra_config` (YAML lines: more storage keys, indented by 2, then other sections)."""
    runs = 0

    def start() -> Server:
        nonlocal runs
        runs += 1
        name_here = name if redis_url else f"proxy-{'uvloop' if uvloop else 'asyncio'}"
        if fsync:
            name_here = f"proxy-{fsync}"
        work = tmp / f"{name_here}-{runs}"
        work.mkdir()
        port = free_port()
        head = ["-m", "proxy"] if uvloop else ["-c", _WITHOUT_UVLOOP]
        args = [sys.executable, *head, "serve", "--host", "127.0.0.1", "--port", str(port)]
        args += [
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--data-dir",
            str(work / "data"),
        ]
        if redis_url:
            config = work / "proxy.yaml"
            storage = f"storage:\n  backend: redis\n  redis_url: {redis_url}\n"
            config.write_text(storage + extra_config)
            args += ["--config", str(config)]
        elif fsync:
            config = work / "proxy.yaml"
            config.write_text(f"storage:\n  fsync: {fsync}\n")
            args += ["--config", str(config)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        server = Server(name_here, args, port, work / "proxy.log", env)
        return server.wait_ready()

    return start


def start_upstream(tmp: Path) -> Server:
    port = free_port()
    args = [sys.executable, str(HERE / "upstream.py"), str(port)]
    return Server("upstream", args, port, tmp / "upstream.log", dict(os.environ)).wait_ready()


def _raise_fd_limit() -> None:
    """1,000 streams through a relay is 2,000+ sockets per process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def _uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.quick() if args.quick else Plan()
    out: Path = args.out
    nginx = nginx_binary()
    results: dict[str, Any] = {"quick": args.quick, "plan": asdict(plan)}
    results["machine"] = machine_info(nginx)
    if args.with_litellm:
        try:
            import litellm  # noqa: F401
        except ImportError:
            report.progress("--with-litellm: litellm is not installed; that column is skipped")
        else:
            report.progress("--with-litellm: the LiteLLM column is not implemented; skipped")
    generator = Generator(args.workers or max(2, os.cpu_count() or 2))
    results["generator_workers"] = generator.size
    with tempfile.TemporaryDirectory(prefix="rp-bench-") as tmp_name:
        tmp = Path(tmp_name)
        targets = Targets()
        try:
            upstream = start_upstream(tmp)
            targets.ports[DIRECT], targets.servers[DIRECT] = upstream.port, upstream
            if nginx:
                server = start_nginx(nginx, tmp / "nginx", free_port(), upstream.port)
                targets.ports[NGINX], targets.servers[NGINX] = server.port, server
            else:
                report.progress("nginx not found: the nginx column is skipped")
            starters = {
                f"proxy-{'uvloop' if flavour else 'asyncio'}": _proxy_starter(
                    tmp, upstream.port, flavour
                )
                for flavour in ([True, False] if _uvloop_available() else [False])
            }
            for name, start in starters.items():
                server = start()
                targets.ports[name], targets.servers[name] = server.port, server
            # `fsync: always` (group commit) in the latency workload at 100 streams.
            server = _proxy_starter(tmp, upstream.port, _uvloop_available(), fsync="always")()
            targets.ports[PROXY_ALWAYS], targets.servers[PROXY_ALWAYS] = server.port, server
            targets.only[PROXY_ALWAYS] = ("latency 100",)
            missing = redis_missing()
            if missing is None:
                redis = start_redis(tmp / "redis")
                targets.servers[REDIS] = redis
                redis_url = f"redis://127.0.0.1:{redis.port}/0"
                server = _proxy_starter(tmp, upstream.port, True, redis_url)()
                targets.ports[PROXY_REDIS], targets.servers[PROXY_REDIS] = server.port, server
                targets.stores[PROXY_REDIS] = (REDIS,)
                cluster = start_redis_cluster(tmp / "redis-cluster")
                for node in cluster:
                    targets.servers[node.name] = node
                columns = {
                    PROXY_REDIS_CLUSTER: (
                        f"redis://127.0.0.1:{cluster[0].port}",
                        "  redis_cluster: true\n",
                        tuple(node.name for node in cluster),
                    ),
                    PROXY_REDIS_WORKERS: (redis_url, "server:\n  workers: 2\n", (REDIS,)),
                }
                for name, (url, extra, stores) in columns.items():
                    server = _proxy_starter(
                        tmp, upstream.port, True, url, name=name, extra_config=extra
                    )()
                    targets.ports[name], targets.servers[name] = server.port, server
                    targets.stores[name] = stores
                for name in targets.stores:
                    targets.only[name] = plan.redis_workloads
                targets.only[PROXY_REDIS] += ("resume",)
                peer = _proxy_starter(
                    tmp, upstream.port, True, redis_url, name=f"{PROXY_REDIS}-peer"
                )()
                targets.servers[peer.name] = peer
                targets.peers[PROXY_REDIS] = peer.port
            else:
                report.progress(f"{missing}: the proxy-redis columns are skipped")
            bench = Bench(plan, generator, targets)
            results["targets"] = targets.names
            results["throughput"] = {
                f"{per_write}_per_write": bench.throughput(per_write) for per_write in (1, 20)
            }
            results["latency"] = {str(c): bench.latency(c) for c in plan.concurrencies}
            results.update(bench.first_byte())
            results["resume"] = bench.resume()
            if args.profile:
                py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                results["profile"] = {
                    name: bench.profile(name, py_spy, out)
                    if Path(py_spy).exists()
                    else {"skipped": "py-spy is not installed"}
                    for name in targets.measured("profile")
                    if name in targets.proxies
                }
            for name in targets.proxies:
                targets.servers.pop(name).stop()
                del targets.ports[name]
            results["memory"] = {
                name: memory(plan, generator, start, upstream.port)
                for name, start in starters.items()
            }
            for name, row in results["memory"].items():
                report.progress(f"memory {name}: {row}")
            results["bench_log"] = (
                {"skipped": "not in --quick: it alone takes about 15 s"}
                if args.quick
                else bench_log(tmp)
            )
            for row in report.replay_rows(results):
                report.progress(f"replay, one reader: {row}")
        finally:
            generator.close()
            for server in reversed(targets.servers.values()):  # proxy-redis before redis-server
                server.stop()
    results["checks"] = report.checks(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    parser.add_argument("--workers", type=int, default=0, help="generator processes")
    parser.add_argument("--profile", action="store_true", help="py-spy the proxy under load")
    parser.add_argument("--with-litellm", action="store_true", help="add LiteLLM if installed")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every finally runs
    _raise_fd_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = run(args)
    results["run_seconds"] = round(time.monotonic() - started, 1)
    report.write(results, args.out)
    report.progress(f"done in {results['run_seconds']} s: {args.out}")


if __name__ == "__main__":
    main()
