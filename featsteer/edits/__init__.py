"""Permanent weight edits: abliteration, norm-preserving abliteration, reverse abliteration, bias addition, token addition, export."""

from featsteer.edits.apply import EDIT_MODES, EditConfig, EditHandle, apply_edit, edited_tensors
from featsteer.edits.biases import BIAS_DECAY, add_through_biases
from featsteer.edits.kernel import LayerKernel
from featsteer.edits.tokens import add_at_tokens, template_tokens
from featsteer.edits.weights import (
    add_to_bias,
    amplify_weight,
    norm_preserving_orthogonalize,
    orthogonalize_bias,
    orthogonalize_weight,
)

__all__ = [
    "BIAS_DECAY",
    "EDIT_MODES",
    "EditConfig",
    "EditHandle",
    "LayerKernel",
    "add_at_tokens",
    "add_through_biases",
    "add_to_bias",
    "amplify_weight",
    "apply_edit",
    "edited_tensors",
    "norm_preserving_orthogonalize",
    "orthogonalize_bias",
    "orthogonalize_weight",
    "template_tokens",
]
