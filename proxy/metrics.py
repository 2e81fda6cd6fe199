"""Prometheus metrics, one registry per app so two proxies in one process never mix counts.

Everything on the event path is a plain integer or list update on the event loop thread,
turned into metric families only when `/metrics` is scraped. prometheus-client's own
Counter and Histogram take a lock per update, which at several updates per event is a cost
the relay should not pay; the text format and registry still come from prometheus-client.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

LATENCY_BUCKETS = (
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
_PREFIX = "resumable_proxy_"


class LatencyHistogram:
    """Bucket counts and a sum; `observe` is one bisect and two additions."""

    __slots__ = ("counts", "name", "summary", "total")

    def __init__(self, name: str, summary: str) -> None:
        self.name = name
        self.summary = summary
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float, times: int = 1) -> None:
        """`times` observations of the same value (events of one read share their times)."""
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += times
        self.total += seconds * times

    def family(self) -> HistogramMetricFamily:
        cumulative = 0
        buckets = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return HistogramMetricFamily(
            _PREFIX + self.name, self.summary, buckets=buckets, sum_value=self.total
        )


class Metrics:
    """The proxy's numbers. Only the event loop thread updates them."""

    def __init__(self) -> None:
        self.requests: Counter[int] = Counter()  # by status code
        self.sessions_started = 0
        self.sessions_ended: Counter[str] = Counter()  # by final state
        self.readers = 0
        self.replays = 0
        self.events_logged = 0
        self.bytes_logged = 0
        self.events_relayed = 0
        self.upstream_ttfe = LatencyHistogram(
            "upstream_time_to_first_event_seconds", "Request sent upstream to its first event"
        )
        self.inter_event = LatencyHistogram(
            "upstream_inter_event_seconds",
            "Gap between consecutive upstream events (0 within one read)",
        )
        self.added_latency = LatencyHistogram(
            "added_latency_seconds",
            "Upstream arrival of an event to its write to a client following live",
        )
        self.fsync_seconds = LatencyHistogram(
            "log_fsync_seconds", "Duration of one log fsync (covering every write before it)"
        )
        # Gauges read at scrape time from the parts that own the values (wired in app.py),
        # so this module imports nothing of the project.
        self._gauges: list[tuple[str, str, Callable[[], float]]] = []
        self.registry = CollectorRegistry()
        self.registry.register(self)  # type: ignore[arg-type]

    # --- hooks on the event path -----------------------------------------------------------

    def request_done(self, status: int) -> None:
        self.requests[status] += 1

    def session_started(self) -> None:
        self.sessions_started += 1

    def session_ended(self, state: str) -> None:
        self.sessions_ended[state] += 1

    def replay_started(self) -> None:
        self.replays += 1

    def reader_joined(self) -> None:
        self.readers += 1

    def reader_left(self) -> None:
        self.readers -= 1

    def batch_logged(self, count: int, size: int, gap_ns: int, first: bool) -> None:
        """One upstream read's events; `gap_ns` is since the previous read, or since the
        request was sent when `first`.

        Observed per event, as the contract says: the read's first event gets `gap_ns`
        (its time to first event when `first`), every later one a gap of 0.
        """
        self.events_logged += count
        self.bytes_logged += size
        (self.upstream_ttfe if first else self.inter_event).observe(gap_ns / 1e9)
        if count > 1:
            self.inter_event.observe(0.0, count - 1)

    def events_written(self, count: int, added_ns: int | None) -> None:
        """`count` events written to one reader; `added_ns` is their shared added latency
        (they arrived in one read) when the reader was following live."""
        self.events_relayed += count
        if added_ns is not None:
            self.added_latency.observe(added_ns / 1e9, count)

    # --- scraping --------------------------------------------------------------------------

    def add_gauge(self, name: str, summary: str, read: Callable[[], float]) -> None:
        """Report `read()` as the gauge `resumable_proxy_<name>` at every scrape."""
        self._gauges.append((_PREFIX + name, summary, read))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def collect(self) -> Iterator[Metric]:
        """Called by the registry at scrape time (prometheus-client's custom collector API)."""
        requests = CounterMetricFamily(
            _PREFIX + "requests", "HTTP requests answered, by status code", labels=["status"]
        )
        for status, count in sorted(self.requests.items()):
            requests.add_metric([str(status)], count)
        yield requests
        ended = CounterMetricFamily(
            _PREFIX + "sessions_ended",
            "Sessions that reached a final state, by state",
            labels=["state"],
        )
        for state, count in sorted(self.sessions_ended.items()):
            ended.add_metric([state], count)
        yield ended
        for name, summary, value in (
            ("sessions_started", "Streams that became sessions", self.sessions_started),
            ("replays", "Reads of an existing session (resumes)", self.replays),
            ("events_logged", "Events teed into the log", self.events_logged),
            ("bytes_logged", "Event bytes teed into the log", self.bytes_logged),
            (
                "events_relayed",
                "Events written to clients (each reader counts)",
                self.events_relayed,
            ),
        ):
            yield CounterMetricFamily(_PREFIX + name, summary, value=value)
        yield GaugeMetricFamily(
            _PREFIX + "readers", "Clients following a session now", value=self.readers
        )
        for histogram in (
            self.upstream_ttfe,
            self.inter_event,
            self.added_latency,
            self.fsync_seconds,
        ):
            yield histogram.family()
        for name, summary, read in self._gauges:
            yield GaugeMetricFamily(name, summary, value=read())
