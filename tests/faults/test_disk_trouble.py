"""Disk trouble: a data dir that refuses writes (full, read-only, permission denied).

The store says so once in the log, `/healthz` answers 503, clients keep receiving every event
from memory, nothing logged before is damaged, and `/healthz` is 200 again as soon as a write
succeeds. Injected errors at the log's OS-call seam run everywhere; a real full tmpfs and a
read-only mount run where this process may mount file systems.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Config
from proxy.storage import log as log_module

from ..helpers import ProxyProcess, event_ids, mock_stream_body, run_proxy
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


def relayed_whole(body: bytes, tokens: int) -> None:
    """Every event of a `tokens`-token mock answer reached the client, in order."""
    events = tokens + 2  # the role chunk, the tokens, the finish chunk; then [DONE]
    assert event_ids(body) == list(range(1, events + 2))
    assert b"data: [DONE]\n\n" in body


def refuse(code: int) -> Callable[..., Any]:
    def call(*args: object) -> Any:
        raise OSError(code, os.strerror(code))

    return call


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=errno.errorcode.get)
async def test_unwritable_disk_fails_healthz_keeps_relaying_and_recovers(
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
        relayed_whole(during, 50)
        errors = [r.getMessage() for r in caplog.records if r.name == "proxy.storage"]
        assert len(errors) == 1, errors  # once per episode, not once per write
        assert os.strerror(code) in errors[0] and str(config.storage.dir) in errors[0]
        after_id, after = await stream(http, proxy.url, mock_stream_body(5, 0))
        assert (await health(http, proxy.url))[0] == 200
        assert await replay(http, proxy.url, after_id) == after
        async with http.get(f"{proxy.url}/sessions/{during_id}", headers=AUTH) as response:
            info = await response.json()
        assert info["state"] == "failed"
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
    if mounted.returncode != 0:
        if os.environ.get("CI"):  # .ci/run runs as root, where mounting a tmpfs works
            pytest.fail(f"cannot mount a tmpfs in CI: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {mounted.stderr.strip()}")
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


async def test_real_full_tmpfs_fails_healthz_keeps_relaying_and_recovers_when_freed(
    tmpfs: Path, config_for: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(**{"storage.dir": str(tmpfs / "data")})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        before_id, before = await stream(http, proxy.url, mock_stream_body(20, 0))
        filler = fill(tmpfs)
        with caplog.at_level(logging.ERROR, logger="proxy.storage"):
            during_id, during = await stream(http, proxy.url, mock_stream_body(200, 1))
            status, _ = await health(http, proxy.url)
            assert await replay(http, proxy.url, before_id) == before
        relayed_whole(during, 200)
        assert status == 503
        assert any("No space left on device" in r.getMessage() for r in caplog.records)
        filler.unlink()
        after_id, after = await stream(http, proxy.url, mock_stream_body(5, 0))
        assert (await health(http, proxy.url))[0] == 200
        assert await replay(http, proxy.url, after_id) == after
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as http:
        assert await replay(http, proxy.url, before_id) == before
        assert await replay(http, proxy.url, after_id) == after
        async with http.get(f"{proxy.url}/sessions/{during_id}", headers=AUTH) as response:
            if response.status == 200:  # its OPEN record may have reached the disk
                torn = await replay(http, proxy.url, during_id)
                assert event_ids(torn) == list(range(1, len(event_ids(torn)) + 1))
    record(
        "disk_full_tmpfs",
        tmpfs_bytes=1 << 20,
        events_relayed_while_full=len(event_ids(during)),
    )


def test_read_only_data_dir_stops_start_up_with_one_clear_line(tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proxy = ProxyProcess(tmpfs)  # its log goes beside the data dir, outside the mount
    with pytest.raises(RuntimeError, match="exited at start-up") as failure:
        try:
            proxy.start()
        finally:
            proxy.kill()
    errors = [line for line in str(failure.value).splitlines() if line.startswith("error:")]
    assert errors == [f"error: storage: cannot open data dir {tmpfs}: Read-only file system"]
