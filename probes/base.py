"""Input conversion, validation and the shared base class of every probe.

Why this module exists: activations reach the probes as torch tensors (any dtype, any device) or numpy
arrays, and every statistic must be computed in float64 on CPU. Bad inputs - NaN/inf from an overflowing
fp16 forward pass, labels other than 0/1, a class with no examples - must fail with a message saying
*where* the problem is. Doing this once here keeps the estimators short and the errors identical.

Label convention used throughout ``probes``: ``y = 1`` is harmful (the positive class), ``y = 0`` is
harmless, so ``classes_`` is always ``array([0, 1])`` and every ``direction_`` points from harmless
towards harmful.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from jaxtyping import Float, Int
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import accuracy_score
from sklearn.utils.validation import check_is_fitted

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "CLASSES",
    "HARMFUL",
    "HARMLESS",
    "Activations",
    "BaseProbe",
    "Labels",
    "check_activations",
    "check_labels",
    "class_means",
    "to_float64_numpy",
    "unit_vector",
]

HARMLESS = 0
"""Label of the harmless (negative) class."""
HARMFUL = 1
"""Label of the harmful (positive) class."""
CLASSES: Int[np.ndarray, " 2"] = np.array([HARMLESS, HARMFUL])
"""The ``classes_`` of every fitted probe, in column order of class-indexed arrays such as ``location_``."""

Activations = Union["Float[np.ndarray, 'n_samples d_model']", "Float[Tensor, 'n_samples d_model']"]
"""Activations of one layer/hook: a 2-D numpy array or torch tensor, one row per prompt."""
Labels = Union["Int[np.ndarray, ' n_samples']", "Int[Tensor, ' n_samples']", "list[int]"]
"""Binary labels, 1 = harmful, 0 = harmless."""

_MAX_LISTED = 5


def to_float64_numpy(values: Any) -> np.ndarray:
    """Convert a torch tensor (any dtype or device) or array-like to a float64 numpy array.

    torch is never imported: tensors are recognised by their ``detach``/``cpu`` methods, so ``probes``
    works without torch installed.

    Args:
        values: A torch tensor, numpy array or nested sequence of numbers.

    Returns:
        A float64 numpy array (a copy when a conversion was necessary).
    """
    if hasattr(values, "toarray") and hasattr(values, "nnz"):
        raise ValueError(f"got a sparse {type(values).__name__}: pass a dense array (its .toarray())")
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        if getattr(values, "is_complex", lambda: False)():
            raise ValueError("activations are complex numbers: pass real values (the imaginary part would be dropped)")
        values = values.detach().cpu().double().numpy()
    if np.iscomplexobj(values):
        raise ValueError("activations are complex numbers: pass real values (the imaginary part would be dropped)")
    return np.asarray(values, dtype=np.float64)


def _first(indices: np.ndarray) -> str:
    listed = ", ".join(str(int(i)) for i in indices[:_MAX_LISTED])
    return f"[{listed}{', ...' if indices.size > _MAX_LISTED else ''}]"


def check_activations(X: Any, *, name: str = "X") -> Float[np.ndarray, "n_samples d_model"]:
    """Convert activations to a finite 2-D float64 array.

    Args:
        X: Activations, shape (n_samples, d_model), numpy or torch.
        name: How to refer to ``X`` in error messages (e.g. ``"layer 12"``).

    Returns:
        The activations as a float64 numpy array of shape (n_samples, d_model).

    Raises:
        ValueError: If ``X`` is not 2-D, is empty, or contains NaN/inf; the NaN/inf message names how
            many rows (prompts) and features are affected and the first offending indices.
    """
    array = to_float64_numpy(X)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, d_model), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {array.shape}")
    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        bad_features = np.flatnonzero(~finite.all(axis=0))
        raise ValueError(
            f"{name} contains NaN or inf: {bad_rows.size} of {array.shape[0]} rows (prompts) affected, "
            f"first rows {_first(bad_rows)}; {bad_features.size} of {array.shape[1]} features affected, "
            f"first features {_first(bad_features)}"
        )
    return array


def check_labels(
    y: Any, n_samples: int | None = None, *, require_both_classes: bool = True, name: str = "y"
) -> Int[np.ndarray, " n_samples"]:
    """Convert binary labels (1 = harmful, 0 = harmless) to a 1-D int64 array.

    Args:
        y: Labels as a numpy array, torch tensor or sequence; bool and float 0.0/1.0 are accepted.
        n_samples: Number of rows of the matching activations; ``None`` skips the length check.
        require_both_classes: Whether both classes must be present (needed to fit a probe).
        name: How to refer to ``y`` in error messages.

    Returns:
        The labels as an int64 array of shape (n_samples,).

    Raises:
        ValueError: If the shape does not match, a label is not 0/1, or a required class is missing.
    """
    try:
        labels = to_float64_numpy(y)
    except ValueError as error:  # e.g. "harmful"/"harmless" strings, for which numpy's own message names no fix
        raise ValueError(f"{name} must contain only 0 (harmless) and 1 (harmful), numbers or bools: {error}; "
                         "map other labels to 1/0 first") from error
    if labels.ndim != 1 or (n_samples is not None and labels.shape[0] != n_samples):
        expected = "(n_samples,)" if n_samples is None else f"({n_samples},) to match the activations"
        raise ValueError(f"{name} must have shape {expected}, got {labels.shape}")
    invalid = ~np.isin(labels, CLASSES)
    if invalid.any():
        raise ValueError(
            f"{name} must contain only 0 (harmless) and 1 (harmful); {int(invalid.sum())} invalid labels, "
            f"first at rows {_first(np.flatnonzero(invalid))}"
        )
    labels = labels.astype(np.int64)
    if require_both_classes:
        counts = np.bincount(labels, minlength=2)
        if (counts == 0).any():
            raise ValueError(f"{name} needs both classes; got {counts[0]} harmless and {counts[1]} harmful")
    return labels


def class_means(
    X: Float[np.ndarray, "n_samples d_model"], y: Int[np.ndarray, " n_samples"]
) -> Float[np.ndarray, "2 d_model"]:
    """Per-class means in float64, row 0 harmless and row 1 harmful.

    Args:
        X: Float64 activations.
        y: Labels in {0, 1}, both present.

    Returns:
        Array of shape (2, d_model).
    """
    return np.stack([X[y == label].mean(axis=0) for label in CLASSES])


NO_SPREAD_HINT = (
    "identical class means, or no spread within the classes to whiten by: every sample of a class the same?"
)
"""The likely cause when a covariance-based probe finds no direction."""


def unit_vector(
    vector: Float[np.ndarray, " d_model"], *, what: str, hint: str = "are the two classes identical?"
) -> Float[np.ndarray, " d_model"]:
    """Normalise ``vector`` to unit L2 norm.

    Args:
        vector: The vector to normalise.
        what: Name used in the error message.
        hint: The likely cause, said in the error message.

    Returns:
        ``vector / ||vector||``.

    Raises:
        ValueError: If the norm is zero or not finite (e.g. identical class means).
    """
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"cannot normalise the {what}: its norm is {norm} ({hint})")
    return vector / norm


def _forgetting_fit(fit: Callable[..., Any]) -> Callable[..., Any]:
    """``fit`` that starts from, and on failure returns to, an unfitted probe."""
    if getattr(fit, "_forgets", False):
        return fit

    @functools.wraps(fit)
    def wrapped(self: BaseProbe, X: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        self._forget_fit()
        try:
            return fit(self, X, y, *args, **kwargs)
        except BaseException:
            self._forget_fit()
            raise

    wrapped._forgets = True  # type: ignore[attr-defined]
    return wrapped


class BaseProbe(ClassifierMixin, BaseEstimator):
    """Binary probe base: validation helpers plus ``predict`` and ``score`` from ``decision_function``.

    Subclasses implement ``fit`` and ``decision_function``; positive decisions mean harmful. The mixin
    is listed before ``BaseEstimator`` as scikit-learn requires for its tags to resolve.

    Every subclass's ``fit`` forgets the previous fit's learned attributes first, and again if it fails, so a
    failed (re)fit leaves an unfitted probe that says so (``NotFittedError``), never a half-fitted one or the old
    fit at a width the new data no longer has.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "fit" in cls.__dict__:
            cls.fit = _forgetting_fit(cls.__dict__["fit"])

    def _forget_fit(self) -> None:
        for name in [n for n in vars(self) if n.endswith("_") and not n.startswith("_")]:
            delattr(self, name)

    def _validate_fit_data(
        self, X: Any, y: Any
    ) -> tuple[Float[np.ndarray, "n_samples d_model"], Int[np.ndarray, " n_samples"]]:
        """Convert training data and record ``n_features_in_`` and ``classes_``."""
        array = check_activations(X)
        labels = check_labels(y, array.shape[0])
        self.n_features_in_ = array.shape[1]
        self.classes_ = CLASSES.copy()
        return array, labels

    def _validate_predict_data(self, X: Any) -> Float[np.ndarray, "n_samples d_model"]:
        """Check the probe is fitted and convert ``X``, checking its width against training."""
        check_is_fitted(self)
        array = check_activations(X)
        if array.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {array.shape[1]} features but {type(self).__name__} was fitted with "
                f"{self.n_features_in_}"
            )
        return array

    def decision_function(self, X: Any) -> Float[np.ndarray, " n_samples"]:
        """Signed score per row; positive means harmful. Implemented by subclasses."""
        raise NotImplementedError

    def predict(self, X: Any) -> Int[np.ndarray, " n_samples"]:
        """Predict labels: 1 (harmful) where ``decision_function`` is positive, else 0.

        Args:
            X: Inputs accepted by this probe's ``decision_function``.

        Returns:
            Labels in ``classes_``, shape (n_samples,).
        """
        decisions = self.decision_function(X)  # first, so an unfitted probe raises NotFittedError
        return self.classes_[(decisions > 0).astype(np.int64)]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy of ``predict(X)`` against ``y`` (labels may be a torch tensor).

        Args:
            X: Inputs accepted by this probe's ``decision_function``.
            y: True labels, 1 = harmful, 0 = harmless.
            sample_weight: Optional per-sample weights.

        Returns:
            Accuracy in [0, 1].
        """
        predictions = self.predict(X)
        labels = check_labels(y, predictions.shape[0], require_both_classes=False)
        weights = None if sample_weight is None else to_float64_numpy(sample_weight)
        return float(accuracy_score(labels, predictions, sample_weight=weights))
