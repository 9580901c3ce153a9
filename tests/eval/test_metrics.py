"""pass@k against its definition (enumerating every k-subset), k values, length statistics."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from megatron_opd.eval.metrics import k_values, length_stats, pass_at_k
from tests.tolerance import ulps


def pass_at_k_by_enumeration(n: int, c: int, k: int) -> Fraction:
    """The share of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_subset_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            # float64 product of up to n factors of size ≤ 1 against the exact fraction: 2 ulps per factor
            tol = ulps(torch.float64, 1.0, 2 * n)
            assert pass_at_k(n, c, k) == pytest.approx(float(pass_at_k_by_enumeration(n, c, k)), abs=tol)


def test_pass_at_k_special_cases() -> None:
    assert pass_at_k(32, 8, 1) == pytest.approx(8 / 32)  # pass@1 is the mean accuracy
    assert pass_at_k(32, 0, 32) == 0.0
    assert pass_at_k(32, 1, 32) == 1.0
    assert pass_at_k(1000, 1, 10) == pytest.approx(10 / 1000)  # large n stays exact (no huge binomials)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="need 0 <= c <= n and 1 <= k <= n"):
        pass_at_k(n, c, k)


def test_k_values() -> None:
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(6) == [1, 2, 4, 6]
    assert k_values(32) == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ValueError):
        k_values(0)


def test_length_stats() -> None:
    # population variance (9 + 4 + 1 + 36) / 4 = 12.5; its float64 square root within two roundings
    std = pytest.approx(math.sqrt(12.5), abs=ulps(torch.float64, math.sqrt(12.5), 2))
    assert length_stats([1, 2, 3, 10]) == {"mean": 4.0, "std": std, "min": 1.0, "median": 2.5, "max": 10.0}
