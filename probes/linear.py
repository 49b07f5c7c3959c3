"""Linear probes read directly in activation space: difference in means and logistic regression.

Why this module exists: difference-in-means (DIM) is the standard way refusal directions are found
(Arditi et al. 2024) and is the baseline every other probe is compared with; logistic regression is the
discriminative counterpart. Both return a unit ``direction_`` in the original activation space so that
either can be handed to the same steering or ablation code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import BaseCrossValidator, GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from probes.base import Activations, BaseProbe, Labels, class_means, unit_vector

__all__ = ["DiffMeanProbe", "LinearProbe"]


class DiffMeanProbe(BaseProbe):
    """Difference-in-means probe: the direction from the harmless mean to the harmful mean.

    ``decision_function(X) = X @ direction_ - threshold_`` where ``threshold_`` is the midpoint of the
    two class means' projections, so the decision is in activation units along the unit direction.

    Attributes:
        direction_: Unit vector (d_model,), ``normalise(mean(harmful) - mean(harmless))``.
        location_: Class means (2, d_model), row 0 harmless, row 1 harmful.
        threshold_: Midpoint of the class-mean projections onto ``direction_``.
        classes_: ``array([0, 1])``.
        n_features_in_: d_model seen in ``fit``.
    """

    def fit(self, X: Activations, y: Labels) -> DiffMeanProbe:
        """Fit the class means and the direction between them.

        Args:
            X: Activations (n_samples, d_model), numpy or torch.
            y: Labels, 1 = harmful, 0 = harmless; both classes present.

        Returns:
            The fitted probe.

        Raises:
            ValueError: On NaN/inf in ``X``, bad labels, or identical class means.
        """
        X, y = self._validate_fit_data(X, y)
        self.location_ = class_means(X, y)
        self.direction_ = unit_vector(self.location_[1] - self.location_[0], what="difference in means")
        self.threshold_ = float(self.location_.mean(axis=0) @ self.direction_)
        return self

    def decision_function(self, X: Activations) -> Float[np.ndarray, " n_samples"]:
        """Projection onto ``direction_`` minus ``threshold_``; positive means harmful.

        Args:
            X: Activations (n_samples, d_model).

        Returns:
            Decisions of shape (n_samples,).
        """
        X = self._validate_predict_data(X)
        return X @ self.direction_ - self.threshold_


class LinearProbe(BaseProbe):
    """L2-regularised logistic regression with the strength chosen by stratified cross-validation.

    The regularisation is selected with ``GridSearchCV`` over plain ``LogisticRegression`` rather than
    ``LogisticRegressionCV``, whose defaults and fitted attributes are being changed across
    scikit-learn 1.8-1.12; the result is the same (best ``C`` on the CV score, then a refit on all
    data). When ``standardize`` is true the model is fitted on z-scored features and mapped back, so
    ``coef_``/``intercept_`` always act on raw activations: with ``z = (x - mean) / scale``,
    ``w_x = w_z / scale`` and ``b_x = b_z - w_x . mean``. The z-scoring is part of the searched pipeline,
    so each cross-validation fold is scaled with statistics of its own training rows only: the held-out
    rows never inform the choice of ``C``.

    Args:
        Cs: Candidate inverse regularisation strengths, or an int ``k`` for ``k`` values log-spaced in
            [1e-4, 1e4] (as in ``LogisticRegressionCV``).
        cv: Number of stratified folds (unshuffled, hence deterministic) or a scikit-learn splitter.
        class_weight: ``"balanced"`` to weight classes inversely to their frequency, or ``None``.
        standardize: Whether to z-score features before fitting (scale-free regularisation).
        scoring: Scikit-learn scorer name used to choose ``C``.
        max_iter: Maximum lbfgs iterations per fit.

    Attributes:
        direction_: Unit vector (d_model,), ``coef_[0] / ||coef_[0]||``, in raw activation space.
        coef_: Weights (1, d_model) in raw activation space.
        intercept_: Bias (1,) in raw activation space.
        C_: Selected inverse regularisation strength.
        Cs_: The candidate grid searched.
        cv_scores_: Mean cross-validated score per candidate in ``Cs_``.
        feature_mean_, feature_scale_: Standardisation statistics (zeros and ones if not standardised).
        classes_, n_features_in_: As for every probe.
    """

    def __init__(
        self,
        *,
        Cs: int | Sequence[float] = 10,
        cv: int | BaseCrossValidator = 5,
        class_weight: str | None = "balanced",
        standardize: bool = True,
        scoring: str = "neg_log_loss",
        max_iter: int = 1000,
    ) -> None:
        self.Cs = Cs
        self.cv = cv
        self.class_weight = class_weight
        self.standardize = standardize
        self.scoring = scoring
        self.max_iter = max_iter

    def _candidate_Cs(self) -> Float[np.ndarray, " n_Cs"]:
        if isinstance(self.Cs, (int, np.integer)):
            if self.Cs < 1:
                raise ValueError(f"Cs must be a positive int or a sequence of floats, got {self.Cs}")
            return np.logspace(-4, 4, int(self.Cs))
        grid = np.asarray(self.Cs, dtype=np.float64).ravel()
        if grid.size == 0 or (grid <= 0).any():
            raise ValueError(f"Cs must contain positive values, got {self.Cs}")
        return grid

    def fit(self, X: Activations, y: Labels) -> LinearProbe:
        """Choose ``C`` by cross-validation, refit on all data, and map weights to activation space.

        Args:
            X: Activations (n_samples, d_model), numpy or torch.
            y: Labels, 1 = harmful, 0 = harmless; both classes present.

        Returns:
            The fitted probe.

        Raises:
            ValueError: On NaN/inf in ``X``, bad labels, a bad ``Cs`` grid, or an all-zero weight vector.
        """
        X, y = self._validate_fit_data(X, y)
        self.Cs_ = self._candidate_Cs()
        if isinstance(self.cv, (int, np.integer)):
            smallest = int(np.bincount(y, minlength=2).min())
            if smallest < self.cv:
                raise ValueError(
                    f"{type(self).__name__}(cv={self.cv}) needs at least {self.cv} samples of each class for its "
                    f"cross-validation; the smaller class has {smallest}: give more samples or a smaller cv"
                )
        splitter = StratifiedKFold(n_splits=self.cv) if isinstance(self.cv, (int, np.integer)) else self.cv
        model = LogisticRegression(class_weight=self.class_weight, max_iter=self.max_iter)
        pipeline = Pipeline([("scale", StandardScaler() if self.standardize else "passthrough"), ("model", model)])
        search = GridSearchCV(pipeline, {"model__C": list(self.Cs_)}, scoring=self.scoring, cv=splitter, refit=True)
        search.fit(X, y)
        scaler, best = search.best_estimator_["scale"], search.best_estimator_["model"]
        self.feature_mean_ = scaler.mean_ if self.standardize else np.zeros(X.shape[1])
        self.feature_scale_ = scaler.scale_ if self.standardize else np.ones(X.shape[1])
        self.C_ = float(best.C)
        self.cv_scores_ = np.asarray(search.cv_results_["mean_test_score"], dtype=np.float64)
        weights = best.coef_[0].astype(np.float64) / self.feature_scale_
        self.coef_ = weights[np.newaxis, :]
        self.intercept_ = np.array([float(best.intercept_[0]) - float(weights @ self.feature_mean_)])
        self.direction_ = unit_vector(weights, what="logistic-regression weight vector")
        return self

    def decision_function(self, X: Activations) -> Float[np.ndarray, " n_samples"]:
        """Logit of the harmful class, ``X @ coef_[0] + intercept_[0]``.

        Args:
            X: Activations (n_samples, d_model).

        Returns:
            Decisions of shape (n_samples,); positive means harmful.
        """
        X = self._validate_predict_data(X)
        return X @ self.coef_[0] + self.intercept_[0]
