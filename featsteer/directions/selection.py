"""Choosing the refusal direction among candidates (layer x position), as in Arditi et al. 2024.

Every candidate is scored on validation prompts from first-token logits only (no generation, so it is
fast), in two stages - the ablation refusal score for all, the two other checks for the best `top_k`: (a) the refusal score of harmful prompts when the direction is ablated everywhere, (b) the KL
divergence of harmless prompts' first-token distribution under that ablation, and (c) the refusal score of
harmless prompts when the raw mean difference is added at the candidate's own layer. Candidates in the
last `skip_last_fraction` of layers, above the KL threshold, or whose addition does not induce refusal are
discarded; the lowest refusal score under ablation wins.

With `screen=N`, stage (a) is itself screened: one forward and backward pass over the harmful prompts gives a
first-order estimate of every candidate's ablation effect (`featsteer.directions.attribution`), and only the N
candidates with the lowest estimate are ablated exactly. The others are marked `screened out` in the table, with
their estimate.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from featsteer.directions.attribution import ablation_attribution
from featsteer.directions.directions import DirectionSet
from featsteer.directions.methods import weighted_basis
from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, kl_per_prompt, refusal_score
from featsteer.interventions import Ablate, AddDirection, steer
from featsteer.models import ModelAdapter, check_system, stream_point

logger = logging.getLogger(__name__)

FILTERS = ("late layer", "zero direction", "kl too high", "no induced refusal")
"""The selection's filters, as a candidate's `reason` names them: the first two keep a candidate from being scored, the
last two from being kept once scored (`SelectionConfig.kl_threshold`, `require_induce`)."""
FILTER_SEPARATOR = ", "
"""What joins the filters a candidate fails in its `reason`."""


@dataclass(frozen=True)
class SelectionConfig:
    """Filters of the Arditi selection."""

    kl_threshold: float = 0.1
    """Discard candidates whose ablation moves harmless first-token distributions more than this (nats)."""
    skip_last_fraction: float = 0.2
    """Do not consider the last fraction of layers (directions there mostly encode the next token), counted by the block
    input a hook sits at: `resid_post` of block l is block l+1's `resid_pre`."""
    require_induce: bool = True
    """Discard candidates whose addition to harmless prompts does not raise the refusal score above 0. The addition is the
    candidate's unit direction times its `mean_diff_norm` score, which the candidates must then carry."""
    batch_size: int = 16
    """Prompts per forward pass."""
    top_k: int | None = 8
    """Two-stage scoring: every candidate gets the ablation refusal score (one pass over harmful prompts);
    only the `top_k` lowest then get the KL and induce checks (two more passes). None checks every one."""
    screen: int | None = None
    """Score only this many candidates exactly under ablation, those with the lowest first-order estimate
    (`featsteer.directions.attribution`); None scores every one. The estimate costs one forward and backward
    pass over the harmful prompts, about three ablated passes on Qwen2.5-Coder-0.5B."""
    fallback: bool = True
    """When no candidate passes the filters, pick one of the scored candidates anyway (logged as a warning
    and marked in the table) instead of failing: the lowest KL among those whose ablation brings the mean
    refusal log-odds below 0 (harmful prompts predicted to comply), else the lowest refusal score."""
    layers: tuple[int, ...] | None = None
    """Score only the candidates at hooks of these layers (`abliterate --layers`, `compare --layers`); the others get a
    row with reason `not in layers` and no score, as late layers do. None scores every layer."""
    system: str | None = None
    """The system prompt the validation prompts are formatted with in every scoring pass (None: none; a blank text is
    refused), the one the candidates were found with (`DirectionConfig.system`)."""

    def __post_init__(self) -> None:
        check_system(self.system)
        if self.screen is not None and self.screen < 1:
            raise FeatsteerError(f"--screen must be at least 1 (candidates ablated exactly), got {self.screen}")
        if not self.kl_threshold >= 0:  # also NaN, which no KL is below: every candidate would fail and the fallback pick
            raise FeatsteerError(f"--kl-threshold must be a KL in nats, >= 0 (inf: no KL filter), got {self.kl_threshold}")
        if not 0 <= self.skip_last_fraction < 1:
            raise FeatsteerError(f"skip_last_fraction must lie in [0, 1) (the share of last layers skipped), got {self.skip_last_fraction}")
        if self.top_k is not None and self.top_k < 1:
            raise FeatsteerError(f"top_k must be at least 1 (candidates given the KL and induce checks) or None for all, got {self.top_k}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise FeatsteerError(f"layers must name at least one layer, each >= 0 (None: every layer), got {self.layers}")


@dataclass(frozen=True)
class CandidateScore:
    """Scores of one candidate direction."""

    index: int
    hook: str
    layer: int
    position: int
    refusal_ablated: float
    """Mean refusal log-odds of harmful prompts with the direction ablated (lower = less refusal)."""
    kl_harmless: float
    """Mean first-token KL(base || ablated) on harmless prompts."""
    refusal_induced: float
    """Mean refusal log-odds of harmless prompts with the mean difference added at this layer."""
    kept: bool
    reason: str
    """`kept`, `screened out`, `not in top-k`, or every filter the candidate fails (`FILTERS`), joined by `FILTER_SEPARATOR`
    (e.g. `kl too high, no induced refusal`)."""
    refusal_estimate: float = float("nan")
    """First-order estimate of `refusal_ablated` (with `SelectionConfig.screen`; NaN otherwise)."""

    @property
    def failed(self) -> tuple[str, ...]:
        """Every filter the candidate fails, in `FILTERS` order (empty for a kept, screened-out or not-top-k one)."""
        named = set(self.reason.split(FILTER_SEPARATOR))
        return tuple(name for name in FILTERS if name in named)


@dataclass(frozen=True)
class SelectionStability:
    """How often each finalist would be chosen if the validation prompts were drawn again (`Selection.stability`)."""

    shares: list[tuple[str, int, float]]
    """`(hook, position, share of resamples choosing it)` for every candidate chosen at least once, most often first."""
    chosen_share: float
    """The share of resamples that choose the candidate the selection chose."""
    n_resamples: int
    n_harmful: int
    n_harmless: int
    n_finalists: int
    """Candidates that got every check (ablation, KL, induction): the ones a resample can choose between."""
    chosen: tuple[str, int] = ("", 0)
    """`(hook, position)` the selection chose."""
    no_choice_share: float = 0.0
    """The share of resamples in which no finalist passes the filters and, without the fallback
    (`SelectionConfig.fallback=False`), `select_direction` would have chosen none and failed."""

    def to_dict(self) -> dict:
        return {**asdict(self), "shares": [list(row) for row in self.shares], "chosen": list(self.chosen)}

    def line(self, n: int = 3) -> str:
        """`chosen in 74% of 1000 bootstrap resamples of ... (also chosen: blocks.15.hook_resid_pre position -1 18%, ...)`"""
        others = [f"{hook} position {position} {share:.0%}" for hook, position, share in self.shares if (hook, position) != self.chosen][:n]
        return (f"chosen in {self.chosen_share:.0%} of {self.n_resamples} bootstrap resamples of the {self.n_harmful} + "
                f"{self.n_harmless} validation prompts, among {self.n_finalists} finalists"
                + (f" (also chosen: {', '.join(others)})" if others else "")
                + (f"; in {self.no_choice_share:.0%} no finalist passes the filters (no fallback: no choice)" if self.no_choice_share else ""))


@dataclass(frozen=True)
class SelectionBase:
    """The unedited model's first-token figures on a selection's validation prompts, which every candidate is scored
    against; another selection over the same prompts, batching and system prompt reads them instead of two passes."""

    key: tuple
    """`(model name, harmful prompts, harmless prompts, batch size, system prompt)` they were computed for."""
    harmful_scores: Tensor
    """Refusal log-odds per harmful validation prompt."""
    harmless_logprobs: Tensor
    """First-token log-probs `(prompt, vocab)` per harmless validation prompt."""


@dataclass(frozen=True)
class Selection:
    """All candidate scores and the chosen one."""

    candidates: list[CandidateScore]
    chosen: CandidateScore
    base_refusal_harmful: float
    base_refusal_harmless: float
    config: SelectionConfig | None = field(default=None, repr=False, compare=False)
    per_prompt: dict[str, dict[int, Tensor]] | None = field(default=None, repr=False, compare=False)
    """The finalists' per-prompt scores: `ablated` (harmful prompts' refusal log-odds under ablation), `kl` and
    `induced` (harmless prompts'), by candidate index; what `stability` resamples."""
    base: SelectionBase | None = field(default=None, repr=False, compare=False)
    """The unedited model's figures the candidates were scored against (`select_direction(base=...)` reads them)."""

    def stability(self, resamples: int = 1000, seed: int = 0) -> SelectionStability:
        """Bootstrap the selection over its validation prompts: draw the harmful and the harmless prompts again with
        replacement, re-apply the filters (KL threshold, induced refusal, the fallback) to the finalists' per-prompt
        scores, and count which candidate wins (without the fallback, a resample where none passes is counted in
        `no_choice_share`: `select_direction` would have failed on it). Only the finalists (the `top_k` that got every check) can win a
        resample, so a share is an upper bound when a candidate outside them could have come close.

        Raises:
            FeatsteerError: for a selection without per-prompt scores (made before they were kept) or resamples < 1.
        """
        if self.per_prompt is None or self.config is None or not self.per_prompt["kl"]:
            raise FeatsteerError("this selection kept no per-prompt scores: run select_direction again to bootstrap it")
        if resamples < 1:
            raise FeatsteerError(f"resamples must be at least 1, got {resamples}")
        finalists = sorted(self.per_prompt["kl"])
        ablated = torch.stack([self.per_prompt["ablated"][i] for i in finalists]).double()
        kl = torch.stack([self.per_prompt["kl"][i] for i in finalists]).double()
        induced = torch.stack([self.per_prompt["induced"][i] for i in finalists]).double()
        n_harmful, n_harmless = ablated.shape[1], kl.shape[1]
        generator = torch.Generator().manual_seed(seed)
        wins: Counter[int] = Counter()
        no_choice = 0
        for _ in range(resamples):
            h = torch.randint(n_harmful, (n_harmful,), generator=generator)
            b = torch.randint(n_harmless, (n_harmless,), generator=generator)
            winner = _winner(ablated[:, h].mean(1), kl[:, b].mean(1), induced[:, b].mean(1), self.config)
            if winner is None:
                no_choice += 1
            else:
                wins[finalists[winner]] += 1
        by_index = {c.index: c for c in self.candidates}
        shares = [(by_index[i].hook, by_index[i].position, count / resamples) for i, count in wins.most_common()]
        return SelectionStability(shares, wins[self.chosen.index] / resamples, resamples, n_harmful, n_harmless, len(finalists),
                                  (self.chosen.hook, self.chosen.position), no_choice / resamples)

    def caveats(self) -> list[str]:
        """What a reader of the chosen line must know to trust it, one sentence each: that the choice is the fallback
        pick (no candidate passed the filters), and that the validation harmful prompts were already answered more than
        refused before any edit (mean refusal log-odds below 0), so there was little refusal for a direction to remove.
        Empty for a selection that needs neither."""
        notes = []
        if not self.chosen.kept:
            kl = f"KL <= {self.config.kl_threshold:g}" if self.config is not None else "the KL threshold"
            notes.append(f"no candidate passed the filters ({kl}, adding it induces refusal): this is the fallback pick, which "
                         f"fails '{self.chosen.reason}' (KL {self.chosen.kl_harmless:.4f}; adding it gives harmless prompts refusal "
                         f"log-odds {self.chosen.refusal_induced:+.2f})")
        if self.base_refusal_harmful < 0:
            notes.append(f"the validation harmful prompts' mean refusal log-odds is {self.base_refusal_harmful:+.2f} before any edit: "
                         "the model already answers most of them at the first token, so there is little refusal here for a "
                         "direction to remove (featsteer eval counts how often it refuses)")
        return notes

    def table(self) -> str:
        """Markdown table of every candidate (with an estimate column when the selection was screened)."""
        screened = any(c.refusal_estimate == c.refusal_estimate for c in self.candidates)
        head = "| hook | pos |" + (" refusal (estimate) |" if screened else "") + " refusal (ablated) | KL harmless | refusal (induced) | kept |"
        lines = [head, "|---" * head.count(" |") + "|"]
        for c in self.candidates:
            mark = ("**chosen**" if c.kept else f"**chosen (fallback: {c.reason})**") if c is self.chosen else ("yes" if c.kept else c.reason)
            estimate = f" {c.refusal_estimate:.3f} |" if screened else ""
            lines.append(f"| {c.hook} | {c.position} |{estimate} {c.refusal_ablated:.3f} | {c.kl_harmless:.4f} | {c.refusal_induced:.3f} | {mark} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"candidates": [asdict(c) for c in self.candidates], "chosen": asdict(self.chosen),
                "base_refusal_harmful": self.base_refusal_harmful, "base_refusal_harmless": self.base_refusal_harmless}


def _winner(ablated: Tensor, kl: Tensor, induced: Tensor, config: SelectionConfig) -> int | None:
    """The row `select_direction` chooses from the finalists' mean scores: the lowest ablated refusal among those that
    pass the KL and induce filters, else (with `fallback`) the lowest KL among those whose ablation brings refusal
    below 0, else the lowest ablated refusal; None when none passes and there is no fallback (it would fail)."""
    kept = (kl <= config.kl_threshold) & ((induced > 0) | (not config.require_induce))
    if bool(kept.any()):
        return int(torch.where(kept, ablated, torch.inf).argmin())
    if not config.fallback:
        return None
    removing = ablated < 0
    if bool(removing.any()):
        return int(torch.where(removing, kl, torch.inf).argmin())
    return int(ablated.argmin())


def _kl_and_induce(model, candidates: DirectionSet, i: int, harmless, base_harmless_logprobs, tokens, batch_size: int,
                   system: str | None = None) -> tuple[Tensor, Tensor]:
    """Per harmless prompt: the first-token KL under ablation, and the refusal log-odds with the mean difference added."""
    with steer(model, Ablate(weighted_basis(candidates, i), weighted=True)):
        kl = kl_per_prompt(base_harmless_logprobs, first_token_logprobs(model, harmless, batch_size=batch_size, system=system))
    lengths = candidates.scores.get("mean_diff_norm")
    if lengths is None:  # only with require_induce=False (select_direction checks): no length to add, so no induce score
        return kl, torch.full((len(harmless),), float("nan"), dtype=torch.float64)
    norm = lengths[i]
    with steer(model, AddDirection(candidates.bases[i, 0] * norm, 1.0, where=candidates.hook_names[i])):
        induced = refusal_score(first_token_logprobs(model, harmless, batch_size=batch_size, system=system), tokens)
    return kl, induced


def _fallback(scored: list[CandidateScore]) -> CandidateScore:
    # past the KL filter every candidate costs something on harmless prompts: among those that remove
    # refusal, the cheapest; the strongest-ablating one tends to sit in a later layer with a larger KL
    removing = [c for c in scored if c.refusal_ablated < 0]
    if removing:
        return min(removing, key=lambda c: c.kl_harmless)
    return min(scored, key=lambda c: c.refusal_ablated)


def late_layer_start(n_layers: int, skip_last_fraction: float) -> int:
    """The first stream point (block input) the late-layer rule skips (`SelectionConfig.skip_last_fraction` of `n_layers`): the floor of
    `(1 - fraction) * n_layers`, taken after rounding away the float error, so 30% of 90 layers skips 27, not 28
    (`(1 - 0.3) * 90` is 62.99999999999999 in floating point)."""
    return math.floor(round((1 - skip_last_fraction) * n_layers, 9))


def is_late_layer(model: ModelAdapter, hook: str, skip_last_fraction: float) -> bool:
    """Whether the selection skips candidates at `hook`: its stream point (`models.stream_point`) is in the last
    `skip_last_fraction` of the model's layers. A point inside block l (`attn_out`, `resid_mid` of a sequential block, at
    l + 0.5) is skipped with block l, one at its output (`resid_post`, `mlp_out`, `per_layer_out`, and `attn_out` of a
    parallel block, at l + 1) with block l + 1, whose input it is."""
    point = stream_point(model.hook_site(hook), model.n_layers, model.parallel_block)
    return point >= late_layer_start(model.n_layers, skip_last_fraction)


def select_direction(
    model: ModelAdapter,
    candidates: DirectionSet,
    harmful_val,
    harmless_val,
    config: SelectionConfig | None = None,
    progress: bool | None = None,
    base: SelectionBase | None = None,
) -> Selection:
    """Score every candidate and pick one (see module docstring).

    `base` is an earlier selection's `Selection.base` of the same, unedited model: when it was computed on the same
    validation prompts, batch size and system prompt, its figures are used instead of computing them again (`compare`'s
    several direction methods share them); otherwise it is ignored.

    Raises:
        FeatsteerError: when no candidate survives the filters (the message says which filter to relax), or with
            `require_induce` for candidates without a `mean_diff_norm` score (the length the induce check adds).
    """
    config = config or SelectionConfig()
    if config.require_induce and "mean_diff_norm" not in candidates.scores:
        # the check used to add the unit direction instead: far too short to induce anything, so every finalist failed
        # it and the selection fell back, with only a logged warning
        raise FeatsteerError(f"the induce check adds each candidate's mean difference, and these {candidates.method} candidates carry no "
                             "mean_diff_norm score (its length along each direction): compute them with find_directions (every "
                             "method records it), add the score, or pass SelectionConfig(require_induce=False)")
    progress = model.show_progress if progress is None else progress
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    harmful, harmless = list(harmful_val), list(harmless_val)
    key = (model.name, tuple(harmful), tuple(harmless), config.batch_size, config.system)
    if base is None or base.key != key:
        base = SelectionBase(key, refusal_score(first_token_logprobs(model, harmful, batch_size=config.batch_size, system=config.system), tokens),
                             first_token_logprobs(model, harmless, batch_size=config.batch_size, system=config.system))
    base_harmful, base_harmless_logprobs = base.harmful_scores, base.harmless_logprobs
    nan = float("nan")
    layers = [model.hook_site(hook).layer or 0 for hook in candidates.hook_names]
    max_layer = late_layer_start(model.n_layers, config.skip_last_fraction)
    late = [is_late_layer(model, hook, config.skip_last_fraction) for hook in candidates.hook_names]
    unlisted = [config.layers is not None and layer not in config.layers for layer in layers]
    estimates: dict[int, float] = {}

    def row(i: int, *values, reason: str, kept: bool = False) -> CandidateScore:
        return CandidateScore(i, candidates.hook_names[i], layers[i], candidates.positions[i], *values, kept, reason,
                              estimates.get(i, nan))

    scores: list[CandidateScore] = []
    eligible: list[int] = []
    for i in range(len(candidates)):
        failed = [name for name, fails in zip(FILTERS[:2], (late[i], float(weighted_basis(candidates, i).norm()) == 0), strict=True) if fails]
        if unlisted[i]:
            scores.append(row(i, nan, nan, nan, reason="not in layers"))
        elif failed:
            scores.append(row(i, nan, nan, nan, reason=FILTER_SEPARATOR.join(failed)))
        else:
            eligible.append(i)
    if config.screen is not None and len(eligible) > config.screen:
        attribution = ablation_attribution(model, harmful, tokens, batch_size=config.batch_size, system=config.system)
        base_mean = float(base_harmful.mean())
        estimates.update({i: base_mean + attribution.estimate(weighted_basis(candidates, i)) for i in eligible})
        screened_in = set(sorted(eligible, key=estimates.get)[: config.screen])
        scores += [row(i, nan, nan, nan, reason="screened out") for i in eligible if i not in screened_in]
        eligible = [i for i in eligible if i in screened_in]
    ablated: dict[int, float] = {}
    per_prompt: dict[str, dict[int, Tensor]] = {"ablated": {}, "kl": {}, "induced": {}}
    for i in tqdm(eligible, desc="select: ablate", disable=not progress, leave=False):
        with steer(model, Ablate(weighted_basis(candidates, i), weighted=True)):
            per_prompt["ablated"][i] = refusal_score(first_token_logprobs(model, harmful, batch_size=config.batch_size,
                                                                          system=config.system), tokens).cpu()
        ablated[i] = float(per_prompt["ablated"][i].mean())
    ranked = sorted(ablated, key=ablated.get)
    finalists = set(ranked if config.top_k is None else ranked[: config.top_k])
    scores += [row(i, ablated[i], nan, nan, reason="not in top-k") for i in ranked if i not in finalists]
    # the bar counts the finalists alone, the only candidates checked here: over every candidate its ETA was minutes too long
    for i in tqdm([i for i in ranked if i in finalists], desc="select: KL/induce", disable=not progress, leave=False):
        kl_each, induced_each = _kl_and_induce(model, candidates, i, harmless, base_harmless_logprobs, tokens, config.batch_size,
                                               config.system)
        per_prompt["kl"][i], per_prompt["induced"][i] = kl_each.cpu(), induced_each.cpu()
        kl, induced = float(kl_each.mean()), float(induced_each.mean())
        failed = [name for name, fails in zip(FILTERS[2:], (kl > config.kl_threshold, config.require_induce and induced <= 0), strict=True) if fails]
        scores.append(row(i, ablated[i], kl, induced, reason=FILTER_SEPARATOR.join(failed) or "kept", kept=not failed))
    scores.sort(key=lambda c: c.index)
    kept = [c for c in scores if c.kept]
    scored = [c for c in scores if c.index in per_prompt["kl"] and not c.kept]  # the finalists the KL or induce filter dropped
    if not kept and config.fallback and scored:
        best = _fallback(scored)
        logger.warning("no candidate passed the filters; falling back to %s position %d (%s)", best.hook, best.position, best.reason)
        kept = [best]
    if not kept and not scored:
        reasons = ", ".join(f"{count} {reason}" for reason, count in Counter(name for c in scores for name in c.failed or (c.reason,)).items())
        raise FeatsteerError(f"no candidate direction could be scored ({reasons}): only layers below {max_layer} of the model's "
                             f"{model.n_layers} count (the last {config.skip_last_fraction:.0%} are skipped), and a zero direction (both sets' means "
                             "coincide, as at layer 0 on a template token) has nothing to ablate; "
                             + ("list other layers (--layers)" if config.layers is not None else "use a model with more layers"))
    if not kept:
        raise FeatsteerError(
            f"no candidate direction passed the filters (KL <= {config.kl_threshold}, induces refusal, layer < {max_layer}); "
            "raise --kl-threshold or use more prompts"
        )
    chosen = min(kept, key=lambda c: c.refusal_ablated)
    per_prompt["ablated"] = {i: v for i, v in per_prompt["ablated"].items() if i in per_prompt["kl"]}  # finalists only
    return Selection(scores, chosen, float(base_harmful.mean()), float(refusal_score(base_harmless_logprobs, tokens).mean()),
                     config, per_prompt, base)
