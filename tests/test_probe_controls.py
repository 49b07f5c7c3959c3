"""Control tasks of ``probes.selectivity``: a surface-keyed control a probe can learn, and the permutation null."""

from __future__ import annotations

import numpy as np
import pytest

from probes import DiffMeanProbe, LinearProbe, PermutationControl, SurfaceControl, layer_sweep, selectivity

N_FRAMES = 8


def framed_data(seed: int, n_samples: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The phrasing trap: 8 request frames, harmful prompts mostly in frames 0-3, harmless mostly in 4-7.

    Returns:
        (surface activations: a one-hot of the frame plus noise, so a probe reads only the phrasing; content
        activations: the label along one axis plus noise, the frame nowhere; labels; frame keys).
    """
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n_samples // 2)
    in_own_half = rng.random(n_samples) < 0.9
    half = np.where(in_own_half, y, 1 - y)  # harmful -> frames 0-3 (90%), harmless -> frames 4-7 (90%)
    frames = rng.integers(0, N_FRAMES // 2, n_samples) + (1 - half) * (N_FRAMES // 2)
    surface = np.eye(N_FRAMES)[frames] * 3.0 + 0.3 * rng.standard_normal((n_samples, N_FRAMES))
    content = rng.standard_normal((n_samples, 16))
    content[:, 0] += 4.0 * (y - 0.5)
    keys = np.array([f"frame {frame}" for frame in frames])
    return surface, content, y, keys


def _split(seed: int):
    surface, content, y, keys = framed_data(seed)
    train, test = slice(0, None, 2), slice(1, None, 2)
    control = SurfaceControl(keys[train], keys[test], name="surface:frame")
    return surface, content, y, train, test, control


@pytest.mark.parametrize("make", [DiffMeanProbe, lambda: LinearProbe(Cs=[1.0], cv=2)])
def test_a_surface_control_catches_a_probe_that_reads_the_phrasing_and_clears_one_that_reads_content(make):
    surface, content, y, train, test, control = _split(0)
    phrasing = selectivity(make(), surface[train], y[train], surface[test], y[test], n_shuffles=8, seed=0, control=control)
    meaning = selectivity(make(), content[train], y[train], content[test], y[test], n_shuffles=8, seed=0, control=control)
    # both classify the real labels well: the frames were chosen by label, 90% of the time
    assert phrasing.accuracy > 0.85 and meaning.accuracy > 0.9
    # only the phrasing probe learns a random function of the frame, so only its selectivity collapses
    assert phrasing.control_accuracy > 0.95 and phrasing.selectivity < 0.05
    assert abs(meaning.control_accuracy - 0.5) < 0.1 and meaning.selectivity > 0.35
    assert phrasing.control == meaning.control == "surface:frame"
    # the permutation null cannot tell the two apart: both controls sit at chance
    for X in (surface, content):
        null = selectivity(make(), X[train], y[train], X[test], y[test], n_shuffles=8, seed=0)
        assert abs(null.control_accuracy - 0.5) < 0.1 and null.selectivity > 0.3 and null.control == "permutation"


def test_surface_labels_are_one_seeded_function_of_the_key_shared_by_both_splits():
    _, _, y, train, test, control = _split(1)
    keys_train, keys_test = np.array(control.train_keys), np.array(control.test_keys)
    draws = [control.relabel(y[train], y[test], np.random.default_rng(seed)) for seed in range(6)]
    for labels_train, labels_test in draws:
        mapping = dict(zip(keys_train, labels_train, strict=True))
        assert all(mapping[key] == label for key, label in zip(keys_train, labels_train, strict=True))
        assert all(mapping[key] == label for key, label in zip(keys_test, labels_test, strict=True))
        # the balance rule keeps about half of each real class in each control class (8 frames of ~50 prompts each)
        assert 0.35 < np.concatenate([labels_train, labels_test]).mean() < 0.65
    assert len({tuple(labels) for labels, _ in draws}) > 1  # different seeds, different functions
    again = control.relabel(y[train], y[test], np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(again, draws[3], strict=True))
    # keys are matched by their text, whatever the order of the rows
    order = np.random.default_rng(9).permutation(len(keys_train))
    shuffled = SurfaceControl(keys_train[order], keys_test, name="surface:frame")
    relabelled, _ = shuffled.relabel(y[train][order], y[test], np.random.default_rng(3))
    np.testing.assert_array_equal(relabelled, draws[3][0][order])


def test_the_permutation_control_is_the_default_and_unchanged():
    surface, _, y, train, test, _ = _split(2)
    split = (surface[train], y[train], surface[test], y[test])
    default = selectivity(DiffMeanProbe(), *split, n_shuffles=4, seed=5)
    assert default == selectivity(DiffMeanProbe(), *split, n_shuffles=4, seed=5, control=PermutationControl())
    rng = np.random.default_rng(5)
    expected = [
        DiffMeanProbe().fit(split[0], rng.permutation(split[1])).score(split[2], rng.permutation(split[3])) for _ in range(4)
    ]
    assert default.control_accuracies == tuple(expected)


def test_a_sweep_uses_the_same_surface_control_at_every_layer():
    surface, content, y, train, test, control = _split(3)
    splits = {name: (X[train], y[train], X[test], y[test]) for name, X in (("blocks.0", surface), ("blocks.1", content))}
    rows = layer_sweep(splits, DiffMeanProbe, n_shuffles=3, seed=0, control=control)
    for row, X in zip(rows, (surface, content), strict=True):
        alone = selectivity(DiffMeanProbe(), X[train], y[train], X[test], y[test], n_shuffles=3, seed=0, control=control)
        assert (row.control_accuracy, row.selectivity) == (alone.control_accuracy, alone.selectivity)
    assert rows[0].control_accuracy > 0.95 > 0.6 > rows[1].control_accuracy


def test_surface_control_errors_say_what_to_change():
    with pytest.raises(ValueError, match="same key .* choose a finer key"):
        SurfaceControl(["how"] * 6, ["how", "write"], name="surface:first-words:1")
    control = SurfaceControl(["how", "write", "how"], ["write"])
    with pytest.raises(ValueError, match="3 training keys for 4 training labels; give one key per training prompt"):
        control.relabel(np.array([0, 1, 0, 1]), np.array([1]), np.random.default_rng(0))
    # two keys, each holding one real class: some draws give both keys the same label
    split_by_class = SurfaceControl(["how"] * 5 + ["write"] * 5, ["how"])
    with pytest.raises(ValueError, match="gave all 10 training prompts the same label .* only 2 keys.*choose a finer key"):
        for seed in range(20):
            split_by_class.relabel(np.repeat([0, 1], 5), np.array([1]), np.random.default_rng(seed))


def test_seen_share_counts_test_prompts_whose_key_the_training_prompts_have():
    control = SurfaceControl(["how", "write", "how"], ["how", "explain", "write", "list"])
    assert control.seen_share == 0.5 and control.n_keys == 4
