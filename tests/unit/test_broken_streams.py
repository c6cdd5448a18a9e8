"""Broken SSE from an upstream: every byte still passes, nothing raises, it is recorded.

Garbage JSON in data lines, non-UTF-8 bytes, wrong shapes where objects belong: an
observer reads what it can and never stands between the upstream and the client.
"""

from __future__ import annotations

import json

import pytest

from adapters.anthropic import AnthropicAdapter
from adapters.mcp import McpAdapter
from adapters.openai import OpenAIAdapter
from guard.engine.config import RouteConfig
from guard.engine.contract import RequestView

BROKEN = [
    b"data: {not json\n\n",
    b"event: message_start\ndata: [1,2\n\n",
    b"data: \xff\xfe\n\n",
    b'data: {"choices": 5, "type": 7}\n\n',
    b"data: [1, {}]\n\n",
]


def feed_all(observer, chunks: list[bytes]) -> bytes:
    return b"".join(observer.feed(chunk, float(n)) for n, chunk in enumerate(chunks))


@pytest.mark.parametrize(
    ("adapter_class", "name", "path"),
    [
        (OpenAIAdapter, "openai", "/v1/chat/completions"),
        (OpenAIAdapter, "openai", "/v1/responses"),
        (AnthropicAdapter, "anthropic", "/v1/messages"),
    ],
)
def test_model_observers_pass_broken_streams_byte_exact(adapter_class, name, path) -> None:
    adapter = adapter_class(RouteConfig(prefix="/", upstream="http://x", adapter=name))
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    if path == "/v1/responses":
        body = {"model": "m", "stream": True, "input": "x"}
    parsed = adapter.parse(RequestView("POST", path, "", {}, json.dumps(body).encode()))
    observer = adapter.observer(parsed, 200, {"content-type": "text/event-stream"})
    assert feed_all(observer, BROKEN) == b"".join(BROKEN)
    observation = observer.finish()
    assert observation.first_output_at is None
    assert observation.usage is not None and observation.usage.source == "absent"
    # No terminal event was seen: the exchange records failure stage "stream".
    assert observation.complete is False


def test_mcp_observer_passes_broken_streams_and_finds_no_outcome() -> None:
    adapter = McpAdapter(RouteConfig(prefix="/", upstream="http://x", adapter="mcp"))
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t"}}
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    parsed = adapter.parse(RequestView("POST", "", "", headers, json.dumps(call).encode()))
    observer = adapter.observer(parsed, 200, {"content-type": "text/event-stream"})
    chunks = [*BROKEN, b'data: {"jsonrpc":"2.0","id":1,"result":5}\n\n']
    assert feed_all(observer, chunks) == b"".join(chunks)
    observation = observer.finish()
    assert observation.outcomes == [None]
    assert observation.complete is False
