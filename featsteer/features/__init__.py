"""Find the SAE features behind refusal: score every feature on harmful vs harmless activations, rank
them, and turn the best into `DirectionSet`s for the usual interventions."""

from featsteer.features.directions import decoder_directions, orthonormal_basis, top_feature_directions
from featsteer.features.scoring import (
    METRICS,
    FeatureScores,
    auroc,
    cohens_d,
    hook_layer,
    score_feature_activations,
    score_features,
    score_prompts,
)

__all__ = [
    "METRICS",
    "FeatureScores",
    "auroc",
    "cohens_d",
    "decoder_directions",
    "hook_layer",
    "orthonormal_basis",
    "score_feature_activations",
    "score_features",
    "score_prompts",
    "top_feature_directions",
]
