"""Clients that keep a stream going across dropped connections and page reloads.

`ResumingTransport` / `AsyncResumingTransport` plug into httpx (or httpx2) clients, and so into
the OpenAI SDKs; `resume.js` and `demo.html` are served by the proxy at `/resume.js` and `/demo`.

The transports are imported on first use: the proxy reads the two files from this package and
must not need the transports' dependencies (anyio, which comes with httpx), which are not the
server's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .transport import AsyncResumingTransport, ResumingTransport

__all__ = ["AsyncResumingTransport", "ResumingTransport"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import transport

        return getattr(transport, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
