"""Activation addition made permanent: a constant vector written into the residual stream through biases.

`add_through_biases(model, v, layer)` edits biases so that the residual stream entering block `layer` carries `v` more
at every position, as the runtime `AddDirection(v, 1, where=f"blocks.{layer}.hook_resid_pre")` does, but as plain
weights that export and load with transformers. Reverse abliteration (`W + a r r^T W`) only scales what the writes
already carry along `r`, which on harmless prompts is little; a bias adds the direction whatever the prompt.

Where the bias goes (`models.BiasWriter`):

- When block `layer - 1` has an output projection with a bias (GPT-2, Phi-2, Pythia, StarCoder2, TransformerLens
  models), all of `v` goes into the last such bias of that block. When that is its MLP's (or the attention's of a
  parallel block) the edited model equals the runtime addition at the hook (`record["edit"]["exact_at_hook"]`).
- Otherwise the attention value biases of earlier blocks carry it (Qwen2 and 2.5): the attention weights of every
  query sum to 1, so a value bias leaves the attention as a constant and reaches the stream through the output
  projection. One layer reaches only a `n_kv_heads * d_head`-wide subspace (128 of Qwen2.5-0.5B's 896 dimensions), so
  the vector is spread over the layers before `layer`, as the solution of least weighted norm: a layer `k` blocks
  before `layer - 1` costs `decay**k` as much, which keeps the writes as late as the reach allows (the blocks between
  read what is written before them, which the runtime addition does not). The writes sum to `v` exactly (checked).

A model with neither kind of bias whose config has a switch for them (Llama, SmolLM3, Granite: `mlp_bias`; Qwen3, Gemma,
Cohere: `attention_bias`) first gets them switched on, zero everywhere (`ModelAdapter.add_biases`), so the export loads
with plain transformers; with `mlp_bias` the addition then equals the runtime one. Leaving the handle removes them and
switches the flag off again. A model with no switch (Mistral, Phi-3) gets a one-line error pointing to the runtime
addition; so does a post-norm family, whose norm rescales whatever a bias writes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from featsteer.edits.apply import EditHandle
from featsteer.errors import FeatsteerError
from featsteer.models import BiasWriter, ModelAdapter, parse_hook_name

BIAS_DECAY = 2.0
"""How much more a bias one block earlier costs in the spread (`add_through_biases(decay=)`)."""

REACH_TOLERANCE = 1e-6
"""The largest share of the vector's norm the biases' writes may miss."""


def add_through_biases(model: ModelAdapter, vector: Tensor, layer: int | str, *, decay: float = BIAS_DECAY, exact: bool = True,
                       record: dict | None = None) -> EditHandle:
    """Add `vector` to the residual stream entering block `layer`, at every position, by editing biases.

    Args:
        model: the model to edit in place.
        vector: `(d_model,)`, e.g. `scale * |mean difference| * r` for the activation addition of a unit direction `r`.
        layer: the block whose input receives it (1 to n_layers; n_layers is the final norm's input), or the hook that
            names it: `blocks.{l}.hook_resid_pre` is block `l`'s input, `blocks.{l}.hook_resid_post` block `l + 1`'s.
        decay: the cost of a bias one block earlier, relative to one block later, when the vector is spread over value
            biases (>= 1; 1 spreads it evenly).
        exact: raise when the biases cannot write the vector (too few before `layer`); False writes the nearest sum they
            can and records the share of the vector's length it misses (`record["edit"]["missed"]`; 1 at block 0).
        record: provenance to keep with the handle (exported into `featsteer.json`).

    Returns:
        A handle that reverts the biases exactly and exports the edited model.

    Raises:
        FeatsteerError: on a vector of the wrong width or with NaN/inf, a layer out of range, or a model whose biases
            before `layer` cannot write the vector (none, or too few to reach it).
    """
    target = _checked_vector(vector, model)
    layer = _block_input(model, layer)
    if not (1 if exact else 0) <= layer <= model.n_layers:
        raise FeatsteerError(f"layer {layer} is out of range: a bias addition goes into the input of blocks 1-{model.n_layers - 1} "
                             f"or {model.n_layers} (the final norm's); at block 0 it is a shift of every token embedding "
                             "(EditConfig(mode='induce'))")
    if decay < 1 or not math.isfinite(decay):
        raise FeatsteerError(f"decay must be a finite number >= 1, got {decay}")
    handle = EditHandle(model, {}, {"edit": {"mode": "bias_addition", "layer": layer, "norm": round(float(target.norm()), 6),
                                             "decay": decay}, **(record or {})})
    handle.vectors = {"vector": target}
    try:  # whatever stops it from here, an error or Ctrl-C, leaves the model as it was: biases restored, created ones removed
        switched = model.add_biases() if not model.bias_writers() else None  # Llama: mlp_bias on, zero biases everywhere
        if switched is not None:
            handle.undo.append(switched[1])
            handle.record["edit"]["switched_on"] = switched[0]
        every = model.bias_writers()
        writers = [w for w in every if w.layer < layer]
        if not (writers if exact else every):
            raise FeatsteerError(f"{model.name} has no bias that adds a constant to the residual stream before block {layer} (a "
                                 "model without biases whose config cannot switch them on, or a post-norm family): add the "
                                 "direction at runtime instead (featsteer steer --mode add)")
        deltas, last, missed = _spread(writers, target, layer, decay, exact) if writers else ({}, None, 1.0)
        # the edit equals the runtime addition at the hook when the one bias it changed is the last thing block layer - 1
        # adds to the stream: its MLP's, or its attention's in a parallel block (else the block's MLP reads what it wrote)
        handle.record["edit"].update(exact_at_hook=last is not None and (last.name.endswith("hook_mlp_out") or model.parallel_block),
                                     missed=round(missed, 6))
        by_name = {w.name: w for w in writers}
        for name, delta in deltas.items():
            old = by_name[name].read()
            handle.bias_originals[name] = old.clone()
            by_name[name].write((old.double() + delta.to(old.device)).to(old.dtype))
    except BaseException:
        handle.revert()
        raise
    handle.record["bias_writers"] = {name: round(float(delta.norm()), 6) for name, delta in deltas.items()}
    return handle


def _block_input(model: ModelAdapter, at: int | str) -> int:
    """The block whose input a layer number or a residual hook name means."""
    if not isinstance(at, str):
        return int(at)
    site = parse_hook_name(at, model.n_layers)
    if site.kind not in ("resid_pre", "resid_post"):
        raise FeatsteerError(f"a bias addition goes into the residual stream between blocks: give blocks.<l>.hook_resid_pre or "
                             f"blocks.<l>.hook_resid_post, not {at}")
    return site.layer + (site.kind == "resid_post")


def _checked_vector(vector: Tensor, model: ModelAdapter) -> Tensor:
    target = vector.detach().to("cpu", torch.float64).flatten()
    if target.shape[0] != model.d_model:
        raise FeatsteerError(f"the vector has width {target.shape[0]} but the model's d_model is {model.d_model}")
    if not torch.isfinite(target).all():
        raise FeatsteerError("the vector contains NaN/inf: recompute it")
    return target


def _spread(writers: list[BiasWriter], target: Tensor, layer: int, decay: float,
            exact: bool) -> tuple[dict[str, Tensor], BiasWriter | None, float]:
    """`(writer name -> change of its bias, the writer taking all of it or None, share of the length missed)`: the whole
    vector in the last full-reach bias of block `layer - 1` when it has one, else the least weighted-norm spread over
    every writer before `layer` (with `exact`, an error when it misses more than `REACH_TOLERANCE`)."""
    last = [w for w in writers if w.layer == layer - 1 and w.full]
    chosen = last[-1:] or writers
    reaches = [w.reach() for w in chosen]
    # least ||D^(1/2) b|| subject to M b = v, with D a writer's cost decay**(blocks before layer - 1): in u = D^(1/2) b
    # it is the least-norm solution of (M D^(-1/2)) u = v
    root = torch.cat([torch.full((m.shape[1],), decay ** ((layer - 1 - w.layer) / 2), dtype=torch.float64)
                      for w, m in zip(chosen, reaches, strict=True)])
    matrix = torch.cat(reaches, 1)
    solution = torch.linalg.lstsq(matrix / root, target[:, None], driver="gelsd").solution[:, 0] / root
    missed = float((matrix @ solution - target).norm() / target.norm().clamp_min(1e-30))
    if exact and missed > REACH_TOLERANCE:
        where = f"blocks {chosen[0].layer}-{layer - 1}" if len(chosen) > 1 else f"block {chosen[0].layer}"
        raise FeatsteerError(f"the biases of {where} cannot write the vector (they miss {missed:.1%} of its length: their writes "
                             "span too few directions of the stream): add it at a later layer, or at runtime (featsteer steer --mode add)")
    deltas, start = {}, 0
    for writer, reach in zip(chosen, reaches, strict=True):
        part = solution[start : start + reach.shape[1]]
        start += reach.shape[1]
        if part.abs().max() > 0:
            deltas[writer.name] = part
    return deltas, last[-1] if last else None, missed
