"""SAE features as `DirectionSet`s, so every featsteer intervention can use them.

A feature's decoder row is the direction it writes into the residual stream. Turning chosen features
into a `DirectionSet` (unit decoder rows, or an orthonormal basis of the top-k rows of one layer) lets
feature directions be ablated, added, weight-edited and compared with DIM and probe directions without
any SAE-specific code downstream.

An attention-output SAE on `blocks.{l}.attn.hook_z` has decoder rows in head space (`n_heads * d_head`, the heads
side by side), not in the stream. Such a row writes `sum_h W_O[h] row[h]` into the stream through layer `l`'s
attention output projection (its bias, written whatever the features do, is left out), so its direction is that
vector made unit, recorded at `blocks.{l}.hook_attn_out`, where the write enters the stream. Mapping needs the model,
and one without a norm between the output projection and the stream (not Gemma 2/3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor

from featsteer.activations.capture import output_projection
from featsteer.directions import DirectionSet
from featsteer.errors import FeatsteerError
from featsteer.features.scoring import FeatureScores
from featsteer.models import ModelAdapter, hook_name
from featsteer.sae.heads import reads_heads
from featsteer.sae.loading import sae_hook_name, validate_sae

MAPPED_THROUGH = "attention output projection W_O (summed over heads, bias excluded)"
"""Provenance note (`provenance["mapped_through"]`) of directions mapped from head space into the stream."""


def _raw_decoder_rows(sae: SAE, ids: Sequence[int]) -> Tensor:
    if not ids:
        raise FeatsteerError("no feature ids given: pass at least one feature id")
    bad = [i for i in ids if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise FeatsteerError(f"feature id {bad[0]} is out of range: this SAE has d_sae={sae.cfg.d_sae} features (0..{sae.cfg.d_sae - 1})")
    return sae.W_dec.detach()[list(ids)].double().cpu()


def _unit_rows(rows: Tensor, ids: Sequence[int], nothing: str) -> Tensor:
    norms = rows.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise FeatsteerError(f"feature {ids[int((norms.squeeze(-1) == 0).nonzero()[0])]} {nothing}")
    return rows / norms


def _feature_ids(feature_ids: int | Sequence[int]) -> list[int]:
    return [int(feature_ids)] if isinstance(feature_ids, int) else [int(i) for i in feature_ids]


def _head_layer(sae: SAE, model: ModelAdapter | None, hook: str | None) -> int:
    """The layer of a hook_z SAE whose rows can be mapped into `model`'s stream (else a clear error)."""
    name = hook or sae_hook_name(sae)
    if model is None:
        raise FeatsteerError(f"the SAE at {name} has decoder rows in head space (n_heads x d_head): pass model=<the model> to map "
                             "them through the attention output projection into the residual stream")
    site = model.hook_site(validate_sae(sae, model, hook))
    if model.post_norms:
        raise FeatsteerError(f"{model.family} normalises the attention output before adding it to the stream, so a hook_z decoder "
                             "row writes no fixed residual direction: map hook_z features on a model without post-attention norms, "
                             "or steer them with FeatureSteer")
    return int(site.layer)


def residual_writes(model: ModelAdapter, sae: SAE, feature_ids: int | Sequence[int], *, hook: str | None = None) -> Tensor:
    """What one unit of each feature's activation writes into the residual stream, `(n, d_model)` float64 on the CPU.

    The decoder rows themselves for an SAE on a `d_model`-wide hook (made unit for sae_lens TopK SAEs that divide
    activations by the row norm, `rescale_acts_by_decoder_norm`); for an SAE on `blocks.{l}.attn.hook_z`, each
    head-space row pushed through layer `l`'s attention output projection, `sum_h W_O[h] row[h]` (bias excluded). For an
    SAE that normalises each input row, per unit of normalised input (`featsteer.sae.NORMALISED_UNIT`): a row moves by
    this times its own `featsteer.sae.input_scales`.

    Args:
        model: the model the SAE reads.
        sae: a sae_lens SAE.
        feature_ids: feature(s) to take.
        hook: the SAE's hook (default: its recorded `hook_name`).

    Raises:
        FeatsteerError: a feature id out of range, a hook_z SAE that does not fit `model`, or a model whose attention
            output passes through a norm before the stream (Gemma 2/3).
    """
    rows = _raw_decoder_rows(sae, _feature_ids(feature_ids))
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):  # decode writes activation * row / |row|
        norms = rows.norm(dim=-1, keepdim=True)
        rows = rows / torch.where(norms > 0, norms, torch.ones_like(norms))
    if not reads_heads(sae, hook):
        return rows
    return rows @ output_projection(model, _head_layer(sae, model, hook)).T


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
    model: ModelAdapter | None = None,
) -> DirectionSet:
    """Decoder directions of SAE features as a `DirectionSet` (method `sae:<hook_name>`).

    For an SAE on `blocks.{l}.attn.hook_z` each direction is what the feature writes into the stream (its head-space
    row through the attention output projection, see `residual_writes`), made unit and recorded at
    `blocks.{l}.hook_attn_out`; `provenance` then notes `mapped_through`, `sae_hook` and `layer`.

    Args:
        sae: a sae_lens SAE.
        feature_ids: feature(s) to take.
        subspace: False - one rank-1 unit direction per feature; True - one rank-k orthonormal basis
            spanning all the features' decoder rows (for ablating a top-k subspace).
        position: position label stored with the directions (-1 = last prompt token).
        hook: hook name to record (default: the SAE's `hook_name`).
        model: the model the SAE reads; needed (and checked against) for a hook_z SAE, ignored otherwise.

    Returns:
        The direction set; `provenance["feature_ids"]` lists the features of each entry.

    Raises:
        FeatsteerError: no hook name, a feature id out of range or with a zero decoder row (or a zero write), dependent
            rows for a subspace, or a hook_z SAE without `model` or on a model with post-attention norms (Gemma 2/3).
    """
    ids = _feature_ids(feature_ids)
    name = hook or sae_hook_name(sae)
    if name is None:
        raise FeatsteerError("this SAE records no hook_name: pass hook=<hook name>")
    provenance: dict[str, Any] = {"sae_d_sae": int(sae.cfg.d_sae), "model": sae.cfg.metadata.model_name, "subspace": subspace}
    if reads_heads(sae, hook):
        layer = _head_layer(sae, model, hook)
        writes = _raw_decoder_rows(sae, ids) @ output_projection(model, layer).T
        rows = _unit_rows(writes, ids, "writes nothing into the stream (its decoder row is in W_O's null space)")
        provenance.update({"sae_hook": name, "mapped_through": MAPPED_THROUGH, "layer": layer})
        where = hook_name(layer, "attn_out")
    else:
        rows = _unit_rows(_raw_decoder_rows(sae, ids), ids, "has a zero decoder row: it writes nothing")
        where = name
    if subspace:
        bases = orthonormal_basis(rows)[None].float()
        return DirectionSet(bases=bases, hook_names=(where,), positions=(position,), method=f"sae:{name}",
                            scores={"rank": [float(len(ids))]}, provenance={**provenance, "feature_ids": [ids]})
    return DirectionSet(bases=rows[:, None, :].float(), hook_names=(where,) * len(ids), positions=(position,) * len(ids),
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
    model: ModelAdapter | None = None,
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
        model: the model the SAEs read; needed for hook_z SAEs, whose rows are mapped into the stream (see
            `decoder_directions`).

    Returns:
        A `DirectionSet` whose `scores[by]` holds the ranking score of each entry (summed over a basis).
    """
    missing = sorted(set(scores.hook_names) - set(saes))
    if missing:
        raise FeatsteerError(f"no SAE given for {', '.join(missing)}: pass every scored hook's SAE")
    if not subspace:
        best = scores.top(n, by)
        parts = [decoder_directions(saes[h], [int(f)], position=position, hook=h, model=model)
                 for h, f in zip(best.hook_names, best.feature_ids, strict=True)]
        values = best.column(by).tolist()
    else:
        hooks = list(dict.fromkeys(scores.hook_names))
        parts, values = [], []
        for hook in hooks:
            best = scores.for_hook(hook).top(n, by)
            parts.append(decoder_directions(saes[hook], best.feature_ids.tolist(), subspace=True, position=position, hook=hook, model=model))
            values.append(float(best.column(by).sum()))
    mapped = {"sae_hooks": [p.method.removeprefix("sae:") for p in parts for _ in p.hook_names], "mapped_through": MAPPED_THROUGH}
    return DirectionSet(
        bases=torch.cat([p.bases for p in parts]),
        hook_names=tuple(h for p in parts for h in p.hook_names),
        positions=tuple(q for p in parts for q in p.positions),
        method="sae:" + ",".join(dict.fromkeys(p.method.removeprefix("sae:") for p in parts)),
        scores={by: values},
        provenance={"feature_ids": [ids for p in parts for ids in p.provenance["feature_ids"]], "ranked_by": by,
                    "subspace": subspace, **{k: v for k, v in scores.provenance.items() if k != "hooks"},
                    **(mapped if any("mapped_through" in p.provenance for p in parts) else {})},
    )
