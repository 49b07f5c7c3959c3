"""What an intervention does to one activation, as pure functions of `(activation, direction)`.

Kept apart from *where* they attach (see `featsteer.interventions.steering`), so the same operation
runs as a hook at any TransformerLens hook point and is unit-testable without a model.
All take `x: (batch, pos, d_model)` and a direction `(d_model,)` or orthonormal basis `(k, d_model)`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_basis(direction: Tensor) -> Tensor:
    """View a `(d_model,)` direction as a `(1, d_model)` basis; pass bases through."""
    return direction[None, :] if direction.dim() == 1 else direction


def ablate(x: Tensor, basis: Tensor) -> Tensor:
    """Remove the component of `x` in the span of `basis` (directional ablation)."""
    b = as_basis(basis).to(x.dtype)
    return x - (x @ b.T) @ b


def add(x: Tensor, direction: Tensor, scale: float) -> Tensor:
    """Activation addition: `x + scale * direction`."""
    return x + scale * direction.to(x.dtype)


def project_set(x: Tensor, direction: Tensor, value: float) -> Tensor:
    """Set the projection of `x` on the unit `direction` to `value` (e.g. the mean harmful projection)."""
    d = direction.to(x.dtype)
    return x + (value - x @ d)[..., None] * d


def cosine_to(x: Tensor, vector: Tensor) -> Tensor:
    """Cosine similarity of each `(..., d_model)` row with `vector`."""
    v = vector.to(x.dtype)
    return (x @ v) / (x.norm(dim=-1) * v.norm()).clamp_min(torch.finfo(x.dtype).tiny)
