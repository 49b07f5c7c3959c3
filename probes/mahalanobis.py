"""Gaussian class-conditional probe: Mahalanobis distances to the harmful and harmless means.

Why this module exists: besides a harmful/harmless decision, steering work needs to know when an
activation is unlike *both* training classes (a jailbreak template, another language, a steered
state pushed off-distribution). Distances under a shared, shrunk covariance give both from one fit:
their difference is the classifier (linear, because the covariance is shared: it equals the Fisher
discriminant) and their minimum is an out-of-distribution score (Lee et al. 2018).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from probes.base import NO_SPREAD_HINT, Activations, BaseProbe, Labels, class_means, unit_vector
from probes.covariance import pooled_within_class_covariance, precision_matrix

__all__ = ["MahalanobisProbe"]

_NORM_FLOOR = 1e-12


class MahalanobisProbe(BaseProbe):
    """Squared Mahalanobis distances to the two class means under a pooled, shrunk covariance.

    All distances are *squared*: ``d_k(x)^2 = (x - mu_k)^T precision_ (x - mu_k)``.
    ``decision_function = d_harmless^2 - d_harmful^2`` (positive: closer to harmful) and
    ``ood_score = min_k d_k^2``. Because the covariance is shared, the decision is linear in ``x``
    with normal ``precision_ @ (mu_harmful - mu_harmless)``, which is ``direction_`` once normalised.

    Args:
        shrinkage: ``None`` for Ledoit-Wolf's automatic shrinkage, or a fixed value in [0, 1].
        normalize: If true, every row (in ``fit`` and at prediction) is scaled to unit L2 norm first,
            so the probe sees only the direction of an activation, not its magnitude; ``location_``,
            ``covariance_`` and ``direction_`` then live in that normalised space.

    Attributes:
        location_: Class means (2, d_model), row 0 harmless, row 1 harmful.
        covariance_: Shrunk pooled within-class covariance (d_model, d_model); equals
            ``sklearn.covariance.LedoitWolf(assume_centered=True)`` fitted on the class-centred rows.
        precision_: Its inverse.
        shrinkage_: Shrinkage used.
        direction_: Unit vector ``normalise(precision_ @ (location_[1] - location_[0]))``.
        classes_, n_features_in_: As for every probe.
    """

    def __init__(self, *, shrinkage: float | None = None, normalize: bool = False) -> None:
        self.shrinkage = shrinkage
        self.normalize = normalize

    def _prepare(self, X: Float[np.ndarray, "n_samples d_model"]) -> Float[np.ndarray, "n_samples d_model"]:
        if not self.normalize:
            return X
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        return X / np.maximum(norms, _NORM_FLOOR)

    def fit(self, X: Activations, y: Labels) -> MahalanobisProbe:
        """Estimate the class means and the shrunk pooled covariance.

        Args:
            X: Activations (n_samples, d_model), numpy or torch.
            y: Labels, 1 = harmful, 0 = harmless; both classes present.

        Returns:
            The fitted probe.

        Raises:
            ValueError: On bad ``shrinkage``, NaN/inf in ``X`` or bad labels.
        """
        X, y = self._validate_fit_data(X, y)
        X = self._prepare(X)
        self.location_ = class_means(X, y)
        self.covariance_, self.shrinkage_ = pooled_within_class_covariance(X, y, self.shrinkage)
        self.precision_ = precision_matrix(self.covariance_)
        discriminant = self.precision_ @ (self.location_[1] - self.location_[0])
        self.direction_ = unit_vector(discriminant, what="Mahalanobis discriminant", hint=NO_SPREAD_HINT)
        return self

    def mahalanobis(self, X: Activations) -> Float[np.ndarray, "n_samples 2"]:
        """Squared Mahalanobis distance of every row to each class mean.

        Args:
            X: Activations (n_samples, d_model).

        Returns:
            Array (n_samples, 2): column 0 to the harmless mean, column 1 to the harmful mean.
        """
        X = self._prepare(self._validate_predict_data(X))
        distances = np.empty((X.shape[0], 2))
        for column, mean in enumerate(self.location_):
            offsets = X - mean
            distances[:, column] = ((offsets @ self.precision_) * offsets).sum(axis=1)
        return distances

    def decision_function(self, X: Activations) -> Float[np.ndarray, " n_samples"]:
        """Squared distance to harmless minus squared distance to harmful; positive means harmful.

        Args:
            X: Activations (n_samples, d_model).

        Returns:
            Decisions of shape (n_samples,).
        """
        distances = self.mahalanobis(X)
        return distances[:, 0] - distances[:, 1]

    def ood_score(self, X: Activations) -> Float[np.ndarray, " n_samples"]:
        """Out-of-distribution score: squared distance to the nearer class mean (higher = stranger).

        Args:
            X: Activations (n_samples, d_model).

        Returns:
            Scores of shape (n_samples,).
        """
        return self.mahalanobis(X).min(axis=1)
