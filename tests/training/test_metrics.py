"""The report statistics in training/metrics.py against their textbook definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from steerprune.training.metrics import binomial_ci, mcnemar_p, paired_diff_ci


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_wilson_interval_matches_the_formula():
    for k, n in [(30, 36), (1, 10), (9, 10), (732, 1000)]:
        np.testing.assert_allclose(binomial_ci(k, n), _wilson(k, n), rtol=1e-9, atol=1e-12)
    assert binomial_ci(0, 10)[0] == 0.0 and binomial_ci(10, 10)[1] == 1.0
    lo95, hi95 = binomial_ci(50, 100)
    lo99, hi99 = binomial_ci(50, 100, confidence=0.99)
    assert lo99 < lo95 < 0.5 < hi95 < hi99
    assert all(math.isnan(v) for v in binomial_ci(0, 0))


def test_exact_mcnemar_is_the_two_sided_binomial_tail():
    def exact(b, c):
        n = b + c
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)

    for b, c in [(3, 10), (10, 3), (0, 6), (5, 5), (40, 61), (1, 0)]:
        assert mcnemar_p(b, c) == pytest.approx(exact(b, c), rel=1e-9)
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 6) < 0.05 < mcnemar_p(1, 5)


def test_paired_bootstrap_interval_covers_the_difference_at_the_binomial_width():
    rng = np.random.default_rng(0)
    n = 2000
    b = rng.random(n) < 0.7
    flip = rng.random(n) < 0.1  # a tenth of the images change outcome, mostly for the better
    a = np.where(flip, rng.random(n) < 0.8, b)
    d = a.mean() - b.mean()
    lo, hi = paired_diff_ci(a, b, n_resamples=1999)
    assert lo < d < hi
    # the paired standard error of a mean of (a - b) in {-1, 0, 1}
    se = (a.astype(float) - b).std(ddof=1) / math.sqrt(n)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert paired_diff_ci(a, b, n_resamples=1999) == (lo, hi)  # seeded
    assert paired_diff_ci(b, b) == (0.0, 0.0)
