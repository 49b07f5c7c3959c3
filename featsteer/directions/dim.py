"""Difference-in-means directions and how well they separate the two prompt sets.

DIM is the baseline every other direction source is compared against: the float64 difference between the
mean harmful and mean harmless activation at one hook and position (Arditi et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from featsteer.activations import ActivationSet
from featsteer.directions.directions import DirectionSet, unit
from featsteer.errors import FeatsteerError

IDENTICAL_MEANS_RTOL = 1e-12
"""Class means closer than this fraction of the rows' size (`means_coincide`: the larger of the harmful mean's norm, the rows'
mean norm when known, and 1) count as identical."""


def means_coincide(harmful_mean: Float[Tensor, " d_model"], harmless_mean: Float[Tensor, " d_model"], row_norm: float | None = None) -> bool:
    """Whether two class means are the same up to rounding, so their difference has no direction to find.

    The one test every direction source applies (DIM, SVD, the probe directions, LEACE, the probe report's layer filter,
    the feature report's DIM): the float64 difference's norm at most `IDENTICAL_MEANS_RTOL` times the largest of the
    harmful mean's norm, `row_norm` and 1. It is relative because the float64 means of the same vectors summed in another
    order differ by rounding in proportion to the size of the vectors summed: the same prompts on both sides of a layer
    with a norm of 50,000 differ by about 1e-11, where the probe directions' old absolute 1e-12 saw a direction that DIM
    did not (the whitened probe returned a unit vector of rounding noise, the linear probe failed on an all-zero weight
    vector). The rows' size, not the mean's, is what the rounding follows: rows of norm 1e5 centred across the prompts
    have means near zero that differ by about 1e-12 in another order, so a caller holding the rows passes `row_norm`
    (`mean_row_norm` of both classes' rows).

    Args:
        harmful_mean: mean harmful activation (any float dtype; compared in float64).
        harmless_mean: mean harmless activation at the same hook and position.
        row_norm: the size of the rows the means were taken over (`mean_row_norm`); None when only the means are known.

    Returns:
        True when the means coincide.
    """
    harmful_mean, harmless_mean = harmful_mean.double(), harmless_mean.double()
    scale = max(1.0, float(harmful_mean.norm()), 0.0 if row_norm is None else float(row_norm))
    return float((harmful_mean - harmless_mean).norm()) <= IDENTICAL_MEANS_RTOL * scale


def mean_row_norm(*row_sets: Float[Tensor, "n d_model"]) -> float:
    """The largest of the sets' mean row norms (float64; empty sets left out, 0.0 when all are): the `row_norm` to give
    `means_coincide` for the means of these rows, whose rounding grows with it.

    Args:
        row_sets: the rows of each class, `(n, d_model)` each (any float dtype).

    Returns:
        The largest mean row norm.
    """
    return max((float(rows.double().norm(dim=-1).mean()) for rows in row_sets if rows.shape[0] > 0), default=0.0)


def shared_positions(harmful: ActivationSet, harmless: ActivationSet) -> list[int]:
    """The position labels at which both sets hold every one of their prompts: where the two classes can be compared.

    `post_instruction` keeps as many template tokens as the set's shortest tail, so two sets captured separately can
    hold different numbers of them; the labels only one set holds are left out. `instruction_end` labels each prompt by
    its own tail, so a prompt whose last characters merge with the template (a trailing space before a plain-text
    template) sits at another label than the rest: a direction at either label would average only some prompts.

    Raises:
        FeatsteerError: when the sets come from two models, position selectors or prompt formattings, or differ in width;
            when a label holds only some of a set's prompts, or the sets share no label.
    """
    if harmful.model and harmless.model and harmful.model != harmless.model:
        raise FeatsteerError(f"the harmful activations come from {harmful.model} and the harmless from {harmless.model}: capture both from one model")
    if harmful.positions != harmless.positions:
        raise FeatsteerError(f"the harmful activations were read at positions '{harmful.positions}' and the harmless at '{harmless.positions}': "
                             "capture both with the same --positions")
    if (harmful.chat, harmful.system) != (harmless.chat, harmless.system):
        raise FeatsteerError(f"the harmful prompts were formatted {_formatting(harmful)} and the harmless {_formatting(harmless)}: "
                             "capture both with the same --system and --raw, or the direction picks up the formatting")
    if harmful.d_model != harmless.d_model:
        raise FeatsteerError(f"the harmful activations are {harmful.d_model} wide and the harmless {harmless.d_model}: capture both from one model")
    for acts, name in ((harmful, "harmful"), (harmless, "harmless")):
        counts = {label: int(acts.prompt_index[acts.position == label].unique().numel()) for label in acts.position_labels}
        if any(count < len(acts) for count in counts.values()):
            found = ", ".join(f"{label} for {count}" for label, count in list(counts.items())[:4]) + (", ..." if len(counts) > 4 else "")
            raise FeatsteerError(f"the {name} activations ({acts.positions}) sit at different positions for different prompts (position "
                                 f"{found} of {len(acts)} prompts), so one position would average only some prompts; with "
                                 "instruction_end, a prompt's end merged with the template's tail (e.g. trailing whitespace): strip "
                                 "it, or use --positions last or post_instruction")
    labels = sorted(set(harmful.position_labels) & set(harmless.position_labels))
    if not labels:
        raise FeatsteerError(f"the harmful activations are at positions {harmful.position_labels} and the harmless at "
                             f"{harmless.position_labels}: they share none; capture both with the same --positions")
    return labels


def capture_provenance(harmful: ActivationSet, harmless: ActivationSet) -> dict[str, dict]:
    """The two sets' capture provenance (`ActivationSet.provenance`: prompt hashes and source, template, dtypes,
    versions), which a direction method keeps under `capture` in its `DirectionSet.provenance`, so a saved direction says
    what it was read from. Empty dicts for sets built by hand; older saved directions have no `capture` at all."""
    return {"harmful": dict(harmful.provenance), "harmless": dict(harmless.provenance)}


def difference_in_means(harmful: ActivationSet, harmless: ActivationSet, hooks: list[str] | None = None) -> DirectionSet:
    """Unit DIM direction for every captured hook and position.

    Args:
        harmful: activations of harmful prompts.
        harmless: activations of harmless prompts at the same hooks and positions.
        hooks: restrict to these hooks (default: every hook in `harmful`).

    Returns:
        A rank-1 `DirectionSet` with scores `mean_diff_norm` (length of the raw difference) and
        `harmful_projection`/`harmless_projection` (class means projected on the unit direction). Where the two
        means coincide the stored vector is zero and `mean_diff_norm` is 0.
    """
    hook_list = list(hooks or harmful.hook_names)
    missing = [h for h in hook_list if h not in harmless.hook_names]
    if missing:
        raise FeatsteerError(f"harmless activations lack {', '.join(missing)}: capture both sets at the same hooks")
    labels = shared_positions(harmful, harmless)
    vectors, names, positions, norms, projections = [], [], [], [], {"harmful_projection": [], "harmless_projection": []}
    for hook in hook_list:
        for position in labels:
            harmful_rows, harmless_rows = harmful.at_position(hook, position).double(), harmless.at_position(hook, position).double()
            harmful_mean, harmless_mean = harmful_rows.mean(0), harmless_rows.mean(0)  # as ActivationSet.mean, each read once
            difference = harmful_mean - harmless_mean
            if not bool(torch.isfinite(difference).all()):
                side = "harmful" if not bool(torch.isfinite(harmful_mean).all()) else "harmless"
                raise FeatsteerError(f"the {side} activations at {hook} (position {position}) hold NaN or inf values: "
                                     "recapture them (capture checks every row), or drop the rows that overflowed")
            # identical means (e.g. layer 0 at a template token every prompt shares) give no direction:
            # keep a zero vector so it scores as chance instead of failing the whole set
            zero = means_coincide(harmful_mean, harmless_mean, mean_row_norm(harmful_rows, harmless_rows))
            vectors.append(torch.zeros_like(difference).float() if zero else unit(difference).float())
            names.append(hook)
            positions.append(position)
            norms.append(float(difference.norm()))
            projections["harmful_projection"].append(float(harmful_mean @ vectors[-1].double()))
            projections["harmless_projection"].append(float(harmless_mean @ vectors[-1].double()))
    return DirectionSet(
        bases=torch.stack(vectors)[:, None, :],
        hook_names=tuple(names),
        positions=tuple(positions),
        method="dim",
        scores={"mean_diff_norm": norms, **projections},
        provenance={"model": harmful.model, "positions": harmful.positions,
                    "n_harmful": len(harmful), "n_harmless": len(harmless), "capture": capture_provenance(harmful, harmless)},
    )


@dataclass(frozen=True)
class Separability:
    """How well projecting on a direction separates held-out harmful from harmless prompts."""

    accuracy: float
    """Accuracy of thresholding the projection at the midpoint of the training class means."""
    auroc: float
    """Area under the ROC curve of the projection."""
    gap: float
    """Difference of held-out mean projections, in units of their pooled standard deviation."""


def separability(direction: Tensor, train_harmful: Tensor, train_harmless: Tensor, test_harmful: Tensor, test_harmless: Tensor) -> Separability:
    """Score a direction on held-out vectors (all `(n, d_model)`), threshold fixed on the training vectors."""
    from sklearn.metrics import roc_auc_score

    d = direction.double()
    threshold = 0.5 * float(train_harmful.double().mean(0) @ d + train_harmless.double().mean(0) @ d)
    pos, neg = test_harmful.double() @ d, test_harmless.double() @ d
    correct = int((pos > threshold).sum()) + int((neg <= threshold).sum())
    labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
    auroc = float(roc_auc_score(labels.numpy(), torch.cat([pos, neg]).numpy()))
    pooled = float(torch.cat([pos - pos.mean(), neg - neg.mean()]).std()) or 1e-12
    return Separability(accuracy=correct / (len(pos) + len(neg)), auroc=auroc, gap=float(pos.mean() - neg.mean()) / pooled)


def _formatting(acts) -> str:
    """How a set's prompts were formatted, for an error message."""
    if not acts.chat:
        return "as raw text"
    return f"with the system prompt {acts.system!r}" if acts.system else "with the chat template and no system prompt"
