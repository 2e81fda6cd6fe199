"""The framer: any chunking gives the same events; ids replaced; SDK-unsafe blocks dropped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import MalformedStream, SSEFramer

from .helpers import FIXTURES, frame, split_at

FIXTURE_FILES = sorted(FIXTURES.glob("*.sse"))


def events_of(rendered: bytes, ends: list[int]) -> list[bytes]:
    starts = [0, *ends[:-1]]
    return [rendered[a:b] for a, b in zip(starts, ends, strict=True)]


def test_fixtures_are_present() -> None:
    assert len(FIXTURE_FILES) >= 9


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_fixture_framed_the_same_one_byte_at_a_time(path: Path) -> None:
    data = path.read_bytes()
    whole = frame([data])
    bytewise = frame([data[i : i + 1] for i in range(len(data))])
    assert bytewise == whole


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=12))
def test_fixture_framed_the_same_under_any_split(path: Path, cuts: list[int]) -> None:
    data = path.read_bytes()
    assert frame(split_at(data, cuts)) == frame([data])


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_fixture_events_numbered_from_one_and_safe_for_openai_sdk(path: Path) -> None:
    rendered, ends, _ = frame([path.read_bytes()])
    for number, event in enumerate(events_of(rendered, ends), start=1):
        lines = re.split(rb"\r\n|\r|\n", event)
        assert lines[0] == b"id: %d" % number
        assert [line for line in lines[1:] if line.startswith(b"id")] == []
        assert any(line.startswith(b"data") for line in lines)
        # exactly one blank line, at the end: no empty-data event for the SDK
        assert lines[-2:] == [b"", b""]
        assert b"" not in lines[:-2]


def test_openai_chat_relayed_byte_exact_apart_from_id_lines() -> None:
    data = (FIXTURES / "openai-chat-usage.sse").read_bytes()
    rendered, ends, clean = frame([data])
    assert clean
    assert re.sub(rb"(?m)^id: \d+\n", b"", rendered) == data
    assert len(ends) == data.count(b"\n\n")


def test_comment_keepalive_blocks_are_dropped_and_data_kept() -> None:
    data = (FIXTURES / "comment-keepalives.sse").read_bytes()
    rendered, ends, _ = frame([data])
    assert b"PROCESSING" not in rendered
    assert len(ends) == data.count(b"data:")


def test_crlf_upstream_ids_replaced_and_line_ends_kept() -> None:
    data = (FIXTURES / "crlf-ids-multiline.sse").read_bytes()
    rendered, ends, clean = frame([data])
    assert clean
    assert b"up-0" not in rendered and b"up-1" not in rendered
    first = events_of(rendered, ends)[0]
    assert first == b"id: 1\r\nevent: message\r\ndata: line one\r\ndata: continued\r\n\r\n"
    assert b"retry: 3000" not in rendered  # a retry-only block carries no data
    assert len(ends) == 3


def test_torn_tail_reports_unclean_end_and_keeps_whole_events() -> None:
    data = (FIXTURES / "torn-tail.sse").read_bytes()
    rendered, ends, clean = frame([data])
    assert not clean
    assert len(ends) == data.count(b"\n\n")
    assert rendered.endswith(b"\n\n")


def test_event_ids_off_relays_events_verbatim() -> None:
    data = (FIXTURES / "openai-responses.sse").read_bytes()
    rendered, _, _ = frame([data], event_ids=False)
    assert rendered == data


def test_first_id_continues_numbering() -> None:
    rendered, _, _ = frame([b"data: a\n\ndata: b\n\n"], first_id=41)
    assert rendered == b"id: 41\ndata: a\n\nid: 42\ndata: b\n\n"


def test_trailing_upstream_id_line_leaves_no_blank_line() -> None:
    rendered, _, _ = frame([b"data: a\nid: 7\n\n"])
    assert rendered == b"id: 1\ndata: a\n\n"


def test_data_field_without_colon_counts_as_data() -> None:
    rendered, _, _ = frame([b"event: x\ndata\n\n"])
    assert rendered == b"id: 1\nevent: x\ndata\n\n"


def test_field_named_like_data_is_not_data() -> None:
    rendered, ends, _ = frame([b"database: x\n\n"])
    assert rendered == b"" and ends == []


def test_bom_at_stream_start_is_skipped() -> None:
    rendered, _, _ = frame([b"\xef\xbb", b"\xbfdata: a\n\n"])
    assert rendered == b"id: 1\ndata: a\n\n"


def test_cr_only_line_ends() -> None:
    rendered, _ends, clean = frame([b"data: a\r\rdata: b\r\r"])
    assert clean
    assert rendered == b"id: 1\rdata: a\r\rid: 2\rdata: b\r\r"


def test_crlf_blank_line_split_between_reads_stays_whole() -> None:
    assert frame([b"data: a\r\n\r", b"\ndata: b\r\n\r\n"]) == frame(
        [b"data: a\r\n\r\ndata: b\r\n\r\n"]
    )


def test_oversized_event_is_malformed() -> None:
    framer = SSEFramer(max_event_bytes=1024)
    with pytest.raises(MalformedStream):
        framer.feed(b"data: " + b"x" * 2000)


def test_garbage_without_blank_lines_is_torn() -> None:
    _, ends, clean = frame([bytes(range(256)).replace(b"\n", b"").replace(b"\r", b"")])
    assert ends == [] and not clean


sse_line = st.one_of(
    st.builds(
        lambda v: b"data: " + v,
        st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
    ),
    st.just(b": comment"),
    st.just(b"id: 99"),
    st.just(b"event: delta"),
    st.just(b"retry: 10"),
    st.just(b""),
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(sse_line, max_size=30),
    eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_any_stream_any_split_gives_the_same_events(
    lines: list[bytes], eol: bytes, cuts: list[int]
) -> None:
    data = eol.join(lines) + eol + eol
    whole = frame([data])
    assert frame(split_at(data, cuts)) == whole
    _rendered, ends, clean = whole
    assert clean
    expected_events = 0
    for block in re.split(re.escape(eol) * 2, data):
        if any(line.startswith(b"data") for line in block.split(eol)):
            expected_events += 1
    assert len(ends) == expected_events
