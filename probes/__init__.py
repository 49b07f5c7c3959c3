"""Probes: scikit-learn-style estimators that find the harmful/harmless direction in activations.

Why this package exists: it is the pure-numerics layer of featsteer. It takes activations (numpy
arrays or torch tensors, one row per prompt) and binary labels (1 = harmful, 0 = harmless) and
returns fitted estimators whose ``direction_`` is a float64 unit vector in activation space pointing
from harmless towards harmful, ready to become a steering or ablation direction. It depends only on
numpy, scipy, scikit-learn and matplotlib - never on ``featsteer`` - so it can be tested and reused
without a model.

Every probe follows scikit-learn's estimator contract (``__init__`` stores hyper-parameters,
``fit`` returns ``self``, learned state ends in ``_``, ``clone``/``get_params`` work) and exposes
``decision_function`` (positive = harmful), ``predict``, ``score`` (accuracy), ``classes_`` and
``direction_``.
"""

from probes._random import as_generator, seed_everything
from probes.base import (
    HARMFUL,
    HARMLESS,
    Activations,
    BaseProbe,
    Labels,
    check_activations,
    check_labels,
)
from probes.controls import ControlTask, PermutationControl, SelectivityResult, SurfaceControl, selectivity
from probes.ensemble import LayerEnsemble, check_layer_stack
from probes.linear import DiffMeanProbe, LinearProbe
from probes.mahalanobis import MahalanobisProbe
from probes.sweep import LayerSplit, SweepRow, best_row, layer_sweep, plot_sweep, sweep_table, training_cv
from probes.whitened import WhitenedProbe

__all__ = [
    "HARMFUL",
    "HARMLESS",
    "Activations",
    "BaseProbe",
    "ControlTask",
    "DiffMeanProbe",
    "Labels",
    "LayerEnsemble",
    "LayerSplit",
    "LinearProbe",
    "MahalanobisProbe",
    "PermutationControl",
    "SelectivityResult",
    "SurfaceControl",
    "SweepRow",
    "WhitenedProbe",
    "as_generator",
    "best_row",
    "check_activations",
    "check_labels",
    "check_layer_stack",
    "layer_sweep",
    "plot_sweep",
    "seed_everything",
    "selectivity",
    "sweep_table",
    "training_cv",
]
