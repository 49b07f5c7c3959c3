"""Edit SAE features inside a running model: clamp, scale, ablate or add features at the SAE's hook.

An SAE spliced into the residual stream is used as a lens, not as a replacement: the hook computes
`f = encode(x)`, applies the edits to get `f'`, and returns `x + (decode(f') - decode(f))`. The SAE's
reconstruction error `x - decode(f)` passes through untouched, so with no edits nothing changes, and an
edit changes the activation by exactly what the edited features write. `error_term=False` instead
replaces `x` by the reconstruction (what "CE loss recovered" measures).

What an edit does (`edit_features`, a pure function of feature activations) is kept apart from where it
attaches (`splice_sae` / `FeatureSteer`, hooks at `sae.cfg.metadata.hook_name`), as for every other
featsteer intervention.

At `blocks.{l}.attn.hook_z` the hook hands over `(batch, pos, n_heads, d_head)`: the heads are flattened to the
SAE's `n_heads * d_head` rows, edited, and put back in their `(n_heads, d_head)` shape, so a feature edit there
changes the attention output by the decoder row's change pushed through the output projection.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from sae_lens import SAE
from torch import Tensor

from featsteer.activations import ActivationSet, Positions
from featsteer.errors import FeatsteerError
from featsteer.interventions.positions import TOKEN_POSITIONS
from featsteer.interventions.positions import PositionTracker as _PositionTracker
from featsteer.interventions.steering import Intervention
from featsteer.models import HookFn, HookSite, ModelAdapter
from featsteer.sae.encoding import STATEFUL_NORMS
from featsteer.sae.heads import flat_rows
from featsteer.sae.loading import validate_sae

EDIT_MODES: tuple[str, ...] = ("clamp", "scale", "ablate", "add")
"""`clamp`: set features to `value`; `scale`: multiply by `value`; `ablate`: set to zero; `add`: add
`value` to the feature activation (the residual moves by `value` times the feature's decoder row)."""

SPLICE_POSITIONS: tuple[str, ...] = TOKEN_POSITIONS
"""Which tokens edits apply to: every token, the prompt tokens, or the tokens produced while generating."""


@dataclass(frozen=True)
class FeatureEdit:
    """One edit of some SAE features (see `EDIT_MODES`)."""

    mode: str
    """One of `EDIT_MODES`."""
    features: tuple[int, ...]
    """Feature ids (indices into `d_sae`) the edit applies to."""
    value: float = 0.0
    """Clamp value, scale factor, or amount added; ignored by `ablate`."""

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise FeatsteerError(f"unknown feature edit '{self.mode}': use one of {', '.join(EDIT_MODES)}")
        ids = _feature_ids(self.mode, self.features)
        if not ids or min(ids) < 0:
            raise FeatsteerError(f"feature edit '{self.mode}' needs one or more non-negative feature ids, got {self.features!r}")
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            raise FeatsteerError(f"feature edit '{self.mode}' needs a number as its value, got {self.value!r}") from None
        if not math.isfinite(value):
            raise FeatsteerError(f"feature edit '{self.mode}' needs a finite value, got {value}")
        object.__setattr__(self, "features", ids)
        object.__setattr__(self, "value", value)

    @classmethod
    def clamp(cls, features: int | Sequence[int], value: float) -> FeatureEdit:
        """Set the features to `value` (at every selected token, also where they were off)."""
        return cls("clamp", features, value)

    @classmethod
    def scale(cls, features: int | Sequence[int], factor: float) -> FeatureEdit:
        """Multiply the features by `factor`."""
        return cls("scale", features, factor)

    @classmethod
    def ablate(cls, features: int | Sequence[int]) -> FeatureEdit:
        """Set the features to zero."""
        return cls("ablate", features, 0.0)

    @classmethod
    def add(cls, features: int | Sequence[int], value: float) -> FeatureEdit:
        """Add `value` to the features (adds `value` times each decoder row to the residual stream)."""
        return cls("add", features, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"mode": self.mode, "features": list(self.features), "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureEdit:
        """Inverse of `to_dict`."""
        return cls(str(data["mode"]), tuple(data["features"]), float(data.get("value", 0.0)))


def _feature_ids(mode: str, features: Any) -> tuple[int, ...]:
    """Feature ids as Python ints: one id or a sequence of them; numpy and 0-d torch integers count, bools and
    fractional numbers do not (3.7 is no feature id)."""
    if hasattr(features, "tolist"):  # numpy arrays and scalars, torch tensors (0-d too)
        features = features.tolist()
    items = [features] if not isinstance(features, (Sequence, set, frozenset)) or isinstance(features, str) else list(features)
    ids = []
    for item in items:
        if isinstance(item, bool):
            raise FeatsteerError(f"feature edit '{mode}': {item!r} is not a feature id (give integers)")
        try:
            ids.append(operator.index(item))
        except TypeError:
            raise FeatsteerError(f"feature edit '{mode}': {item!r} is not a feature id (give integers)") from None
    return tuple(ids)


def edit_features(features: Float[Tensor, "... d_sae"], edits: Sequence[FeatureEdit]) -> Float[Tensor, "... d_sae"]:
    """Apply edits, in order, to feature activations; returns a new tensor (the input is not modified).

    Raises:
        FeatsteerError: if an edit names a feature id outside `d_sae`.
    """
    edited = features.clone()
    d_sae = features.shape[-1]
    for edit in edits:
        if max(edit.features) >= d_sae:
            raise FeatsteerError(f"feature id {max(edit.features)} is out of range: this SAE has d_sae={d_sae} features (0..{d_sae - 1})")
        ids = list(edit.features)
        if edit.mode == "clamp":
            edited[..., ids] = edit.value
        elif edit.mode == "scale":
            edited[..., ids] = edited[..., ids] * edit.value
        elif edit.mode == "ablate":
            edited[..., ids] = 0.0
        else:
            edited[..., ids] = edited[..., ids] + edit.value
    return edited


def splice_activation(
    sae: SAE, x: Float[Tensor, "batch pos d_in"] | Float[Tensor, "batch pos n_heads d_head"], edits: Sequence[FeatureEdit] = (), *,
    error_term: bool = True, mask: Tensor | None = None, untouched: Tensor | None = None,
) -> Float[Tensor, "batch pos d_in"] | Float[Tensor, "batch pos n_heads d_head"]:
    """The activation after splicing `sae` in: `x + mask * (decode(f') - decode(f))` (or the reconstruction).

    Tokens outside the SAE's domain (`outside_domain`) and those marked `untouched` pass through unchanged.

    Args:
        sae: a sae_lens SAE reading `x`.
        x: activations at the SAE's hook: `(batch, pos, d_in)` rows, or `(batch, pos, n_heads, d_head)` heads at
            hook_z, which the SAE reads side by side (`d_in = n_heads * d_head`).
        edits: feature edits giving `f'` from `f = encode(x)`.
        error_term: keep the reconstruction error (True) or replace `x` by `decode(f)` (False).
        mask: `(batch, pos)` bool, where edits apply (default: everywhere).
        untouched: `(batch, pos)` bool, tokens left exactly as they are, also by `error_term=False` (e.g. the
            chat-template head the SAE was not trained on, see `untrained_head`).

    Returns:
        A tensor like `x` (same shape, dtype and device).

    Raises:
        FeatsteerError: when `x` is not as wide as the SAE's `d_in`.
    """
    rows = x.flatten(-2) if x.dim() == 4 else x
    if rows.shape[-1] != int(sae.cfg.d_in):
        raise FeatsteerError(f"the activation has shape {tuple(x.shape)} but the SAE reads d_in={sae.cfg.d_in}: splice it at its own hook")
    sae_in = rows.to(sae.device, sae.dtype)
    # what the splice leaves alone (the error term, tokens outside the SAE's domain) keeps the activation's own precision:
    # a bfloat16 SAE on a float32 model must not round it
    exact = rows.to(sae.device, torch.promote_types(rows.dtype, sae.dtype))
    with torch.no_grad(), flat_rows(sae):
        features = sae.encode(sae_in).to_dense()
        reconstruction = sae.decode(features)
        spliced = exact if error_term else reconstruction.to(exact.dtype)
        if edits:
            if sae.cfg.normalize_activations in STATEFUL_NORMS:
                sae.encode(sae_in)  # decode() consumed the normalisation state: set it again
            delta = _decoded_change(sae, features, edit_features(features, edits), reconstruction)
            if mask is not None:
                delta = delta * mask[..., None].to(delta.device, delta.dtype)
            spliced = spliced + delta.to(exact.dtype)
        outside = outside_domain(sae, exact)
        if untouched is not None:
            untouched = untouched.to(exact.device)
            outside = untouched if outside is None else outside | untouched
        if outside is not None:
            spliced = torch.where(outside[..., None], exact, spliced)
    return spliced.reshape(x.shape).to(x.device, x.dtype)


def _decoded_change(sae: SAE, features: Tensor, edited: Tensor, reconstruction: Tensor) -> Tensor:
    """`decode(edited) - decode(features)` (flat rows; a stateful normalisation set by the caller's `encode`).

    `decode` is affine in the features. At float32 or wider the difference of the two decodes is taken, as ever. A
    bfloat16/float16 SAE's decode rounds `b_dec + change` to 8 or 11 bits before the subtraction, which loses most of a
    small change next to a large `b_dec` (a clamp on one feature came out up to 30% off); there the change is the
    directional derivative of `decode` along `edited - features` (one forward-mode pass), in which `b_dec` never enters.
    An SAE whose weights were made under `inference_mode` cannot carry a tangent and keeps the difference.
    """
    low_precision = sae.dtype in (torch.bfloat16, torch.float16)
    if not low_precision or any(weight.is_inference() for weight in sae.parameters()):
        return sae.decode(edited) - reconstruction
    with torch.inference_mode(False):
        primal = features.clone()  # a tensor made under inference_mode cannot carry a forward-mode tangent
        tangent = edited.clone() - primal
        _, change = torch.func.jvp(sae.decode, (primal,), (tangent,))
    return change


def outside_domain(sae: SAE, x: Float[Tensor, "... d_in"]) -> Bool[Tensor, "..."] | None:
    """Where the flat rows `x` are too large for the SAE: norm above the `featsteer_max_norm` it was trained under.

    featsteer trains SAEs without attention-sink and other massive-activation tokens (see
    `sae_training.config.DataConfig.max_norm_ratio`) and records the bound in the SAE's metadata; such
    tokens pass through a splice unchanged. None when the SAE records no bound (e.g. a pretrained SAE).
    """
    limit = sae.cfg.metadata.get("featsteer_max_norm") if sae.cfg.metadata is not None else None
    if limit is None:
        return None
    outside = x.norm(dim=-1) > float(limit)
    return outside if bool(outside.any()) else None


def inside_domain(sae: SAE, x: Float[Tensor, "... d_in"]) -> Bool[Tensor, "..."]:
    """Where the flat rows `x` are within the SAE's recorded norm bound: the rows a splice edits (everywhere when the
    SAE records no bound). Feature scores and maxima read only these rows (see `outside_domain`)."""
    outside = outside_domain(sae, x)
    return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if outside is None else ~outside


def first_trained_position(sae: SAE) -> int:
    """Index of the first token of each text the SAE was trained on: `featsteer-train-sae` leaves out the chat-template
    head every prompt shares and records where training began as `featsteer_first_position` (0 when not recorded)."""
    metadata = sae.cfg.metadata
    first = metadata.get("featsteer_first_position") if metadata is not None else None
    return int(first or 0)


def spliced_rows(sae: SAE, acts: ActivationSet, hook: str) -> Bool[Tensor, " row"]:
    """Which captured rows at `hook` a feature splice on the model edits: those within the SAE's norm bound
    (`inside_domain`) and, in an all-token capture, at or after its `first_trained_position` (the chat-template head that
    `untrained_head` leaves as it is). Rows counted from each prompt's end (`last`, `post_instruction`, ...) come after
    the head. Feature maxima read only these rows, so that no clamp is scaled by a token it never touches."""
    edited = inside_domain(sae, acts.hook(hook))
    trained = past_untrained_head(sae, acts)
    return edited if trained is None else edited & trained.to(edited.device)


def past_untrained_head(sae: SAE, acts: ActivationSet) -> Bool[Tensor, " row"] | None:
    """Which rows of an all-token capture sit at or after the SAE's `first_trained_position`; None when no row can be
    in its untrained head (the SAE records none, or the rows are counted from each prompt's end, after the head)."""
    first_position = first_trained_position(sae)
    if first_position <= 0 or Positions.parse(acts.positions).mode != "all":
        return None
    return acts.position >= first_position


def token_positions(attention_mask: Tensor) -> Tensor:
    """`(batch, pos)` index of each column's token within its own (left-padded) text; padding gets -1 or repeats."""
    return attention_mask.long().cumsum(1) - 1


def untrained_head(model: ModelAdapter, sae: SAE, batch: int, length: int, device: torch.device) -> Bool[Tensor, "batch pos"] | None:
    """`(batch, pos)` bool: the tokens of this pass before the SAE's `first_trained_position` (the shared chat-template
    head it was not trained on), read from the model's attention mask of the pass (the last `length` columns, so a
    KV-cached decoding step is placed after its prompt); None when the SAE records no such head."""
    first_position = first_trained_position(sae)
    if first_position <= 0:
        return None
    mask = model.pass_attention_mask
    if mask is None:
        positions = torch.arange(length, device=device).expand(batch, length)
    else:
        positions = token_positions(mask)[:, -length:].to(device)
    return positions < first_position


def sae_hook(sae: SAE, edits: Sequence[FeatureEdit] = (), *, error_term: bool = True, positions: str = "all",
             model: ModelAdapter | None = None) -> HookFn:
    """A featsteer hook function that splices `sae` in with `edits` (see `splice_activation`; at hook_z the heads are
    read side by side and put back in their `(n_heads, d_head)` shape).

    With `positions` other than `all`, pass the `model` the hook goes on: it says which pass is the prompt's (see
    `featsteer.interventions.positions.PositionTracker`); without it the tracker infers that from shapes. With the
    `model`, the chat-template head the SAE was not trained on (`untrained_head`) is left as it is, as are tokens above
    its norm bound (`outside_domain`): its reconstruction there is not what the SAE learned, so edits would write noise;
    without the `model` the head cannot be placed and every token within the norm bound is edited.

    Raises:
        FeatsteerError: for an unknown `positions` value or an edit naming a feature id outside `d_sae`.
    """
    if positions not in SPLICE_POSITIONS:
        raise FeatsteerError(f"unknown positions '{positions}': use one of {', '.join(SPLICE_POSITIONS)}")
    edits = tuple(edits)
    for edit in edits:
        if max(edit.features) >= sae.cfg.d_sae:
            raise FeatsteerError(f"feature id {max(edit.features)} is out of range: this SAE has d_sae={sae.cfg.d_sae} features")
    tracker = _PositionTracker(model=model)

    def hook(activation: Tensor, site: HookSite) -> Tensor | None:
        mask = tracker.selected(positions, activation.shape[0], activation.shape[1], activation.device)
        if error_term and (not edits or (mask is not None and not bool(mask.any()))):
            return None  # nothing to change: x + 0
        head = None if model is None else untrained_head(model, sae, activation.shape[0], activation.shape[1], activation.device)
        return splice_activation(sae, activation, edits, error_term=error_term, mask=mask, untouched=head)

    return hook


@contextlib.contextmanager
def splice_sae(
    model: ModelAdapter,
    sae: SAE,
    edits: FeatureEdit | Sequence[FeatureEdit] = (),
    *,
    error_term: bool = True,
    positions: str = "all",
    hook: str | None = None,
) -> Iterator[ModelAdapter]:
    """Splice an SAE into `model` at its `hook_name` for the duration of a `with` block.

    With the default `error_term=True` and no edits the model is unchanged; edits change exactly what
    the edited features write. The hook is removed on exit, also after an exception.

    Args:
        model: the model.
        sae: a sae_lens SAE trained on `model` (validated: width and hook).
        edits: one or several `FeatureEdit`s.
        error_term: keep the reconstruction error (True), or replace the activation by the SAE's
            reconstruction (False): at every token the SAE can read, whatever `positions` says.
        positions: `all`, `prompt` or `generated` tokens (edits only apply there; the replacement by
            `error_term=False` does not follow it).
        hook: attach here instead of `sae.cfg.metadata.hook_name`.

    Yields:
        The model, with the SAE spliced in.
    """
    name = validate_sae(sae, model, hook)
    edit_list = (edits,) if isinstance(edits, FeatureEdit) else tuple(edits)
    with model.hooks([(name, sae_hook(sae, edit_list, error_term=error_term, positions=positions, model=model))]):
        yield model


@dataclass
class FeatureSteer(Intervention):
    """SAE feature edits as a featsteer `Intervention`, usable with `featsteer.interventions.steer`."""

    sae: SAE
    """The SAE whose features are edited (attached at its `hook_name`)."""
    edits: Sequence[FeatureEdit] = field(default_factory=tuple)
    """Edits applied at every forward pass."""
    positions: str = "all"
    """`all`, `prompt` or `generated`."""

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, HookFn]]:
        name = validate_sae(self.sae, model)
        return [(name, sae_hook(self.sae, self.edits, positions=self.positions, model=model))]
