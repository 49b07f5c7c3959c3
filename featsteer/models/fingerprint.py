"""A short hash of a model's weights, for what a model's name cannot tell apart.

A model's name is the path as typed (or a GGUF file's name), which a retrained or re-exported model at the same path
shares. Capture records the hash in its provenance and `sae_training` keys its activation cache with it, so neither
mistakes one set of weights for another.
"""

from __future__ import annotations

import hashlib

import torch

from featsteer.models.adapter import ModelAdapter


def weights_fingerprint(model: ModelAdapter, samples: int = 64) -> str | None:
    """A 16-hex-digit hash of every parameter's name and shape and `samples` values spread over it.

    It reads `samples` values per parameter, not the weights, so it costs milliseconds on a 0.5B model, and any edit that
    changes the weights broadly (fine-tuning, abliteration of every writer) changes it; an edit confined to a few entries
    between the sampled ones can keep it.

    Args:
        model: an adapter whose `model` has `named_parameters` (a Hugging Face or TransformerLens model).
        samples: values read per parameter.

    Returns:
        The hash, or None for a model that exposes no parameters.
    """
    module = getattr(model, "model", None)
    if not hasattr(module, "named_parameters"):
        return None
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            flat = parameter.detach().reshape(-1)
            picked = flat[:: max(1, flat.numel() // samples)][:samples].to("cpu", torch.float32)
            digest.update(f"{name}{tuple(parameter.shape)}".encode())
            digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:16]
