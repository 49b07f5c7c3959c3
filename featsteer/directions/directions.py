"""`DirectionSet`: per-hook unit vectors (or orthonormal bases) with their provenance.

Every direction source - difference in means, probes, SAE decoder rows - produces this one type, and every
intervention consumes it, so a new source plugs into every intervention without glue code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from featsteer.errors import FeatsteerError
from featsteer.files import json_text, write_files

logger = logging.getLogger(__name__)

ORTHONORMAL_TOLERANCE = 1e-4
"""Largest entry of `B B^T - I` a `DirectionSet` basis may have (float32 rounding of unit rows stays near 1e-7)."""


@dataclass(frozen=True)
class DirectionSet:
    """Directions read at hook points.

    Attributes mirror the stored form: `bases[i]` is a `(k, d_model)` orthonormal basis (k = 1 for a single
    direction) read at `hook_names[i]` and `positions[i]`.
    """

    bases: Tensor
    """`(n, k, d_model)` float32 (other dtypes are cast on construction); rows of each basis are orthonormal to within
    `ORTHONORMAL_TOLERANCE`, or all zero ("no direction here")."""
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

    def __post_init__(self) -> None:
        # one hook name (or position) for a single basis, not its letters: `hook_names="blocks.0.hook_resid_pre"` was
        # read as 23 names and failed with a count that named none of them
        if isinstance(self.hook_names, str):
            object.__setattr__(self, "hook_names", (self.hook_names,))
        if isinstance(self.positions, int):
            object.__setattr__(self, "positions", (self.positions,))
        if self.bases.dim() != 3 or not (self.bases.shape[0] == len(self.hook_names) == len(self.positions)):
            raise FeatsteerError(f"a DirectionSet needs (n, k, d_model) bases with one hook name and position per basis; got bases of shape "
                                 f"{tuple(self.bases.shape)}, {len(self.hook_names)} hook names and {len(self.positions)} positions")
        if self.bases.dtype != torch.float32:  # what save() writes and every intervention expects; float64 rows round to it
            object.__setattr__(self, "bases", self.bases.float())
        rows = self.bases.detach().double()
        gram = rows @ rows.transpose(1, 2)
        nonzero = ~(rows.flatten(1).norm(dim=1) == 0)  # a zero basis stands for "no direction here" (identical class means); NaN is not zero
        off = (gram - torch.eye(rows.shape[1], dtype=torch.float64, device=rows.device)).abs().flatten(1).amax(1)
        # float32 rounding of unit rows moves the Gram matrix by ~1e-7; a bfloat16 or half-normalised row is ~1e-3 off
        bad = (nonzero & ~(off <= ORTHONORMAL_TOLERANCE)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise FeatsteerError(f"the basis at {self.hook_names[i]} position {self.positions[i]} is not orthonormal (its Gram matrix is off "
                                 f"the identity by {float(off[i]):.3g}, more than {ORTHONORMAL_TOLERANCE:g}): store unit vectors or "
                                 "orthonormal rows, normalised in float32 or float64 (r / r.norm(), torch.linalg.qr)")

    def __len__(self) -> int:
        return len(self.hook_names)

    @property
    def rank(self) -> int:
        """Basis size k."""
        return int(self.bases.shape[1])

    def entry_label(self, i: int) -> str:
        """How errors and listings name entry `i`: its number, hook, position and, for SAE sets, its feature ids."""
        label = f"entry {i}: {self.hook_names[i]} position {self.positions[i]}"
        features = self.provenance.get("feature_ids")
        if isinstance(features, list) and len(features) == len(self) and isinstance(features[i], list):
            label += f" feature{'s' if len(features[i]) > 1 else ''} {','.join(str(f) for f in features[i])}"
        return label

    def entries(self, hook: str, position: int = -1) -> list[int]:
        """Indices of every entry read at `hook` and `position` (several when, e.g., two SAE features share a hook)."""
        return [i for i, (name, pos) in enumerate(zip(self.hook_names, self.positions, strict=True)) if name == hook and pos == position]

    def index(self, hook: str, position: int = -1) -> int:
        """Index of the direction read at `hook` and `position`.

        Raises:
            FeatsteerError: no entry there, or several (then take one by its entry number, `bases[i]`).
        """
        found = self.entries(hook, position)
        if len(found) > 1:
            listed = "; ".join(self.entry_label(i) for i in found[:6]) + ("; ..." if len(found) > 6 else "")
            raise FeatsteerError(f"{len(found)} directions are read at {hook} position {position} ({listed}): take one by its entry "
                                 "number, bases[i] (featsteer steer/abliterate: --direction-index I)")
        if found:
            return found[0]
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
        """Write `directions.safetensors` + `directions.json` to a directory (created if missing).

        Both files are rendered before either is written, and each replaces its old version whole (`write_files`), the
        JSON last: a save that fails (a provenance JSON cannot hold, a full disk) leaves the folder's previous set as it
        was, not new bases beside the old set's hook names."""
        meta = {"hook_names": list(self.hook_names), "positions": list(self.positions), "method": self.method,
                "scores": self.scores, "provenance": self.provenance}
        try:
            text = json_text(meta)
        except (TypeError, ValueError) as error:  # a Path, a tensor or a set in the provenance
            raise FeatsteerError(f"cannot save these directions: their scores or provenance hold a value JSON cannot store ({error}): "
                                 "keep them to numbers, strings, lists and dicts (str() a path, .tolist() a tensor)") from None
        return write_files(path, {"directions.safetensors": safetensors_bytes({"bases": self.bases.detach().contiguous().cpu()}),
                                  "directions.json": text})

    @classmethod
    def load(cls, path: str | Path) -> DirectionSet:
        """Read a directory written by `save`, or the chosen direction of a `featsteer directions --out` folder (its
        `chosen/` subfolder; `candidates/` holds every candidate)."""
        folder = Path(path)
        if not (folder / "directions.json").is_file():
            if (folder / "chosen" / "directions.json").is_file():  # featsteer directions' output folder: its pick
                logger.info("%s is a featsteer directions output: reading its chosen direction, %s", folder, folder / "chosen")
                return cls.load(folder / "chosen")
            inside = sorted(entry.parent.name for entry in folder.glob("*/directions.json"))
            hint = (f"its subfolder{'s' if len(inside) > 1 else ''} {', '.join(inside)} hold{'' if len(inside) > 1 else 's'} "
                    f"directions: pass one, e.g. {folder / inside[0]}") if inside else "run `featsteer directions` first"
            raise FeatsteerError(f"{folder} holds no directions (directions.json missing): {hint}")
        try:
            meta = json.loads((folder / "directions.json").read_text())
            bases = load_file(str(folder / "directions.safetensors"))["bases"]
            hook_names, positions, method = tuple(meta["hook_names"]), tuple(meta["positions"]), meta["method"]
        except Exception as error:  # noqa: BLE001 - a missing or cut-off tensor file, broken JSON, a missing key
            raise FeatsteerError(f"{folder} holds damaged directions ({type(error).__name__}: {str(error)[:120]}): "
                                 "run `featsteer directions` again") from None
        # JSON keeps NaN scores (candidates never scored) as null
        scores = {key: [float("nan") if value is None else value for value in values] for key, values in meta.get("scores", {}).items()}
        return cls(bases=bases, hook_names=hook_names, positions=positions, method=method, scores=scores, provenance=meta.get("provenance", {}))


def unit(vector: Tensor) -> Tensor:
    """Normalise to unit length (raises on a zero vector)."""
    norm = vector.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise FeatsteerError("cannot normalise a zero or non-finite direction: the two prompt sets have identical means")
    return vector / norm
