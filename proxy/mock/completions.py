"""Legacy Completions (`/v1/completions`): the chat chunk stream with `text` choices.

Part of the mock upstream (`proxy/mock/__init__.py` says what it is for).
"""

from __future__ import annotations

from proxy.mock.chat import chunk_header, chunk_stream
from proxy.mock.wire import SLOT, Answer, EventPlan, Json


def text_choice(text: str, finish_reason: str | None) -> Json:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def completion_stream(answer: Answer, model: str, *, include_usage: bool) -> EventPlan:
    return chunk_stream(
        chunk_header("cmpl-", "text_completion", model),
        lead=[],
        token_choice=text_choice(SLOT, None),
        finish_choice=text_choice("", answer.finish_reason),
        answer=answer,
        include_usage=include_usage,
    )
