"""Pooled within-class covariance with shrinkage, and the matrix functions built on it.

Why this module exists: the whitened and Mahalanobis probes both need the covariance of activations
*around their class means*, shrunk before it is inverted. Residual-stream activations have far more
dimensions than prompts and a few "rogue" dimensions with enormous variance, so the raw sample
covariance is singular or badly conditioned; Ledoit-Wolf shrinkage towards a scaled identity fixes
that with an automatically chosen amount. Both probes share this code so they agree exactly.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int
from sklearn.covariance import empirical_covariance, ledoit_wolf, shrunk_covariance

from probes.base import class_means

__all__ = ["pooled_within_class_covariance", "precision_matrix", "whitening_matrices"]

_RELATIVE_EIGENVALUE_FLOOR = 1e-12


def pooled_within_class_covariance(
    X: Float[np.ndarray, "n_samples d_model"],
    y: Int[np.ndarray, " n_samples"],
    shrinkage: float | None = None,
) -> tuple[Float[np.ndarray, "d_model d_model"], float]:
    """Shrunk covariance of the rows of ``X`` after subtracting each row's class mean.

    The pooled residuals have mean zero by construction, so the estimate is taken with
    ``assume_centered=True`` and normalised by ``n_samples`` (scikit-learn's convention): it equals
    ``sklearn.covariance.LedoitWolf(assume_centered=True).fit(residuals).covariance_``.

    Args:
        X: Float64 activations.
        y: Labels in {0, 1}, both present.
        shrinkage: ``None`` for the Ledoit-Wolf optimal amount, or a fixed value in [0, 1] for
            ``(1 - shrinkage) * S + shrinkage * trace(S) / d * I``.

    Returns:
        The (d_model, d_model) covariance and the shrinkage actually used.

    Raises:
        ValueError: If ``shrinkage`` is outside [0, 1].
    """
    residuals = X - class_means(X, y)[y]
    if shrinkage is None:
        covariance, used = ledoit_wolf(residuals, assume_centered=True)
        return covariance, float(used)
    if not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"shrinkage must be None (Ledoit-Wolf) or in [0, 1], got {shrinkage}")
    empirical = empirical_covariance(residuals, assume_centered=True)
    return shrunk_covariance(empirical, float(shrinkage)), float(shrinkage)


def _eigh_with_floor(
    covariance: Float[np.ndarray, "d_model d_model"],
) -> tuple[Float[np.ndarray, " d_model"], Float[np.ndarray, "d_model d_model"], np.ndarray]:
    """Eigendecomposition plus a mask of eigenvalues large enough to invert."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    floor = _RELATIVE_EIGENVALUE_FLOOR * max(float(eigenvalues.max()), 0.0)
    return eigenvalues, eigenvectors, eigenvalues > floor


def precision_matrix(
    covariance: Float[np.ndarray, "d_model d_model"],
) -> Float[np.ndarray, "d_model d_model"]:
    """(Pseudo-)inverse of a symmetric covariance; eigenvalues below 1e-12 of the largest are dropped.

    Args:
        covariance: Symmetric positive semi-definite matrix.

    Returns:
        The symmetric precision matrix.
    """
    eigenvalues, eigenvectors, keep = _eigh_with_floor(covariance)
    kept = eigenvectors[:, keep]
    precision = (kept / eigenvalues[keep]) @ kept.T
    return (precision + precision.T) / 2.0


def whitening_matrices(
    covariance: Float[np.ndarray, "d_model d_model"],
) -> tuple[Float[np.ndarray, "d_model d_model"], Float[np.ndarray, "d_model d_model"]]:
    """Symmetric (ZCA) whitening matrix ``Sigma^(-1/2)`` and its inverse ``Sigma^(1/2)``.

    With ``W = Sigma^(-1/2)``, the whitened activation is ``z = W x``; both matrices are symmetric, so
    a whitened-space direction ``u`` reads out of activation space as ``x . (W u)`` and is written into
    activation space as ``Sigma^(1/2) u``.

    Args:
        covariance: Symmetric positive semi-definite matrix (shrunk, so in practice definite).

    Returns:
        ``(whitening, colouring)``, both (d_model, d_model); null directions map to zero in both.
    """
    eigenvalues, eigenvectors, keep = _eigh_with_floor(covariance)
    kept = eigenvectors[:, keep]
    roots = np.sqrt(eigenvalues[keep])
    whitening = (kept / roots) @ kept.T
    colouring = (kept * roots) @ kept.T
    return (whitening + whitening.T) / 2.0, (colouring + colouring.T) / 2.0
