"""The in-process overhead benchmark still runs (no figures asserted: speed lives in
benchmarks, never in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_overhead_runs_every_target_through_the_real_apps() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_overhead.py", "--requests", "320", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"bare", "loopguard", "loopguard-no-records"}
    assert all(float(cpu) > 0 for cpu, _ in rows.values())
