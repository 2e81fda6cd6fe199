"""Prometheus metrics, one registry per app so two proxies in one process never mix counts.

Hot-path hooks are plain method calls on pre-bound children (no label lookup per event).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .storage.disk import DiskStore

if TYPE_CHECKING:
    from .sessions import SessionManager

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "resumable_proxy_requests",
            "HTTP requests answered, by status code",
            ["status"],
            registry=registry,
        )
        self.sessions_started = Counter(
            "resumable_proxy_sessions_started", "Streams that became sessions", registry=registry
        )
        self.sessions_ended = Counter(
            "resumable_proxy_sessions_ended",
            "Sessions that reached a final state, by state",
            ["state"],
            registry=registry,
        )
        self.live_sessions = Gauge(
            "resumable_proxy_live_sessions",
            "Sessions whose upstream is being read now",
            registry=registry,
        )
        self.readers = Gauge(
            "resumable_proxy_readers", "Clients following a session now", registry=registry
        )
        self.replays = Counter(
            "resumable_proxy_replays", "Reads of an existing session (resumes)", registry=registry
        )
        self.events_logged = Counter(
            "resumable_proxy_events_logged", "Events teed into the log", registry=registry
        )
        self.bytes_logged = Counter(
            "resumable_proxy_bytes_logged", "Event bytes teed into the log", registry=registry
        )
        self.events_relayed = Counter(
            "resumable_proxy_events_relayed",
            "Events written to clients (each reader counts)",
            registry=registry,
        )
        self.upstream_ttfe = Histogram(
            "resumable_proxy_upstream_time_to_first_event_seconds",
            "Request sent upstream to its first event",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_event = Histogram(
            "resumable_proxy_upstream_inter_event_seconds",
            "Gap between consecutive upstream reads that carried events",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.added_latency = Histogram(
            "resumable_proxy_added_latency_seconds",
            "Upstream arrival of an event to its write to the first client",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.fsync_seconds = Histogram(
            "resumable_proxy_log_fsync_seconds",
            "Duration of one log fsync (covering every write before it)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.stored_bytes = Gauge(
            "resumable_proxy_storage_bytes",
            "Bytes the store keeps on disk (segment files)",
            registry=registry,
        )
        self.storage_healthy = Gauge(
            "resumable_proxy_storage_healthy", "1 while the store can write", registry=registry
        )
        self._inc_relayed = self.events_relayed.inc

    def session_started(self) -> None:
        self.sessions_started.inc()

    def replay_started(self) -> None:
        self.replays.inc()

    def reader_joined(self) -> None:
        self.readers.inc()

    def reader_left(self) -> None:
        self.readers.dec()

    def batch_logged(self, count: int, size: int, gap_ns: int, first: bool) -> None:
        """One upstream read's events; `gap_ns` is since the previous read, or since the
        request was sent when `first`."""
        self.events_logged.inc(count)
        self.bytes_logged.inc(size)
        (self.upstream_ttfe if first else self.inter_event).observe(gap_ns / 1e9)

    def events_written(self, count: int, added_ns: int | None) -> None:
        self._inc_relayed(count)
        if added_ns is not None:
            self.added_latency.observe(added_ns / 1e9)

    def render(self, manager: SessionManager) -> tuple[bytes, str]:
        store = manager.store
        self.live_sessions.set(manager.live_count)
        self.storage_healthy.set(1 if store.healthy else 0)
        if isinstance(store, DiskStore):
            self.stored_bytes.set(store.stored_bytes())
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
