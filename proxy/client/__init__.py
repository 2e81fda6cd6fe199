"""Clients that keep a stream going across dropped connections and page reloads.

`ResumingTransport` / `AsyncResumingTransport` plug into httpx (or httpx2) clients, and so into
the OpenAI SDKs; `resume.js` and `demo.html` are served by the proxy at `/resume.js` and `/demo`.
"""

from __future__ import annotations

from .transport import AsyncResumingTransport, ResumingTransport

__all__ = ["AsyncResumingTransport", "ResumingTransport"]
