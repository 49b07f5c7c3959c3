"""Paired comparisons: two methods measured on the same prompts.

A refusal rate's Wilson interval answers "how sure is this rate"; it does not answer "is method B really below
method A". With 100 prompts the intervals of 7/100 and 3/100 overlap widely, yet the two methods ran on the very
same prompts, and most prompts get the same verdict from both. A paired test uses that: only the prompts where the
verdicts differ carry evidence. `paired_rates` is McNemar's exact test on those discordant prompts (a binomial test
of "B-only" against "A-only" at one half); `paired_mean_difference` is a bootstrap interval of the mean per-prompt
difference of a continuous metric (first-token KL), resampling prompts so each keeps its pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from featsteer.errors import FeatsteerError


@dataclass(frozen=True)
class PairedRates:
    """Two sets of yes/no verdicts on the same prompts (A is the baseline) and McNemar's exact test."""

    n: int
    """Prompts."""
    k_a: int
    """Verdicts "yes" (e.g. refused) under A."""
    k_b: int
    """Verdicts "yes" under B."""
    only_a: int
    """Prompts "yes" under A but not under B."""
    only_b: int
    """Prompts "yes" under B but not under A."""
    p_value: float
    """Two-sided exact McNemar p-value: the chance of a split of the discordant prompts at least this uneven if
    A and B had the same rate. 1.0 when no prompt is discordant."""

    @property
    def difference(self) -> float:
        """Rate under B minus rate under A."""
        return (self.k_b - self.k_a) / self.n

    def to_dict(self) -> dict:
        """JSON-ready form, with `difference`."""
        return {**asdict(self), "difference": self.difference}


@dataclass(frozen=True)
class PairedMean:
    """Mean per-prompt difference B - A of a continuous metric with a paired bootstrap interval."""

    n: int
    difference: float
    low: float
    high: float
    level: float
    """Coverage of `[low, high]` (0.95 by default)."""
    n_resamples: int

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for `only_a` and `only_b` discordant pairs.

    Under the null each discordant pair falls either way with probability one half, so the smaller count is
    Binomial(only_a + only_b, 1/2); the p-value doubles its lower tail (capped at 1).
    """
    if only_a < 0 or only_b < 0:
        raise FeatsteerError(f"discordant counts must be non-negative, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2.0 * tail / 2**n)


def paired_rates(a: Sequence[bool], b: Sequence[bool]) -> PairedRates:
    """McNemar's exact test of verdicts `b` against baseline verdicts `a` on the same prompts.

    Raises:
        FeatsteerError: when the two lists differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise FeatsteerError(f"paired verdicts need the same non-empty prompts: got {len(a)} and {len(b)} verdicts")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    return PairedRates(n=len(a), k_a=sum(map(bool, a)), k_b=sum(map(bool, b)), only_a=only_a, only_b=only_b,
                       p_value=mcnemar_exact_p(only_a, only_b))


def paired_mean_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, n_resamples: int = 10_000,
                           seed: int = 0) -> PairedMean:
    """Mean of `b[i] - a[i]` with a percentile bootstrap interval over prompts (seeded, so reports reproduce).

    Raises:
        FeatsteerError: different lengths, no prompts, non-finite values, or a level outside (0, 1).
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise FeatsteerError(f"paired values need the same non-empty prompts: got {x.size} and {y.size} values")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise FeatsteerError("paired values contain NaN or inf: a method's first-token KL is infinite on some prompt")
    if not 0.0 < level < 1.0 or n_resamples < 1:
        raise FeatsteerError(f"need 0 < level < 1 and n_resamples >= 1, got {level} and {n_resamples}")
    diff = y - x
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_resamples, diff.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return PairedMean(n=int(diff.size), difference=float(diff.mean()), low=float(low), high=float(high), level=level,
                      n_resamples=n_resamples)
