"""`resumable-proxy sessions ...`: read a data dir without a running proxy, or beside one.

The store is opened read-only: no lock, no truncation, no writes, so this is safe while a
proxy appends to the same dir; it sees the log as of the moment it opened it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import click

from .readers import READ_BATCH_BYTES, final_event, replay
from .sessions import check_session_id
from .storage.base import StorageError
from .storage.disk import DiskStore
from .storage.log import segment_bases
from .summary import session_details


def _open(directory: Path) -> DiskStore:
    if not directory.is_dir():
        raise StorageError(f"{directory} does not exist or is not a directory")
    if not segment_bases(directory) and not (directory / "LOCK").exists():
        raise StorageError(f"{directory} is not a resumable-proxy data dir (no *.log segments)")
    return DiskStore.open_readonly(directory)


def _age(created_at_ns: int) -> str:
    seconds = max(0, int(time.time() - created_at_ns / 1e9))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def list_sessions(directory: Path) -> None:
    store = _open(directory)
    sessions = asyncio.run(store.list())
    rows = [("ID", "STATE", "EVENTS", "BYTES", "AGE", "PATH")]
    for info in sessions:
        rows.append(
            (
                info.session_id,
                info.state,
                str(info.events),
                str(info.bytes),
                _age(info.meta.created_ns),
                f"{info.meta.method} {info.meta.path.split('?')[0]}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]))


async def _details(store: DiskStore, session_id: str) -> dict[str, object]:
    info = await store.get(session_id)
    if info is None:
        raise LookupError(f"no session {session_id}")
    return session_details(info, await store.arrivals(session_id))


def show_session(directory: Path, session_id: str) -> None:
    check_session_id(session_id)
    details = asyncio.run(_details(_open(directory), session_id))
    figures = details.pop("inter_event_ms")
    for key, value in details.items():
        click.echo(f"{key + ':':<17} {'' if value is None else value}")
    assert isinstance(figures, dict)
    for key, value in figures.items():
        click.echo(f"{'inter_event_' + key + ':':<17} {'' if value is None else value} ms")


async def _cat(store: DiskStore, session_id: str, offset: int) -> None:
    info = await store.get(session_id)
    if info is None:
        raise LookupError(f"no session {session_id}")
    if offset > info.events:
        raise ValueError(f"offset {offset} is past the end ({info.events} events)")
    out = sys.stdout.buffer

    async def write(data: bytes, count: int, last: int) -> None:
        out.write(data)

    await replay(store, session_id, offset + 1, READ_BATCH_BYTES, write)
    out.write(final_event(info))
    out.flush()


def cat_session(directory: Path, session_id: str, offset: int) -> None:
    check_session_id(session_id)
    asyncio.run(_cat(_open(directory), session_id, offset))
