"""The one place where random number generators are seeded.

Why this module exists: probe results (label-shuffling controls, cross-validation, synthetic data in
tests) must be reproducible run to run. Library code therefore never touches global random state; it
takes an explicit ``numpy.random.Generator`` built by :func:`as_generator`. Scripts and notebooks that
also drive third-party code relying on global state call :func:`seed_everything` once at start-up.
Nothing here reads or sets global state at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import random

import numpy as np

__all__ = ["as_generator", "seed_everything"]


def as_generator(seed: int | np.random.Generator) -> np.random.Generator:
    """Return a numpy ``Generator`` for ``seed``, passing an existing generator through unchanged.

    Args:
        seed: A non-negative integer seed, or a generator to reuse (so callers can share one stream).

    Returns:
        A ``numpy.random.Generator``.

    Raises:
        TypeError: If ``seed`` is neither an integer nor a ``Generator`` (``None`` is refused on
            purpose: an unseeded generator would make results irreproducible).
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    raise TypeError(f"seed must be an int or a numpy.random.Generator, got {type(seed).__name__}")


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python's ``random``, numpy's legacy global generator and torch (when installed).

    Library code in ``probes`` does not depend on these global generators; this function is for entry
    points (CLI, notebooks, benchmarks) that call third-party code which does.

    Args:
        seed: Non-negative integer seed.

    Returns:
        A fresh ``numpy.random.Generator`` seeded with ``seed``, to be passed explicitly onwards.
    """
    generator = as_generator(seed)
    random.seed(seed)
    np.random.seed(seed)  # deliberately: third-party code reads the legacy global state
    if importlib.util.find_spec("torch") is not None:
        torch = importlib.import_module("torch")
        torch.manual_seed(seed)
    return generator
