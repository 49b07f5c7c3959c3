"""Where interventions attach, and the context manager that attaches several at once.

An `Intervention` turns itself into `(hook_name, fn)` pairs for a given model; `steer(model, *items)`
installs them all for the duration of a `with` block and removes every hook on exit, also after an
exception. Directions may come from any source (DIM, probes, SAE decoder rows) as tensors or from a
`DirectionSet`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from featsteer.errors import FeatsteerError
from featsteer.interventions.operations import (
    ablate,
    add,
    cosine_to,
    orthonormal_basis,
    project_set,
    rotate_in_plane,
)
from featsteer.interventions.positions import TOKEN_POSITIONS, PositionTracker
from featsteer.models import NORM_KINDS, WRITE_KINDS, ModelAdapter, TokenBatch

WRITES = "writes"
"""Every residual write: `hook_embed` (and `hook_pos_embed`), each layer's `attn_out` and `mlp_out` (and Gemma 4's
`per_layer_out`).
Ablating there is exactly equivalent to orthogonalising the weights that write those outputs."""
RESIDUAL = "residual"
"""Every `resid_pre`, `resid_mid` and `resid_post` point (Arditi et al.'s placement)."""
LAYERS = "layers"
"""Every layer's input, `blocks.{l}.hook_resid_pre`: where the stream is read by each block."""
NORMS = "norms"
"""Every block's normalised inputs, `blocks.{l}.ln1.hook_normalized` and `blocks.{l}.ln2.hook_normalized`: what its
attention and its MLP read. A change there reaches the block's computation but leaves the residual stream itself
alone (the placement of angular steering in Vu & Nguyen 2025)."""


def resolve_sites(model: ModelAdapter, where: str | Sequence[str]) -> list[str]:
    """Expand `writes`, `residual`, `layers`, `norms`, or a list of hook names into hook names for this model."""
    if where == WRITES:
        names = ["hook_embed"] + model.hook_names(WRITE_KINDS)
        if any(w.kind == "pos_embed" for w in model.residual_writers()):
            names.insert(1, "hook_pos_embed")
        return names
    if where == RESIDUAL:
        return model.hook_names(("resid_pre", "resid_mid", "resid_post"))
    if where == LAYERS:
        return model.hook_names(("resid_pre",))
    if where == NORMS:
        return model.hook_names(NORM_KINDS)
    names = [where] if isinstance(where, str) else list(where)
    for name in names:
        if model.hook_site(name).kind == "attn_z":
            raise FeatsteerError(f"{name} holds the attention heads side by side (n_heads x d_head): direction interventions act "
                                 "on d_model-wide hook points; steer the heads' sum at blocks.L.hook_attn_out (decoder_directions maps an "
                                 "attention SAE's features there), edit its features with FeatureSteer, or edit heads with model.hooks")
    return names


def _check_finite(owner: str, **values: float) -> None:
    """Every named number finite, or one line naming it: a NaN scale or value makes every steered activation NaN, which
    `run` and `logits` would return without a word."""
    for name, value in values.items():
        if not math.isfinite(float(value)):
            raise FeatsteerError(f"{owner}'s {name} is {value}: give a finite number")


class Intervention:
    """Base class: subclasses return `(hook_name, fn)` pairs for a model."""

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        """Hook pairs to install on `model`."""
        raise NotImplementedError

    def prepass_for(self, model: ModelAdapter) -> Callable[[TokenBatch], None] | None:
        """A function to call on each prompt batch before its pass (`ModelAdapter.prepasses`), or None (most
        interventions need none)."""
        return None


@dataclass
class Ablate(Intervention):
    """Directional ablation of a direction or basis at chosen hook points (default: every residual write)."""

    direction: Tensor
    """`(d_model,)` unit vector or `(k, d_model)` orthonormal basis."""
    where: str | Sequence[str] = WRITES
    """`writes`, `residual`, or hook names."""
    strength: float = 1.0
    """1 removes the component (ablation); 2 reflects it, `x - 2 (x.r) r`, as `EditConfig.reflection` edits the weights."""
    weighted: bool = False
    """Accept orthogonal rows shorter than 1 as a damped projector (the SVD method's `directions.weighted_basis`);
    otherwise rows must be unit within 1e-2, so a raw vector is refused rather than partly removed."""

    def __post_init__(self) -> None:
        _check_finite("Ablate", strength=self.strength)

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        names = resolve_sites(model, self.where)
        _check_width(model, names, self.direction)
        basis = orthonormal_basis(self.direction, "the ablated direction", weighted=self.weighted).to(model.device)
        return [(name, lambda x, site, b=basis: ablate(x, b, self.strength)) for name in names]


@dataclass
class HeadAblate(Intervention):
    """Switch attention heads off: their `blocks.{l}.attn.hook_z` values zeroed, so each writes nothing into the stream
    (the same model as zeroing their columns of the output projection; the projection's bias, which no head owns,
    stays). The head-ablation counterpart of `apply_edit(heads=...)`, which removes one direction from their writes."""

    heads: Mapping[int, Sequence[int]]
    """`{layer: [head, ...]}`."""

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        return [(f"blocks.{layer}.attn.hook_z", lambda z, site, index=ids: z.index_fill(2, torch.tensor(index, device=z.device), 0.0))
                for layer, ids in model.head_ids(self.heads).items()]


@dataclass
class AddDirection(Intervention):
    """Activation addition `x + scale * direction` at chosen hook points.

    `positions="prompt"` changes how the model reads the request and leaves its decoding alone: the generated tokens
    see the shifted prompt through attention only. `positions="generated"` is the converse. The prompt/generation split
    comes from the model's own account (`interventions.positions.PositionTracker`).
    """

    direction: Tensor
    scale: float
    where: str | Sequence[str] = ()
    positions: str = "all"
    """`all`, `prompt` or `generated` (`interventions.positions.TOKEN_POSITIONS`)."""

    def __post_init__(self) -> None:
        _check_finite("AddDirection", scale=self.scale)
        if self.direction.dim() != 1:
            raise FeatsteerError(f"AddDirection adds one (d_model,) vector, got shape {tuple(self.direction.shape)}: pick one row of a basis "
                                 "(a (k, d_model) one was added row by row to the first k tokens, or failed inside the forward pass)")
        if not bool(torch.isfinite(self.direction.detach()).all()):
            raise FeatsteerError("AddDirection's direction contains NaN/inf, which would make every steered activation NaN: recompute it")
        if self.positions not in TOKEN_POSITIONS:
            raise FeatsteerError(f"unknown positions '{self.positions}' for AddDirection: use one of {', '.join(TOKEN_POSITIONS)}")

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        if not self.where:
            raise FeatsteerError("AddDirection needs where=<hook name(s)>, e.g. blocks.4.hook_resid_pre")
        vector = self.direction.to(model.device)
        names = resolve_sites(model, self.where)
        _check_width(model, names, vector)
        if self.positions == "all":
            return [(name, lambda x, site: add(x, vector, self.scale)) for name in names]
        return [(name, _masked_add(model, vector, self.scale, self.positions)) for name in names]


def _check_width(model: ModelAdapter, names: Sequence[str], vector: Tensor, what: str = "the direction") -> None:
    """A vector as wide as every hook it acts at, or one clear line (not a matrix-shape error from inside the forward)."""
    from featsteer.activations import hook_width

    for name in names:
        width = hook_width(model, name)
        if vector.shape[-1] != width:
            raise FeatsteerError(f"{what} is {vector.shape[-1]} wide but {name} of {model.name} carries {width} values: "
                                 "use a direction found on this model")


def _masked_add(model: ModelAdapter, vector: Tensor, scale: float, positions: str):
    tracker = PositionTracker(model=model)

    def hook(x: Tensor, site) -> Tensor | None:
        keep = tracker.selected(positions, x.shape[0], x.shape[1], x.device)
        if not bool(keep.any()):
            return None
        return add(x, keep[..., None].to(vector.dtype) * vector, scale)

    return hook


def _unit_direction(direction: Tensor, what: str, atol: float = 1e-2) -> Tensor:
    """`direction` as one `(d_model,)` unit vector, checked: setting the projection on a vector shorter than 1 sets
    neither its projection nor the unit direction's (0.5 r set to 3 leaves `x.r` at `0.75 x.r + 1.5`)."""
    basis = orthonormal_basis(direction, what, atol, weighted=True)  # a short vector gets the message below
    if basis.shape[0] != 1:
        raise FeatsteerError(f"{what} must be one (d_model,) vector, got {basis.shape[0]} rows")
    norm = float(basis[0].detach().double().norm())
    if abs(norm - 1.0) > atol:
        raise FeatsteerError(f"{what} has norm {norm:.4g}, not 1: the projection is set on a unit vector; normalise it (r / r.norm())")
    return basis[0]


@dataclass
class ProjectionSet(Intervention):
    """Set the projection on a unit direction to a fixed value (e.g. the mean harmful projection)."""

    direction: Tensor
    value: float
    where: str | Sequence[str] = ()

    def __post_init__(self) -> None:
        _check_finite("ProjectionSet", value=self.value)

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        if not self.where:
            raise FeatsteerError("ProjectionSet needs where=<hook name(s)>")
        names = resolve_sites(model, self.where)
        _check_width(model, names, self.direction)
        vector = _unit_direction(self.direction, "the direction whose projection is set").to(model.device)
        return [(name, lambda x, site: project_set(x, vector, self.value)) for name in names]


@dataclass
class AffineEdit(Intervention):
    """Affine concept editing (ACE, Marshall et al. 2024): the projection on a unit direction is set, at each hook,
    to a point on the line from the harmless mean's projection (`alpha` 0) to the harmful mean's (`alpha` 1).

    Directional ablation sets the projection to 0, an origin that means nothing to the model; ACE measures it from
    where harmless activations sit at that layer. `alpha < 0` pushes past the harmless side, `alpha > 0` towards
    refusal (1 reproduces the harmful mean's projection, as `ProjectionSet` with that value does at one hook).
    """

    direction: Tensor
    """`(d_model,)` unit vector."""
    harmless: Mapping[str, float]
    """Hook name -> the harmless mean activation's projection on `direction` there (the reference point)."""
    harmful: Mapping[str, float]
    """Hook name -> the harmful mean's projection (what `alpha` 1 sets)."""
    alpha: float = 0.0

    def __post_init__(self) -> None:
        _check_finite("AffineEdit", alpha=self.alpha, **{f"harmless projection at {h}": v for h, v in self.harmless.items()},
                      **{f"harmful projection at {h}": v for h, v in self.harmful.items()})
        if set(self.harmless) != set(self.harmful) or not self.harmless:
            raise FeatsteerError("AffineEdit needs the harmless and harmful mean projections at the same, non-empty set of hooks")

    def values(self) -> dict[str, float]:
        """Hook name -> the projection each hook is set to."""
        return {hook: self.harmless[hook] + self.alpha * (self.harmful[hook] - self.harmless[hook]) for hook in self.harmless}

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        vector = _unit_direction(self.direction, "ACE's direction").to(model.device)
        values = self.values()
        _check_width(model, list(values), vector)
        return [(name, lambda x, site, v=value: project_set(x, vector, v)) for name, value in values.items()]


@dataclass
class AngularSteer(Intervention):
    """Angular steering (Vu & Nguyen 2025): in the plane of a behaviour direction and a second axis, turn each
    activation's in-plane component to a fixed angle from the direction, keeping its length (and so the
    activation's norm). See `operations.rotate_in_plane`.

    It turns whatever the hooks at `where` carry. The default, every layer's `resid_pre`, is the residual stream
    itself, where featsteer's DIM directions are read; `NORMS` turns the normalised activations each block's attention
    and MLP read, as the paper does, and leaves the stream alone. A normalised activation (RMSNorm) is the stream
    divided by its root mean square, so the same plane applies to both.
    """

    plane: Tensor
    """`(2, d_model)` orthonormal rows: the behaviour direction first (e.g. `directions.rotation_plane`)."""
    degrees: float
    """Target angle from the direction: 0 full behaviour, 180 against it."""
    where: str | Sequence[str] = LAYERS
    adaptive: bool = True
    """Turn only activations whose projection on the direction is positive (those leaning towards the behaviour)."""

    def __post_init__(self) -> None:
        _check_finite("AngularSteer", degrees=self.degrees)
        if self.plane.dim() != 2 or self.plane.shape[0] != 2:
            raise FeatsteerError(f"AngularSteer needs a (2, d_model) plane, got shape {tuple(self.plane.shape)}")
        gram = self.plane.double() @ self.plane.double().T
        if not torch.allclose(gram, torch.eye(2, dtype=torch.float64), atol=1e-4):
            raise FeatsteerError("AngularSteer needs orthonormal plane rows: build the plane with featsteer.directions.rotation_plane")

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        plane = self.plane.to(model.device)
        names = resolve_sites(model, self.where)
        _check_width(model, names, plane)
        return [(name, lambda x, site: rotate_in_plane(x, plane, self.degrees, self.adaptive)) for name in names]


@dataclass
class ConditionalSteer(Intervention):
    """Conditional activation steering (CAST, Lee et al. 2024).

    On the prompt pass, each sequence's mean activation at `condition_hook` (or with `pool="last"` its last prompt
    token's) is compared with `condition` by cosine similarity; only sequences above `threshold` (or below, with `invert`) get
    `behaviour` applied (`scale * direction` added) at `where`, for the prompt and every generated token.
    The decision is taken on the prompt's tokens only: on the prompt pass, and again from the prompt's columns when a
    decoding pass re-reads the whole sequence (backends without a key-value cache, `ModelAdapter.run_continued`); the
    single-token steps of a cached generation keep it.

    With `lookahead`, the decision is taken in a pre-pass of each prompt batch that runs the model up to
    `condition_hook` without this steering (`ModelAdapter.prepasses`; other interventions installed with it still
    act), so `behaviour` may act at any hook, also before the condition's: a sequence the gate fires on is then
    steered exactly as `behaviour` alone steers it, and the others not at all. It costs a forward pass of the prompt
    up to the condition hook. A lookahead gate may be another gate's `behaviour`: its pre-pass runs after the outer one's.
    """

    condition: Tensor
    condition_hook: str
    threshold: float
    behaviour: Intervention
    invert: bool = False
    pool: str = "mean"
    """How the prompt's activations become the one vector compared: `mean` over its real tokens (the paper's) or
    `last`, the final prompt token's (where the chat template ends and the answer starts)."""
    lookahead: bool = False
    """Decide in a pre-pass of the prompt (see above), so `behaviour` may steer hooks before `condition_hook`."""
    active: Tensor | None = field(default=None, init=False)
    """Per-sequence decision from the last prompt pass (bool `(batch,)`)."""
    similarity: Tensor | None = field(default=None, init=False)
    """Per-sequence cosine with `condition` from the last prompt pass (`(batch,)`), what `active` thresholds."""

    def __post_init__(self) -> None:
        _check_finite("ConditionalSteer", threshold=self.threshold)
        if self.condition.dim() != 1:
            raise FeatsteerError(f"ConditionalSteer compares prompts with one (d_model,) condition vector, got shape {tuple(self.condition.shape)}")
        condition = self.condition.detach().double()
        if not bool(torch.isfinite(condition).all()) or not float(condition.norm()) > 0:
            raise FeatsteerError("ConditionalSteer's condition vector is zero or holds NaN/inf: every prompt's cosine with it would be 0 "
                                 "(or NaN), so the gate would fire on all prompts or on none; fit one with fit_gate")
        if self.pool not in POOLS:
            raise FeatsteerError(f"unknown pool '{self.pool}' for ConditionalSteer: use one of {', '.join(POOLS)}")

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        condition = self.condition.to(model.device)
        _check_width(model, [self.condition_hook], condition, "the condition vector")

        def decide(x, site):
            if self.lookahead and not model.in_prepass:  # decided by the pre-pass
                return
            mask = model.pass_attention_mask
            if model.generation_step:  # a decoding pass: the decision stays the prompt's
                if x.shape[1] == 1 and self.active is not None and self.active.shape[0] == x.shape[0]:
                    return
                width = model.generation_prompt_length  # re-read or teacher-forced sequence: pool the prompt only
                x, mask = x[:, :width], None if mask is None else mask[:, :width]
            # every other pass is a prompt's, a one-token prompt's too: decide afresh
            self.similarity = cosine_to(pool_prompt(x, mask, self.pool), condition.float())  # float32, as the gate was fitted
            self.active = self.similarity < self.threshold if self.invert else self.similarity > self.threshold

        def decision(x, site) -> Tensor:
            if self.active is None or self.active.shape[0] != x.shape[0]:
                raise FeatsteerError(f"ConditionalSteer at {site.name} has no decision for this batch (its condition hook did not run "
                                     "before it, or its pre-pass did not): install it with featsteer.interventions.steer")
            return self.active

        def gated(fn):
            if getattr(fn, "checks_steered_rows", False):  # a check of what the steering did: it reads the steered rows only
                def check(x, site):
                    if not (self.lookahead and model.in_prepass):  # a pre-pass steers nothing
                        active = decision(x, site)
                        if bool(active.any()):
                            fn(x[active.to(x.device)], site)

                return check

            def hook(x, site):
                steered = fn(x, site)  # called in a pre-pass too: a gate in `behaviour` decides there
                if steered is None or (self.lookahead and model.in_prepass):  # a pre-pass reads the model without this steering
                    return None
                return steered.where(decision(x, site).view(-1, *[1] * (x.dim() - 1)), x)  # (batch, pos, d) or hook_z's 4-D

            return hook

        inner = [(name, gated(fn)) for name, fn in self.behaviour.hooks_for(model)]
        cond_site = model.hook_site(self.condition_hook)
        if not self.lookahead and any(model.hook_site(name).order < cond_site.order for name, _ in inner):
            raise FeatsteerError("ConditionalSteer: the condition hook must come before every steered hook (or decide in a pre-pass "
                                 "with lookahead=True)")
        return [(self.condition_hook, decide), *inner]

    def prepass_for(self, model: ModelAdapter) -> Callable[[TokenBatch], None] | None:
        inner = self.behaviour.prepass_for(model)  # a lookahead gate as the behaviour decides in its own pre-pass
        if not self.lookahead:
            return inner

        def prepass(batch: TokenBatch) -> None:
            model.run(batch, stop_at=self.condition_hook)
            # taken under inference mode: copies, so a pass that records gradients can use them
            self.active, self.similarity = self.active.clone(), self.similarity.clone()
            if inner is not None:
                inner(batch)

        return prepass


POOLS = ("mean", "last")
"""How a conditional gate pools a prompt's activations (`ConditionalSteer.pool`)."""


def pool_prompt(x: Tensor, mask: Tensor | None, pool: str) -> Tensor:
    """`(batch, pos, d)` prompt activations (left padded) to one float32 `(batch, d)` row each: the mean over real tokens
    or the last token's. Float32 whatever the model's dtype, so a bfloat16 model's gate scores (and `fit_gate`'s, which
    pool the same way) are not rounded to bfloat16's 3 significant digits."""
    return x[:, -1].float() if pool == "last" else mean_over_tokens(x.float(), mask)


def mean_over_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `(batch, pos, d)` over each row's real tokens (left padding left out when the mask fits)."""
    if mask is None or mask.shape != x.shape[:2]:
        return x.mean(1)
    weights = mask.to(x.device, x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@contextlib.contextmanager
def steer(model: ModelAdapter, *interventions: Intervention) -> Iterator[ModelAdapter]:
    """Install several interventions at once; every hook is removed on exit (also after an error)."""
    pairs = [pair for item in interventions for pair in item.hooks_for(model)]
    prepasses = [fn for item in interventions if (fn := item.prepass_for(model)) is not None]
    with model.hooks(pairs), model.prepasses(prepasses):
        yield model
