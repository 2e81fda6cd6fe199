"""Bad input, fuzzed with hypothesis against the running proxy over real TCP.

Session ids, offsets and `Last-Event-ID` values, CR/LF and NUL in headers, path traversal in
every spelling, absolute-form targets naming another host, huge headers, bodies around the
limit and unknown methods on owned paths. Each answer is a 4xx: the proxy's JSON error, or
aiohttp's own plain 400 for bytes that are not HTTP. After every example the server still
answers `/healthz`, never said 500, and no file appeared outside its data dir.
"""

from __future__ import annotations

import re
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ..helpers import ThreadedProxy, event_ids, make_config
from .figures import FUZZ_EXAMPLES, record
from .raw_http import RawResponse, exchange, request_bytes

AUTH = (b"Authorization", b"Bearer sk-fuzz")
LIMIT = 4096
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,128}")
EXAMPLES: dict[str, int] = {}


class Canary:
    """A listener that counts connections: any is a request sent to a host of the client's
    choosing instead of the upstream."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


@dataclass
class Target:
    proxy: ThreadedProxy
    port: int
    root: Path
    data_dir: Path
    outside: set[Path]  # every path under root but outside the data dir, at the start
    session_id: str  # a complete session of AUTH's caller
    events: int
    canary: Canary


def tree_outside(root: Path, data_dir: Path) -> set[Path]:
    return {path for path in root.rglob("*") if not path.is_relative_to(data_dir)}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz")
    data_dir = root / "a" / "b" / "data"
    config = make_config(
        data_dir, **{"server.max_body_bytes": str(LIMIT), "server.shutdown_grace": "1s"}
    )
    canary = Canary()
    with ThreadedProxy(config) as proxy:
        port = proxy.port
        body = b'{"model":"m","messages":[],"stream":true,"mock_tokens":5,"mock_interval_ms":0}'
        created = exchange(port, request_bytes(b"POST", b"/v1/chat/completions", [AUTH], body))
        session_id = created.header("X-Resume-Session-Id")
        assert session_id is not None
        events = len(event_ids(created.body))
        yield Target(
            proxy, port, root, data_dir, tree_outside(root, data_dir), session_id, events, canary
        )
    canary.close()
    record(
        "bad_input_fuzz",
        examples=sum(EXAMPLES.values()),
        per_input=dict(EXAMPLES),
        canary_connections=canary.connections,
    )


def send(target: Target, name: str, request: bytes) -> RawResponse:
    """One example: send it, then check the server is unharmed and contained."""
    EXAMPLES[name] = EXAMPLES.get(name, 0) + 1
    response = exchange(target.port, request)
    assert response.status != 500 and response.status < 500, (request[:200], response)
    if (
        response.body
        and response.status >= 400
        and response.content_type.startswith("application/json")
    ):
        error = response.json()["error"]
        assert error["message"], response
        if error["type"] == "resumable_proxy_error":  # not an upstream's own error, relayed
            assert error["code"], response
    health = exchange(target.port, request_bytes(b"GET", b"/healthz"))
    assert health.status == 200
    assert tree_outside(target.root, target.data_dir) == target.outside
    assert target.canary.connections == 0
    return response


def is_clear_4xx(response: RawResponse) -> bool:
    """The proxy's JSON error, or aiohttp's plain-text 400 for a request it cannot parse."""
    if not 400 <= response.status < 500:
        return False
    if response.content_type.startswith("application/json"):
        return "error" in response.json()
    return response.status == 400


def encodings(text: str) -> list[bytes]:
    """The ways a client can put `text` in a path: as is, percent-encoded, encoded twice."""
    once = urllib.parse.quote(text, safe="").encode()
    raw = text.encode("utf-8", "surrogatepass")
    return [raw, once, urllib.parse.quote(once.decode(), safe="").encode()]


OWNED = [
    (b"GET", b"/sessions/%s"),
    (b"DELETE", b"/sessions/%s"),
    (b"GET", b"/sessions/%s/events"),
    (b"POST", b"/sessions/%s/cancel"),
]


@FUZZ
@given(text=st.text(max_size=200), route=st.sampled_from(OWNED), form=st.integers(0, 2))
def test_fuzzed_session_ids_get_a_clear_4xx(
    target: Target, text: str, route: tuple[bytes, bytes], form: int
) -> None:
    method, path = route
    response = send(target, "session_id", request_bytes(method, path % encodings(text)[form]))
    assert is_clear_4xx(response), response


TRAVERSAL = [
    "../",
    "..%2f",
    "%2e%2e/",
    "%2e%2e%2f",
    "%2E%2E%2F",
    "%252e%252e%252f",
    "..\\",
    "..%5c",
    "%c0%ae%c0%ae/",
    "..%c0%af",
    "..%u2216",
    "%uff0e%uff0e/",
    "．．／",
    "‥/",
    "..;/",
    "./",
    "/",
    "%00",
    "~",
]


@FUZZ
@given(
    steps=st.lists(st.sampled_from(TRAVERSAL), min_size=1, max_size=8),
    prefix=st.sampled_from([b"/sessions/", b"/sessions/abcdefgh/", b"/", b"/v1/"]),
    leaf=st.sampled_from([b"PWNED", b"etc/passwd", b"LOCK", b"00000000000000000000.log"]),
    method=st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT"]),
)
def test_path_traversal_in_every_spelling_touches_no_file(
    target: Target, steps: list[str], prefix: bytes, leaf: bytes, method: bytes
) -> None:
    path = prefix + "".join(steps).encode() + leaf
    response = send(target, "traversal", request_bytes(method, path))
    assert is_clear_4xx(response), (path, response)


@FUZZ
@given(
    scheme=st.sampled_from([b"http", b"https", b"t", b"x"]),
    path=st.sampled_from([b"/v1/models", b"/sessions", b"/steal", b""]),
)
def test_absolute_form_targets_never_reach_the_host_they_name(
    target: Target, scheme: bytes, path: bytes
) -> None:
    url = scheme + b"://127.0.0.1:%d" % target.canary.port + path
    response = send(target, "absolute_form", request_bytes(b"GET", url, [AUTH]))
    assert response.status < 500


def expected_offset(value: str) -> int | None:
    """What the contract accepts as an offset: ASCII decimal digits."""
    stripped = value.strip(" \t")
    return int(stripped) if re.fullmatch(r"[0-9]{1,18}", stripped) else None


@FUZZ
@example(value="\u0663")  # ARABIC-INDIC DIGIT THREE: a digit to `\\d`, not an offset
@given(value=st.one_of(st.text(max_size=30), st.integers(-5, 10**20).map(str)))
def test_fuzzed_offsets_are_replayed_or_refused_clearly(target: Target, value: str) -> None:
    query = urllib.parse.quote(value, safe="").encode()
    path = b"/sessions/%s/events?offset=%s" % (target.session_id.encode(), query)
    response = send(target, "offset", request_bytes(b"GET", path, [AUTH]))
    offset = expected_offset(value)
    if offset is None:
        assert response.status == 400 and response.json()["error"]["code"] == "invalid_offset"
    elif offset > target.events:
        assert response.status == 416
    elif offset == target.events:
        assert response.status == 204 and response.body == b""  # the end: nothing more comes
    else:
        assert response.status == 200
        assert event_ids(response.body) == list(range(offset + 1, target.events + 1))


def refused_by_the_parser(response: RawResponse) -> bool:
    """aiohttp's own plain-text 400 for bytes that are not HTTP (never the proxy's JSON)."""
    return response.status == 400 and not response.content_type.startswith("application/json")


_FIELD_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # not allowed in a field value (RFC 9110)


@FUZZ
@example(value=b"")
@example(value=b" 3\t")
@example(value=b"\xd9\xa3")  # ARABIC-INDIC DIGIT THREE in UTF-8: not an offset
@given(
    value=st.one_of(
        st.binary(max_size=40),
        st.from_regex(rb"\A[ \t]{0,2}[0-9]{1,20}[ \t]{0,2}\Z"),
        st.integers(-5, 10**20).map(lambda n: str(n).encode()),
    )
)
def test_fuzzed_last_event_ids_are_replayed_or_refused_clearly(
    target: Target, value: bytes
) -> None:
    path = b"/sessions/%s/events" % target.session_id.encode()
    request = request_bytes(b"GET", path, [AUTH, (b"Last-Event-ID", value)])
    response = send(target, "last_event_id", request)
    if _FIELD_CTL.search(value):
        assert refused_by_the_parser(response), (value, response)
        return
    offset = expected_offset(value.decode("latin-1"))
    if offset is None:
        assert response.status == 400, (value, response)
        assert response.json()["error"]["code"] == "invalid_offset"
    elif offset > target.events:
        assert response.status == 416, (value, response)
        assert response.json()["error"]["code"] == "offset_out_of_range"
    elif offset == target.events:  # the end of a complete session: nothing more will come
        assert (response.status, response.body) == (204, b""), (value, response)
    else:
        assert response.status == 200, (value, response)
        assert event_ids(response.body) == list(range(offset + 1, target.events + 1))


INJECTIONS = [b"\r\nX-Injected: 1", b"\nX-Injected: 1", b"\rX-Injected: 1", b"\x00", b"\r\n X"]


@FUZZ
@given(
    head=st.text(alphabet="abcdefghij0123456789_-", min_size=0, max_size=20),
    injection=st.sampled_from(INJECTIONS),
    header=st.sampled_from([b"X-Resume-Session-Id", b"Last-Event-ID"]),
    path=st.sampled_from([b"/v1/chat/completions", b"/sessions/abcdefghij/events"]),
)
def test_cr_lf_and_nul_in_headers_never_reach_a_response_or_upstream_header(
    target: Target, head: str, injection: bytes, header: bytes, path: bytes
) -> None:
    value = head.encode() + injection
    method = b"POST" if path.startswith(b"/v1") else b"GET"
    response = send(target, "header_injection", request_bytes(method, path, [(header, value)]))
    assert response.header("X-Injected") is None
    echoed = response.header("X-Resume-Session-Id")
    assert echoed is None or ID_PATTERN.fullmatch(echoed), echoed
    assert is_clear_4xx(response) or response.status == 200, response


@pytest.mark.parametrize(
    "request_line, headers",
    [
        (b"GET /healthz", [(b"X-Big", b"a" * 100_000)]),
        (b"GET /healthz", [(b"X-" + b"n" * 70_000, b"v")]),
        (b"GET /healthz", [(b"X-H%d" % n, b"v") for n in range(40_000)]),
        (b"GET /sessions/" + b"a" * 100_000, []),
        (b"GET /v1/models?" + b"q=1&" * 30_000, []),
        (b"GET /sessions", [(b"Authorization", b"Bearer " + b"k" * 100_000)]),
    ],
    ids=["100k-value", "70k-name", "40k-headers", "100k-path", "120k-query", "100k-credential"],
)
def test_huge_request_heads_get_a_4xx_not_a_crash(
    target: Target, request_line: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    method, path = request_line.split(b" ", 1)
    response = send(target, "huge_head", request_bytes(method, path, headers))
    # A server may stop reading a head it refused; a reset before the answer is fine too.
    assert response.status == 0 or 400 <= response.status < 500, response


@FUZZ
@given(size=st.one_of(st.integers(LIMIT - 8, LIMIT + 8), st.integers(0, 4 * LIMIT)))
def test_bodies_past_the_limit_get_413_and_others_reach_upstream(target: Target, size: int) -> None:
    request = request_bytes(b"POST", b"/v1/chat/completions", [AUTH], b"x" * size)
    response = send(target, "body_size", request)
    if size > LIMIT:
        assert response.status == 413 and response.json()["error"]["code"] == "body_too_large"
    else:
        assert response.status == 400  # the mock upstream's answer to a body that is not JSON


@FUZZ
@given(declared=st.integers(LIMIT + 1, 2**62))
def test_declared_lengths_past_the_limit_get_413_before_any_body_is_read(
    target: Target, declared: int
) -> None:
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    request += b"Content-Length: %d\r\n\r\n" % declared
    response = send(target, "declared_length", request)
    assert response.status == 413, response


ALLOWED = {
    b"/sessions": {b"GET"},
    b"/sessions/%s": {b"GET", b"DELETE"},
    b"/sessions/%s/events": {b"GET"},
    b"/sessions/%s/cancel": {b"POST"},
    b"/healthz": {b"GET"},
    b"/metrics": {b"GET"},
    b"/resume.js": {b"GET"},
    b"/demo": {b"GET"},
}
# The methods aiohttp's parser (llhttp) knows, less CONNECT (a request for a tunnel, not for a
# path) and OPTIONS (the CORS preflight): on an owned path each is allowed or a 405.
PARSED_METHODS = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"TRACE", b"PATCH", b"COPY", b"LOCK",
    b"MKCOL", b"MOVE", b"PROPFIND", b"PROPPATCH", b"SEARCH", b"UNLOCK", b"BIND", b"REBIND",
    b"UNBIND", b"ACL", b"REPORT", b"MKACTIVITY", b"CHECKOUT", b"MERGE", b"M-SEARCH",
    b"NOTIFY", b"SUBSCRIBE", b"UNSUBSCRIBE", b"PURGE", b"MKCALENDAR", b"LINK", b"UNLINK",
    b"SOURCE", b"QUERY",
]  # fmt: skip
WRONG = [(m, p) for p in sorted(ALLOWED) for m in PARSED_METHODS if m not in ALLOWED[p]]


@FUZZ
@given(wrong=st.sampled_from(WRONG))
def test_wrong_methods_on_owned_paths_get_405(target: Target, wrong: tuple[bytes, bytes]) -> None:
    method, path = wrong
    concrete = path % b"abcdefghij" if b"%s" in path else path
    response = send(target, "method", request_bytes(method, concrete, [AUTH]))
    assert response.status == 405, (method, path, response)
    if method != b"HEAD":
        assert response.json()["error"]["code"] == "method_not_allowed"


@FUZZ
@given(
    method=st.from_regex(rb"\A[A-Z]{1,12}\Z").filter(lambda m: m not in PARSED_METHODS),
    path=st.sampled_from(sorted(ALLOWED)),
)
def test_methods_the_parser_does_not_know_get_its_plain_400(
    target: Target, method: bytes, path: bytes
) -> None:
    if method in (b"CONNECT", b"OPTIONS"):
        method = method + b"X"  # known to the parser; handled by the test above or CORS
    concrete = path % b"abcdefghij" if b"%s" in path else path
    response = send(target, "unknown_method", request_bytes(method, concrete, [AUTH]))
    assert refused_by_the_parser(response), (method, response)
