"""The incremental SSE parser: split anywhere, any line ending, comments, multi-line data."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from sse_feeding import feed_chunks, fields

from adapters.sse import SSEEvent, SSEParser, encode_event


def parse_whole(stream: bytes) -> list[SSEEvent]:
    return SSEParser().feed(stream)


def parse_split(stream: bytes, cuts: list[int]) -> list[SSEEvent]:
    return feed_chunks(stream, cuts)[0]


def test_fields_comments_and_multiline_data() -> None:
    stream = (
        b": keep-alive\n\n"
        b'event: message_start\ndata: {"a": 1}\n\n'
        b"id: 7\ndata: line one\ndata:line two\nretry: 100\nunknown: x\n\n"
        b"data\n\n"
        b"event: only-an-event-is-not-dispatched\n\n"
        b"data: [DONE]\n\n"
    )
    assert fields(parse_whole(stream)) == [
        ("message_start", '{"a": 1}', None),
        ("", "line one\nline two", "7"),
        ("", "", "7"),
        ("", "[DONE]", "7"),
    ]


def test_crlf_and_cr_line_endings_and_bom() -> None:
    stream = b"\xef\xbb\xbfevent: a\r\ndata: 1\r\n\r\nevent: b\rdata: 2\r\rdata: 3\n\n"
    assert fields(parse_whole(stream)) == [("a", "1", None), ("b", "2", None), ("", "3", None)]


def test_cr_lf_split_across_chunks_is_one_line_ending() -> None:
    # "\r" ends one chunk and "\n" opens the next: one line ending, not a blank line.
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\ndata: y\r") == []
    events = parser.feed(b"\n\r\n")
    assert fields(events) == [("", "x\ny", None)]


def test_utf8_split_inside_a_character() -> None:
    raw = encode_event("héllo ✓", "greeting")
    cut = raw.index("✓".encode()) + 1
    assert fields(parse_split(raw, [cut])) == [("greeting", "héllo ✓", None)]


def test_spans_cover_each_block() -> None:
    stream = b": ping\n\ndata: 1\n\nevent: e\ndata: 2\n\n"
    events = parse_whole(stream)
    assert [stream[e.start : e.end] for e in events] == [b"data: 1\n\n", b"event: e\ndata: 2\n\n"]


def test_incomplete_event_is_pending_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: never finished\n") == []
    assert parser.pending
    assert parser.boundary == 0


# -- property: any split gives the same events ------------------------------------------------

_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
    max_size=20,
)
_event = st.tuples(
    st.one_of(st.none(), st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=12)),
    st.lists(_text, min_size=1, max_size=3),
    st.booleans(),  # preceded by a comment block (a keep-alive ping)
    st.sampled_from([None, b"\n", b"\r\n", b"\r"]),  # its own line ending (None: the stream's)
)


def _encode(events: list[tuple[str | None, list[str], bool, bytes | None]], eol: bytes) -> bytes:
    out = bytearray()
    for name, lines, ping, own in events:
        eol = own or eol
        if ping:
            out += b": ping" + eol + eol
        if name:
            out += b"event: " + name.encode() + eol
        for line in lines:
            out += b"data: " + line.encode() + eol
        out += eol
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(_event, max_size=8),
    eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    data=st.data(),
)
def test_any_split_gives_the_same_events(events, eol, data) -> None:
    stream = _encode(events, eol)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    expected = [(name or "", "\n".join(lines), None) for name, lines, _, _ in events]
    whole = parse_whole(stream)
    assert fields(whole) == expected
    split = parse_split(stream, cuts)
    assert fields(split) == expected
    # Spans are where the events are, whatever the chunking (when a cut falls between the
    # "\r" and "\n" of the blank line ending an event, the event is dispatched at the
    # "\r", so its span stops there; the next block starts after the "\n" all the same).
    if b"\r\n" not in stream:
        assert [(e.start, e.end) for e in split] == [(e.start, e.end) for e in whole]
    for event in split:
        assert (
            stream[event.start : event.end]
            .rstrip(b"\r\n")
            .endswith(b"data: " + event.data.split("\n")[-1].encode())
        )


def test_extra_blank_lines_and_bare_data_field_at_every_split() -> None:
    stream = b"\n\ndata: a\n\n\n\ndata\n\n: ping\n\n\nevent: e\ndata: b\ndata:\n\n"
    expected = [("", "a", None), ("", "", None), ("e", "b\n", None)]
    for cut in range(len(stream) + 1):
        for second in range(cut, len(stream) + 1):
            assert fields(parse_split(stream, [cut, second])) == expected


def test_blank_line_alone_in_a_chunk_after_a_block_is_consumed() -> None:
    # Found by the fuzzer: a run of three "\n" cut after the second left the third
    # pending (pending=True, boundary one byte short) where one chunk consumed it.
    stream = b": ping\n\n\n"
    for cut in range(len(stream) + 1):
        parser = SSEParser()
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) == []
        assert (parser.pending, parser.boundary) == (False, len(stream))


# -- bounded: an oversized event is skipped, never kept --------------------------------------

_SMALL = 64  # max_block in these tests


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(_event, st.booleans()), max_size=8),
    eol=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    data=st.data(),
)
def test_oversized_events_are_skipped_and_the_rest_parsed(events, eol, data) -> None:
    # Small events fit in max_block; huge ones (data only) exceed it by more than any chunk,
    # so however the stream is cut, each huge one overflows while unfinished.
    chunk = 24
    parts, expected = [], []
    for (name, lines, ping, own), huge in events:
        if huge:
            parts.append(_encode([(None, ["h" * (3 * _SMALL), "h" * _SMALL], ping, own)], eol))
        else:
            # ASCII, six characters: a block of at most 59 bytes, whatever the line ending.
            lines = ["".join(c for c in line if c.isascii())[:6] for line in lines]
            name = name[:6] if name else name
            parts.append(_encode([(name, lines, ping, own)], eol))
            expected.append((name or "", "\n".join(lines), None))
    stream = b"".join(parts)
    # Cut at most every `chunk` bytes, plus wherever hypothesis likes.
    cuts = sorted(
        {*range(chunk, len(stream), chunk), *data.draw(st.lists(st.integers(0, len(stream))))}
    )
    parser = SSEParser(max_block=_SMALL)
    got, last = [], 0
    for cut in [*cuts, len(stream)]:
        got += parser.feed(stream[last:cut])
        last = cut
        # Memory stays bounded: at most one block's worth, plus the chunk being read.
        assert len(parser._buf) + len(parser._line) + parser._data_bytes <= _SMALL + chunk
    assert fields(got) == expected
    assert parser.skipped == sum(huge for _, huge in events)
    assert not parser.pending
    # (A cut between the "\r" and "\n" of a final "\r\n" leaves the "\n" to the next block.)
    assert parser.boundary == len(stream) or stream.endswith(b"\r\n")


def test_skipped_bytes_count_as_finished_at_once() -> None:
    # An observer that holds bytes until their block ends (hiding an event) may pass a
    # skipped block's bytes as they come: the boundary follows them.
    parser = SSEParser(max_block=16)
    assert fields(parser.feed(b"data: a\n\ndata: " + b"x" * 20)) == [("", "a", None)]
    assert (parser.skipped, parser.boundary, parser.pending) == (1, 35, True)
    assert parser.feed(b"x" * 5) == [] and parser.boundary == 40
    events = parser.feed(b"\n\ndata: b\n\n")
    assert fields(events) == [("", "b", None)]
    assert not parser.pending and parser.boundary == 51


def test_skip_ending_in_a_blank_line_cut_across_chunks() -> None:
    for eol in (b"\n", b"\r\n", b"\r"):
        stream = b"data: " + b"y" * 40 + eol + eol + b"data: after" + eol + eol
        for cut in range(30, len(stream) + 1):
            parser = SSEParser(max_block=16)
            events = []
            for piece in (stream[:30], stream[30:cut], stream[cut:]):  # 30 bytes: over 16
                events += parser.feed(piece)
            assert fields(events) == [("", "after", None)], (eol, cut)
