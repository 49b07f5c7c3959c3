"""Evaluation of model behaviour: refusal detection, rate statistics and whether responses are still language.

Every benchmark and behavioural test needs the same answer to "did the model refuse?", "did it break?" and the
same uncertainty on a rate, so they live here rather than in each caller.
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
from featsteer.evaluation.quality import Loop, LoopDetector, LoopTail, looping_rate
from featsteer.evaluation.refusal import (
    DEFAULT_REFUSAL_MARKERS,
    RateEstimate,
    RefusalDetector,
    normalize_text,
    refusal_rate,
    wilson_interval,
)
from featsteer.evaluation.response_kl import ResponseBase, ResponseKL, response_base, response_kl

__all__ = [
    "CrossEntropyResult",
    "Loop",
    "LoopDetector",
    "LoopTail",
    "looping_rate",
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
    "ResponseBase",
    "ResponseKL",
    "response_base",
    "response_kl",
    "target_token_probability",
    "DEFAULT_REFUSAL_MARKERS",
    "RateEstimate",
    "RefusalDetector",
    "normalize_text",
    "refusal_rate",
    "wilson_interval",
]
