"""HTTP/1.1 by hand over a blocking socket: requests aiohttp's client refuses to send.

aiohttp's client rejects CR/LF in header values and normalises paths; an attacker's client
does neither, so the bad-input tests write bytes and parse the answer themselves.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..helpers import dechunk


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int  # 0 when the server closed or reset the connection without answering
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str, default: str | None = None) -> str | None:
        lowered = name.lower()
        return next((value for key, value in self.headers if key.lower() == lowered), default)

    @property
    def content_type(self) -> str:
        return self.header("Content-Type", "") or ""

    def json(self) -> Any:
        return json.loads(self.body)


def _complete(received: bytes, head_request: bool) -> bool:
    """Whether `received` holds a whole response (a refused request's body may never be
    read by the server, which then keeps the connection open a while: EOF is no signal)."""
    head, separator, body = received.partition(b"\r\n\r\n")
    if not separator:
        return False
    if head_request:
        return True
    lowered = head.lower()
    if b"\r\ntransfer-encoding: chunked" in lowered:
        return body.endswith(b"0\r\n\r\n")
    for line in lowered.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def exchange(port: int, request: bytes, timeout: float = 10.0) -> RawResponse:
    """Send `request` (which should say `Connection: close`) and read one whole answer."""
    received = bytearray()
    head_request = request.startswith(b"HEAD ")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            while not _complete(bytes(received), head_request):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # a server may stop reading a request it refused; what it sent still counts
    head, separator, body = bytes(received).partition(b"\r\n\r\n")
    if not separator:
        return RawResponse(0, [], b"")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines)]
    response = RawResponse(int(status_line.split(" ")[1]), headers, body)
    if (response.header("Transfer-Encoding") or "").lower() == "chunked":
        response = RawResponse(response.status, headers, dechunk(body))
    return response


def request_bytes(
    method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]] = (), body: bytes = b""
) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
