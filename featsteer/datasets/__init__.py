"""Prompt sets: the input to every featsteer pipeline.

Re-exports the public API so callers write ``from featsteer.datasets import load_prompts`` and do not
depend on how the package is split into modules.
"""

from featsteer.datasets.builtin import BUILTIN_KINDS, BUILTIN_SPLITS
from featsteer.datasets.loaders import (
    DEFAULT_COLUMNS,
    PromptSet,
    builtin_prompts,
    load_prompts,
    prompt_set_hash,
    prompts_sha256,
    takes_column,
)

__all__ = [
    "BUILTIN_KINDS",
    "BUILTIN_SPLITS",
    "DEFAULT_COLUMNS",
    "PromptSet",
    "builtin_prompts",
    "load_prompts",
    "prompt_set_hash",
    "prompts_sha256",
    "takes_column",
]
