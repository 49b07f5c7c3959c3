"""Directions in activation space: the `DirectionSet` type, the methods that find them, and selection.

`select_direction` (Arditi et al. selection) lives in `featsteer.directions.selection`; it is imported
lazily by callers because it needs the evaluation metrics.
"""

from featsteer.directions.affirm import affirmative_opening
from featsteer.directions.dim import Separability, difference_in_means, separability
from featsteer.directions.directions import DirectionSet, unit
from featsteer.directions.geometry import (
    ClassProjection,
    DirectionGeometry,
    HeadAttribution,
    LogitLens,
    class_projections,
    head_attribution,
    layer_cosines,
    logit_lens,
    logit_lenses,
)
from featsteer.directions.methods import (
    METHODS,
    find_directions,
    paired_pca,
    projected_dim,
    rotation_plane,
    svd_subspace,
    weighted_basis,
)
from featsteer.directions.readers import DirectionReaders, ReaderRow, direction_readers
from featsteer.directions.repair import RepairRow, SelfRepair, self_repair
from featsteer.directions.sample_size import SampleSize, sample_size, sample_size_table

__all__ = [
    "METHODS",
    "ClassProjection",
    "DirectionGeometry",
    "DirectionSet",
    "HeadAttribution",
    "LogitLens",
    "RepairRow",
    "SampleSize",
    "SelfRepair",
    "Separability",
    "affirmative_opening",
    "class_projections",
    "difference_in_means",
    "find_directions",
    "head_attribution",
    "layer_cosines",
    "logit_lens",
    "logit_lenses",
    "paired_pca",
    "projected_dim",
    "rotation_plane",
    "sample_size",
    "sample_size_table",
    "self_repair",
    "DirectionReaders",
    "ReaderRow",
    "direction_readers",
    "separability",
    "svd_subspace",
    "unit",
    "weighted_basis",
]
