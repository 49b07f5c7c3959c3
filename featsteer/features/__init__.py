"""Find the SAE features behind refusal: score every feature on harmful vs harmless activations, rank
them, turn the best into `DirectionSet`s for the usual interventions (attention-output SAEs on hook_z included: their
head-space decoder rows are mapped through the output projection into the stream), and measure what each feature does
to refusal when it is suppressed or clamped."""

from featsteer.features.directions import (
    MAPPED_THROUGH,
    decoder_directions,
    orthonormal_basis,
    output_projection,
    residual_writes,
    top_feature_directions,
)
from featsteer.features.effects import (
    JUDGES,
    FeatureEffect,
    FeatureEffects,
    FeaturesNeeded,
    doubling_sizes,
    feature_effects,
    features_needed,
    max_feature_activations,
    screen_features,
)
from featsteer.features.scoring import (
    METRICS,
    UNITS,
    FeatureScores,
    auroc,
    cohens_d,
    decoder_norms,
    hook_layer,
    merge_sae_scores,
    score_feature_activations,
    score_features,
    score_prompts,
)

__all__ = [
    "JUDGES",
    "MAPPED_THROUGH",
    "METRICS",
    "UNITS",
    "FeatureEffect",
    "FeatureEffects",
    "FeatureScores",
    "FeaturesNeeded",
    "auroc",
    "cohens_d",
    "decoder_directions",
    "decoder_norms",
    "doubling_sizes",
    "feature_effects",
    "features_needed",
    "hook_layer",
    "max_feature_activations",
    "merge_sae_scores",
    "orthonormal_basis",
    "output_projection",
    "residual_writes",
    "score_feature_activations",
    "score_features",
    "score_prompts",
    "screen_features",
    "top_feature_directions",
]
