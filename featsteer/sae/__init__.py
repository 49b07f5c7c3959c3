"""sae_lens SAEs on featsteer models: load and validate, encode activations, measure, and steer features.

featsteer has no SAE class of its own: every SAE is a `sae_lens.SAE`, attached at its
`cfg.metadata.hook_name`: a `d_model`-wide hook point, or `blocks.{l}.attn.hook_z` for attention-output SAEs that
read the heads side by side (see `featsteer.sae.heads`). Train new ones with `featsteer-train-sae` (package
`sae_training`).
"""

from featsteer.sae.encoding import (
    NORMALISED_UNIT,
    check_finite,
    decode_features,
    encode_activations,
    input_scales,
    reconstruct,
)
from featsteer.sae.heads import flat_rows, reads_heads, reshapes_heads
from featsteer.sae.loading import (
    check_finite_weights,
    load_sae,
    load_sae_source,
    load_saes,
    sae_hook_name,
    sae_map_of,
    validate_sae,
    validated_sae_map,
)
from featsteer.sae.metrics import (
    ReconstructionStats,
    SpliceLoss,
    next_token_loss,
    reconstruction_stats,
    splice_loss,
)
from featsteer.sae.steering import (
    EDIT_MODES,
    SPLICE_POSITIONS,
    FeatureEdit,
    FeatureSteer,
    edit_features,
    inside_domain,
    outside_domain,
    sae_hook,
    splice_activation,
    splice_sae,
)

__all__ = [
    "EDIT_MODES",
    "NORMALISED_UNIT",
    "SPLICE_POSITIONS",
    "FeatureEdit",
    "FeatureSteer",
    "ReconstructionStats",
    "SpliceLoss",
    "check_finite",
    "check_finite_weights",
    "decode_features",
    "edit_features",
    "encode_activations",
    "flat_rows",
    "input_scales",
    "inside_domain",
    "load_sae",
    "load_sae_source",
    "load_saes",
    "next_token_loss",
    "reconstruct",
    "reconstruction_stats",
    "reshapes_heads",
    "sae_hook",
    "sae_hook_name",
    "sae_map_of",
    "outside_domain",
    "reads_heads",
    "splice_activation",
    "splice_loss",
    "splice_sae",
    "validate_sae",
    "validated_sae_map",
]
