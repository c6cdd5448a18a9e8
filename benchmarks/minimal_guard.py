"""The least per-call work a guard of loopguard's design does, hand-written: a bound.

``bench_proxy.py``'s ``floor-guard-minimum`` target runs the floor passthrough with this
added, to show what any Python guard on this stack can reach at best, and so which
share of loopguard's cost is the work itself and which is loopguard's way of doing it.

Per call it does only what the design cannot skip (docs/architecture.md), each step
with the fastest means at hand and none of loopguard's structure:

- parse the JSON body (orjson);
- redact every value with loopguard's own ``Redactor`` (the default policy; a scrub
  policy is a specification, not an implementation choice) and hash the canonical
  redacted parameters (orjson with sorted keys, xxh3_128);
- look the session's window up and apply the simplest stall rule (the same call with
  the same outcome three times in a row), in a plain dict with no bound or expiry;
- after the answer: parse it and hash it as the progress marker (no volatile-field
  stripping), append the step;
- write one durable JSON record line (a dozen fields, the session id hashed) with one
  ``os.write``.

What it leaves out that loopguard does: spans and metrics, the other stall rules and
their stop answers, limits and bounds (sessions, bodies, nesting), the Redis store,
failure stages, the last-byte hold and streaming observers, routing and adapters for
other protocols. So it is a lower bound on the cost, not a rival implementation.
"""

from __future__ import annotations

import os
import time

import orjson
import xxhash

from guard.engine.config import RedactionConfig
from guard.engine.redact import Redactor

REPEATS_TO_STOP = 3


class MinimalGuard:
    def __init__(self, records_path: str) -> None:
        key = b"minimal-guard-benchmark-key"
        self.redactor = Redactor(RedactionConfig(), key=key, hashing=True)
        self.policy = self.redactor.policy_id
        # session -> its steps as (tool, params hash, progress marker)
        self.sessions: dict[str, list[tuple[str, str, str]]] = {}
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self.records = os.open(records_path, flags, 0o600) if records_path else -1

    def admit(self, tool: str, session: str, body: bytes) -> tuple[str, str, str, float] | None:
        """The call to forward, or None when it is a stalled repeat (not forwarded)."""
        redacted = self.redactor.redact(orjson.loads(body))
        params_hash = xxhash.xxh3_128_hexdigest(orjson.dumps(redacted, option=orjson.OPT_SORT_KEYS))
        window = self.sessions.get(session)
        if window is not None and len(window) >= REPEATS_TO_STOP:
            last = window[-REPEATS_TO_STOP:]
            same_call = all(step[0] == tool and step[1] == params_hash for step in last)
            if same_call and len({step[2] for step in last}) == 1:
                return None
        return (tool, session, params_hash, time.monotonic())

    def settle(self, call: tuple[str, str, str, float], status: int, answer: bytes) -> None:
        tool, session, params_hash, started = call
        outcome = orjson.dumps(orjson.loads(answer), option=orjson.OPT_SORT_KEYS) if answer else b""
        marker = xxhash.xxh3_64_hexdigest(outcome)
        self.sessions.setdefault(session, []).append((tool, params_hash, marker))
        if self.records < 0:
            return
        record = {
            "ts": time.time(),
            "route": "tools",
            "tool": tool,
            "session": xxhash.xxh3_64_hexdigest(session.encode()),
            "params_hash": params_hash,
            "policy": self.policy,
            "progress_marker": marker,
            "verdict": "allow",
            "status": status,
            "outcome": "ok" if status < 400 else "error",
            "latency_ms": round((time.monotonic() - started) * 1000, 3),
            "request_bytes": 0,
            "response_bytes": len(answer),
        }
        os.write(self.records, orjson.dumps(record) + b"\n")
