"""Turns a run's figures into results.json, results.md and PNG plots, and checks targets.

The targets are issue 7's; each proxy flavour is checked on its own, since which loop a user
gets depends on whether uvloop is installed. proxy-redis (the Redis backend) takes part in
some workloads only, so it is checked on the figures it has.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

DIRECT, NGINX = "direct", "nginx"
_LINE_NUMBER = re.compile(r":\d+\)")
# Inclusive shares only for the proxy's own functions: the loop, click and run_app frames
# sit under every sample and would fill the table.
_OWN_CODE = re.compile(r"\(proxy/(?!cli\.py|__main__\.py)")
QUICK_NOTE = " (--quick: a smoke test, not figures)"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the hot-path issue that this run has the figures for, per proxy."""
    rows: list[dict[str, Any]] = []
    proxies = [name for name in results.get("targets", []) if name.startswith("proxy")]
    latency = results.get("latency", {})

    def add(proxy: str, name: str, value: float, target: str, met: bool) -> None:
        rows.append({"proxy": proxy, "check": name, "value": value, "target": target, "met": met})

    def added(at: str, who: str, key: str) -> float | None:
        row = latency.get(at, {}).get(who)
        return None if row is None else row[f"added_{key}_ms"]

    for proxy in proxies:
        at_100 = latency.get("100", {})
        if proxy in at_100 and NGINX in at_100:
            mine, theirs = at_100[proxy]["cpu_us_per_event"], at_100[NGINX]["cpu_us_per_event"]
            ratio = round(mine / theirs, 2) if theirs else float("inf")
            add(proxy, "CPU per event at 100 streams (x nginx)", ratio, "<= 1.5x", ratio <= 1.5)
        if proxy == "proxy-always":
            p50 = added("100", proxy, "p50")
            if p50 is not None:
                add(proxy, "fsync always: added p50 at 100 (ms)", p50, "<= 1 ms", p50 <= 1.0)
            continue
        for mode, figures in results["throughput"].items():
            if NGINX in figures and proxy in figures:
                ratio = figures[proxy]["events_per_s"] / figures[NGINX]["events_per_s"]
                add(proxy, f"throughput {mode}", round(ratio, 3), ">= 1.0x nginx", ratio >= 1.0)
        p50, p99, n99 = (
            added("200", proxy, "p50"),
            added("200", proxy, "p99"),
            added("200", NGINX, "p99"),
        )
        if p50 is not None:
            add(proxy, "added p50 at 200 (ms)", p50, "<= 0.3 ms", p50 <= 0.3)
        if p99 is not None and n99 is not None:
            add(
                proxy, "added p99 at 200 (ms)", p99, f"<= {n99 + 1:.2f} (nginx + 1)", p99 <= n99 + 1
            )
        p50, n50 = added("500", proxy, "p50"), added("500", NGINX, "p50")
        p99, n99 = added("500", proxy, "p99"), added("500", NGINX, "p99")
        if p50 is not None and n50 is not None:
            limit = n50 + 0.5
            add(proxy, "added p50 at 500 (ms)", p50, f"<= {limit:.2f} (nginx + 0.5)", p50 <= limit)
        if p99 is not None and n99 is not None:
            limit = 2 * n99
            add(proxy, "added p99 at 500 (ms)", p99, f"<= {limit:.2f} (2x nginx)", p99 <= limit)
        at_1000 = latency.get("1000", {})
        if proxy in at_1000:
            row = at_1000[proxy]
            whole = row["errors"] == 0 and row["short_streams"] == 0
            add(proxy, "1000 streams: every stream completes", int(whole), "all", whole)
            ttfb = row["ttfb"]["p99_ms"]
            add(proxy, "1000 streams: ttfb p99 (ms)", ttfb, "< 1000 ms", ttfb < 1000)
            p99, n99 = row["added_p99_ms"], added("1000", NGINX, "p99")
            if n99 is not None:
                add(proxy, "added p99 at 1000 (ms)", p99, f"<= {n99:.2f} (nginx)", p99 <= n99)
        resume = results["resume"].get(proxy, {}).get("resume_first_byte_at_once")
        if resume:
            count = results["resume"][proxy]["resume_at_once"]
            p50, p99 = resume["p50_ms"], resume["p99_ms"]
            add(proxy, f"resume first byte p50, {count} at once (ms)", p50, "<= 1 ms", p50 <= 1)
            add(proxy, f"resume first byte p99, {count} at once (ms)", p99, "<= 3 ms", p99 <= 3)
        memory = results.get("memory", {}).get(proxy)
        if memory:
            kib = memory["kib_per_live_session"]
            add(proxy, "RSS per live session (KiB)", kib, "<= 32 KiB", kib <= 32)
            kib = memory["kib_per_idle_reader"]
            add(proxy, "RSS per idle reader (KiB)", kib, "<= 8 KiB", kib <= 8)
    for row in replay_rows(results):
        value, target = row["http_mb_per_s"], row["target_mb_per_s"]
        name = f"replay, one reader, {row['shape']} (MB/s)"
        add(REPLAY_PROXY, name, value, f">= {target:,}", value >= target)
    return rows + scale_checks(results)


REPLAY_PROXY = "proxy (bench_log)"  # `python -m proxy serve`: uvloop when installed
REPLAY_TARGETS = {1: 300, 20: 1000}  # MB/s per reader, by events per record


def replay_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The replay figures of `bench_log.py` (one finished session read by one HTTP reader
    of a proxy process), one row per record shape; none when bench_log did not run."""
    bench = results.get("bench_log", {})
    rows = []
    for per_batch, target in REPLAY_TARGETS.items():
        http = bench.get(f"replay_http_{per_batch}pb_MBps")
        if http is None:
            continue
        rows.append(
            {
                "shape": f"{per_batch} event(s)/record",
                "store_mb_per_s": bench[f"replay_{per_batch}pb_MBps"],
                "http_mb_per_s": http,
                "http_mb_per_cpu_s": bench[f"replay_http_{per_batch}pb_MB_per_cpu_s"],
                "resume_p50_ms": bench[f"resume_first_byte_{per_batch}pb_p50_ms"],
                "resume_p99_ms": bench[f"resume_first_byte_{per_batch}pb_p99_ms"],
                "target_mb_per_s": target,
            }
        )
    return rows


def scale_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The scale-out issue's targets: the Redis columns against the disk backend's, the same
    run. The workers=2 row shows what the rest of the box (load generator, upstream,
    redis-server) burnt, since on 2 cores that bounds what a second worker can get."""
    rows: list[dict[str, Any]] = []
    disk, redis, workers = "proxy-uvloop", "proxy-redis", "proxy-redis-workers2"

    def add(name: str, value: float, target: str, met: bool) -> None:
        rows.append({"proxy": redis, "check": name, "value": value, "target": target, "met": met})

    at_100 = results.get("latency", {}).get("100", {})
    if disk in at_100 and redis in at_100:
        for key, slack in (("p50", 0.3), ("p99", 2.0)):
            mine, base = at_100[redis][f"added_{key}_ms"], at_100[disk][f"added_{key}_ms"]
            limit = round(base + slack, 3)
            add(f"added {key} at 100 (ms)", mine, f"<= {limit} (disk + {slack})", mine <= limit)
    relay = results.get("throughput", {}).get("20_per_write", {})
    if disk in relay and redis in relay:
        ratio = round(relay[redis]["events_per_s"] / relay[disk]["events_per_s"], 3)
        add("relay-bound throughput (x disk)", ratio, ">= 0.7x", ratio >= 0.7)
    if redis in relay and workers in relay:
        ratio = round(relay[workers]["events_per_s"] / relay[redis]["events_per_s"], 3)
        row = relay[workers]
        others = round(
            row["upstream_cpu_pct"]
            + row.get("redis_cpu_pct", 0.0)
            + row["generator_cpu_pct_of_core_per_worker"] * results.get("generator_workers", 1),
            1,
        )
        rows.append(
            {
                "proxy": workers,
                "check": f"relay-bound throughput (x workers=1; the rest used {others}% CPU)",
                "value": ratio,
                "target": ">= 1.4x",
                "met": ratio >= 1.4,
            }
        )
    elsewhere = results.get("resume", {}).get(redis, {}).get("resume_first_byte_other_replica")
    if elsewhere:
        p50 = elsewhere["p50_ms"]
        add("resume through another replica, first byte p50 (ms)", p50, "<= 2 ms", p50 <= 2)
    return rows


def hot_spots(collapsed: str, top: int = 15) -> dict[str, Any]:
    """Self shares of py-spy's collapsed stacks by function (lines merged), and inclusive
    shares of the proxy's own functions."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if _OWN_CODE.search(frame):
                inclusive[frame] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)]

    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    out = [
        "# resumable-proxy benchmark results",
        "",
        f"{machine['date']}, {machine['nproc']} x {machine['cpu_model']}, Linux "
        f"{machine['kernel']}, Python {machine['python']}, aiohttp {machine['aiohttp']}, "
        f"uvloop {machine['uvloop']}, nginx {machine['nginx']}, commit `{machine['git_commit']}`."
        f" {results['generator_workers']} load generator processes; run took "
        f"{results['run_seconds']} s{QUICK_NOTE if results['quick'] else ''}.",
        "Rerun: `python benchmarks/run.py` (all on 127.0.0.1; the proxy runs as "
        "`python -m proxy serve` with its default config: disk log, `fsync: interval`; "
        "proxy-redis is the same on uvloop with `storage.backend: redis`, its own "
        "`redis-server` without persistence; proxy-redis-workers2 the same with "
        "`server.workers: 2`; proxy-redis-cluster the same on a 3-primary Redis Cluster; "
        "those three in the throughput and latency workloads only).",
        "",
        "## Targets",
        "",
    ]
    out += _table(
        ["proxy", "check", "value", "target", "met"],
        [
            [r["proxy"], r["check"], r["value"], r["target"], "yes" if r["met"] else "**no**"]
            for r in results["checks"]
        ],
    )
    out += ["## 1. Saturated throughput (events/s)", ""]
    for mode, figures in results["throughput"].items():
        direct, nginx = figures[DIRECT]["events_per_s"], figures.get(NGINX, {}).get("events_per_s")
        out += [
            f"{results['plan']['throughput_streams']} streams x "
            f"{results['plan']['throughput_events']} events, {mode.replace('_', ' ')}:",
            "",
        ]
        out += _table(
            [
                "target",
                "events/s",
                "MB/s",
                "x direct",
                "x nginx",
                "server CPU %",
                "CPU µs/event",
                "upstream CPU %",
                "redis-server CPU %",
                "generator CPU %/worker",
                "errors",
            ],
            [
                [
                    name,
                    f"{row['events_per_s']:,}",
                    row["mb_per_s"],
                    _ratio(row["events_per_s"], direct),
                    _ratio(row["events_per_s"], nginx),
                    row["server_cpu_pct"],
                    row.get("cpu_us_per_event", "-"),
                    row["upstream_cpu_pct"],
                    row.get("redis_cpu_pct", "-"),
                    row["generator_cpu_pct_of_core_per_worker"],
                    row["errors"] + row["short_streams"],
                ]
                for name, row in figures.items()
            ],
        )
    out += [
        "## 2. Latency per event (receive time minus upstream stamp, ms)",
        "",
        f"Streams paced at {results['plan']['latency_rate']:g} events/s; "
        "'added' is minus the direct run's figure.",
        "",
    ]
    for concurrency, figures in results["latency"].items():
        nginx = figures.get(NGINX, {})
        out += [f"{concurrency} concurrent streams:", ""]
        out += _table(
            [
                "target",
                "p50",
                "p99",
                "p99.9",
                "max",
                "added p50",
                "added p99",
                "added p99.9",
                "p99 x nginx",
                "server CPU %",
                "CPU µs/event",
                "ttfb p99",
                "redis-server CPU %",
                "generator CPU %/worker",
                "samples",
                "errors",
            ],
            [
                [
                    name,
                    row["p50_ms"],
                    row["p99_ms"],
                    row["p999_ms"],
                    row["max_ms"],
                    row["added_p50_ms"],
                    row["added_p99_ms"],
                    row["added_p999_ms"],
                    _ratio(row["p99_ms"], nginx.get("p99_ms")),
                    row["server_cpu_pct"],
                    row.get("cpu_us_per_event", "-"),
                    row.get("ttfb", {}).get("p99_ms", "-"),
                    row.get("redis_cpu_pct", "-"),
                    row["generator_cpu_pct_of_core_per_worker"],
                    row["samples"],
                    row["errors"] + row["short_streams"],
                ]
                for name, row in figures.items()
            ],
        )
    out += ["## 3. Time to first byte and non-stream latency (ms, one request at a time)", ""]
    for kind, title in (
        ("ttfb", "Time to first byte of a stream"),
        ("plain", "Small JSON POST, whole response"),
    ):
        figures = results[kind]
        direct, nginx = figures[DIRECT]["p50_ms"], figures.get(NGINX, {}).get("p50_ms")
        out += [f"{title}:", ""]
        out += _table(
            ["target", "p50", "p99", "added p50", "added p99", "p50 x direct", "p50 x nginx"],
            [
                [
                    name,
                    row["p50_ms"],
                    row["p99_ms"],
                    row["added_p50_ms"],
                    row["added_p99_ms"],
                    _ratio(row["p50_ms"], direct),
                    _ratio(row["p50_ms"], nginx),
                ]
                for name, row in figures.items()
            ],
        )
    plan = results["plan"]
    out += [
        "## 4. Resume",
        "",
        f"{plan['resume_sessions']} finished sessions of {plan['resume_events']} events. "
        "Resume: new connection + `GET /sessions/{id}/events?offset="
        f"{plan['resume_events'] // 2}`, timed from before the connect to the first replayed "
        "byte. Fresh: the same answer asked of the target on a new connection. "
        "Replay: offset 0, one reader.",
        "",
    ]
    resume = results["resume"]
    fresh_direct = resume[DIRECT]["fresh_mb_per_s"]
    out += _table(
        [
            "target",
            "fresh first byte p50",
            "fresh p99",
            "fresh MB/s",
            "resume first byte p50",
            "resume p99",
            "p50, 100 at once",
            "p99, 100 at once",
            "p50 via another replica",
            "replay MB/s",
            "replay x fresh direct",
        ],
        [
            [
                name,
                row["fresh_first_byte"]["p50_ms"],
                row["fresh_first_byte"]["p99_ms"],
                row["fresh_mb_per_s"],
                row.get("resume_first_byte", {}).get("p50_ms", "-"),
                row.get("resume_first_byte", {}).get("p99_ms", "-"),
                row.get("resume_first_byte_at_once", {}).get("p50_ms", "-"),
                row.get("resume_first_byte_at_once", {}).get("p99_ms", "-"),
                row.get("resume_first_byte_other_replica", {}).get("p50_ms", "-"),
                row.get("replay_mb_per_s", "-"),
                _ratio(row["replay_mb_per_s"], fresh_direct) if "replay_mb_per_s" in row else "-",
            ]
            for name, row in resume.items()
        ],
    )
    replays = replay_rows(results)
    if replays:
        out += [
            "Replay of one finished 64 MiB session (200-byte events) by one reader, from "
            "`bench_log.py`: in the store (`DiskStore.read`), and as a user gets it, "
            "`GET /sessions/{id}/events?offset=0` from a proxy process on 127.0.0.1; resume: "
            "new connection to first replayed byte, 500 events from the end.",
            "",
        ]
        out += _table(
            [
                "record shape",
                "store MB/s",
                "HTTP MB/s",
                "MB per proxy CPU s",
                "resume first byte p50",
                "resume p99",
                "target MB/s",
            ],
            [
                [
                    row["shape"],
                    row["store_mb_per_s"],
                    row["http_mb_per_s"],
                    row["http_mb_per_cpu_s"],
                    row["resume_p50_ms"],
                    row["resume_p99_ms"],
                    f">= {row['target_mb_per_s']:,}",
                ]
                for row in replays
            ],
        )
    out += ["## 5. Memory (VmRSS of a fresh proxy process)", ""]
    out += _table(
        [
            "proxy",
            "live sessions",
            "RSS base MiB",
            "with sessions MiB",
            "with readers MiB",
            "KiB per live session",
            "KiB per idle reader",
        ],
        [
            [
                name,
                row["live_sessions"],
                row["rss_base_mib"],
                row["rss_with_sessions_mib"],
                row["rss_with_readers_mib"],
                row["kib_per_live_session"],
                row["kib_per_idle_reader"],
            ]
            for name, row in results["memory"].items()
        ],
    )
    out += [
        "## 6. Log micro-benchmark (`bench_log.py --quick --json`)",
        "",
        "```",
        json.dumps(results["bench_log"], indent=2),
        "```",
        "",
    ]
    for name, profile in results.get("profile", {}).items():
        out += [f"## Profile: {name} under saturated 20-per-write load", ""]
        if "skipped" in profile:
            out += [profile["skipped"], ""]
            continue
        out += [f"{profile['samples']} py-spy samples (`{profile['file']}`, collapsed stacks).", ""]
        out += _table(["function (self)", "%"], profile["self"])
        out += _table(["proxy function (inclusive)", "%"], profile["inclusive"])
    out += ["![latency](latency.png)", "", "![throughput](throughput.png)", ""]
    return "\n".join(out)


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """latency.png (percentiles vs concurrency) and throughput.png (bars); none without
    matplotlib, which the tables do not need."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed: no plots")
        return []
    targets = results["targets"]
    concurrencies = [int(c) for c in results["latency"]]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for axis, (key, title) in zip(
        axes, (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")), strict=True
    ):
        for name in targets:
            measured = [c for c in concurrencies if name in results["latency"][str(c)]]
            if measured:
                axis.plot(
                    measured,
                    [results["latency"][str(c)][name][key] for c in measured],
                    marker="o",
                    label=name,
                )
        axis.set_title(f"{title} latency per event")
        axis.set_xlabel("concurrent streams (50 events/s each)")
        axis.set_xscale("log")
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (receive time - upstream stamp)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(out / "latency.png", dpi=110)
    plt.close(figure)

    modes = list(results["throughput"])
    figure, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(targets)
    for index, name in enumerate(targets):
        # 0 where the target was not measured (proxy-redis in --quick)
        values = [
            results["throughput"][mode].get(name, {}).get("events_per_s", 0) for mode in modes
        ]
        positions = [m + index * width for m in range(len(modes))]
        bars = axis.bar(positions, values, width, label=name)
        labels = [f"{v / 1000:.0f}k" if v else "not run" for v in values]
        axis.bar_label(bars, labels=labels, fontsize=8)
    axis.set_xticks(
        [m + width * (len(targets) - 1) / 2 for m in range(len(modes))],
        [mode.replace("_", " ") for mode in modes],
    )
    axis.set_ylabel("events/s")
    plan = results["plan"]
    axis.set_title(
        f"Saturated throughput, {plan['throughput_streams']} streams x "
        f"{plan['throughput_events']} events"
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "throughput.png", dpi=110)
    plt.close(figure)
    return ["latency.png", "throughput.png"]


def write(results: dict[str, Any], out: Path) -> None:
    results["plots"] = plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
