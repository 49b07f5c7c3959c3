"""`DirectionSet`: per-hook unit vectors (or orthonormal bases) with their provenance.

Every direction source - difference in means, probes, SAE decoder rows - produces this one type, and every
intervention consumes it, so a new source plugs into every intervention without glue code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from featsteer.errors import FeatsteerError


@dataclass(frozen=True)
class DirectionSet:
    """Directions read at hook points.

    Attributes mirror the stored form: `bases[i]` is a `(k, d_model)` orthonormal basis (k = 1 for a single
    direction) read at `hook_names[i]` and `positions[i]`.
    """

    bases: Tensor
    """`(n, k, d_model)` float32; rows of each basis are orthonormal."""
    hook_names: tuple[str, ...]
    """Hook point each basis was read at."""
    positions: tuple[int, ...]
    """Position label each basis was read at (-1 = last prompt token)."""
    method: str
    """How the directions were found (`dim`, `projected_dim`, `pca`, `svd`, `probe:linear`, `sae:...`)."""
    scores: dict[str, list[float]] = field(default_factory=dict)
    """Named per-direction metrics, each a list aligned with `hook_names`."""
    provenance: dict = field(default_factory=dict)
    """Model name, prompt-set hashes and sizes, library versions: whatever reproduces the set."""

    def __len__(self) -> int:
        return len(self.hook_names)

    @property
    def rank(self) -> int:
        """Basis size k."""
        return int(self.bases.shape[1])

    def index(self, hook: str, position: int = -1) -> int:
        """Index of the direction read at `hook` and `position`."""
        for i, (name, pos) in enumerate(zip(self.hook_names, self.positions, strict=True)):
            if name == hook and pos == position:
                return i
        raise FeatsteerError(f"no direction for {hook} at position {position}; available: {sorted(set(self.hook_names))}")

    def direction(self, hook: str, position: int = -1) -> Tensor:
        """The unit vector `(d_model,)` for a rank-1 set."""
        if self.rank != 1:
            raise FeatsteerError(f"this set holds rank-{self.rank} bases: use basis() instead of direction()")
        return self.bases[self.index(hook, position), 0]

    def basis(self, hook: str, position: int = -1) -> Tensor:
        """The `(k, d_model)` orthonormal basis."""
        return self.bases[self.index(hook, position)]

    def save(self, path: str | Path) -> Path:
        """Write `directions.safetensors` + `directions.json` to a directory."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"bases": self.bases.contiguous()}, str(out / "directions.safetensors"))
        meta = {"hook_names": list(self.hook_names), "positions": list(self.positions), "method": self.method,
                "scores": self.scores, "provenance": self.provenance}
        tmp = out / "directions.json.partial"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.rename(out / "directions.json")
        return out

    @classmethod
    def load(cls, path: str | Path) -> DirectionSet:
        """Read a directory written by `save`."""
        folder = Path(path)
        if not (folder / "directions.json").is_file():
            raise FeatsteerError(f"{folder} holds no directions (directions.json missing): run `featsteer directions` first")
        meta = json.loads((folder / "directions.json").read_text())
        bases = load_file(str(folder / "directions.safetensors"))["bases"]
        return cls(bases=bases, hook_names=tuple(meta["hook_names"]), positions=tuple(meta["positions"]),
                   method=meta["method"], scores=meta["scores"], provenance=meta["provenance"])


def unit(vector: Tensor) -> Tensor:
    """Normalise to unit length (raises on a zero vector)."""
    norm = vector.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise FeatsteerError("cannot normalise a zero or non-finite direction: the two prompt sets have identical means")
    return vector / norm
