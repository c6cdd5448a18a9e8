"""``benchmarks/bench_report.py`` still runs (no figures asserted: speed lives in the
benchmark, never in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_report_runs_the_report_the_engine_and_the_parse_loop() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_report.py", "-n", "2000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("2,000 records")
    rows = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert set(rows) == {"report", "duckdb", "orjson"}
    assert all("peak RSS" in row for row in rows.values())
