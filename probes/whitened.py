"""Probe that finds the harmful direction after whitening away nuisance variance.

Why this module exists: residual streams contain a few "rogue" dimensions whose variance is hundreds
of times that of the rest but which carry no label information. With a finite sample, the difference
in class means picks up sampling noise from those dimensions in proportion to their standard
deviation, so plain DIM can point mostly along them. Whitening with the (Ledoit-Wolf shrunk) pooled
within-class covariance puts every direction on the same noise scale first, which makes the estimate
robust to them.

Filter versus pattern (Haufe et al. 2014, "On the interpretation of weight vectors of linear models").
With the symmetric whitening ``W = Sigma^(-1/2)`` and a unit whitened-space direction ``u``:

* the *filter* ``W u`` is the activation-space vector whose dot product with ``x`` equals the whitened
  coordinate ``u . (W x)``; for ``method="dim"`` it is proportional to ``Sigma^(-1) (mu_harmful -
  mu_harmless)``, the Fisher/LDA discriminant. This is ``direction_`` (unit-normalised) and, unscaled,
  ``coef_``.
* the *pattern* ``Sigma^(1/2) u`` is the activation-space displacement that moves the whitened
  representation along ``u`` and nowhere else. For ``method="dim"`` it is proportional to the plain
  difference in means, i.e. it undoes the whitening. It is exposed as ``pattern_``.

``direction_`` is the filter because it is the part that differs from DIM: it down-weights the
high-variance nuisance dimensions and so is the better estimate of the label-carrying direction and
the better read-out. Steering or ablation code that wants "the activation-space offset between the
classes as seen after whitening" should use ``pattern_`` instead.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from probes.base import NO_SPREAD_HINT, Activations, BaseProbe, Labels, class_means, unit_vector
from probes.covariance import pooled_within_class_covariance, whitening_matrices

__all__ = ["WhitenedProbe"]

_METHODS = ("dim", "pca")


class WhitenedProbe(BaseProbe):
    """Difference in means or first principal component in whitened space, mapped back.

    ``decision_function(X) = X @ coef_ - threshold_``: the coordinate along the whitened direction
    minus the midpoint of the two class means' coordinates. The decision is in whitened units: its
    within-class variance on the training data is exactly 1 with ``shrinkage=0`` and somewhat below 1
    with shrinkage (which inflates the covariance of low-variance directions).

    Args:
        method: ``"dim"`` for the normalised difference of whitened class means, or ``"pca"`` for the
            first principal component of the whitened data of both classes (centred on the grand
            mean), oriented from harmless to harmful.
        shrinkage: ``None`` for Ledoit-Wolf's automatic shrinkage of the pooled within-class
            covariance, or a fixed value in [0, 1].

    Attributes:
        direction_: Unit filter ``W u / ||W u||`` in activation space (see the module docstring).
        pattern_: Unit pattern ``Sigma^(1/2) u / ||.||`` in activation space.
        whitened_direction_: The unit direction ``u`` in whitened space.
        coef_: ``W u`` (d_model,), so that ``X @ coef_`` is the whitened coordinate along ``u``.
        threshold_: Midpoint of the class means' coordinates.
        location_: Class means (2, d_model), row 0 harmless, row 1 harmful.
        covariance_: Shrunk pooled within-class covariance (d_model, d_model).
        whitening_: Symmetric whitening matrix ``Sigma^(-1/2)`` (d_model, d_model).
        shrinkage_: Shrinkage used.
        classes_, n_features_in_: As for every probe.
    """

    def __init__(self, *, method: str = "dim", shrinkage: float | None = None) -> None:
        self.method = method
        self.shrinkage = shrinkage

    def fit(self, X: Activations, y: Labels) -> WhitenedProbe:
        """Estimate the shrunk covariance, whiten, find the direction and map it back.

        Args:
            X: Activations (n_samples, d_model), numpy or torch.
            y: Labels, 1 = harmful, 0 = harmless; both classes present.

        Returns:
            The fitted probe.

        Raises:
            ValueError: On an unknown ``method``, bad ``shrinkage``, NaN/inf in ``X`` or bad labels.
        """
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        X, y = self._validate_fit_data(X, y)
        self.location_ = class_means(X, y)
        self.covariance_, self.shrinkage_ = pooled_within_class_covariance(X, y, self.shrinkage)
        self.whitening_, colouring = whitening_matrices(self.covariance_)
        whitened_difference = self.whitening_ @ (self.location_[1] - self.location_[0])
        if self.method == "dim":
            direction = whitened_difference
        else:
            direction = _first_principal_component((X - X.mean(axis=0)) @ self.whitening_)
            if direction @ whitened_difference < 0:
                direction = -direction
        self.whitened_direction_ = unit_vector(direction, what="whitened direction", hint=NO_SPREAD_HINT)
        self.coef_ = self.whitening_ @ self.whitened_direction_
        self.direction_ = unit_vector(self.coef_, what="whitened filter direction")
        self.pattern_ = unit_vector(colouring @ self.whitened_direction_, what="whitened pattern")
        self.threshold_ = float(self.location_.mean(axis=0) @ self.coef_)
        return self

    def decision_function(self, X: Activations) -> Float[np.ndarray, " n_samples"]:
        """Whitened coordinate along the direction minus ``threshold_``; positive means harmful.

        Args:
            X: Activations (n_samples, d_model).

        Returns:
            Decisions of shape (n_samples,).
        """
        X = self._validate_predict_data(X)
        return X @ self.coef_ - self.threshold_


def _first_principal_component(
    centred: Float[np.ndarray, "n_samples d_model"],
) -> Float[np.ndarray, " d_model"]:
    """Top right-singular vector of already-centred data (the first PC, sign arbitrary)."""
    _, _, right_singular = np.linalg.svd(centred, full_matrices=False)
    return right_singular[0]
