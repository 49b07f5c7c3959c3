"""Probe directions as `DirectionSet`s, so every intervention works with them unchanged.

A probe fitted per hook and position on harmful (1) vs harmless (0) activations gives a unit
`direction_` in activation space; collecting them gives the same candidate set DIM gives, which the
Arditi selection, the weight edits and the comparison harness then treat identically.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from featsteer.activations import ActivationSet
from featsteer.directions.dim import capture_provenance, mean_row_norm, means_coincide, shared_positions
from featsteer.directions.directions import DirectionSet
from featsteer.errors import FeatsteerError

PROBE_METHODS = ("linear", "whitened")
_FITTED = {"linear": "C_", "whitened": "shrinkage_"}
"""The fitted setting each method records per direction in the scores (the chosen C, the Ledoit-Wolf shrinkage)."""
LINEAR_FOLDS = 3
"""Cross-validation folds of the linear probe's C search, so each class needs at least this many prompts."""


def _factory(method: str) -> Callable[[], object]:
    from probes import LinearProbe, WhitenedProbe

    if method == "linear":
        return lambda: LinearProbe(Cs=5, cv=LINEAR_FOLDS)
    return lambda: WhitenedProbe(method="dim")


def probe_directions(harmful: ActivationSet, harmless: ActivationSet, method: str = "linear") -> DirectionSet:
    """Fit one probe per hook and position; return their directions with training accuracy in the scores.

    Args:
        harmful: activations of harmful prompts.
        harmless: activations of harmless prompts at the same hooks and positions.
        method: `linear` (cross-validated logistic regression) or `whitened` (Ledoit-Wolf whitened DIM; the
            returned vector is the probe's filter, Sigma^-1 times the mean difference, normalised).

    Returns:
        A rank-1 `DirectionSet`, each direction pointing from harmless to harmful, with scores `train_accuracy`,
        `mean_diff_norm` (the mean difference's component along the direction), `harmful_projection` and
        `harmless_projection` (class means on it, what `steer --mode set` reads, as for DIM), and the fitted `C_`
        (linear) or `shrinkage_` (whitened), NaN where the classes' means coincide; the provenance names the probe.

    Raises:
        FeatsteerError: `linear` with fewer than 3 prompts in a class.
    """
    if method == "linear" and min(len(harmful), len(harmless)) < LINEAR_FOLDS:
        raise FeatsteerError(f"the linear probe chooses its regularisation by {LINEAR_FOLDS}-fold cross-validation and needs at least "
                             f"{LINEAR_FOLDS} prompts per class; got {len(harmful)} harmful and {len(harmless)} harmless (give more "
                             "prompts, or use --method whitened)")
    make = _factory(method)
    vectors, names, positions, accuracy, projection = [], [], [], [], []
    fitted: dict[str, list[float]] = {"harmful_projection": [], "harmless_projection": [], _FITTED[method]: []}
    labels = shared_positions(harmful, harmless)
    for hook in harmful.hook_names:
        for position in labels:
            a, b = harmful.at_position(hook, position).double(), harmless.at_position(hook, position).double()
            x = torch.cat([a, b]).numpy()
            y = [1] * len(a) + [0] * len(b)
            if means_coincide(a.mean(0), b.mean(0), mean_row_norm(a, b)):  # as difference_in_means: no direction, a zero vector
                vectors.append(torch.zeros(a.shape[1]))
                accuracy.append(0.5)
                projection.append(0.0)
                fitted[_FITTED[method]].append(float("nan"))
            else:
                probe = make().fit(x, y)
                direction = torch.as_tensor(probe.direction_, dtype=torch.float64)
                vectors.append(direction.float())
                accuracy.append(float(probe.score(x, y)))
                projection.append(float((a.mean(0) - b.mean(0)) @ direction))
                fitted[_FITTED[method]].append(float(getattr(probe, _FITTED[method])))
            fitted["harmful_projection"].append(float(a.mean(0) @ vectors[-1].double()))
            fitted["harmless_projection"].append(float(b.mean(0) @ vectors[-1].double()))
            names.append(hook)
            positions.append(position)
    return DirectionSet(
        bases=torch.stack(vectors)[:, None, :], hook_names=tuple(names), positions=tuple(positions), method=f"probe:{method}",
        scores={"train_accuracy": accuracy, "mean_diff_norm": projection, **fitted},
        provenance={"model": harmful.model, "positions": harmful.positions, "n_harmful": len(harmful), "n_harmless": len(harmless),
                    "probe": repr(make()), "capture": capture_provenance(harmful, harmless)},
    )
