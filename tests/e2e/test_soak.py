"""The soak script still runs end to end, small (no figures asserted: it is the
script's own verdict, zero 5xx of loopguard's and bounded RSS, that is checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_script_passes_on_a_small_mix() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--requests", "500", "--concurrency", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "PASS"
    counts = {" ".join(line.split()[:-1]): line.split()[-1] for line in lines[1:-1]}
    assert int(counts["413"]) > 0 and int(counts["422"]) > 0
    assert counts["loopguard own other 5xx"] == "0"
