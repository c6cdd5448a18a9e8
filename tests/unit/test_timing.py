"""Nearest-rank percentiles and post-first-token throughput."""

from __future__ import annotations

import pytest

from guard.engine.timing import MalformedTiming, output_throughput, percentile


def test_nearest_rank() -> None:
    values = [15, 20, 35, 40, 50]
    assert percentile(values, 5) == 15
    assert percentile(values, 30) == 20
    assert percentile(values, 40) == 20
    assert percentile(values, 50) == 35
    assert percentile(values, 100) == 50
    assert percentile(values, 0) == 15
    assert percentile(reversed(values), 95) == 50  # any order, any iterable
    assert percentile([3.5], 99) == 3.5


def test_percentile_errors() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1], 101)
    with pytest.raises(ValueError):
        percentile([1], -1)


def test_output_throughput() -> None:
    assert output_throughput(11, total_s=2.5, ttft_s=0.5) == pytest.approx(5.0)
    assert output_throughput(1, total_s=0.1, ttft_s=0.1) == 0.0
    assert output_throughput(0, total_s=1.0, ttft_s=0.2) == 0.0
    assert output_throughput(None, total_s=1.0, ttft_s=0.2) == 0.0


def test_malformed_timing_is_not_hidden() -> None:
    with pytest.raises(MalformedTiming, match="total"):
        output_throughput(10, total_s=0.5, ttft_s=0.5)
    with pytest.raises(ValueError):  # MalformedTiming is a ValueError
        output_throughput(2, total_s=0.4, ttft_s=0.5)
