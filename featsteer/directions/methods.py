"""Direction-finding methods beyond plain DIM, all producing a `DirectionSet`.

- projected DIM: DIM with its component along the harmless mean removed, so ablating it does not also
  shrink the activation's overall "typical" component (the "biprojected" refinement).
- paired PCA (representation engineering): first principal component of harmful-minus-harmless
  differences of randomly paired prompts, signed to agree with DIM.
- rank-k SVD: top-k right singular vectors of harmful activations minus the harmless mean, with ridge
  weights `s^2 / (s^2 + lambda)` that soften weak directions in the projector `B^T diag(w) B`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from featsteer.activations import ActivationSet
from featsteer.directions.dim import (
    capture_provenance,
    difference_in_means,
    mean_row_norm,
    means_coincide,
    shared_positions,
)
from featsteer.directions.directions import DirectionSet, unit
from featsteer.errors import FeatsteerError

METHODS = ("dim", "projected", "pca", "svd", "linear", "whitened")


def _pairs(harmful: ActivationSet, harmless: ActivationSet) -> list[tuple[str, int]]:
    labels = shared_positions(harmful, harmless)
    return [(hook, pos) for hook in harmful.hook_names for pos in labels]


def projected_dim(harmful: ActivationSet, harmless: ActivationSet) -> DirectionSet:
    """DIM with the component along the (unit) harmless mean removed, renormalised."""
    dim = difference_in_means(harmful, harmless)
    vectors = []
    for i, (hook, pos) in enumerate(zip(dim.hook_names, dim.positions, strict=True)):
        harmless_mean = harmless.mean(hook, pos)
        r = dim.bases[i, 0].double()
        if harmless_mean.norm() > 0 and r.norm() > 0:
            m = harmless_mean / harmless_mean.norm()
            r = unit(r - (r @ m) * m)
        vectors.append(r.float())
    return _rescored(dim, vectors, harmful, harmless, "projected")


def paired_pca(harmful: ActivationSet, harmless: ActivationSet, seed: int = 0) -> DirectionSet:
    """First PC of paired differences, signed like DIM. The prompts are paired at random (fixed seed) once, and the same
    pairs serve every hook and position, so a layer's direction does not depend on which other layers were computed
    (`directions --layers` and `abliterate --layers` gave one layer two directions when each hook drew its own pairs)."""
    dim = difference_in_means(harmful, harmless)
    generator = torch.Generator().manual_seed(seed)
    n = min(len(harmful), len(harmless))  # every prompt sits at every shared position (`shared_positions`)
    pick_harmful = torch.randperm(len(harmful), generator=generator)[:n]
    pick_harmless = torch.randperm(len(harmless), generator=generator)[:n]
    vectors = []
    for hook, pos in zip(dim.hook_names, dim.positions, strict=True):
        if float(dim.direction(hook, pos).norm()) == 0:  # identical class means (a shared template token at layer 0): the
            vectors.append(torch.zeros(dim.bases.shape[-1]))  # differences are 0 and their "first PC" an arbitrary axis
            continue
        a, b = harmful.at_position(hook, pos).double(), harmless.at_position(hook, pos).double()
        diffs = a[pick_harmful] - b[pick_harmless]
        pc = torch.linalg.svd(diffs, full_matrices=False).Vh[0]  # uncentred: the shared shift is the signal
        pc = pc if pc @ dim.direction(hook, pos).double() >= 0 else -pc
        vectors.append(pc.float())
    return _rescored(dim, vectors, harmful, harmless, "pca")


def _rescored(dim: DirectionSet, vectors: list[Tensor], harmful: ActivationSet, harmless: ActivationSet, method: str) -> DirectionSet:
    """`vectors` (one per DIM entry) as a rank-1 set with DIM's provenance, and the class means projected on `vectors`
    themselves (what `steer --mode set` reads), not on the DIM directions; `mean_diff_norm` is the mean difference's
    component along each vector (what the selection's induce check adds, as for SVD and probe directions), not DIM's
    full length."""
    scores = {"mean_diff_norm": [], "harmful_projection": [], "harmless_projection": []}
    for vector, hook, pos in zip(vectors, dim.hook_names, dim.positions, strict=True):
        harmful_mean, harmless_mean = harmful.mean(hook, pos), harmless.mean(hook, pos)
        scores["harmful_projection"].append(float(harmful_mean @ vector.double()))
        scores["harmless_projection"].append(float(harmless_mean @ vector.double()))
        scores["mean_diff_norm"].append(float((harmful_mean - harmless_mean) @ vector.double()))
    return DirectionSet(torch.stack(vectors)[:, None, :], dim.hook_names, dim.positions, method, {**dim.scores, **scores},
                        dict(dim.provenance))


def svd_subspace(harmful: ActivationSet, harmless: ActivationSet, rank: int = 2, ridge: float | None = None) -> DirectionSet:
    """Top-`rank` right singular vectors of (harmful - harmless mean), with ridge weights in the scores, and in
    `mean_diff_norm` the mean difference's component along the first row (signed to make it positive). Where the class
    means coincide (`dim.means_coincide`, the test DIM and the probes apply) the basis is zero with weight 0, as DIM's.

    Args:
        rank: subspace size k.
        ridge: lambda >= 0 for the weights `s^2/(s^2+lambda)` (0: every weight 1, the plain projector); None uses the
            mean squared singular value of the remaining (rank+1..) components, so strong directions keep weight ~1 and
            noise-level ones ~0.5.

    Raises:
        FeatsteerError: for a rank below 1 or above what the prompts and width allow, or a negative or non-finite ridge.
    """
    if rank < 1:
        raise FeatsteerError(f"rank must be >= 1, got {rank}")
    if ridge is not None and not (math.isfinite(ridge) and ridge >= 0):  # a negative one gave weights above 1 or all 0
        raise FeatsteerError(f"ridge must be a finite lambda >= 0 (0: the plain projector; None: set from the weaker components), got {ridge}")
    bases, names, positions, weights, lengths = [], [], [], [], []
    for hook, pos in _pairs(harmful, harmless):
        harmful_rows, harmless_rows = harmful.at_position(hook, pos).double(), harmless.at_position(hook, pos).double()
        basis, weight, length = _svd_basis(harmful_rows, harmless_rows.mean(0), rank, ridge, mean_row_norm(harmful_rows, harmless_rows))
        bases.append(basis)
        weights.append(weight)
        lengths.append(length)  # what the selection's induce check adds along the first row, as for probe directions
        names.append(hook)
        positions.append(pos)
    return DirectionSet(torch.stack(bases), tuple(names), tuple(positions), "svd", {"ridge_weights": weights, "mean_diff_norm": lengths},
                        {"model": harmful.model, "positions": harmful.positions, "n_harmful": len(harmful), "n_harmless": len(harmless),
                         "rank": rank, "ridge": ridge, "capture": capture_provenance(harmful, harmless)})


def _svd_basis(harmful_rows: Tensor, harmless_mean: Tensor, rank: int, ridge: float | None,
               row_norm: float) -> tuple[Tensor, list[float], float]:
    """One hook and position of `svd_subspace`: the float32 `(rank, d_model)` basis (first row signed along the mean
    difference), its ridge weights and the mean difference's length along the first row. Where the class means coincide
    (`means_coincide` at the rows' size `row_norm`, as for DIM and the probes) a zero basis with weight 0: the harmful
    prompts' own spread about the harmless mean is all that is left there, and it says nothing about the classes."""
    harmful_mean = harmful_rows.mean(0)
    centred = harmful_rows - harmless_mean
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    if rank > vh.shape[0]:  # at most one direction per prompt, and per dimension of the stream
        raise FeatsteerError(f"rank {rank} is more than the SVD of {centred.shape[0]} harmful prompts in {centred.shape[1]} "
                             f"dimensions can give ({vh.shape[0]}): lower the rank or add prompts")
    if means_coincide(harmful_mean, harmless_mean, row_norm):
        return torch.zeros(rank, centred.shape[1]), [0.0] * rank, 0.0
    basis = vh[:rank]
    along = float(basis[0] @ (harmful_mean - harmless_mean))
    basis[0] = basis[0] * (-1.0 if along < 0 else 1.0)
    power = singular**2
    lam = ridge if ridge is not None else float(power[rank:].mean()) if len(power) > rank else 0.0
    denominator = power[:rank] + lam
    ratio = torch.where(denominator > 0, power[:rank] / denominator.clamp_min(1e-300), torch.zeros_like(denominator))
    return basis.float(), ratio.tolist(), abs(along)


def find_directions(harmful: ActivationSet, harmless: ActivationSet, method: str = "dim", rank: int = 2) -> DirectionSet:
    """Dispatch on a method name (`dim`, `projected`, `pca`, `svd`, or a probe: `linear`, `whitened`)."""
    if method == "dim":
        return difference_in_means(harmful, harmless)
    if method == "projected":
        return projected_dim(harmful, harmless)
    if method == "pca":
        return paired_pca(harmful, harmless)
    if method == "svd":
        return svd_subspace(harmful, harmless, rank)
    if method in ("linear", "whitened"):
        from featsteer.directions.probe_directions import probe_directions

        return probe_directions(harmful, harmless, method)
    raise FeatsteerError(f"unknown direction method '{method}': use one of {', '.join(METHODS)}")


def weighted_basis(directions: DirectionSet, index: int) -> Tensor:
    """Basis rows scaled by sqrt(ridge weight) so `B^T B` is the ridge projector (plain basis otherwise)."""
    weights = directions.scores.get("ridge_weights")
    return ridge_weighted(directions.bases[index], None if weights is None else weights[index])


def ridge_weighted(basis: Tensor, weights: list[float] | None) -> Tensor:
    """`(k, d_model)` orthonormal rows scaled by the square roots of their ridge weights (each clamped to [0, 1]), so that
    `B^T B` is the damped projector `sum_i w_i b_i b_i^T` that the selection scored for an SVD subspace; `basis` as it is
    for None. Ablate it with `weighted=True`."""
    if weights is None:
        return basis
    if len(weights) != basis.shape[0]:
        raise FeatsteerError(f"{len(weights)} ridge weights for a rank-{basis.shape[0]} basis: give one weight per row")
    return basis * torch.tensor(weights, dtype=basis.dtype).clamp(0, 1).sqrt()[:, None]


def rotation_plane(directions: DirectionSet, index: int) -> Tensor:
    """The `(2, d_model)` plane angular steering turns activations in: the chosen direction and a second axis.

    The second axis is the leading right-singular vector of the other layers' directions at the same position
    after their component along the chosen one is removed, i.e. the main way the refusal direction changes
    across layers (Vu & Nguyen 2025 build the plane from the refusal direction and the principal direction of the
    per-layer candidates). Rows are orthonormal.

    Args:
        directions: rank-1 candidates at several hooks (e.g. DIM at every layer).
        index: the chosen candidate (the first axis).

    Raises:
        FeatsteerError: for a rank-k set, or when no other layer's direction differs from the chosen one.
    """
    if directions.rank != 1:
        raise FeatsteerError(f"a rotation plane needs rank-1 directions, got rank {directions.rank}")
    first = directions.bases[index, 0].double()
    first = first / first.norm()
    position = directions.positions[index]
    others = [directions.bases[i, 0].double() for i in range(len(directions))
              if i != index and directions.positions[i] == position and float(directions.bases[i, 0].norm()) > 0]
    if others:
        stacked = torch.stack(others)
        residual = stacked - (stacked @ first)[:, None] * first
        _, singular, vh = torch.linalg.svd(residual, full_matrices=False)
        if float(singular[0]) > 1e-6:
            second = vh[0] - (vh[0] @ first) * first
            return torch.stack([first, second / second.norm()]).float()
    raise FeatsteerError("no second axis for the rotation plane: the other layers' directions at this position are all parallel to "
                         "the chosen one (or there are none); capture more layers")
