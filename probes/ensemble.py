"""Combine one probe per layer into a single harmful/harmless classifier.

Why this module exists: the refusal signal is spread over several layers and the best single layer
differs between models. Fitting a probe per layer and pooling their decisions is a cheap, robust way
to use all of them, and the stacking weights show which layers carry the signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Float
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.validation import check_is_fitted

from probes.base import CLASSES, BaseProbe, check_activations, check_labels, to_float64_numpy
from probes.linear import DiffMeanProbe

__all__ = ["LayerEnsemble", "check_layer_stack"]

_COMBINE = ("mean", "stacked")
_SCALE_FLOOR = 1e-12


def check_layer_stack(Xs: Any) -> list[Float[np.ndarray, "n_samples d_layer"]]:
    """Convert per-layer activations to a list of finite float64 matrices with equal row counts.

    Args:
        Xs: Either a 3-D array/tensor (n_samples, n_layers, d_model) or a sequence with one
            (n_samples, d_layer) array/tensor per layer (widths may differ).

    Returns:
        One float64 array per layer.

    Raises:
        ValueError: On a wrong number of dimensions, mismatched row counts, or NaN/inf (the message
            names the layer index and the affected rows).
    """
    if hasattr(Xs, "ndim"):
        stacked = to_float64_numpy(Xs)
        if stacked.ndim != 3:
            raise ValueError(f"Xs must be 3-D (n_samples, n_layers, d_model), got shape {stacked.shape}")
        layers = [stacked[:, index, :] for index in range(stacked.shape[1])]
    elif isinstance(Xs, Sequence) and len(Xs) > 0:
        layers = list(Xs)
    else:
        raise ValueError("Xs must be a 3-D array or a non-empty sequence of 2-D arrays, one per layer")
    checked = [check_activations(layer, name=f"layer {index}") for index, layer in enumerate(layers)]
    row_counts = {layer.shape[0] for layer in checked}
    if len(row_counts) != 1:
        raise ValueError(
            f"every layer must have the same number of rows, got {[m.shape[0] for m in checked]}"
        )
    return checked


class LayerEnsemble(BaseProbe):
    """One clone of ``base_estimator`` per layer, with decisions combined by averaging or stacking.

    ``combine="mean"``: each layer's decision is divided by its pooled *within-class* standard
    deviation on the training data and the results are averaged. Each layer's decision is then in
    units of its own noise, so layers that separate the classes better weigh more, and it is not
    centred, so every layer keeps its own zero threshold.
    ``combine="stacked"``: a logistic regression is fitted on the per-layer decisions; to avoid
    leakage it is trained on *out-of-fold* decisions (each from a clone fitted without that row,
    ``cv`` stratified unshuffled folds), standardised with their own mean and standard deviation. At
    prediction time the per-layer probes refitted on all data supply the decisions, as in
    scikit-learn's ``StackingClassifier``.

    Args:
        base_estimator: Probe cloned for every layer; ``None`` means ``DiffMeanProbe()``.
        combine: ``"mean"`` or ``"stacked"``.
        cv: Number of folds for the out-of-fold decisions (``"stacked"`` only).
        C: Inverse L2 regularisation of the stacking logistic regression.

    Attributes:
        estimators_: The fitted per-layer probes.
        directions_: Each per-layer probe's ``direction_`` (list; layer widths may differ).
        n_layers_: Number of layers.
        layer_dims_: Width of each layer.
        decision_scale_: Per-layer pooled within-class standard deviation of the training decisions
            (``"mean"``).
        stack_mean_, stack_scale_: Standardisation of the out-of-fold decisions (``"stacked"``).
        stacker_: The stacking logistic regression (``"stacked"``).
        layer_weights_: Per-layer weights: ``1 / n_layers_`` each for ``"mean"``, the stacker's
            coefficients (on standardised decisions) for ``"stacked"``.
        classes_: ``array([0, 1])``.
    """

    def __init__(
        self, base_estimator: Any = None, *, combine: str = "mean", cv: int = 5, C: float = 1.0
    ) -> None:
        self.base_estimator = base_estimator
        self.combine = combine
        self.cv = cv
        self.C = C

    def _template(self) -> Any:
        return DiffMeanProbe() if self.base_estimator is None else self.base_estimator

    def fit(self, Xs: Any, y: Any) -> LayerEnsemble:
        """Fit one probe per layer and the combination.

        Args:
            Xs: 3-D (n_samples, n_layers, d_model) array/tensor or a sequence of (n_samples, d_layer).
            y: Labels, 1 = harmful, 0 = harmless; both classes present.

        Returns:
            The fitted ensemble.

        Raises:
            ValueError: On an unknown ``combine``, malformed ``Xs`` or bad labels.
        """
        if self.combine not in _COMBINE:
            raise ValueError(f"combine must be one of {_COMBINE}, got {self.combine!r}")
        layers = check_layer_stack(Xs)
        labels = check_labels(y, layers[0].shape[0])
        self.classes_ = CLASSES.copy()
        self.n_layers_ = len(layers)
        self.layer_dims_ = tuple(layer.shape[1] for layer in layers)
        self.estimators_ = [clone(self._template()).fit(layer, labels) for layer in layers]
        self.directions_ = [getattr(estimator, "direction_", None) for estimator in self.estimators_]
        if self.combine == "mean":
            self.decision_scale_ = _within_class_std(self._layer_decisions(layers), labels)
            self.layer_weights_ = np.full(self.n_layers_, 1.0 / self.n_layers_)
            return self
        out_of_fold = self._out_of_fold_decisions(layers, labels)
        self.stack_mean_ = out_of_fold.mean(axis=0)
        self.stack_scale_ = np.maximum(out_of_fold.std(axis=0), _SCALE_FLOOR)
        standardised = (out_of_fold - self.stack_mean_) / self.stack_scale_
        self.stacker_ = LogisticRegression(C=self.C).fit(standardised, labels)
        self.layer_weights_ = self.stacker_.coef_[0].astype(np.float64)
        return self

    def _layer_decisions(self, layers: list[np.ndarray]) -> Float[np.ndarray, "n_samples n_layers"]:
        return np.column_stack(
            [
                estimator.decision_function(layer)
                for estimator, layer in zip(self.estimators_, layers, strict=True)
            ]
        )

    def _out_of_fold_decisions(
        self, layers: list[np.ndarray], labels: np.ndarray
    ) -> Float[np.ndarray, "n_samples n_layers"]:
        decisions = np.empty((labels.shape[0], len(layers)))
        folds = StratifiedKFold(n_splits=self.cv).split(layers[0], labels)
        for train, held_out in folds:
            for index, layer in enumerate(layers):
                estimator = clone(self._template()).fit(layer[train], labels[train])
                decisions[held_out, index] = estimator.decision_function(layer[held_out])
        return decisions

    def decision_function(self, Xs: Any) -> Float[np.ndarray, " n_samples"]:
        """Combined decision; positive means harmful.

        Args:
            Xs: Per-layer activations in the same layout and widths as in ``fit``.

        Returns:
            Decisions of shape (n_samples,).

        Raises:
            NotFittedError: If called before ``fit``.
            ValueError: If the number or widths of the layers differ from ``fit``.
        """
        check_is_fitted(self)
        layers = check_layer_stack(Xs)
        widths = tuple(layer.shape[1] for layer in layers)
        if widths != self.layer_dims_:
            raise ValueError(
                f"Xs has layer widths {widths} but the ensemble was fitted with {self.layer_dims_}"
            )
        decisions = self._layer_decisions(layers)
        if self.combine == "mean":
            return (decisions / self.decision_scale_).mean(axis=1)
        return self.stacker_.decision_function((decisions - self.stack_mean_) / self.stack_scale_)


def _within_class_std(
    decisions: Float[np.ndarray, "n_samples n_layers"], labels: np.ndarray
) -> Float[np.ndarray, " n_layers"]:
    """Pooled within-class standard deviation of each column (floored to stay invertible)."""
    residuals = decisions - np.stack([decisions[labels == label].mean(axis=0) for label in CLASSES])[labels]
    return np.maximum(np.sqrt((residuals**2).mean(axis=0)), _SCALE_FLOOR)
