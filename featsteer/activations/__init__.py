"""Activation capture: prompts in, one `ActivationSet` out (in memory or streamed to disk)."""

from featsteer.activations.capture import attention_width, capture, hook_width, output_projection
from featsteer.activations.positions import Positions
from featsteer.activations.stats import RunningMoments
from featsteer.activations.store import ActivationReader, ActivationSet, ShardWriter

__all__ = ["ActivationReader", "ActivationSet", "Positions", "RunningMoments", "ShardWriter", "attention_width", "capture", "hook_width", "output_projection"]
