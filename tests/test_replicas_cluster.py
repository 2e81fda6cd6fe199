"""Proxy replicas as real processes on a real Redis Cluster (3 primaries, 3 replicas), and the
failover of the primary that holds a live session, both ways: `CLUSTER FAILOVER` on its
replica, and kill -9 of the primary with the replica promoted by the cluster.

The streaming client and a follower on another replica keep reading through the failover;
afterwards every event either of them saw is in Redis, in order, byte for byte.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.sse import KEEPALIVE

from . import test_replicas
from .helpers import event_ids, mock_stream_body
from .redis_server import RedisClusterServers, redis_available
from .test_replicas import AUTH, error_code, read_until, replay, session_json, start_replicas

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

globals().update(
    {
        name: test
        for name, test in vars(test_replicas).items()
        # A restart of the one Redis has no Cluster counterpart: failovers are tested below.
        if name.startswith("test_") and "redis_restart" not in name
    }
)


replicas = test_replicas.replicas  # the same replicas A, B, C, on `storage_yaml` below


def cluster_yaml(cluster: RedisClusterServers) -> str:
    return (
        f"backend: redis\n  redis_url: {cluster.url}\n  redis_cluster: true\n"
        "  redis_wait_replicas: 1"
    )


@pytest.fixture
def storage_yaml(redis_cluster: RedisClusterServers) -> str:
    redis_cluster.flushall()
    return cluster_yaml(redis_cluster)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of this test's own: its primaries are failed over."""
    cluster = RedisClusterServers(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("kill", [False, True], ids=["cluster-failover", "kill9-primary"])
def test_failover_of_the_primary_holding_a_live_session_loses_nothing_a_client_saw(
    tmp_path: Path, own_cluster: RedisClusterServers, kill: bool
) -> None:
    with start_replicas(tmp_path, cluster_yaml(own_cluster)) as (a, b, c):
        followed: dict[str, bytes] = {}
        with httpx.stream(
            "POST",
            f"{a.url}/v1/chat/completions",
            json=mock_stream_body(400, 10),
            headers=AUTH,
            timeout=60,
        ) as response:
            session_id = response.headers["X-Resume-Session-Id"]
            chunks = response.iter_bytes()
            seen = read_until(chunks, 20)

            def follow() -> None:
                followed["b"] = replay(b, session_id)

            follower = threading.Thread(target=follow)
            follower.start()
            seen += read_until(chunks, 40)
            old_primary = own_cluster.primary_for(f"rp:{{{session_id}}}:events")
            new_primary = own_cluster.failover(f"rp:{{{session_id}}}:events", kill=kill)
            assert new_primary.port != old_primary.port
            assert own_cluster.primary_for(f"rp:{{{session_id}}}:events").port == new_primary.port
            seen += b"".join(chunks)
            follower.join(60)
        # Readers waiting out the failover got keep-alives (every 1 s here); the events are
        # what must match.
        seen = seen.replace(KEEPALIVE, b"")
        followed["b"] = followed["b"].replace(KEEPALIVE, b"")
        ids = event_ids(seen)
        assert ids == list(range(1, len(ids) + 1)) and len(ids) > 400
        assert error_code(seen) is None  # the stream completed, through the failover
        assert followed["b"] == seen  # the follower on B read on through it, byte for byte
        assert session_json(c, session_id)["state"] == "complete"
        assert replay(c, session_id) == seen  # and Redis kept every event: C replays them all
        assert replay(c, session_id, 250) == seen[seen.index(b"id: 251\n") :]
