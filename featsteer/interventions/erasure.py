"""LEACE concept erasure (Belrose et al. 2023) of harmful vs harmless, fitted per hook and position.

For a binary concept the least-squares linear eraser has a closed form. With `delta` the difference of the class
means (harmful minus harmless), `mu` the pooled mean and `Sigma` the pooled covariance of the activations,

    x' = x - delta * v . (x - mu),    v = Sigma^-1 delta / (delta . Sigma^-1 delta).

`v` is the whitened (LDA) probe direction scaled so that `v . delta = 1`, so the eraser removes, along the
mean difference, exactly the amount the whitened probe reads. It is an oblique projection (idempotent; it reads
`v` and writes `delta`): after it the two class means coincide, so no linear classifier beats a constant one on the
fitted activations, and among all affine erasers with that property it moves the activations least. DIM
ablation (`x - r r.x` with `r` the unit mean difference) also equalises the class means, but moves `x` along `r` by
whatever `x` has there, class-related or not; LEACE moves it only by what predicts the class.

`Erase` applies one eraser per (hook, position) to the prompt pass, at the positions it was fitted at, and leaves
generated tokens alone: the eraser was fitted on the prompt's template tokens and its centring means nothing elsewhere.
Positions are found in each prompt the way `capture` found them in the fitted ones: `last` and `mean_last:K` count from
the end of the prompt; a `post_instruction` eraser acts at its offset from the end only in prompts that have that many
tokens after the instruction (a prompt whose last characters merge with the template's first token, such as one ending
in a space before a plain-text template, has one fewer, and that token, part instruction, is left alone); an
`instruction_end` eraser acts at each prompt's own instruction end, wherever its template tail puts it. A prompt
tokenized with a prefill (`tokenize(prefill=...)`, the start of the response written for the model) ends in the
prefill's tokens, which no eraser was fitted on: the other positions count from the end of the template's tail, before
them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from jaxtyping import Float
from torch import Tensor

from featsteer.activations import ActivationSet
from featsteer.activations.positions import Positions
from featsteer.errors import FeatsteerError
from featsteer.interventions.operations import working_precision
from featsteer.interventions.positions import PositionTracker
from featsteer.interventions.steering import Intervention, _check_width
from featsteer.models import HookFn, ModelAdapter

logger = logging.getLogger(__name__)

MIN_ROWS = 4
"""Fewest activation rows per class a fit accepts."""

TEMPLATE_POSITIONS = ("post_instruction", "instruction_end")
"""Position selectors whose rows `Erase` locates from each prompt's own count of tokens after its instruction."""


@dataclass(frozen=True)
class LeaceEraser:
    """`x -> x - direction * reader . (x - mean)` (see the module docstring)."""

    mean: Float[Tensor, " d_model"]
    """Pooled mean of the fitted activations."""
    direction: Float[Tensor, " d_model"]
    """Class-mean difference, harmful minus harmless: what the eraser writes."""
    reader: Float[Tensor, " d_model"]
    """Whitened probe direction with `reader . direction = 1`: what the eraser reads."""
    positions: str | None = None
    """The capture's position selector the fitted rows were read at (`fit_leace_erasers` sets it): how `Erase` finds
    the eraser's token in each prompt (see the module docstring). None: counted from the end of the prompt."""

    def __call__(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        work = x.to(working_precision(x))  # float32 at least, as every operation: the stream keeps its dtype
        mean, direction, reader = (t.to(x.device, work.dtype) for t in (self.mean, self.direction, self.reader))
        return (work - ((work - mean) @ reader)[..., None] * direction).to(x.dtype)

    def to_dict(self) -> dict[str, float]:
        """Summary for reports: the size of the mean difference and of the reader."""
        return {"delta_norm": float(self.direction.norm()), "reader_norm": float(self.reader.norm())}


def fit_leace(harmful: Float[Tensor, "n d_model"], harmless: Float[Tensor, "m d_model"], *, shrinkage: bool = True) -> LeaceEraser | None:
    """Fit the LEACE eraser of the harmful/harmless label from activation rows (float64 internally).

    Args:
        harmful: activations of harmful prompts, one row each.
        harmless: activations of harmless prompts at the same hook and position.
        shrinkage: estimate the covariance with Ledoit-Wolf shrinkage (needed when rows are few against the
            width); False uses the sample covariance (plus a tiny ridge).

    Returns:
        The eraser (float32), or None when the class means coincide (`directions.dim.means_coincide`: nothing to erase,
        e.g. a position every prompt shares at the embedding).

    Raises:
        FeatsteerError: for mismatched widths, too few rows, or NaN/inf activations.
    """
    if harmful.dim() != 2 or harmless.dim() != 2 or harmful.shape[1] != harmless.shape[1]:
        raise FeatsteerError(f"LEACE needs two (rows, d_model) sets of one width, got {tuple(harmful.shape)} and {tuple(harmless.shape)}")
    if min(len(harmful), len(harmless)) < MIN_ROWS:
        raise FeatsteerError(f"LEACE needs at least {MIN_ROWS} rows per class, got {len(harmful)} harmful and {len(harmless)} harmless")
    a, b = harmful.double().cpu(), harmless.double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise FeatsteerError("LEACE got NaN or inf activations: check the model and the capture")
    # imported here: featsteer.directions imports the interventions
    from featsteer.directions.dim import mean_row_norm, means_coincide

    x = torch.cat([a, b])
    mean, delta = x.mean(0), a.mean(0) - b.mean(0)
    if means_coincide(a.mean(0), b.mean(0), mean_row_norm(a, b)):  # the test DIM, SVD and the probes apply, so LEACE erases where they find a direction
        return None
    if shrinkage:
        from sklearn.covariance import LedoitWolf

        covariance = torch.as_tensor(LedoitWolf().fit(x.numpy()).covariance_, dtype=torch.float64)
    else:
        covariance = torch.cov(x.T)
    ridge = 1e-8 * float(covariance.diagonal().mean()) + 1e-30
    reader = torch.linalg.solve(covariance + ridge * torch.eye(len(covariance), dtype=torch.float64), delta)
    reader = reader / (reader @ delta)
    return LeaceEraser(mean.float(), delta.float(), reader.float())


def fit_leace_erasers(harmful: ActivationSet, harmless: ActivationSet, *, shrinkage: bool = True) -> dict[tuple[str, int], LeaceEraser]:
    """One eraser per (hook, position) the two captures share; pairs whose class means coincide are left out.

    A `mean_last:K` capture holds each prompt's mean over its last K tokens; its eraser is keyed to each of those K
    positions, so `Erase` erases every one of them, and their mean is the erased mean (the eraser is affine).

    Raises:
        FeatsteerError: if the captures differ in hooks or positions, a position holds only some prompts (`instruction_end`
            on prompts whose end merged with the template's tail: `Erase` would apply each eraser, fitted on some prompts,
            at its one offset to every prompt), or no pair has a class difference.
    """
    from featsteer.directions.dim import shared_positions  # featsteer.directions imports the interventions

    shared_positions(harmful, harmless)
    if (harmful.hook_names, harmful.position_labels, harmful.positions) != (harmless.hook_names, harmless.position_labels, harmless.positions):
        raise FeatsteerError("LEACE needs harmful and harmless activations captured at the same hooks and positions")
    pooled = harmful.positions.startswith("mean_last")
    window = range(-Positions.parse(harmful.positions).k, 0) if pooled else None  # the tokens a pooled row averages
    erasers = {}
    for hook in harmful.hook_names:
        for position in harmful.position_labels:
            eraser = fit_leace(harmful.at_position(hook, position), harmless.at_position(hook, position), shrinkage=shrinkage)
            if eraser is not None:
                eraser = replace(eraser, positions=harmful.positions)
                erasers.update({(hook, at): eraser for at in window or (position,)})
    if not erasers:
        raise FeatsteerError("the harmful and harmless means coincide at every hook and position, so there is nothing to erase: "
                             "give harmful and harmless prompts that differ (the same prompts on both sides?)")
    return erasers


@dataclass
class Erase(Intervention):
    """LEACE erasers applied on the prompt pass at their hooks and positions (see the module docstring)."""

    erasers: Mapping[tuple[str, int], LeaceEraser]
    """`(hook_name, position) -> eraser`; positions count from the end of the prompt (-1: its last token), as `capture`
    labels them; an `instruction_end` eraser's position is the fitted prompts' and moves with each prompt's own."""

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, HookFn]]:
        by_hook: dict[str, dict[int, LeaceEraser]] = {}
        for (hook, position), eraser in self.erasers.items():
            if position >= 0:
                raise FeatsteerError(f"Erase positions count from the end of the prompt (negative), got {position} at {hook}")
            _check_width(model, [hook], eraser.mean, "the LEACE eraser")
            by_hook.setdefault(hook, {})[position] = eraser
        return [(hook, _erase_hook(model, at)) for hook, at in by_hook.items()]


def _template_tails(model: ModelAdapter, rows: int) -> Tensor:
    """Each prompt's count of tokens after its instruction in the current pass, or a one-line error when the pass has none."""
    tails = model.pass_post_instruction
    if tails is None or tails.numel() != rows:
        raise FeatsteerError("Erase finds post_instruction and instruction_end positions from each prompt's tokens after its "
                             "instruction, which this pass does not carry: run prompts through the model's tokenize (run, "
                             "logits, generate), not a hand-made TokenBatch")
    return tails.long().cpu()


def _prefill_counts(model: ModelAdapter, rows: int) -> Tensor:
    """Each prompt's number of prefill tokens at its end in the current pass (zeros when it has no prefill)."""
    prefill = model.pass_prefill
    if prefill is None or prefill.numel() != rows:
        return torch.zeros(rows, dtype=torch.long)
    return prefill.long().cpu()


def _erase_rows(eraser: LeaceEraser, position: int, prompt_length: int, tails: Tensor | None, prefill: Tensor,
                rows: int) -> tuple[Tensor, Tensor]:
    """`(row, column)` of each prompt's token that `eraser`, keyed at `position`, acts on in a pass whose prompt is
    `prompt_length` wide (left-padded) and ends in `prefill` tokens per row: see the module docstring."""
    batch = torch.arange(rows)
    if eraser.positions == "instruction_end":
        return batch, prompt_length - 1 - tails
    column = prompt_length - prefill + position  # counted from the end of the template's tail, before any prefill
    if eraser.positions == "post_instruction":
        has = tails - prefill >= -position
        return batch[has], column[has]
    return batch, column


def _erase_hook(model: ModelAdapter, erasers: Mapping[int, LeaceEraser]) -> HookFn:
    tracker = PositionTracker(model=model)
    per_prompt = any(e.positions in TEMPLATE_POSITIONS for e in erasers.values())
    warned: set[int] = set()

    def hook(x: Tensor, site) -> Tensor | None:
        generated = tracker.generated_mask(x.shape[0], x.shape[1], x.device)
        if bool(generated[:, 0].all()):  # a decoding step of a cached backend: no prompt token here
            return None
        tails = _template_tails(model, x.shape[0]) if per_prompt else None
        prefill = _prefill_counts(model, x.shape[0])
        out = x.clone()
        for position, eraser in erasers.items():
            rows, columns = _erase_rows(eraser, position, tracker.prompt_length, tails, prefill, x.shape[0])
            if len(rows) < x.shape[0] and position not in warned:
                warned.add(position)
                logger.info("LEACE eraser at post-instruction position %d left alone in %d of %d prompts, whose instruction's end "
                            "merges with the template's first token (fewer tokens after it)", position, x.shape[0] - len(rows), x.shape[0])
            inside = (columns >= 0) & (columns < x.shape[1])
            rows, columns = rows[inside].to(x.device), columns[inside].to(x.device)
            out[rows, columns] = eraser(x[rows, columns])
        return out

    return hook
