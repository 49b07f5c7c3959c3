"""SAE features of captured activations, batched and gradient-free.

Feature scoring and direction finding read SAE features of many thousand activation rows; this module
turns an `ActivationSet` (or any `(..., d_in)` tensor) into `(row, d_sae)` feature activations with
sae_lens' own `encode`, in batches, so the numbers are exactly what `sae.encode` gives.

Rows are flat: `d_in` is `d_model`, or `n_heads * d_head` for an SAE on `blocks.{l}.attn.hook_z` (captured hook_z
rows are flat already; `(..., n_heads, d_head)` head activations are flattened here). Decoding returns flat rows
too, whatever the SAE's `reshape_activations` (see `featsteer.sae.heads`).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from featsteer.activations import ActivationSet
from featsteer.errors import FeatsteerError
from featsteer.sae.heads import flat_rows, reads_heads
from featsteer.sae.loading import sae_hook_name

STATEFUL_NORMS = ("layer_norm", "constant_norm_rescale")
"""sae_lens normalisations whose `decode` undoes a per-row normalisation that the preceding `encode` stored on the SAE:
decoding is only right straight after encoding the same rows."""

NORMALISED_UNIT: dict[str, str] = {
    "layer_norm": "per unit of normalised input (each row centred and scaled to standard deviation 1)",
    "constant_norm_rescale": "per unit of normalised input (each row scaled to norm sqrt(d_in))",
}
"""For SAEs that normalise each input row (`STATEFUL_NORMS`): what one unit of a feature's activation and its decoder
row are measured in. What the feature writes into a row is that times the row's own `input_scales`."""


def _rows(sae: SAE, acts: Tensor | ActivationSet, hook: str | None) -> Tensor:
    if isinstance(acts, ActivationSet):
        name = hook or sae_hook_name(sae)
        if name is None:
            raise FeatsteerError("this SAE records no hook_name: pass hook=<hook name> to pick the captured activations")
        check_finite(acts, name)
        acts = acts.hook(name)
    check_finite(acts)
    d_in = int(sae.cfg.d_in)
    if acts.shape[-1] != d_in and acts.dim() >= 3 and acts.shape[-2] * acts.shape[-1] == d_in and reads_heads(sae):
        acts = acts.flatten(-2)  # (..., n_heads, d_head) as hook_z hands them: heads side by side
    if acts.shape[-1] != d_in:
        raise FeatsteerError(f"activations have width {acts.shape[-1]} but the SAE reads d_in={d_in}: capture at the SAE's hook on its model")
    return acts


def check_finite(acts: Tensor | ActivationSet, hook: str | None = None) -> None:
    """Raise on a NaN or infinite activation (at `hook` of an `ActivationSet`): `encode` would turn it into NaN features,
    and every score of those into a NaN that rankings sort last without a word.

    Raises:
        FeatsteerError: naming how many values are bad and the first (its row and prompt, for an `ActivationSet`).
    """
    rows = acts.hook(hook) if isinstance(acts, ActivationSet) and hook is not None else acts
    rows = rows.activations if isinstance(rows, ActivationSet) else rows
    if not rows.is_floating_point() or bool(torch.isfinite(rows).all()):
        return
    bad = ~torch.isfinite(rows)
    first = bad.nonzero()[0].tolist()
    where = f"index {tuple(first)}"
    if isinstance(acts, ActivationSet):
        prompt = int(acts.prompt_index[first[0]])
        where = f"row {first[0]} (prompt {prompt}: {acts.prompts[prompt][:40]!r})"
    raise FeatsteerError(f"the activations{f' at {hook}' if hook else ''} hold {int(bad.sum())} NaN or inf values, the first at {where}: "
                         "recapture them (in float32: --dtype float32) or leave those prompts out")


def _in_batches(sae: SAE, rows: Tensor, width: int, apply, batch_size: int) -> Tensor:
    """`apply` (an SAE encode and/or decode) on `rows` as flat `(n, d)` batches of `batch_size`, without gradients and
    with the SAE on flat rows; the results gathered on the CPU in the SAE's dtype as `(..., width)`."""
    flat = rows.reshape(-1, rows.shape[-1])
    out = torch.empty(flat.shape[0], width, dtype=sae.dtype)
    with torch.no_grad(), flat_rows(sae):
        for start in range(0, flat.shape[0], batch_size):
            out[start : start + batch_size] = apply(flat[start : start + batch_size].to(sae.device, sae.dtype)).cpu()
    return out.reshape(*rows.shape[:-1], width)


def input_scales(sae: SAE, acts: Float[Tensor, "... d_in"] | ActivationSet, *, hook: str | None = None) -> Float[Tensor, "..."]:
    """How much larger than a unit of normalised input each row is: the factor by which the SAE's decode undoes its
    per-row normalisation (float64, CPU). Each row's standard deviation for `layer_norm` (as sae_lens computes it), its
    norm over sqrt(d_in) for `constant_norm_rescale`, and 1 for SAEs that read rows as they are. One unit of a feature's
    activation moves a row by its `input_scales` times the feature's `featsteer.features.decoder_norms`.

    Raises:
        FeatsteerError: when the activations' width is not the SAE's `d_in`, or they hold a NaN or infinite value.
    """
    rows = _rows(sae, acts, hook).detach().double().cpu()
    if sae.cfg.normalize_activations == "layer_norm":
        return rows.std(dim=-1)
    if sae.cfg.normalize_activations == "constant_norm_rescale":
        return rows.norm(dim=-1) / math.sqrt(int(sae.cfg.d_in))
    return torch.ones(rows.shape[:-1], dtype=torch.float64)


def encode_activations(
    sae: SAE, acts: Float[Tensor, "... d_in"] | ActivationSet, *, hook: str | None = None, batch_size: int = 4096
) -> Float[Tensor, "... d_sae"]:
    """Feature activations of `acts` (`sae.encode`, batched, no gradients).

    Args:
        sae: a sae_lens SAE.
        acts: activations `(..., d_in)` (for an SAE at hook_z also `(..., n_heads, d_head)`), or an `ActivationSet`
            (rows at the SAE's hook are used).
        hook: which hook of an `ActivationSet` to read (default: the SAE's `hook_name`).
        batch_size: rows per `encode` call.

    Returns:
        `(..., d_sae)` feature activations on the CPU, in the SAE's dtype.

    Raises:
        FeatsteerError: when the activations' width is not the SAE's `d_in`, or they hold a NaN or infinite value.
    """
    return _in_batches(sae, _rows(sae, acts, hook), sae.cfg.d_sae, lambda chunk: sae.encode(chunk).to_dense(), batch_size)


def decode_features(sae: SAE, features: Float[Tensor, "... d_sae"], *, batch_size: int = 4096) -> Float[Tensor, "... d_in"]:
    """Reconstructions `sae.decode(features)` (batched, no gradients), on the CPU, as flat `(..., d_in)` rows.

    Raises:
        FeatsteerError: for an SAE that normalises each input row (`layer_norm`, `constant_norm_rescale`): its
            decoding needs the rows it encoded, so use `reconstruct`.
    """
    if sae.cfg.normalize_activations in STATEFUL_NORMS:
        raise FeatsteerError(f"this SAE normalises each input row ({sae.cfg.normalize_activations}), so features alone do not "
                             "decode: reconstruct(sae, activations) decodes each batch right after encoding it")
    return _in_batches(sae, features, sae.cfg.d_in, sae.decode, batch_size)


def reconstruct(
    sae: SAE, acts: Float[Tensor, "... d_in"] | ActivationSet, *, hook: str | None = None, batch_size: int = 4096
) -> Float[Tensor, "... d_in"]:
    """`decode(encode(acts))`: the SAE's reconstruction of activations (no error term), batched, on the CPU, as flat
    `(..., d_in)` rows; each batch is decoded right after it is encoded (see `STATEFUL_NORMS`)."""
    return _in_batches(sae, _rows(sae, acts, hook), sae.cfg.d_in, lambda chunk: sae.decode(sae.encode(chunk)), batch_size)
