"""Weight edits as pure functions of `(weight, direction, strength)`.

Weights are in the orientation `ResidualWriter.read()` returns: `(d_model, d_in)`, rows index the residual
stream, so `W @ a` is what the module writes. Nothing here touches a model; `featsteer.edits.apply`
decides where results go and keeps the originals for an exact revert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from featsteer.interventions.operations import as_basis


def _basis64(direction: Tensor) -> Tensor:
    return as_basis(direction).double()


CHUNK_ELEMENTS = 1 << 24
"""Columns of a weight are edited in chunks of about this many elements (128 MiB in float64), so a large matrix (a
token embedding) never has a whole float64 copy, its projection and their difference alive at once."""


def _columnwise(weight: Tensor, edit) -> Tensor:
    """`edit(float64 columns) -> float64 columns`, applied chunk by chunk into a new tensor laid out like `weight` (its
    dtype, device and strides, so a transposed view gives a result whose transpose is contiguous). Every column is
    computed exactly as on the whole matrix: the edits here act on each column alone."""
    out = torch.empty_like(weight)
    step = max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
    for start in range(0, weight.shape[1], step):
        out[:, start : start + step] = edit(weight[:, start : start + step].double()).to(weight.dtype)
    return out


def orthogonalize_weight(weight: Tensor, direction: Tensor, strength: float = 1.0) -> Tensor:
    """`W - s * B^T B W`: remove (s = 1) or damp the span of `B` from everything `W` writes.

    Args:
        weight: `(d_model, d_in)`.
        direction: `(d_model,)` unit vector or `(k, d_model)` orthonormal basis.
        strength: 1 removes the component entirely; 0 < s < 1 damps it; s > 1 reverses it.
    """
    return _columnwise(weight, _remover(direction, strength, weight.device))


def _remover(direction: Tensor, strength: float, device) -> Callable[[Tensor], Tensor]:
    """`w -> w - s * B^T B w` on float64 columns."""
    b = _basis64(direction).to(device)
    return lambda w: torch.addmm(w, b.T, b @ w, alpha=-strength)


def orthogonalize_bias(bias: Tensor, direction: Tensor, strength: float = 1.0) -> Tensor:
    """`b - s * B^T B b` for a `(d_model,)` bias."""
    basis = _basis64(direction).to(bias.device)
    return (bias.double() - strength * basis.T @ (basis @ bias.double())).to(bias.dtype)


def amplify_weight(weight: Tensor, direction: Tensor, alpha: float) -> Tensor:
    """Reverse abliteration: `W + alpha * r r^T W` strengthens what `W` writes along `r`."""
    return orthogonalize_weight(weight, direction, -alpha)


def add_to_bias(bias: Tensor | None, direction: Tensor, amount: float, d_model: int) -> Tensor:
    """Induce-refusal variant: write a constant `amount * r` (a bias, creating one if absent)."""
    base = torch.zeros(d_model, dtype=direction.dtype) if bias is None else bias
    return (base.double() + amount * direction.double().to(base.device)).to(base.dtype)


def norm_preserving_orthogonalize(weight: Tensor, direction: Tensor, strength: float = 1.0) -> Tensor:
    """Remove the direction, then restore each column's original norm.

    Column `j` of `W` is the vector written into the residual stream per unit of input feature `j` (for
    the embedding: one token's embedding). Plain orthogonalisation shortens every column that had a
    component along `r`, which shrinks those writes relative to the rest of the stream and is a source
    of the collateral damage of abliteration. Rescaling each edited column back to its original L2 norm
    keeps every write's magnitude while its direction loses the `r` component (for s = 1 the result is
    still exactly orthogonal to `r`). Column norms, hence the norm of the write for any one-hot input,
    are preserved; the norm of a write for a general input is not.
    """
    remove = _remover(direction, strength, weight.device)

    def edit(w: Tensor) -> Tensor:
        edited = remove(w)
        return edited * (w.norm(dim=0, keepdim=True) / edited.norm(dim=0, keepdim=True).clamp_min(1e-12))

    return _columnwise(weight, edit)
