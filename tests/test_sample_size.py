"""The DIM sample-size estimate against Monte Carlo truth on Gaussian classes whose mean difference is known."""

from __future__ import annotations

import math

import pytest
import torch

from featsteer.directions import sample_size, sample_size_table
from featsteer.errors import FeatsteerError

D = 128
SCALES = torch.linspace(0.3, 1.2, D)  # anisotropic: the noise is not spread evenly


def _draw(n: int, shift: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, D, generator=generator, dtype=torch.float64) * SCALES.double() + shift


def _mu(length: float) -> torch.Tensor:
    mu = torch.zeros(D, dtype=torch.float64)
    mu[:4] = length / 2  # |mu| = length
    return mu


def _monte_carlo_cosine(n: int, mu: torch.Tensor, generator: torch.Generator, trials: int = 300) -> float:
    total = 0.0
    for _ in range(trials):
        d = _draw(n, mu, generator).mean(0) - _draw(n, torch.zeros(D, dtype=torch.float64), generator).mean(0)
        total += float(d @ mu / (d.norm() * mu.norm()))
    return total / trials


@pytest.mark.parametrize("n", [32, 128, 512])
def test_expected_cosine_and_split_half_match_monte_carlo(n):
    """Each estimate is itself a sample (at n = 32 here its sd is about 0.08), so the mean of 12 is held to the truth."""
    generator = torch.Generator().manual_seed(n)
    mu = _mu(1.5)
    estimates = [sample_size(_draw(n, mu, generator), _draw(n, torch.zeros(D, dtype=torch.float64), generator), hook="h", draws=16)
                 for _ in range(12)]
    truth = _monte_carlo_cosine(n, mu, generator)
    assert sum(e.cosine for e in estimates) / 12 == pytest.approx(truth, abs=0.05 if n == 32 else 0.015)
    assert sum(e.split_half - e.split_half_predicted for e in estimates) / 12 == pytest.approx(0.0, abs=0.02)
    spread2 = 2 * float((SCALES.double() ** 2).sum())  # tr S_harmful + tr S_harmless
    assert all(e.spread == pytest.approx(math.sqrt(spread2), rel=0.08) for e in estimates)
    assert sum(e.signal for e in estimates) / 12 == pytest.approx(1.5, abs=0.15)


def test_prompts_needed_reach_the_target_cosine():
    generator = torch.Generator().manual_seed(7)
    mu = _mu(2.0)
    est = sample_size(_draw(2000, mu, generator), _draw(2000, torch.zeros(D, dtype=torch.float64), generator), draws=0)
    assert est.split_half is None and list(est.needed) == [0.9, 0.95, 0.99]
    n90, n95 = math.ceil(est.needed[0.9]), math.ceil(est.needed[0.95])
    assert n90 < n95 < est.needed[0.99]
    assert _monte_carlo_cosine(n90, mu, generator) == pytest.approx(0.9, abs=0.03)
    assert _monte_carlo_cosine(n95, mu, generator) == pytest.approx(0.95, abs=0.02)
    assert all(est.cosine_at(n) == pytest.approx(c, abs=1e-9) for c, n in est.needed.items())  # the counts invert the cosine
    assert est.cosine_at(2000) == pytest.approx(est.cosine, abs=1e-12)


def test_no_signal_gives_no_finite_count():
    generator = torch.Generator().manual_seed(3)
    zero = torch.zeros(D, dtype=torch.float64)
    est = sample_size(_draw(40, zero, generator), _draw(40, zero, generator), hook="blocks.0.hook_resid_pre", draws=8)
    assert est.signal < 0.5 and est.cosine < 0.6
    constant = torch.ones(6, D)  # every prompt's activation the same: the first layer at a template token
    flat = sample_size(constant, constant.clone(), hook="blocks.0.hook_resid_pre", draws=4)
    assert flat.signal == 0 and flat.cosine == 0 and all(math.isinf(v) for v in flat.needed.values())
    assert "cannot be told apart" in flat.line() and flat.to_dict()["needed"] == {"0.9": None, "0.95": None, "0.99": None}
    table = sample_size_table([flat, est], chosen=est.hook)
    assert table.count("\n") == 4 and "| - | - | - |" in table


def test_bad_activations_are_one_line_errors():
    ok = torch.randn(8, D)
    with pytest.raises(FeatsteerError, match="at least 4 harmful prompts"):
        sample_size(ok[:3], ok)
    with pytest.raises(FeatsteerError, match="width 128 but the harmless ones 64"):
        sample_size(ok, ok[:, :64])
    bad = ok.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(FeatsteerError, match="harmless activations contain NaN"):
        sample_size(ok, bad)
    with pytest.raises(FeatsteerError, match="strictly between 0 and 1"):
        sample_size(ok, ok, targets=(0.9, 1.0))
