"""SAE features as `DirectionSet`s, so every featsteer intervention can use them.

A feature's decoder row is the direction it writes into the residual stream. Turning chosen features
into a `DirectionSet` (unit decoder rows, or an orthonormal basis of the top-k rows of one layer) lets
feature directions be ablated, added, weight-edited and compared with DIM and probe directions without
any SAE-specific code downstream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from sae_lens import SAE
from torch import Tensor

from featsteer.directions import DirectionSet
from featsteer.errors import FeatsteerError
from featsteer.features.scoring import FeatureScores
from featsteer.sae.loading import sae_hook_name


def _decoder_rows(sae: SAE, feature_ids: Sequence[int]) -> Tensor:
    ids = [int(i) for i in feature_ids]
    if not ids:
        raise FeatsteerError("no feature ids given: pass at least one feature id")
    bad = [i for i in ids if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise FeatsteerError(f"feature id {bad[0]} is out of range: this SAE has d_sae={sae.cfg.d_sae} features (0..{sae.cfg.d_sae - 1})")
    rows = sae.W_dec.detach()[ids].double().cpu()
    norms = rows.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise FeatsteerError(f"feature {ids[int((norms.squeeze(-1) == 0).nonzero()[0])]} has a zero decoder row: it writes nothing")
    return rows / norms


def orthonormal_basis(rows: Tensor) -> Tensor:
    """Orthonormalise `(k, d)` rows in order (Gram-Schmidt via QR; row i keeps a positive overlap with input row i).

    Raises:
        FeatsteerError: if the rows are linearly dependent.
    """
    q, r = torch.linalg.qr(rows.double().T)
    diagonal = torch.diagonal(r)
    if bool((diagonal.abs() < 1e-8 * rows.norm(dim=-1).max()).any()):
        raise FeatsteerError("the chosen decoder rows are linearly dependent (repeated feature?): pick distinct features")
    return (q * torch.sign(diagonal)).T


def decoder_directions(
    sae: SAE,
    feature_ids: int | Sequence[int],
    *,
    subspace: bool = False,
    position: int = -1,
    hook: str | None = None,
) -> DirectionSet:
    """Decoder directions of SAE features as a `DirectionSet` (method `sae:<hook_name>`).

    Args:
        sae: a sae_lens SAE.
        feature_ids: feature(s) to take.
        subspace: False - one rank-1 unit direction per feature; True - one rank-k orthonormal basis
            spanning all the features' decoder rows (for ablating a top-k subspace).
        position: position label stored with the directions (-1 = last prompt token).
        hook: hook name to record (default: the SAE's `hook_name`).

    Returns:
        The direction set; `provenance["feature_ids"]` lists the features of each entry.
    """
    ids = [feature_ids] if isinstance(feature_ids, int) else [int(i) for i in feature_ids]
    name = hook or sae_hook_name(sae)
    if name is None:
        raise FeatsteerError("this SAE records no hook_name: pass hook=<hook name>")
    rows = _decoder_rows(sae, ids)
    provenance = {"sae_d_sae": int(sae.cfg.d_sae), "model": sae.cfg.metadata.model_name, "subspace": subspace}
    if subspace:
        bases = orthonormal_basis(rows)[None].float()
        return DirectionSet(bases=bases, hook_names=(name,), positions=(position,), method=f"sae:{name}",
                            scores={"rank": [float(len(ids))]}, provenance={**provenance, "feature_ids": [ids]})
    return DirectionSet(bases=rows[:, None, :].float(), hook_names=(name,) * len(ids), positions=(position,) * len(ids),
                        method=f"sae:{name}", scores={"feature_id": [float(i) for i in ids]},
                        provenance={**provenance, "feature_ids": [[i] for i in ids]})


def top_feature_directions(
    scores: FeatureScores,
    saes: Mapping[str, SAE],
    n: int = 1,
    *,
    by: str = "composite",
    subspace: bool = False,
    position: int = -1,
) -> DirectionSet:
    """Directions of the best-scoring features.

    Args:
        scores: feature scores (any number of hooks).
        saes: `{hook_name: sae}` for every hook in `scores`.
        n: without `subspace`, the `n` best features overall (rank-1 each); with `subspace`, the `n`
            best features of each hook as one rank-`n` basis per hook.
        by: ranking key.
        subspace: see `n`.
        position: position label stored with the directions.

    Returns:
        A `DirectionSet` whose `scores[by]` holds the ranking score of each entry (summed over a basis).
    """
    missing = sorted(set(scores.hook_names) - set(saes))
    if missing:
        raise FeatsteerError(f"no SAE given for {', '.join(missing)}: pass every scored hook's SAE")
    if not subspace:
        best = scores.top(n, by)
        parts = [decoder_directions(saes[h], [int(f)], position=position, hook=h) for h, f in zip(best.hook_names, best.feature_ids, strict=True)]
        values = best.column(by).tolist()
    else:
        hooks = list(dict.fromkeys(scores.hook_names))
        parts, values = [], []
        for hook in hooks:
            best = scores.for_hook(hook).top(n, by)
            parts.append(decoder_directions(saes[hook], best.feature_ids.tolist(), subspace=True, position=position, hook=hook))
            values.append(float(best.column(by).sum()))
    return DirectionSet(
        bases=torch.cat([p.bases for p in parts]),
        hook_names=tuple(h for p in parts for h in p.hook_names),
        positions=tuple(q for p in parts for q in p.positions),
        method="sae:" + ",".join(dict.fromkeys(h for p in parts for h in p.hook_names)),
        scores={by: values},
        provenance={"feature_ids": [ids for p in parts for ids in p.provenance["feature_ids"]], "ranked_by": by,
                    "subspace": subspace, **{k: v for k, v in scores.provenance.items() if k != "hooks"}},
    )
