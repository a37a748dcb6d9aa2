"""Pure statistics for the benchmarks: medians, percentiles, ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not within 0..100")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    rank = (len(s) - 1) * p / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def ratio(value: float, baseline: float) -> float | None:
    """value / baseline; None when the baseline is zero (nothing to compare with)."""
    if baseline == 0:
        return None
    return value / baseline


def throughput(size_bytes: int, seconds: float) -> float:
    """MiB/s."""
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return size_bytes / seconds / (1024 * 1024)
