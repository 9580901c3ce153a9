"""Sampling metrics: avg@n, the unbiased pass@k estimator, response-length statistics."""

from __future__ import annotations

import math
import statistics


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from ``n`` samples of which ``c`` are correct (Chen et al.
    2021): ``1 - C(n-c, k) / C(n, k)``, the probability that ``k`` samples drawn without replacement
    from the ``n`` include a correct one; computed as a product to stay exact for large ``n``."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): need 0 <= c <= n and 1 <= k <= n.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def k_values(n: int) -> list[int]:
    """The k of pass@k reported for ``n`` samples: the powers of two up to ``n``, and ``n``."""
    if n < 1:
        raise ValueError(f"k_values(n={n}): n must be >= 1.")
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def length_stats(lengths: list[int]) -> dict[str, float]:
    """Mean, population std, min, median and max of response lengths (tokens)."""
    if not lengths:
        raise ValueError("length_stats: no lengths.")
    return {
        "mean": statistics.fmean(lengths),
        "std": statistics.pstdev(lengths),
        "min": float(min(lengths)),
        "median": float(statistics.median(lengths)),
        "max": float(max(lengths)),
    }
