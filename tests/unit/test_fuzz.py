"""Fuzzing: the SSE parser, the redaction walker and transcript pairing take whatever
a client or upstream sends without an exception escaping.

Each property states what must hold beyond "does not crash": the parser gives the same
events however the bytes are chunked; redaction is idempotent and the fingerprint
deterministic; a deep body is a ``JSONTooDeep`` (a parse error), never a
``RecursionError`` from the parser; the transcript readers return steps built only
from calls that have a result.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sse_feeding import feed_chunks, fields

from adapters.trajectory import (
    history_from_anthropic,
    history_from_openai_chat,
    history_from_openai_responses,
)
from guard.engine.canonical import JSONTooDeep, loads_json, parse_json_text
from guard.engine.config import RedactionConfig
from guard.engine.contract import HistoryStep
from guard.engine.fingerprint import params_hash
from guard.engine.redact import Redactor

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = b"fuzz-key"
HEX32 = re.compile(r"[0-9a-f]{32}")

# -- SSE parser -------------------------------------------------------------------------

# Pieces that steer random bytes toward what the parser branches on.
SSE_PIECES = st.sampled_from(
    [
        b"data:",
        b"data: ",
        b"data",
        b"event: ",
        b"id: ",
        b"id:\x00",
        b"retry: 5",
        b":",
        b": ping",
        b"\n",
        b"\n\n",
        b"\r",
        b"\r\n",
        b"\r\n\r\n",
        b"x",
        b"{}",
        b"\xef\xbb\xbf",
        b"\xc3",
        b"\xa9",
        b"\xff",
        b" ",
    ]
)
SSE_STREAMS = st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(SSE_PIECES, st.binary(max_size=4)), max_size=40).map(b"".join),
)


@FUZZ
@given(SSE_STREAMS, st.data())
@example(b"data: a\n\n\ndata: b\r\n\r\n", None)
@example(b"data: a\r\n\r\ndata: b\n\n", None)
def test_sse_any_bytes_any_chunking_same_events(stream: bytes, data: Any) -> None:
    cuts: list[int] = []
    if data is not None:
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    if stream.startswith(b"\xef\xbb\xbf"):
        # A byte order mark is only recognized whole (documented in adapters/sse.py).
        cuts = [c for c in cuts if c == 0 or c >= 3]
    whole, one = feed_chunks(stream, [])
    split, many = feed_chunks(stream, cuts)
    assert fields(split) == fields(whole)
    assert (many.offset, many.pending) == (one.offset, one.pending)
    assert same_offset(stream, many.boundary, one.boundary)
    for a, b in zip(split, whole, strict=True):
        assert same_offset(stream, a.start, b.start) and same_offset(stream, a.end, b.end)
    # Spans are in order, inside the stream, and end no later than the last boundary.
    for events, parser in ((whole, one), (split, many)):
        last = 0
        for event in events:
            assert last <= event.start < event.end <= parser.boundary <= len(stream)
            last = event.end


def same_offset(stream: bytes, split: int, whole: int) -> bool:
    """Equal, or the chunk cut a "\r\n" that ends a block: the "\r" alone already
    ends the line (the event is dispatched without waiting), so the event's span stops
    before the "\n" arriving next (the following block starts after it)."""
    return split == whole or (split == whole - 1 and stream[split - 1 : whole] == b"\r\n")


@FUZZ
@given(SSE_STREAMS)
def test_sse_byte_at_a_time_same_events(stream: bytes) -> None:
    if stream.startswith(b"\xef\xbb\xbf"):
        stream = stream[3:]
    whole, _ = feed_chunks(stream, [])
    bytewise, _ = feed_chunks(stream, list(range(1, len(stream))))
    assert fields(bytewise) == fields(whole)
    for a, b in zip(bytewise, whole, strict=True):
        assert same_offset(stream, a.start, b.start) and same_offset(stream, a.end, b.end)


# -- redaction walker and fingerprint ----------------------------------------------------

ODD_TEXT = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()),  # surrogates included
    max_size=30,
)
SECRETISH = st.sampled_from(
    [
        "a@b.io",
        "Jane.Doe@example.com",
        "4111 1111 1111 1111",
        "4111111111111111",
        "+1 415 555 0100",
        "10.0.0.1",
        "sk-abcdefghijklmnop1234",
        "Bearer abcdefghijkl",
        "eyJhbGciOi.eyJzdWIiOi.sig",
        "password=hunter2",
        "[EMAIL]",
        "[ORDER:0123456789abcdef]",
        "[",
        "1 1 1 1 1 1 1 1 1 1 1 1 1 1",
    ]
)
TEXTS = st.one_of(
    ODD_TEXT, SECRETISH, st.lists(st.one_of(SECRETISH, ODD_TEXT), max_size=4).map(" ".join)
)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([4111111111111111, -4111111111111111, 10**12, 10**19, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXTS,
)
KEYS = st.one_of(
    TEXTS, st.sampled_from(["password", "api_key", "X-Api-Key", "authorization", "email"])
)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(KEYS, children, max_size=5)
    ),
    max_leaves=40,
)


def redactors() -> list[Redactor]:
    cfg = RedactionConfig()
    return [Redactor(cfg, key=KEY), Redactor(cfg, key=KEY, hashing=True)]


REDACTORS = redactors()


@FUZZ
@given(JSON_VALUES)
@example(float("nan"))
@example({"a": [1.0, -0.0, 1e308 * 10]})
@example([-9223372036854775809])  # beyond 64 bits: parsed exactly from its text too
def test_redact_any_json_value_is_idempotent_and_hash_deterministic(value: Any) -> None:
    for redactor in REDACTORS:
        once = redactor.redact(value)
        twice = redactor.redact(once)
        # NaN != NaN: compare by canonical bytes, the form every consumer uses.
        assert json.dumps(twice, sort_keys=True) == json.dumps(once, sort_keys=True)
        first = params_hash(value, redactor)
        assert HEX32.fullmatch(first)
        # A fresh redactor with the same key (empty caches) gives the same hash.
        fresh = Redactor(redactor.cfg, key=KEY, hashing=redactor is REDACTORS[1])
        assert params_hash(value, fresh) == first
        # Sent as a JSON string (as OpenAI sends arguments), a container is the same call.
        if isinstance(value, dict | list):
            try:
                text = json.dumps(value, ensure_ascii=False)
                text.encode()
            except (ValueError, UnicodeEncodeError):
                continue  # lone surrogates: not text a client can send
            assert params_hash(text, redactor) == first


@FUZZ
@given(TEXTS)
def test_redact_text_is_idempotent(text: str) -> None:
    for redactor in REDACTORS:
        once = redactor.redact_text(text)
        assert redactor.redact_text(once) == once
        assert redactor.scrub(text) == once


def nested_json(depth: int, opener: str, leaf: str) -> str:
    """``depth`` containers around ``leaf``: arrays, or objects under key "k"."""
    if opener == "[":
        return "[" * depth + leaf + "]" * depth
    return '{"k":' * depth + leaf + "}" * depth


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=6000),
    st.sampled_from(["[", "{"]),
    st.sampled_from(["1", '"a@b.io"', "null", "NaN", "123456789012345678901234567890"]),
)
@example(1025, "[", "1")
@example(5000, "{", "NaN")
def test_deep_json_is_a_parse_error_or_a_value_never_recursion(
    depth: int, opener: str, leaf: str
) -> None:
    text = nested_json(depth, opener, leaf)
    try:
        value = loads_json(text)
    except JSONTooDeep:
        # The documented outcome: a ValueError the body readers treat as "not parsed".
        assert depth > 900
        # As a string argument it is then fingerprinted as text, not lost.
        assert parse_json_text(text) == text
        assert HEX32.fullmatch(params_hash(text, REDACTORS[1]))
        return
    assert depth <= 1024 + 1
    del value


# -- transcript pairing ------------------------------------------------------------------

IDS = st.one_of(
    st.none(),
    st.sampled_from(["c1", "c2", "c3", ""]),
    st.integers(-2, 3),
    st.booleans(),
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.sampled_from(["a"]), st.integers(0, 1), max_size=1),
)
GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)
DEEP_ARGS = st.integers(990, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n)
ARGUMENTS = st.one_of(
    GARBAGE,
    st.sampled_from(["", "  ", "{}", '{"q": 1}', "[1,2]", "{bad", "NaN", "Error: x"]),
    JSON_VALUES,
    DEEP_ARGS,
)
CONTENT = st.one_of(
    GARBAGE,
    st.sampled_from(["ok", "Error: boom", '{"error": "x"}', '{"error": ""}', "{"]),
    DEEP_ARGS,
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=6)}),
            st.fixed_dictionaries({"type": st.just("image")}),
            GARBAGE,
        ),
        max_size=3,
    ),
)
ROLES = st.one_of(st.sampled_from(["user", "assistant", "tool", "system", "developer"]), GARBAGE)
NAMES = st.one_of(st.sampled_from(["search", "read_file"]), GARBAGE)


def maybe(d: dict[str, Any]) -> Any:
    """A dict with any of its keys dropped (a missing field is its own case)."""
    keys = sorted(d)
    return (
        st.lists(st.sampled_from(keys), unique=True).map(
            lambda drop: {k: v for k, v in d.items() if k not in drop}
        )
        if keys
        else st.just({})
    )


def shaped(fields: dict[str, Any]) -> Any:
    return st.fixed_dictionaries(fields).flatmap(maybe)


CHAT_CALL = shaped(
    {
        "id": IDS,
        "type": st.just("function"),
        "function": st.one_of(GARBAGE, shaped({"name": NAMES, "arguments": ARGUMENTS})),
    }
)
CHAT_MESSAGES = st.lists(
    st.one_of(
        shaped(
            {
                "role": st.just("assistant"),
                "content": CONTENT,
                "tool_calls": st.one_of(
                    GARBAGE, st.lists(st.one_of(CHAT_CALL, GARBAGE), max_size=3)
                ),
            }
        ),
        shaped({"role": st.just("tool"), "tool_call_id": IDS, "content": CONTENT}),
        shaped({"role": ROLES, "content": CONTENT}),
        GARBAGE,
    ),
    max_size=8,
)
RESPONSES_ITEMS = st.lists(
    st.one_of(
        shaped(
            {
                "type": st.sampled_from(["function_call", "custom_tool_call"]),
                "call_id": IDS,
                "name": NAMES,
                "arguments": ARGUMENTS,
                "input": ARGUMENTS,
            }
        ),
        shaped(
            {
                "type": st.sampled_from(["function_call_output", "custom_tool_call_output"]),
                "call_id": IDS,
                "output": CONTENT,
            }
        ),
        shaped(
            {"type": st.sampled_from(["message", "reasoning"]), "role": ROLES, "content": CONTENT}
        ),
        GARBAGE,
    ),
    max_size=8,
)
ANTHROPIC_BLOCKS = st.lists(
    st.one_of(
        shaped({"type": st.just("tool_use"), "id": IDS, "name": NAMES, "input": ARGUMENTS}),
        shaped(
            {
                "type": st.just("tool_result"),
                "tool_use_id": IDS,
                "content": CONTENT,
                "is_error": GARBAGE,
            }
        ),
        shaped({"type": st.just("text"), "text": GARBAGE}),
        GARBAGE,
    ),
    max_size=4,
)
ANTHROPIC_MESSAGES = st.lists(
    st.one_of(shaped({"role": ROLES, "content": st.one_of(ANTHROPIC_BLOCKS, CONTENT)}), GARBAGE),
    max_size=6,
)


def check_steps(steps: Any, names: set[Any]) -> None:
    assert isinstance(steps, list)
    for step in steps:
        assert isinstance(step, HistoryStep)
        assert isinstance(step.tool, str) and step.tool in names
        assert isinstance(step.error, bool)


def called_names(value: Any) -> set[Any]:
    """Every "name" value anywhere in the transcript (a step names one of them)."""
    found: set[Any] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("name"), str):
                found.add(item["name"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


@FUZZ
@given(CHAT_MESSAGES)
@example([{"role": "assistant", "tool_calls": [{"id": ["x"], "function": {"name": "s"}}]}])
@example([{"role": "assistant", "tool_calls": True}])
@example(
    [
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "s"}}]},
        {"role": "tool", "tool_call_id": ["x"], "content": "ok"},
    ]
)
@example(
    [
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "function": {"name": "s", "arguments": '{"a":' * 2000 + "1" + "}" * 2000},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"a":' * 2000 + "1" + "}" * 2000},
    ]
)
def test_openai_chat_pairing_takes_any_transcript(messages: list[Any]) -> None:
    check_steps(history_from_openai_chat(messages), called_names(messages))


@FUZZ
@given(RESPONSES_ITEMS)
@example([{"type": "function_call", "call_id": {"a": 1}, "name": "s"}])
def test_openai_responses_pairing_takes_any_transcript(items: list[Any]) -> None:
    check_steps(history_from_openai_responses(items), called_names(items))


@FUZZ
@given(ANTHROPIC_MESSAGES)
@example([{"role": "assistant", "content": [{"type": "tool_use", "id": [1], "name": "s"}]}])
def test_anthropic_pairing_takes_any_transcript(messages: list[Any]) -> None:
    check_steps(history_from_anthropic(messages), called_names(messages))


@pytest.mark.parametrize(
    "reader", [history_from_openai_chat, history_from_openai_responses, history_from_anthropic]
)
@pytest.mark.parametrize("transcript", [None, []])
def test_pairing_takes_a_non_list(reader: Any, transcript: Any) -> None:
    assert reader(transcript) == []


def test_an_unhashable_call_id_in_a_continued_responses_request_is_not_a_crash() -> None:
    """A ``function_call_output`` whose ``call_id`` is an object or array, on a request
    that continues server-side state: the result pairs with nothing, and the request is
    parsed (found by reading the code after the readers' bugs above)."""
    import json

    from adapters.openai import OpenAIAdapter
    from guard.engine.config import RouteConfig
    from guard.engine.contract import RequestView

    route = RouteConfig(prefix="/o", upstream="http://m", adapter="openai")
    body = {
        "model": "m",
        "previous_response_id": "resp_1",
        "input": [{"type": "function_call_output", "call_id": {"a": 1}, "output": "x"}],
    }
    view = RequestView("POST", "/v1/responses", "", {}, json.dumps(body).encode())
    parsed = OpenAIAdapter(route).parse(view)
    assert parsed.open_results == {}
