"""The benchmark's hand-written minimum guard does the work it claims to bound: it
stops a stalled repeat, lets progress through, and records without raw values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from minimal_guard import REPEATS_TO_STOP, MinimalGuard

CANARY_EMAIL = "canary-7f3a@example.com"
CANARY_SESSION = "session-canary-91c2"


def _call(guard: MinimalGuard, answer: bytes, session: str = CANARY_SESSION) -> bool:
    body = json.dumps({"order_id": "A1", "contact": CANARY_EMAIL}).encode()
    call = guard.admit("lookup", session, body)
    if call is None:
        return False
    guard.settle(call, 200, answer)
    return True


def test_the_same_call_with_the_same_answer_is_stopped_after_the_repeats(tmp_path: Path) -> None:
    guard = MinimalGuard(str(tmp_path / "records.jsonl"))
    assert all(_call(guard, b'{"status":"in transit"}') for _ in range(REPEATS_TO_STOP))
    assert not _call(guard, b'{"status":"in transit"}')
    assert _call(guard, b"{}", session="another session")


def test_a_changing_answer_is_progress_and_is_not_stopped(tmp_path: Path) -> None:
    guard = MinimalGuard(str(tmp_path / "records.jsonl"))
    assert all(_call(guard, b'{"scan":%d}' % n) for n in range(REPEATS_TO_STOP + 2))


def test_records_carry_hashes_not_the_raw_values(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    guard = MinimalGuard(str(path))
    _call(guard, b'{"status":"ok"}')
    text = path.read_text()
    record = json.loads(text)
    assert record["tool"] == "lookup" and len(record["params_hash"]) == 32
    assert CANARY_EMAIL not in text and CANARY_SESSION not in text
