"""Progress markers: explicit, JSON pointer, normalized outcome hash."""

from __future__ import annotations

import re

from guard.engine.canonical import loads_json
from guard.engine.config import LoopConfig, RedactionConfig, ToolOverride
from guard.engine.progress import ProgressMarkers, resolve_pointer
from guard.engine.redact import Redactor

LOOP = LoopConfig(tools={"poll": ToolOverride(progress_pointer="/job/status")})
M = ProgressMarkers(LOOP, Redactor(RedactionConfig(), key=b"k"))


def test_explicit_marker_wins() -> None:
    assert M.marker("lookup_tracking", {"anything": 1}, explicit="scan:v17") == "scan:v17"
    assert len(M.marker("t", None, explicit="x" * 500)) == 64
    assert "bob@example.com" not in M.marker("t", None, explicit="bob@example.com")


def test_pointer() -> None:
    outcome = {"job": {"status": "running", "ts": "2026-01-01T00:00:00Z"}}
    assert M.marker("poll", outcome) == "ptr:running"
    assert M.marker("poll", '{"job": {"status": "done"}}') == "ptr:done"
    assert M.marker("poll", b'{"job": {"status": 3}}') == "ptr:3"
    # No such path: the outcome hash instead.
    assert M.marker("poll", {"other": 1}).startswith("h:")
    # Other tools have no pointer.
    assert M.marker("lookup", outcome).startswith("h:")


def test_resolve_pointer_rfc6901() -> None:
    doc = {"a/b": {"m~n": [10, 20]}, "": 5}
    assert resolve_pointer(doc, "/a~1b/m~0n/1") == 20
    assert resolve_pointer(doc, "") is doc
    assert resolve_pointer(doc, "/") == 5
    missing = resolve_pointer(doc, "/a~1b/m~0n/2")
    assert missing is resolve_pointer(doc, "/nope") and missing is not None
    assert resolve_pointer(doc, "/a~1b/m~0n/01") is missing


def test_hash_format_and_volatile_keys() -> None:
    a = M.marker("t", {"status": "ok", "request_id": "r1", "items": [{"etag": 1, "v": "x"}]})
    b = M.marker("t", {"items": [{"v": "x", "etag": 2}], "status": "ok", "request_id": "r2"})
    assert re.fullmatch(r"h:[0-9a-f]{16}", a)
    assert a == b
    # A resource id is not volatile: two different records are two different outcomes.
    assert M.marker("t", {"id": "order-5"}) != M.marker("t", {"id": "order-6"})
    assert M.marker("t", {"status": "failed"}) != M.marker("t", {"status": "ok"})


def test_volatile_patterns_in_strings_and_text() -> None:
    one = "Build 3f2a9c1d-1111-2222-3333-444455556666 finished at 2026-11-27T10:00:01Z: ok"
    two = "Build 9e8d7c6b-aaaa-bbbb-cccc-ddddeeeeffff finished at 2026-11-27T10:05:09Z: ok"
    assert M.marker("t", one) == M.marker("t", two)
    assert M.marker("t", {"log": one}) == M.marker("t", {"log": two})
    assert M.marker("t", one) != M.marker("t", one.replace("ok", "failed"))


def test_json_string_outcome_equals_parsed() -> None:
    assert M.marker("t", '{"b": 1, "a": [1, 2]}') == M.marker("t", {"a": [1, 2], "b": 1})


def test_redacted_before_hashing_pseudonyms_kept_apart() -> None:
    # Masked values collapse; the marker never depends on a masked secret.
    assert M.marker("t", {"token": "a"}) == M.marker("t", {"token": "b"})
    assert M.marker("t", "hello bob@example.com") == M.marker("t", "hello eve@example.com")


def test_marker_by_source_is_the_marker_of_the_value() -> None:
    """An outcome read from bytes gets the marker its value would get, once computed
    per tool and bytes (the bytes stand for the value they parse to)."""
    markers = ProgressMarkers(LOOP, Redactor(RedactionConfig(), key=b"k"))
    cases = [
        ("lookup", b'{"status": "ok", "request_id": "r1", "email": "bob@example.com"}'),
        ("poll", b'{"job": {"status": "running"}}'),
        ("lookup", b"plain text answer 2026-01-01T00:00:00Z"),
    ]
    for tool, raw in cases:
        value = loads_json(raw) if raw.startswith(b"{") else raw.decode()
        expected = M.marker(tool, value)
        assert markers.marker(tool, value, source=raw) == expected
        assert markers.marker(tool, value, source=raw) == expected  # from the cache
    assert len(markers._by_source) == len(cases)
    # The same bytes under another tool (another pointer, another profile): its own.
    assert markers.marker("poll", None, source=cases[1][1]) == "ptr:running"
    assert markers.marker("lookup", None, source=cases[1][1]).startswith("h:")
    # An explicit marker still wins; a large source is not kept.
    assert markers.marker("lookup", None, "v2", source=cases[0][1]) == "v2"
    big = b'{"a": "' + b"x" * 4096 + b'"}'
    markers.marker("lookup", loads_json(big), source=big)
    assert ("lookup", big) not in markers._by_source


def test_answers_differing_only_in_a_wide_integer_are_progress() -> None:
    # A balance in wei past 2**64: parsed as floats, both answers would be one value
    # and the second would look like no progress.
    answers = [b'{"balance": 100000000000000000000}', b'{"balance": 100000000000000000001}']
    markers = ProgressMarkers(LOOP, Redactor(RedactionConfig(), key=b"k"))
    seen = {markers.marker("balance", loads_json(raw), source=raw) for raw in answers}
    assert len(seen) == 2
