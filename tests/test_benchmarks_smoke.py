"""The benchmark suite runs end to end: `benchmarks/run.py --quick` writes every output.

This checks that the benchmark works, never a speed: a quick run's counts are too small for
its figures to mean anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_results_json_markdown_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    targets = results["targets"]
    assert targets[0] == "direct" and any(name.startswith("proxy") for name in targets)
    # The Redis columns (when redis-server is installed: proxy-redis, proxy-redis-workers2,
    # proxy-redis-cluster) run in --quick's 20-per-write throughput only (and proxy-redis in
    # the resume workload too, through a second replica as well), proxy-always
    # (fsync: always) in the latency workload at 100 streams only; every other target runs in
    # every workload.
    redis_columns = [name for name in targets if name.startswith("proxy-redis")]
    everywhere = [name for name in targets if name not in [*redis_columns, "proxy-always"]]
    assert results["latency"]["100"]["proxy-always"]["samples"] > 0
    for figures in results["latency"].values():
        assert all(figures[name]["cpu_us_per_event"] > 0 for name in everywhere)
    for mode in ("1_per_write", "20_per_write"):
        for row in results["throughput"][mode].values():
            assert row["streams"] > 0 and row["errors"] == 0 and row["short_streams"] == 0
        assert set(everywhere) <= set(results["throughput"][mode])
    for name in redis_columns:
        assert results["throughput"]["20_per_write"][name]["redis_cpu_pct"] >= 0
    for figures in results["latency"].values():
        assert all(figures[name]["samples"] > 0 for name in everywhere)
    for name in everywhere:
        assert results["ttfb"][name]["samples"] > 0 and results["plain"][name]["samples"] > 0
    for name in everywhere:
        if name.startswith("proxy"):
            assert results["resume"][name]["resume_first_byte"]["samples"] > 0
            assert results["resume"][name]["resume_first_byte_at_once"]["samples"] > 0
            assert results["memory"][name]["live_sessions"] > 0
    if "proxy-redis" in targets:
        elsewhere = results["resume"]["proxy-redis"]["resume_first_byte_other_replica"]
        assert elsewhere["samples"] > 0
    assert results["checks"] and "bench_log" in results
    assert results["machine"]["git_commit"]

    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# resumable-proxy benchmark results")
    assert "## 4. Resume" in markdown
    for plot in results["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_proxy_redis_column_is_skipped_without_the_redis_package() -> None:
    """run.py starts proxy-redis only when `serve` can use Redis: with the package missing
    (blocked here, as if never installed) the column is skipped with the reason, not a crash
    at start-up of the proxy."""
    script = (
        "import sys; sys.modules['redis'] = None; sys.path.insert(0, 'benchmarks'); "
        "import procs; print(procs.redis_missing())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in (
        "redis-server not found",
        "the redis package is not installed (pip install 'resumable-proxy[redis]')",
    )
