"""Paired comparisons of two methods on the same prompts: McNemar's exact test and the paired bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from featsteer.errors import FeatsteerError
from featsteer.evaluation.paired import mcnemar_exact_p, paired_mean_difference, paired_rates


def test_mcnemar_exact_p_is_the_doubled_binomial_tail():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)
    # against scipy's exact binomial test, which is what McNemar's exact test is
    from scipy.stats import binomtest

    for a, b in [(2, 11), (7, 3), (0, 14), (20, 31)]:
        assert mcnemar_exact_p(a, b) == pytest.approx(binomtest(a, a + b, 0.5).pvalue, rel=1e-9)


def test_paired_rates_counts_only_the_discordant_prompts():
    base = [True] * 40 + [False] * 60
    same_rate_other_prompts = [False] * 10 + [True] * 30 + [True] * 10 + [False] * 50
    result = paired_rates(base, same_rate_other_prompts)
    assert (result.k_a, result.k_b, result.only_a, result.only_b) == (40, 40, 10, 10)
    assert result.difference == 0 and result.p_value == 1.0
    fewer = [False] * 12 + [True] * 28 + [False] * 60
    result = paired_rates(base, fewer)
    assert (result.only_a, result.only_b) == (12, 0) and result.difference == pytest.approx(-0.12)
    assert result.p_value == pytest.approx(2 / 2**12) and result.to_dict()["difference"] == pytest.approx(-0.12)
    with pytest.raises(FeatsteerError, match="same non-empty prompts"):
        paired_rates([True], [True, False])


def test_paired_bootstrap_interval_covers_the_shift_and_is_reproducible():
    rng = np.random.default_rng(1)
    a = rng.gamma(2.0, 0.05, size=200)
    b = a + 0.02 + rng.normal(0, 0.01, size=200)  # a shift far smaller than the spread of either
    result = paired_mean_difference(a, b)
    assert result.low < 0.02 < result.high and result.high - result.low < 0.01
    assert result.difference == pytest.approx(float((b - a).mean()))
    assert paired_mean_difference(a, b) == result  # seeded
    assert paired_mean_difference(a, a).high == 0.0
    with pytest.raises(FeatsteerError, match="NaN or inf"):
        paired_mean_difference([0.1, math.inf], [0.1, 0.2])
