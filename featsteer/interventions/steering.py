"""Where interventions attach, and the context manager that attaches several at once.

An `Intervention` turns itself into `(hook_name, fn)` pairs for a given model; `steer(model, *items)`
installs them all for the duration of a `with` block and removes every hook on exit, also after an
exception. Directions may come from any source (DIM, probes, SAE decoder rows) as tensors or from a
`DirectionSet`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from featsteer.errors import FeatsteerError
from featsteer.interventions.operations import ablate, add, as_basis, cosine_to, project_set
from featsteer.models import ModelAdapter

WRITES = "writes"
"""Every residual write: `hook_embed` (and `hook_pos_embed`), each layer's `attn_out` and `mlp_out`.
Ablating there is exactly equivalent to orthogonalising the weights that write those outputs."""
RESIDUAL = "residual"
"""Every `resid_pre`, `resid_mid` and `resid_post` point (Arditi et al.'s placement)."""


def resolve_sites(model: ModelAdapter, where: str | Sequence[str]) -> list[str]:
    """Expand `writes`, `residual`, or a list of hook names into hook names for this model."""
    if where == WRITES:
        names = ["hook_embed"] + model.hook_names(("attn_out", "mlp_out"))
        if any(w.kind == "pos_embed" for w in model.residual_writers()):
            names.insert(1, "hook_pos_embed")
        return names
    if where == RESIDUAL:
        return model.hook_names(("resid_pre", "resid_mid", "resid_post"))
    if isinstance(where, str):
        return [where]
    return list(where)


class Intervention:
    """Base class: subclasses return `(hook_name, fn)` pairs for a model."""

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        """Hook pairs to install on `model`."""
        raise NotImplementedError


@dataclass
class Ablate(Intervention):
    """Directional ablation of a direction or basis at chosen hook points (default: every residual write)."""

    direction: Tensor
    """`(d_model,)` unit vector or `(k, d_model)` orthonormal basis."""
    where: str | Sequence[str] = WRITES
    """`writes`, `residual`, or hook names."""

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        basis = as_basis(self.direction).to(model.device)
        return [(name, lambda x, site, b=basis: ablate(x, b)) for name in resolve_sites(model, self.where)]


@dataclass
class AddDirection(Intervention):
    """Activation addition `x + scale * direction` at chosen hook points (all positions)."""

    direction: Tensor
    scale: float
    where: str | Sequence[str] = ()

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        if not self.where:
            raise FeatsteerError("AddDirection needs where=<hook name(s)>, e.g. blocks.4.hook_resid_pre")
        vector = self.direction.to(model.device)
        return [(name, lambda x, site: add(x, vector, self.scale)) for name in resolve_sites(model, self.where)]


@dataclass
class ProjectionSet(Intervention):
    """Set the projection on a unit direction to a fixed value (e.g. the mean harmful projection)."""

    direction: Tensor
    value: float
    where: str | Sequence[str] = ()

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        if not self.where:
            raise FeatsteerError("ProjectionSet needs where=<hook name(s)>")
        vector = self.direction.to(model.device)
        return [(name, lambda x, site: project_set(x, vector, self.value)) for name in resolve_sites(model, self.where)]


@dataclass
class ConditionalSteer(Intervention):
    """Conditional activation steering (CAST, Lee et al. 2024).

    On the prompt pass, each sequence's mean activation at `condition_hook` is compared with
    `condition` by cosine similarity; only sequences above `threshold` (or below, with `invert`) get
    `behaviour` applied (`scale * direction` added) at `where`, for the prompt and every generated token.
    The decision is taken on a forward pass that sees more than one token (the prompt) and kept for the
    single-token generation steps that follow.
    """

    condition: Tensor
    condition_hook: str
    threshold: float
    behaviour: Intervention
    invert: bool = False
    active: Tensor | None = field(default=None, init=False)
    """Per-sequence decision from the last prompt pass (bool `(batch,)`)."""
    similarity: Tensor | None = field(default=None, init=False)
    """Per-sequence cosine with `condition` from the last prompt pass (`(batch,)`), what `active` thresholds."""

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        condition = self.condition.to(model.device)

        def decide(x, site):
            if x.shape[1] > 1 or self.active is None or self.active.shape[0] != x.shape[0]:
                self.similarity = cosine_to(_mean_over_tokens(x, model.pass_attention_mask), condition)
                self.active = self.similarity < self.threshold if self.invert else self.similarity > self.threshold

        def gated(fn):
            def hook(x, site):
                steered = fn(x, site)
                if steered is None or self.active is None:
                    return steered
                return steered.where(self.active[:, None, None], x)

            return hook

        inner = [(name, gated(fn)) for name, fn in self.behaviour.hooks_for(model)]
        cond_site = model.hook_site(self.condition_hook)
        if any(model.hook_site(name).order < cond_site.order for name, _ in inner):
            raise FeatsteerError("ConditionalSteer: the condition hook must come before every steered hook")
        return [(self.condition_hook, decide), *inner]


def _mean_over_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `(batch, pos, d)` over each row's real tokens (left padding left out when the mask fits)."""
    if mask is None or mask.shape != x.shape[:2]:
        return x.mean(1)
    weights = mask.to(x.device, x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@contextlib.contextmanager
def steer(model: ModelAdapter, *interventions: Intervention) -> Iterator[ModelAdapter]:
    """Install several interventions at once; every hook is removed on exit (also after an error)."""
    pairs = [pair for item in interventions for pair in item.hooks_for(model)]
    with model.hooks(pairs):
        yield model
