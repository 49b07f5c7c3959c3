"""Evaluation of model behaviour: refusal detection and rate statistics.

Every benchmark and behavioural test needs the same answer to "did the model refuse?" and the same
uncertainty on a refusal rate, so both live here rather than in each caller.
"""

from featsteer.evaluation.metrics import (
    CrossEntropyResult,
    KLBase,
    RefusalTokens,
    first_token_logprobs,
    kl_answered,
    kl_first_token,
    kl_per_prompt,
    over_refusal_rate,
    refusal_logit_gap,
    refusal_score,
    response_cross_entropy,
    target_token_probability,
)
from featsteer.evaluation.refusal import (
    DEFAULT_REFUSAL_MARKERS,
    RateEstimate,
    RefusalDetector,
    normalize_text,
    refusal_rate,
    wilson_interval,
)

__all__ = [
    "CrossEntropyResult",
    "KLBase",
    "RefusalTokens",
    "first_token_logprobs",
    "kl_answered",
    "kl_first_token",
    "kl_per_prompt",
    "over_refusal_rate",
    "refusal_logit_gap",
    "refusal_score",
    "response_cross_entropy",
    "target_token_probability",
    "DEFAULT_REFUSAL_MARKERS",
    "RateEstimate",
    "RefusalDetector",
    "normalize_text",
    "refusal_rate",
    "wilson_interval",
]
