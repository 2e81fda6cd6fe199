"""The proxy as a real process: kill -9 and restart, SIGTERM with live streams, offline CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .helpers import (
    ROOT,
    ProxyProcess,
    chat_stream,
    event_ids,
    mock_stream_body,
    read_events,
    whole_events,
)

AUTH = {"Authorization": "Bearer sk-carol"}


def start(proxies: list[ProxyProcess], data_dir: Path, *args: str) -> ProxyProcess:
    proxy = ProxyProcess(data_dir, extra_args=list(args))
    proxies.append(proxy)
    return proxy.start()


def test_kill9_mid_stream_then_restart_keeps_every_event_a_client_saw(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = start(proxies, data_dir)
    with httpx.Client(timeout=20) as http:
        with chat_stream(first.url, 2000, 5, AUTH, timeout=20) as response:
            session_id = response.headers["X-Resume-Session-Id"]
            seen = whole_events(read_events(response.iter_raw(), 40))
            first.kill()
        second = start(proxies, data_dir)
        info = http.get(f"{second.url}/sessions/{session_id}", headers=AUTH).json()
        replay = http.get(f"{second.url}/sessions/{session_id}/events", headers=AUTH).content
    assert info["state"] == "interrupted"
    assert info["events"] >= 40
    assert replay.startswith(seen)
    assert event_ids(replay) == list(range(1, info["events"] + 1))
    final = json.loads(replay[replay.rindex(b"data: ") + 6 :])
    assert final["error"]["code"] == "interrupted"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_lets_live_streams_finish_within_grace_and_exits_0(
    proxies: list[ProxyProcess], tmp_path: Path, stop: signal.Signals
) -> None:
    proxy = start(proxies, tmp_path / "data")
    with chat_stream(proxy.url, 40, 20, AUTH, timeout=20) as response:
        chunks = response.iter_raw()
        seen = read_events(chunks, 3)
        assert proxy.process is not None
        proxy.process.send_signal(stop)
        rest = b"".join(chunks)
    assert proxy.process.wait(20) == 0
    whole = seen + rest
    assert event_ids(whole) == list(range(1, 44))
    assert whole.endswith(b"data: [DONE]\n\n")


def test_sigterm_past_grace_ends_streams_interrupted_with_error_event(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text("server:\n  shutdown_grace: 500ms\n")
    data_dir = tmp_path / "data"
    proxy = start(proxies, data_dir, "--config", str(config))
    with httpx.Client(timeout=20) as http:
        with chat_stream(proxy.url, 1000, 10, AUTH, timeout=20) as response:
            session_id = response.headers["X-Resume-Session-Id"]
            chunks = response.iter_raw()
            seen = read_events(chunks, 3)
            assert proxy.process is not None
            proxy.process.terminate()
            rest = b"".join(chunks)
        assert proxy.process.wait(20) == 0
        whole = seen + rest
        assert len(event_ids(whole)) < 1000  # ended at the grace, not at the stream's end
        assert b'"code":"interrupted"' in whole[whole.rindex(b"data: ") :]
        again = start(proxies, data_dir)
        info = http.get(f"{again.url}/sessions/{session_id}", headers=AUTH).json()
        replay = http.get(f"{again.url}/sessions/{session_id}/events", headers=AUTH).content
    assert info["state"] == "interrupted"
    assert replay == whole


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "sessions", *args],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
    )


def test_offline_cli_reads_a_data_dir_while_the_proxy_writes_it(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    proxy = start(proxies, data_dir)
    with httpx.Client(timeout=20) as http:
        done = http.post(
            proxy.url + "/v1/chat/completions", json=mock_stream_body(5, 0), headers=AUTH
        )
        finished_id = done.headers["X-Resume-Session-Id"]
        with chat_stream(proxy.url, 500, 10, AUTH, timeout=20) as response:
            live_id = response.headers["X-Resume-Session-Id"]
            read_events(response.iter_raw(), 5)
            listing = run_cli("ls", "--data-dir", str(data_dir))
            shown = run_cli("show", live_id, "--data-dir", str(data_dir))
            cat = run_cli("cat", finished_id, "--offset", "5", "--data-dir", str(data_dir))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "STATE", "EVENTS", "BYTES", "AGE", "PATH"]
    assert lines[1].split()[:2] == [live_id, "streaming"]  # newest first
    assert lines[2].split()[:2] == [finished_id, "complete"]
    assert shown.returncode == 0
    assert b"ttft_ms:" in shown.stdout and b"state:            streaming" in shown.stdout
    assert cat.returncode == 0
    assert event_ids(cat.stdout) == [6, 7, 8]
    assert cat.stdout.endswith(b"data: [DONE]\n\n")


def test_offline_cli_takes_ids_that_begin_with_a_dash(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    """One generated id in 64 begins with "-": it is an id, never an unknown option."""
    data_dir = tmp_path / "data"
    proxy = start(proxies, data_dir)
    session_id = "-gvJ_MaUa22HgxMilvoZ_Q"
    with httpx.Client(timeout=20) as http:
        made = http.post(
            proxy.url + "/v1/chat/completions",
            json=mock_stream_body(3, 0),
            headers={**AUTH, "X-Resume-Session-Id": session_id},
        )
    assert made.headers["X-Resume-Session-Id"] == session_id
    shown = run_cli("show", session_id, "--data-dir", str(data_dir))
    cat = run_cli("cat", "--data-dir", str(data_dir), session_id, "--offset", "1")
    assert shown.returncode == 0, shown.stderr
    assert b"state:            complete" in shown.stdout
    assert cat.returncode == 0, cat.stderr
    ids = event_ids(cat.stdout)
    assert ids == list(range(2, ids[-1] + 1)) and len(ids) >= 3
    assert cat.stdout.endswith(b"data: [DONE]\n\n")


def test_offline_cli_errors_are_one_line(tmp_path: Path) -> None:
    not_data = tmp_path / "elsewhere"
    not_data.mkdir()
    (not_data / "notes.log").write_text("hello")
    result = run_cli("ls", "--data-dir", str(not_data))
    assert result.returncode == 1
    assert (
        result.stderr.decode()
        .strip()
        .endswith("is not a resumable-proxy data dir (no *.log segments)")
    )
    missing = run_cli("show", "abcdefghij", "--data-dir", str(tmp_path / "nope"))
    assert missing.returncode == 1 and b"does not exist" in missing.stderr


def test_offline_cli_takes_the_data_dir_from_config(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    """`sessions ... --config PATH` reads `storage.dir` from the file; --data-dir wins."""
    (tmp_path / "elsewhere").mkdir()
    data_dir = tmp_path / "elsewhere" / "data"
    proxy = start(proxies, data_dir)
    with httpx.Client(timeout=20) as http:
        done = http.post(
            proxy.url + "/v1/chat/completions", json=mock_stream_body(3, 0), headers=AUTH
        )
    session_id = done.headers["X-Resume-Session-Id"]
    config = tmp_path / "proxy.yaml"
    config.write_text(f"storage:\n  dir: {data_dir}\n")
    listing = run_cli("ls", "--config", str(config))
    cat = run_cli("cat", session_id, "--offset", "4", "--config", str(config))
    overridden = run_cli("ls", "--config", str(config), "--data-dir", str(tmp_path / "none"))
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().splitlines()[1].split()[:2] == [session_id, "complete"]
    assert cat.returncode == 0 and event_ids(cat.stdout) == [5, 6]
    assert overridden.returncode == 1 and b"does not exist" in overridden.stderr
