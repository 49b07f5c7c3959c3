"""TransformerLens-style hook-point names, parsed once.

featsteer addresses every activation by the name TransformerLens gives it (`blocks.12.hook_resid_pre`), so
sae_lens SAEs attach by their `hook_name` and users can move between libraries without translation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from featsteer.errors import FeatsteerError

RESIDUAL_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "per_layer_out", "resid_post")
"""The kinds that are the residual stream or a write into it (named `blocks.{l}.hook_{kind}`). `per_layer_out` exists only
in models that add a third write after the MLP, from a per-layer input embedding (Gemma 4's PLE; `per_layer_inputs`)."""
NORM_KINDS: tuple[str, ...] = ("ln1_normalized", "ln2_normalized")
"""The outputs of a block's two input norms, what its attention (`ln1`) and its MLP (`ln2`) read. They are named
as TransformerLens names them, `blocks.{l}.ln1.hook_normalized` and `blocks.{l}.ln2.hook_normalized`."""
HEAD_KINDS: tuple[str, ...] = ("attn_z",)
"""Per-head kinds, shaped `(batch, pos, n_heads, d_head)` as in TransformerLens: `blocks.{l}.attn.hook_z`, each head's
attention-weighted values, which the output projection turns into the head's write. Hooks read and may replace them;
`capture` stores them flattened, the heads side by side (`n_heads * d_head` wide), as attention-output SAEs read them."""
ROUTING_KINDS: tuple[str, ...] = ("router_logits", "routing")
"""A mixture-of-experts layer's routing, on the MoE layers only (`model.moe_layers`), both `(batch, pos, n_experts)`:
- `blocks.{l}.mlp.hook_router_logits`: the router's scores before it chooses (its linear layer's output). A hook that
  returns a changed matrix makes the router choose again from it by its own rule (softmax or sigmoid, top-k, groups,
  renormalising, scaling), so a lowered expert is replaced by the next one, as SteerMoE does.
- `blocks.{l}.mlp.hook_routing`: the weight each token gives each expert after the choice (zero for the experts the
  router did not pick). Hooks read it and may return a changed matrix, which the experts then use as it is.
`interventions.ExpertSteer` works at either."""
GLOBAL_KINDS: tuple[str, ...] = ("embed", "pos_embed", "ln_final_normalized")
"""Hook kinds outside the layers: the embeddings (before layer 0) and the final norm (after the last layer)."""
WRITE_KINDS: tuple[str, ...] = ("attn_out", "mlp_out", "per_layer_out")
"""The per-layer writes into the residual stream (with `hook_embed`: every residual write)."""

_SUFFIX = {kind: f"hook_{kind}" for kind in RESIDUAL_KINDS} | {
    "ln1_normalized": "ln1.hook_normalized",
    "ln2_normalized": "ln2.hook_normalized",
    "attn_z": "attn.hook_z",
    "router_logits": "mlp.hook_router_logits",
    "routing": "mlp.hook_routing",
}
_FIRING = ("resid_pre", "ln1_normalized", "attn_z", "attn_out", "resid_mid", "ln2_normalized", "router_logits", "routing", "mlp_out", "per_layer_out",
           "resid_post")
"""Every per-layer kind in the order it fires inside one decoder layer."""
LAYER_KINDS: tuple[str, ...] = tuple(kind for kind in _FIRING if kind not in HEAD_KINDS + ROUTING_KINDS)
"""Per-layer `d_model`-wide hook kinds, in the order they fire inside one decoder layer."""
_KIND_OF_SUFFIX = {suffix: kind for kind, suffix in _SUFFIX.items()}
_GLOBAL_NAMES = {"hook_embed": "embed", "hook_pos_embed": "pos_embed", "ln_final.hook_normalized": "ln_final_normalized"}
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in _SUFFIX.values()) + r")$")
_LAST = 1 << 30
"""Layer slot of `ln_final` in `HookSite.order`: after every layer of any model."""


@dataclass(frozen=True)
class HookSite:
    """One parsed hook point. Hook functions receive it as their second argument (like TL's `hook`)."""

    name: str
    """Full TransformerLens name, e.g. `blocks.3.hook_resid_pre`."""
    kind: str
    """One of `LAYER_KINDS` or `GLOBAL_KINDS`."""
    layer: int | None
    """Decoder layer index, or None for `hook_embed` / `hook_pos_embed`."""

    @property
    def order(self) -> tuple[int, int]:
        """Sort key following the forward pass: embeddings first, then layers in firing order."""
        if self.kind == "ln_final_normalized":
            return (_LAST, 0)
        if self.layer is None:
            return (-1, GLOBAL_KINDS.index(self.kind))
        return (self.layer, _FIRING.index(self.kind))


_STREAM_OFFSET = {"resid_pre": 0.0, "ln1_normalized": 0.0, "attn_z": 0.5, "attn_out": 0.5, "resid_mid": 0.5, "ln2_normalized": 0.5,
                  "router_logits": 0.5, "routing": 0.5, "mlp_out": 1.0, "per_layer_out": 1.0, "resid_post": 1.0}
"""Where in block l's span of the stream each per-layer kind sits, as an offset from l (see `stream_point`)."""
_PARALLEL_OFFSET = {"attn_z": 1.0, "attn_out": 1.0, "ln2_normalized": 0.0, "router_logits": 0.0, "routing": 0.0}
"""The offsets a parallel block changes: both branches read its input and both write into its output."""


def stream_point(site: HookSite, n_layers: int, parallel_block: bool = False) -> float:
    """Where in the residual stream a hook's vectors are read from or its write lands, as block index plus an offset.

    The one measure of depth every consumer shares (the selection's late-layer rule, the probe report's SAE carriers), so
    they cannot disagree. Block l spans `[l, l + 1]`: its input `resid_pre` (and what its attention norm reads) is at
    `l`; its attention's write `attn_out` (and `attn_z`, the heads it is made of) lands in `resid_mid`, which its MLP
    norm reads, at `l + 0.5`; its MLP's write `mlp_out` (and `per_layer_out`) lands in its output `resid_post`, at
    `l + 1`, which is `resid_pre` of block l + 1. In a parallel block (`ModelAdapter.parallel_block`) both branches read
    the input (`l`) and both write into the output (`l + 1`). The embeddings sit at 0 and the final norm at `n_layers`.

    Args:
        site: the parsed hook point (`ModelAdapter.hook_site`).
        n_layers: the model's decoder layers.
        parallel_block: whether attention and MLP run side by side on the block's input.

    Returns:
        The point, e.g. 2.5 for `blocks.2.hook_attn_out` of a sequential block: `floor` gives the block whose input
        stream holds it (2), `ceil` the first block input after it (3).
    """
    if site.kind == "ln_final_normalized":
        return float(n_layers)
    if site.layer is None:
        return 0.0
    offsets = _STREAM_OFFSET | (_PARALLEL_OFFSET if parallel_block else {})
    return site.layer + offsets[site.kind]


def hook_name(layer: int, kind: str = "resid_pre") -> str:
    """Build the TransformerLens name for a per-layer hook point."""
    if kind not in _SUFFIX:
        raise FeatsteerError(f"unknown hook kind '{kind}': use one of {', '.join(LAYER_KINDS + HEAD_KINDS + ROUTING_KINDS)}")
    return f"blocks.{layer}.{_SUFFIX[kind]}"


def parse_hook_name(name: str, n_layers: int) -> HookSite:
    """Parse and validate a hook name against a model with `n_layers` layers.

    Raises:
        FeatsteerError: for a malformed name or a layer out of range, with the valid forms in the message.
    """
    if name in _GLOBAL_NAMES:
        return HookSite(name=name, kind=_GLOBAL_NAMES[name], layer=None)
    match = _LAYER_RE.match(name)
    if match is None:
        raise FeatsteerError(
            f"unknown hook name '{name}': use hook_embed, ln_final.hook_normalized, blocks.<layer>.hook_<kind> with kind "
            f"in {', '.join(RESIDUAL_KINDS)}, blocks.<layer>.ln1.hook_normalized / ln2.hook_normalized, or blocks.<layer>.attn.hook_z"
        )
    layer = int(match.group(1))
    if layer >= n_layers:
        raise FeatsteerError(f"hook '{name}' names layer {layer} but the model has {n_layers} layers (0..{n_layers - 1})")
    return HookSite(name=name, kind=_KIND_OF_SUFFIX[match.group(2)], layer=layer)
