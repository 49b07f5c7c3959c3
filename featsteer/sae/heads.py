"""SAEs on the attention heads side by side (`blocks.{l}.attn.hook_z`), read and written as flat rows.

An attention-output SAE (Kissane et al. 2024; Gemma Scope's `-att` releases) reads one layer's `hook_z`,
`(..., n_heads, d_head)`, as a single `n_heads * d_head` vector. sae_lens marks such SAEs with
`cfg.reshape_activations == "hook_z"`: their `encode` then flattens the last two axes of its input and their
`decode` reshapes its output back, with `d_head` remembered from the last `encode`. Other sae_lens loaders (Gemma
Scope 3) keep `reshape_activations="none"` at hook_z and expect flat rows.

featsteer works in one convention for both: every SAE reads and writes flat `(..., d_in)` rows. Captured hook_z rows
are already flat (see `featsteer.activations.capture`), and splicing flattens the hook's heads before the SAE and
puts them back after. `flat_rows` switches sae_lens' reshaping off for the duration of a `with` block and restores it
exactly, so an SAE handed to featsteer still behaves as sae_lens' own code expects afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sae_lens import SAE

HOOK_Z_RESHAPING = "hook_z"
"""The `cfg.reshape_activations` value of sae_lens SAEs that flatten `(n_heads, d_head)` themselves."""
HOOK_Z_SUFFIX = "attn.hook_z"
"""How the name of every hook_z hook point ends (`blocks.{l}.attn.hook_z`)."""
_RESHAPE_STATE = ("reshape_fn_in", "reshape_fn_out", "d_head", "hook_z_reshaping_mode")
"""The attributes sae_lens' `turn_on/off_forward_pass_hook_z_reshaping` set on an SAE."""


def reshapes_heads(sae: SAE) -> bool:
    """True when sae_lens reshapes this SAE's inputs and outputs between `(..., n_heads, d_head)` and flat rows."""
    return getattr(sae.cfg, "reshape_activations", "none") == HOOK_Z_RESHAPING


def reads_heads(sae: SAE, hook: str | None = None) -> bool:
    """True for an SAE on the attention heads side by side: attached at `hook` when given, a `blocks.{l}.attn.hook_z`
    name; otherwise its recorded hook is one, or sae_lens reshapes its inputs as hook_z (`reshape_activations="hook_z"`)."""
    if hook is not None:
        return hook.endswith(HOOK_Z_SUFFIX)
    recorded = sae.cfg.metadata.hook_name if sae.cfg.metadata is not None else None
    return reshapes_heads(sae) or bool(recorded and recorded.endswith(HOOK_Z_SUFFIX))


@contextlib.contextmanager
def flat_rows(sae: SAE) -> Iterator[SAE]:
    """Within the block, `sae.encode` reads and `sae.decode` returns flat `(..., d_in)` rows, whatever its
    `reshape_activations`; sae_lens' own reshaping state is put back on exit, also after an exception.

    Yields:
        The same SAE.
    """
    if not getattr(sae, "hook_z_reshaping_mode", False):
        yield sae
        return
    saved = {name: getattr(sae, name) for name in _RESHAPE_STATE if hasattr(sae, name)}
    sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        yield sae
    finally:
        for name, value in saved.items():
            setattr(sae, name, value)
