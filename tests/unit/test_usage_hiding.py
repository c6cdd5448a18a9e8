"""Hiding the usage chunk loopguard asked for, while passing every other byte on unread.

An OpenAI stream observer that hides the injected usage chunk passes blocks in which
``may_hide`` finds no usage object on before reading them; the rest is read first. Both
ways must give the client the same bytes and the record the same observation as an
observer that reads every block before passing it (``may_hide = None``), wherever the
network splits the stream and whatever line endings the upstream uses.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from hypothesis import example, given, settings
from hypothesis import strategies as st

from adapters.openai import OpenAIObserver
from adapters.sse import SSEParser

SSE = {"content-type": "text/event-stream"}


def chunk(text: str | None = None, finish: str | None = None, **extra: object) -> dict:
    delta = {} if text is None else {"content": text}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c1", "model": "m", "choices": [choice], "usage": None, **extra}


USAGE = {
    "id": "c1",
    "model": "m",
    "choices": [],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3},
}

texts = st.text(alphabet='ab "usage": {}\\\n', max_size=12)
content_blocks = st.builds(lambda t: ("data", json.dumps(chunk(t))), texts)
other_blocks = st.sampled_from(
    [
        ("comment", ": keep-alive"),
        ("data", json.dumps(chunk(None, "stop"))),
        ("data", json.dumps(chunk("", usage_hint='"usage": {"x": 1}'))),
        # Usage on a chunk with choices (vLLM's continuous usage stats): shown, not hidden.
        ("data", json.dumps(chunk("y", usage={"prompt_tokens": 5, "completion_tokens": 1}))),
        ("data", "not json"),
    ]
)


def render(blocks: list[tuple[str, str]], newline: str) -> bytes:
    lines = [(f"data: {body}" if kind == "data" else body) for kind, body in blocks]
    return "".join(line + newline * 2 for line in lines).encode()


def feed_split(observer: OpenAIObserver, stream: bytes, cuts: list[int]) -> list[bytes]:
    outs, last = [], 0
    for n, cut in enumerate([*sorted(cuts), len(stream)]):
        outs.append(observer.feed(stream[last:cut], float(n)))
        last = cut
    return outs


_HIDDEN_CRLF = render([("data", json.dumps(USAGE))], "\r\n")
_FIRST = ("data", json.dumps(chunk("a")))


@settings(max_examples=300, deadline=None)
# Cuts between the "\r" and "\n" ending the usage event, and ending the event before it.
@example(body=[], usage_at=0, newline="\r\n", cuts=[len(_HIDDEN_CRLF) - 1])
@example(body=[_FIRST], usage_at=1, newline="\r\n", cuts=[len(render([_FIRST], "\r\n")) - 1])
@given(
    body=st.lists(st.one_of(content_blocks, other_blocks), max_size=8),
    usage_at=st.integers(min_value=0, max_value=8),
    newline=st.sampled_from(["\n", "\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_passing_unread_matches_reading_first(
    body: list[tuple[str, str]], usage_at: int, newline: str, cuts: list[int]
) -> None:
    blocks = list(body)
    blocks.insert(min(usage_at, len(blocks)), ("data", json.dumps(USAGE)))
    blocks.append(("data", "[DONE]"))
    stream = render(blocks, newline)
    cuts = [cut % (len(stream) + 1) for cut in cuts]

    fast = OpenAIObserver(200, SSE, hide_usage=True)
    reference = OpenAIObserver(200, SSE, hide_usage=True)
    reference.may_hide = None  # read every block before passing it

    fast_out = b"".join(feed_split(fast, stream, cuts))
    assert fast_out == b"".join(feed_split(reference, stream, cuts))
    # Byte for byte, exactly the usage event's bytes are gone (also when a cut split the
    # "\r\n" ending it, or the one before it).
    assert fast_out == stream.replace(render([("data", json.dumps(USAGE))], newline), b"", 1)
    # Exactly the usage chunk is gone.
    shown = [e.data for e in SSEParser().feed(fast_out)]
    assert json.dumps(USAGE) not in shown
    assert len(shown) == len([b for b in blocks if b[0] == "data"]) - 1
    assert asdict(fast.finish()) == asdict(reference.finish())


def test_blocks_without_usage_pass_before_they_are_read() -> None:
    # The chunk with the first token passes whole, and is read when the next arrives:
    # the first token's time is its own chunk's arrival, not the reading's.
    observer = OpenAIObserver(200, SSE, hide_usage=True)
    first = f"data: {json.dumps(chunk('Hel'))}\n\ndata: {json.dumps(chunk('lo'))}\n\n".encode()
    assert observer.feed(first, 1.0) == first
    assert observer.first_output_at is None  # not read yet
    rest = f"data: {json.dumps(USAGE)}\n\ndata: [DONE]\n\n".encode()
    assert observer.feed(rest, 2.0) == b"data: [DONE]\n\n"
    obs = observer.finish()
    assert (obs.first_output_at, obs.output_chunks) == (1.0, 2)
    assert (obs.usage.input_tokens, obs.usage.output_tokens, obs.complete) == (5, 3, True)
