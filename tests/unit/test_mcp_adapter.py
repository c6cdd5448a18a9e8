"""Unit tests for the MCP adapter: parse, stop answer, response observer."""

from __future__ import annotations

import json

import pytest

from adapters.mcp import McpAdapter, McpObserver
from adapters.sse import SSEParser
from guard.engine.calls import StallRule, Verdict
from guard.engine.contract import ProtocolFields, RequestView

ACCEPT_BOTH = "application/json, text/event-stream"
VERDICT = Verdict("block", "lookup_tracking", "abc123", rule=StallRule.STALLED_REPEAT, repeats=3)


def post(body, **headers) -> RequestView:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    base = {"content-type": "application/json", "accept": ACCEPT_BOTH}
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    return RequestView("POST", "", "", base, raw)


def call(id_, name="lookup_tracking", arguments=None) -> dict:
    params = {"name": name, "arguments": arguments if arguments is not None else {"order_id": "A1"}}
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}


def result(id_, text="in transit", *, is_error=False, **extra) -> dict:
    body = {"content": [{"type": "text", "text": text}], "isError": is_error, **extra}
    return {"jsonrpc": "2.0", "id": id_, "result": body}


def sse(*messages, crlf=True) -> bytes:
    nl = "\r\n" if crlf else "\n"
    return "".join(f"event: message{nl}data: {json.dumps(m)}{nl}{nl}" for m in messages).encode()


adapter = McpAdapter()


# -- parse -----------------------------------------------------------------------------


def test_tools_call_is_guarded():
    parsed = adapter.parse(post(call(7), mcp_session_id="sess-1"))
    assert parsed.operation == "execute_tool"
    assert [(i.tool, i.params, i.call_id) for i in parsed.invocations] == [
        ("lookup_tracking", {"order_id": "A1"}, 7)
    ]
    assert parsed.span_name == "tools/call lookup_tracking"
    assert parsed.fields == ProtocolFields(
        mcp_session_id="sess-1", mcp_method="tools/call", jsonrpc_request_id="7"
    )
    assert parsed.admission_error is None


def test_missing_arguments_hash_as_empty_object():
    message = {"jsonrpc": "2.0", "id": "x", "method": "tools/call", "params": {"name": "t"}}
    parsed = adapter.parse(post(message))
    assert parsed.invocations[0].params == {}
    assert parsed.invocations[0].call_id == "x"


@pytest.mark.parametrize(
    ("message", "span"),
    [
        ({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, "initialize"),
        ({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, "tools/list"),
        ({"jsonrpc": "2.0", "method": "notifications/initialized"}, "notifications/initialized"),
        ({"jsonrpc": "2.0", "id": 9, "result": {}}, "response"),
    ],
)
def test_other_messages_pass_untouched(message, span):
    parsed = adapter.parse(post(message))
    assert parsed.operation == "mcp"
    assert parsed.invocations == []
    assert parsed.span_name == span
    assert parsed.admission_error is None
    assert parsed.forward_body is None  # forwarded as received


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_get_and_delete_are_passthrough(method):
    request = RequestView(
        method, "", "", {"mcp-session-id": "s", "accept": "text/event-stream"}, b""
    )
    parsed = adapter.parse(request)
    assert parsed.operation == "passthrough"
    assert parsed.invocations == []
    assert parsed.fields == ProtocolFields(mcp_session_id="s")


def test_non_json_post_is_passthrough():
    request = post(
        b"grant_type=client_credentials", content_type="application/x-www-form-urlencoded"
    )
    parsed = adapter.parse(request)
    assert parsed.operation == "passthrough"
    assert parsed.admission_error is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call"', "not valid JSON"),
        (b"[]", "empty"),
        (b"[1, 2]", "batch element 0"),
        (b'"hello"', "not a JSON-RPC message"),
        (
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}).encode(),
            "params.name",
        ),
    ],
)
def test_malformed_bodies_are_admission_errors(body, words):
    parsed = adapter.parse(post(body))
    assert parsed.admission_error is not None
    assert words in parsed.admission_error
    assert parsed.invocations == []


def test_batch_guards_every_tools_call():
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        call(2),
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
        call("3", name="poll_status", arguments={"job_id": "j"}),
    ]
    parsed = adapter.parse(post(batch, mcp_protocol_version="2025-03-26"))
    assert [(i.tool, i.call_id) for i in parsed.invocations] == [
        ("lookup_tracking", 2),
        ("poll_status", "3"),
    ]
    assert parsed.span_name == "tools/call lookup_tracking"


# -- stop answer ---------------------------------------------------------------------


def stop(request: RequestView):
    return adapter.stop_answer(request, adapter.parse(request), VERDICT)


def test_stop_answer_is_a_json_rpc_tool_error_for_the_same_id():
    answer = stop(post(call("req-42"), mcp_session_id="sess-1"))
    headers = dict(answer.headers)
    assert answer.status == 200
    assert headers["content-type"] == "application/json"
    assert headers["mcp-session-id"] == "sess-1"
    assert headers["x-loopguard-route"] == "stop_and_review"
    message = json.loads(b"".join(answer.chunks))
    assert message["jsonrpc"] == "2.0"
    assert message["id"] == "req-42"
    res = message["result"]
    assert res["isError"] is True
    assert res["resultType"] == "complete"  # required by protocol 2026-07-28 clients
    text = res["content"][0]["text"]
    assert res["content"][0]["type"] == "text"
    # What was repeated, how often, what to do instead.
    assert "`lookup_tracking`" in text
    assert "3 times" in text
    assert "Do not repeat it" in text
    assert res["_meta"]["loopguard/stop"] == {
        "tool": "lookup_tracking",
        "rule": "stalled_repeat",
        "repeats": 3,
        "params_hash": "abc123",
    }


def test_stop_answer_keeps_integer_ids_integers():
    message = json.loads(b"".join(stop(post(call(5))).chunks))
    assert message["id"] == 5


def test_stop_answer_is_sse_when_the_client_accepts_only_an_event_stream():
    answer = stop(post(call(8), accept="text/event-stream"))
    assert dict(answer.headers)["content-type"] == "text/event-stream"
    events = SSEParser().feed(b"".join(answer.chunks))
    assert len(events) == 1
    assert events[0].event == "message"
    message = json.loads(events[0].data)
    assert message["id"] == 8
    assert message["result"]["isError"] is True


def test_stop_answer_for_a_batch_answers_each_request():
    batch = [call(1), {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, call(3, name="other")]
    batch.append({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}})
    answer = stop(post(batch))
    replies = json.loads(b"".join(answer.chunks))
    assert [r["id"] for r in replies] == [1, 2, 3]
    assert replies[0]["result"]["isError"] is True
    assert "3 times" in replies[0]["result"]["content"][0]["text"]
    assert replies[1]["error"]["code"] == -32001
    assert "`other`" in replies[2]["result"]["content"][0]["text"]


# -- observer ------------------------------------------------------------------------


def observe(parsed, status, headers, chunks):
    observer = adapter.observer(parsed, status, headers)
    passed = b"".join(observer.feed(c, float(i)) for i, c in enumerate(chunks))
    assert passed == b"".join(chunks)  # the observer never changes the bytes
    return observer.finish()


JSON_HEADERS = {"content-type": "application/json"}
SSE_HEADERS = {"content-type": "text/event-stream"}


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 7, 10_000])
def test_observer_json_response_in_split_chunks(size):
    parsed = adapter.parse(post(call(4)))
    body = json.dumps(result(4, "scan at 10:00", structuredContent={"status": "in_transit"}))
    obs = observe(parsed, 200, JSON_HEADERS, split(body.encode(), size))
    assert obs.complete
    [outcome] = obs.outcomes
    assert outcome.error is False
    assert outcome.value == {
        "content": [{"type": "text", "text": "scan at 10:00"}],
        "structuredContent": {"status": "in_transit"},
    }
    assert outcome.explicit_marker is None


@pytest.mark.parametrize("size", [1, 5, 64, 100_000])
@pytest.mark.parametrize("crlf", [True, False])
def test_observer_sse_response_after_notifications(size, crlf):
    parsed = adapter.parse(post(call("a")))
    stream = b": ping\r\n\r\nid: 0\r\ndata: \r\n\r\n" + sse(
        {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "x"}},
        {"jsonrpc": "2.0", "id": "other", "result": {"content": []}},
        {"jsonrpc": "2.0", "id": 99, "method": "sampling/createMessage", "params": {}},
        result("a", "found it"),
        crlf=crlf,
    )
    obs = observe(
        parsed, 200, {"content-type": "text/event-stream; charset=utf-8"}, split(stream, size)
    )
    assert obs.complete
    assert obs.outcomes[0].value == {"content": [{"type": "text", "text": "found it"}]}


def test_observer_ids_keep_their_type():
    parsed = adapter.parse(post(call(1)))
    obs = observe(parsed, 200, SSE_HEADERS, [sse(result("1", "wrong"), result(1, "right"))])
    assert obs.outcomes[0].value["content"][0]["text"] == "right"


def test_observer_is_error_result():
    parsed = adapter.parse(post(call(4)))
    obs = observe(
        parsed, 200, JSON_HEADERS, [json.dumps(result(4, "jammed", is_error=True)).encode()]
    )
    assert obs.outcomes[0].error is True


def test_observer_json_rpc_error():
    parsed = adapter.parse(post(call(4)))
    error = {"jsonrpc": "2.0", "id": 4, "error": {"code": -32602, "message": "bad", "data": {}}}
    obs = observe(parsed, 200, SSE_HEADERS, [sse(error)])
    assert obs.outcomes[0].error is True
    assert obs.outcomes[0].value == {"error": {"code": -32602, "message": "bad"}}


def test_observer_explicit_markers():
    parsed = adapter.parse(post(call(4)))
    meta = result(4, "x", _meta={"loopguard/progress": "step-7"})
    obs = observe(parsed, 200, JSON_HEADERS, [json.dumps(meta).encode()])
    assert obs.outcomes[0].explicit_marker == "step-7"
    headers = {**JSON_HEADERS, "x-loopguard-progress": "v2"}
    obs = observe(parsed, 200, headers, [json.dumps(result(4)).encode()])
    assert obs.outcomes[0].explicit_marker == "v2"
    # The result's own marker is more specific than the header.
    obs = observe(parsed, 200, headers, [json.dumps(meta).encode()])
    assert obs.outcomes[0].explicit_marker == "step-7"


def test_observer_batch_outcomes_in_invocation_order():
    parsed = adapter.parse(post([call(1), call(2, name="poll_status")]))
    headers = {**JSON_HEADERS, "x-loopguard-progress": "ignored-for-batches"}
    body = json.dumps([result(2, "second"), result(1, "first", is_error=True)]).encode()
    obs = observe(parsed, 200, headers, [body])
    first, second = obs.outcomes
    assert first.value["content"][0]["text"] == "first" and first.error
    assert second.value["content"][0]["text"] == "second" and not second.error
    assert first.explicit_marker is None and second.explicit_marker is None


def test_observer_stream_without_our_response_is_incomplete():
    parsed = adapter.parse(post(call(1)))
    note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {}}
    obs = observe(parsed, 200, SSE_HEADERS, [sse(note)])
    assert obs.outcomes == [None]
    assert not obs.complete


def test_observer_error_status_without_json_rpc_is_not_an_outcome():
    parsed = adapter.parse(post(call(1)))
    obs = observe(parsed, 421, {"content-type": "text/plain"}, [b"Invalid Host header"])
    assert obs.outcomes == [None]
    assert obs.complete  # nothing was promised, so nothing is missing


def test_observer_for_unguarded_methods_reads_nothing():
    parsed = adapter.parse(post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
    observer = adapter.observer(parsed, 200, SSE_HEADERS)
    assert not isinstance(observer, McpObserver)
    assert observer.feed(b"data: {}\n\n", 0.0) == b"data: {}\n\n"
    assert observer.finish().outcomes == []


def test_observer_gives_up_on_oversized_json(monkeypatch):
    monkeypatch.setattr("adapters.mcp.MAX_JSON_BODY", 64)
    parsed = adapter.parse(post(call(1)))
    body = json.dumps(result(1, "x" * 200)).encode()
    obs = observe(parsed, 200, JSON_HEADERS, split(body, 16))
    assert obs.outcomes == [None]
    assert obs.complete


def test_observer_is_settled_once_every_response_is_seen():
    parsed = adapter.parse(post([call(1), call(2)]))
    observer = adapter.observer(parsed, 200, SSE_HEADERS)
    observer.feed(sse(result(1)), 0.0)
    assert not observer.settled
    observer.feed(sse(result(2), crlf=False)[:-1], 1.0)
    assert not observer.settled  # the event is not complete yet
    observer.feed(b"\n", 2.0)
    assert observer.settled
