"""Selectivity: how far a probe's held-out accuracy stands above what the same probe reaches on a control task.

Why this module exists: a flexible probe on thousands of dimensions can score well above chance on
structure unrelated to the concept (Hewitt & Liang 2019, "Designing and Interpreting Probes with
Control Tasks"). A control task relabels the training and the test prompts; the same probe, cloned, is
trained on the control training labels and scored against the control test labels. Selectivity is the
real accuracy minus that control accuracy. Two control tasks are offered:

- :class:`SurfaceControl`, Hewitt & Liang's design: every prompt's label is a seeded random function of a
  surface key (its first word, its length bucket...), the same function for the training and the test
  prompts. A probe that reads the surface form from the activations can learn it, so its control accuracy
  rises above chance and its selectivity falls: the probe could have scored that much from phrasing alone.
- :class:`PermutationControl`, the permutation null: the labels of each split are permuted independently,
  so they carry nothing a probe could learn and the control accuracy sits at chance for the split's balance
  (selectivity is then accuracy minus about 0.5). It detects nothing; it is the baseline the surface
  control is read against.

Either control is scored against its own labels, not the real ones: a probe fitted to shuffled labels still
finds the dominant harmful/harmless axis of the activations, with a random sign, so against the real labels
its accuracy is bimodal (0.09 to 0.91 across shuffles on the organism) and says nothing about the probe.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from jaxtyping import Int
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from probes._random import as_generator
from probes.base import check_labels

__all__ = ["ControlTask", "PermutationControl", "SelectivityResult", "SurfaceControl", "selectivity"]


class ControlTask(Protocol):
    """What :func:`selectivity` needs of a control task: a name and a seeded relabelling of both splits."""

    @property
    def name(self) -> str:
        """How reports name the control, e.g. ``"permutation"`` or ``"surface:first-words:1"``."""
        ...

    def relabel(
        self, y_train: Int[np.ndarray, " n_train"], y_test: Int[np.ndarray, " n_test"], rng: np.random.Generator
    ) -> tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_test"]]:
        """One draw of control labels for the training and the test prompts."""
        ...


@dataclass(frozen=True)
class PermutationControl:
    """The permutation null: each split's labels permuted on their own (class balance kept), learnable by nothing."""

    name: str = "permutation"
    """How reports name the control."""

    def relabel(
        self, y_train: Int[np.ndarray, " n_train"], y_test: Int[np.ndarray, " n_test"], rng: np.random.Generator
    ) -> tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_test"]]:
        """A permutation of ``y_train`` and, independently, one of ``y_test``."""
        return rng.permutation(y_train), rng.permutation(y_test)


@dataclass(frozen=True)
class SurfaceControl:
    """Labels that are a seeded random function of a surface key shared by the training and the test prompts.

    Each draw orders the distinct keys at random and gives each key, in turn, the control label that keeps the share
    of control-1 training prompts closest to the real label-1 share *within each real class*, a coin flip on a tie.
    Every prompt with the same key gets the same label in both splits, so a probe that reads the key from the
    activations can learn the control. The balance rule keeps the control's chance level near the real task's
    and its labels nearly uncorrelated with the real ones: where frames follow the real labels (harmful prompts
    mostly "How do I", harmless mostly "Explain"), a plain random function of the key would often repeat the real
    split, and a probe that reads only the content would score on it. A key that occurs only among the test
    prompts gets a coin flip; no probe can have learnt it.
    """

    train_keys: Sequence[Hashable]
    """Surface key of each training prompt, in the row order of ``X_train`` (e.g. its lower-cased first word)."""
    test_keys: Sequence[Hashable]
    """Surface key of each test prompt, in the row order of ``X_test``."""
    name: str = "surface"
    """How reports name the control, e.g. ``"surface:first-words:1"``."""
    _label_keys: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # keys are compared by their text so the order of the distinct keys, hence each seed's labels, is reproducible
        train, test = tuple(str(key) for key in self.train_keys), tuple(str(key) for key in self.test_keys)
        if len(set(train)) < 2:
            raise ValueError(f"control {self.name!r}: the surface key gives all {len(train)} training prompts the same key "
                             f"({train[0] if train else 'none'!r}), so its labels cannot have two classes; choose a finer key")
        object.__setattr__(self, "train_keys", train)
        object.__setattr__(self, "test_keys", test)
        object.__setattr__(self, "_label_keys", tuple(sorted(set(train) | set(test))))

    @property
    def n_keys(self) -> int:
        """Number of distinct keys over both splits."""
        return len(self._label_keys)

    @property
    def seen_share(self) -> float:
        """Share of the test prompts whose key also occurs among the training prompts: the control accuracy a probe
        that reads the key perfectly can reach is this plus half of the rest."""
        seen = set(self.train_keys)
        return sum(key in seen for key in self.test_keys) / max(len(self.test_keys), 1)

    def relabel(
        self, y_train: Int[np.ndarray, " n_train"], y_test: Int[np.ndarray, " n_test"], rng: np.random.Generator
    ) -> tuple[Int[np.ndarray, " n_train"], Int[np.ndarray, " n_test"]]:
        """One seeded random key -> label function, applied to both splits.

        Raises:
            ValueError: If the keys do not match the labels in number, or the draw leaves the training prompts
                one class (possible with very few keys).
        """
        for split, keys, labels in (("training", self.train_keys, y_train), ("test", self.test_keys, y_test)):
            if len(keys) != len(labels):
                raise ValueError(f"control {self.name!r}: {len(keys)} {split} keys for {len(labels)} {split} labels; "
                                 f"give one key per {split} prompt, in the same order")
        target = float(np.mean(y_train))
        # per key: its training prompts of each real class; per real class: prompts labelled so far, and of those control-1
        counts = {key: np.zeros(2) for key in self._label_keys}
        for key, label in zip(self.train_keys, y_train, strict=True):
            counts[key][label] += 1
        labelled, positive, mapping = np.zeros(2), np.zeros(2), {}
        for index in rng.permutation(len(self._label_keys)):
            key = self._label_keys[index]
            labelled += counts[key]
            miss_if_one = np.abs(positive + counts[key] - target * labelled).sum()
            miss_if_zero = np.abs(positive - target * labelled).sum()
            mapping[key] = int(miss_if_one < miss_if_zero or (miss_if_one == miss_if_zero and rng.random() < 0.5))
            positive += counts[key] * mapping[key]
        control_train = np.array([mapping[key] for key in self.train_keys], dtype=np.int64)
        control_test = np.array([mapping[key] for key in self.test_keys], dtype=np.int64)
        if control_train.min() == control_train.max():
            raise ValueError(f"control {self.name!r}: one draw gave all {len(control_train)} training prompts the same label "
                             f"(they have only {len(set(self.train_keys))} keys); choose a finer key")
        return control_train, control_test


@dataclass(frozen=True)
class SelectivityResult:
    """Held-out scores of a probe and of its control task."""

    accuracy: float
    """Test accuracy of the probe trained on the real labels."""
    control_accuracy: float
    """Mean test accuracy of clones trained on the control's training labels, scored against its test labels."""
    selectivity: float
    """``accuracy - control_accuracy``."""
    auroc: float
    """Test AUROC of the real probe's ``decision_function``."""
    control_accuracies: tuple[float, ...] = ()
    """Control accuracy of every draw of control labels, in order."""
    control: str = "permutation"
    """Name of the control task (:class:`PermutationControl` or :class:`SurfaceControl`)."""

    @property
    def control_std(self) -> float:
        """Standard deviation (ddof 1) of ``control_accuracies``: how far ``selectivity`` moves with the relabelling
        alone. NaN with fewer than two draws."""
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
    control: ControlTask | None = None,
) -> SelectivityResult:
    """Accuracy, AUROC and control-task accuracy of a probe on a train/test split.

    ``probe`` itself is never fitted: every fit uses a ``sklearn.base.clone`` of it. Each of the ``n_shuffles``
    draws relabels both splits with ``control`` (default: :class:`PermutationControl`) from ``seed``, fits on the
    control training labels and is scored against the control test labels, so results are reproducible and the
    same seed gives the same relabellings for every layer of a sweep.

    Args:
        probe: Any estimator with ``fit``, ``decision_function`` and ``score`` (every ``probes``
            estimator, including ``LayerEnsemble`` with per-layer inputs).
        X_train: Training inputs in whatever form ``probe`` accepts.
        y_train: Training labels, 1 = harmful, 0 = harmless.
        X_test: Test inputs.
        y_test: Test labels; both classes must be present (for AUROC).
        n_shuffles: Number of control relabellings to average (at least 1).
        seed: Seed or generator for the relabellings.
        control: The control task; ``None`` is the permutation null.

    Returns:
        A :class:`SelectivityResult`.

    Raises:
        ValueError: If ``n_shuffles < 1``, labels are malformed or the control's keys do not match them.
    """
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be at least 1, got {n_shuffles}")
    control = PermutationControl() if control is None else control
    rng = as_generator(seed)
    train_labels = check_labels(y_train, name="y_train")
    test_labels = check_labels(y_test, name="y_test")
    fitted = clone(probe).fit(X_train, train_labels)
    accuracy = float(fitted.score(X_test, test_labels))
    auroc = float(roc_auc_score(test_labels, fitted.decision_function(X_test)))
    controls = []
    for _ in range(n_shuffles):
        control_train, control_test = control.relabel(train_labels, test_labels, rng)
        controls.append(float(clone(probe).fit(X_train, control_train).score(X_test, control_test)))
    controls = tuple(controls)
    control_accuracy = float(np.mean(controls))
    return SelectivityResult(
        accuracy=accuracy,
        control_accuracy=control_accuracy,
        selectivity=accuracy - control_accuracy,
        auroc=auroc,
        control_accuracies=controls,
        control=control.name,
    )
