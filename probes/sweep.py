"""Layer sweeps: fit the same probe at every layer/hook and report where the signal lives.

Why this module exists: choosing the layer to read (or steer) the refusal direction from is the first
decision of every experiment. A sweep fits a fresh probe per hook, scores it on held-out prompts with
a shuffled-label control, and renders the result as a markdown table and a PNG so the choice is
documented rather than eyeballed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from probes.base import check_activations, check_labels
from probes.controls import selectivity

__all__ = ["LayerSplit", "SweepRow", "best_row", "layer_sweep", "plot_sweep", "sweep_table"]

logger = logging.getLogger(__name__)

_METRICS = ("accuracy", "auroc", "control_accuracy", "selectivity")


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
    """Mean test accuracy of the shuffled-label controls, each scored against shuffled test labels."""
    selectivity: float
    """``accuracy - control_accuracy``."""
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
) -> list[SweepRow]:
    """Fit and score a fresh probe for every layer/hook, in the mapping's order.

    Every layer uses the same ``seed``, so its shuffled-label controls use the same permutations and
    the rows are comparable.

    Args:
        splits: Layer/hook key -> ``(X_train, y_train, X_test, y_test)``.
        probe_factory: Zero-argument callable returning an unfitted probe, e.g. ``DiffMeanProbe`` or
            ``lambda: LinearProbe(Cs=5)``.
        n_shuffles: Shuffled-label controls per layer.
        seed: Seed of the shuffles.

    Returns:
        One :class:`SweepRow` per key.

    Raises:
        ValueError: If a split does not have four parts (and as raised by the probes).
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
        result = selectivity(
            probe_factory(), X_train, y_train, X_test, y_test, n_shuffles=n_shuffles, seed=seed
        )
        rows.append(
            SweepRow(
                key=str(key),
                accuracy=result.accuracy,
                auroc=result.auroc,
                control_accuracy=result.control_accuracy,
                selectivity=result.selectivity,
                n_train=int(check_labels(y_train, require_both_classes=False).shape[0]),
                n_test=int(check_labels(y_test, require_both_classes=False).shape[0]),
            )
        )
        logger.info("layer %s: accuracy %.3f, selectivity %.3f", key, result.accuracy, result.selectivity)
    return rows


def best_row(rows: Sequence[SweepRow], metric: str = "accuracy") -> SweepRow:
    """The row with the highest ``metric``, ties broken by AUROC, then by order (the first one wins).

    Accuracy is the default: selectivity is accuracy minus a control that sits near chance, so ranking by it
    only adds the control's sampling noise.

    Args:
        rows: Output of :func:`layer_sweep`.
        metric: One of ``"accuracy"``, ``"auroc"``, ``"control_accuracy"``, ``"selectivity"``.

    Returns:
        The best row.

    Raises:
        ValueError: On an unknown metric or no rows.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if not rows:
        raise ValueError("no rows to choose from")
    return max(rows, key=lambda row: (getattr(row, metric), row.auroc))


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
