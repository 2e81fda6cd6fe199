"""Disk trouble: a data dir that refuses writes (full, read-only, permission denied).

An event reaches clients only once the log has it, so when the disk refuses a session's
records its readers get every event that was logged, then the `failed` error event, and its
upstream read stops. The store says so once in the log, `/healthz` answers 503, nothing
logged before is damaged, and `/healthz` is 200 again as soon as the disk takes a write,
traffic or not. Injected errors at the log's OS-call seam run everywhere; a real full tmpfs
and a read-only mount run where this process may mount file systems (always in CI).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from proxy.config import Config
from proxy.storage import disk as disk_module
from proxy.storage import log as log_module

from ..helpers import (
    ProxyProcess,
    aread_events,
    event_ids,
    missing_tool,
    mock_stream_body,
    run_proxy,
)
from .figures import record

AUTH = {"Authorization": "Bearer sk-disk"}


async def stream(
    http: aiohttp.ClientSession, url: str, body: dict[str, object]
) -> tuple[str, bytes]:
    async with http.post(url + "/v1/chat/completions", json=body, headers=AUTH) as response:
        return response.headers["X-Resume-Session-Id"], await response.read()


async def replay(http: aiohttp.ClientSession, url: str, session_id: str) -> bytes:
    async with http.get(f"{url}/sessions/{session_id}/events", headers=AUTH) as response:
        assert response.status == 200
        return await response.read()


async def health(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url + "/healthz") as response:
        return response.status, await response.json()


def ended_failed_after_what_was_logged(body: bytes) -> list[int]:
    """A stream the disk stopped logging: numbered events from 1 without a gap, then the
    `failed` error event (a storage error) and nothing else. Returns the event ids."""
    ids = event_ids(body)
    assert ids == list(range(1, len(ids) + 1))
    final = body[body.rindex(b'data: {"error"') :]
    error = json.loads(final.removeprefix(b"data: "))["error"]
    assert (error["code"], error["type"]) == ("failed", "resumable_proxy_error")
    assert "storage error" in error["message"]
    assert b"[DONE]" not in body
    return ids


async def healthy_again(http: aiohttp.ClientSession, url: str) -> bool:
    """/healthz polled for a few seconds (its probe runs at most once a second)."""
    for _ in range(50):
        if (await health(http, url))[0] == 200:
            return True
        await asyncio.sleep(0.1)
    return False


def refuse(code: int) -> Callable[..., Any]:
    def call(*args: object) -> Any:
        raise OSError(code, os.strerror(code))

    return call


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=errno.errorcode.get)
async def test_unwritable_disk_ends_streams_failed_fails_healthz_and_recovers(
    code: int,
    config_for: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = config_for()
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        before_id, before = await stream(http, proxy.url, mock_stream_body(20, 0))
        assert (await health(http, proxy.url))[0] == 200
        with caplog.at_level(logging.ERROR, logger="proxy.storage"), monkeypatch.context() as m:
            m.setattr(log_module.osio, "write", refuse(code))
            m.setattr(log_module.osio, "open", refuse(code))
            during_id, during = await stream(http, proxy.url, mock_stream_body(50, 2))
            status, body = await health(http, proxy.url)
            assert (status, body["storage"]) == (503, "unwritable")
            assert await replay(http, proxy.url, before_id) == before
            async with http.get(f"{proxy.url}/sessions/{during_id}", headers=AUTH) as response:
                info = await response.json()
        # Its first records were refused: the client got no event, only the end.
        assert ended_failed_after_what_was_logged(during) == []
        assert (info["state"], info["events"]) == ("failed", 0)
        errors = [r.getMessage() for r in caplog.records if r.name == "proxy.storage"]
        assert len(errors) == 1, errors  # once per episode, not once per write
        assert os.strerror(code) in errors[0] and str(config.storage.dir) in errors[0]
        assert await healthy_again(http, proxy.url)  # the probe: no stream wrote meanwhile
        after_id, after = await stream(http, proxy.url, mock_stream_body(5, 0))
        assert await replay(http, proxy.url, after_id) == after
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        assert await replay(http, proxy.url, before_id) == before
        assert await replay(http, proxy.url, after_id) == after


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, mounted for this test and unmounted after it."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:  # .ci/run runs as root, where mounting a tmpfs works
        missing_tool(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:
                file.write(b"\0")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


async def test_real_full_tmpfs_ends_streams_where_the_log_stopped_and_healthz_recovers(
    tmpfs: Path,
    config_for: Callable[..., Config],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(disk_module, "PROBE_INTERVAL", 0.2)
    config = config_for(**{"storage.dir": str(tmpfs / "data")})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        before_id, before = await stream(http, proxy.url, mock_stream_body(20, 0))
        filler = fill(tmpfs)
        with caplog.at_level(logging.ERROR, logger="proxy.storage"):
            during_id, during = await stream(http, proxy.url, mock_stream_body(2000, 0))
            status, _ = await health(http, proxy.url)
            assert await replay(http, proxy.url, before_id) == before
        shown = ended_failed_after_what_was_logged(during)
        assert status == 503
        assert any("No space left on device" in r.getMessage() for r in caplog.records)
        filler.unlink()
        assert await healthy_again(http, proxy.url)  # before any stream writes again
        after_id, after = await stream(http, proxy.url, mock_stream_body(5, 0))
        assert await replay(http, proxy.url, after_id) == after
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        assert await replay(http, proxy.url, before_id) == before
        assert await replay(http, proxy.url, after_id) == after
        async with http.get(f"{proxy.url}/sessions/{during_id}/events", headers=AUTH) as r:
            if r.status == 404:  # its OPEN record never reached the disk
                assert shown == []
            else:  # every event its client was shown is in the log, nothing more
                assert r.status == 200
                assert event_ids(await r.read()) == shown
    record(
        "disk_full_tmpfs",
        tmpfs_bytes=1 << 20,
        events_shown_before_the_disk_filled=len(shown),
    )


async def test_kill9_after_the_disk_filled_keeps_every_event_a_client_was_shown(
    tmpfs: Path, proxies: list[ProxyProcess]
) -> None:
    """The proxy as a real process on a 1 MiB tmpfs: the disk fills under a long stream
    (the filler written beside it), its client reads to the end, the proxy is killed -9 and
    restarted with the space freed: the log holds exactly what the client was shown."""
    proxy = ProxyProcess(tmpfs)
    proxies.append(proxy.start())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        body = mock_stream_body(5000, 1)
        async with http.post(
            proxy.url + "/v1/chat/completions", json=body, headers=AUTH
        ) as response:
            session_id = response.headers["X-Resume-Session-Id"]
            seen = await aread_events(response, 20)
            filler = fill(tmpfs)
            seen += await response.read()
        shown = ended_failed_after_what_was_logged(seen)
        assert len(shown) >= 20
        proxy.kill()
        filler.unlink()
        again = ProxyProcess(tmpfs)
        proxies.append(again.start())
        async with http.get(f"{again.url}/sessions/{session_id}", headers=AUTH) as r:
            info = await r.json()
        async with http.get(f"{again.url}/sessions/{session_id}/events", headers=AUTH) as r:
            replayed = await r.read()
    assert event_ids(replayed)[: len(shown)] == shown
    assert replayed.startswith(seen[: seen.rindex(b'data: {"error"')])  # byte for byte
    assert info["events"] >= len(shown)
    record("disk_full_kill9", events_shown=len(shown), events_logged=info["events"])


def test_read_only_data_dir_stops_start_up_with_one_clear_line(
    tmpfs: Path, proxies: list[ProxyProcess]
) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proxy = ProxyProcess(tmpfs)  # its log goes beside the data dir, outside the mount
    proxies.append(proxy)
    with pytest.raises(RuntimeError, match="exited at start-up") as failure:
        proxy.start()
    errors = [line for line in str(failure.value).splitlines() if line.startswith("error:")]
    assert errors == [f"error: storage: cannot open data dir {tmpfs}: Read-only file system"]


async def test_a_replay_that_meets_a_lost_segment_ends_with_the_failed_event_not_a_second_response(
    config_for: Callable[..., Config],
) -> None:
    """A segment lost under the log (deleted by hand, a bad disk) is a storage error in the
    middle of a replay whose 200 and first events are already out: the reader gets the
    `failed` event and a well-formed end of the chunked body, never an error response
    written into it (which broke httpx with `illegal chunk header` and hung aiohttp)."""
    config = config_for(**{"storage.segment_bytes": "64KiB"})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        session_id, original = await stream(http, proxy.url, mock_stream_body(3000, 0))
    segments = sorted(config.storage.dir.glob("*.log"))
    assert len(segments) >= 4
    lost = segments[len(segments) // 2]
    lost.unlink()
    lost.with_suffix(".idx").unlink(missing_ok=True)
    async with run_proxy(config) as proxy:
        url = f"{proxy.url}/sessions/{session_id}/events"
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("GET", url, headers=AUTH) as response:
                status = response.status_code
                body = b"".join([piece async for piece in response.aiter_raw()])
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            again = await replay(http, proxy.url, session_id)
    assert status == 200
    shown = ended_failed_after_what_was_logged(body)
    assert 0 < len(shown) < len(event_ids(original))
    assert original.startswith(body[: body.rindex(b'data: {"error"')])
    assert b"HTTP/1.1" not in body
    assert again == body
