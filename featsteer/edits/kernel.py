"""Per-layer edit strength from a layer kernel (peak, width, max and min weight).

Abliterating every layer with full strength is rarely best; a kernel concentrates the edit around the
layer where the direction was found and tapers it linearly to `min_weight` at `width` layers away
(zero beyond). Attention and MLP writers get separate kernels, as in heretic's search space.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from featsteer.errors import FeatsteerError


@dataclass(frozen=True)
class LayerKernel:
    """Linear taper of edit strength around a peak layer."""

    peak: float
    """Layer (fractional allowed) where strength is `max_weight`."""
    width: float
    """Distance in layers at which strength has fallen to `min_weight`; layers further away get 0."""
    max_weight: float = 1.0
    """Strength at the peak."""
    min_weight: float = 1.0
    """Strength at distance `width`."""

    def __post_init__(self) -> None:
        bad = {name: value for name, value in asdict(self).items() if not math.isfinite(float(value))}
        if bad:  # a NaN strength writes NaN into every weight it reaches
            raise FeatsteerError(f"LayerKernel {', '.join(f'{k}={v}' for k, v in bad.items())}: give finite numbers")
        if self.width < 0:  # every layer would be further away than that: nothing edited, without a word
            raise FeatsteerError(f"LayerKernel width={self.width} reaches no layer: give a width >= 0")

    def strength(self, layer: int) -> float:
        """Edit strength for one layer."""
        distance = abs(layer - self.peak)
        if distance > self.width:
            return 0.0
        fraction = distance / self.width if self.width > 0 else 0.0
        return self.max_weight + (self.min_weight - self.max_weight) * fraction

    @classmethod
    def uniform(cls, n_layers: int, weight: float = 1.0) -> LayerKernel:
        """Every layer at the same strength (classic abliteration)."""
        return cls(peak=0.0, width=float(max(n_layers, 1)), max_weight=weight, min_weight=weight)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LayerKernel:
        """Inverse of `to_dict`."""
        return cls(**data)
