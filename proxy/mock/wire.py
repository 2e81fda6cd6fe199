"""The wire shapes every mock API shares: the answer, SSE framing, ids, model names.

Part of the mock upstream (`proxy/mock/__init__.py` says what it is for).
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MODEL_ID = "mock-gpt"

SYSTEM_FINGERPRINT = "fp_mock"

Json = dict[str, Any]

MODEL = {
    "id": MODEL_ID,
    "object": "model",
    "created": 1_700_000_000,
    "owned_by": "resumable-proxy",
}


# A prime number of words: any stride through them visits every word before repeating.
_WORDS = (
    "stream", "token", "proxy", "resume", "event", "offset", "session", "replay", "log",
    "segment", "record", "client", "server", "answer", "model", "prompt", "byte", "chunk",
    "buffer", "reader", "writer", "socket", "signal", "crash", "restart", "recover", "commit",
    "fsync", "disk", "memory", "latency", "throughput", "request", "response", "header", "body",
    "status", "error", "retry", "backoff", "cursor", "index", "frame", "checksum", "tail",
    "head", "queue", "batch", "flush", "append", "truncate", "snapshot", "state", "cancel",
    "finish", "begin", "follow", "deliver", "order", "exactly", "once",
)  # fmt: skip


# Templates are serialised with this placeholder where a token goes, then split around it, so a
# stream serialises its constant parts once and each event is a few byte concatenations.
SLOT = "\x00slot\x00"

SLOT_JSON = json.dumps(SLOT).encode()

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Answer:
    """What the mock "generates" for one request, and how fast a stream delivers it."""

    tokens: tuple[str, ...]
    finish_reason: str
    prompt_tokens: int
    interval_s: float

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True, slots=True)
class EventPlan:
    """A stream's SSE events: `lead` and `tail` go out at once, `tokens` one per interval.

    `tokens` is lazy so a long stream's cost is spread over its events instead of delaying the
    first one.
    """

    lead: list[bytes]
    tokens: Iterable[bytes]
    tail: list[bytes]


def answer_tokens(prompt: str, count: int) -> tuple[str, ...]:
    """Token i is word i of a walk through `_WORDS` whose start and stride come from the prompt.

    Two prompts give the same answer only if their hashes agree on both start and stride.
    """
    seed = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
    size = len(_WORDS)
    start, stride = seed % size, 1 + (seed // size) % (size - 1)
    words = [_WORDS[(start + i * stride) % size] for i in range(count)]
    return tuple(word.capitalize() if i == 0 else " " + word for i, word in enumerate(words))


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sse(obj: Any, event: str | None = None) -> bytes:
    """One SSE event; typed (Responses API) events carry an `event:` line before `data:`."""
    head = b"event: %s\n" % event.encode() if event else b""
    return head + b"data: " + dumps(obj) + b"\n\n"


def template(obj: Any, event: str | None = None) -> list[bytes]:
    """The event for `obj` split at each `SLOT`, ready to have tokens spliced in."""
    return sse(obj, event).split(SLOT_JSON)


@functools.cache
def token_json(token: str) -> bytes:
    """Tokens come from a small fixed vocabulary, so each is serialised once per process."""
    return json.dumps(token).encode()


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)
