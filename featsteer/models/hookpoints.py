"""TransformerLens-style hook-point names, parsed once.

featsteer addresses every activation by the name TransformerLens gives it (`blocks.12.hook_resid_pre`), so
sae_lens SAEs attach by their `hook_name` and users can move between libraries without translation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from featsteer.errors import FeatsteerError

LAYER_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
"""Per-layer hook kinds, in the order they fire inside one decoder layer."""
GLOBAL_KINDS: tuple[str, ...] = ("embed", "pos_embed")

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|attn_out|resid_mid|mlp_out|resid_post)$")


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
        if self.layer is None:
            return (-1, GLOBAL_KINDS.index(self.kind))
        return (self.layer, LAYER_KINDS.index(self.kind))


def hook_name(layer: int, kind: str = "resid_pre") -> str:
    """Build the TransformerLens name for a per-layer hook point."""
    if kind not in LAYER_KINDS:
        raise FeatsteerError(f"unknown hook kind '{kind}': use one of {', '.join(LAYER_KINDS)}")
    return f"blocks.{layer}.hook_{kind}"


def parse_hook_name(name: str, n_layers: int) -> HookSite:
    """Parse and validate a hook name against a model with `n_layers` layers.

    Raises:
        FeatsteerError: for a malformed name or a layer out of range, with the valid forms in the message.
    """
    if name in ("hook_embed", "hook_pos_embed"):
        return HookSite(name=name, kind=name.removeprefix("hook_"), layer=None)
    match = _LAYER_RE.match(name)
    if match is None:
        raise FeatsteerError(
            f"unknown hook name '{name}': use hook_embed or blocks.<layer>.hook_<kind> with kind in "
            f"{', '.join(LAYER_KINDS)}"
        )
    layer = int(match.group(1))
    if layer >= n_layers:
        raise FeatsteerError(f"hook '{name}' names layer {layer} but the model has {n_layers} layers (0..{n_layers - 1})")
    return HookSite(name=name, kind=match.group(2), layer=layer)
