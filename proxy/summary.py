"""What a session looks like from outside: the JSON of `GET /sessions/{id}` and the CLI's view.

One function serves the API and the offline CLI so both always show the same fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from .latency import session_figures
from .storage.base import SessionInfo


def iso_time(ns: int) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-11-25T15:47:28.407Z."""
    moment = datetime.fromtimestamp(ns / 1e9, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def session_summary(info: SessionInfo) -> dict[str, object]:
    meta = info.meta
    return {
        "id": meta.session_id,
        "state": info.state,
        "reason": info.reason,
        "events": info.events,
        "bytes": info.bytes,
        "created_at": iso_time(meta.created_ns),
        "updated_at": iso_time(info.updated_ns or meta.created_ns),
        "method": meta.method,
        "path": meta.path,
        "upstream_status": meta.upstream_status,
    }


def session_details(
    info: SessionInfo, arrivals: Sequence[tuple[int, int, int]]
) -> dict[str, object]:
    """The summary plus the latency figures computed from the logged arrival times."""
    return {**session_summary(info), **session_figures(info.meta.request_ns, arrivals)}
