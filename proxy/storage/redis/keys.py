"""What the Redis store keeps where: key names, the fields of each key, and their decoding.

Everything of one session carries the hash tag `{id}`, so on a Cluster it lives in one slot
and every script touches one slot:

- `rp:{id}:events` is a Stream with one entry per logged batch (one upstream read). The entry
  id is `<number of the batch's last event>-0`, so `XRANGE key n +` returns first the batch
  that holds event n: reading from any event is one command, and Redis itself rejects a
  batch that is out of order or repeated (which makes every write safe to retry). Fields:
  `d` the batch bytes, `e` the end offset of each event (`codec.ends_bytes`), `b` the
  session's byte count after it, `t` its arrival time. When the session ends, an entry
  `<events>-1` (no `d`) marks the end; a reader blocked in `XREAD` on another process wakes
  for it exactly as for new events.
- `rp:{id}:meta` is a hash written at create and at end: `meta` (`codec.encode_meta`),
  `state`, `reason`, `owner` (the process reading the upstream), `events`, `bytes`, `alias`,
  ... While a session streams its event count comes from the stream's last entry, so an append
  costs one `XADD` and nothing else. The create script refuses an id whose hash holds other
  metadata: that is how two processes choosing the same client id at once are arbitrated.

Keys that are not one session's are each one key, read and written by single-key commands
only (never inside a script with a session's keys), so they work on a Cluster wherever they
hash: `rp:sessions` (sorted set, id -> created_ns) lists sessions; `rp:replicas` names every
process that heartbeats; `rp:hb:<replica>` is its heartbeat (a key with a short TTL);
`rp:owned:<replica>` holds the sessions it streams; `rp:ctl:<replica>` is a Stream where
stop requests for its sessions, and answers to its own requests, arrive (a Stream rather
than pub/sub: it behaves the same on one Redis and on a Cluster, and a message sent while
the reader reconnects after a failover waits for it).

- `rp:alias:{<alias>}` holds the id of the session given that alias (`add_alias`). The meta
  hash's `alias` field says which alias the session has, and a key that names a session
  which is gone or has another alias resolves to nothing, so a delete leaves the key to
  expire. It takes the session's expiry when the session ends on the process reading it;
  when another process marks the session `interrupted`, the key keeps its live expiry.
- `rp:token-key` is the capability-token key (hex), set once with `SET NX` by the first
  process that starts, so every process checks every other's tokens. It never expires.
"""

from __future__ import annotations

from typing import Any

from proxy.storage.base import STREAMING, SessionInfo
from proxy.storage.codec import decode_meta

INDEX = "rp:sessions"
REPLICAS = "rp:replicas"
TOKEN_KEY = "rp:token-key"


def meta_key(session_id: str) -> str:
    return f"rp:{{{session_id}}}:meta"


def events_key(session_id: str) -> str:
    return f"rp:{{{session_id}}}:events"


def alias_key(alias: str) -> str:
    return f"rp:alias:{{{alias}}}"


def heartbeat_key(replica: str) -> str:
    return f"rp:hb:{replica}"


def owned_key(replica: str) -> str:
    return f"rp:owned:{replica}"


def control_key(replica: str) -> str:
    return f"rp:ctl:{replica}"


def entry_last_event(entry_id: bytes) -> int:
    """The number of the last event of the batch a stream entry holds."""
    return int(entry_id.split(b"-", 1)[0])


def info_from(fields: dict[bytes, bytes], last: list[Any]) -> SessionInfo | None:
    """A SessionInfo from the meta hash and the stream's last entry (absent: None)."""
    raw_meta = fields.get(b"meta")
    if raw_meta is None:
        return None  # expired, deleted, or a partial write after Redis lost the session
    meta = decode_meta(raw_meta)
    state = fields.get(b"state", b"streaming").decode()
    first_ns = fields.get(b"first_event_ns")
    info = SessionInfo(
        meta=meta,
        state=state,
        reason=fields.get(b"reason", b"").decode(),
        events=int(fields.get(b"events", 0)),
        bytes=int(fields.get(b"bytes", 0)),
        updated_ns=int(fields.get(b"updated_ns", meta.created_ns)),
        first_event_ns=int(first_ns) if first_ns else None,
        storage_error=fields[b"storage_error"].decode() if b"storage_error" in fields else None,
        alias=fields[b"alias"].decode() if b"alias" in fields else None,
    )
    if state == STREAMING and last:
        entry_id, entry = last[0]
        info.events = entry_last_event(entry_id)
        info.bytes = int(entry[b"b"])
        info.updated_ns = int(entry[b"t"])
    return info
