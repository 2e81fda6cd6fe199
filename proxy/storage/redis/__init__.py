"""The Redis store (`storage.backend: redis`): sessions in Redis Streams, shared by every
replica and worker, on one Redis or a Redis Cluster.

One job per module: `keys` is what lives in which key (the layout the scripts rely on),
`scripts` the Lua scripts over one session's keys, `wire` the hand-packed pipelined
connection of the write path, `connection` how Redis is reached (clients, routing by slot,
retries through a failover), `replicas` the processes sharing it (heartbeats, interrupting
the sessions of a dead one, stop requests), and `store` the `RedisStore` itself (appends,
flushes, reads, following).
"""

from __future__ import annotations

from proxy.storage.redis.store import RedisStore

__all__ = ["RedisStore"]
