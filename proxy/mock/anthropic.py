"""Anthropic Messages (`/v1/messages`) in its real wire shape: typed events and pings.

Part of the mock upstream (`proxy/mock/__init__.py` says what it is for).
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.mock.wire import SLOT, Answer, EventPlan, Json, new_id, sse, template, token_json

# Anthropic sends a `ping` after the first block opens and more during long answers; the mock
# puts one between every this many tokens, so clients meet them mid-stream too.
_PING_EVERY_TOKENS = 32

_PING = sse({"type": "ping"}, "ping")


def _anthropic_usage(answer: Answer, *, done: bool) -> Json:
    return {
        "input_tokens": answer.prompt_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": len(answer.tokens) if done else 1,
        "service_tier": "standard",
    }


def anthropic_message(body: Json, answer: Answer, *, done: bool) -> Json:
    """The Message object: empty in `message_start`, the whole answer when not streamed."""
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": answer.text}] if done else [],
        "stop_reason": _stop_reason(answer) if done else None,
        "stop_sequence": None,
        "usage": _anthropic_usage(answer, done=done),
    }


def _stop_reason(answer: Answer) -> str:
    return "max_tokens" if answer.truncated else "end_turn"


def anthropic_stream(body: Json, answer: Answer) -> EventPlan:
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}
    delta["delta"]["text"] = SLOT
    before, after = template(delta, "content_block_delta")

    def tokens() -> Iterable[bytes]:
        for i, token in enumerate(answer.tokens):
            if i and i % _PING_EVERY_TOKENS == 0:
                yield _PING + before + token_json(token) + after
            else:
                yield before + token_json(token) + after

    message_delta = {
        "type": "message_delta",
        "delta": {"stop_reason": _stop_reason(answer), "stop_sequence": None},
        "usage": {"output_tokens": len(answer.tokens)},
    }
    start = {"type": "message_start", "message": anthropic_message(body, answer, done=False)}
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    return EventPlan(
        lead=[sse(start, "message_start"), sse(block, "content_block_start"), _PING],
        tokens=tokens(),
        tail=[
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse(message_delta, "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ],
    )
