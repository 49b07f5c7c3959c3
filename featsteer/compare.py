"""Run every intervention method on the same prompts with the same metrics.

DIM abliteration is the baseline; every other method (other direction sources, runtime hooks, norm-
preserving edits, probe directions, and - when SAEs are given - SAE-feature methods) is applied to the
same model, evaluated on the same held-out prompts with the same greedy decoding and detector, and
reverted before the next one. Results are written as `results.json`, a refusal-vs-KL Pareto plot and a
self-contained `report.html`.

SAE methods read one feature ranking, computed once from the training prompts (the same prompts and
positions the direction methods use): features more active on harmful than on harmless prompts, by
composite score. Decoder rows go through the same weight-edit and ablation code as the DIM direction, so
`sae_top1_abliteration` and `dim_abliteration` differ only in where the direction came from.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from featsteer.activations import ActivationSet, capture
from featsteer.datasets import PromptSet
from featsteer.directions.optimize import OptimizeConfig, OptimizedDirection
from featsteer.edits import (
    EditConfig,
    EditHandle,
    add_at_tokens,
    add_through_biases,
    apply_edit,
    template_tokens,
)
from featsteer.errors import FeatsteerError
from featsteer.evaluation.behaviour import GenerationConfig, SetResult, evaluate_set, responses_nll
from featsteer.evaluation.judge import RefusalJudge
from featsteer.evaluation.metrics import (
    KLBase,
    RefusalTokens,
    first_token_logprobs,
    kl_first_token,
    kl_per_prompt,
    refusal_score,
)
from featsteer.evaluation.refusal import RefusalDetector
from featsteer.evaluation.response_kl import ResponseBase, response_base, response_kl
from featsteer.files import json_text, write_files
from featsteer.interventions import (
    Ablate,
    AddDirection,
    AffineEdit,
    AngularSteer,
    ExpertSteer,
    Gate,
    HeadAblate,
    expert_routing,
    fit_gate,
    gate_hooks,
    steer,
)
from featsteer.models import NORM_KINDS, ModelAdapter, check_system, weights_fingerprint
from featsteer.pipeline import (
    DirectionConfig,
    DirectionResult,
    abliterate,
    capture_training,
    filter_by_refusal,
    find_refusal_direction,
    heads_of,
    split,
    warn_reused_held_out,
)

if TYPE_CHECKING:  # sae_lens takes seconds to import: SAE code is imported only when SAEs are used
    from sae_lens import SAE

    from featsteer.features import FeatureScores

logger = logging.getLogger(__name__)


SAE_TOP_KS = (1, 2, 4, 8, 16)
"""Feature counts the top-k SAE methods try on the validation prompts when `SaeMethodConfig.top_k` is None."""
SAE_CLAMP_MULTIPLES = (0.0, -0.5, -1.0, -2.0)
"""Clamp values (multiples of each feature's harmful maximum) `sae_clamp_hook` tries when none is fixed."""
SAE_INDUCE_MULTIPLES = (0.5, 1.0, 2.0)
"""Clamp values `sae_topk_induce` tries when none is fixed."""


@dataclass(frozen=True)
class SaeMethodConfig:
    """How the SAE methods pick and edit features.

    A setting left at None is picked on the validation prompts (the part of the training prompts that the
    feature ranking does not read), the way Arditi-style selection picks the DIM direction and
    `dim_actadd_induce` picks its scale: the jailbreak methods take the lowest validation harmless KL among
    the settings whose validation harmful refusal is within `tolerance` of the lowest; `sae_topk_induce`
    takes the weakest setting (the smallest norm of what its clamp writes) whose validation harmless refusal is
    within `tolerance` of the highest. Fixing a value skips the search over it.
    """

    top_k: int | None = None
    """Features the top-k methods use: the best `top_k` features at the hook of the single best feature
    (None: picked from `top_ks`)."""
    clamp_multiple: float | None = None
    """`sae_clamp_hook` clamps each feature to this multiple of its largest activation on the harmful
    training prompts (0 ablates the features; negative values push against them; None: picked from
    `clamp_multiples`)."""
    induce_multiple: float | None = None
    """`sae_topk_induce` clamps each feature to this multiple of that largest activation (None: picked from
    `induce_multiples`)."""
    top_ks: tuple[int, ...] = SAE_TOP_KS
    clamp_multiples: tuple[float, ...] = SAE_CLAMP_MULTIPLES
    induce_multiples: tuple[float, ...] = SAE_INDUCE_MULTIPLES
    tolerance: float = 0.05
    """How far from the best validation refusal rate a setting may be and still be picked."""
    positions: str | None = None
    """Token positions features are scored at (`last`, `post_instruction`, `instruction_end`, `mean_last:K`); None uses the
    direction config's positions."""
    clamp_positions: str = "prompt"
    """Tokens the clamps of `sae_clamp_hook`/`sae_topk_induce` apply to: `prompt` (default: the decision is
    steered, the response is generated freely), `generated` or `all`. Clamping a feature to a constant at
    every generated token as well tends to make the organism repeat one token."""

    def __post_init__(self) -> None:
        from featsteer.sae import SPLICE_POSITIONS

        if self.clamp_positions not in SPLICE_POSITIONS:
            raise FeatsteerError(f"clamp_positions '{self.clamp_positions}' is unknown: use one of {', '.join(SPLICE_POSITIONS)}")
        for name in ("top_ks", "clamp_multiples", "induce_multiples"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise FeatsteerError(f"SAE {name} is empty: give at least one value to pick from")
        if any(k < 1 for k in (*self.top_ks, *self._fixed(self.top_k))):
            raise FeatsteerError(f"SAE top_k must be at least 1, got {self.top_k if self.top_k is not None else self.top_ks}")
        if any(m > 0 for m in (*self.clamp_multiples, *self._fixed(self.clamp_multiple))):
            raise FeatsteerError(f"clamp_multiple={self.clamp_multiple if self.clamp_multiple is not None else self.clamp_multiples} "
                                 "would amplify refusal features: use values <= 0")
        if any(m <= 0 for m in (*self.induce_multiples, *self._fixed(self.induce_multiple))):
            raise FeatsteerError(f"induce_multiple must be positive, got {self.induce_multiple if self.induce_multiple is not None else self.induce_multiples}")
        if not 0 <= self.tolerance < 1:
            raise FeatsteerError(f"SAE tolerance must be in [0, 1), got {self.tolerance}")

    @staticmethod
    def _fixed(value: float | None) -> tuple[float, ...]:
        return () if value is None else (value,)

    def ks(self) -> tuple[int, ...]:
        """The feature counts to try (the fixed one alone when `top_k` is set)."""
        return self._fixed(self.top_k) or self.top_ks

    def clamps(self) -> tuple[float, ...]:
        """The clamp multiples `sae_clamp_hook` tries (the fixed one alone when `clamp_multiple` is set)."""
        return self._fixed(self.clamp_multiple) or self.clamp_multiples

    def induces(self) -> tuple[float, ...]:
        """The multiples `sae_topk_induce` tries (the fixed one alone when `induce_multiple` is set)."""
        return self._fixed(self.induce_multiple) or self.induce_multiples

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SaeMethodConfig:
        """Inverse of `to_dict`."""
        return cls(**dict(data))


@dataclass(frozen=True)
class SaeRanking:
    """SAE features more active on harmful than on harmless training prompts, ranked by composite score (what the SAE
    methods pick from; `featsteer.feature_report.rank_features` is the full report)."""

    scores: FeatureScores
    """Scores of the features with a positive mean difference, best first."""
    harmful_max: dict[str, Tensor]
    """Per hook, `(d_sae,)` largest activation of each feature on the harmful training prompts (float64)."""
    positions: str
    """Positions the features were scored at."""

    def best(self, k: int = 1) -> tuple[str, list[int]]:
        """The single best feature's hook and the `k` best features at that hook, best first."""
        hook = self.scores.hook_names[0]
        return hook, self.scores.for_hook(hook).feature_ids[:k].tolist()


def rank_sae_features(
    model: ModelAdapter,
    saes: Mapping[str, SAE],
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: str = "last",
    batch_size: int = 16,
    system: str | None = None,
) -> SaeRanking:
    """Capture once at every SAE's hook (once per row width: hook_z next to stream SAEs on Gemma 2), score all features,
    keep those more active on harmful prompts.

    Args:
        model: the model the SAEs read.
        saes: `{hook_name: sae}`.
        harmful: harmful training instructions.
        harmless: harmless training instructions.
        positions: capture selector; the captured rows are pooled for scoring.
        batch_size: prompts per forward pass.
        system: the system prompt the prompts are formatted with (None: none).

    Returns:
        The ranking (composite score, ties by layer then feature id) and each feature's harmful maximum.

    Raises:
        FeatsteerError: if no feature of any SAE is more active on harmful than on harmless prompts.
    """
    from featsteer.activations import hook_width
    from featsteer.features import merge_sae_scores, score_features

    hooks = list(saes)
    groups: dict[int, list[str]] = {}
    for hook in hooks:
        groups.setdefault(hook_width(model, hook), []).append(hook)
    parts, maxima = [], {}
    for group in groups.values():
        harmful_acts, harmless_acts = (capture(model, list(prompts), group, positions=positions, batch_size=batch_size, label=label,
                                               progress=False, system=system)
                                       for prompts, label in ((harmful, "harmful"), (harmless, "harmless")))
        parts.append(score_features({hook: saes[hook] for hook in group}, harmful_acts, harmless_acts, by="composite"))
        maxima.update({hook: _harmful_max(saes[hook], harmful_acts, hook) for hook in group})
    scores = parts[0] if len(parts) == 1 else merge_sae_scores(parts, hooks).sort("composite")
    rows = (scores.metrics["mean_difference"] > 0).nonzero().flatten()
    if rows.numel() == 0:
        raise FeatsteerError(f"no SAE feature at {', '.join(hooks)} is more active on harmful than on harmless prompts: check the SAEs and prompts")
    return SaeRanking(scores.select(rows), {hook: maxima[hook] for hook in hooks}, positions)


def _harmful_max(sae: SAE, acts: ActivationSet, hook: str) -> Tensor:
    """`(d_sae,)` largest activation of each feature over the captured rows a clamp edits (`spliced_rows`: within the
    SAE's norm bound and after its untrained chat-template head, as `featsteer.features.max_feature_activations`); 0
    for a feature that never fires there."""
    from featsteer.sae import encode_activations
    from featsteer.sae.steering import spliced_rows

    rows = acts.hook(hook)[spliced_rows(sae, acts, hook)]
    if rows.shape[0] == 0:
        return torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64)
    return encode_activations(sae, rows).double().amax(0).clamp_min(0.0)


ACE_ALPHAS = (0.0, -0.25, -0.5)
"""`dim_ace_hook` settings tried on the validation prompts: 0 puts every projection at the harmless mean's."""
ACE_INDUCE_ALPHAS = (0.5, 0.75, 1.0, 1.5)
"""`dim_ace_induce` settings: 1 puts every projection at the harmful mean's."""
ANGLES = (60.0, 75.0, 90.0, 120.0, 150.0, 180.0)
"""The angular methods' target angles (degrees from the refusal direction) tried on the validation prompts."""


def _listed(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


@dataclass(frozen=True)
class SteeringMethodConfig:
    """How the affine (ACE) and angular steering methods pick their setting.

    As for the SAE methods, a value left at None is picked on the validation prompts: the jailbreak methods take
    the lowest validation KL among the settings within `tolerance` of the lowest validation harmful refusal, the
    induce method the weakest setting within `tolerance` of the highest validation harmless refusal.
    """

    ace_alpha: float | None = None
    """`dim_ace_hook`: where on the harmless (0) to harmful (1) line each projection is set (None: from `ace_alphas`)."""
    ace_induce_alpha: float | None = None
    """`dim_ace_induce`: the same for the induce method (None: from `ace_induce_alphas`)."""
    angle: float | None = None
    """`dim_angular_hook` and `dim_angular_norms_hook`: degrees from the refusal direction (None: from `angles`)."""
    ace_alphas: tuple[float, ...] = ACE_ALPHAS
    ace_induce_alphas: tuple[float, ...] = ACE_INDUCE_ALPHAS
    angles: tuple[float, ...] = ANGLES
    adaptive: bool = True
    """The angular methods turn only activations that lean towards refusal (positive projection)."""
    tolerance: float = 0.05
    """How far from the best validation refusal a gentler setting may be and still be picked (also the DIM
    activation-addition scale's rule). 0 takes only settings level with the best."""

    def __post_init__(self) -> None:
        for name in ("ace_alphas", "ace_induce_alphas", "angles"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise FeatsteerError(f"{name} is empty: give at least one value to pick from")
        if any(a >= 1 for a in self.choices("ace_alpha")):
            raise FeatsteerError(f"an ACE jailbreak alpha must be below 1 (1 is the harmful mean), got {_listed(self.choices('ace_alpha'))}")
        if any(a <= 0 for a in self.choices("ace_induce_alpha")):
            raise FeatsteerError(f"an ACE induce alpha must be positive, got {_listed(self.choices('ace_induce_alpha'))}")
        if not 0 <= self.tolerance < 1:
            raise FeatsteerError(f"tolerance must be in [0, 1), got {self.tolerance}")

    def choices(self, name: str) -> tuple[float, ...]:
        """The values to pick from for `ace_alpha`, `ace_induce_alpha` or `angle` (one when it is fixed)."""
        fixed = getattr(self, name)
        plural = {"ace_alpha": "ace_alphas", "ace_induce_alpha": "ace_induce_alphas", "angle": "angles"}[name]
        return (fixed,) if fixed is not None else getattr(self, plural)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_MAX_NLL_RISE = 0.5
"""The jailbreak picks' default coherence bound, in nats per token (`CompareContext.max_nll_rise`). Measured on the
organism, the MoE organism and Qwen2.5-Coder-0.5B (README, "Reflection and attention-head methods"), 0.5 rules out
only settings whose answers are visibly broken (validation NLL 2.6-7.7 against 0.9 unedited on the organisms) and
leaves every ACE, angular, SAE and DIM pick where it was."""


@dataclass
class CompareContext:
    """What methods may use: the model, the prompt splits, SAEs, and directions/feature ranking (cached)."""

    model: ModelAdapter
    harmful: PromptSet
    harmless: PromptSet
    direction_config: DirectionConfig
    _directions: dict[str, DirectionResult] = field(default_factory=dict)
    saes: dict[str, SAE] | None = None
    """`{hook_name: sae}` for the SAE methods (None: SAE methods cannot run)."""
    sae_config: SaeMethodConfig = field(default_factory=SaeMethodConfig)
    """How SAE methods pick and edit features (`top_k` etc.)."""
    steering_config: SteeringMethodConfig = field(default_factory=SteeringMethodConfig)
    """How the ACE and angular methods pick their setting."""
    _ranking: SaeRanking | None = None
    _erasers: dict | None = None
    _notes: dict[str, Any] = field(default_factory=dict)
    _val_base: Tensor | None = None
    val: tuple[PromptSet, PromptSet] | None = None
    """Explicit `(harmful, harmless)` validation prompts for every pick (direction selection, SAE settings, induce
    scale); None holds out the last `direction_config.val_fraction` of `harmful` and `harmless` instead."""
    n_pick: int | None = None
    """Validation prompts per set the setting picks read (SAE settings, ACE alpha, angle, induce scale); None reads
    `direction_config.n_select`, as many as the direction selection."""
    pick_kl: str = "first"
    """The KL the jailbreak picks weigh settings by: `first` (first-token KL on the validation harmless prompts) or
    `response` (the KL along the unedited model's own validation answers, `evaluation.response_kl`), which does not
    favour a setting that keeps the first token and changes what follows."""
    _val_response_base: ResponseBase | None = None
    max_nll_rise: float | None = DEFAULT_MAX_NLL_RISE
    """A coherence bound for the jailbreak picks: a setting whose validation harmless answers the unedited model finds
    more than this many nats per token less likely than its own answers counts as answering no harmful prompt, so it is
    never picked for a refusal rate it buys by breaking the text (default `DEFAULT_MAX_NLL_RISE`; None: no bound)."""
    _val_answers_nll: float | None = None
    optimize_config: OptimizeConfig = field(default_factory=OptimizeConfig)
    """How `dim_optimized_abliteration` trains its direction (steps, loss weights, snapshots picked from)."""
    _writing_heads: list[tuple[int, int, float]] | None = None
    _gate: Gate | None = None
    _optimized: OptimizedDirection | None = None
    system: str | None = None
    """The system prompt the evaluation formats its prompts with (`compare`'s `GenerationConfig.system`): the picks'
    validation reads the model with it too (generations, first-token KL, the KL along the answers, the NLL bound), so a
    setting is picked as it will be evaluated, and so does everything learnt from the training prompts (the directions:
    `direction_config.system` must be the same; the SAE ranking, the CAST gate, expert routing, template tokens). None:
    no system prompt."""
    _used_directions: set[str] = field(default_factory=set)
    """The `_directions` keys this context's methods read (a `reuse` brings an earlier run's others along)."""
    _weights: str | None = None
    """The model's `weights_fingerprint` when the comparison began, which a `reuse` must match."""
    _filtered: tuple[PromptSet, PromptSet] | None = None
    """The training prompts the train filter kept (`training`), once found."""

    def __post_init__(self) -> None:
        check_system(self.system)
        if self.direction_config.system != self.system:
            raise FeatsteerError(f"the directions would be found with the system prompt {self.direction_config.system!r} and the methods "
                                 f"evaluated with {self.system!r}: give DirectionConfig(system=...) the evaluation's system prompt")
        if self.pick_kl not in PICK_KLS:
            raise FeatsteerError(f"pick_kl must be one of {', '.join(PICK_KLS)}, got {self.pick_kl!r}")
        if self.max_nll_rise is not None and not math.isfinite(self.max_nll_rise):
            raise FeatsteerError(f"max_nll_rise must be a finite number of nats per token (or None for no bound), got {self.max_nll_rise}")

    def directions(self, method: str, rank: int = 2) -> DirectionResult:
        """Find (once) and select the direction for a direction method on the training prompts."""
        key = f"{method}:{rank}" if method == "svd" else method
        self._used_directions.add(key)
        if key not in self._directions:
            config = DirectionConfig(**{**asdict(self.direction_config), "method": method, "rank": rank})
            self._directions[key] = find_refusal_direction(self.model, self.harmful, self.harmless, config, val=self.val,
                                                           keep_activations=True, reuse=self._captured())
        return self._directions[key]

    def _captured(self) -> DirectionResult | None:
        """A direction result whose training activations every direction method and LEACE share (one capture)."""
        return next((result for result in self._directions.values() if result.activations is not None), None)

    def feature_ranking(self) -> SaeRanking:
        """Rank (once) every SAE feature on the training prompts the direction methods use.

        One capture per prompt set at every SAE hook, at `sae_config.positions` (default: the direction
        config's positions; the captured rows are pooled).

        Raises:
            FeatsteerError: if the context has no SAEs.
        """
        if not self.saes:
            raise FeatsteerError("SAE methods need SAEs: pass saes= to compare (CLI: --sae organism|DIR)")
        if self._ranking is None:
            config = self.direction_config
            harmful_train, harmless_train = self.training()
            positions = self.sae_config.positions or config.positions
            self._ranking = rank_sae_features(self.model, self.saes, harmful_train, harmless_train, positions=positions,
                                              batch_size=config.batch_size, system=self.system)
        return self._ranking

    def writing_heads(self) -> list[tuple[int, int, float]]:
        """Rank (once) the heads that write the chosen DIM direction more on harmful training prompts
        (`DirectionResult.writing_heads`), which both head methods read."""
        dim = self.directions("dim")  # read whether or not the ranking is an earlier run's
        if self._writing_heads is None:
            self._writing_heads = dim.writing_heads(self.model, batch_size=self.direction_config.batch_size)
        return self._writing_heads

    def gate(self) -> Gate:
        """Fit (once) the CAST gate of `dim_conditional_ablation_hook`: on the training prompts, at each layer's input up to
        the chosen DIM direction's layer, pooled over the prompt or at its last token; the hook and pooling that separate
        the validation prompts best (`interventions.fit_gate`)."""
        dim = self.directions("dim")
        if self._gate is None:
            hooks = gate_hooks(self.model, dim.selection.chosen.hook)
            self._gate = fit_gate(self.model, *self.training(), hooks, val=self.validation(), batch_size=self.direction_config.batch_size,
                                  system=self.system)
        return self._gate

    def optimized(self) -> OptimizedDirection:
        """Train (once) the direction of `dim_optimized_abliteration` from the chosen DIM direction with
        `optimize_config`; the conditional method that gates it reads the same training run."""
        dim = self.directions("dim")
        if self._optimized is None:
            from featsteer.directions.optimize import optimize_direction

            self._optimized = optimize_direction(self.model, dim, self.optimize_config)
        return self._optimized

    def leace_erasers(self) -> dict:
        """Fit (once) a LEACE eraser per layer's `direction_config.kind` hook and position on the training prompts,
        from the activations the direction methods captured (after the train filter, when it is on)."""
        if self._erasers is None:
            from featsteer.interventions import fit_leace_erasers

            captured = self._captured()  # a direction method's capture when one ran; else the same capture, without a selection
            acts = captured.activations if captured else capture_training(self.model, *self._split_training(), self.direction_config)[1]
            self._erasers = fit_leace_erasers(*acts)
        return self._erasers

    def training(self) -> tuple[PromptSet, PromptSet]:
        """The harmful and harmless prompts every method learns from: the directions are fitted, the SAE features ranked,
        the CAST gate fitted, expert routing counted and the template tokens found on them. With
        `direction_config.filter_train` they are the prompts the train filter keeps (read from a direction method's result,
        or filtered once here), so no method reads a prompt the directions left out."""
        harmful, harmless = self._split_training()
        if not self.direction_config.filter_train:
            return harmful, harmless
        if self._filtered is None:
            captured = self._captured()
            kept = captured.train if captured else filter_by_refusal(self.model, harmful, harmless, self.direction_config.batch_size,
                                                                     self.system)[:2]
            self._filtered = (kept[0], kept[1])
        return self._filtered

    def _split_training(self) -> tuple[PromptSet, PromptSet]:
        """The training prompts before the train filter: the whole sets with explicit validation prompts, else all but the
        held-out last `direction_config.val_fraction`."""
        if self.val is not None:
            return self.harmful, self.harmless
        fraction = self.direction_config.val_fraction
        return split(self.harmful, fraction)[0], split(self.harmless, fraction)[0]

    def validation(self) -> tuple[list[str], list[str]]:
        """The validation prompts every pick reads: the first `n_pick` (default `direction_config.n_select`, as the
        direction selection reads them) of each validation set (explicit, or the held-out part of the training
        prompts). Never ranked on, never evaluated on."""
        n = self.n_pick or self.direction_config.n_select
        harmful, harmless = self.validation_sets()
        return list(harmful)[:n], list(harmless)[:n]

    def validation_sets(self) -> tuple[PromptSet, PromptSet]:
        """The whole validation sets (explicit, or the held-out part of the training prompts)."""
        if self.val is not None:
            return self.val
        fraction = self.direction_config.val_fraction
        return split(self.harmful, fraction)[1], split(self.harmless, fraction)[1]

    def validation_base(self) -> Tensor | ResponseBase:
        """What the picks' KL is measured against on the validation harmless prompts (computed once): the unedited
        model's first-token log-probs, or with `pick_kl="response"` its distributions along its own answers."""
        harmless, batch_size = self.validation()[1], self.direction_config.batch_size
        if self.pick_kl == "response":
            if self._val_response_base is None:
                direct = self.model.direct_answer_prefill(len(harmless))  # a harmony model answers without reasoning
                answers = self.model.generate_with_tokens(harmless, max_new_tokens=PICK_RESPONSE_TOKENS, keep_logits=False,
                                                          batch_size=batch_size, system=self.system, prefill=direct).token_ids
                self._val_response_base = response_base(self.model, harmless, answers, max_tokens=PICK_RESPONSE_TOKENS,
                                                        batch_size=batch_size, system=self.system, prefill=direct)
            return self._val_response_base
        if self._val_base is None:
            self._val_base = first_token_logprobs(self.model, harmless, batch_size=batch_size, system=self.system)
        return self._val_base

    def validation_answers_nll(self) -> float:
        """The unedited model's mean NLL per token of its own greedy validation harmless answers (computed once), what
        `max_nll_rise` counts from."""
        if self._val_answers_nll is None:
            gen = self.validation_generation(VALIDATION_NEW_TOKENS)
            harmless = self.validation()[1]
            answers = evaluate_set(self.model, harmless, "validation", gen, RefusalDetector(),
                                   prefill=self.model.direct_answer_prefill(len(harmless)))
            self._val_answers_nll = responses_nll(self.model, answers, gen) or 0.0
        return self._val_answers_nll

    def validation_generation(self, max_new_tokens: int, batch_size: int | None = None) -> GenerationConfig:
        """The greedy decoding a pick's validation generates with: `max_new_tokens`, `batch_size` (default the direction
        config's), and the evaluation's system prompt."""
        return GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size or self.direction_config.batch_size,
                                system=self.system)

    def note(self, **details: Any) -> None:
        """Record what the running method used (hook, features, edits); kept in its `MethodResult.details`."""
        self._notes.update(details)

    def details(self) -> dict[str, Any]:
        """A copy of what has been noted so far (`note`), e.g. for an exported edit's provenance."""
        return dict(self._notes)


Method = Callable[[CompareContext], contextlib.AbstractContextManager]
"""A method returns a context manager under which the model is intervened on (hooks or an edit)."""


@dataclass(frozen=True)
class _Registered:
    fn: Method
    description: str
    needs_saes: bool
    needs_input_norms: bool = False
    needs_experts: bool = False
    needs_heads: bool = False
    needs_biases: bool = False
    needs_template: bool = False


_METHODS: dict[str, _Registered] = {}


def register_method(name: str, description: str, *, needs_saes: bool = False, needs_input_norms: bool = False,
                    needs_experts: bool = False, needs_heads: bool = False, needs_biases: bool = False,
                    needs_template: bool = False) -> Callable[[Method], Method]:
    """Decorator adding a method to the comparison (probe and SAE methods are added this way).

    Args:
        name: method name (key in results and `--methods`).
        description: one line for reports and `featsteer compare --list`.
        needs_saes: the method reads `ctx.saes`; it runs by default only when SAEs are given.
        needs_input_norms: the method acts on `ln1`/`ln2.hook_normalized`; it does not run on models whose branches
            read the stream itself (OLMo 2, EXAONE 4).
        needs_experts: the method changes expert routing; it runs only on mixture-of-experts models (`model.moe_layers`).
        needs_heads: the method reads what single attention heads write into the stream; it does not run on models
            that normalise the attention output before the stream (`model.post_norms`), where heads do not add up.
        needs_biases: the method edits biases that add a constant to the stream (`model.bias_writers()`, or those
            `model.add_biases()` creates); it does not run on models with neither (Mistral, Phi-3, post-norm families).
        needs_template: the method edits the embedding rows of the chat template's own tokens; it does not run on models
            without a chat template or an editable token embedding.
    """

    def wrap(fn: Method) -> Method:
        _METHODS[name] = _Registered(fn, description, needs_saes, needs_input_norms, needs_experts, needs_heads, needs_biases, needs_template)
        return fn

    return wrap


def available_methods(saes: bool = True, model: ModelAdapter | None = None) -> dict[str, str]:
    """Registered method names and descriptions (without the SAE methods when `saes` is False, and without the methods
    whose requirement `model` does not meet: `_MODEL_NEEDS`, e.g. the expert-routing methods on a dense model)."""
    lacking = set() if model is None else {flag for flag, meets, _ in _MODEL_NEEDS if not meets(model)}
    return {name: entry.description for name, entry in _METHODS.items()
            if (saes or not entry.needs_saes) and not any(getattr(entry, flag) for flag in lacking)}


def _has_biases(model: ModelAdapter) -> bool:
    """Whether the model has biases that add a constant to the stream, or a config switch that gives it some."""
    return bool(model.bias_writers()) or model.bias_switch() is not None


def _has_template(model: ModelAdapter) -> bool:
    """Whether the model has a chat template (whose own tokens mark a prompt's end) and a token embedding to edit."""
    return model.format_prompts(["x"])[0].uses_chat_template and any(w.kind == "embed" for w in model.residual_writers())


def _additive_heads(model: ModelAdapter) -> bool:
    return not model.post_norms and bool(model.attention_layers)


_MODEL_NEEDS: tuple[tuple[str, Callable[[ModelAdapter], bool], str], ...] = (
    ("needs_experts", lambda model: bool(model.moe_layers),
     "switch experts off, and {family} has no mixture-of-experts layers whose routing featsteer can read"),
    ("needs_heads", _additive_heads,
     "edit single attention heads, and {family} normalises the attention output before the stream (its heads' writes do not add up)"),
    ("needs_input_norms", lambda model: model.input_norms,
     "steer the normalised attention and MLP inputs, which {family} does not have (its branches read the stream itself)"),
    ("needs_biases", _has_biases,
     "edit biases that add a constant to the stream, and {name} has none (no biases and no config switch for them, or a norm after each branch)"),
    ("needs_template", _has_template,
     "edit the chat template's own tokens, and {name} has no chat template (or no token embedding to edit)"),
)
"""`(_Registered flag, does the model meet it, why not)`: what a method may need of the model, checked in this order."""


def _check_methods(names: Sequence[str], have_saes: bool, model: ModelAdapter) -> None:
    if not names:
        raise FeatsteerError("no methods named: give at least one (or leave methods unset for every available one)")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise FeatsteerError(f"method(s) {', '.join(repeated)} named twice: name each once")
    unknown = [n for n in names if n not in _METHODS]
    if unknown:
        raise FeatsteerError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(_METHODS)}")
    need = [n for n in names if _METHODS[n].needs_saes]
    if need and not have_saes:
        raise FeatsteerError(f"method(s) {', '.join(need)} need SAEs: pass saes= to compare (CLI: --sae organism|DIR)")
    for flag, meets, why in _MODEL_NEEDS:
        needing = [n for n in names if getattr(_METHODS[n], flag)]
        if needing and not meets(model):
            raise FeatsteerError(f"method(s) {', '.join(needing)} {why.format(family=model.family, name=model.name)}: leave them out")


def method_context(ctx: CompareContext, name: str) -> contextlib.AbstractContextManager:
    """The context manager under which method `name` intervenes on `ctx.model` (nothing happens until entered
    for hook methods; weight edits are applied on entry and reverted on exit).

    Raises:
        FeatsteerError: for an unknown method, or an SAE method on a context without SAEs.
    """
    _check_methods([name], bool(ctx.saes), ctx.model)
    return _METHODS[name].fn(ctx)


@contextlib.contextmanager
def _edit(ctx: CompareContext, method: str, config: EditConfig, rank: int = 2) -> Iterator[None]:
    result = ctx.directions(method, rank)
    with apply_edit(ctx.model, result.chosen_basis, config, weighted=True):  # ridge-weighted for svd
        yield


@register_method("none", "the unmodified model")
def _none(ctx: CompareContext):
    return contextlib.nullcontext()


@register_method("dim_abliteration", "DIM direction orthogonalised out of every residual writer (baseline)")
def _dim(ctx: CompareContext):
    return _edit(ctx, "dim", EditConfig())


@register_method("dim_ablation_hook", "DIM direction ablated from every residual write at run time")
def _dim_hook(ctx: CompareContext):
    return steer(ctx.model, Ablate(ctx.directions("dim").chosen_basis))


@register_method("dim_conditional_ablation_hook", "CAST-gated DIM ablation (Lee et al. 2024): the direction ablated from every residual "
                 "write only for prompts a gate reads as harmful, decided in a pre-pass of the prompt (gate fitted on the training "
                 "prompts at a layer up to the direction's, its layer and pooling picked on validation prompts)")
def _dim_conditional_hook(ctx: CompareContext):
    gate = ctx.gate()
    ctx.note(setting=_note_gate(ctx, gate))
    return steer(ctx.model, gate.ablate(ctx.model, ctx.directions("dim").chosen_basis))


def _note_gate(ctx: CompareContext, gate: Gate) -> str:
    """Note the gate and its validation firing rates (known from its fitting on `ctx.validation()`); its setting label."""
    ctx.note(gate=gate.to_dict(), gate_fires_val=gate.val_fires)
    return f"{gate.hook.removesuffix('.hook_resid_pre')} {gate.pool}"


@register_method("dim_reflection", "DIM direction reflected in every residual writer (W - 2 r r^T W: every write's component along it "
                 "changes sign, OBLITERATUS's inverted mode)")
def _dim_reflection(ctx: CompareContext):
    return _edit(ctx, "dim", EditConfig.reflection(ctx.model.n_layers))


@register_method("dim_norm_preserving", "DIM abliteration keeping each write column's norm")
def _dim_np(ctx: CompareContext):
    return _edit(ctx, "dim", EditConfig(mode="norm_preserving"))


ITERATION_PASSES: tuple[int, ...] = (1, 2, 3, 4)
"""How many directions of iterative refinement `dim_iterative_abliteration` tries on the validation prompts."""


@register_method("dim_iterative_abliteration", "iterative refinement: with the DIM direction edited out, the harmful-minus-harmless mean "
                 "difference left at its hook is the next direction, and so on; all of them orthogonalised out of every residual "
                 "writer, how many passes (1-4) picked on validation prompts")
def _dim_iterative(ctx: CompareContext):
    from featsteer.pipeline import iterated_basis

    found = iterated_basis(ctx.model, ctx.directions("dim"), max(ITERATION_PASSES), batch_size=ctx.direction_config.batch_size)

    @contextlib.contextmanager
    def edit(passes: float) -> Iterator[None]:
        with apply_edit(ctx.model, found.basis[: int(passes)], EditConfig()):
            yield

    passes = int(_pick_gentlest(ctx, "passes", [p for p in ITERATION_PASSES if p <= found.basis.shape[0]], edit))
    ctx.note(iteration=found.to_dict())
    return edit(passes)


@register_method("dim_optimized_abliteration", "refusal direction optimisation (Wollschläger et al. 2025): the DIM direction trained "
                 "by gradient descent so that ablating it gives the DIM-ablated model's non-refusing answers to the harmful training "
                 "prompts and keeps the unedited model's harmless answers (KL), and adding it gives refusals; orthogonalised out of "
                 "every residual writer, how many steps picked on validation prompts (0 steps: DIM)")
def _dim_optimized(ctx: CompareContext):
    found = ctx.optimized()

    @contextlib.contextmanager
    def edit(step: float) -> Iterator[None]:
        with apply_edit(ctx.model, found.snapshots[int(step)][None], EditConfig()):
            yield

    step = int(_pick_gentlest(ctx, "steps", sorted(found.snapshots), edit))
    ctx.note(optimization=found.to_dict(), cosine_with_dim=round(found.cosine(step), 4))
    return edit(step)


OPTIMIZED_METHODS: tuple[str, ...] = ("dim_optimized_abliteration", "dim_optimized_conditional_ablation_hook")
"""The methods that read `CompareContext.optimized()` (one training run between them)."""


@register_method("dim_optimized_conditional_ablation_hook", "the trained direction of dim_optimized_abliteration ablated behind "
                 "the CAST gate of dim_conditional_ablation_hook (the same training run and gate): from every residual write, "
                 "only for prompts the gate reads as harmful; how many steps picked on validation prompts, for the gated ablation")
def _dim_optimized_conditional_hook(ctx: CompareContext):
    found, gate = ctx.optimized(), ctx.gate()

    def ablation(step: float) -> contextlib.AbstractContextManager:
        return steer(ctx.model, gate.ablate(ctx.model, found.snapshots[int(step)][None]))

    step = int(_pick_gentlest(ctx, "steps", sorted(found.snapshots), ablation))
    ctx.note(optimization=found.to_dict(), cosine_with_dim=round(found.cosine(step), 4), setting=f"steps={step}, {_note_gate(ctx, gate)}")
    return ablation(step)


@register_method("dim_per_layer_abliteration", "each block's writers orthogonalised against the DIM of the stream they write into")
def _dim_per_layer(ctx: CompareContext):
    return abliterate(ctx.model, ctx.directions("dim"), EditConfig(), scope="per_layer")


@register_method("projected_abliteration", "projected DIM (harmless-mean component removed) abliteration")
def _projected(ctx: CompareContext):
    return _edit(ctx, "projected", EditConfig())


@register_method("pca_abliteration", "paired-PCA direction abliteration")
def _pca(ctx: CompareContext):
    return _edit(ctx, "pca", EditConfig())


@register_method("svd2_abliteration", "rank-2 SVD subspace (ridge-weighted) abliteration")
def _svd(ctx: CompareContext):
    return _edit(ctx, "svd", EditConfig(), rank=2)


@register_method("linear_probe_abliteration", "logistic-regression probe direction abliteration")
def _linear(ctx: CompareContext):
    return _edit(ctx, "linear", EditConfig())


@register_method("whitened_probe_abliteration", "whitened (Ledoit-Wolf) probe direction abliteration")
def _whitened(ctx: CompareContext):
    return _edit(ctx, "whitened", EditConfig())


@register_method("leace_hook", "LEACE erasure of harmful vs harmless (Belrose et al. 2023) at every layer and template position of the prompt")
def _leace(ctx: CompareContext):
    from featsteer.interventions import Erase

    erasers = ctx.leace_erasers()
    ctx.note(leace_sites=len(erasers), leace_hooks=len({hook for hook, _ in erasers}), leace_positions=sorted({p for _, p in erasers}))
    return steer(ctx.model, Erase(erasers))


INDUCE_SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
"""Multiples of the DIM mean difference `dim_actadd_induce` tries on the validation harmless prompts."""

VALIDATION_NEW_TOKENS = 16
"""Generation cap for the validation checks that pick a jailbreak method's setting (enough for a refusal opening,
and for the short-unit loops "IIII..." of a broken model). Every pick's generation (this cap, `PICK_RESPONSE_TOKENS`,
`INDUCE_VALIDATION_NEW_TOKENS`) answers directly on a harmony model (`ModelAdapter.direct_answer_prefill`): these caps
would end inside GPT-OSS's reasoning, and no option sets them."""
PICK_KLS = ("first", "response")
"""What the jailbreak picks' KL reads: the first token, or the unedited model's whole validation answers."""
PICK_RESPONSE_TOKENS = 32
"""Positions of the unedited model's validation answers the `response` pick KL reads."""

INDUCE_VALIDATION_NEW_TOKENS = 32
"""Generation cap for the validation checks that pick an induce method's setting. Longer, because an overdriven
refusal loops on a whole sentence ("I'm sorry, but I can't help withI'm sorry, but I can't help with...") and a
loop shows only once its unit has come round twice: at 16 tokens the organism's x0.5 activation addition looked
like 31 coherent refusals in 32 validation prompts, at 32 tokens 3 in 32 (the rest loop)."""


ROUND_OFF = 1e-9
"""Slack on the picks' "within the tolerance" comparisons: rates are counts over prompts, and a setting exactly one
tolerance away must stay eligible although `0.7 + 0.1 < 0.8` in floating point."""


def weakest_within(rates: Mapping[Any, float], tolerance: float) -> Any:
    """The first key (weakest setting, by the caller's order) whose rate is within `tolerance` of the highest."""
    best = max(rates.values())
    return next(key for key, rate in rates.items() if rate >= best - tolerance - ROUND_OFF)


def gentlest_within(rows: Mapping[Any, tuple[float, float]], tolerance: float) -> Any:
    """The key with the lowest KL among those whose refusal is within `tolerance` of the lowest.

    Args:
        rows: `setting -> (validation harmful refusal rate, validation harmless KL)`, in the caller's order
            (ties in KL go to the first).
        tolerance: how far above the lowest refusal rate a setting may be and still be picked.
    """
    return gentlest_ties(rows, tolerance)[0]


def gentlest_ties(rows: Mapping[Any, tuple[float, float]], tolerance: float) -> list[Any]:
    """The keys `gentlest_within` could pick: those eligible (refusal within `tolerance` of the lowest) whose KL equals the
    lowest eligible KL exactly, the lowest refusal first (then the caller's order). Usually one; several when the
    settings cannot differ in KL on the validation prompts, as behind a gate that fires on none of them."""
    floor = min(refusal for refusal, _ in rows.values())
    eligible = [key for key, (refusal, _) in rows.items() if refusal <= floor + tolerance + ROUND_OFF]
    lowest = min(rows[key][1] for key in eligible)
    return sorted((key for key in eligible if rows[key][1] == lowest), key=lambda key: rows[key][0])


def jailbreak_rows(model: ModelAdapter, settings: Mapping[Any, Callable[[], contextlib.AbstractContextManager]],
                   harmful: Sequence[str], harmless: Sequence[str], base: Tensor | ResponseBase,
                   gen: GenerationConfig, answers: dict[Any, SetResult] | None = None) -> dict[Any, tuple[float, float]]:
    """`setting -> (share of harmful prompts left unanswered, KL(base || edited) on harmless)`, each setting's
    intervention entered in turn: the rows `gentlest_within` picks from. The KL is the first token's, or with a
    `ResponseBase` the KL along the unedited model's answers (`evaluation.response_kl`; its prompts are the harmless
    ones then).

    Unanswered means refused or lost in a loop (`SetResult.unanswered_rate`): a setting that breaks the model into
    "IIIII..." refuses nothing, and must not win a pick for that. A harmony model (GPT-OSS) answers directly, after the
    answer opening (`ModelAdapter.direct_answer_prefill`): the picks' short budgets would end inside its reasoning.

    Args:
        model: the model.
        settings: `setting -> zero-argument context-manager factory` applying it, in the order to try.
        harmful: validation harmful prompts.
        harmless: validation harmless prompts.
        base: the unedited model's first-token log-probs on `harmless`, or its `response_base` on them.
        gen: decoding for the refusal check (its `batch_size` and `max_batch_tokens` also batch the KL prefill, and its
            `system` formats the harmless prompts the first-token KL reads, as it must have formatted `base`'s).
        answers: a dict to fill with each setting's greedy answers to `harmless` (`gen`), generated while it is applied
            (so an edit is applied once per setting); the first-token KL is then read from that generation's own prefill,
            the logits `first_token_logprobs` computes in the same batches, rather than from a second forward pass.
    """
    detector, rows = RefusalDetector(), {}
    direct_harmful, direct_harmless = model.direct_answer_prefill(len(harmful)), model.direct_answer_prefill(len(harmless))
    for setting, make in settings.items():
        with make():
            unanswered = evaluate_set(model, harmful, "validation", gen, detector, prefill=direct_harmful).unanswered_rate.rate
            if isinstance(base, ResponseBase):
                kl = response_kl(model, base, batch_size=gen.batch_size).mean
                if answers is not None:
                    answers[setting] = evaluate_set(model, harmless, "validation", gen, detector, prefill=direct_harmless)
            elif answers is not None:  # the generation's prefill gives the first-token log-probs: no pass of their own
                answers[setting] = evaluate_set(model, harmless, "validation", gen, detector, keep_logprobs=True,
                                                prefill=direct_harmless)
                kl = kl_first_token(base, answers[setting].first_logprobs)
            else:
                kl = kl_first_token(base, first_token_logprobs(model, harmless, batch_size=gen.batch_size, system=gen.system,
                                                               max_batch_tokens=gen.max_batch_tokens))
        rows[setting] = (unanswered, kl)
    return rows


def pick_induce_scale(model: ModelAdapter, add: Callable[[float], contextlib.AbstractContextManager], prompts: Sequence[str],
                      scales: Sequence[float] = INDUCE_SCALES, tolerance: float = 0.05,
                      max_new_tokens: int = INDUCE_VALIDATION_NEW_TOKENS, system: str | None = None,
                      batch_size: int = GenerationConfig.batch_size) -> tuple[float, dict[float, float]]:
    """The smallest activation-addition scale whose generated refusal rate on `prompts` is within `tolerance` of
    the best scale's.

    Refusal is read from generations, not first-token logits: past some scale the organism's first token is
    still "I" but the response degenerates into "I'mI'mI'm...", which the logit proxy would score as refusal.
    Only refusals that do not loop count (`SetResult.coherent_refusal_rate`): "I'm sorryI'm sorryI'm sorry..."
    is a broken model. A harmony model (GPT-OSS) answers directly, after the answer opening (`ModelAdapter.direct_answer_prefill`).

    Args:
        model: the model.
        add: `scale -> context manager` adding the vector at that scale.
        prompts: validation harmless prompts (never the evaluation prompts).
        scales: candidate scales.
        tolerance: how far below the best rate a smaller scale may be and still win (smaller scale, lower KL).
        max_new_tokens: generation cap for the check.
        system: Optional system prompt the check formats the prompts with.
        batch_size: prompts per generation batch (in bfloat16 a batch's padding can change a greedy response, so the
            picks generate with the run's batch size, `--batch-size`).

    Returns:
        The chosen scale and the refusal rate of every scale tried.
    """
    gen, detector = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, system=system), RefusalDetector()
    rates: dict[float, float] = {}
    for scale in sorted(scales):
        with add(scale):
            rates[scale] = evaluate_set(model, prompts, "induce-scale", gen, detector,
                                        prefill=model.direct_answer_prefill(len(prompts))).coherent_refusal_rate.rate
    return weakest_within(rates, tolerance), rates


def _dim_addition(ctx: CompareContext) -> tuple[Tensor, str]:
    """The chosen DIM direction's mean difference (direction times its length) and its hook: what the induce methods add."""
    result = ctx.directions("dim")
    chosen = result.selection.chosen
    return result.candidates.bases[chosen.index, 0] * result.candidates.scores["mean_diff_norm"][chosen.index], chosen.hook


def _induce_scale(ctx: CompareContext, hook: str, add: Callable[[float], contextlib.AbstractContextManager]) -> float:
    """The scale `pick_induce_scale` picks for `add` on the validation harmless prompts; noted with every scale's rate."""
    scale, rates = pick_induce_scale(ctx.model, add, ctx.validation()[1], tolerance=ctx.steering_config.tolerance, system=ctx.system,
                                     batch_size=ctx.direction_config.batch_size)
    ctx.note(induce_hook=hook, induce_scale=scale, induce_val_refusal={str(k): v for k, v in rates.items()}, setting=f"x{scale:g}")
    return scale


@register_method("dim_actadd_induce", "DIM mean difference added at its layer, scale picked on validation prompts (induces refusal)")
def _induce(ctx: CompareContext):
    vector, hook = _dim_addition(ctx)

    def add(scale: float) -> contextlib.AbstractContextManager:
        return steer(ctx.model, AddDirection(vector, scale, where=hook))

    return add(_induce_scale(ctx, hook, add))


@register_method("dim_bias_induce", "the addition of dim_actadd_induce made a weight edit: written into the biases before its layer "
                 "(an MLP output bias, one a config switch creates such as Llama's mlp_bias, or Qwen2-style attention value biases "
                 "spread over earlier layers), scale picked on validation prompts (induces refusal)", needs_biases=True)
def _bias_induce(ctx: CompareContext):
    vector, hook = _dim_addition(ctx)

    def add(scale: float) -> EditHandle:  # what the biases before an early layer cannot write is left out, and noted
        return add_through_biases(ctx.model, scale * vector, hook, exact=False)

    handle = add(_induce_scale(ctx, hook, add))
    edit = handle.record["edit"]
    ctx.note(bias_writers=handle.record["bias_writers"], exact_at_hook=edit["exact_at_hook"], missed=edit["missed"])
    return handle


@register_method("dim_template_induce", "the addition of dim_actadd_induce made a weight edit at the prompt's end only: added to the "
                 "embedding rows of the chat template's own tokens (the last one its tail has that occurs nowhere else in the "
                 "prompts, e.g. <|assistant|>), scale picked on validation prompts (induces refusal)", needs_template=True)
def _template_induce(ctx: CompareContext):
    vector, hook = _dim_addition(ctx)
    tokens = template_tokens(ctx.model, [*ctx.training()[1]], system=ctx.system)

    def add(scale: float) -> EditHandle:
        return add_at_tokens(ctx.model, scale * vector, tokens)

    handle = add(_induce_scale(ctx, hook, add))
    ctx.note(template_tokens=handle.record["edit"]["tokens"])
    return handle


def _affine_edits(ctx: CompareContext) -> Callable[[float], AffineEdit]:
    """`alpha -> AffineEdit` along the chosen DIM direction at every captured hook, each with its own layer's class
    means (the training activations at the chosen position), which are computed once here."""
    result = ctx.directions("dim")
    harmless, harmful = result.affine_references()
    direction = result.candidates.bases[result.selection.chosen.index, 0]
    return lambda alpha: AffineEdit(direction, harmless, harmful, alpha)


def _angular_steers(ctx: CompareContext, norms: bool = False) -> Callable[[float], AngularSteer]:
    """`degrees -> AngularSteer` in the plane of the chosen DIM direction and its main change across layers, at every
    captured hook, or with `norms` at the normalised attention and MLP inputs of the same layers (the plane is computed
    once here)."""
    from featsteer.directions import rotation_plane

    result = ctx.directions("dim")
    plane = rotation_plane(result.candidates, result.selection.chosen.index)
    hooks, adaptive = list(result.activations[1].hook_names), ctx.steering_config.adaptive
    if norms:
        layers = sorted({ctx.model.hook_site(name).layer for name in hooks})
        hooks = ctx.model.hook_names(NORM_KINDS, layers)
    return lambda degrees: AngularSteer(plane, degrees, where=hooks, adaptive=adaptive)


def _validation_rows(ctx: CompareContext, settings: Mapping[Any, Callable[[], contextlib.AbstractContextManager]],
                     name: Callable[[Any], str] = str) -> dict[Any, tuple[float, float]]:
    """`jailbreak_rows` on the context's validation prompts, with the validation decoding every pick uses; `name` labels
    a setting in the coherence bound's notes."""
    val_harmful, val_harmless = ctx.validation()
    gen = ctx.validation_generation(VALIDATION_NEW_TOKENS)
    if ctx.max_nll_rise is None:
        return jailbreak_rows(ctx.model, settings, val_harmful, val_harmless, ctx.validation_base(), gen)
    floor, answers = ctx.validation_answers_nll(), {}
    rows = jailbreak_rows(ctx.model, settings, val_harmful, val_harmless, ctx.validation_base(), gen, answers=answers)
    nlls = {setting: responses_nll(ctx.model, result, gen) for setting, result in answers.items()}  # scored unedited
    broken = {s for s, nll in nlls.items() if nll is not None and nll > floor + ctx.max_nll_rise}
    # a ruled-out setting enters the pick as unanswered 1.0; what it measured is kept beside, so no figure is lost
    ctx.note(validation_base_nll={"unedited": floor, **{name(s): nll for s, nll in nlls.items()}}, max_nll_rise=ctx.max_nll_rise,
             incoherent=[name(s) for s in nlls if s in broken],
             incoherent_measured={name(s): {"unanswered_harmful": rows[s][0], "kl_harmless": rows[s][1]} for s in nlls if s in broken})
    return {s: (1.0 if s in broken else refusal, kl) for s, (refusal, kl) in rows.items()}


RULED_OUT = "coherence bound"
"""What a noted validation row's `ruled_out` names: the pick's coherence bound (`CompareContext.max_nll_rise`)."""


def _validation_table(ctx: CompareContext, rows: Mapping[Any, tuple[float, float]], name: Callable[[Any], str]) -> dict[str, dict[str, Any]]:
    """Each setting's noted validation row, `{name(setting): {"unanswered_harmful": ..., <the pick's KL>: ...}}`, as measured.
    A setting the coherence bound ruled out enters the pick as unanswered 1.0 (`_validation_rows`); its row keeps what it
    measured and says why it could not win (`"ruled_out": RULED_OUT`), rather than record that 1.0 as if every validation
    harmful prompt had gone unanswered."""
    measured = ctx.details().get("incoherent_measured") or {}
    table: dict[str, dict[str, Any]] = {}
    for setting, (unanswered, kl) in rows.items():
        label = name(setting)
        if label in measured:
            table[label] = {"unanswered_harmful": measured[label]["unanswered_harmful"], _pick_kl_key(ctx): kl, "ruled_out": RULED_OUT}
        else:
            table[label] = {"unanswered_harmful": unanswered, _pick_kl_key(ctx): kl}
    return table


def _break_tie(ctx: CompareContext, ties: Sequence[Any], rows: Mapping[Any, tuple[float, float]],
               make: Callable[[Any], contextlib.AbstractContextManager], name: Callable[[Any], str]) -> Any:
    """The first of `ties` (`gentlest_ties`), or when several share its validation refusal rate too, the one whose
    validation harmful prompts are furthest from a refusal: the lowest mean first-token refusal log-odds (the selection's
    refusal score), each tied setting applied again to read it. Noted as `tie_break` when it runs."""
    tied = [key for key in ties if rows[key][0] == rows[ties[0]][0]]
    if len(tied) < 2:
        return ties[0]
    tokens, harmful = RefusalTokens.for_tokenizer(ctx.model.tokenizer), ctx.validation()[0]
    scores = {}
    for key in tied:
        with make(key):
            logprobs = first_token_logprobs(ctx.model, harmful, batch_size=ctx.direction_config.batch_size, system=ctx.system)
        scores[key] = float(refusal_score(logprobs, tokens).mean())
    chosen = min(tied, key=lambda key: scores[key])
    ctx.note(tie_break={"rule": "lowest mean refusal score on the validation harmful prompts among settings tied in refusal and KL",
                        "scores": {name(key): round(score, 4) for key, score in scores.items()}, "chosen": name(chosen)})
    return chosen


def _pick_kl_key(ctx: CompareContext) -> str:
    """The name a pick's validation KL is noted under: which KL it is."""
    return "kl_response_harmless" if ctx.pick_kl == "response" else "kl_harmless"


def _pick_gentlest(ctx: CompareContext, label: str, values: Sequence[float], make: Callable[[float], contextlib.AbstractContextManager]) -> float:
    """The value `gentlest_within` picks on the validation prompts (the only one when there is one); noted."""
    if len(values) > 1:
        rows = _validation_rows(ctx, {v: (lambda v=v: make(v)) for v in values}, name=lambda v: f"{label}={v:g}")
        chosen = _break_tie(ctx, gentlest_ties(rows, ctx.steering_config.tolerance), rows, make, lambda v: f"{label}={v:g}")
        ctx.note(validation=_validation_table(ctx, rows, lambda v: f"{label}={v:g}"))
    else:
        chosen = values[0]
    ctx.note(setting=f"{label}={chosen:g}")
    return chosen


HEAD_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
"""How many of the heads that write the DIM direction most `dim_head_abliteration` and `head_ablation_hook` try on the
validation prompts, and then every head that writes it more on the harmful prompts."""


@register_method("dim_head_abliteration", "DIM direction orthogonalised out of only the attention heads that write it most on the "
                 "harmful training prompts (each head's columns of its output projection), how many heads picked on validation prompts",
                 needs_heads=True)
def _dim_head_abliteration(ctx: CompareContext):
    @contextlib.contextmanager
    def edit(result: DirectionResult, heads: dict[int, list[int]]) -> Iterator[None]:  # applied on entry, like every edit method
        with abliterate(ctx.model, result, EditConfig(), heads=heads):
            yield

    return _pick_heads(ctx, edit)


@register_method("head_ablation_hook", "the attention heads that write the DIM direction most on the harmful training prompts switched off "
                 "(their outputs zeroed at hook_z), how many heads picked on validation prompts", needs_heads=True)
def _head_ablation(ctx: CompareContext):
    return _pick_heads(ctx, lambda result, heads: steer(ctx.model, HeadAblate(heads)))


def _pick_heads(ctx: CompareContext, intervene: Callable[[DirectionResult, dict[int, list[int]]], contextlib.AbstractContextManager]):
    """The heads that write the chosen DIM direction most more on harmful training prompts, ranked; `intervene` on the
    top n, n picked on the validation prompts from `HEAD_COUNTS` and every such head."""
    result = ctx.directions("dim")
    ranked = ctx.writing_heads()
    if not ranked:
        raise FeatsteerError("no attention head writes the DIM direction more on the harmful training prompts than on the harmless ones")
    counts = sorted({n for n in HEAD_COUNTS if n < len(ranked)} | {len(ranked)})  # the last: every head that writes it more
    n = int(_pick_gentlest(ctx, "heads", counts, lambda n: intervene(result, heads_of(ranked[: int(n)]))))
    ctx.note(heads={str(layer): ids for layer, ids in heads_of(ranked[:n]).items()},
             top_heads=[{"layer": layer, "head": head, "difference": round(d, 4)} for layer, head, d in ranked[:8]],
             heads_writing_more_on_harmful=len(ranked))
    return intervene(result, heads_of(ranked[:n]))


EXPERT_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
"""How many harmful-linked experts `expert_deactivation` tries switching off on the validation prompts."""


@register_method("expert_deactivation", "SteerMoE-style (Fayyaz et al. 2025): the experts the harmful training prompts are routed to more "
                 "often than the harmless ones switched off (weight zero, the rest renormalised), how many picked on validation "
                 "prompts (mixture-of-experts models only)", needs_experts=True)
def _expert_deactivation(ctx: CompareContext):
    return _deactivate_experts(ctx, "routing")


@register_method("expert_deactivation_logits", "SteerMoE exactly: the same experts' router logits set below every other, so the router "
                 "picks the next expert in their place; how many picked on validation prompts (mixture-of-experts models only)",
                 needs_experts=True)
def _expert_deactivation_logits(ctx: CompareContext):
    return _deactivate_experts(ctx, "router_logits")


def _deactivate_experts(ctx: CompareContext, at: str):
    """The harmful-linked experts switched off at `at` (`ExpertSteer`), how many picked on the validation prompts."""
    harmful, harmless = ctx.training()
    routing = expert_routing(ctx.model, list(harmful), list(harmless), batch_size=ctx.direction_config.batch_size, system=ctx.system)
    linked = [score for score in routing.ranked("harmful") if score.risk_difference > 0]
    if not linked:
        raise FeatsteerError("no expert is routed more often on the harmful training prompts than on the harmless ones")
    counts = [n for n in EXPERT_COUNTS if n < len(linked)] + [min(len(linked), EXPERT_COUNTS[-1])]
    counts = sorted(set(counts))
    picked = ctx.model.experts_per_token
    if at == "router_logits" and picked:  # the router still picks `picked` per token: more off than the rest cannot be had
        counts = [n for n in counts if max(map(len, routing.top(n).values())) <= ctx.model.n_experts - picked] or counts[:1]

    def make(n: float) -> contextlib.AbstractContextManager:
        return steer(ctx.model, ExpertSteer(deactivate=routing.top(int(n)), at=at))

    chosen = int(_pick_gentlest(ctx, "experts", counts, make))
    ctx.note(deactivated={str(layer): experts for layer, experts in routing.top(chosen).items()},
             routing_tokens={"harmful": routing.n_tokens[0], "harmless": routing.n_tokens[1]},
             top_experts=[{"layer": s.layer, "expert": s.expert, "risk_difference": round(s.risk_difference, 4)} for s in linked[:8]])
    return make(chosen)


@register_method("dim_ace_hook", "affine concept editing (Marshall et al. 2024): the DIM projection set to the harmless mean's at every "
                 "layer, alpha picked on validation prompts")
def _ace(ctx: CompareContext):
    make = _affine_edits(ctx)
    alpha = _pick_gentlest(ctx, "alpha", ctx.steering_config.choices("ace_alpha"), lambda a: steer(ctx.model, make(a)))
    edit = make(alpha)
    ctx.note(ace_alpha=alpha, ace_values=edit.values())
    return steer(ctx.model, edit)


@register_method("dim_angular_hook", "angular steering (Vu & Nguyen 2025): activations turned away from the DIM direction at every layer, "
                 "norm kept, angle picked on validation prompts")
def _angular_hook(ctx: CompareContext, norms: bool = False):
    make = _angular_steers(ctx, norms)
    degrees = _pick_gentlest(ctx, "angle", ctx.steering_config.choices("angle"), lambda d: steer(ctx.model, make(d)))
    ctx.note(angle=degrees, adaptive=ctx.steering_config.adaptive)
    return steer(ctx.model, make(degrees))


@register_method("dim_angular_norms_hook", "angular steering of each block's normalised attention and MLP inputs (after the "
                 "norm, as the paper does; the residual stream itself untouched), angle picked on validation prompts",
                 needs_input_norms=True)
def _angular_norms_hook(ctx: CompareContext):
    return _angular_hook(ctx, norms=True)


@register_method("dim_ace_induce", "affine concept editing towards the harmful mean at every layer (induces refusal), alpha picked on "
                 "validation prompts")
def _ace_induce(ctx: CompareContext):
    alphas, make = ctx.steering_config.choices("ace_induce_alpha"), _affine_edits(ctx)
    if len(alphas) > 1:
        alpha, rates = pick_induce_scale(ctx.model, lambda a: steer(ctx.model, make(a)), ctx.validation()[1], alphas,
                                         ctx.steering_config.tolerance, system=ctx.system, batch_size=ctx.direction_config.batch_size)
        ctx.note(validation={f"alpha={a:g}": {"refusal_harmless": rate} for a, rate in rates.items()})
    else:
        alpha = alphas[0]
    ctx.note(setting=f"alpha={alpha:g}", ace_alpha=alpha)
    return steer(ctx.model, make(alpha))


def _saes_at_layers(saes: Mapping[str, SAE], layers: Sequence[int] | None) -> dict[str, SAE]:
    """The SAEs at `layers` (the direction config's `--layers`; None: all), so the SAE methods rank features at the layers
    every direction method chooses among.

    Raises:
        FeatsteerError: when no SAE is at any of the layers.
    """
    from featsteer.features.scoring import hook_layer

    if layers is None:
        return dict(saes)
    kept = {hook: sae for hook, sae in saes.items() if hook_layer(hook) in layers}
    if not kept:
        raise FeatsteerError(f"--layers {','.join(map(str, sorted(set(layers))))} leaves the SAE methods no SAE: the SAEs given "
                             f"are at {', '.join(saes)}; list one of their layers, or give SAEs at the listed layers")
    if len(kept) < len(saes):
        logger.info("compare: --layers keeps the SAE methods to %s (left out: %s)", ", ".join(kept),
                    ", ".join(hook for hook in saes if hook not in kept))
    return kept


def _sae_features(ctx: CompareContext, k: int) -> tuple[str, SAE, list[int]]:
    """The top-`k` refusal features at the best feature's hook; noted in the method's results."""
    ranking = ctx.feature_ranking()
    hook, ids = ranking.best(k)
    composite = ranking.scores.for_hook(hook).metrics["composite"][: len(ids)].tolist()
    ctx.note(sae_hook=hook, sae_features=ids, sae_composite=composite)
    return hook, ctx.saes[hook], ids


def _sae_basis(ctx: CompareContext, k: int) -> Tensor:
    """Unit decoder row of the top feature (k=1) or an orthonormal basis of the top-k decoder rows (an attention SAE's
    rows as they reach the stream through the output projection)."""
    from featsteer.features import decoder_directions

    hook, sae, ids = _sae_features(ctx, k)
    return decoder_directions(sae, ids, subspace=k > 1, hook=hook, model=ctx.model).bases[0]


@contextlib.contextmanager
def _basis_edit(ctx: CompareContext, basis: Tensor, config: EditConfig) -> Iterator[None]:
    with apply_edit(ctx.model, basis, config, record=dict(ctx._notes)):
        yield


def _feature_clamp(ctx: CompareContext, multiple: float, k: int) -> contextlib.AbstractContextManager:
    """Top-k features clamped to `multiple` x their harmful maximum (0: ablated), spliced with the error term."""
    from featsteer.sae import FeatureEdit, splice_sae

    hook, sae, ids = _sae_features(ctx, k)
    maxima = ctx.feature_ranking().harmful_max[hook]
    edits = [FeatureEdit.ablate(ids)] if multiple == 0 else [FeatureEdit.clamp(f, multiple * float(maxima[f])) for f in ids]
    ctx.note(sae_edits=[edit.to_dict() for edit in edits])
    return splice_sae(ctx.model, sae, edits, hook=hook, positions=ctx.sae_config.clamp_positions)


def _setting_label(k: int, multiple: float | None) -> str:
    return f"k={k}" if multiple is None else f"k={k}, x{multiple:g}"


def _pick_jailbreak(ctx: CompareContext, settings: Sequence[tuple[int, float | None]],
                    make: Callable[[int, float | None], contextlib.AbstractContextManager]) -> tuple[int, float | None]:
    """The setting `gentlest_within` picks on the validation prompts (the only one when there is one); noted."""
    if len(settings) == 1:
        return settings[0]
    rows = _validation_rows(ctx, {setting: (lambda setting=setting: make(*setting)) for setting in settings}, name=lambda s: _setting_label(*s))
    chosen = _break_tie(ctx, gentlest_ties(rows, ctx.sae_config.tolerance), rows, lambda s: make(*s), lambda s: _setting_label(*s))
    ctx.note(sae_validation=_validation_table(ctx, rows, lambda s: _setting_label(*s)))
    return chosen


def _clamp_write_norm(ctx: CompareContext, k: int, multiple: float) -> float:
    """How strong a clamp of the top `k` features to `multiple` times their harmful maximum is: the norm of what the
    clamped features write at their hook (each decoder row times its clamp value, summed)."""
    hook, sae, ids = _sae_features(ctx, k)
    maxima = ctx.feature_ranking().harmful_max[hook]
    values = torch.tensor([multiple * float(maxima[f]) for f in ids], dtype=torch.float64)
    return float((values @ sae.W_dec.detach()[ids].double()).norm())


def _pick_induce(ctx: CompareContext, settings: Sequence[tuple[int, float]]) -> tuple[int, float]:
    """The weakest (k, multiple), by the norm of what its clamp writes (`_clamp_write_norm`), whose validation harmless
    refusal is within tolerance of the best; noted, weakest first. Sorted `(k, multiple)` is no order of strength:
    (1, x2) came before (2, x0.5), which writes far less."""
    if len(settings) == 1:
        return settings[0]
    val_harmless = ctx.validation()[1]
    gen, detector = ctx.validation_generation(INDUCE_VALIDATION_NEW_TOKENS), RefusalDetector()
    strength = {setting: _clamp_write_norm(ctx, *setting) for setting in settings}
    rates: dict[tuple[int, float], float] = {}
    for k, multiple in sorted(settings, key=lambda setting: (strength[setting], setting)):
        with _feature_clamp(ctx, multiple, k):
            rates[(k, multiple)] = evaluate_set(ctx.model, val_harmless, "sae-validation", gen, detector,
                                                prefill=ctx.model.direct_answer_prefill(len(val_harmless))).coherent_refusal_rate.rate
    chosen = weakest_within(rates, ctx.sae_config.tolerance)
    ctx.note(sae_validation={_setting_label(*key): {"refusal_harmless": rate, "clamp_norm": strength[key]} for key, rate in rates.items()})
    return chosen


def _picked(ctx: CompareContext, k: int, multiple: float | None) -> None:
    """Record the chosen setting (after the search, whose notes name other feature sets)."""
    ctx.note(setting=_setting_label(k, multiple), sae_top_k=k, **({} if multiple is None else {"sae_multiple": multiple}))


@register_method("sae_top1_abliteration", "decoder row of the top SAE feature orthogonalised out of every residual writer",
                 needs_saes=True)
def _sae_top1(ctx: CompareContext):
    return _basis_edit(ctx, _sae_basis(ctx, 1), EditConfig())


@register_method("sae_topk_abliteration", "span of the top-k SAE decoder rows (best layer) orthogonalised out of every writer; "
                 "k picked on validation prompts", needs_saes=True)
def _sae_topk(ctx: CompareContext):
    return _basis_edit(ctx, sae_topk_basis(ctx), EditConfig())


def sae_topk_basis(ctx: CompareContext) -> Tensor:
    """The basis `sae_topk_abliteration` projects out: the top-k decoder rows at the best feature's hook (an
    orthonormal basis; the unit row for k = 1), with k fixed by `ctx.sae_config.top_k` or picked on the validation
    prompts (`gentlest_within`). The hook, features, validation rows and the pick are noted (`ctx.details()`).

    Raises:
        FeatsteerError: if the context has no SAEs, or no feature leans harmful.
    """
    k, _ = _pick_jailbreak(ctx, [(k, None) for k in ctx.sae_config.ks()],
                           lambda k, _: _basis_edit(ctx, _sae_basis(ctx, k), EditConfig()))
    _picked(ctx, k, None)
    return _sae_basis(ctx, k)


@register_method("sae_clamp_hook", "top-k SAE refusal features clamped at their layer (SAE spliced with error term); "
                 "k and clamp value picked on validation prompts", needs_saes=True)
def _sae_clamp(ctx: CompareContext):
    config = ctx.sae_config
    k, multiple = _pick_jailbreak(ctx, [(k, m) for k in config.ks() for m in config.clamps()], lambda k, m: _feature_clamp(ctx, m, k))
    _picked(ctx, k, multiple)
    return _feature_clamp(ctx, multiple, k)


@register_method("sae_top1_ablation_hook", "decoder row of the top SAE feature ablated from every residual write at run time",
                 needs_saes=True)
def _sae_top1_hook(ctx: CompareContext):
    return steer(ctx.model, Ablate(_sae_basis(ctx, 1)))


@register_method("sae_topk_induce", "top-k SAE refusal features clamped to a multiple of their harmful maximum (induces refusal); "
                 "k and multiple picked on validation prompts", needs_saes=True)
def _sae_induce(ctx: CompareContext):
    config = ctx.sae_config
    k, multiple = _pick_induce(ctx, [(k, m) for k in config.ks() for m in config.induces()])
    _picked(ctx, k, multiple)
    return _feature_clamp(ctx, multiple, k)


@dataclass(frozen=True)
class MethodResult:
    """Metrics of one method on the evaluation prompts."""

    method: str
    description: str
    refusal_harmful: float
    refusal_harmless: float
    ci_harmful: tuple[float, float]
    ci_harmless: tuple[float, float]
    kl_harmless: float
    kl_harmless_answered: float | None
    """Mean first-token KL over the harmless prompts the unedited model answers (see `kl_answered`); None when
    it refuses all of them."""
    refusal_score_harmful: float
    refusal_score_harmless: float
    over_refusal: float | None
    seconds: float
    examples: list[dict]
    details: dict = field(default_factory=dict)
    """What the method used, when it says (SAE methods: hook, feature ids, edits)."""
    looping_harmful: float | None = None
    """Share of the harmful prompts' responses that end in repetition (`evaluation.quality.LoopDetector`): a broken
    model refuses nothing and says nothing either."""
    looping_harmless: float | None = None
    """The same on the harmless prompts."""
    base_nll_harmless: float | None = None
    """The unedited model's mean negative log-likelihood (nats per token) of this method's responses to the harmless
    prompts: how far they are from what the model would have said, over the whole response rather than its first
    token. The unedited model's own greedy responses set the floor (the `none` row)."""
    kl_response_harmless: float | None = None
    """KL(base || method) at every position of the unedited model's own harmless responses, teacher-forced
    (`evaluation.response_kl`), averaged per prompt then over prompts: catches a method that leaves the first token
    alone and changes what follows, which `kl_harmless` cannot see."""
    kl_response_harmless_answered: float | None = None
    """The same over the harmless prompts the unedited model answers."""
    kl_response_by_position: list[float] | None = None
    """The response KL's mean at each position over the prompts whose response reaches it; entry 0 is the
    first-token KL (a lower bound of it: the base keeps its top tokens and lumps the rest)."""
    judge: dict | None = None
    """With `compare(..., judge=)`: the judge's refusal rates and intervals on the same responses (`refusal_harmful`,
    `refusal_harmless`, `ci_harmful`, `ci_harmless`) and its agreement with the markers per set
    (`agreement_harmful`, `agreement_harmless`: `evaluation.judge.Agreement.to_dict`)."""
    per_prompt: dict = field(default_factory=dict)
    """The verdicts and values behind the rates, in the evaluation sets' order: `refused_harmful`, `refused_harmless`,
    `unanswered_harmful` (refused or looping), `kl_harmless` (first-token KL per prompt) and `kl_response_harmless`
    (the response KL per prompt); with a judge also `judge_refused_harmful` and `judge_refused_harmless`."""
    paired: dict | None = None
    """This method against the comparison's baseline on the same prompts (`Comparison.paired_table`): McNemar's exact
    test of `refused_harmful`, `unanswered_harmful` and `refused_harmless`, and a bootstrap interval of the mean KL
    difference; None for the baseline itself."""


@dataclass(frozen=True)
class FailedMethod:
    """A method that raised its own one-line `FeatsteerError` before it was measured (e.g. no attention head writes the
    DIM direction more on harmful prompts): recorded with the error in place of metrics, and the comparison goes on."""

    method: str
    description: str
    error: str
    """The error's message: why the method cannot apply to this model or these prompts."""
    seconds: float
    details: dict = field(default_factory=dict)
    """What the method had noted before it failed."""


PAIRED_BASELINES = ("dim_abliteration", "none")
"""The first of these a comparison runs is the baseline every other method is paired against."""


def _judged(judge: RefusalJudge, harmful: SetResult, harmless: SetResult) -> tuple[dict, dict]:
    """A judge's second opinion on a method's responses: its summary, and its per-prompt verdicts."""
    from featsteer.evaluation.judge import agreement, judge_result

    summary, per_prompt = {}, {}
    for result in (harmful, harmless):
        verdicts = judge_result(judge, result)
        rate = verdicts.rate
        summary |= {f"refusal_{result.name}": rate.rate, f"ci_{result.name}": (rate.low, rate.high),
                    f"agreement_{result.name}": agreement(result.refused, verdicts.refused).to_dict()}
        per_prompt[f"judge_refused_{result.name}"] = list(verdicts.refused)
    return summary, per_prompt


def _measure(ctx: CompareContext, name: str, eval_sets: dict, base: KLBase, tokens, gen: GenerationConfig,
             along_base: ResponseBase | None = None,
             judge: RefusalJudge | None = None) -> tuple[MethodResult | FailedMethod, dict[str, list[str]] | None]:
    """One method's metrics on the evaluation sets, and its responses (`{"harmful": [...], "harmless": [...]}`); or, when
    the method raises a `FeatsteerError` while it finds its direction or picks its setting, its `FailedMethod` and None.
    Any other error, and a `FeatsteerError` of the evaluation itself, stops the comparison."""
    description = _METHODS[name].description
    detector = RefusalDetector()
    start = time.perf_counter()
    ctx._notes = {}
    with contextlib.ExitStack() as applied:
        try:  # finding directions and picking a setting may show that the method cannot apply here
            applied.enter_context(method_context(ctx, name))
        except FeatsteerError as error:
            return _failed(ctx, name, error, start), None
        start_eval = time.perf_counter()
        # first-token log-probs come from each generation's own prefill, as the base's do
        harmful = evaluate_set(ctx.model, eval_sets["harmful"], "harmful", gen, detector, keep_logprobs=True)
        harmless = evaluate_set(ctx.model, eval_sets["harmless"], "harmless", gen, detector, keep_logprobs=True)
        over = evaluate_set(ctx.model, eval_sets["alarming"], "alarming", gen, detector).rate.rate if eval_sets.get("alarming") else None
        along = None if along_base is None else response_kl(ctx.model, along_base, batch_size=gen.batch_size)
    base_nll = responses_nll(ctx.model, harmless, gen)  # the method is off again here: the unedited model reads
    judged, judged_per_prompt = _judged(judge, harmful, harmless) if judge is not None else (None, {})  # so a self-judge is unedited
    harmful_lp, harmless_lp = harmful.first_logprobs, harmless.first_logprobs
    kl, kl_answered = base.kls(harmless_lp)
    logger.info("%s: directions %.1fs, evaluation %.1fs", name, start_eval - start, time.perf_counter() - start_eval)
    result = MethodResult(
        method=name, description=description,
        refusal_harmful=harmful.rate.rate, refusal_harmless=harmless.rate.rate,
        ci_harmful=(harmful.rate.low, harmful.rate.high), ci_harmless=(harmless.rate.low, harmless.rate.high),
        kl_harmless=kl, kl_harmless_answered=kl_answered,
        refusal_score_harmful=float(refusal_score(harmful_lp, tokens).mean()),
        refusal_score_harmless=float(refusal_score(harmless_lp, tokens).mean()),
        over_refusal=over, seconds=time.perf_counter() - start,
        examples=[{**e, "set": kind} for kind, evaluated in (("harmful", harmful), ("harmless", harmless)) for e in evaluated.examples(2)],
        details=dict(ctx._notes),
        looping_harmful=harmful.looping_rate.rate, looping_harmless=harmless.looping_rate.rate, base_nll_harmless=base_nll,
        kl_response_harmless=None if along is None else along.mean,
        kl_response_harmless_answered=None if along is None or base.refused is None else along.answered(base.refused),
        kl_response_by_position=None if along is None else along.per_position.tolist(),
        per_prompt={"refused_harmful": list(harmful.refused), "refused_harmless": list(harmless.refused),
                    "unanswered_harmful": list(harmful.unanswered),
                    "kl_harmless": kl_per_prompt(base.logprobs, harmless_lp).tolist(),
                    **({} if along is None else {"kl_response_harmless": along.per_prompt.tolist()}), **judged_per_prompt},
        judge=judged,
    )
    return result, {"harmful": list(harmful.responses), "harmless": list(harmless.responses)}


def _failed(ctx: CompareContext, name: str, error: FeatsteerError, start: float) -> FailedMethod:
    """The row of a method whose own error says it cannot apply, once the model is checked to be as it was.

    Raises:
        FeatsteerError: when the failed method left the model's weights changed (the later methods would read them).
    """
    if weights_fingerprint(ctx.model) != ctx._weights:
        raise FeatsteerError(f"{name} failed ({error}) and left the model's weights changed, so no later method could be "
                             "measured on the unedited model: leave it out with --methods") from error
    logger.warning("%s failed, the comparison goes on without it: %s", name, error)
    return FailedMethod(method=name, description=_METHODS[name].description, error=str(error),
                        seconds=time.perf_counter() - start, details=dict(ctx._notes))


def _paired(results: list[MethodResult], baseline_name: str | None = None) -> list[MethodResult]:
    """Every result with its `paired` comparison against the baseline (`baseline_name`, else the first of
    `PAIRED_BASELINES` that ran), when there is one."""
    from featsteer.evaluation.paired import paired_mean_difference, paired_rates

    names = [baseline_name] if baseline_name else PAIRED_BASELINES
    baseline = next((r for name in names for r in results if r.method == name), None)
    if baseline is None:
        return results
    out = []
    for r in results:
        if r is baseline:
            out.append(r)
            continue
        a, b = baseline.per_prompt, r.per_prompt
        paired = {"baseline": baseline.method,
                  **{key: paired_rates(a[key], b[key]).to_dict() for key in ("refused_harmful", "unanswered_harmful", "refused_harmless",
                                                                              "judge_refused_harmful", "judge_refused_harmless")
                     if key in a and key in b}}
        for key in ("kl_harmless", "kl_response_harmless"):
            if key in a and key in b:
                kls = (a[key], b[key])
                paired[key] = (paired_mean_difference(*kls).to_dict() if all(math.isfinite(v) for vs in kls for v in vs) else None)
        out.append(dataclasses.replace(r, paired=paired))
    return out



COHERENCE_WARNING_NATS = 1.0
"""`Comparison.coherence_warnings` names a method whose held-out harmless answers cost the unedited model more than this
many nats per token above its own (each token about e times less likely)."""


@dataclass
class Comparison:
    """Every method's result plus the set-up they share."""

    results: list[MethodResult]
    setup: dict
    context: CompareContext | None = field(default=None, repr=False, compare=False)
    """The run's directions, LEACE erasers and validation base, for `compare(..., reuse=this)`."""
    responses: dict[str, dict[str, list[str]]] = field(default_factory=dict, repr=False)
    """`{method: {"harmful": [...], "harmless": [...]}}`: every method's greedy responses to the evaluation prompts,
    in their order, for reading or labelling them by hand. Not in `results.json` (which may be shared or committed);
    `write_report` puts them in `responses.json` next to it."""
    eval_prompts: dict[str, list[str]] = field(default_factory=dict, repr=False)
    """`{"harmful": [...], "harmless": [...]}`: the evaluation prompts the responses answer."""
    failed: list[FailedMethod] = field(default_factory=list)
    """The methods that could not apply (their own `FeatsteerError` while finding a direction or picking a setting), in
    the order they ran: not in `results`, but in the tables, the report and `results.json`'s `failed`."""

    def responses_json(self) -> dict:
        """The evaluation prompts and every method's responses, JSON-ready (`write_report`'s `responses.json`)."""
        return {"prompts": self.eval_prompts, "responses": self.responses}

    def table(self) -> str:
        """Markdown table of the headline metrics."""
        judged = any(r.judge for r in self.results)
        lines = ["| method | refusal harmful | refusal harmless | KL harmless | KL answered | KL response (all / answered) | over-refusal "
                 "| refusal score (harmful) | looping (harmful / harmless) | base NLL (harmless) |"
                 + (" judge refusal harmful / harmless (same verdict as markers) |" if judged else ""),
                 "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if judged else "")]
        for r in self.results:
            over = "-" if r.over_refusal is None else f"{r.over_refusal:.3f}"
            answered = "-" if r.kl_harmless_answered is None else f"{r.kl_harmless_answered:.4f}"
            name = f"{r.method} ({r.details['setting']})" if "setting" in r.details else r.method
            lines.append(f"| {name} | {r.refusal_harmful:.3f} | {r.refusal_harmless:.3f} | {r.kl_harmless:.4f} | {answered} "
                         f"| {_kl_cell(r.kl_response_harmless)} / {_kl_cell(r.kl_response_harmless_answered)} | {over} "
                         f"| {r.refusal_score_harmful:.2f} | {_cell(r.looping_harmful)} / {_cell(r.looping_harmless)} | {_cell(r.base_nll_harmless)} |"
                         + (f" {_judge_cell(r.judge)} |" if judged else ""))
        lines += [f"| {f.method} | failed: {_one_cell(f.error)} |" + " - |" * (8 + judged) for f in self.failed]
        return "\n".join(lines)

    def paired_table(self) -> str | None:
        """Markdown table of every method against the baseline on the same prompts (None without a baseline).

        A rate cell is the difference method minus baseline, then in brackets the prompts only the baseline counts,
        the prompts only the method counts, and McNemar's exact p; the KL cell is the mean per-prompt difference
        with its 95% paired bootstrap interval.
        """
        paired = [r for r in self.results if r.paired]
        if not paired:
            return None
        baseline = paired[0].paired["baseline"]
        judged = all("judge_refused_harmful" in r.paired for r in paired)
        lines = [f"| method | refused harmful vs {baseline} | unanswered harmful | refused harmless | KL harmless difference [95% CI] "
                 "| KL response difference [95% CI] |" + (" judge: refused harmful |" if judged else ""),
                 "|---|---|---|---|---|---|" + ("---|" if judged else "")]
        for r in paired:
            cells = [_paired_rate_cell(r.paired[key]) for key in ("refused_harmful", "unanswered_harmful", "refused_harmless")]
            kl_cells = [_paired_mean_cell(r.paired.get(key)) for key in ("kl_harmless", "kl_response_harmless")]
            judge_cell = f" {_paired_rate_cell(r.paired['judge_refused_harmful'])} |" if judged else ""
            name = f"{r.method} ({r.details['setting']})" if "setting" in r.details else r.method
            lines.append(f"| {name} | {' | '.join(cells)} | {' | '.join(kl_cells)} |{judge_cell}")
        return "\n".join(lines)

    def coherence_warnings(self, max_rise: float = COHERENCE_WARNING_NATS) -> list[str]:
        """One line per method whose held-out harmless answers the unedited model finds more than `max_rise` nats per
        token less likely than its own greedy answers (the `none` row's base NLL): a method that may be winning its
        refusal count by breaking the text. Empty without a `none` row."""
        unedited = next((r.base_nll_harmless for r in self.results if r.method == "none"), None)
        if unedited is None:
            return []
        lines = []
        for r in self.results:
            if r.method != "none" and r.base_nll_harmless is not None and r.base_nll_harmless - unedited > max_rise:
                name = f"{r.method} ({r.details['setting']})" if "setting" in r.details else r.method
                lines.append(f"{name}: the unedited model scores its harmless answers {r.base_nll_harmless:.2f} nats per token against "
                             f"{unedited:.2f} for its own; it may be breaking the text")
        return lines

    def bound_exclusions(self) -> list[str]:
        """One line per method whose pick the coherence bound (`max_nll_rise`) narrowed: the settings it ruled out, with
        the unedited model's NLL per token of their validation harmless answers against that of its own answers."""
        lines = []
        for r in self.results:
            ruled_out, nlls = r.details.get("incoherent") or [], r.details.get("validation_base_nll") or {}
            if ruled_out:
                scored = ", ".join(f"{s} ({nlls[s]:.2f})" if nlls.get(s) is not None else s for s in ruled_out)
                picked = f"; picked {r.details['setting']}" if "setting" in r.details else ""
                lines.append(f"{r.method}: the coherence bound ({r.details.get('max_nll_rise'):g} nats per token above the unedited "
                             f"{nlls.get('unedited', float('nan')):.2f}) ruled out {scored}{picked}")
        return lines

    def to_json(self) -> dict:
        """JSON-ready form."""
        return {"setup": self.setup, "results": [asdict(r) for r in self.results], "failed": [asdict(f) for f in self.failed],
                "coherence_warnings": self.coherence_warnings(), "bound_exclusions": self.bound_exclusions()}


def markdown_table_html(table: str) -> str:
    """A pipe-delimited markdown table as an HTML table (header row, separator row skipped)."""
    rows = [[html.escape(cell.strip()) for cell in line.strip().strip("|").split("|")] for line in table.splitlines() if line.strip()]
    if not rows:
        return ""
    head = "".join(f"<th>{cell}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows[2:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _judge_cell(judged: dict | None) -> str:
    """`judge refusal harmful / harmless (agreement with the markers, harmful / harmless)`."""
    if not judged:
        return "-"
    agree = [judged[f"agreement_{name}"] for name in ("harmful", "harmless")]
    return (f"{judged['refusal_harmful']:.3f} / {judged['refusal_harmless']:.3f} "
            f"({agree[0]['both'] + agree[0]['neither']}/{agree[0]['n']}, {agree[1]['both'] + agree[1]['neither']}/{agree[1]['n']})")


def _paired_rate_cell(row: dict) -> str:
    """"+0.040 (1 / 5, p 0.22)": rate difference, prompts only the baseline / only the method counts, McNemar p."""
    return f"{row['difference']:+.3f} ({row['only_a']} / {row['only_b']}, p {row['p_value']:.2g})"


def _paired_mean_cell(row: dict | None) -> str:
    """"+0.0123 [+0.0040, +0.0210]": mean paired difference and its bootstrap interval, or "-"."""
    return "-" if row is None else f"{row['difference']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]"


def _one_cell(text: str) -> str:
    """`text` made safe for one markdown table cell (no pipe, no line break)."""
    return " ".join(text.replace("|", "/").split())


def _kl_cell(value: float | None) -> str:
    """A KL cell: four decimals, or "-" when not measured."""
    return "-" if value is None else f"{value:.4f}"


def _cell(value: float | None) -> str:
    """A table cell: three decimals, or "-" when not measured."""
    return "-" if value is None else f"{value:.3f}"


def compare(
    model: ModelAdapter,
    harmful: PromptSet,
    harmless: PromptSet,
    *,
    methods: list[str] | None = None,
    eval_harmful: PromptSet | None = None,
    eval_harmless: PromptSet | None = None,
    alarming: PromptSet | None = None,
    val_harmful: PromptSet | None = None,
    val_harmless: PromptSet | None = None,
    direction_config: DirectionConfig | None = None,
    generation: GenerationConfig | None = None,
    saes: str | os.PathLike[str] | SAE | Mapping[str, SAE] | None = None,
    sae_config: SaeMethodConfig | None = None,
    steering_config: SteeringMethodConfig | None = None,
    reuse: Comparison | None = None,
    baseline: str | None = None,
    n_pick: int | None = None,
    pick_kl: str = "first",
    judge: RefusalJudge | None = None,
    max_nll_rise: float | None = DEFAULT_MAX_NLL_RISE,
    optimize_config: OptimizeConfig | None = None,
) -> Comparison:
    """Run `methods` on the same held-out prompts.

    Without explicit evaluation sets, the last quarter of each prompt set is held out for evaluation and
    the rest is used to find and select directions and to rank SAE features.

    Args:
        model: the model (restored after every method).
        harmful: harmful prompts (training part, or all of them without `eval_harmful`).
        harmless: harmless prompts (likewise).
        methods: method names (default: every registered method; the SAE methods only when `saes` is given).
        eval_harmful: held-out harmful prompts.
        eval_harmless: held-out harmless prompts.
        alarming: harmless-but-alarming prompts for the over-refusal rate.
        val_harmful: validation harmful prompts for every pick (direction selection, SAE settings, induce scale);
            with `val_harmless`, the training prompts are then used whole. Without them the last
            `direction_config.val_fraction` of the training prompts is held out; pass them when the model was
            trained on those prompts (the organism was trained on the built-in train and val splits), whose KL is
            too optimistic for selection.
        val_harmless: validation harmless prompts (given together with `val_harmful`).
        direction_config: how directions are found and selected.
        generation: greedy decoding settings for evaluation (without `prefill`: a prefilling attack is `featsteer eval`'s).
            Its `system` (or `direction_config.system`; they may not differ) formats every prompt of the run: the
            directions' training and selection, the SAE ranking, every pick's validation and the evaluation.
        saes: SAEs for the SAE methods (see `featsteer.sae.load_sae_source`: `organism`, a folder, or `{hook_name: sae}`);
            with `direction_config.layers`, only those at the listed layers.
        sae_config: how SAE methods pick and edit features (default `SaeMethodConfig()`: k and clamp values picked on the validation prompts).
        steering_config: how the ACE and angular methods pick their setting (default: picked on the validation prompts).
        reuse: an earlier comparison of the same model (its weights unchanged since), prompts and direction config: its selected directions, LEACE
            erasers and validation base are used instead of being computed again (on Qwen2.5-Coder-0.5B the DIM
            capture and selection are most of a comparison's first method), e.g. to run a method again with other
            `steering_config` or `sae_config` settings.
        baseline: the method every other one is paired against on the same prompts (`MethodResult.paired`,
            `Comparison.paired_table`); default `dim_abliteration`, else `none`, whichever runs.
        n_pick: validation prompts per set that the setting picks read (default `direction_config.n_select`); more
            than the selection's when a pick's figures on 16 prompts are too coarse (a looping rate of 1 in 5
            shows in 16 prompts only by luck).
        pick_kl: the KL the jailbreak picks weigh settings by: `first` (first-token KL) or `response` (the KL along the
            unedited model's own 32-token validation answers, `evaluation.response_kl`).
        max_nll_rise: a coherence bound for the jailbreak picks (`CompareContext.max_nll_rise`): settings whose
            validation harmless answers cost the unedited model more than this many nats per token above its own
            answers count as answering nothing (default `DEFAULT_MAX_NLL_RISE`, 0.5; None: no bound). It adds a
            generation of the validation harmless prompts per setting of the methods that pick one.
        judge: a second opinion on every method's held-out responses (`evaluation.judge`): its rates, its agreement
            with the markers, and McNemar's test of its verdicts against the baseline's. It reads the responses after
            the method is undone, so a `ChatJudge` of `model` itself judges with the unedited weights. The picks and
            the selection still count refusals with the markers.
        optimize_config: how `dim_optimized_abliteration` trains its direction (default `OptimizeConfig()`).

    Raises:
        FeatsteerError: for an unknown method, an SAE method without `saes`, SAEs that do not fit (or none at
            `direction_config.layers`), a `generation` with a prefill or a system prompt other than `direction_config`'s, or a `reuse` of another model (or of this one
            with other weights), other prompts or another direction config.
    """
    names = list(methods) if methods is not None else list(available_methods(saes=saes is not None, model=model))
    _check_methods(names, saes is not None, model)
    if baseline is not None and baseline not in names:
        raise FeatsteerError(f"baseline '{baseline}' is not among the methods run ({', '.join(names)}): add it to the methods or pick one of them")
    if (val_harmful is None) != (val_harmless is None):
        raise FeatsteerError("validation prompts need both sets: give val_harmful and val_harmless (CLI: --val-harmful and --val-harmless)")
    if (eval_harmful is None) != (eval_harmless is None):  # one alone would be dropped for the split of the training sets
        raise FeatsteerError("evaluation prompts need both sets: give eval_harmful and eval_harmless (CLI: --eval-harmful and --eval-harmless)")
    if n_pick is not None and n_pick < 2:
        raise FeatsteerError(f"n_pick must be at least 2 validation prompts per set, got {n_pick}")
    if generation is not None and generation.prefill is not None:  # it would be recorded in setup.generation, yet unused
        raise FeatsteerError(f"compare does not prefill responses (generation.prefill={generation.prefill!r}): its picks and metrics "
                             "read the model's own first token; run featsteer eval --prefill on each method's model instead")
    for name, prompts in (("harmful", val_harmful), ("harmless", val_harmless)):
        if prompts is not None and len(prompts) < 2:
            raise FeatsteerError(f"the {name} validation set has {len(prompts)} prompts: need at least 2")
    sae_map = None
    if saes is not None:
        from featsteer.sae import load_sae_source

        sae_map = load_sae_source(saes, model)
        if any(_METHODS[name].needs_saes for name in names):
            sae_map = _saes_at_layers(sae_map, (direction_config or DirectionConfig()).layers)
    if eval_harmful is None or eval_harmless is None:
        harmful, eval_harmful = split(harmful, 0.25)
        harmless, eval_harmless = split(harmless, 0.25)
    gen, direction_config = _one_system(generation or GenerationConfig(), direction_config or DirectionConfig())
    ctx = CompareContext(model, harmful, harmless, direction_config, saes=sae_map, sae_config=sae_config or SaeMethodConfig(),
                         steering_config=steering_config or SteeringMethodConfig(),
                         val=None if val_harmful is None else (val_harmful, val_harmless), n_pick=n_pick, pick_kl=pick_kl,
                         max_nll_rise=max_nll_rise, optimize_config=optimize_config or OptimizeConfig(), system=gen.system)
    ctx._weights = weights_fingerprint(model)
    if reuse is not None:
        _take_over(ctx, reuse)
    _warn_coarse_picks(ctx)
    overlap = _eval_overlap(ctx, eval_harmful, eval_harmless)
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    # the unedited model's harmless first-token distribution (the KL base) and which of those prompts it refuses
    base_harmless = evaluate_set(model, eval_harmless, "harmless", gen, RefusalDetector(), keep_logprobs=True)
    base = KLBase(base_harmless.first_logprobs, base_harmless.refused)
    # and its next-token distributions along its own harmless responses (the response KL's base)
    along = response_base(model, list(base_harmless.prompts), list(base_harmless.response_tokens), max_tokens=gen.max_new_tokens,
                          batch_size=gen.batch_size, system=gen.system)
    eval_sets = {"harmful": eval_harmful, "harmless": eval_harmless, "alarming": alarming}
    measured = {name: _measure(ctx, name, eval_sets, base, tokens, gen, along, judge) for name in names}
    failed = [result for result, _ in measured.values() if isinstance(result, FailedMethod)]
    if len(failed) == len(names):
        raise FeatsteerError("every method failed, so there is nothing to compare: "
                             + "; ".join(f"{f.method}: {f.error}" for f in failed))
    results = _paired([result for result, _ in measured.values() if isinstance(result, MethodResult)], baseline)
    setup = {
        "model": model.name, "weights_fingerprint": ctx._weights, "n_train_harmful": len(harmful), "n_train_harmless": len(harmless),
        "n_eval_harmful": len(eval_harmful), "n_eval_harmless": len(eval_harmless),
        "validation": ({"harmful": val_harmful.source, "harmless": val_harmless.source, "n_harmful": len(val_harmful),
                        "n_harmless": len(val_harmless), "harmful_sha256": val_harmful.sha256, "harmless_sha256": val_harmless.sha256}
                       if val_harmful is not None else f"last {ctx.direction_config.val_fraction:g} of the training prompts"),
        "eval_harmful_sha256": eval_harmful.sha256, "eval_harmless_sha256": eval_harmless.sha256, "eval_overlap": overlap,
        "prompts": _prompt_provenance({"train_harmful": harmful, "train_harmless": harmless, "eval_harmful": eval_harmful,
                                       "eval_harmless": eval_harmless, "alarming": alarming}),
        "generation": asdict(gen), "directions": asdict(ctx.direction_config),
        "n_pick": [len(prompts) for prompts in ctx.validation()],
        "pick_kl": ctx.pick_kl,
        "max_nll_rise": ctx.max_nll_rise,
        "chosen": {k: _chosen_setup(model, v) for k, v in ctx._directions.items() if k in ctx._used_directions},
        "steering": ctx.steering_config.to_dict(),
        **({"optimize": ctx.optimize_config.to_dict()} if set(names) & set(OPTIMIZED_METHODS) else {}),
        "response_kl": {"max_tokens": along.max_tokens, "top_k": along.top_k, "positions": sum(along.n_positions),
                        "base_tail_mass": along.tail_mass},
    }
    if judge is not None:
        checked = getattr(judge, "calibration", None)
        setup["judge"] = {"name": judge.name, "threshold": float(getattr(judge, "threshold", 0.5)),
                          "anchors": None if checked is None else checked.to_dict()}
    if sae_map is not None:
        setup["sae"] = _sae_setup(ctx)
    return Comparison(results, setup, ctx, responses={name: kept for name, (_, kept) in measured.items() if kept is not None},
                      eval_prompts={"harmful": list(eval_harmful), "harmless": list(eval_harmless)}, failed=failed)


def _prompt_provenance(sets: Mapping[str, PromptSet | None]) -> dict[str, dict[str, Any] | None]:
    """`{role: {"source", "n", "sha256", "prompts_sha256"}}` of every prompt set a comparison read (None: not given), so
    results.json says which prompts each column was measured on (the over-refusal column's too)."""
    return {role: None if prompts is None else {"source": prompts.source, "n": len(prompts), "sha256": prompts.sha256,
                                                 "prompts_sha256": prompts.prompts_sha256}
            for role, prompts in sets.items()}


def _eval_overlap(ctx: CompareContext, eval_harmful: PromptSet, eval_harmless: PromptSet) -> dict[str, int]:
    """`{"harmful": n, "harmless": n}`: evaluation prompts that are also training or validation prompts (the directions
    were fitted, or the settings picked, on them), with a warning when there are any: the table is then not held out."""
    # the train filter read every training prompt, whichever it kept
    return warn_reused_held_out((eval_harmful, eval_harmless), [ctx._split_training(), ctx.validation_sets()], "the table",
                                called="evaluation")


def _warn_coarse_picks(ctx: CompareContext) -> None:
    """Warn when the picks' tolerance is below one validation prompt: then a gentler setting that leaves a single
    more prompt unanswered can never be picked, and one prompt decides between settings far apart in KL."""
    n = min(len(prompts) for prompts in ctx.validation())
    tolerance = min(ctx.steering_config.tolerance, ctx.sae_config.tolerance)
    if 0 < tolerance < 1 / n:
        logger.warning("the picks read %d validation prompts per set, so a tolerance of %g cannot let a setting leave even one more "
                       "of them unanswered (1/%d = %.3f): read more with --n-pick (e.g. %d) or raise --pick-tolerance",
                       n, tolerance, n, 1 / n, max(64, math.ceil(1 / tolerance)))


def _sample_size_note(chosen: dict) -> str:
    """"; from 192 + 192 training prompts its expected cosine with ..." for the report, or "" without an estimate."""
    size = chosen.get("sample_size")
    if not size:
        return ""
    needed = size["needed"].get("0.99")
    needs = "" if needed is None else f"; a cosine of 0.99 needs {max(1, math.ceil(needed))} prompts per class"
    return html.escape(f"; from {size['n_harmful']} + {size['n_harmless']} training prompts its expected cosine with the direction "
                       f"of infinitely many such prompts is {size['cosine']:.4f}{needs}")


def _stability_note(chosen: dict) -> str:
    """"; chosen in 97% of 1000 bootstrap resamples of the validation prompts" for the report, or ""."""
    stability = chosen.get("selection_stability")
    return "" if not stability else html.escape(f"; chosen in {stability['chosen_share']:.0%} of {stability['n_resamples']} bootstrap "
                                                f"resamples of the validation prompts")


def _chosen_setup(model: ModelAdapter, result: DirectionResult) -> dict[str, Any]:
    """A chosen direction's selection row, with the tokens its first basis vector promotes and suppresses when the
    unembedding reads it (`directions.logit_lens`)."""
    from featsteer.directions import logit_lens

    lens = logit_lens(model, result.chosen_basis[0], k=10)
    chosen = {**result.selection.to_dict()["chosen"],
              "logit_lens": {"promoted": [t for t, _ in lens.promoted], "suppressed": [t for t, _ in lens.suppressed]}}
    if result.selection.per_prompt is not None and result.selection.per_prompt["kl"]:
        chosen["selection_stability"] = result.selection.stability().to_dict()
    from featsteer.directions.sample_size import MIN_PROMPTS

    if result.candidates.method == "dim" and result.activations is not None and min(map(len, result.activations)) >= MIN_PROMPTS:
        # how much of the direction is sampling noise (none estimated from fewer than MIN_PROMPTS prompts a class)
        chosen["sample_size"] = result.sample_sizes(draws=16, hooks=[chosen["hook"]])[0].to_dict()
    return chosen


def _one_system(gen: GenerationConfig, config: DirectionConfig) -> tuple[GenerationConfig, DirectionConfig]:
    """The evaluation's and the directions' configs with one system prompt: the one either sets (both may set the same).

    Raises:
        FeatsteerError: when they set different ones.
    """
    if gen.system is not None and config.system is not None and gen.system != config.system:
        raise FeatsteerError(f"generation.system ({gen.system!r}) and direction_config.system ({config.system!r}) differ: a comparison "
                             "finds its directions, picks its settings and evaluates with one system prompt; set one of them")
    system = gen.system if gen.system is not None else config.system
    return dataclasses.replace(gen, system=system), dataclasses.replace(config, system=system)


def _take_over(ctx: CompareContext, earlier: Comparison) -> None:
    """Give `ctx` the directions, head ranking, LEACE erasers, validation base, gate and trained direction of an earlier
    comparison with the same inputs."""
    old = earlier.context
    if old is None:
        raise FeatsteerError("reuse= needs a Comparison returned by compare() in this process (a loaded results.json has no directions)")

    def key(c: CompareContext) -> tuple:
        val = None if c.val is None else (c.val[0].prompts_sha256, c.val[1].prompts_sha256)
        return (c.harmful.prompts_sha256, c.harmless.prompts_sha256, val, asdict(c.direction_config))

    if old.model is not ctx.model:
        raise FeatsteerError("reuse= needs a comparison of the same model object")
    if old._weights != ctx._weights:  # e.g. compare run inside an abliterate() block, reusing the unedited model's directions
        raise FeatsteerError("reuse= needs the model's weights as they were in the earlier comparison, and they have changed since "
                             "(an edit applied or not undone): run without reuse=, or undo the edit first")
    if key(old) != key(ctx):
        raise FeatsteerError("reuse= needs a comparison of the same training and validation prompts and direction config")
    ctx._directions, ctx._erasers, ctx._writing_heads, ctx._filtered = dict(old._directions), old._erasers, old._writing_heads, old._filtered
    if old.validation() == ctx.validation():  # the picks read the same prompts (n_pick may differ)
        ctx._gate = old._gate
        if old.system == ctx.system:  # and format them the same way
            ctx._val_base, ctx._val_response_base = old._val_base, old._val_response_base
    if old.optimize_config == ctx.optimize_config:  # the same training run
        ctx._optimized = old._optimized


def _sae_setup(ctx: CompareContext, n_top: int = 10) -> dict[str, Any]:
    """SAE provenance for `Comparison.setup`: hooks, widths, settings and the top of the feature ranking."""
    setup: dict[str, Any] = {"hooks": {hook: int(sae.cfg.d_sae) for hook, sae in (ctx.saes or {}).items()}, "config": ctx.sae_config.to_dict()}
    if ctx._ranking is not None:
        ranking = ctx._ranking
        setup["ranked_at"] = ranking.positions
        setup["n_refusal_features"] = len(ranking.scores)
        setup["top_features"] = ranking.scores.select(range(min(n_top, len(ranking.scores)))).rows()
    return setup


INDUCE_SUFFIX = "_induce"
"""Methods named `*_induce` aim at refusal of the harmless prompts; every other method at no refusal of the harmful ones."""

PARETO_GOALS = (("jailbreak", "refusal_harmful", "refusal rate, held-out harmful prompts"),
                ("induce", "refusal_harmless", "refusal rate, held-out harmless prompts"))
"""`(goal, MethodResult field read, y label)` of the Pareto plot's rows of panels: each method is read by its own goal."""
_PARETO_TITLES = {"jailbreak": "jailbreak methods: lower refusal is better", "induce": "*_induce methods: higher refusal is better"}


@dataclass(frozen=True)
class ParetoPoint:
    """One method's point in one panel of the Pareto plot."""

    label: str
    """The method, with its picked setting when it has one (`dim_ace_hook (alpha=0)`)."""
    kl: float
    refusal: float
    frontier: bool = False
    """On the jailbreak frontier: no other point of the panel has both lower (or equal) KL and lower (or equal) refusal."""


def pareto_points(comparison: Comparison, kl: str = "kl_harmless") -> dict[str, list[ParetoPoint]]:
    """`{goal: points}` of the Pareto plot for one KL (`kl_harmless` or `kl_response_harmless`): `jailbreak` holds every
    method but the `*_induce` ones by refusal on the harmful prompts, with its frontier marked; `induce` the `*_induce`
    methods by refusal on the harmless prompts (their goal), with `none` as the unedited reference in both. A method
    without that KL is left out; `induce` is empty when no induce method ran."""
    points: dict[str, list[ParetoPoint]] = {"jailbreak": [], "induce": []}
    ran_induce = any(r.method.endswith(INDUCE_SUFFIX) for r in comparison.results)
    for r in comparison.results:
        value = getattr(r, kl)
        if value is None:
            continue
        label = f"{r.method} ({r.details['setting']})" if "setting" in r.details else r.method
        goals = ["induce"] if r.method.endswith(INDUCE_SUFFIX) else ["jailbreak"] + (["induce"] if r.method == "none" and ran_induce else [])
        for goal in goals:
            field_name = next(name for key, name, _ in PARETO_GOALS if key == goal)
            points[goal].append(ParetoPoint(label, value, getattr(r, field_name)))
    jailbreaks = points["jailbreak"]
    points["jailbreak"] = [dataclasses.replace(p, frontier=not any(o is not p and o.kl <= p.kl and o.refusal <= p.refusal
                                                                   and (o.kl, o.refusal) != (p.kl, p.refusal) for o in jailbreaks))
                           for p in jailbreaks]
    return points


def pareto_png(comparison: Comparison) -> bytes:
    """Refusal vs KL on harmless prompts, one point per method labelled with its picked setting: the jailbreak methods by
    refusal on the harmful prompts with their frontier drawn, the `*_induce` methods in a row below by refusal on the
    harmless prompts (`pareto_points`); by the first-token KL, and (when measured) along the unedited answers beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kls = [("kl_harmless", "KL(base || method), first token, harmless prompts (nats)")]
    if any(r.kl_response_harmless is not None for r in comparison.results):
        kls.append(("kl_response_harmless", "KL(base || method) along the unedited answers (nats)"))
    by_kl = {key: pareto_points(comparison, key) for key, _ in kls}
    goals = [goal for goal in PARETO_GOALS if any(by_kl[key][goal[0]] for key, _ in kls)]
    fig, axes = plt.subplots(len(goals), len(kls), figsize=(6.5 * len(kls), 4.5 * len(goals)), squeeze=False)
    for row, (goal, _, y_label) in enumerate(goals):
        for ax, (key, x_label) in zip(axes[row], kls, strict=True):
            _pareto_panel(ax, by_kl[key][goal], x_label, y_label)
            ax.set_title(_PARETO_TITLES[goal], fontsize=10)
    fig.tight_layout()
    if comparison.failed:  # no figures to plot: named under the panels so their absence is not read as a result
        fig.subplots_adjust(bottom=0.2 / len(goals))
        fig.text(0.01, 0.01, "not plotted, failed: " + ", ".join(f.method for f in comparison.failed), fontsize=8, color="firebrick")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


LABEL_OFFSET = (4.0, 3.0)
"""Where a Pareto point's label starts, in points from the point (right and up)."""
LABEL_STEP = 9.0
"""How far (points) a label moves down below a close one's: one line of the labels' 7-point text and a gap."""


def label_offsets(anchors: Sequence[tuple[float, float]], near: float = 0.04) -> list[tuple[float, float]]:
    """Text offsets (points) of the Pareto plot's labels that keep close points' labels apart.

    Each label starts at `LABEL_OFFSET` from its point; labels are placed top to bottom, and one whose point lies within
    `near` of an earlier placed one's (on both axes, in axes fractions) goes one `LABEL_STEP` below the lowest of those
    labels, so the labels of close (or equal) points stack as a list instead of printing over each other.

    Args:
        anchors: each point's position as a fraction of the axes, `(x, y)` in [0, 1].
        near: how close two points are, on each axis, for their labels to be stacked.

    Returns:
        `(dx, dy)` per anchor, in the order given.
    """
    offsets: dict[int, tuple[float, float]] = {}
    for i in sorted(range(len(anchors)), key=lambda i: (-anchors[i][1], anchors[i][0], i)):
        x, y = anchors[i]
        below = [offsets[j][1] for j in offsets if abs(anchors[j][0] - x) <= near and abs(anchors[j][1] - y) <= near]
        offsets[i] = (LABEL_OFFSET[0], min(below) - LABEL_STEP if below else LABEL_OFFSET[1])
    return [offsets[i] for i in range(len(anchors))]


def _pareto_panel(ax: Any, points: Sequence[ParetoPoint], x_label: str, y_label: str) -> None:
    """One panel: the points with their labels (those of close points stacked, `label_offsets`), and the frontier (when
    marked) as a dashed line through its points."""
    for point in points:
        ax.scatter(point.kl, point.refusal, s=40, edgecolors="black" if point.frontier else "none")
    frontier = sorted((p.kl, p.refusal) for p in points if p.frontier)
    if len(frontier) > 1:
        ax.step(*zip(*frontier, strict=True), where="post", linestyle="--", color="grey", linewidth=1, label="jailbreak frontier")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.get_xlim()  # the limits are final once the points and scale are in: where each point sits in the axes
    to_axes = ax.transAxes.inverted()
    anchors = [tuple(to_axes.transform(ax.transData.transform((p.kl, p.refusal)))) for p in points]
    for point, offset in zip(points, label_offsets(anchors), strict=True):
        moved = offset != LABEL_OFFSET  # a stacked label gets a thin line back to its point
        ax.annotate(point.label, (point.kl, point.refusal), fontsize=7, xytext=offset, textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5} if moved else None)


def write_report(comparison: Comparison, out: str | Path) -> Path:
    """Write `results.json`, `pareto.png`, a self-contained `report.html` and `responses.json` (the evaluation prompts
    and every method's full responses, kept apart so `results.json` can be shared without them) into `out`."""
    png = pareto_png(comparison)
    contents: dict[str, str | bytes] = {"pareto.png": png, "results.json": json_text(comparison.to_json()),
                                        "report.html": _html(comparison, png)}
    if comparison.responses:  # a Comparison read back from results.json has none
        contents["responses.json"] = json_text(comparison.responses_json())
    return write_files(out, contents)  # every file rendered first: a failure leaves the folder as it was


def _picked_html(details: dict, rows: Mapping[str, Mapping[str, float]]) -> str:
    """"picked <setting> on validation prompts (<every setting's figures>)", escaped. A KL has four decimals, as in the
    tables: the pick goes to the lowest, and at three the settings' KLs often read alike (0.0006 and 0.0009 as 0.001)."""
    def cell(key: str, value: Any) -> str:
        if key == "ruled_out":
            return f"ruled out by the {value}"
        return f"{key.replace('_', ' ').replace('kl ', 'KL ')} {value:.{4 if key.startswith('kl_') else 3}f}"

    text = "; ".join(f"{label}: " + ", ".join(cell(key, value) for key, value in row.items()) for label, row in rows.items())
    return f"picked {html.escape(details['setting'])} on validation prompts ({html.escape(text)})"


def _details_html(details: dict) -> str:
    if "validation" in details:
        return f"<br><small>{_picked_html(details, details['validation'])}</small>"
    if "induce_scale" in details:
        rates = ", ".join(f"{scale}x {rate:.2f}" for scale, rate in details["induce_val_refusal"].items())
        return f"<br><small>scale {details['induce_scale']}x (validation refusal: {html.escape(rates)})</small>"
    if "gate" in details:
        gate, fires = details["gate"], details["gate_fires_val"]
        return (f"<br><small>gate at {html.escape(gate['hook'])}, {html.escape(gate['pool'])} pooling, cosine threshold "
                f"{gate['threshold']:.4f}: balanced accuracy {gate['balanced_accuracy']:.3f} on the validation prompts, fired on "
                f"{fires['harmful']:.2f} of the harmful and {fires['harmless']:.2f} of the harmless ones</small>")
    if "sae_hook" not in details:
        return ""
    text = f"<br><small>{html.escape(details['sae_hook'])} features {html.escape(str(details['sae_features']))}"
    if "sae_validation" in details:
        text += f"<br>{_picked_html(details, details['sae_validation'])}"
    return text + "</small>"


def _examples_html(results: Sequence[MethodResult]) -> str:
    """Each method's example responses, each marked with its prompt set and whether the detector counted it as a
    refusal (what the refusal columns count), so a reader can check the verdicts against the text."""
    def verdict(example: dict) -> str:
        refused = example.get("refused")
        mark = "?" if refused is None else "refused" if refused else "not refused"
        return f"[{example['set']}, {mark}] " if "set" in example else f"[{mark}] "

    lists = "".join(
        f"<h3>{html.escape(r.method)}</h3><ul>"
        + "".join(f"<li><b>{html.escape(verdict(e) + e['prompt'][:100])}</b><br>{html.escape(e['response'][:200])}</li>"
                  for e in r.examples) + "</ul>"
        for r in results)
    return ("<p>Each response is marked with its prompt set and whether the refusal detector counted it as a refusal "
            "(what the refusal columns count).</p>" + lists) if lists else ""


def _html(comparison: Comparison, png: bytes) -> str:
    judged = any(r.judge for r in comparison.results)
    rows = "".join(
        f"<tr><td>{html.escape(r.method)}</td><td>{html.escape(r.description)}{_details_html(r.details)}</td><td>{r.refusal_harmful:.3f} "
        f"<small>[{r.ci_harmful[0]:.2f}, {r.ci_harmful[1]:.2f}]</small></td><td>{r.refusal_harmless:.3f}</td>"
        f"<td>{r.kl_harmless:.4f}</td><td>{'-' if r.kl_harmless_answered is None else f'{r.kl_harmless_answered:.4f}'}</td>"
        f"<td>{_kl_cell(r.kl_response_harmless)} / {_kl_cell(r.kl_response_harmless_answered)}</td>"
        f"<td>{'-' if r.over_refusal is None else f'{r.over_refusal:.3f}'}</td>"
        f"<td>{r.refusal_score_harmful:.2f}</td><td>{_cell(r.looping_harmful)} / {_cell(r.looping_harmless)}</td>"
        f"<td>{_cell(r.base_nll_harmless)}</td>" + (f"<td>{html.escape(_judge_cell(r.judge))}</td>" if judged else "") + "</tr>"
        for r in comparison.results
    ) + "".join(
        f"<tr><td>{html.escape(f.method)}</td><td>{html.escape(f.description)}</td><td colspan=\"{9 + judged}\"><b>failed</b>: "
        f"{html.escape(f.error)}</td></tr>" for f in comparison.failed
    )
    examples = _examples_html(comparison.results)
    setup = html.escape(json_text(comparison.setup))  # as results.json holds it: an undefined figure is null, not NaN
    judge_head = "<th>judge refusal harmful / harmless (same verdict as markers)</th>" if judged else ""
    judge_note = (f" The judge column is {html.escape(str(comparison.setup.get('judge', {}).get('name', 'the judge')))}'s refusal rates on the "
                  "same responses, with the number of responses per set on which it agrees with the markers." if judged else "")
    image = base64.b64encode(png).decode()
    paired = comparison.paired_table()
    warnings = comparison.coherence_warnings() + comparison.bound_exclusions()
    coherence_html = "" if not warnings else (
        "<h2>Coherence</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in warnings) + "</ul>")
    paired_html = "" if paired is None else (
        "<h2>Paired with the baseline</h2><p>Every method ran on the same prompts as the baseline, so a difference is read "
        "from the prompts whose verdicts differ: each rate cell gives the difference (method minus baseline), the prompts "
        "only the baseline counts and only the method counts, and McNemar's exact two-sided p; the KL cells are the mean "
        "per-prompt differences (first token, then along the responses) with their 95% paired bootstrap intervals.</p>" + markdown_table_html(paired))
    directions = "".join(
        f"<li><b>{html.escape(method)}</b>: {html.escape(str(chosen.get('hook')))} position {chosen.get('position')}; "
        f"the unembedding reads it as promoting {html.escape(', '.join(map(repr, chosen['logit_lens']['promoted'][:6])))} and "
        f"suppressing {html.escape(', '.join(map(repr, chosen['logit_lens']['suppressed'][:6])))}{_stability_note(chosen)}{_sample_size_note(chosen)}</li>"
        for method, chosen in comparison.setup.get("chosen", {}).items() if "logit_lens" in chosen
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>featsteer compare</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px}}th{{background:#f3f3f3}}pre{{background:#f7f7f7;padding:8px;font-size:12px}}</style>
</head><body><h1>featsteer: method comparison on {html.escape(str(comparison.setup.get('model')))}</h1>
<p>Same held-out prompts, greedy decoding, same refusal detector for every method. Refusal is the share of responses the detector reads as refusals (on the harmful prompts with its 95% Wilson interval); over-refusal is the same share on the harmless-but-alarming prompts (- without them); refusal score is the mean first-token refusal log-odds on the harmful prompts (above 0 leans towards a refusal such as "I'm sorry", below towards an answer such as "Sure"). KL is first-token KL(base || method) on harmless prompts; KL answered leaves out the harmless prompts the unedited model refuses (removing refusal rightly changes those). KL response is the same KL at every position of the unedited model's own harmless responses, fed back to both models (all / answered): a method that keeps the first token and changes what follows shows there. Looping is the share of responses that end in repetition (a broken model refuses nothing but says nothing); base NLL is the unedited model's mean per-token negative log-likelihood of the method's harmless responses (the <code>none</code> row is the floor).{judge_note}</p>
<table><tr><th>method</th><th>what</th><th>refusal (harmful) [95% CI]</th><th>refusal (harmless)</th><th>KL harmless</th><th>KL answered</th><th>KL response (all / answered)</th><th>over-refusal (alarming)</th><th>refusal score (harmful)</th><th>looping (harmful / harmless)</th><th>base NLL (harmless)</th>{judge_head}</tr>{rows}</table>
{paired_html}{coherence_html}<h2>Directions</h2><ul>{directions}</ul>
<h2>Refusal vs KL</h2><img alt="pareto plot" src="data:image/png;base64,{image}">
<h2>Examples</h2>{examples}<h2>Set-up</h2><pre>{setup}</pre></body></html>"""
