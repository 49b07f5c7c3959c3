"""featsteer: find and steer the features behind refusal in language models.

The everyday entry points are reachable from the top level (`import featsteer as fs; fs.load_model("organism")`);
each is imported on first use, so `import featsteer` stays cheap (no torch or transformers until a name is needed).
The subpackages hold the rest: `featsteer.models`, `.datasets`, `.activations`, `.directions`, `.interventions`,
`.edits`, `.evaluation`, `.sae`, `.features`, `.pipeline`, `.compare` (its `compare` is not re-exported:
the top-level name belongs to the submodule).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it; one table, so the top level and the subpackages cannot drift apart
_EXPORTS: dict[str, str] = {
    "load_model": "featsteer.models",
    "builtin_prompts": "featsteer.datasets",
    "load_prompts": "featsteer.datasets",
    "capture": "featsteer.activations",
    "difference_in_means": "featsteer.directions",
    "DirectionSet": "featsteer.directions",
    "steer": "featsteer.interventions",
    "Ablate": "featsteer.interventions",
    "AddDirection": "featsteer.interventions",
    "apply_edit": "featsteer.edits",
    "EditConfig": "featsteer.edits",
    "evaluate_refusal": "featsteer.evaluation.behaviour",
    "GenerationConfig": "featsteer.evaluation.behaviour",
    "find_refusal_direction": "featsteer.pipeline",
    "abliterate": "featsteer.pipeline",
    "load_saes": "featsteer.sae",
    "FeatsteerError": "featsteer.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'featsteer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
