"""The Responses API (`/v1/responses`) in its real wire shape: typed `response.*` events.

Part of the mock upstream (`proxy/mock/__init__.py` says what it is for).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from proxy.mock.wire import SLOT, Answer, EventPlan, Json, new_id, sse, template, token_json


@dataclass(frozen=True, slots=True)
class ResponseIds:
    response_id: str
    item_id: str
    created_at: int

    @classmethod
    def new(cls) -> ResponseIds:
        return cls(new_id("resp_"), new_id("msg_"), int(time.time()))


def _output_text(text: str) -> Json:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _message_item(ids: ResponseIds, status: str, content: list[Json]) -> Json:
    return {
        "id": ids.item_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def _response_usage(answer: Answer) -> Json:
    output_tokens = len(answer.tokens)
    return {
        "input_tokens": answer.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": answer.prompt_tokens + output_tokens,
    }


def response_object(body: Json, answer: Answer, ids: ResponseIds, *, done: bool) -> Json:
    """The `response` object: in progress and empty while streaming, then the whole answer."""
    final_status = "incomplete" if answer.truncated else "completed"
    status = final_status if done else "in_progress"
    truncated = done and answer.truncated
    message = _message_item(ids, status, [_output_text(answer.text)])
    return {
        "id": ids.response_id,
        "object": "response",
        "created_at": ids.created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "model": body["model"],
        "output": [message] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": _response_usage(answer) if done else None,
        "user": None,
    }


def _typed_events(first: int, events: list[tuple[str, Json]]) -> list[bytes]:
    """Responses API events carry their kind twice (`event:` line and `type`) and a number."""
    return [
        sse({"type": kind, "sequence_number": first + i, **fields}, kind)
        for i, (kind, fields) in enumerate(events)
    ]


def response_stream(body: Json, answer: Answer) -> EventPlan:
    """The typed event sequence of one text answer, numbered by `sequence_number` from 0."""
    ids = ResponseIds.new()
    place = {"item_id": ids.item_id, "output_index": 0, "content_index": 0}
    pending = response_object(body, answer, ids, done=False)
    final = response_object(body, answer, ids, done=True)
    item = final["output"][0]
    lead = _typed_events(
        0,
        [
            ("response.created", {"response": pending}),
            ("response.in_progress", {"response": pending}),
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
            ),
            ("response.content_part.added", {**place, "part": _output_text("")}),
        ],
    )
    kind = "response.output_text.delta"
    delta = {"type": kind, "sequence_number": SLOT, **place, "delta": SLOT, "logprobs": []}
    head, middle, end = template(delta, kind)
    tokens = (
        head + b"%d" % (len(lead) + i) + middle + token_json(token) + end
        for i, token in enumerate(answer.tokens)
    )
    tail = _typed_events(
        len(lead) + len(answer.tokens),
        [
            ("response.output_text.done", {**place, "text": answer.text, "logprobs": []}),
            ("response.content_part.done", {**place, "part": item["content"][0]}),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            (f"response.{final['status']}", {"response": final}),
        ],
    )
    return EventPlan(lead, tokens, tail)
