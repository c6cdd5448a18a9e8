"""Timing helpers: nearest-rank percentiles and post-first-token throughput."""

from __future__ import annotations

import math
from collections.abc import Iterable


class MalformedTiming(ValueError):
    """A multi-token response whose total time is not after its first token."""


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of values <= it.

    ``q`` in 0..100; q=0 gives the minimum, q=100 the maximum. No interpolation: the
    answer is always one of the observed values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def output_throughput(output_tokens: int | None, total_s: float, ttft_s: float) -> float:
    """Tokens per second after the first: (output_tokens - 1) / (total - ttft).

    0.0 for at most one token (there is no "after the first"). A multi-token response
    with ``total <= ttft`` is malformed timing and raises, never a fallback denominator.
    """
    if output_tokens is None or output_tokens <= 1:
        return 0.0
    span = total_s - ttft_s
    if span <= 0:
        raise MalformedTiming(
            f"{output_tokens} output tokens but total {total_s:.6f}s <= ttft {ttft_s:.6f}s"
        )
    return (output_tokens - 1) / span


__all__ = ["MalformedTiming", "output_throughput", "percentile"]
