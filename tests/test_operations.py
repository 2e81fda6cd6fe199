"""What an operator relies on: metrics that move, parseable logs without secrets, health.

The image itself is built and run in tests/test_container.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config

from .helpers import ProxyProcess, ScriptedUpstream, read_sse, run_proxy

SECRET = "sk-very-secret-value"
BODY = {
    "model": "m",
    "messages": [{"role": "user", "content": "count"}],
    "stream": True,
    "mock_tokens": 10,
    "mock_interval_ms": 1,
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_metrics_parse_and_move_with_traffic(config_for: Callable[..., Config]) -> None:
    async with run_proxy(config_for()) as proxy, aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/metrics") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            before = samples(await response.text())
        headers = {"Authorization": f"Bearer {SECRET}"}
        url = proxy.url + "/v1/chat/completions"
        response, _ = await read_sse(http, url, method="POST", json=BODY, headers=headers)
        session_id = response.headers["X-Resume-Session-Id"]
        await read_sse(http, f"{proxy.url}/sessions/{session_id}/events", headers=headers)
        async with http.get(proxy.url + "/metrics") as response:
            text = await response.text()
            after = samples(text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("resumable_proxy_sessions_started_total") == 1
    assert delta("resumable_proxy_sessions_ended_total", state="complete") == 1
    assert delta("resumable_proxy_events_logged_total") == 13
    assert delta("resumable_proxy_events_relayed_total") == 26  # first client + one replay
    assert delta("resumable_proxy_replays_total") == 1
    # the stream, the replay, and the first /metrics itself (counted once answered)
    assert delta("resumable_proxy_requests_total", status="200") == 3
    assert delta("resumable_proxy_bytes_logged_total") > 1000
    assert delta("resumable_proxy_upstream_time_to_first_event_seconds_count") == 1
    assert delta("resumable_proxy_upstream_inter_event_seconds_count") >= 1
    assert delta("resumable_proxy_added_latency_seconds_count") >= 1
    assert after[("resumable_proxy_storage_bytes", ())] > 1000
    assert after[("resumable_proxy_storage_healthy", ())] == 1
    assert ("resumable_proxy_log_fsync_seconds_count", ()) in after
    assert session_id not in text


async def test_latency_histograms_observe_each_event_not_each_read(
    upstream: ScriptedUpstream, config_for: Callable[..., Config]
) -> None:
    """One event, then 25 in one upstream read, then [DONE]: 27 events, so 1 time to first
    event, 26 inter-event gaps (24 of them 0: the events that shared a read) and 27 added
    latencies for the reader that followed live."""
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"t"}}]}\n\n'
    # Pauses first, too: the reader is following before the first event arrives.
    upstream.script = [0.2, chunk, 0.2, chunk * 25, 0.2, b"data: [DONE]\n\n"]
    async with run_proxy(config_for(upstream.url)) as proxy, aiohttp.ClientSession() as http:
        url = proxy.url + "/v1/chat/completions"
        caller = {"Authorization": "Bearer sk-metrics"}
        _, body = await read_sse(http, url, method="POST", json=BODY, headers=caller)
        async with http.get(proxy.url + "/metrics") as response:
            after = samples(await response.text())
    assert body.count(b"\n\n") == 27

    def count(name: str) -> float:
        return after[(f"resumable_proxy_{name}_count", ())]

    assert count("upstream_time_to_first_event_seconds") == 1
    assert count("upstream_inter_event_seconds") == 26
    zero_bucket = ("resumable_proxy_upstream_inter_event_seconds_bucket", (("le", "0.0001"),))
    assert after[zero_bucket] >= 24
    assert count("added_latency_seconds") == 27


@pytest.mark.parametrize(
    ("upstream_url", "demo", "status"),
    [("mock", None, 200), ("mock", "false", 404), ("http://127.0.0.1:9", None, 404),
     ("http://127.0.0.1:9", "true", 200)],
    ids=["mock-default", "mock-off", "real-default", "real-on"],
)  # fmt: skip
async def test_server_demo_turns_the_demo_page_on_and_off(
    config_for: Callable[..., Config], upstream_url: str, demo: str | None, status: int
) -> None:
    overrides = {} if demo is None else {"server.demo": demo}
    async with run_proxy(config_for(upstream_url, **overrides)) as proxy:
        async with aiohttp.ClientSession() as http, http.get(proxy.url + "/demo") as response:
            assert response.status == status
            if status == 200:
                assert response.content_type == "text/html"
                assert "resume.js" in await response.text()
            else:
                assert (await response.json())["error"]["code"] == "not_found"


def test_json_log_lines_parse_and_hold_no_secrets(tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text("server:\n  log_format: json\n")
    proxy = ProxyProcess(tmp_path / "data", extra_args=["--config", str(config)]).start()
    try:
        with httpx.Client(timeout=20) as http:
            response = http.post(
                proxy.url + "/v1/chat/completions",
                json=BODY,
                headers={"Authorization": f"Bearer {SECRET}"},
            )
            session_id = response.headers["X-Resume-Session-Id"]
            http.get(proxy.url + "/healthz")
    finally:
        assert proxy.terminate() == 0
    lines = [line for line in proxy.log().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    access = [json.loads(r["message"]) for r in records if r["logger"] == "proxy.access"]
    assert {"method": "POST", "path": "/v1/chat/completions", "status": 200}.items() <= access[
        0
    ].items()
    assert access[0]["session_id"] == session_id
    assert access[0]["events"] == 13
    assert SECRET not in proxy.log()
    assert "count" not in proxy.log()  # no request bodies


def test_healthz_reports_ok(tmp_path: Path) -> None:
    proxy = ProxyProcess(tmp_path / "data").start()
    try:
        health = httpx.get(proxy.url + "/healthz", timeout=10)
    finally:
        proxy.terminate()
    assert health.status_code == 200
    assert health.json()["storage"] == "ok"
