"""``loopguard report`` at scale: N realistic records, timed beside the bare engine.

    python benchmarks/bench_report.py            # 1,000,000 records (~850 MB)
    python benchmarks/bench_report.py -n 2000    # smoke

It writes N record lines shaped like ``guard.telemetry.records.record_fields`` writes them (every
field, an ``app`` map on most calls) to a temp file, then times, each in a child process
so peak RSS is that process's own (``resource.getrusage(RUSAGE_CHILDREN)``):

- ``loopguard report --json FILE`` (the whole report: windows, findings, exemplars);
- the bare engine: DuckDB's plain ``COUNT(*) ... GROUP BY`` 5-minute windows on the file;
- a plain orjson loop that only parses every line.

Run it from the repository root (``guard`` is imported from the working tree).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

START = datetime(2026, 5, 27, 9, 0, tzinfo=UTC)
TOOLS = ("lookup_tracking", "search_orders", "refund", "poll_job")
TEMPLATES = ("tracking-answerer-v1", "tracking-answerer-v1.1-regression")


def record(i: int, rng: random.Random, span_s: float) -> dict[str, object]:
    """One record with every ``RECORD_FIELDS`` key, in that order, values like real ones:
    about half model calls (streamed, tokens, the app's decision headers) and half tool
    calls (a params hash, a progress marker, no tokens), 2% of tool calls stopped."""
    ts = START + timedelta(seconds=span_s * i)
    model_call = rng.random() < 0.5
    stalled = not model_call and rng.random() < 0.02
    nudged = model_call and rng.random() < 0.02
    route = "stop_and_review" if stalled else ("nudge" if nudged else "serve")
    session = f"s_{rng.getrandbits(128) if rng.random() < 0.3 else i // 8:032x}"
    app: dict[str, str] = {}
    if model_call and rng.random() < 0.9:
        unsafe = rng.random() < 0.001
        app = {
            "route": "abstain" if rng.random() < 0.1 else "serve",
            "unsafe_claim_served": "true" if unsafe else "false",
            "template": rng.choice(TEMPLATES),
            "evidence_version": "fastship@v17",
        }
        if unsafe:
            app["failure_stage"] = "serving_gate"
    out = rng.randint(5, 400) if model_call else None
    inp = rng.randint(100, 4000) if model_call else None
    ttft = round(rng.uniform(80, 600), 3) if model_call else None
    total = (
        round(ttft + out * rng.uniform(5, 12), 3) if ttft and out else round(rng.uniform(1, 90), 3)
    )
    return {
        "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "event": "call",
        "request_id": f"{rng.getrandbits(128):032x}",
        "trace_id": f"{rng.getrandbits(128):032x}",
        "span_id": f"{rng.getrandbits(64):016x}",
        "session": session,
        "session_tracked": True,
        "conversation_id": f"conv_{rng.getrandbits(128):032x}" if model_call else None,
        "route": route,
        "failure_stage": "loop_guard" if stalled else "passed",
        "error_type": None,
        "status_code": 422 if stalled else 200,
        "operation": "chat" if model_call else "execute_tool",
        "tool": None if model_call else rng.choice(TOOLS),
        "model": "gpt-4o-mini-2024-07-18" if model_call else None,
        "response_model": "gpt-4o-mini-2024-07-18" if model_call else None,
        "response_id": f"chatcmpl-{rng.getrandbits(96):024x}" if model_call else None,
        "provider": "openai" if model_call else None,
        "mcp_method": None,
        "params_hash": None if model_call else f"{rng.getrandbits(32) % 64:032x}",
        "progress_marker": None if model_call else f"h:{rng.getrandbits(64):016x}",
        "repeat_count": 3 if stalled else None,
        "stall_rule": "stalled_repeat" if stalled else None,
        "stream": True if model_call else None,
        "finish_reasons": ["stop"] if model_call else [],
        "input_tokens": inp,
        "output_tokens": out,
        "cached_input_tokens": inp // 2 if inp else None,
        "usage_source": "response" if model_call else "absent",
        "ttft_ms": ttft,
        "total_ms": total,
        "output_tps": round(rng.uniform(60, 200), 3) if model_call else None,
        "output_chunks": out or 0,
        "timing_malformed": False,
        "app": app,
        "scrub_policy": "default-v1",
    }


def generate(path: Path, n: int, seed: int = 7) -> None:
    """N records over one day (so 5-minute windows: 288 of them)."""
    rng = random.Random(seed)
    span_s = 86_400 / max(n, 1)
    with path.open("wb") as out:
        buf: list[bytes] = []
        for i in range(n):
            buf.append(orjson.dumps(record(i, rng, span_s)))
            if len(buf) >= 10_000:
                out.write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            out.write(b"\n".join(buf) + b"\n")


POLICY = """\
[monitor]
policy_id = "bench"
window = "5m"
max_unsafe_serves = 0
max_p95_ttft_ms = 500
max_window_cost_usd = 0.002

[[rate_cards]]
version = "bench-card"
models = ["*"]
input_per_million = 1.00
cached_input_per_million = 0.10
output_per_million = 5.00
"""

_ENGINE = """
import sys, duckdb
con = duckdb.connect()
rows = con.execute(
    "SELECT time_bucket(INTERVAL 5 MINUTE, CAST(ts AS TIMESTAMP)) AS w, count(*) "
    "FROM read_json(?, format='newline_delimited', columns={'ts': 'VARCHAR'}) GROUP BY w",
    [sys.argv[1]],
).fetchall()
print(len(rows))
"""

_ORJSON = """
import sys, orjson
n = 0
with open(sys.argv[1], 'rb') as f:
    for line in f:
        orjson.loads(line)
        n += 1
print(n)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="records (default 1,000,000)")
    parser.add_argument("--keep", help="write the records here and keep them")
    parser.add_argument("--records", help="time this existing record file instead")
    parser.add_argument("--policy", help="policy TOML (default: the issue's, one catch-all card)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.records:
            path = Path(args.records)
            print(f"{path}: {path.stat().st_size / 1e6:,.0f} MB")
        else:
            path = Path(args.keep) if args.keep else Path(tmp) / "records.jsonl"
            t0 = time.perf_counter()
            generate(path, args.n)
            size_mb = path.stat().st_size / 1e6
            took = time.perf_counter() - t0
            print(f"{args.n:,} records, {size_mb:,.0f} MB, generated in {took:.1f}s")
        py = sys.executable
        policy_path = Path(args.policy) if args.policy else Path(tmp) / "policy.toml"
        if not args.policy:
            policy_path.write_text(POLICY)
        policy = ["--policy", str(policy_path)]
        results = {}
        # Each in a fresh child of its own probe process, so each peak RSS is that
        # command's alone (RUSAGE_CHILDREN keeps the maximum over all children).
        for name, cmd in (
            ("report", [py, "-m", "guard.cli", "report", "--json", str(path), *policy]),
            ("duckdb", [py, "-c", _ENGINE, str(path)]),
            ("orjson", [py, "-c", _ORJSON, str(path)]),
        ):
            results[name] = _isolated(cmd)
        report_s, report_mb = results["report"]
        for name, (wall, mb) in results.items():
            print(
                f"{name:>7}: {wall:6.2f}s  peak RSS {mb:6.0f} MB"
                + (
                    ""
                    if name == "report"
                    else f"  (report: {report_s / wall:4.2f}x its time, "
                    f"{report_mb / mb:4.2f}x its memory)"
                )
            )
    return 0


def _isolated(cmd: list[str]) -> tuple[float, float]:
    """Time ``cmd`` in a child that reports its own RUSAGE_CHILDREN (its one child's peak)."""
    probe = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True)\n"
        "w = time.perf_counter() - t\n"
        "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps([w, r, p.returncode, p.stderr.decode()[-2000:]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *cmd], capture_output=True, check=True, env=os.environ
    )
    wall, mb, rc, err = orjson.loads(out.stdout)
    if rc not in (0, 2):  # 2: a PAGE fired, still a whole report
        raise SystemExit(f"{cmd[1:4]} failed ({rc}): {err}")
    return wall, mb


if __name__ == "__main__":
    sys.exit(main())
