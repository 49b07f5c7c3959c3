"""Streaming first and second moments in float64.

Difference-in-means directions are differences of two nearly equal large vectors, so means are
accumulated in float64 batch by batch (Chan et al.'s parallel update) rather than from a float32 sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from featsteer.errors import FeatsteerError


@dataclass
class RunningMoments:
    """Mean and (optionally) covariance of a stream of `(n, d)` batches, in float64."""

    d: int
    """Vector width."""
    track_covariance: bool = False
    """Also accumulate the `(d, d)` scatter matrix (costs d*d*8 bytes)."""
    count: int = 0
    mean: Tensor = field(init=False)
    _scatter: Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.mean = torch.zeros(self.d, dtype=torch.float64)
        if self.track_covariance:
            self._scatter = torch.zeros(self.d, self.d, dtype=torch.float64)

    def update(self, batch: Tensor) -> None:
        """Fold a `(n, d)` batch into the running statistics."""
        if batch.shape[0] == 0:
            return
        values = batch.detach().to("cpu", torch.float64)
        n_new = values.shape[0]
        batch_mean = values.mean(0)
        total = self.count + n_new
        delta = batch_mean - self.mean
        if self._scatter is not None:
            centred = values - batch_mean
            self._scatter += centred.T @ centred + torch.outer(delta, delta) * (self.count * n_new / total)
        self.mean += delta * (n_new / total)
        self.count = total

    def state(self) -> dict[str, Tensor]:
        """The tensors `from_state` rebuilds these moments from: `mean`, and `scatter` when covariance is tracked."""
        return {"mean": self.mean} if self._scatter is None else {"mean": self.mean, "scatter": self._scatter}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], count: int) -> RunningMoments:
        """Moments of `count` vectors from a `state()`; they can be updated further."""
        moments = cls(d=int(state["mean"].shape[0]))
        moments.mean, moments.count = state["mean"].to(torch.float64), int(count)
        if "scatter" in state:
            moments.track_covariance, moments._scatter = True, state["scatter"].to(torch.float64)
        return moments

    @property
    def covariance(self) -> Tensor:
        """Unbiased covariance `(d, d)`; requires `track_covariance=True` and at least two vectors."""
        if self._scatter is None:
            raise FeatsteerError("covariance was not tracked: capture with covariance=True")
        if self.count < 2:
            raise FeatsteerError("covariance needs at least two vectors: capture more prompts")
        return self._scatter / (self.count - 1)
