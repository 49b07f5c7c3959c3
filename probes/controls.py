"""Selectivity: how far a probe's held-out accuracy stands above what the same probe reaches on a control task.

Why this module exists: a flexible probe on thousands of dimensions can score well above chance on
structure unrelated to the concept (Hewitt & Liang 2019, "Designing and Interpreting Probes with
Control Tasks"). The control task here gives every prompt a random label (a permutation of the real
labels, so the class balance is kept), separately for the training and the test prompts; the same probe,
cloned, is trained on the control training labels and scored against the control test labels. It is the
permutation null: what the probe reaches when the labels carry nothing, chance level for the split's balance
plus whatever the probe can exploit without the concept. Selectivity is the real accuracy minus that.

The control is scored against its own labels, not the real ones: a probe fitted to shuffled labels still
finds the dominant harmful/harmless axis of the activations, with a random sign, so against the real labels
its accuracy is bimodal (0.09 to 0.91 across shuffles on the organism) and says nothing about the probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from probes._random import as_generator
from probes.base import check_labels

__all__ = ["SelectivityResult", "selectivity"]


@dataclass(frozen=True)
class SelectivityResult:
    """Held-out scores of a probe and of its shuffled-label control."""

    accuracy: float
    """Test accuracy of the probe trained on the real labels."""
    control_accuracy: float
    """Mean test accuracy of clones trained on shuffled training labels, scored against shuffled test labels."""
    selectivity: float
    """``accuracy - control_accuracy``."""
    auroc: float
    """Test AUROC of the real probe's ``decision_function``."""
    control_accuracies: tuple[float, ...] = ()
    """Control accuracy of every shuffle, in order."""

    @property
    def control_std(self) -> float:
        """Standard deviation (ddof 1) of ``control_accuracies``: how far ``selectivity`` moves with the relabelling
        alone. NaN with fewer than two shuffles."""
        if len(self.control_accuracies) < 2:
            return float("nan")
        return float(np.std(self.control_accuracies, ddof=1))


def selectivity(
    probe: Any,
    X_train: Any,
    y_train: Any,
    X_test: Any,
    y_test: Any,
    n_shuffles: int = 5,
    seed: int | np.random.Generator = 0,
) -> SelectivityResult:
    """Accuracy, AUROC and shuffled-label control of a probe on a train/test split.

    ``probe`` itself is never fitted: every fit uses a ``sklearn.base.clone`` of it. Each control
    draws a permutation of ``y_train`` and one of ``y_test`` (class balance preserved) from ``seed``,
    fits on the first and is scored against the second, so results are reproducible and the same seed
    gives the same shuffles for every layer of a sweep.

    Args:
        probe: Any estimator with ``fit``, ``decision_function`` and ``score`` (every ``probes``
            estimator, including ``LayerEnsemble`` with per-layer inputs).
        X_train: Training inputs in whatever form ``probe`` accepts.
        y_train: Training labels, 1 = harmful, 0 = harmless.
        X_test: Test inputs.
        y_test: Test labels; both classes must be present (for AUROC).
        n_shuffles: Number of shuffled-label controls to average (at least 1).
        seed: Seed or generator for the shuffles.

    Returns:
        A :class:`SelectivityResult`.

    Raises:
        ValueError: If ``n_shuffles < 1`` or labels are malformed.
    """
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be at least 1, got {n_shuffles}")
    rng = as_generator(seed)
    train_labels = check_labels(y_train, name="y_train")
    test_labels = check_labels(y_test, name="y_test")
    fitted = clone(probe).fit(X_train, train_labels)
    accuracy = float(fitted.score(X_test, test_labels))
    auroc = float(roc_auc_score(test_labels, fitted.decision_function(X_test)))
    controls = []
    for _ in range(n_shuffles):
        control_train, control_test = rng.permutation(train_labels), rng.permutation(test_labels)
        controls.append(float(clone(probe).fit(X_train, control_train).score(X_test, control_test)))
    controls = tuple(controls)
    control_accuracy = float(np.mean(controls))
    return SelectivityResult(
        accuracy=accuracy,
        control_accuracy=control_accuracy,
        selectivity=accuracy - control_accuracy,
        auroc=auroc,
        control_accuracies=controls,
    )
