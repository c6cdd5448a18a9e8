"""The benchmarks still run (no figures asserted: speed lives in benchmarks, never in
tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``benchmarks/<script> args...`` from the repository root, its output captured;
    it must exit 0."""
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_bench_overhead_runs_every_target_through_the_real_apps() -> None:
    result = run_benchmark("bench_overhead.py", "--requests", "320", "--rounds", "1", timeout=120)
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"floor", "loopguard", "loopguard-no-records"}
    assert all(float(cpu) > 0 for cpu, _ in rows.values())


def test_bench_proxy_runs_the_floors_loopguard_and_litellm_when_installed() -> None:
    """Real processes and load, one second each; LiteLLM is a target only where
    ``litellm[proxy]`` is installed, and says so when it is not."""
    result = run_benchmark(
        "bench_proxy.py",
        *("--duration", "1", "--only", "floor,floor-guard-minimum,loopguard-openai,litellm"),
        timeout=240,
    )
    assert "wrk reported errors" not in result.stderr
    assert "non-200" not in result.stderr
    rows = {
        (line.split()[0], line.split()[1]): float(line.split()[2])
        for line in result.stdout.splitlines()
        if line.split()[:1]
        in (["floor"], ["floor-guard-minimum"], ["loopguard-openai"], ["litellm"])
        and len(line.split()) == 6
    }
    for target in ("floor", "floor-guard-minimum", "loopguard-openai"):
        assert rows[(target, "1")] > 0 and rows[(target, "16")] > 0
    if "litellm: skipped (needs litellm[proxy])" in result.stdout:
        assert ("litellm", "16") not in rows
    else:
        assert rows[("litellm", "16")] > 0
        assert "loopguard-openai: " in result.stdout and "of litellm at c=16" in result.stdout


def test_bench_ttft_times_all_three_paths_paced_and_in_a_burst() -> None:
    """The TTFT benchmark's three processes and its client, on a few short streams."""
    for pacing in ("0", "1"):
        result = run_benchmark(
            "bench_ttft.py",
            *("--requests", "6", "--warmup", "1", "--chunks", "5"),
            *("--first-delay-ms", "2", "--chunk-delay-ms", pacing),
            timeout=120,
        )
        rows = {
            line.split()[0]: line.split()[1:]
            for line in result.stdout.splitlines()
            if line.split()[:1] in (["direct"], ["bare"], ["loopguard"])
        }
        assert set(rows) == {"direct", "bare", "loopguard"}
        # The injected first delay is in every path's TTFT, and the other four chunks
        # follow at the pace asked for (half of each: timers may fire a little early).
        assert all(float(cells[0].removesuffix("ms")) >= 1.0 for cells in rows.values())
        paced = (2.0 + 4 * float(pacing)) / 2
        assert all(float(cells[2].removesuffix("ms")) >= paced for cells in rows.values())
        assert f"then every {float(pacing)} ms" in result.stdout
