"""What SAE features *do* to refusal: jailbreak and induced-refusal rates per feature.

A feature that separates harmful from harmless prompts (see `featsteer.features.scoring`) need not be
the cause of refusal. This module measures the cause directly, one feature at a time, with the SAE
spliced in with its error term (so everything the SAE does not reconstruct passes through):

- jailbreak rate: share of harmful prompts the model answers when the feature is ablated (or clamped to a
  negative value): neither refused nor lost in a loop;
- induced-refusal rate: share of harmless prompts the model refuses, without looping, when the feature is clamped
  to a multiple of its largest activation on harmful prompts.

Both are binomial rates with 95% Wilson intervals, next to the same rates of the unmodified model.
Responses are judged either by greedy generation and the shared refusal detector (`judge="generation"`)
or, to screen many features fast, by the first-token refusal log-odds alone (`judge="first_token"`: a
prompt counts as refused when the log-odds are positive, and nothing counts as looping). `features_needed` answers
the follow-up question when no single feature moves refusal much: how many top features must go together.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from featsteer.activations import capture
from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, refusal_score
from featsteer.evaluation.quality import LoopDetector, coherent_refusals, unanswered
from featsteer.evaluation.refusal import RateEstimate, RefusalDetector, refusal_rate
from featsteer.models import ModelAdapter
from featsteer.sae.encoding import encode_activations
from featsteer.sae.loading import validate_sae
from featsteer.sae.steering import FeatureEdit, first_trained_position, inside_domain, splice_sae

logger = logging.getLogger(__name__)

JUDGES: tuple[str, ...] = ("generation", "first_token")
"""`generation`: greedy responses classified by the refusal detector; `first_token`: a prompt is refused
when the first-token refusal log-odds are positive (one forward pass, no generation)."""


@dataclass(frozen=True)
class _Verdicts:
    """Per prompt: refused? looping? (see `featsteer.evaluation.quality`)."""

    refused: tuple[bool, ...]
    looping: tuple[bool, ...]

    def answered(self) -> list[bool]:
        """Neither refused nor looping: what a jailbreak wants."""
        return [not flag for flag in self.unanswered()]

    def coherent_refusals(self) -> list[bool]:
        """Refused without looping: what inducing refusal wants."""
        return coherent_refusals(self.refused, self.looping)

    def unanswered(self) -> list[bool]:
        """Refused or looping."""
        return unanswered(self.refused, self.looping)


@dataclass(frozen=True)
class _Judge:
    """Decides, for the model as it currently is, which prompts are refused and which responses loop."""

    kind: str
    tokens: RefusalTokens
    detector: RefusalDetector
    max_new_tokens: int
    batch_size: int
    system: str | None

    def __call__(self, model: ModelAdapter, prompts: list[str]) -> tuple[_Verdicts, float]:
        """Verdicts per prompt and the mean first-token refusal log-odds."""
        scores = refusal_score(first_token_logprobs(model, prompts, batch_size=self.batch_size, system=self.system), self.tokens)
        if self.kind == "first_token":
            return _Verdicts(tuple(bool(s > 0) for s in scores.tolist()), (False,) * len(prompts)), float(scores.mean())
        responses = model.generate(prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, system=self.system)
        return _Verdicts(tuple(self.detector.classify(responses)), tuple(LoopDetector().classify(responses))), float(scores.mean())


def _make_judge(model: ModelAdapter, judge: str, detector: RefusalDetector | None, max_new_tokens: int,
                batch_size: int, system: str | None, positions: str) -> _Judge:
    if judge not in JUDGES:
        raise FeatsteerError(f"unknown judge '{judge}': use one of {', '.join(JUDGES)}")
    if judge == "first_token" and positions == "generated":
        raise FeatsteerError("the first_token judge reads the prompt's forward pass, where positions='generated' edits nothing: "
                             "use positions='all' or 'prompt', or judge='generation'")
    return _Judge(judge, RefusalTokens.for_tokenizer(model.tokenizer), detector or RefusalDetector(), max_new_tokens, batch_size, system)


def _feature_ids(sae: SAE, features: int | Sequence[int] | Tensor) -> list[int]:
    if isinstance(features, Tensor):
        features = features.flatten().tolist()
    ids = [int(features)] if isinstance(features, int) else [int(f) for f in features]
    if not ids:
        raise FeatsteerError("no features given: pass one or more feature ids")
    bad = [f for f in ids if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise FeatsteerError(f"feature id {bad[0]} is out of range: this SAE has d_sae={sae.cfg.d_sae} features (0..{sae.cfg.d_sae - 1})")
    if len(set(ids)) != len(ids):
        raise FeatsteerError(f"feature ids repeat in {ids}: pass each feature once")
    return ids


def _prompts(prompts: Sequence[str], what: str) -> list[str]:
    items = [str(p) for p in prompts]
    if not items:
        raise FeatsteerError(f"no {what} prompts given: pass at least one")
    return items


def _complied(verdicts: _Verdicts) -> RateEstimate:
    """Share of prompts answered (not refused, not looping), with its Wilson interval."""
    return refusal_rate(verdicts.answered())


def max_feature_activations(
    model: ModelAdapter,
    sae: SAE,
    prompts: Sequence[str],
    *,
    positions: str = "all",
    batch_size: int = 16,
    system: str | None = None,
) -> Float[Tensor, " d_sae"]:
    """Largest activation of every feature over the prompts' tokens (float64, CPU).

    Args:
        model: the model the SAE reads.
        sae: a sae_lens SAE (validated against `model`).
        prompts: chat-formatted instructions.
        positions: capture selector (`all` tokens, `last`, `post_instruction`, `instruction_end`, `mean_last:K`).
        batch_size: prompts per forward pass.
        system: optional system prompt.

    Returns:
        `(d_sae,)` maxima over the tokens a splice edits: inside the SAE's domain (`featsteer.sae.outside_domain`) and,
        with `all`, after the chat-template head it was not trained on (`featsteer.sae.untrained_head`); 0 for a
        feature that never fires there.
    """
    hook = validate_sae(sae, model)
    acts = capture(model, _prompts(prompts, "input"), [hook], positions=positions, batch_size=batch_size, system=system, progress=False)
    rows = acts.hook(hook)
    edited = inside_domain(sae, rows)
    if positions == "all":  # positions are token indices within each prompt: the head's are the first ones
        edited &= acts.position >= first_trained_position(sae)
    rows = rows[edited]
    if rows.shape[0] == 0:
        return torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64)
    return encode_activations(sae, rows).double().amax(0).clamp_min(0.0)


@dataclass(frozen=True)
class FeatureEffect:
    """Causal effect of one feature on refusal."""

    hook_name: str
    """Hook of the SAE the feature belongs to."""
    feature_id: int
    """Feature index within its SAE."""
    suppress: FeatureEdit
    """Edit applied on harmful prompts (ablate, or clamp to a negative value)."""
    induce: FeatureEdit | None
    """Edit applied on harmless prompts (clamp to a multiple of `harmful_max`), or None if not measured."""
    harmful_max: float
    """Largest activation of the feature on the harmful prompts."""
    jailbreak: RateEstimate
    """Share of harmful prompts complied with under `suppress`."""
    induced_refusal: RateEstimate | None
    """Share of harmless prompts refused under `induce`."""
    refusal_score_harmful: float
    """Mean first-token refusal log-odds of harmful prompts under `suppress`."""
    refusal_score_harmless: float | None
    """Mean first-token refusal log-odds of harmless prompts under `induce`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (rates as `{k, n, rate, low, high}`)."""
        return {
            "hook_name": self.hook_name, "feature_id": self.feature_id, "suppress": self.suppress.to_dict(),
            "induce": None if self.induce is None else self.induce.to_dict(), "harmful_max": self.harmful_max,
            "jailbreak": _rate_dict(self.jailbreak), "induced_refusal": _rate_dict(self.induced_refusal),
            "refusal_score_harmful": self.refusal_score_harmful, "refusal_score_harmless": self.refusal_score_harmless,
        }


def _rate_dict(rate: RateEstimate | None) -> dict[str, Any] | None:
    return None if rate is None else {"k": rate.k, "n": rate.n, "rate": rate.rate, "low": rate.low, "high": rate.high}


@dataclass(frozen=True)
class FeatureEffects:
    """Per-feature effects plus the unmodified model's rates on the same prompts."""

    effects: tuple[FeatureEffect, ...]
    """One record per feature, in the order the features were given."""
    clean_jailbreak: RateEstimate
    """Share of harmful prompts the unmodified model complies with."""
    clean_induced_refusal: RateEstimate
    """Share of harmless prompts the unmodified model refuses."""
    clean_score_harmful: float
    """Mean first-token refusal log-odds of the unmodified model on harmful prompts."""
    clean_score_harmless: float
    """Mean first-token refusal log-odds of the unmodified model on harmless prompts."""
    judge: str
    """How responses were judged (see `JUDGES`)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Prompt counts, edit settings, generation length."""

    def __len__(self) -> int:
        return len(self.effects)

    def __iter__(self) -> Iterator[FeatureEffect]:
        return iter(self.effects)

    def best(self) -> FeatureEffect:
        """The feature with the highest jailbreak rate (ties: lowest harmful refusal score)."""
        return max(self.effects, key=lambda e: (e.jailbreak.rate, -e.refusal_score_harmful))

    def summary(self, min_effect: float = 0.1) -> str:
        """One sentence: does any single feature move refusal by at least `min_effect`?"""
        best = self.best()
        gain = best.jailbreak.rate - self.clean_jailbreak.rate
        where = f"feature {best.feature_id} at {best.hook_name}"
        if gain >= min_effect:
            return (f"{where} moves refusal most: jailbreak rate {self.clean_jailbreak.rate:.2f} -> {best.jailbreak.rate:.2f} "
                    f"[{best.jailbreak.low:.2f}, {best.jailbreak.high:.2f}] when suppressed")
        return (f"no single feature of {len(self)} moves refusal much: the best, {where}, raises the jailbreak rate by "
                f"{gain:+.2f} (clean {self.clean_jailbreak.rate:.2f}); see features_needed for how many it takes together")

    def rows(self) -> list[dict[str, Any]]:
        """Flat rows for tables and CSV."""
        out = []
        for e in self.effects:
            induced = e.induced_refusal
            out.append({"hook_name": e.hook_name, "feature_id": e.feature_id, "harmful_max": e.harmful_max,
                        "jailbreak": e.jailbreak.rate, "jailbreak_low": e.jailbreak.low, "jailbreak_high": e.jailbreak.high,
                        "induced_refusal": None if induced is None else induced.rate,
                        "induced_low": None if induced is None else induced.low, "induced_high": None if induced is None else induced.high,
                        "refusal_score_harmful": e.refusal_score_harmful, "refusal_score_harmless": e.refusal_score_harmless})
        return out

    def table(self) -> str:
        """Markdown table, clean model first."""
        lines = ["| feature | jailbreak [95% CI] | induced refusal [95% CI] | refusal score harmful |", "|---|---|---|---|",
                 f"| (clean) | {_cell(self.clean_jailbreak)} | {_cell(self.clean_induced_refusal)} | {self.clean_score_harmful:.2f} |"]
        lines += [f"| {e.hook_name}:{e.feature_id} | {_cell(e.jailbreak)} | {_cell(e.induced_refusal)} | {e.refusal_score_harmful:.2f} |"
                  for e in self.effects]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"judge": self.judge, "provenance": self.provenance, "summary": self.summary(),
                "clean": {"jailbreak": _rate_dict(self.clean_jailbreak), "induced_refusal": _rate_dict(self.clean_induced_refusal),
                          "refusal_score_harmful": self.clean_score_harmful, "refusal_score_harmless": self.clean_score_harmless},
                "effects": [e.to_dict() for e in self.effects]}


def _cell(rate: RateEstimate | None) -> str:
    return "-" if rate is None else f"{rate.rate:.3f} [{rate.low:.2f}, {rate.high:.2f}]"


def _under(model: ModelAdapter, sae: SAE, edits: list[FeatureEdit], positions: str, judge: _Judge, prompts: list[str]) -> tuple[_Verdicts, float]:
    with splice_sae(model, sae, edits, positions=positions):
        return judge(model, prompts)


def _suppression(features: int | list[int], clamp_value: float | None) -> FeatureEdit:
    if clamp_value is None:
        return FeatureEdit.ablate(features)
    if clamp_value > 0:
        raise FeatsteerError(f"clamp_value={clamp_value} would amplify the feature: pass a value <= 0 (or None to ablate)")
    return FeatureEdit.clamp(features, clamp_value)


def feature_effects(
    model: ModelAdapter,
    sae: SAE,
    features: int | Sequence[int] | Tensor,
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str],
    *,
    clamp_value: float | None = None,
    induce_multiple: float | None = 1.0,
    judge: str = "generation",
    positions: str = "all",
    harmful_max: Tensor | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    detector: RefusalDetector | None = None,
    system: str | None = None,
) -> FeatureEffects:
    """Jailbreak and induced-refusal rate of each feature, one feature at a time.

    Args:
        model: the model the SAE reads.
        sae: a sae_lens SAE (spliced with its error term at its `hook_name`).
        features: feature ids to measure (e.g. `scores.for_hook(h).top(20).feature_ids`).
        harmful_prompts: prompts the clean model should refuse.
        harmless_prompts: prompts the clean model should answer.
        clamp_value: None ablates the feature on harmful prompts; a value <= 0 clamps it there instead.
        induce_multiple: on harmless prompts the feature is clamped to this multiple of its largest
            activation on the harmful prompts; None skips the induced-refusal measurement.
        judge: `generation` (greedy responses + refusal detector) or `first_token` (see `JUDGES`).
        positions: tokens the edits apply to (`all`, `prompt`, `generated`).
        harmful_max: precomputed `(d_sae,)` maxima (default: `max_feature_activations` over every token).
        max_new_tokens: generation length for `judge="generation"`.
        batch_size: prompts per forward pass or generation batch.
        detector: refusal detector (default `RefusalDetector()`).
        system: optional system prompt.

    Returns:
        One record per feature plus the clean model's rates on the same prompts.

    Raises:
        FeatsteerError: for an SAE that does not fit the model, bad feature ids, empty prompt lists, an
            unknown judge (or `first_token` with `positions="generated"`, which would edit nothing), or a positive
            `clamp_value`.
    """
    hook = validate_sae(sae, model)
    ids = _feature_ids(sae, features)
    harmful, harmless = _prompts(harmful_prompts, "harmful"), _prompts(harmless_prompts, "harmless")
    decide = _make_judge(model, judge, detector, max_new_tokens, batch_size, system, positions)
    _suppression(ids[0], clamp_value)  # fail on a bad clamp value before any work
    maxima = harmful_max if harmful_max is not None else max_feature_activations(model, sae, harmful, batch_size=batch_size, system=system)
    if tuple(maxima.shape) != (sae.cfg.d_sae,):
        raise FeatsteerError(f"harmful_max has shape {tuple(maxima.shape)} but this SAE has d_sae={sae.cfg.d_sae}: pass one value per feature")
    clean_harmful, clean_harmful_score = decide(model, harmful)
    clean_harmless, clean_harmless_score = decide(model, harmless)
    effects = []
    for number, feature in enumerate(ids, 1):
        suppress = _suppression(feature, clamp_value)
        refused, score = _under(model, sae, [suppress], positions, decide, harmful)
        induce, induced, induced_score = None, None, None
        if induce_multiple is not None:
            induce = FeatureEdit.clamp(feature, induce_multiple * float(maxima[feature]))
            verdicts, induced_score = _under(model, sae, [induce], positions, decide, harmless)
            induced = refusal_rate(verdicts.coherent_refusals())
        effects.append(FeatureEffect(hook, feature, suppress, induce, float(maxima[feature]), _complied(refused), induced, score, induced_score))
        logger.info("feature %d (%d/%d): jailbreak %.3f", feature, number, len(ids), effects[-1].jailbreak.rate)
    provenance = {"n_harmful": len(harmful), "n_harmless": len(harmless), "clamp_value": clamp_value, "induce_multiple": induce_multiple,
                  "positions": positions, "max_new_tokens": max_new_tokens if judge == "generation" else None}
    return FeatureEffects(tuple(effects), _complied(clean_harmful), refusal_rate(clean_harmless.coherent_refusals()), clean_harmful_score,
                          clean_harmless_score, judge, provenance)


def screen_features(
    model: ModelAdapter,
    sae: SAE,
    features: int | Sequence[int] | Tensor,
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str],
    *,
    clamp_value: float | None = None,
    induce_multiple: float | None = 1.0,
    positions: str = "all",
    harmful_max: Tensor | None = None,
    batch_size: int = 16,
    system: str | None = None,
) -> FeatureEffects:
    """`feature_effects` judged by the first-token refusal log-odds (no generation): for many features.

    Arguments as in `feature_effects`. A prompt counts as refused when its first-token refusal log-odds
    are positive; screen with this, then confirm the best features with `feature_effects`.
    """
    return feature_effects(model, sae, features, harmful_prompts, harmless_prompts, clamp_value=clamp_value,
                           induce_multiple=induce_multiple, judge="first_token", positions=positions, harmful_max=harmful_max,
                           batch_size=batch_size, system=system)


@dataclass(frozen=True)
class FeaturesNeeded:
    """Harmful prompts left unanswered (refused or looping) with the top 1, 2, 4, ... features suppressed together."""

    hook_name: str
    """Hook of the SAE."""
    features: tuple[int, ...]
    """The ranked feature ids considered (the first `n` are suppressed at step `n`)."""
    target: float
    """Refusal rate to get below."""
    clean: RateEstimate
    """Harmful prompts the unmodified model leaves unanswered (refused or looping)."""
    steps: tuple[tuple[int, RateEstimate], ...]
    """`(n features suppressed together, harmful unanswered rate)`, in increasing `n`."""
    needed: int | None
    """Smallest `n` whose refusal rate is below `target` (None: none of the tried sizes)."""
    judge: str
    """How responses were judged (see `JUDGES`)."""

    def summary(self) -> str:
        """One sentence answering "how many features does it take?"."""
        first_n, first = self.steps[0]
        if self.clean.rate < self.target:
            return f"the clean model already refuses only {self.clean.rate:.2f} of harmful prompts (target {self.target:.2f})"
        if self.needed == 1:
            return f"suppressing the top feature alone brings harmful refusal from {self.clean.rate:.2f} to {first.rate:.2f} (< {self.target:.2f})"
        if self.needed is not None:
            reached = dict(self.steps)[self.needed]
            if first_n == 1:
                return (f"no single feature brings harmful refusal below {self.target:.2f} (top feature alone: {self.clean.rate:.2f} -> "
                        f"{first.rate:.2f}); it takes the top {self.needed} features together ({reached.rate:.2f})")
            fewer = "" if self.needed == first_n else f", the top {first_n} only to {first.rate:.2f}"
            return (f"the top {self.needed} features together bring harmful refusal from {self.clean.rate:.2f} to {reached.rate:.2f} "
                    f"(< {self.target:.2f}){fewer}; groups of fewer than {first_n} features were not tried")
        last_n, last = self.steps[-1]
        return (f"even the top {last_n} features together leave harmful refusal at {last.rate:.2f} (clean {self.clean.rate:.2f}, "
                f"target {self.target:.2f}): refusal is not carried by these features alone")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"hook_name": self.hook_name, "features": list(self.features), "target": self.target, "clean": _rate_dict(self.clean),
                "steps": [{"n_features": n, **(_rate_dict(rate) or {})} for n, rate in self.steps], "needed": self.needed,
                "judge": self.judge, "summary": self.summary()}


def doubling_sizes(n: int) -> list[int]:
    """1, 2, 4, ... below `n`, then `n` itself."""
    if n < 1:
        raise FeatsteerError(f"need at least one feature, got {n}")
    sizes, size = [], 1
    while size < n:
        sizes.append(size)
        size *= 2
    return [*sizes, n]


def features_needed(
    model: ModelAdapter,
    sae: SAE,
    features: Sequence[int] | Tensor,
    harmful_prompts: Sequence[str],
    *,
    target: float = 0.5,
    sizes: Sequence[int] | None = None,
    clamp_value: float | None = None,
    judge: str = "generation",
    positions: str = "all",
    stop_early: bool = True,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    detector: RefusalDetector | None = None,
    system: str | None = None,
) -> FeaturesNeeded:
    """How many of the top features must be suppressed together to bring harmful refusal below `target`.

    Args:
        model: the model the SAE reads.
        sae: a sae_lens SAE.
        features: feature ids ranked best first (e.g. by composite score).
        harmful_prompts: prompts the clean model refuses.
        target: refusal rate to get below.
        sizes: group sizes to try (default 1, 2, 4, ... up to `len(features)`).
        clamp_value: None ablates the group; a value <= 0 clamps every feature of the group to it.
        judge: `generation` or `first_token` (see `JUDGES`).
        positions: tokens the edits apply to.
        stop_early: stop at the first size that reaches the target.
        max_new_tokens: generation length for `judge="generation"`.
        batch_size: prompts per forward pass or generation batch.
        detector: refusal detector (default `RefusalDetector()`).
        system: optional system prompt.

    Returns:
        The refusal rate per group size and the smallest size that reaches the target.

    Raises:
        FeatsteerError: for bad feature ids or sizes, an empty prompt list, an unknown judge (or `first_token` with
            `positions="generated"`), or a target outside (0, 1].
    """
    hook = validate_sae(sae, model)
    ids = _feature_ids(sae, features)
    harmful = _prompts(harmful_prompts, "harmful")
    if not 0 < target <= 1:
        raise FeatsteerError(f"target refusal rate must be in (0, 1], got {target}")
    tried = doubling_sizes(len(ids)) if sizes is None else sorted({int(s) for s in sizes})
    if not tried or tried[0] < 1 or tried[-1] > len(ids):
        raise FeatsteerError(f"sizes must lie in 1..{len(ids)} (the number of features given), got {list(sizes or [])}")
    _suppression(ids[0], clamp_value)
    decide = _make_judge(model, judge, detector, max_new_tokens, batch_size, system, positions)
    clean = refusal_rate(decide(model, harmful)[0].unanswered())
    steps, needed = [], None
    for size in tried:
        rate = refusal_rate(_under(model, sae, [_suppression(ids[:size], clamp_value)], positions, decide, harmful)[0].unanswered())
        steps.append((size, rate))
        logger.info("top %d features suppressed: harmful refusal %.3f", size, rate.rate)
        if rate.rate < target and needed is None:
            needed = size
            if stop_early:
                break
    return FeaturesNeeded(hook, tuple(ids), target, clean, tuple(steps), needed, judge)
