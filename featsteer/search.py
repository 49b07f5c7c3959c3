"""Multi-objective search over abliteration settings: less refusal for as little collateral change as possible.

Classic abliteration removes one direction from every writer at full strength. That is rarely the best
trade-off: a direction interpolated between two layers, a kernel that concentrates the edit around some
layers (separately for attention and MLP writers) and a weaker embedding edit can remove as much refusal
while moving harmless outputs less. This module searches that space with optuna's multi-objective TPE
(heretic's recipe), minimising two objectives at once rather than a weighted sum, so the output is a
Pareto front the user chooses from instead of one arbitrary compromise:

- refusal: a cheap logit proxy on harmful validation prompts (mean first-token refusal log-odds, or the
  share of prompts whose log-odds are positive), read with the edit applied;
- KL: first-token KL(base || edited) on harmless validation prompts.

Besides the kernels and the (fractional) direction layer, the search picks the direction's scope: one
direction removed by every writer (`global`), or each block removing the candidate direction of the stream
it writes into (`per_layer`, heretic's other mode).

`search_fixed_abliteration` runs the same search for one given direction or basis (an SAE feature's decoder row,
the span of several, a probe's weight vector, a saved `DirectionSet`): it has no direction parameters, only the
kernels and the embedding strength, and keeps the basis beside its study so the result applies on its own.

Every trial edits the weights inside an `EditHandle` context, so the model is restored bit for bit after
each trial, even when a trial fails. The proxy only screens: the most promising Pareto points are then
verified by greedy generation with the refusal detector (refusal rate on held-out harmful prompts and
over-refusal on harmless ones), and the recommended point is chosen from the verified ones.

The study lives in `<out>/search.db` (SQLite) under a fixed name, so running again with the same folder
resumes it; `n_trials` is the total trial count, not the count of this run. Results are written as
`pareto.json` and `pareto.png`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import optuna
import torch
from jaxtyping import Float
from torch import Tensor

from featsteer.datasets import prompt_set_hash, prompts_sha256
from featsteer.directions import DirectionSet, unit
from featsteer.edits import EditConfig, EditHandle, LayerKernel, apply_edit
from featsteer.errors import FeatsteerError
from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set
from featsteer.evaluation.metrics import KLBase, RefusalTokens, first_token_logprobs, refusal_score
from featsteer.evaluation.refusal import RefusalDetector
from featsteer.evaluation.response_kl import ResponseBase, response_base, response_kl
from featsteer.files import json_text, write_files
from featsteer.models import ModelAdapter, check_system
from featsteer.pipeline import DirectionResult

logger = logging.getLogger(__name__)

STUDY_NAME = "featsteer-abliteration-search"
"""Name of the optuna study inside `search.db`; fixed so that a second run finds and resumes it."""

SEARCH_MODES = ("orthogonalize", "norm_preserving")
"""Edit modes the search may use: the two abliteration modes of `EditConfig`."""

DIRECTION_SCOPES = ("global", "per_layer")
"""`global`: every writer removes one (interpolated) direction. `per_layer`: the writers of block `l` remove the
candidate direction of the stream they write into (`resid_pre` of `l + 1`, which is `resid_post` of `l`), the embedding
the interpolated one."""

STREAM_OFFSETS = {"resid_pre": 1, "resid_post": 0}
"""Hook kinds whose candidates the `per_layer` scope can use, each with the offset from a block to the candidate of the
stream it writes into: block `l` writes into `resid_pre` of `l + 1`, which is its own `resid_post`. Other kinds
(`resid_mid` lies between a block's attention and MLP, `attn_out`/`mlp_out` are branches) have no such candidate."""

KL_PROMPTS = ("all", "answered", "response")
RESPONSE_SCORING = "generated-ids+eot"
"""How the KL along the answers scores them, recorded in a response-KL study's set-up and verification-cache key: the
token ids the unedited model generated, its end-of-turn token included (before 2026-12-07: the re-tokenized text)."""
"""`all`: the KL objective averages over every proxy harmless prompt; `answered`: over those the unedited model
answers (first-token refusal score <= 0), so removing its refusal of a harmless prompt is not counted as damage;
`response`: the KL along the unedited model's own greedy answers to the proxy harmless prompts
(`evaluation.response_kl`, `max_new_tokens` positions), over every prompt, so a refusal turned into an answer costs
its first tokens, not only its first one."""

PARETO_FIELDS: dict[str, str] = {
    "refusal_score": "proxy: mean first-token refusal log-odds of the proxy harmful prompts",
    "refusal_rate_proxy": "proxy: share of the proxy harmful prompts with first-token refusal log-odds > 0",
    "kl": "proxy: the KL objective on the proxy harmless prompts, over those `config.kl_prompts` names: all of them, those "
          "the unedited model answers BY ITS FIRST TOKEN (refusal log-odds <= 0; `answered`), or along its answers (`response`)",
    "kl_all": "proxy: first-token KL over every proxy harmless prompt",
    "kl_response": "proxy: KL along the unedited model's greedy answers to the proxy harmless prompts",
    "verified.refusal_rate": "generated: share of the verification harmful prompts whose response has a refusal marker",
    "verified.unanswered_rate": "generated: share of the verification harmful prompts refused (marker) or looping",
    "verified.looping_rate": "generated: share of the verification harmful prompts whose response loops",
    "verified.harmless_refusal_rate": "generated: share of the verification harmless prompts whose response has a refusal marker",
    "verified.harmless_looping_rate": "generated: share of the verification harmless prompts whose response loops",
    "verified.ci_harmful": "95% Wilson interval of verified.refusal_rate",
    "verified.ci_harmless": "95% Wilson interval of verified.harmless_refusal_rate",
    "verified.n_harmful": "verification harmful prompts generated",
    "verified.n_harmless": "verification harmless prompts generated",
    "verified.kl": "first-token KL over every verification harmless prompt",
    "verified.kl_answered": "first-token KL over the verification harmless prompts the unedited model answers BY ITS "
                            "GENERATED RESPONSE (no refusal marker): not the proxy's first-token `answered`",
    "verified.kl_response": "KL along the unedited model's greedy answers to the verification harmless prompts",
}
"""What each figure of a `pareto.json` point means (written beside them as `fields`): the proxy's "answered" is judged
by the first-token refusal log-odds, the verification's by the refusal markers of a generated response, so a proxy
`kl` under `kl_prompts="answered"` and a `verified.kl_answered` are not one measure."""

REFUSAL_OBJECTIVES = ("score", "rate")
"""`score`: mean refusal log-odds of harmful prompts; `rate`: share of harmful prompts with log-odds > 0."""

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")
_KERNEL_PARTS = ("peak", "width", "max_weight", "min_fraction")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges searched, relative to the model's depth."""

    max_layer_fraction: float = 0.8
    """The direction layer ranges over the block inputs `[0, max_layer_fraction * n_layers - 1]` (late layers mostly
    encode the next token, as in the Arditi selection); `resid_post` of block l is block l+1's input, so for
    `resid_post` candidates the range ends one block earlier."""
    max_weight: tuple[float, float] = (0.5, 1.5)
    """Range of each kernel's peak strength (1 removes the direction entirely at the peak)."""
    min_width: float = 1.0
    """Smallest kernel width in layers; the largest is `n_layers`. Kernel peaks range over `[0, n_layers - 1]`."""
    embedding_strength: tuple[float, float] = (0.0, 1.0)
    """Range of the embedding edit's strength (0 leaves the embeddings untouched)."""
    scopes: tuple[str, ...] | None = None
    """Direction scopes tried (see `DIRECTION_SCOPES`; a single name such as `"global"` is one scope); with two,
    `direction_scope` is a searched parameter. None: both for `resid_pre`/`resid_post` candidates, `global` alone for the
    other kinds, which no block writes into as a whole (`scopes_for`); naming `per_layer` for those is an error."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_weight", tuple(float(v) for v in self.max_weight))
        object.__setattr__(self, "embedding_strength", tuple(float(v) for v in self.embedding_strength))
        if self.scopes is not None:  # a single name is one scope, not its letters
            object.__setattr__(self, "scopes", (self.scopes,) if isinstance(self.scopes, str) else tuple(self.scopes))
        if self.scopes is not None and (not self.scopes or any(scope not in DIRECTION_SCOPES for scope in self.scopes)
                                        or len(set(self.scopes)) < len(self.scopes)):
            raise FeatsteerError(f"search scopes must be distinct values of {', '.join(DIRECTION_SCOPES)}, got {list(self.scopes)}")
        for name in ("max_weight", "embedding_strength"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise FeatsteerError(f"search space {name} must be (low, high) with 0 <= low <= high, got ({low}, {high})")
        if not 0 < self.max_layer_fraction <= 1:
            raise FeatsteerError(f"max_layer_fraction must be in (0, 1], got {self.max_layer_fraction}")
        if self.min_width <= 0:
            raise FeatsteerError(f"min_width must be positive, got {self.min_width}")

    def scopes_for(self, kind: str) -> tuple[str, ...]:
        """The scopes a search over candidates of hook kind `kind` tries: `scopes` when set, else every scope the kind
        allows. `per_layer` needs the stream a whole block writes into (`STREAM_OFFSETS`): at `resid_mid` a block's
        attention writes into its own `resid_mid` but its MLP into `resid_post`, which no `resid_mid` candidate reads,
        and `attn_out`/`mlp_out` are branches; so those kinds default to `global` alone (logged).

        Raises:
            FeatsteerError: when `scopes` names `per_layer` for a kind it cannot map (`check_per_layer_kind`).
        """
        if self.scopes is not None:
            if "per_layer" in self.scopes:
                check_per_layer_kind(kind)
            return self.scopes
        if kind in STREAM_OFFSETS:
            return DIRECTION_SCOPES
        logger.info("search: %s candidates have no per-layer scope (no block writes into that stream as a whole): "
                    "searching the global scope only", kind)
        return ("global",)

    def bounds(self, n_layers: int, n_directions: int, first_layer: int = 0, kind: str = "resid_pre") -> dict[str, tuple[float, float]]:
        """`{parameter: (low, high)}` for a model with `n_layers` layers.

        Args:
            n_layers: decoder layers of the model.
            n_directions: layers with a candidate direction (0 .. n_directions - 1).
            first_layer: first layer whose direction is usable (not zero).
            kind: hook kind of the candidates; `resid_post` of block l counts as the input of block l + 1.

        Kernels are parametrised by `min_fraction = min_weight / max_weight` rather than `min_weight` so that
        every range is fixed, which (multivariate) TPE needs.
        """
        top_layer = float(n_layers - 1)
        top_direction = min(self.max_layer_fraction * n_layers - 1 - (kind == "resid_post"), n_directions - 1)
        out = {"direction_layer": (float(first_layer), max(float(first_layer), top_direction))}
        for writer in ("attn", "mlp"):
            out[f"{writer}.peak"] = (0.0, top_layer)
            out[f"{writer}.width"] = (min(self.min_width, float(n_layers)), float(n_layers))
            out[f"{writer}.max_weight"] = self.max_weight
            out[f"{writer}.min_fraction"] = (0.0, 1.0)
        out["embedding_strength"] = self.embedding_strength
        return out

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> SearchSpace:
        """Inverse of `to_dict`."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class SearchConfig:
    """How the abliteration search runs."""

    n_trials: int = 50
    """Total finished trials (complete or failed) in the study, counting those of earlier runs into the same folder."""
    seed: int = 0
    """Sampler seed. A resumed run seeds with `seed + trials already finished`, so it does not replay the
    random start-up trials of the first run; the same history and seed give the same trials."""
    position: int | None = None
    """Token position whose candidate directions are interpolated; None: the selected direction's position."""
    mode: str = "orthogonalize"
    """Edit mode: `orthogonalize` or `norm_preserving`."""
    refusal_objective: str = "score"
    """Proxy refusal objective: `score` (mean refusal log-odds, continuous) or `rate` (share > 0)."""
    max_kl_for_choice: float = 0.05
    """The recommended point is the verified one with the lowest share of verification harmful prompts unanswered
    (refused or looping; ties to the lower harmless refusal) among those with KL at most this (nats), measured on the
    verification prompts (see `verified_kl`); when none qualifies, the verified one with the lowest KL. Which points are
    verified is decided by their proxy KL."""
    verify_top: int = 8
    """How many Pareto points to verify by generation."""
    max_new_tokens: int = 32
    """Generated tokens per response during verification."""
    batch_size: int = 16
    """Prompts per forward pass or generation batch."""
    n_proxy_prompts: int = 32
    """Validation prompts per set used by the logit proxy (the first ones of `DirectionResult.val`)."""
    kl_prompts: str = "all"
    """Which proxy harmless prompts the KL objective averages over (see `KL_PROMPTS`). On a model that refuses some
    harmless prompts, `all` charges every trial that removes those refusals 1-2 nats per prompt (on the organism, 2 of
    32 proxy prompts: about 0.08 nats), which steers the search to weak edits; the recorded `kl_all` keeps the other."""
    n_startup_trials: int = 10
    """Random trials before TPE starts modelling the objectives."""
    enqueue_classic: bool = True
    """Start a new study with classic abliteration (the selected layer, strength 1 everywhere) as trial 0,
    so the front always contains the baseline edit."""
    space: SearchSpace = field(default_factory=SearchSpace)
    """Ranges searched."""
    system: str | None = None
    """The system prompt every proxy and verification prompt is formatted with (None: none; a blank text is refused).
    `search_abliteration` takes the direction result's (`DirectionResult.system`) when this is None, and refuses another."""

    def __post_init__(self) -> None:
        check_system(self.system)
        if self.mode not in SEARCH_MODES:
            raise FeatsteerError(f"search mode '{self.mode}' is not an abliteration mode: use one of {', '.join(SEARCH_MODES)}")
        if self.kl_prompts not in KL_PROMPTS:
            raise FeatsteerError(f"unknown kl_prompts '{self.kl_prompts}': use one of {', '.join(KL_PROMPTS)}")
        if self.refusal_objective not in REFUSAL_OBJECTIVES:
            raise FeatsteerError(f"unknown refusal objective '{self.refusal_objective}': use one of {', '.join(REFUSAL_OBJECTIVES)}")
        for name in ("n_trials", "verify_top", "max_new_tokens", "batch_size", "n_proxy_prompts"):
            if getattr(self, name) < 1:
                raise FeatsteerError(f"search {name} must be at least 1, got {getattr(self, name)}")
        if self.n_startup_trials < 0 or self.max_kl_for_choice < 0:
            raise FeatsteerError("n_startup_trials and max_kl_for_choice must not be negative")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "space"}, "space": self.space.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> SearchConfig:
        """Inverse of `to_dict`."""
        space = data.get("space")
        return cls(**{**data, "space": SearchSpace() if space is None else SearchSpace.from_dict(space)})


# ---- directions ------------------------------------------------------------------------------------
def layer_directions(candidates: DirectionSet, position: int, kind: str = "resid_pre") -> Float[Tensor, "layer d_model"]:
    """The rank-1 candidate direction of every layer at one position and hook kind, stacked by layer.

    Raises:
        FeatsteerError: for rank-k candidates, or when some layer has no candidate at `position`.
    """
    if candidates.rank != 1:
        raise FeatsteerError(f"per-layer and interpolated directions need single directions but the candidates are rank-{candidates.rank}: use a rank-1 method (--method dim)")
    by_layer: dict[int, Tensor] = {}
    for i, (hook, pos) in enumerate(zip(candidates.hook_names, candidates.positions, strict=True)):
        match = _HOOK_RE.match(hook)
        if match is not None and match.group(2) == kind and pos == position:
            by_layer[int(match.group(1))] = candidates.bases[i, 0]
    if not by_layer:
        raise FeatsteerError(f"no candidate {kind} directions for consecutive layers from 0 at position {position} "
                             f"(positions available: {sorted(set(candidates.positions))})")
    if sorted(by_layer) != list(range(len(by_layer))):
        raise FeatsteerError(f"the candidate {kind} directions cover only layers {_layer_spans(sorted(by_layer))}, but the per-layer "
                             "scope and the search read every layer's from 0 (directions found with `featsteer directions --layers`?): "
                             "find them again without --layers (abliterate --layers still keeps the choice to the listed layers), "
                             "or use the global scope")
    return torch.stack([by_layer[layer] for layer in range(len(by_layer))])


def _layer_spans(layers: Sequence[int]) -> str:
    """Sorted layer numbers as `--layers` writes them: `4-6`, `2,4-6,9`."""
    spans: list[list[int]] = []
    for layer in layers:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in spans)


def first_usable_layer(table: Float[Tensor, "layer d_model"]) -> int:
    """The first layer whose direction is not zero.

    At layer 0's `resid_pre` the stream is the token embedding, so at template positions (the same tokens in
    every prompt) the difference in means is exactly zero; the search starts above such layers.

    Raises:
        FeatsteerError: when every direction is zero.
    """
    nonzero = table.abs().amax(dim=-1) > 0
    if not bool(nonzero.any()):
        raise FeatsteerError("every candidate direction at this position is zero: choose another position")
    return int(nonzero.nonzero()[0, 0])


def interpolate_direction(table: Float[Tensor, "layer d_model"], layer: float) -> Float[Tensor, " d_model"]:
    """Unit direction at a fractional layer: the renormalised linear interpolation of its two neighbours.

    At an integer layer this is exactly that layer's direction (no renormalisation round-off).

    Raises:
        FeatsteerError: for a layer outside `[0, n_layers - 1]`, a zero direction or neighbours that cancel.
    """
    if not 0 <= layer <= table.shape[0] - 1:
        raise FeatsteerError(f"direction layer {layer} is outside [0, {table.shape[0] - 1}]")
    low = math.floor(layer)
    weight = layer - low
    if weight == 0:
        if not bool(table[low].any()):
            raise FeatsteerError(f"the direction at layer {low} is zero (identical activations): search other layers")
        return table[low].clone()
    mixed = (1 - weight) * table[low].double() + weight * table[low + 1].double()
    return unit(mixed).to(table.dtype)


def check_per_layer_kind(kind: str) -> None:
    """Raise unless the per-layer scope can map candidates of hook kind `kind` to blocks (`STREAM_OFFSETS`)."""
    if kind not in STREAM_OFFSETS:
        raise FeatsteerError(f"the per_layer scope needs resid_pre or resid_post candidates (the stream a block writes into), "
                             f"not {kind}: use the global scope (SearchSpace(scopes=('global',)), scope='global')")


def per_layer_directions(table: Float[Tensor, "layer d_model"], n_layers: int, kind: str = "resid_pre") -> dict[int, Tensor]:
    """`apply_edit`'s `by_layer` for the per-layer scope: block `l` removes the candidate of the stream it writes into,
    `resid_pre` `l + 1` or `resid_post` `l` (`STREAM_OFFSETS`; with `resid_pre` the last block the last candidate);
    blocks whose candidate is zero are left out.

    Raises:
        FeatsteerError: for candidates of another hook kind, which no block writes into, or a table with fewer layers than
            the model.
    """
    check_per_layer_kind(kind)
    top = table.shape[0] - 1
    if table.shape[0] < n_layers:  # the blocks above would silently take the last candidate's direction
        raise FeatsteerError(f"the per-layer scope needs a candidate direction at every layer 0-{n_layers - 1}, but they cover only "
                             f"{_layer_spans(range(table.shape[0]))} (directions found with `featsteer directions --layers`?): find "
                             "them again without --layers, or use the global scope")
    index = {layer: min(layer + STREAM_OFFSETS[kind], top) for layer in range(n_layers)}
    return {layer: table[i] for layer, i in index.items() if bool(table[i].any())}


def trial_directions(table: Float[Tensor, "layer d_model"], params: dict, n_layers: int,
                     kind: str = "resid_pre") -> tuple[Tensor, dict[int, Tensor] | None]:
    """The direction and per-layer directions (`apply_edit`'s `direction`, `by_layer`) of a trial's parameters.

    `global` scope (also when `direction_scope` is absent, as in studies made before scopes existed): the
    interpolated direction everywhere. `per_layer`: block `l` removes the candidate of the stream it writes into
    (`per_layer_directions`, `kind` the candidates' hook kind), skipping zero candidates; the embedding the
    interpolated direction.
    """
    direction = interpolate_direction(table, params["direction_layer"])
    if params.get("direction_scope", "global") == "global":
        return direction, None
    return direction, per_layer_directions(table, n_layers, kind)


def edit_from_params(params: dict[str, float], mode: str = "orthogonalize") -> EditConfig:
    """The `EditConfig` a trial's parameters describe (kernels from peak, width, max weight, min fraction)."""
    kernels = {}
    for writer in ("attn", "mlp"):
        peak, width, max_weight, min_fraction = (float(params[f"{writer}.{part}"]) for part in _KERNEL_PARTS)
        kernels[f"{writer}_kernel"] = LayerKernel(peak, width, max_weight, max_weight * min_fraction)
    return EditConfig(mode=mode, embedding_strength=float(params["embedding_strength"]), **kernels)


def edit_config_from_dict(data: dict) -> EditConfig:
    """Inverse of `EditConfig.to_dict`."""
    known = {f.name for f in fields(EditConfig)}
    if set(data) - known:
        raise FeatsteerError(f"unknown edit config keys {sorted(set(data) - known)}: expected {sorted(known)}")
    kernels = {k: None if data.get(k) is None else LayerKernel.from_dict(data[k]) for k in ("attn_kernel", "mlp_kernel")}
    return EditConfig(**{**data, **kernels})


def fixed_basis(direction: Tensor, d_model: int) -> Float[Tensor, "k d_model"]:
    """A direction or set of directions as the orthonormal basis a fixed-direction search removes.

    Rows are orthonormalised in order (Gram-Schmidt by QR, signs kept), so a single row comes back as its unit
    vector and an already orthonormal basis unchanged up to round-off.

    Raises:
        FeatsteerError: for a width other than `d_model`, NaN/inf, or rows that are zero or linearly dependent.
    """
    rows = (direction[None, :] if direction.dim() == 1 else direction).detach().to("cpu", torch.float64)
    if rows.dim() != 2 or rows.shape[0] < 1:
        raise FeatsteerError(f"a fixed search direction must be (d_model,) or (k, d_model), got shape {tuple(direction.shape)}")
    if rows.shape[1] != d_model:
        raise FeatsteerError(f"the fixed search direction has width {rows.shape[1]} but the model's d_model is {d_model}")
    if not bool(torch.isfinite(rows).all()):
        raise FeatsteerError("the fixed search direction contains NaN/inf: recompute it")
    q, r = torch.linalg.qr(rows.T)
    diagonal = torch.diagonal(r)
    if bool((diagonal.abs() <= 1e-9 * rows.norm(dim=1).max().clamp_min(1e-300)).any()):
        raise FeatsteerError(f"the {rows.shape[0]} fixed search directions are zero or linearly dependent: drop the redundant ones")
    return (q * torch.sign(diagonal)).T.to(torch.float32).contiguous()


def basis_sha256(basis: Tensor) -> str:
    """Hash of a basis's float32 values, recorded so a resumed fixed-direction study is known to use the same one."""
    return hashlib.sha256(basis.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class _DirectionSource:
    """What a trial's parameters remove: the interpolated candidate directions of `table` (the DIM search), or one
    fixed `basis` everywhere (the fixed-direction search, which has no direction parameters)."""

    table: Tensor | None = None
    basis: Tensor | None = None
    scopes: tuple[str, ...] = ("global",)
    kind: str = "resid_pre"

    def directions(self, params: dict, n_layers: int) -> tuple[Tensor, dict[int, Tensor] | None]:
        if self.basis is not None:
            return self.basis, None
        return trial_directions(self.table, params, n_layers, self.kind)


# ---- results ---------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Every finished trial, the Pareto front (verified where generation was run), and the recommended point."""

    trials: list[dict]
    """One record per completed trial: number, params, edit, proxy objectives, seconds, pareto flag."""
    pareto: list[dict]
    """The Pareto-optimal trials by KL, each with `verified` (generation results) or None."""
    best: dict | None
    """The recommended verified Pareto point (see `SearchConfig.max_kl_for_choice`); None if nothing ran."""
    baseline: dict
    """The unedited model's proxy and verified refusal."""
    setup: dict
    """What the study was run on (model, direction provenance, position, prompt hashes, ranges)."""
    config: SearchConfig
    """The configuration of the run that wrote this result."""
    timings: dict = field(default_factory=dict)
    """Wall time: `screen_s`, `verify_s`, `mean_trial_s` (all trials in the study)."""
    basis: Tensor | None = None
    """The removed basis of a fixed-direction search (`search_fixed_abliteration`; kept as `basis.safetensors` in its
    folder); None for a search over candidate directions."""
    classic: dict | None = None
    """The classic edit the study started with (`SearchConfig.enqueue_classic`): `number` (its trial), `params`,
    `clamped` (`{parameter: [classic value, value used]}` for each value the search's ranges moved, e.g. a selected layer
    above `SearchSpace.max_layer_fraction`: then that trial is not the classic edit) and a `note` saying which; None
    without it, or in a `pareto.json` written before it was recorded."""

    @property
    def fixed(self) -> bool:
        """Whether the search kept one direction (or basis) fixed and tuned only the kernels and strengths."""
        return self.setup.get("direction") == "fixed"

    def choose(self, number: int) -> SearchResult:
        """This result with trial `number` as the recommended point instead of the automatic choice, e.g. a lower-KL
        point of the front. `apply`, `directions` and `edit_config` then use it. A trial off the Pareto front is
        allowed (it is logged); one that was not verified by generation has `verified` None.

        Raises:
            FeatsteerError: if the study has no finished trial with that number.
        """
        on_front = {p["number"]: p for p in self.pareto}
        if number in on_front:
            return replace(self, best=on_front[number])
        trial = next((t for t in self.trials if t["number"] == number), None)
        if trial is None:
            numbers = sorted(t["number"] for t in self.trials)
            span = f"{numbers[0]}..{numbers[-1]}" if numbers else "none"
            raise FeatsteerError(f"the search has no finished trial {number} (trials {span}; Pareto front {sorted(on_front)})")
        logger.warning("trial %d is not on the Pareto front: a front trial has lower refusal at no more KL", number)
        return replace(self, best={**trial, "verified": None})

    def edit_config(self) -> EditConfig:
        """The recommended edit."""
        if self.best is None:
            raise FeatsteerError("the search has no verified trial to recommend: run more trials")
        return edit_config_from_dict(self.best["edit"])

    def direction(self, result: DirectionResult | None = None) -> Tensor:
        """The recommended (interpolated) direction, rebuilt from the candidates the search ran on; for a fixed search
        the fixed basis (`result` is then not needed).

        For a `per_layer` point this is the embedding's direction only: use `directions` or `apply`.
        """
        return self.directions(result)[0]

    def directions(self, result: DirectionResult | None = None) -> tuple[Tensor, dict[int, Tensor] | None]:
        """`(direction, by_layer)` of the recommended point, as `apply_edit` takes them.

        Raises:
            FeatsteerError: with no recommended point, without the candidates (`result`) a search over candidate
                directions needs, or with candidates other than those it ran on (other prompts, method or dtype).
        """
        if self.best is None:
            raise FeatsteerError("the search has no verified trial to recommend: run more trials")
        if self.fixed:
            if self.basis is None:
                raise FeatsteerError("this fixed-direction search result has no basis: load it with SearchResult.load(folder)")
            return self.basis, None
        if result is None:
            raise FeatsteerError("this search ran over candidate directions: pass the DirectionResult it ran on")
        table = layer_directions(result.candidates, self.setup["position"], self.setup["kind"])
        expected = self.setup.get("directions_sha256")
        if expected is not None and basis_sha256(table) != expected:
            raise FeatsteerError("this search ran on other candidate directions than the result passed (their hash differs): pass the "
                                 "DirectionResult of the same model, prompts and direction config")
        return trial_directions(table, self.best["params"], self.setup["n_layers"], self.setup["kind"])

    def apply(self, model: ModelAdapter, result: DirectionResult | None = None, record: dict | None = None) -> EditHandle:
        """Apply the recommended edit to `model` (revert or export it through the returned handle). A fixed search
        needs no `result`."""
        direction, by_layer = self.directions(result)
        return apply_edit(model, direction, self.edit_config(), record=record, by_layer=by_layer)

    def to_json(self) -> dict:
        """The `pareto.json` form."""
        return {"best": self.best, "pareto": self.pareto, "baseline": self.baseline, "setup": self.setup,
                "config": self.config.to_dict(), "timings": self.timings, "n_trials": len(self.trials), "trials": self.trials,
                "classic": self.classic, "fields": PARETO_FIELDS}

    @classmethod
    def from_json(cls, data: dict) -> SearchResult:
        """Inverse of `to_json`."""
        return cls(data["trials"], data["pareto"], data["best"], data["baseline"], data["setup"],
                   SearchConfig.from_dict(data["config"]), data.get("timings", {}), classic=data.get("classic"))

    @classmethod
    def load(cls, path: str | Path) -> SearchResult:
        """Read `pareto.json` (and a fixed search's `basis.safetensors`) from a search folder."""
        file = Path(path) / "pareto.json"
        if not file.is_file():
            raise FeatsteerError(f"{path} holds no search result (pareto.json missing): run the search first")
        loaded = cls.from_json(json.loads(file.read_text()))
        if loaded.fixed:
            loaded.basis = _read_basis(Path(path), loaded.setup.get("basis_sha256"))
        return loaded


# ---- the proxy objective ---------------------------------------------------------------------------
@dataclass
class _Screen:
    """The optuna objective: apply a trial's edit, read first-token logits, revert."""

    model: ModelAdapter
    source: _DirectionSource
    bounds: dict[str, tuple[float, float]]
    config: SearchConfig
    harmful: list[str]
    harmless: list[str]
    base: KLBase
    """The unedited model on the proxy harmless prompts; `refused` by first-token score > 0."""
    tokens: RefusalTokens
    along: ResponseBase | None = None
    """With `kl_prompts="response"`: the unedited model's distributions along its answers to the proxy harmless prompts."""

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        params = {name: trial.suggest_float(name, low, high) for name, (low, high) in self.bounds.items()}
        scopes = self.source.scopes
        params["direction_scope"] = trial.suggest_categorical("direction_scope", list(scopes)) if len(scopes) > 1 else scopes[0]
        start = time.perf_counter()
        direction, by_layer = self.source.directions(params, self.model.n_layers)
        with apply_edit(self.model, direction, edit_from_params(params, self.config.mode), by_layer=by_layer):
            harmful = first_token_logprobs(self.model, self.harmful, batch_size=self.config.batch_size, system=self.config.system)
            harmless = first_token_logprobs(self.model, self.harmless, batch_size=self.config.batch_size, system=self.config.system)
            kl_response = None if self.along is None else response_kl(self.model, self.along, batch_size=self.config.batch_size).mean
        scores = refusal_score(harmful, self.tokens)
        kl_all, kl_answered = self.base.kls(harmless)
        kl = {"answered": kl_answered, "response": kl_response}.get(self.config.kl_prompts, kl_all)
        proxy = {"refusal_score": float(scores.mean()), "refusal_rate": float((scores > 0).double().mean()), "kl": kl, "kl_all": kl_all,
                 **({} if kl_response is None else {"kl_response": kl_response})}
        seconds = time.perf_counter() - start
        for key, value in {**proxy, "seconds": seconds}.items():
            trial.set_user_attr(key, value)
        logger.info("trial %d: %s, layer %s: refusal score %.3f (rate %.2f) KL %.4f in %.2fs", trial.number, params["direction_scope"],
                    f"{params['direction_layer']:.2f}" if "direction_layer" in params else "fixed", proxy["refusal_score"],
                    proxy["refusal_rate"], proxy["kl"], seconds)
        return proxy[f"refusal_{self.config.refusal_objective}"], proxy["kl"]


def _trial_record(trial: optuna.trial.FrozenTrial, mode: str, pareto_numbers: set[int], scopes: tuple[str, ...]) -> dict:
    attrs = trial.user_attrs
    return {"number": trial.number, "params": {"direction_scope": scopes[0], **trial.params}, "edit": edit_from_params(trial.params, mode).to_dict(),
            "refusal_score": attrs["refusal_score"], "refusal_rate_proxy": attrs["refusal_rate"], "kl": attrs["kl"],
            "kl_all": attrs.get("kl_all", attrs["kl"]), **({"kl_response": attrs["kl_response"]} if "kl_response" in attrs else {}),
            "seconds": attrs["seconds"], "pareto": trial.number in pareto_numbers}


def _classic_params(bounds: dict[str, tuple[float, float]], layer: int, n_layers: int,
                    scopes: tuple[str, ...]) -> tuple[dict, dict[str, list[float]]]:
    """Classic abliteration in the search's parameters (one direction, the selected layer's, strength 1 at every layer
    and on the embedding), clamped to the search's ranges; and `{parameter: [classic value, value used]}` for every
    value the clamping moved (e.g. a selected layer above `SearchSpace.max_layer_fraction`), empty when none moved."""
    wanted = {"direction_layer": float(layer), "embedding_strength": 1.0}
    for writer in ("attn", "mlp"):
        wanted |= {f"{writer}.peak": (n_layers - 1) / 2, f"{writer}.width": float(n_layers),
                   f"{writer}.max_weight": 1.0, f"{writer}.min_fraction": 1.0}
    classic: dict = {name: min(max(value, bounds[name][0]), bounds[name][1]) for name, value in wanted.items() if name in bounds}
    clamped = {name: [wanted[name], classic[name]] for name in classic if classic[name] != wanted[name]}
    if len(scopes) > 1:
        classic["direction_scope"] = "global" if "global" in scopes else scopes[0]
    return classic, clamped


def _classic_record(study: optuna.Study, classic: dict, clamped: dict[str, list[float]]) -> dict:
    """What `pareto.json` says about the classic edit the search started with: its trial number (None until it ran),
    its parameters, and which of them the search's ranges moved away from classic abliteration, with a note."""
    number = next((t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                   if t.params == classic), None)
    note = "the classic edit: the selected direction removed at strength 1 from every writer and the embedding"
    if clamped:
        moved = ", ".join(f"{name} {was:g} -> {used:g}" for name, (was, used) in clamped.items())
        note = (f"NOT the classic edit: the search's ranges moved {moved}"
                + (" (the selected layer lies above SearchSpace.max_layer_fraction)" if "direction_layer" in clamped else ""))
    return {"number": number, "params": classic, "clamped": clamped, "note": note}


# ---- the search ------------------------------------------------------------------------------------
def _open_study(out: Path, setup: dict) -> optuna.Study:
    """Create or resume the study in `out/search.db`, refusing to mix trials of a different set-up."""
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / 'search.db').resolve()}"
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, directions=["minimize", "minimize"], load_if_exists=True)
    stored = study.user_attrs.get("setup")
    if stored is None:
        study.set_user_attr("setup", setup)
    elif stored != setup:
        changed = sorted(k for k in setup.keys() | stored.keys() if setup.get(k) != stored.get(k))
        raise FeatsteerError(f"{out} holds a search with a different set-up ({', '.join(changed)} changed): choose a new output folder")
    return study


def warm_start_params(params: dict, bounds: dict[str, tuple[float, float]], scopes: tuple[str, ...]) -> dict | None:
    """An earlier trial's parameters as a trial of this search: each value clamped to this search's range,
    parameters this search does not have dropped (optuna samples any that are missing). None when its
    direction scope is not searched here."""
    scope = params.get("direction_scope", "global")
    if scope not in scopes:
        return None
    out: dict = {name: min(max(float(params[name]), low), high) for name, (low, high) in bounds.items() if name in params}
    if len(scopes) > 1:
        out["direction_scope"] = scope
    return out


def convert_warm_start(params: dict, kind: str) -> dict:
    """An earlier point's parameters with its `direction_layer` moved to this search's candidate kind and its
    `direction_kind` (the earlier search's kind, added by `load_warm_start`; this search's when absent) dropped:
    `direction_layer` indexes the candidate table, and `resid_post` of block l is `resid_pre` of block l + 1, so a
    `resid_pre` point at 1.4 is a `resid_post` point at 0.4, not one at 1.4.

    Raises:
        FeatsteerError: for a point from a search over another kind that is not the same stream (`STREAM_OFFSETS`).
    """
    out = {name: value for name, value in params.items() if name != "direction_kind"}
    earlier = params.get("direction_kind", kind)
    if earlier == kind or "direction_layer" not in out:
        return out
    if earlier not in STREAM_OFFSETS or kind not in STREAM_OFFSETS:
        raise FeatsteerError(f"the warm start's points come from a search over {earlier} candidates and this search's are {kind}: "
                             f"their direction layers do not correspond; warm-start from a {kind} (or resid_pre/resid_post) search")
    out["direction_layer"] = float(out["direction_layer"]) - STREAM_OFFSETS[earlier] + STREAM_OFFSETS[kind]
    return out


def load_warm_start(path: str | Path) -> list[dict]:
    """The parameters of the Pareto points in an earlier search's `pareto.json` (or its folder), each point with a
    `direction_layer` also carrying the earlier search's candidate kind as `direction_kind` (`resid_pre` for files that
    do not record it, which is all the CLI makes), so a search over another kind converts it (`convert_warm_start`).

    Raises:
        FeatsteerError: when the file is missing or holds no Pareto points.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "pareto.json"
    if not path.is_file():
        raise FeatsteerError(f"warm start {path} not found: pass the pareto.json of an earlier search (or its folder)")
    try:
        data = json.loads(path.read_text())
        points, setup = data.get("pareto") or [], data.get("setup") or {}
        kind = setup.get("kind") or "resid_pre"
    except (json.JSONDecodeError, AttributeError) as error:
        raise FeatsteerError(f"warm start {path} is not a search's pareto.json ({error})") from None
    params = [p["params"] for p in points if isinstance(p, dict) and isinstance(p.get("params"), dict)]
    if not params:
        raise FeatsteerError(f"warm start {path} holds no Pareto points: pass the pareto.json of a finished search")
    for point in params:
        for name, value in point.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not (number or (name == "direction_scope" and isinstance(value, str))):
                raise FeatsteerError(f"warm start {path}: parameter {name} is {value!r}, not a finite number: pass a search's own pareto.json")
    return [{**point, "direction_kind": kind} if "direction_layer" in point else point for point in params]


def _run_trials(study: optuna.Study, screen: _Screen, config: SearchConfig, classic: dict[str, float],
                warm_start: Sequence[dict] = ()) -> None:
    """Run trials until the study holds `config.n_trials` finished ones (a trial stopped by Ctrl-C does not count)."""
    finished = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("interrupted")]
    remaining = config.n_trials - len(finished)
    if remaining <= 0:
        logger.info("study already holds %d finished trials (asked for %d): no new trials", len(finished), config.n_trials)
        return
    if not study.trials:
        queued = [classic] if config.enqueue_classic else []
        for point in (warm_start_params(p, screen.bounds, screen.source.scopes) for p in warm_start):
            if point is not None and point not in queued:  # optuna skips a repeat anyway: count only what will run
                queued.append(point)
        for params in queued:
            study.enqueue_trial(params, skip_if_exists=True)
        if warm_start:
            n_warm = len(queued) - int(config.enqueue_classic)
            study.set_user_attr("warm_start", n_warm)
            logger.info("warm start: %d of %d earlier points queued", n_warm, len(warm_start))
    _queue_interrupted(study)
    study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(finished), n_startup_trials=config.n_startup_trials)
    logger.info("running %d trials (%d already finished)", remaining, len(finished))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study.optimize(functools.partial(_interruptible, screen), n_trials=remaining, catch=(FeatsteerError,))
    finally:
        optuna.logging.set_verbosity(verbosity)


def _queue_interrupted(study: optuna.Study) -> None:
    """Queue again the parameters of every trial Ctrl-C stopped that no later trial has run: a stopped trial is run
    again, not replaced by a new sample, so a stopped classic edit (trial 0) or warm-start point is not lost."""
    trials = study.get_trials(deepcopy=False)

    def params_of(trial: optuna.trial.FrozenTrial) -> dict:
        return trial.system_attrs.get("fixed_params", trial.params)

    run = [params_of(t) for t in trials if not t.user_attrs.get("interrupted")]
    for trial in trials:
        params = params_of(trial)
        if trial.user_attrs.get("interrupted") and params and params not in run:
            study.enqueue_trial(params)
            run.append(params)


def _interruptible(screen: _Screen, trial: optuna.Trial) -> tuple[float, float]:
    """The objective, marking a trial that Ctrl-C stopped, which optuna stores as failed like one whose edit raised:
    a resumed search runs it again instead of counting it towards `n_trials`."""
    try:
        return screen(trial)
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        raise


def _verify_key(harmful: Sequence[str], harmless: Sequence[str], config: SearchConfig, detector: RefusalDetector) -> str:
    """Hash of everything a verification depends on, so cached verifications are reused only when valid."""
    spec = {"harmful": prompt_set_hash(list(harmful)), "harmless": prompt_set_hash(list(harmless)),
            "max_new_tokens": config.max_new_tokens, "markers": list(detector.markers),
            **({"system": config.system} if config.system is not None else {}),  # keys without one stay as they were
            "prefix_only": detector.prefix_only, "prefix_chars": detector.prefix_chars,
            "version": 3,  # 2: verifications also measure the KL on the verification prompts; 3: and looping
            # and the KL along the answers, only where the search reads it (earlier caches stay valid otherwise)
            **({"kl_prompts": "response", "response_scoring": RESPONSE_SCORING} if config.kl_prompts == "response" else {}),
            # a detector that lets off apologies for something counts differently; the key of one that does not, the
            # detector of earlier caches, stays as it was (2: an apology contrasted with a duty, "but I must ...", counts)
            **({"excuse_apologies": 2} if detector.excuse_apologies else {}),
            # the joined-text hashes above cannot tell multi-line prompt lists apart ("a\nb" and "a", "b"): those
            # get the unambiguous ones too, and every key of a set without a multi-line prompt stays as it was
            **({"prompts_sha256": [prompts_sha256(list(harmful)), prompts_sha256(list(harmless))]}
               if any("\n" in prompt for prompt in (*harmful, *harmless)) else {})}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _generate(model: ModelAdapter, eval_sets: tuple[Sequence[str], Sequence[str]], config: SearchConfig,
              detector: RefusalDetector, base: KLBase | None = None, along: ResponseBase | None = None) -> dict:
    """Greedy refusal rates of the model as it currently is on the harmful and harmless evaluation sets, with
    `base` the first-token KL on the harmless set (all prompts and the ones the unedited model answers), and with
    `along` the KL along the unedited model's answers to it (`kl_response`)."""
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, system=config.system)
    start = time.perf_counter()
    harmful = evaluate_set(model, eval_sets[0], "harmful", generation, detector)
    harmless = evaluate_set(model, eval_sets[1], "harmless", generation, detector, keep_logprobs=True)
    out = {"refusal_rate": harmful.rate.rate, "ci_harmful": [harmful.rate.low, harmful.rate.high], "n_harmful": harmful.rate.n,
           "harmless_refusal_rate": harmless.rate.rate, "ci_harmless": [harmless.rate.low, harmless.rate.high],
           "n_harmless": harmless.rate.n, "harmless_refused": list(harmless.refused), "examples": harmful.examples(2),
           "looping_rate": harmful.looping_rate.rate, "harmless_looping_rate": harmless.looping_rate.rate,
           "unanswered_rate": harmful.unanswered_rate.rate}
    if base is not None:  # the generation's own prefill gives the edited first-token log-probs
        out |= dict(zip(("kl", "kl_answered"), base.kls(harmless.first_logprobs), strict=True))
    if along is not None:
        out["kl_response"] = response_kl(model, along, batch_size=config.batch_size).mean
    return out | {"seconds": time.perf_counter() - start}


def _verification_order(pareto: list[dict], config: SearchConfig) -> list[dict]:
    """Pareto points most relevant to the choice first: within the KL budget by proxy refusal, then the rest by KL."""
    max_kl = config.max_kl_for_choice
    objective = "refusal_score" if config.refusal_objective == "score" else "refusal_rate_proxy"
    within = sorted((p for p in pareto if p["kl"] <= max_kl), key=lambda p: (p[objective], p["refusal_score"], p["kl"]))
    beyond = sorted((p for p in pareto if p["kl"] > max_kl), key=lambda p: p["kl"])
    return within + beyond


def _verify(study: optuna.Study, model: ModelAdapter, source: _DirectionSource, pareto: list[dict], eval_sets: tuple, config: SearchConfig,
            detector: RefusalDetector, base: KLBase, along: ResponseBase | None = None) -> None:
    """Attach generation results and the KL on the verification prompts to the top Pareto points (cached in the
    study across runs)."""
    key = _verify_key(*eval_sets, config, detector)
    for point in pareto:
        point["verified"] = None
    for point in _verification_order(pareto, config)[: config.verify_top]:
        cached = study.user_attrs.get(f"verified:{point['number']}")
        if cached is not None and cached.get("key") == key:
            point["verified"] = cached["result"]
            continue
        direction, by_layer = source.directions(point["params"], model.n_layers)
        with apply_edit(model, direction, edit_config_from_dict(point["edit"]), by_layer=by_layer):
            point["verified"] = _generate(model, eval_sets, config, detector, base, along)
        study.set_user_attr(f"verified:{point['number']}", {"key": key, "result": point["verified"]})
        logger.info("verified trial %d: refusal %.3f, harmless refusal %.3f, KL %.4f (proxy %.4f)", point["number"],
                    point["verified"]["refusal_rate"], point["verified"]["harmless_refusal_rate"], point["verified"]["kl"], point["kl"])


def verified_kl(point: dict, kl_prompts: str = "all") -> float:
    """A Pareto point's KL for the choice: measured on the verification prompts when it was verified there (more
    prompts than the proxy's), else its proxy KL; over the answered prompts when `kl_prompts` is `answered`, along the
    unedited model's answers when it is `response`."""
    verified = point.get("verified") or {}
    value = verified.get({"answered": "kl_answered", "response": "kl_response"}.get(kl_prompts, "kl"))
    return point["kl"] if value is None else value


def choose_best(pareto: list[dict], max_kl: float, kl_prompts: str = "all") -> dict | None:
    """The verified point with the lowest share of harmful prompts unanswered (refused or looping; the refusal rate
    for verifications made before looping was measured) among those with KL <= `max_kl` (see `verified_kl`), else
    the verified point with the lowest KL."""
    verified = [p for p in pareto if p.get("verified")]
    within = [p for p in verified if verified_kl(p, kl_prompts) <= max_kl]
    if within:
        return min(within, key=lambda p: (p["verified"].get("unanswered_rate", p["verified"]["refusal_rate"]),
                                          p["verified"]["harmless_refusal_rate"], verified_kl(p, kl_prompts)))
    return min(verified, key=lambda p: verified_kl(p, kl_prompts), default=None)


def _baseline(study: optuna.Study, model: ModelAdapter, screen: _Screen, eval_sets: tuple, config: SearchConfig,
              detector: RefusalDetector) -> tuple[dict, KLBase, ResponseBase | None]:
    """Proxy and verified refusal of the unedited model (the generation is cached in the study), the KL base of the
    verifications, and with `kl_prompts="response"` the response-KL base on the verification harmless prompts."""
    scores = refusal_score(first_token_logprobs(model, screen.harmful, batch_size=config.batch_size, system=config.system), screen.tokens)
    key = _verify_key(*eval_sets, config, detector)
    cached = study.user_attrs.get("verified:baseline")
    if cached is None or cached.get("key") != key:
        cached = {"key": key, "result": _generate(model, eval_sets, config, detector)}
        study.set_user_attr("verified:baseline", cached)
    base = KLBase(first_token_logprobs(model, list(eval_sets[1]), batch_size=config.batch_size, system=config.system), tuple(cached["result"]["harmless_refused"]))
    along = None
    if config.kl_prompts == "response":
        harmless = list(eval_sets[1])
        answers = model.generate_with_tokens(harmless, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                             keep_logits=False, system=config.system).token_ids
        along = response_base(model, harmless, answers, max_tokens=config.max_new_tokens, batch_size=config.batch_size,
                              system=config.system)
    return {"refusal_score": float(scores.mean()), "refusal_rate_proxy": float((scores > 0).double().mean()),
            "verified": cached["result"]}, base, along


def search_abliteration(
    model: ModelAdapter,
    result: DirectionResult,
    out_dir: str | Path,
    config: SearchConfig | None = None,
    eval_harmful: Sequence[str] | None = None,
    eval_harmless: Sequence[str] | None = None,
    detector: RefusalDetector | None = None,
    warm_start: Sequence[dict] = (),
) -> SearchResult:
    """Search abliteration settings for the refusal/KL Pareto front, verify it, write `pareto.json`/`pareto.png`.

    Args:
        model: the model; edited during each trial and restored exactly afterwards.
        result: candidates, selection and validation prompts from `find_refusal_direction` (rank-1 method).
        out_dir: folder for `search.db`, `pareto.json` and `pareto.png`; an existing study there is resumed.
        config: search settings; `SearchConfig()` when None.
        eval_harmful: held-out harmful prompts for verification; default the validation prompts (which
            overlap the proxy prompts, so pass a separate set for an unbiased estimate).
        eval_harmless: held-out harmless prompts for verification; default as for `eval_harmful`.
        detector: refusal detector for verification; `RefusalDetector()` when None.
        warm_start: parameter sets (e.g. `load_warm_start(earlier_folder)`) that a new study runs first, after
            the classic edit, clamped to this search's ranges (a `direction_layer` from a search over another
            candidate kind moved to this one's, `convert_warm_start`); ignored when resuming. Useful when the
            directions changed but good kernels are likely similar.

    Returns:
        All trials, the verified Pareto front and the recommended point.

    Raises:
        FeatsteerError: for rank-k candidates, a missing position, the per_layer scope named in `config.space.scopes`
            with candidates of a kind other than resid_pre/resid_post (unset, those search the global scope only), empty verification sets, a folder holding a search with a different set-up,
            or a warm start from a search over a candidate kind that is not this one's stream.
    """
    config = config or SearchConfig()
    if config.system is None:
        config = replace(config, system=result.system)
    elif config.system != result.system:
        raise FeatsteerError(f"the search's system prompt ({config.system!r}) is not the one the direction was found with "
                             f"({result.system!r}): search with the direction's (leave SearchConfig.system unset)")
    chosen = result.selection.chosen
    if _HOOK_RE.match(chosen.hook) is None:
        raise FeatsteerError(f"the search interpolates candidates at blocks.L.hook_<kind> points, not at {chosen.hook}: find the "
                             "direction with DirectionConfig(kind='resid_pre') (or resid_mid, resid_post, attn_out, mlp_out)")
    kind = model.hook_site(chosen.hook).kind
    warm_start = [convert_warm_start(point, kind) for point in warm_start]
    scopes = config.space.scopes_for(kind)  # checked here: optuna would fail every per-layer trial of a kind it cannot map
    position = chosen.position if config.position is None else config.position
    table = layer_directions(result.candidates, position, kind)
    listed = result.candidates.provenance.get("layers")  # the selection kept to these (abliterate --layers): so does the search
    bounds = config.space.bounds(model.n_layers, table.shape[0], first_usable_layer(table), kind)
    if listed:
        bounds["direction_layer"] = _listed_range(bounds["direction_layer"], listed)
    proxy = tuple(list(s)[: config.n_proxy_prompts] for s in result.val)
    eval_sets = (list(result.val[0] if eval_harmful is None else eval_harmful),
                 list(result.val[1] if eval_harmless is None else eval_harmless))
    provenance = result.candidates.provenance
    # the candidate directions themselves (and the dtype they act in) are part of the set-up: a resumed study whose
    # trials were taken against other directions (another --positions, other prompts, bfloat16) must not be mixed in
    setup = {"model": model.name, "n_layers": model.n_layers, "method": result.candidates.method, "position": position, "kind": kind,
             "harmful_sha256": provenance.get("harmful_sha256"), "harmless_sha256": provenance.get("harmless_sha256"),
             "directions_sha256": basis_sha256(table), "dtype": str(model.dtype).removeprefix("torch."),
             **({"layers": sorted(set(listed))} if listed else {})}  # only when given, so earlier studies still resume
    source = _DirectionSource(table=table, scopes=scopes, kind=kind)
    return _search(model, source, bounds, chosen.layer, proxy, eval_sets, setup, Path(out_dir), config, detector, warm_start)


def _listed_range(span: tuple[float, float], layers: Sequence[int]) -> tuple[float, float]:
    """The direction layer's range `span` cut to run from the first to the last of `layers` (those the selection kept to).

    Raises:
        FeatsteerError: when no listed layer lies in `span` (all below the first non-zero direction at the searched
            position, or above the search's top layer).
    """
    low, high = max(span[0], float(min(layers))), min(span[1], float(max(layers)))
    if low > high:
        raise FeatsteerError(f"the search's direction layer ranges over {span[0]:g}..{span[1]:g} and the layers {sorted(set(layers))} "
                             "the direction was chosen among lie outside it: list layers in that range")
    return low, high


def search_fixed_abliteration(
    model: ModelAdapter,
    direction: Tensor,
    val: tuple[Sequence[str], Sequence[str]],
    out_dir: str | Path,
    config: SearchConfig | None = None,
    eval_harmful: Sequence[str] | None = None,
    eval_harmless: Sequence[str] | None = None,
    detector: RefusalDetector | None = None,
    warm_start: Sequence[dict] = (),
    provenance: dict | None = None,
) -> SearchResult:
    """Search the kernels and strengths of removing one given direction (or basis) for the refusal/KL Pareto front.

    The same search as `search_abliteration` without its direction parameters: the direction is fixed (an SAE
    feature's decoder row, the span of several, a probe's weight vector, a saved `DirectionSet` basis), and the
    trials choose only how strongly each layer's attention and MLP writers and the embedding remove it. Trial 0
    is classic abliteration of that direction (strength 1 everywhere), so the front always contains it.

    Args:
        model: the model; edited during each trial and restored exactly afterwards.
        direction: `(d_model,)` or `(k, d_model)`; orthonormalised (`fixed_basis`) before use.
        val: `(harmful, harmless)` validation prompts; the first `config.n_proxy_prompts` of each are the proxy's.
        out_dir: folder for `search.db`, `basis.safetensors`, `pareto.json` and `pareto.png`; an existing study there
            is resumed if it ran on the same basis and set-up.
        config: search settings; `SearchConfig()` when None (its direction scopes and `position` do not apply).
        eval_harmful: held-out harmful prompts for verification; default `val[0]`.
        eval_harmless: held-out harmless prompts for verification; default `val[1]`.
        detector: refusal detector for verification; `RefusalDetector()` when None.
        warm_start: kernel parameters that a new study runs first, after the classic edit (direction parameters of
            an earlier DIM search are dropped; its per-layer points are skipped).
        provenance: what the direction is (e.g. `{"method": "sae", "sae_hook": ..., "sae_features": [...]}`),
            recorded in the result's `setup`; a resumed study must have the same.

    Returns:
        All trials, the verified Pareto front and the recommended point; `apply(model)` needs no other input.

    Raises:
        FeatsteerError: for a direction of the wrong width, NaN or linearly dependent rows, empty prompt sets, or a
            folder holding a search with a different set-up or basis.
    """
    config = config or SearchConfig()
    basis = fixed_basis(direction, model.d_model)
    if not list(val[0]) or not list(val[1]):
        raise FeatsteerError("the validation prompt sets are empty: pass at least one harmful and one harmless prompt")
    bounds = {name: span for name, span in config.space.bounds(model.n_layers, 1).items() if name != "direction_layer"}
    proxy = tuple(list(s)[: config.n_proxy_prompts] for s in val)
    eval_sets = (list(val[0] if eval_harmful is None else eval_harmful), list(val[1] if eval_harmless is None else eval_harmless))
    provenance = dict(provenance or {})
    setup = {"model": model.name, "n_layers": model.n_layers, "method": provenance.pop("method", "fixed"), "direction": "fixed",
             "rank": int(basis.shape[0]), "basis_sha256": basis_sha256(basis), "dtype": str(model.dtype).removeprefix("torch."),
             **({"provenance": provenance} if provenance else {})}
    out = Path(out_dir)
    found = _search(model, _DirectionSource(basis=basis), bounds, 0, proxy, eval_sets, setup, out, config, detector,
                    warm_start, before_trials=lambda: _write_basis(out, basis))
    found.basis = basis
    return found


def _write_basis(folder: Path, basis: Tensor) -> None:
    """Keep a fixed search's basis beside its study (written once, atomically)."""
    from safetensors.torch import save

    if (folder / "basis.safetensors").is_file():
        return
    write_files(folder, {"basis.safetensors": save({"basis": basis.contiguous()})})


def _read_basis(folder: Path, expected_sha256: str | None) -> Tensor:
    from safetensors.torch import load_file

    file = folder / "basis.safetensors"
    if not file.is_file():
        raise FeatsteerError(f"{folder} holds a fixed-direction search but no basis.safetensors: copy the whole search folder")
    basis = load_file(str(file))["basis"]
    if expected_sha256 is not None and basis_sha256(basis) != expected_sha256:
        raise FeatsteerError(f"{file} does not match the basis the search ran on (hash differs): restore the search folder")
    return basis


def _search(model: ModelAdapter, source: _DirectionSource, bounds: dict[str, tuple[float, float]], classic_layer: int,
            proxy: tuple[list[str], list[str]], eval_sets: tuple[list[str], list[str]], setup: dict, out: Path, config: SearchConfig,
            detector: RefusalDetector | None, warm_start: Sequence[dict], before_trials=None) -> SearchResult:
    """The search both entry points share: open or resume the study, screen, verify the front, choose, write."""
    detector = detector or RefusalDetector()
    if not eval_sets[0] or not eval_sets[1]:
        raise FeatsteerError("the verification prompt sets are empty: pass at least one harmful and one harmless prompt")
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    base_harmless = first_token_logprobs(model, proxy[1], batch_size=config.batch_size, system=config.system)
    proxy_base = KLBase(base_harmless, tuple(bool(r) for r in (refusal_score(base_harmless, tokens) > 0).tolist()))
    if config.kl_prompts == "answered" and all(proxy_base.refused):
        raise FeatsteerError(f"the model refuses all {len(base_harmless)} proxy harmless prompts: no answered prompts for kl_prompts='answered'")
    setup = {**setup, "mode": config.mode, "refusal_objective": config.refusal_objective,
             "proxy_harmful_sha256": prompt_set_hash(proxy[0]), "proxy_harmless_sha256": prompt_set_hash(proxy[1]),
             "bounds": {k: list(v) for k, v in bounds.items()}, "scopes": list(source.scopes),
             # recorded only when not the default, so studies from before the option still resume; the KL along the
             # answers reads answers of max_new_tokens tokens, so their length is part of its objective
             **({"kl_prompts": config.kl_prompts} if config.kl_prompts != "all" else {}),
             **({"system": config.system} if config.system is not None else {}),
             **({"response_tokens": config.max_new_tokens} if config.kl_prompts == "response" else {}),
             # the KL along the answers scores the generated token ids and the end-of-turn token since 2026-12-07; trials
             # of a study from before scored re-tokenized text and must not be mixed with these
             **({"response_scoring": RESPONSE_SCORING} if config.kl_prompts == "response" else {})}
    study = _open_study(out, setup)
    if before_trials is not None:
        before_trials()
    along = None
    if config.kl_prompts == "response":
        answers = model.generate_with_tokens(proxy[1], max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                             keep_logits=False, system=config.system).token_ids
        along = response_base(model, proxy[1], answers, max_tokens=config.max_new_tokens, batch_size=config.batch_size,
                              system=config.system)
    screen = _Screen(model, source, bounds, config, proxy[0], proxy[1], proxy_base, tokens, along)
    start = time.perf_counter()
    classic, clamped = _classic_params(bounds, classic_layer, model.n_layers, source.scopes)
    if config.enqueue_classic and clamped:
        logger.warning("search: trial 0 is not the classic edit at the selected layer %d: %s", classic_layer,
                       _classic_record(study, classic, clamped)["note"])
    _run_trials(study, screen, config, classic, warm_start)
    screened = time.perf_counter()
    pareto_numbers = {t.number for t in study.best_trials}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    trials = [_trial_record(t, config.mode, pareto_numbers, source.scopes) for t in complete]
    pareto = sorted((dict(t) for t in trials if t["pareto"]), key=lambda p: (p["kl"], p["refusal_score"]))
    baseline, base, verify_along = _baseline(study, model, screen, eval_sets, config, detector)
    _verify(study, model, source, pareto, eval_sets, config, detector, base, verify_along)
    timings = {"screen_s": screened - start, "verify_s": time.perf_counter() - screened,
               "mean_trial_s": sum(t["seconds"] for t in trials) / max(len(trials), 1)}
    search = SearchResult(trials, pareto, choose_best(pareto, config.max_kl_for_choice, config.kl_prompts), baseline,
                          study.user_attrs["setup"], config, timings,
                          classic=_classic_record(study, classic, clamped) if config.enqueue_classic else None)
    write_search(search, out)
    logger.info("search: %d trials (%.2fs each), %d on the Pareto front, best: %s", len(trials), timings["mean_trial_s"],
                len(pareto), "none" if search.best is None else f"trial {search.best['number']}")
    return search


# ---- output ----------------------------------------------------------------------------------------
def pareto_png(search: SearchResult) -> bytes:
    """Proxy refusal vs KL: every trial grey, the Pareto front highlighted, verified points and the best marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective = "refusal_score" if search.config.refusal_objective == "score" else "refusal_rate_proxy"
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.scatter([t["kl"] for t in search.trials], [t[objective] for t in search.trials], s=14, color="0.7", label="trials")
    ax.plot([p["kl"] for p in search.pareto], [p[objective] for p in search.pareto], "o-", color="tab:blue", ms=5, label="Pareto front")
    verified = [p for p in search.pareto if p.get("verified")]
    ax.scatter([p["kl"] for p in verified], [p[objective] for p in verified], s=90, facecolors="none", edgecolors="tab:red",
               label="verified (label: refusal rate)")
    for p in verified:
        ax.annotate(f"{p['verified']['refusal_rate']:.2f}", (p["kl"], p[objective]), fontsize=7, xytext=(5, 4), textcoords="offset points")
    if search.best is not None:
        ax.scatter([search.best["kl"]], [search.best[objective]], marker="*", s=220, color="tab:orange", zorder=5, label="chosen")
    positive = [t["kl"] for t in search.trials if t["kl"] > 0]
    ax.set_xscale("symlog", linthresh=10 ** math.floor(math.log10(min(positive))) if positive else 1e-6)
    ax.set_xlabel("KL(base || edited) along the unedited answers, harmless prompts (nats)" if search.config.kl_prompts == "response"
                  else "KL(base || edited), first token, harmless prompts (nats)")
    ax.set_ylabel("refusal log-odds (harmful, mean)" if objective == "refusal_score" else "proxy refusal rate (harmful)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_search(search: SearchResult, out: str | Path) -> Path:
    """Write `pareto.json` and `pareto.png` into `out`, each complete or not at all (`files.write_files`): an interrupted
    write leaves the earlier pair, not a new front beside the old plot, nor a partial file."""
    return write_files(out, {"pareto.json": json_text(search.to_json()), "pareto.png": pareto_png(search)})


__all__ = [
    "DIRECTION_SCOPES",
    "KL_PROMPTS",
    "REFUSAL_OBJECTIVES",
    "SEARCH_MODES",
    "STREAM_OFFSETS",
    "STUDY_NAME",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "choose_best",
    "verified_kl",
    "edit_config_from_dict",
    "edit_from_params",
    "first_usable_layer",
    "interpolate_direction",
    "layer_directions",
    "load_warm_start",
    "convert_warm_start",
    "pareto_png",
    "per_layer_directions",
    "trial_directions",
    "search_abliteration",
    "search_fixed_abliteration",
    "fixed_basis",
    "basis_sha256",
    "check_per_layer_kind",
    "warm_start_params",
    "write_search",
]
