"""Evaluation of model behaviour: refusal detection and rate statistics.

Every benchmark and behavioural test needs the same answer to "did the model refuse?" and the same
uncertainty on a refusal rate, so both live here rather than in each caller.
"""

from featsteer.evaluation.refusal import (
    DEFAULT_REFUSAL_MARKERS,
    RateEstimate,
    RefusalDetector,
    normalize_text,
    refusal_rate,
    wilson_interval,
)

__all__ = [
    "DEFAULT_REFUSAL_MARKERS",
    "RateEstimate",
    "RefusalDetector",
    "normalize_text",
    "refusal_rate",
    "wilson_interval",
]
