"""Layer sweeps: fit the same probe at every layer/hook and report where the signal lives.

Why this module exists: choosing the layer to read (or steer) the refusal direction from is the first
decision of every experiment. A sweep fits a fresh probe per hook, scores it on held-out prompts with
a control task, and renders the result as a markdown table and a PNG so the choice is
documented rather than eyeballed.

The layer is chosen by cross-validation on the training prompts (``cv_accuracy``), never by the held-out
scores: the best of many layers' test accuracies is the luckiest of many noisy estimates, so picking the
layer with it and then reporting it overstates the accuracy of the layer picked. Chosen on the training
folds, the chosen layer's held-out accuracy is an honest estimate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Float, Int
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from probes.base import check_activations, check_labels
from probes.controls import ControlTask, selectivity

__all__ = ["LayerSplit", "SweepRow", "best_row", "layer_sweep", "plot_sweep", "sweep_table"]

logger = logging.getLogger(__name__)

_METRICS = ("accuracy", "auroc", "control_accuracy", "selectivity")
"""The held-out scores, plotted by :func:`plot_sweep`."""
_RANKABLE = ("cv_accuracy", "cv_auroc", *_METRICS)


class LayerSplit(NamedTuple):
    """Train/test activations and labels of one layer or hook (a plain 4-tuple works too)."""

    X_train: Any
    y_train: Any
    X_test: Any
    y_test: Any


@dataclass(frozen=True)
class SweepRow:
    """Held-out scores of one layer/hook."""

    key: str
    """Layer or hook name, e.g. ``"blocks.12.hook_resid_pre"``."""
    accuracy: float
    """Test accuracy."""
    auroc: float
    """Test AUROC."""
    control_accuracy: float
    """Mean test accuracy of the control task's probes, each scored against the control's test labels."""
    control_std: float
    """Standard deviation of the controls' accuracies over the relabellings (NaN with one): the spread of
    ``selectivity`` that comes from the relabelling alone."""
    selectivity: float
    """``accuracy - control_accuracy``."""
    cv_accuracy: float
    """Mean accuracy over stratified cross-validation folds of the training prompts alone (what picks the layer)."""
    cv_auroc: float
    """Mean AUROC over the same folds (breaks ``cv_accuracy`` ties)."""
    n_train: int
    """Number of training prompts."""
    n_test: int
    """Number of test prompts."""


def layer_sweep(
    splits: Mapping[str, LayerSplit | Sequence[Any]],
    probe_factory: Callable[[], Any],
    *,
    n_shuffles: int = 5,
    seed: int = 0,
    cv: int = 3,
    control: ControlTask | None = None,
) -> list[SweepRow]:
    """Fit and score a fresh probe for every layer/hook, in the mapping's order.

    Every layer uses the same ``seed`` and ``control``, so its control task draws the same labels and its
    cross-validation the same folds, and the rows are comparable.

    Args:
        splits: Layer/hook key -> ``(X_train, y_train, X_test, y_test)``.
        probe_factory: Zero-argument callable returning an unfitted probe, e.g. ``DiffMeanProbe`` or
            ``lambda: LinearProbe(Cs=5)``.
        n_shuffles: Control relabellings per layer.
        seed: Seed of the control relabellings and of the cross-validation folds.
        cv: Stratified folds of the training prompts for ``cv_accuracy``/``cv_auroc`` (at least 2); every class
            needs at least this many training samples.

    Returns:
        One :class:`SweepRow` per key.

    Raises:
        ValueError: If a split does not have four parts, ``cv`` is below 2 or above the smaller class's
            training samples (and as raised by the probes).
    """
    rows = []
    for key, split in splits.items():
        if len(split) != 4:
            raise ValueError(
                f"split {key!r} must be (X_train, y_train, X_test, y_test), got {len(split)} parts"
            )
        X_train, y_train, X_test, y_test = split
        # checked here so that a NaN names its layer and split, not just "X"
        X_train = check_activations(X_train, name=f"layer {key} training activations")
        X_test = check_activations(X_test, name=f"layer {key} test activations")
        train_labels = check_labels(y_train, X_train.shape[0], name=f"layer {key} training labels")
        cv_accuracy, cv_auroc = training_cv(probe_factory, X_train, train_labels, cv, seed, key=str(key))
        result = selectivity(
            probe_factory(), X_train, train_labels, X_test, y_test, n_shuffles=n_shuffles, seed=seed, control=control
        )
        rows.append(
            SweepRow(
                key=str(key),
                accuracy=result.accuracy,
                auroc=result.auroc,
                control_accuracy=result.control_accuracy,
                control_std=result.control_std,
                selectivity=result.selectivity,
                cv_accuracy=cv_accuracy,
                cv_auroc=cv_auroc,
                n_train=int(train_labels.shape[0]),
                n_test=int(check_labels(y_test, require_both_classes=False).shape[0]),
            )
        )
        logger.info("layer %s: cv accuracy %.3f, accuracy %.3f, selectivity %.3f", key, cv_accuracy, result.accuracy,
                    result.selectivity)
    return rows


def training_cv(
    probe_factory: Callable[[], Any],
    X: Float[np.ndarray, "n_samples d_model"],
    y: Int[np.ndarray, " n_samples"],
    folds: int,
    seed: int,
    *,
    key: str = "",
) -> tuple[float, float]:
    """Mean held-out-fold accuracy and AUROC of fresh probes over stratified folds of the training split only.

    Args:
        probe_factory: Builds an unfitted probe (called once per fold).
        X: Training activations.
        y: Labels, 1 = harmful, 0 = harmless.
        folds: Number of stratified folds, 2 to the smaller class's size.
        seed: Seed of the fold shuffle.
        key: Names the layer in the error message.

    Returns:
        (mean accuracy, mean AUROC) over the held-out folds.

    Raises:
        ValueError: If ``folds`` is not an int from 2 to the smaller class's size.
    """
    smallest = int(np.bincount(y, minlength=2).min())
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or not 2 <= folds <= smallest:
        raise ValueError(
            f"cv={folds!r}: the layer choice needs an int number of folds from 2 to the smaller class's training "
            f"samples ({smallest} at layer {key}); give more training samples or a smaller cv"
        )
    accuracies, aurocs = [], []
    splitter = StratifiedKFold(n_splits=int(folds), shuffle=True, random_state=seed)
    for train, held_out in splitter.split(X, y):
        fitted = probe_factory().fit(X[train], y[train])
        accuracies.append(float(fitted.score(X[held_out], y[held_out])))
        aurocs.append(float(roc_auc_score(y[held_out], fitted.decision_function(X[held_out]))))
    return float(np.mean(accuracies)), float(np.mean(aurocs))


def best_row(rows: Sequence[SweepRow], metric: str = "cv_accuracy") -> SweepRow:
    """The row with the highest ``metric``, ties broken by the matching AUROC, then by order (the first one wins).

    The default ranks layers by cross-validated accuracy on the *training* prompts, with ties broken by their
    cross-validated AUROC, so the chosen row's held-out ``accuracy`` is an unbiased estimate for that layer.
    Ranking by a held-out score (``"accuracy"``, ``"auroc"``, ...) picks the layer on the test prompts, and the
    winner's held-out score is then the maximum of many noisy estimates, biased upwards; ties on a held-out score
    are broken by held-out AUROC. Selectivity is a poor ranking key in any case: it is accuracy minus a control that
    sits near chance, so ranking by it only adds the control's sampling noise.

    Args:
        rows: Output of :func:`layer_sweep`.
        metric: One of ``"cv_accuracy"``, ``"cv_auroc"``, ``"accuracy"``, ``"auroc"``, ``"control_accuracy"``,
            ``"selectivity"``.

    Returns:
        The best row.

    Raises:
        ValueError: On an unknown metric or no rows.
    """
    if metric not in _RANKABLE:
        raise ValueError(f"metric must be one of {_RANKABLE}, got {metric!r}")
    if not rows:
        raise ValueError("no rows to choose from")
    tie_break = "cv_auroc" if metric.startswith("cv_") else "auroc"
    return max(rows, key=lambda row: (getattr(row, metric), getattr(row, tie_break)))


def sweep_table(rows: Sequence[SweepRow], *, digits: int = 3) -> str:
    """Render sweep rows as a GitHub-flavoured markdown table.

    Args:
        rows: Output of :func:`layer_sweep`.
        digits: Decimal places for scores.

    Returns:
        The table, one line per row after the header and separator, ending without a newline.
    """
    names = [field.name for field in fields(SweepRow)]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    for row in rows:
        cells = [
            f"{value:.{digits}f}" if isinstance(value, float) else str(value)
            for value in (getattr(row, name) for name in names)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[SweepRow], path: str | Path, *, title: str | None = None) -> Path:
    """Plot accuracy, AUROC, control accuracy and selectivity per layer to a PNG.

    Uses an Agg canvas on a standalone ``Figure``, so no pyplot state or global backend is touched.

    Args:
        rows: Output of :func:`layer_sweep`, in the order to plot.
        path: Output file; parent directories are created.
        title: Optional figure title.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(max(6.0, 0.5 * len(rows)), 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(rows))
    for metric in _METRICS:
        axes.plot(positions, [getattr(row, metric) for row in rows], marker="o", label=metric)
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xticks(positions, [row.key for row in rows], rotation=45, ha="right")
    axes.set_xlabel("layer / hook")
    axes.set_ylabel("score on held-out prompts")
    axes.set_ylim(min([-0.05, *(row.selectivity - 0.05 for row in rows)]), 1.05)
    if title is not None:
        axes.set_title(title)
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    return path
