"""Latency figures of one session, computed from the arrival times in its log.

Events that arrived in one upstream read share an arrival time; their gaps are zero, which
is what a client saw.
"""

from __future__ import annotations

from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def session_figures(request_ns: int, batches: Sequence[tuple[int, int, int]]) -> dict[str, object]:
    """`ttft_ms`, `duration_ms`, `inter_event_ms` {p50, p99, max} and `events_per_s`.

    `batches` are (first_event, count, arrival_ns) in log order.
    """
    if not batches:
        return {
            "ttft_ms": None,
            "duration_ms": None,
            "inter_event_ms": {"p50": None, "p99": None, "max": None},
            "events_per_s": None,
        }
    first_ns = batches[0][2]
    last_ns = batches[-1][2]
    events = sum(count for _, count, _ in batches)
    gaps: list[float] = []
    previous = first_ns
    for index, (_, count, arrival) in enumerate(batches):
        if index:
            gaps.append((arrival - previous) / 1e6)
        gaps.extend([0.0] * (count - 1))
        previous = arrival
    gaps.sort()
    span_s = (last_ns - first_ns) / 1e9
    return {
        "ttft_ms": round((first_ns - request_ns) / 1e6, 3),
        "duration_ms": round((last_ns - request_ns) / 1e6, 3),
        "inter_event_ms": {
            "p50": round(percentile(gaps, 0.50), 3),
            "p99": round(percentile(gaps, 0.99), 3),
            "max": round(gaps[-1], 3) if gaps else 0.0,
        },
        "events_per_s": round(events / span_s, 2) if span_s > 0 else None,
    }
