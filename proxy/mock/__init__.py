"""An OpenAI-compatible mock upstream: deterministic answers in the real wire shapes, no API key.

It backs `--upstream mock`, `resumable-proxy mock-upstream`, the tests and the benchmarks, so it
must look like api.openai.com to the openai SDK (the same JSON bodies and SSE events), and like
api.anthropic.com on `/v1/messages` to the Anthropic SDKs, and cost little per event (the
benchmark has to measure the proxy, not the mock).

An answer is a pure function of the last user message, so the same request always gets the same
text and a replayed stream can be compared with a fresh one. Two request-body fields, which the
real API would reject, override the server defaults per request (with the openai SDK pass them
as `extra_body={"mock_tokens": 5}`):

- `"mock_tokens": N`: the answer's length in tokens. `max_tokens`, `max_completion_tokens` and
  `max_output_tokens` still cut it short, with finish reason `length` as the real API does.
- `"mock_interval_ms": MS`: the pause between a stream's token events.

Like most OpenAI-compatible servers, it refuses `"background": true` on `/v1/responses` with
400 (the proxy serves background mode itself).

`GET /mock/calls` returns how many requests each path received (`app["calls"]`), which is how a
test proves that resuming a stream never called the upstream again.

One job per module: `requests` parses, `wire` has the shapes all APIs share, `chat`,
`completions`, `responses` and `anthropic` the wire shape of each API, `server` serves them.
"""

from __future__ import annotations

from proxy.mock.server import MockServer, build_mock_app, run_mock_upstream, serve_mock
from proxy.mock.wire import answer_tokens

__all__ = ["MockServer", "answer_tokens", "build_mock_app", "run_mock_upstream", "serve_mock"]
