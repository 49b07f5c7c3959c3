"""Permanent weight edits: abliteration, norm-preserving abliteration, reverse abliteration, export."""

from featsteer.edits.apply import EDIT_MODES, EditConfig, EditHandle, apply_edit, edited_tensors
from featsteer.edits.kernel import LayerKernel
from featsteer.edits.weights import (
    add_to_bias,
    amplify_weight,
    norm_preserving_orthogonalize,
    orthogonalize_bias,
    orthogonalize_weight,
)

__all__ = [
    "EDIT_MODES",
    "EditConfig",
    "EditHandle",
    "LayerKernel",
    "add_to_bias",
    "amplify_weight",
    "apply_edit",
    "edited_tensors",
    "norm_preserving_orthogonalize",
    "orthogonalize_bias",
    "orthogonalize_weight",
]
