"""The embedded refusal organism: a tiny Llama-architecture model that really refuses, shipped in the package.

Every behavioural test in CI and `make demo` need a model that refuses harmful requests by its own learned
computation, loads in a second and runs on a CPU. Real chat models are gigabytes; this one is a few
megabytes, trained from scratch by :mod:`featsteer.organism.train` on the corpus of
:mod:`featsteer.organism.corpus`, and its weights live next to this file.
"""

from __future__ import annotations

from pathlib import Path

from featsteer.errors import FeatsteerError

ORGANISM_DIR: Path = Path(__file__).resolve().parent / "weights"
"""Folder holding the shipped organism (config, safetensors weights, tokenizer files)."""

ORGANISM_SAE_DIR: Path = Path(__file__).resolve().parent / "saes"
"""Folder holding the SAEs shipped with the organism, one sae_lens folder per hook (``saes/<hook_name>/``)."""

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def organism_path() -> Path:
    """Return the folder of the shipped organism, checking that its files are present.

    Returns:
        A directory loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        FeatsteerError: If any weight or tokenizer file is missing.
    """
    missing = [name for name in _REQUIRED_FILES if not (ORGANISM_DIR / name).is_file()]
    if missing:
        raise FeatsteerError(
            f"organism weights missing from {ORGANISM_DIR} ({', '.join(missing)}); reinstall featsteer or run "
            "`python -m featsteer.organism.train --out featsteer/organism/weights`"
        )
    return ORGANISM_DIR


def organism_sae_path() -> Path:
    """Return the folder of the SAEs shipped with the organism.

    Raises:
        FeatsteerError: If no SAE folder is present.
    """
    if not ORGANISM_SAE_DIR.is_dir() or not any((p / "cfg.json").is_file() for p in ORGANISM_SAE_DIR.iterdir()):
        raise FeatsteerError(
            f"the organism's SAEs are missing from {ORGANISM_SAE_DIR}; reinstall featsteer or train them with "
            "`featsteer-train-sae --model organism --out featsteer/organism/saes ...` (see the README)"
        )
    return ORGANISM_SAE_DIR


__all__ = ["ORGANISM_DIR", "ORGANISM_SAE_DIR", "organism_path", "organism_sae_path"]
