"""The SAE architectures `featsteer-train-sae` can train, as a registry of sae_lens training configs.

Each entry maps our `--arch` name to sae_lens' training SAE config class and our defaults for it, so a
new architecture is one row here; the SAE classes themselves are sae_lens' (looked up in its registry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sae_lens import (
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
    TrainingSAE,
)
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import SAEMetadata, TrainingSAEConfig

from featsteer.errors import FeatsteerError

DEFAULT_K = 32
"""Active features per token when `--k` is not given."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to build one sae_lens training config."""

    name: str
    """sae_lens architecture name (also our `--arch` value)."""
    config_class: type[TrainingSAEConfig]
    """sae_lens training config class."""
    uses_k: bool
    """Whether `k` (active features) controls sparsity."""
    sparsity_field: str | None
    """Config field set from `--sparsity` (None: not applicable)."""
    default_sparsity: float | None
    """Our default for that field."""
    extra: Callable[[int], dict[str, Any]]
    """Extra config fields given the number of training steps (e.g. penalty warm-up)."""


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "topk": ArchitectureSpec("topk", TopKTrainingSAEConfig, True, None, None, lambda steps: {}),
    # the inference threshold is an EMA of the smallest kept activation; short runs need a faster EMA to converge
    "batchtopk": ArchitectureSpec("batchtopk", BatchTopKTrainingSAEConfig, True, None, None,
                                  lambda steps: {"topk_threshold_lr": max(0.01, min(0.1, 20 / max(steps, 1)))}),
    "standard": ArchitectureSpec("standard", StandardTrainingSAEConfig, False, "l1_coefficient", 5.0,
                                 lambda steps: {"l1_warm_up_steps": steps // 20}),
    "jumprelu": ArchitectureSpec("jumprelu", JumpReLUTrainingSAEConfig, False, "l0_coefficient", 0.5,
                                 lambda steps: {"l0_warm_up_steps": steps // 20}),
}
"""`--arch` name -> how to build its sae_lens training config."""


def build_training_sae(
    architecture: str,
    d_in: int,
    d_sae: int,
    metadata: SAEMetadata,
    *,
    k: float | None = None,
    sparsity_coefficient: float | None = None,
    normalize_activations: bool = True,
    n_steps: int = 1000,
    reshape_activations: str = "none",
) -> TrainingSAE:
    """A freshly initialised sae_lens training SAE (seed torch first for reproducibility).

    Args:
        architecture: key of `ARCHITECTURES`.
        d_in: input width (the model's `d_model`; `n_heads * d_head` for an SAE on the attention heads, hook_z).
        d_sae: number of features.
        metadata: sae_lens metadata (hook_name, model_name, ...), saved with the SAE.
        k: active features (topk/batchtopk); default `DEFAULT_K`.
        sparsity_coefficient: L1/L0 penalty (standard/jumprelu); default from the registry.
        normalize_activations: train on inputs rescaled to mean norm sqrt(d_in).
        n_steps: planned optimiser steps (penalty warm-ups are a fraction of it).
        reshape_activations: sae_lens' `reshape_activations`: `"hook_z"` for an SAE on `blocks.{l}.attn.hook_z`, so the
            saved inference SAE flattens `(..., n_heads, d_head)` inputs itself as sae_lens' hook_z SAEs do (training reads
            flat rows either way), else `"none"`.

    Raises:
        FeatsteerError: unknown architecture, or `k` not below `d_sae`.
    """
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        raise FeatsteerError(f"unknown SAE architecture '{architecture}': use one of {', '.join(ARCHITECTURES)}")
    fields: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "metadata": metadata, **spec.extra(n_steps),
                              "normalize_activations": "expected_average_only_in" if normalize_activations else "none",
                              "reshape_activations": reshape_activations}
    if spec.uses_k:
        active = DEFAULT_K if k is None else k
        if active >= d_sae:
            raise FeatsteerError(f"--k {active:g} must be smaller than the number of features ({d_sae})")
        fields["k"] = int(active) if architecture == "topk" else float(active)
    if spec.sparsity_field is not None:
        fields[spec.sparsity_field] = spec.default_sparsity if sparsity_coefficient is None else sparsity_coefficient
    config = spec.config_class(**fields)
    sae_class, _ = get_sae_training_class(architecture)
    return sae_class(config)
