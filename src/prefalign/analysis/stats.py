"""Small statistics for run comparison: the Wilson score interval and summaries of logged series."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

# Two-sided 95%: the 0.975 quantile of the standard normal.
Z95 = 1.959963984540054


def finite(value) -> float | None:
    """`value` as a float when it is a finite real number (not a bool); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion; None when n = 0 (no information).

    With p = k/n:  (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n), exactly 0 at k = 0 and 1 at k = n.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds, not rounding residue
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def quantile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
