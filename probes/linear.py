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
from sklearn.metrics import get_scorer
from sklearn.model_selection import BaseCrossValidator, check_cv
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

    The regularisation is selected by a plain fold loop over ``LogisticRegression`` rather than
    ``LogisticRegressionCV``, whose defaults and fitted attributes are being changed across
    scikit-learn 1.8-1.12. The loop gives what ``GridSearchCV`` over a scaler + model pipeline gives
    (the same folds, every ``C`` fitted from scratch on each, the fold-mean score, the first best ``C``
    on ties, then a refit on all data) without its per-fit cloning and bookkeeping, which cost more
    than the small fits themselves. When ``standardize`` is true the model is fitted on z-scored
    features and mapped back, so ``coef_``/``intercept_`` always act on raw activations: with
    ``z = (x - mean) / scale``, ``w_x = w_z / scale`` and ``b_x = b_z - w_x . mean``. Each
    cross-validation fold is scaled with statistics of its own training rows only: the held-out rows
    never inform the choice of ``C``.

    Args:
        Cs: Candidate inverse regularisation strengths, or an int ``k`` for ``k`` values log-spaced in
            [1e-4, 1e4] (as in ``LogisticRegressionCV``).
        cv: Number of stratified folds (unshuffled, hence deterministic) or a scikit-learn splitter.
        class_weight: ``"balanced"`` to weight classes inversely to their frequency, or ``None``.
        standardize: Whether to z-score features before fitting (scale-free regularisation).
        scoring: Scikit-learn scorer name used to choose ``C``.
        max_iter: Maximum lbfgs iterations per fit. At the default grid's largest ``C`` (1e4, nearly
            unregularised) on correlated features and classes that do not separate (the shuffled and surface
            control labels), lbfgs needs 1000-2200 iterations to reach its tolerance, so the default leaves
            room; every fit it reaches in fewer iterations is unchanged by the cap. A fit that still stops at
            the cap warns with scikit-learn's ``ConvergenceWarning``.

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
        max_iter: int = 10_000,
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
        self.cv_scores_ = self._cross_validated_scores(X, y)
        # the first best C wins a tie, as GridSearchCV's rank_test_score.argmin(); NaN scores (failed scoring) rank last
        best = 0 if np.isnan(self.cv_scores_).all() else int(np.nanargmax(self.cv_scores_))
        self.C_ = float(self.Cs_[best])
        scaler = StandardScaler().fit(X) if self.standardize else None
        model = self._model(self.C_).fit(_scaled(scaler, X), y)
        self.feature_mean_ = scaler.mean_ if scaler is not None else np.zeros(X.shape[1])
        self.feature_scale_ = scaler.scale_ if scaler is not None else np.ones(X.shape[1])
        weights = model.coef_[0].astype(np.float64) / self.feature_scale_
        self.coef_ = weights[np.newaxis, :]
        self.intercept_ = np.array([float(model.intercept_[0]) - float(weights @ self.feature_mean_)])
        self.direction_ = unit_vector(weights, what="logistic-regression weight vector")
        return self

    def _model(self, C: float) -> LogisticRegression:
        """An unfitted logistic regression at inverse regularisation strength ``C``."""
        return LogisticRegression(C=C, class_weight=self.class_weight, max_iter=self.max_iter)

    def _cross_validated_scores(self, X: Float[np.ndarray, "n_samples d_model"], y: np.ndarray) -> Float[np.ndarray, " n_Cs"]:
        """Mean held-out score of every candidate ``C`` over the folds, each ``C`` fitted from scratch on each fold.

        The folds are ``check_cv(cv, y, classifier=True)``'s, as GridSearchCV's; the scaler is fitted once per fold on
        its training rows (it does not depend on ``C``); the score is ``get_scorer(scoring)`` on the held-out rows, or for
        the default ``neg_log_loss`` the same number computed directly (the scorer's input checks cost more than the fit).

        Raises:
            ValueError: If a fold of a custom splitter trains on one class only.
        """
        scorer = _neg_log_loss if self.scoring == "neg_log_loss" else get_scorer(self.scoring)
        fold_scores = []
        for train, held_out in check_cv(self.cv, y, classifier=True).split(X, y):
            if np.unique(y[train]).size < 2:
                raise ValueError(
                    f"{type(self).__name__}: a cross-validation fold trains on class {int(y[train][0])} only: give a "
                    "stratified splitter (or an int cv) and samples of both classes in every training fold"
                )
            scaler = StandardScaler().fit(X[train]) if self.standardize else None
            X_train, X_held_out = _scaled(scaler, X[train]), _scaled(scaler, X[held_out])
            fold_scores.append([float(scorer(self._model(float(C)).fit(X_train, y[train]), X_held_out, y[held_out]))
                                for C in self.Cs_])
        return np.average(np.asarray(fold_scores, dtype=np.float64).T, axis=1)

    def decision_function(self, X: Activations) -> Float[np.ndarray, " n_samples"]:
        """Logit of the harmful class, ``X @ coef_[0] + intercept_[0]``.

        Args:
            X: Activations (n_samples, d_model).

        Returns:
            Decisions of shape (n_samples,); positive means harmful.
        """
        X = self._validate_predict_data(X)
        return X @ self.coef_[0] + self.intercept_[0]


def _scaled(scaler: StandardScaler | None, X: Float[np.ndarray, "n_samples d_model"]) -> Float[np.ndarray, "n_samples d_model"]:
    """``X`` z-scored by a fitted scaler, or ``X`` itself without one."""
    return X if scaler is None else scaler.transform(X)


def _neg_log_loss(model: LogisticRegression, X: Float[np.ndarray, "n_samples d_model"], y: np.ndarray) -> float:
    """Scikit-learn's ``neg_log_loss`` scorer for a fitted binary model, computed the way it computes it.

    The harmful probability ``p`` is ``predict_proba``'s column 1, the harmless one ``1 - p``; both are clipped to
    ``[eps, 1 - eps]`` and the score is minus the mean of ``-log`` of the true class's probability.
    """
    harmful = model.predict_proba(X)[:, 1]
    eps = np.finfo(harmful.dtype).eps
    true_class = np.clip(np.where(y == 1, harmful, 1 - harmful), eps, 1 - eps)
    return -float(np.average(-np.log(true_class)))
