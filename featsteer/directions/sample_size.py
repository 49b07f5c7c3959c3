"""How well a difference-in-means direction is estimated from the prompts it was computed from, and how many prompts
a given precision needs.

The DIM direction is the difference of two sample means, so it is the population's mean difference `mu` plus noise
whose expected squared length is `v = tr(S_harmful) / n_harmful + tr(S_harmless) / n_harmless` (`S` the per-class
covariances of the activations). In the many dimensions of a residual stream that noise is nearly orthogonal to `mu`,
so the cosine between the estimate and `mu` is close to

    sqrt(|mu|^2 / (|mu|^2 + v))

and `|mu|^2` itself is estimated without bias by `|d|^2 - v` (`d` the observed difference). With `n` prompts per class
the expected cosine is `sqrt(|mu|^2 / (|mu|^2 + T / n))`, `T = tr(S_harmful) + tr(S_harmless)`, and a target cosine
`c` needs `n = T c^2 / (|mu|^2 (1 - c^2))` prompts per class.

`mu` is the mean difference of the *prompt distributions* the two sets were drawn from: the estimate says how much of
the direction is sampling noise, not whether those prompts are the right ones. The approximation assumes the noise
is spread over many dimensions; a split-half check (the cosine between the DIM directions of two disjoint random
halves of each set, against its predicted value `|mu|^2 / sqrt((|mu|^2 + v_a) (|mu|^2 + v_b))`) shows on the data at
hand whether it holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from featsteer.errors import FeatsteerError

TARGET_COSINES: tuple[float, ...] = (0.9, 0.95, 0.99)
"""The cosines with the many-prompt direction `SampleSize.needed` gives prompt counts for by default."""

MIN_PROMPTS = 4
"""Fewest prompts per class: two per half for the split-half check, and a variance needs two."""


@dataclass(frozen=True)
class SampleSize:
    """How precisely one hook's DIM direction is estimated from its prompts."""

    hook: str
    position: int
    n_harmful: int
    n_harmless: int
    signal: float
    """Estimated length of the population mean difference, `sqrt(max(|d|^2 - v, 0))` (0: the classes' means cannot be
    told apart from noise)."""
    spread: float
    """`sqrt(tr(S_harmful) + tr(S_harmless))`: how far one prompt's activation strays from its class mean, both
    classes together."""
    cosine: float
    """Expected cosine between this direction and the one infinitely many prompts from the same sources would give."""
    needed: dict[float, float] = field(default_factory=dict)
    """Target cosine -> prompts per class that reach it in expectation (`inf` when there is no signal)."""
    split_half: float | None = None
    """Mean cosine between the DIM directions of two disjoint random halves of each set."""
    split_half_predicted: float | None = None
    """What the noise model above predicts for `split_half`; far from it, the estimates are not to be trusted."""

    def cosine_at(self, n: float) -> float:
        """Expected cosine with the many-prompt direction of a DIM direction from `n` prompts per class."""
        return _cosine(self.signal**2, self.spread**2 / n)

    def to_dict(self) -> dict:
        """JSON-ready; a count that no finite number of prompts reaches is None (strict JSON has no infinity)."""
        return {**asdict(self), "needed": {f"{c:g}": n if math.isfinite(n) else None for c, n in self.needed.items()}}

    def line(self) -> str:
        """`from 256 + 256 prompts: expected cosine 0.9930 with ...; cosine 0.9 needs 8, 0.95 needs 18, ... prompts per class`"""
        if self.signal == 0:
            return (f"from {self.n_harmful} + {self.n_harmless} prompts: the class means cannot be told apart from sampling noise; "
                    "no number of such prompts gives a direction")
        needs = ", ".join(f"{c:g} needs {_count(n)}" for c, n in self.needed.items())
        check = ("" if self.split_half is None else
                 f" (split-half cosine {self.split_half:.4f}, predicted {self.split_half_predicted:.4f})")
        return (f"from {self.n_harmful} + {self.n_harmless} prompts: expected cosine {self.cosine:.4f} with the direction of "
                f"infinitely many such prompts{check}; cosine {needs} prompts per class")


def _count(n: float, unreachable: str = "no finite number of") -> str:
    return unreachable if not math.isfinite(n) else str(max(1, math.ceil(n)))


def _cosine(signal2: float, noise2: float) -> float:
    return math.sqrt(signal2 / (signal2 + noise2)) if signal2 > 0 else 0.0


def _trace_variance(x: Tensor) -> float:
    return float(x.var(dim=0, unbiased=True).sum())


def _check(harmful: Tensor, harmless: Tensor) -> None:
    if harmful.dim() != 2 or harmless.dim() != 2:
        raise FeatsteerError(f"expected (prompts, d_model) activations, got shapes {tuple(harmful.shape)} and {tuple(harmless.shape)}")
    if harmful.shape[1] != harmless.shape[1]:
        raise FeatsteerError(f"the harmful activations have width {harmful.shape[1]} but the harmless ones {harmless.shape[1]}")
    for name, x in (("harmful", harmful), ("harmless", harmless)):
        if len(x) < MIN_PROMPTS:
            raise FeatsteerError(f"the sample-size estimate needs at least {MIN_PROMPTS} {name} prompts, got {len(x)}")
        if not bool(torch.isfinite(x).all()):
            raise FeatsteerError(f"the {name} activations contain NaN or inf values: check the model's dtype (try --dtype float32)")


def sample_size(harmful: Tensor, harmless: Tensor, *, hook: str = "", position: int = -1, targets: Sequence[float] = TARGET_COSINES,
                draws: int = 32, seed: int = 0) -> SampleSize:
    """How precisely the DIM direction of `(n_harmful, d)` and `(n_harmless, d)` activations estimates the population's,
    and how many prompts per class each cosine in `targets` needs; with `draws` > 0, the split-half check over that many
    random splits (seeded).

    Raises:
        FeatsteerError: for mismatched or non-finite activations, fewer than `MIN_PROMPTS` prompts per class, or a
            target cosine outside (0, 1).
    """
    _check(harmful, harmless)
    if any(not 0 < c < 1 for c in targets):
        raise FeatsteerError(f"target cosines must lie strictly between 0 and 1, got {list(targets)}")
    x, y = harmful.double(), harmless.double()
    t_x, t_y = _trace_variance(x), _trace_variance(y)
    noise2 = t_x / len(x) + t_y / len(y)
    signal2 = max(float((x.mean(0) - y.mean(0)).square().sum()) - noise2, 0.0)
    spread2 = t_x + t_y
    needed = {float(c): (spread2 * c * c / (signal2 * (1 - c * c)) if signal2 > 0 else math.inf) for c in targets}
    split = predicted = None
    if draws > 0:
        generator = torch.Generator().manual_seed(seed)
        half_x, half_y = len(x) // 2, len(y) // 2
        cosines = []
        for _ in range(draws):
            px, py = torch.randperm(len(x), generator=generator), torch.randperm(len(y), generator=generator)
            a = x[px[:half_x]].mean(0) - y[py[:half_y]].mean(0)
            b = x[px[half_x : 2 * half_x]].mean(0) - y[py[half_y : 2 * half_y]].mean(0)
            norms = float(a.norm() * b.norm())
            cosines.append(float(a @ b) / norms if norms > 0 else 0.0)
        split = sum(cosines) / len(cosines)
        half_noise2 = t_x / half_x + t_y / half_y
        predicted = signal2 / (signal2 + half_noise2) if signal2 > 0 else 0.0
    return SampleSize(hook, position, len(x), len(y), math.sqrt(signal2), math.sqrt(spread2), _cosine(signal2, noise2), needed,
                      split, predicted)


def sample_size_table(rows: Sequence[SampleSize], chosen: str | None = None) -> str:
    """Markdown: one row per hook; `chosen` is marked."""
    targets = list(rows[0].needed) if rows else []
    head = ("| hook | signal | spread | expected cosine | split-half (predicted) | "
            + " | ".join(f"prompts for {c:g}" for c in targets) + " |")
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|" * len(targets)]
    for r in rows:
        name = f"**{r.hook}**" if r.hook == chosen else r.hook
        check = "-" if r.split_half is None else f"{r.split_half:.4f} ({r.split_half_predicted:.4f})"
        lines.append(f"| {name} | {r.signal:.3g} | {r.spread:.3g} | {r.cosine:.4f} | {check} | "
                     + " | ".join(_count(r.needed[c], "-") for c in targets) + " |")
    return "\n".join(lines) + "\n"
