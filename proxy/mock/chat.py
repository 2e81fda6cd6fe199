"""Chat Completions (`/v1/chat/completions`) in its real wire shape: `chat.completion.chunk` events.

Part of the mock upstream (`proxy/mock/__init__.py` says what it is for).
"""

from __future__ import annotations

import time

from proxy.mock.wire import (
    DONE,
    SLOT,
    SYSTEM_FINGERPRINT,
    Answer,
    EventPlan,
    Json,
    new_id,
    sse,
    template,
    token_json,
)


def chat_usage(answer: Answer) -> Json:
    completion_tokens = len(answer.tokens)
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": answer.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chunk_header(prefix: str, kind: str, model: str) -> Json:
    return {
        "id": new_id(prefix),
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def chat_choice(answer: Answer) -> Json:
    message = {"role": "assistant", "content": answer.text, "refusal": None, "annotations": []}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}


def delta_choice(delta: Json, finish_reason: str | None) -> Json:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def chunk_stream(
    header: Json,
    lead: list[Json],
    token_choice: Json,
    finish_choice: Json,
    answer: Answer,
    *,
    include_usage: bool,
) -> EventPlan:
    """Chunks as OpenAI sends them: with `include_usage` every chunk has `"usage": null` and a
    last chunk with no choices carries the usage, before `[DONE]`."""
    usage: Json = {"usage": None} if include_usage else {}

    def chunk(choice: Json) -> Json:
        return {**header, "choices": [choice], **usage}

    before, after = template(chunk(token_choice))
    tail = [sse(chunk(finish_choice))]
    if include_usage:
        tail.append(sse({**header, "choices": [], "usage": chat_usage(answer)}))
    tail.append(DONE)
    return EventPlan(
        lead=[sse(chunk(choice)) for choice in lead],
        tokens=(before + token_json(token) + after for token in answer.tokens),
        tail=tail,
    )


def chat_stream(answer: Answer, model: str, *, include_usage: bool) -> EventPlan:
    return chunk_stream(
        chunk_header("chatcmpl-", "chat.completion.chunk", model),
        lead=[delta_choice({"role": "assistant", "content": "", "refusal": None}, None)],
        token_choice=delta_choice({"content": SLOT}, None),
        finish_choice=delta_choice({}, answer.finish_reason),
        answer=answer,
        include_usage=include_usage,
    )
