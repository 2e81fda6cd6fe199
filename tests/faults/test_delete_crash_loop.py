"""Deletes that survive kill -9: an acknowledged DELETE, or a retention pass, is never undone.

`DELETE /sessions/{id}` answers 200 only once its DELETE record is on disk, and retention
forgets a session only once its record is; segments are unlinked only after that. Each round
kill -9s the proxy right after a 200 (or in the middle of retention passes), restarts it on
the same data dir and checks: every deleted session is 404 and out of the listing, every
segment only it held is gone, and every other session replays whole, byte for byte as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path

import aiohttp

from proxy.storage.disk import DiskStore

from ..helpers import ProxyProcess, event_ids, mock_stream_body
from .figures import knob, record
from .syscalls import check_unlinks_follow_durable_deletes, read_log_trace, stop, strace_prefix

AUTH = {"Authorization": "Bearer sk-delete-loop"}
ROUNDS = knob("FAULT_DELETE_ROUNDS", 6)
RETENTION_ROUNDS = knob("FAULT_RETENTION_ROUNDS", 4)


async def create(http: aiohttp.ClientSession, url: str, tokens: int) -> tuple[str, bytes]:
    body = mock_stream_body(tokens, 0)
    async with http.post(url + "/v1/chat/completions", json=body, headers=AUTH) as response:
        assert response.status == 200
        return response.headers["X-Resume-Session-Id"], await response.read()


async def replay(http: aiohttp.ClientSession, url: str, session_id: str) -> tuple[int, bytes]:
    async with http.get(f"{url}/sessions/{session_id}/events", headers=AUTH) as response:
        return response.status, await response.read()


async def listed(http: aiohttp.ClientSession, url: str) -> set[str]:
    ids: set[str] = set()
    query = "?limit=1000"
    while True:
        async with http.get(url + "/sessions" + query, headers=AUTH) as response:
            page = await response.json()
        ids |= {session["id"] for session in page["data"]}
        if not page["has_more"]:
            return ids
        query = f"?limit=1000&after={page['last_id']}"


def held_only_by(data_dir: Path, session_id: str) -> set[Path]:
    """Sealed segments whose records all belong to `session_id` (read offline, beside the
    running proxy): the files its delete must remove at once."""
    reader = DiskStore.open_readonly(data_dir)
    log = reader._log
    mine = {run.segment for run in log.sessions[session_id].runs}
    others = {
        run.segment for sid, slog in log.sessions.items() if sid != session_id for run in slog.runs
    }
    newest = max(log.segments)
    return {log.segments[base].path for base in mine - others - {newest}}


def cut_short(body: bytes) -> bool:
    """A replay of a session the kill interrupted: events from 1, then `interrupted`."""
    ids = event_ids(body)
    return ids == list(range(1, len(ids) + 1)) and body.endswith(b'"code":"interrupted"}}\n\n')


def whole(body: bytes) -> bool:
    ids = event_ids(body)
    return bool(ids) and ids == list(range(1, len(ids) + 1)) and body.endswith(b"data: [DONE]\n\n")


async def test_kill9_right_after_an_acknowledged_delete_never_brings_the_session_back(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "proxy.yaml"
    config.write_text("storage:\n  segment_bytes: 64KiB\n")
    rng = random.Random(19)
    kept: dict[str, str] = {}  # session id -> sha256 of its replay
    deleted: list[str] = []
    segments_removed = 0
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for round_number in range(ROUNDS + 1):
            proxy = ProxyProcess(data_dir, extra_args=["--config", str(config)])
            proxies.append(proxy)
            proxy.start(timeout=60)
            for session_id in deleted:
                async with http.get(f"{proxy.url}/sessions/{session_id}", headers=AUTH) as r:
                    assert r.status == 404, f"round {round_number}: deleted {session_id} is back"
                assert (await replay(http, proxy.url, session_id))[0] == 404
            ids = await listed(http, proxy.url)
            assert not ids & set(deleted)
            assert set(kept) <= ids
            for session_id, digest in kept.items():
                status, body = await replay(http, proxy.url, session_id)
                assert status == 200 and hashlib.sha256(body).hexdigest() == digest, session_id
            if round_number == ROUNDS:
                break
            # One after another, so the middle segments of each session hold it alone.
            made = [await create(http, proxy.url, rng.randint(1500, 3000)) for _ in range(3)]
            victim, _ = made[1]
            doomed = held_only_by(data_dir, victim)
            async with http.delete(f"{proxy.url}/sessions/{victim}", headers=AUTH) as r:
                assert r.status == 200
            proxy.kill()  # right after the 200
            assert not [path for path in doomed if path.exists()], "segments outlived the 200"
            segments_removed += len(doomed)
            deleted.append(victim)
            for session_id, body in (made[0], made[2]):
                assert whole(body)
                kept[session_id] = hashlib.sha256(body).hexdigest()
    record(
        "delete_crash_loop",
        rounds=ROUNDS,
        deleted_sessions=len(deleted),
        segments_removed=segments_removed,
        kept_sessions=len(kept),
        sessions_back=0,
    )
    assert segments_removed >= ROUNDS  # each victim spanned segments of its own


async def keep_making(http: aiohttp.ClientSession, url: str, made: list[str]) -> None:
    """30 short sessions every 0.15 s, until cancelled: some expire in every pass."""
    while True:
        batch = [create(http, url, 3) for _ in range(30)]
        for done in await asyncio.gather(*batch, return_exceptions=True):
            if not isinstance(done, BaseException):
                made.append(done[0])
        await asyncio.sleep(0.15)


async def test_kill9_inside_retention_passes_leaves_every_session_whole_or_gone(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    """Retention with a 1 s ttl evicts hundreds of short sessions every half second while
    the proxy is killed at random moments. A session once gone from the listing stays gone;
    every session that is still there replays whole."""
    data_dir = tmp_path / "data"
    expiring = tmp_path / "expiring.yaml"
    expiring.write_text("storage:\n  segment_bytes: 64KiB\n  retention:\n    ttl: 1s\n")
    keeping = tmp_path / "keeping.yaml"
    keeping.write_text("storage:\n  segment_bytes: 64KiB\n")
    rng = random.Random(20)
    gone: set[str] = set()
    checked = 0
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        for _ in range(RETENTION_ROUNDS):
            proxy = ProxyProcess(data_dir, extra_args=["--config", str(expiring)])
            proxies.append(proxy)
            proxy.start(timeout=60)
            made: list[str] = []
            maker = asyncio.create_task(keep_making(http, proxy.url, made))
            await asyncio.sleep(rng.uniform(1.2, 2.0))  # passes run every 0.5 s
            known = set(made)
            absent = known - await listed(http, proxy.url)
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            proxy.kill()
            maker.cancel()
            await asyncio.gather(maker, return_exceptions=True)
            gone |= absent
            check = ProxyProcess(data_dir, extra_args=["--config", str(keeping)])
            proxies.append(check)
            check.start(timeout=60)
            present = await listed(http, check.url)
            assert not present & gone, f"{len(present & gone)} evicted sessions came back"
            for session_id in present:
                status, body = await replay(http, check.url, session_id)
                assert status == 200, session_id
                if session_id in made:  # its client read it to the end before the kill
                    assert whole(body), session_id
                else:  # its client had not seen the end at the kill: the proxy may have
                    # logged the end before dying (whole), or it ends `interrupted`
                    assert whole(body) or cut_short(body), session_id
                checked += 1
            check.kill()
    record(
        "retention_crash_loop",
        rounds=RETENTION_ROUNDS,
        sessions_evicted_before_a_kill=len(gone),
        sessions_checked_whole=checked,
        sessions_back=0,
    )
    assert gone and checked  # passes evicted sessions, and others were still there


def traced_proxy(
    proxies: list[ProxyProcess], tmp_path: Path, config_yaml: str
) -> tuple[ProxyProcess, Path]:
    """The proxy as a process under strace with `config_yaml`, and where the trace goes."""
    trace = tmp_path / "strace.txt"
    config = tmp_path / "proxy.yaml"
    config.write_text(config_yaml)
    proxy = ProxyProcess(
        tmp_path / "data", extra_args=["--config", str(config)], command_prefix=strace_prefix(trace)
    )
    proxies.append(proxy)
    proxy.start(timeout=60)
    return proxy, trace


async def test_a_delete_is_written_and_fsynced_before_its_200_and_any_unlink(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    """The order of system calls, not the luck of a kill: the DELETE record's write, then an
    fsync (under the default `fsync: interval`), then the segments it frees are unlinked,
    then the 200 goes out."""
    proxy, trace = traced_proxy(proxies, tmp_path, "storage:\n  segment_bytes: 64KiB\n")
    assert proxy.process is not None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        made = [await create(http, proxy.url, 2000) for _ in range(3)]
        victim, _ = made[1]
        async with http.delete(f"{proxy.url}/sessions/{victim}", headers=AUTH) as r:
            assert r.status == 200
    stop(proxy.process.pid)
    assert await asyncio.to_thread(proxy.process.wait, 30) == 0
    log = read_log_trace(trace)
    durable = log.durable_at(victim)
    answer = b'{"id": "%s", "deleted": true}' % victim.encode()
    acks = [line for line, data in log.sent if answer in data]
    assert durable is not None and len(acks) == 1
    assert durable < acks[0], "the 200 went out before the DELETE record was fsynced"
    freed = [name for name, holders in log.holders.items() if holders == {victim}]
    assert freed and set(freed) <= set(log.unlinked)
    assert all(log.unlinked[name] < acks[0] for name in freed)
    assert check_unlinks_follow_durable_deletes(log) == len(log.unlinked)


async def test_retention_fsyncs_its_delete_records_before_it_unlinks_a_segment(
    proxies: list[ProxyProcess], tmp_path: Path
) -> None:
    proxy, trace = traced_proxy(
        proxies, tmp_path, "storage:\n  segment_bytes: 64KiB\n  retention:\n    ttl: 1s\n"
    )
    assert proxy.process is not None
    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=60), connector=connector
    ) as http:
        created = await asyncio.gather(*(create(http, proxy.url, 3) for _ in range(200)))
        made = {session_id for session_id, _ in created}
        for _ in range(100):  # retention passes run every 0.5 s; all expire after 1 s
            if not made & await listed(http, proxy.url):
                break
            await asyncio.sleep(0.1)
        assert not made & await listed(http, proxy.url)
    stop(proxy.process.pid)
    assert await asyncio.to_thread(proxy.process.wait, 30) == 0
    log = read_log_trace(trace)
    assert check_unlinks_follow_durable_deletes(log) >= 2
