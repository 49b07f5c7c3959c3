"""Refusal direction optimisation: a direction trained by gradient descent instead of read off two means.

The difference in means is the best single direction for telling the classes apart on average, not the direction
whose removal does the least harm: on Qwen2.5-Coder-0.5B ablating it leaves 7/100 refused at first-token KL 0.14 on
harmless prompts. Wollschläger et al. 2025 ("The Geometry of Refusal in Large Language Models") train the direction
itself for what abliteration needs, starting from DIM. Three losses, each on the model's own answers, fed back as the
token ids it generated (teacher forcing), its end-of-turn token included where it ended its turn within the
`target_tokens` it was given, so the direction is trained on ending the turn as well as on what is said:

- **ablation**: with the direction removed from every residual write (what `Ablate()` and the weight edit do), the
  model should say what the DIM-ablated model said to the harmful training prompts, where that was not a refusal
  (cross-entropy of those answers' tokens);
- **addition**: with the direction added at the DIM hook, scaled to the DIM mean difference's length, the model
  should say what the DIM-added model said to the harmless training prompts, where that was a refusal (so the
  direction keeps meaning refusal and does not drift to anything whose removal breaks the refusal tokens);
- **retain**: with the direction removed, the next-token distributions along the unedited model's own answers to the
  harmless training prompts should stay put: KL(unedited || ablated) at the prompt's last token and each answer
  token. This is the cost that first-token KL measures, but on the training prompts and along the answer.

A fourth loss is ours and off by default (`refusal_weight`):

- **refusal**: with the direction removed, the first response token of every harmful training prompt should not open
  a refusal: `-log(1 - P(refusal))`, `P` the first-token mass on the refusal tokens (`RefusalTokens`, the selection's
  refusal score). The ablation loss has no target for a prompt the DIM-ablated model still refuses and reads the
  refusal decision as one of 16 answer tokens; this loss reads every harmful prompt, at the token that decides.

The ablation loss's targets can also be made by rule instead of generated (`ablation_targets="affirm"`): an opening
that restates each harmful request as the thing handed over ("Sure, here is a script that ...",
`directions.affirmative_opening`). The DIM-ablated answers include ones that turn the request into its safe side, and
training on them teaches that too. These openings are the one target known only as text: each is tokenized on its own
and cut to `target_tokens`, and, being the start of an answer, has no end-of-turn token.

The direction is `p / |p|` for a free parameter `p` started at the DIM direction, trained with Adam on mini-batches.
Snapshots at chosen steps (step 0 is DIM itself) let a caller pick on validation prompts how far to go
(`compare`'s `dim_optimized_abliteration`), so the method is never forced further from DIM than the validation
prompts reward. Targets differ from the paper's in two ways: they are filtered with the refusal detector (the paper
keeps every DIM-ablated answer), and the retain loss reads the greedy answers of the unedited model, as
`evaluation.response_kl` does.

Usage::

    result = find_refusal_direction(model, harmful, harmless)
    optimized = optimize_direction(model, result, OptimizeConfig(steps=24))
    with apply_edit(model, optimized.direction, EditConfig()):
        ...
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from featsteer.directions.affirm import affirmative_opening
from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import RefusalTokens, refusal_log_odds
from featsteer.evaluation.refusal import RefusalDetector
from featsteer.interventions.steering import Ablate, AddDirection, steer
from featsteer.models import ModelAdapter
from featsteer.models.adapter import EncodedPrompts, Generation, TokenBatch, token_budget_batches
from featsteer.models.chat import plain_token_ids

if TYPE_CHECKING:
    from featsteer.pipeline import DirectionResult

logger = logging.getLogger(__name__)


ABLATION_TARGETS = ("ablated", "affirm")
"""`OptimizeConfig.ablation_targets` choices."""


@dataclass(frozen=True)
class OptimizeConfig:
    """How the direction is trained. Defaults: the paper's learning rate and ablation/addition weights, a retain weight of 3
    instead of its 1, and fewer prompts and steps, so that a 0.5B model trains in about 15 minutes on a CPU. On
    Qwen2.5-Coder-0.5B retain weight 3 with 24 steps gave lower validation KL at every snapshot than weight 1 with 48 steps
    (`benchmarks/results/optimized_qwen{,_retain3}.md`)."""

    steps: int = 24
    """Adam steps (each reads one mini-batch of every loss's prompts)."""
    lr: float = 0.01
    """Adam learning rate on the unnormalised parameter (which starts at unit length)."""
    batch_size: int = 8
    """Prompts per loss per step."""
    n_prompts: int = 128
    """Training prompts per class read (the first ones of each training set)."""
    target_tokens: int = 16
    """Answer tokens each loss reads: the generation cap of the targets (an answer that ends its turn before it has its
    end-of-turn token as its last target) and so the retain loss's positions."""
    ablation_weight: float = 1.0
    """Weight of the ablation loss (cross-entropy of the DIM-ablated model's non-refusing harmful answers, or of the
    harmful prompts' affirmative openings; `ablation_targets`)."""
    addition_weight: float = 0.2
    """Weight of the addition loss (cross-entropy of the DIM-added model's refusals of harmless prompts)."""
    retain_weight: float = 3.0
    """Weight of the retain loss (KL from the unedited model along its harmless answers)."""
    refusal_weight: float = 0.0
    """Weight of the refusal loss (`-log(1 - P(refusal))` of the ablated model's first response token, every harmful
    training prompt read); 0: off, the paper's three losses only."""
    retain_first_weight: float = 1.0
    """How many answer positions the prompt's last position counts as in the retain loss. Its next-token distribution is
    the first generated token's, the one first-token KL reads; at 1 it is one of `target_tokens` equal positions, at
    `target_tokens - 1` half the retain loss."""
    ablation_targets: str = "ablated"
    """What the ablation loss teaches the direction-removed model to say to the harmful training prompts. "ablated": the
    DIM-ablated model's answers where they are not refusals (the paper's targets, filtered). "affirm": an opening that
    restates the request as the thing handed over ("Sure, here is a script that ...", `directions.affirmative_opening`),
    for every harmful prompt; the DIM-ablated answers include ones that turn the request into its safe side, and
    training on them teaches that too."""
    snapshots: tuple[int, ...] | None = None
    """Steps after which the direction is kept (0: the start). None: 0 and every quarter of `steps`."""
    seed: int = 0
    """Seeds the mini-batch order."""
    max_batch_tokens: int | None = 4096
    """Cap on one forward pass's padded tokens (rows x longest prompt with its target): a mini-batch over it runs in
    parts, longest prompts first, whose gradients add up to the whole batch's (each loss is a mean over target tokens,
    so each part counts by its share of them). The autograd graph grows with the padded tokens: one 2,000-token
    IFBench prompt padding a batch of 8 took Qwen2.5-Coder-0.5B past 24 GB. None: never split."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise FeatsteerError(f"steps must be at least 1, got {self.steps}")
        for name in ("batch_size", "n_prompts", "target_tokens"):
            if getattr(self, name) < 1:
                raise FeatsteerError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise FeatsteerError(f"max_batch_tokens must be at least 1 (or None for no cap), got {self.max_batch_tokens}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise FeatsteerError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.retain_first_weight) and self.retain_first_weight > 0):
            raise FeatsteerError(f"retain_first_weight must be a positive number (1: the first position counts as any other), "
                                 f"got {self.retain_first_weight}")
        weights = (self.ablation_weight, self.addition_weight, self.retain_weight, self.refusal_weight)
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise FeatsteerError(f"loss weights must be finite and >= 0, got ablation {self.ablation_weight}, addition "
                                 f"{self.addition_weight}, retain {self.retain_weight}, refusal {self.refusal_weight}")
        if self.ablation_weight == 0 and self.addition_weight == 0 and self.refusal_weight == 0:
            raise FeatsteerError("ablation_weight, addition_weight and refusal_weight are all 0: nothing ties the direction to "
                                 "refusal (the retain loss alone is smallest for a direction nothing writes); give one of them a weight")
        if self.ablation_targets not in ABLATION_TARGETS:
            raise FeatsteerError(f"ablation_targets must be one of {', '.join(ABLATION_TARGETS)}, got {self.ablation_targets!r}")
        if self.snapshots is not None:
            object.__setattr__(self, "snapshots", tuple(sorted({int(s) for s in self.snapshots})))
            if any(s < 0 or s > self.steps for s in self.snapshots):
                raise FeatsteerError(f"snapshots must lie in 0..steps ({self.steps}), got {list(self.snapshots)}")

    def snapshot_steps(self) -> tuple[int, ...]:
        """The steps whose direction is kept (always including the last)."""
        chosen = self.snapshots if self.snapshots is not None else (0, *(round(self.steps * q / 4) for q in (1, 2, 3, 4)))
        return tuple(sorted({*chosen, self.steps}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def with_options(self, options: Sequence[str], what: str = "optimize option") -> OptimizeConfig:
        """A copy with `KEY=VALUE` strings applied (the CLI's `--optimize-option`), each value read as its field's type;
        `max_batch_tokens=none` lifts the cap. `snapshots` is not settable this way (`steps` places them). `what` names
        the option in error messages.

        Raises:
            FeatsteerError: on a malformed item, an unknown field, a value of the wrong type or an invalid config.
        """
        settable = [name for name in _FIELD_TYPES if name != "snapshots"]
        values: dict[str, Any] = {}
        for item in options:
            key, sep, text = (part.strip() for part in item.partition("="))
            if not sep or not key or not text:
                raise FeatsteerError(f"{what} {item!r}: expected KEY=VALUE, e.g. retain_weight=3")
            if key not in settable:
                raise FeatsteerError(f"{what} {item!r}: unknown field {key!r}; use one of {', '.join(settable)}")
            if key == "max_batch_tokens" and text.lower() == "none":
                values[key] = None
                continue
            if _FIELD_TYPES[key] == "str":
                values[key] = text
                continue
            kind = int if _FIELD_TYPES[key].startswith("int") else float
            try:
                values[key] = kind(text)
            except ValueError:
                raise FeatsteerError(f"{what} {item!r}: {key} takes {'a whole number' if kind is int else 'a number'}") from None
        return replace(self, **values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizeConfig:
        """Inverse of `to_dict`."""
        data = dict(data)
        if data.get("snapshots") is not None:
            data["snapshots"] = tuple(data["snapshots"])
        return cls(**data)


_FIELD_TYPES = {f.name: str(f.type) for f in fields(OptimizeConfig)}  # annotations as written ("int", "int | None", "float")


@dataclass(frozen=True)
class OptimizedDirection:
    """A trained direction, its snapshots and the training record (`optimize_direction`)."""

    direction: Tensor
    """`(d_model,)` float32 unit vector after the last step."""
    start: Tensor
    """`(d_model,)` float32 unit vector it started from (the chosen DIM direction)."""
    snapshots: dict[int, Tensor]
    """Step -> the unit direction after that step (0: the start)."""
    hook: str
    """Where the addition loss adds it (the start direction's hook)."""
    scale: float
    """Length of the added vector (the DIM mean difference's at that hook)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per step: each loss on that step's mini-batch, the weighted total and the cosine with the start."""
    targets: dict[str, int] = field(default_factory=dict)
    """How many prompts each loss had (after the detector's filter) and how many were read."""
    config: OptimizeConfig = field(default_factory=OptimizeConfig)
    seconds: float = 0.0

    def cosine(self, step: int | None = None) -> float:
        """Cosine of the direction after `step` (default: the last) with the start."""
        vector = self.direction if step is None else self.snapshots[step]
        return float(vector.double() @ self.start.double())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (directions as lists are left out; the history is kept)."""
        return {"hook": self.hook, "scale": round(self.scale, 4), "targets": dict(self.targets),
                "config": self.config.to_dict(), "seconds": round(self.seconds, 1),
                "cosine_with_start": {str(step): round(self.cosine(step), 4) for step in self.snapshots},
                "history": [{k: round(v, 5) for k, v in row.items()} for row in self.history]}


@dataclass(frozen=True)
class _Targets:
    prompts: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]
    """Per prompt, the answer's token ids as generated (ending with the end-of-turn token where the answer ended before
    `target_tokens`), or an affirmative opening's tokens."""
    prompt_lengths: tuple[int, ...]
    """Chat-formatted prompt tokens per row, counted once when the targets are made (for the token budget)."""
    system: str | None = None
    """The system prompt the prompts are formatted with: the direction result's (`DirectionResult.system`)."""
    generated: bool = True
    """The tokens are read after the prompt generation starts from (`ModelAdapter.format_prompts(for_generation=True)`),
    where they were generated; False: read where the answer starts (`ModelAdapter.format_prompts`), for an affirmative
    opening's tokens, none (the refusal loss's first token), or a harmony model's answers, which are generated there
    (`_generated`). The two prompts differ only for a harmony model (GPT-OSS)."""
    encoded: EncodedPrompts | None = None
    """The prompts' token ids, tokenized once when the targets are made (`ModelAdapter.encode_prompts`); every mini-batch
    is padded from them (`_batch`) instead of tokenized again each time a prompt is drawn. None: no prompts."""


def optimize_direction(model: ModelAdapter, result: DirectionResult, config: OptimizeConfig | None = None) -> OptimizedDirection:
    """Train a refusal direction from the chosen DIM direction of `result` (see the module docstring).

    Args:
        model: The unedited model (no hooks, weights not edited); it is left so, also after an error.
        result: `find_refusal_direction`'s result; its chosen direction (rank 1) is the start, its chosen hook the
            place the addition loss adds it, its training prompts the prompts every loss reads, formatted with its
            system prompt (`DirectionResult.system`).
        config: Steps, loss weights and so on.

    Returns:
        The trained direction, its snapshots and the per-step losses.

    Raises:
        FeatsteerError: for a rank-k result; when no target survives the detector's filter for every loss with a
            weight; on NaN losses.
    """
    config = config or OptimizeConfig()
    if result.candidates.rank != 1:
        raise FeatsteerError("direction optimisation starts from a rank-1 direction: use a dim, projected, pca or probe method")
    started = time.perf_counter()
    chosen = result.selection.chosen
    hook = chosen.hook
    start = result.chosen_basis[0].float()
    start = start / start.norm()
    scale = result.mean_difference_length(model)
    harmful = list(result.train[0])[: config.n_prompts]
    harmless = list(result.train[1])[: config.n_prompts]
    targets = _make_targets(model, start, hook, scale, harmful, harmless, config, result.system)
    counts = {name: len(t.prompts) for name, t in targets.items() if name != "refusal" or t.prompts}
    counts |= {"harmful_read": len(harmful), "harmless_read": len(harmless)}
    logger.info("direction optimisation: %d ablation targets of %d harmful prompts, %d addition targets and %d retain answers of "
                "%d harmless prompts", counts["ablation"], len(harmful), counts["addition"], counts["retain"], len(harmless))
    weights = {name: getattr(config, f"{name}_weight") if targets[name].prompts else 0.0 for name in _LOSSES}
    if weights["ablation"] == 0 and weights["addition"] == 0 and weights["refusal"] == 0:
        raise FeatsteerError("no ablation or addition targets: the DIM-ablated model refuses every harmful training prompt and the "
                             "DIM-added model refuses no harmless one, so nothing ties a trained direction to refusal; check the "
                             "direction (featsteer directions) before optimising it, or give the refusal loss a weight "
                             "(refusal_weight)")
    extras: dict[str, dict[str, Any]] = {"retain": {"first_weight": config.retain_first_weight}}
    if weights["refusal"]:
        extras["refusal"] = {"tokens": RefusalTokens.for_tokenizer(model.tokenizer)}
    parameter = start.clone().to(model.device).requires_grad_(True)
    optimizer = torch.optim.Adam([parameter], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    orders = {name: _BatchOrder(len(t.prompts), config.batch_size, generator) for name, t in targets.items()}
    keep = set(config.snapshot_steps())
    snapshots = {0: start.clone()} if 0 in keep else {}
    history: list[dict[str, float]] = []
    from tqdm.auto import tqdm

    bar = tqdm(range(1, config.steps + 1), desc="optimise direction", unit="step", disable=not model.show_progress, leave=False)
    with _frozen(model):
        for step in bar:
            optimizer.zero_grad()
            row: dict[str, float] = {}
            for name, weight in weights.items():
                if weight == 0:
                    continue
                row[name] = _accumulate(model, parameter, name, weight, targets[name], orders[name].next(), hook, scale, config, step,
                                        extras.get(name, {}))
            optimizer.step()
            with torch.no_grad():
                unit = (parameter / parameter.norm()).detach().float().cpu()
            row |= {"total": sum(weights[name] * value for name, value in row.items()), "cosine": float(unit.double() @ start.double())}
            history.append(row)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()}, refresh=False)
            if step in keep:
                snapshots[step] = unit.clone()
    return OptimizedDirection(snapshots[config.steps], start, snapshots, hook, scale, history, counts, config,
                              time.perf_counter() - started)


def _accumulate(model: ModelAdapter, parameter: Tensor, name: str, weight: float, targets: _Targets, picked: list[int], hook: str,
                scale: float, config: OptimizeConfig, step: int, extra: dict[str, Any] | None = None) -> float:
    """Back-propagate `weight` x one loss on the picked mini-batch into `parameter`'s gradient, in parts that keep each
    forward pass within `config.max_batch_tokens`; return the loss. Each part's loss is a mean over its target tokens
    and counts by its share of them, so the parts' gradients add up to the whole batch's. `extra`: the loss's own keyword
    arguments (the retain loss's first-position weight, the refusal loss's token sets)."""
    parts = _within_budget(targets, picked, config.max_batch_tokens)
    extra = extra or {}
    first = extra.get("first_weight", 1.0)
    n_tokens = sum(_positions(targets, i, first) for i in picked)
    value = 0.0
    for part in parts:
        direction = parameter / parameter.norm()  # its own graph per part: each backward frees one
        loss = _LOSSES[name](model, direction, targets, part, hook, scale, **extra)
        if not bool(torch.isfinite(loss)):
            raise FeatsteerError(f"the {name} loss is not finite at step {step}: check the model's dtype (float16 on CPU "
                                 "overflows; use --dtype float32 or bfloat16) and lower lr")
        share = sum(_positions(targets, i, first) for i in part) / n_tokens
        (weight * share * loss).backward()  # one graph at a time: memory of one part of one loss's batch
        value += share * float(loss.detach())
    return value


def _positions(targets: _Targets, i: int, first_weight: float) -> float:
    """How much row `i` counts in a loss's mean: its target tokens, the first one (the prompt's last position) counted
    `first_weight` times (1 for the cross-entropy losses, `retain_first_weight` for the retain loss). The refusal
    loss's rows have no target tokens and read only the prompt's last position: 1 each."""
    return max(len(targets.tokens[i]), 1) - 1 + first_weight


def _within_budget(targets: _Targets, picked: list[int], max_tokens: int | None) -> list[list[int]]:
    """`picked` as one forward batch when its padded prompts and targets fit in `max_tokens`, else split longest first
    (`ModelAdapter.plan_batches`' rule; a prompt over the budget alone)."""
    if max_tokens is None or not picked:
        return [picked]
    lengths = [targets.prompt_lengths[i] + len(targets.tokens[i]) for i in picked]
    if len(picked) * max(lengths) <= max_tokens:
        return [picked]
    return [[picked[j] for j in group] for group in token_budget_batches(lengths, len(picked), max_tokens)]


@contextlib.contextmanager
def _frozen(model: ModelAdapter) -> Iterator[None]:
    """The model's own parameters out of the autograd graph while the direction trains (restored after, also on error)."""
    module = getattr(model, "model", None)
    parameters = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    flags = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)


class _BatchOrder:
    """Mini-batches drawn without replacement, reshuffled after each pass (seeded)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order: list[int] = []

    def next(self) -> list[int]:
        if self.n == 0:
            return []
        picked: list[int] = []
        while len(picked) < min(self.batch_size, self.n):
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
            picked.append(self.order.pop())
        return picked


def _make_targets(model: ModelAdapter, start: Tensor, hook: str, scale: float, harmful: list[str], harmless: list[str],
                  config: OptimizeConfig, system: str | None = None) -> dict[str, _Targets]:
    """Greedy answers of the DIM-ablated model (harmful prompts, kept when not refusals; or every harmful prompt's
    affirmative opening), the DIM-added model (harmless prompts, kept when refusals) and the unedited model (harmless
    prompts, all kept), each as the token ids it generated (`ModelAdapter.generate_with_tokens`): at most
    `target_tokens`, ending with the end-of-turn token where the answer ended within them, every prompt formatted with
    `system`. The detector reads the answers' text. On a harmony model (GPT-OSS) each answer is generated directly after
    the answer opening (`_generated`) and read there."""
    detector = RefusalDetector()
    targets: dict[str, _Targets] = {}
    generated = model.direct_answer_prefill(1) is None  # a harmony model's answers are generated after the answer opening
    # each prompt set tokenized once: every loss's targets are rows of it, and its mini-batches are padded from it. Only a
    # harmony model's two prompts differ, and its answers are generated where the answer starts, as the openings and the
    # refusal loss read them: one encoding serves every loss
    harmful_ids, harmless_ids = _encoded(model, harmful, system, generated), _encoded(model, harmless, system, generated)
    if config.ablation_targets == "affirm":
        openings = [_text_tokens(model, affirmative_opening(p), config.target_tokens) for p in harmful]
        targets["ablation"] = _kept(harmful, harmful_ids, openings, [True] * len(harmful), system, generated=False)
    else:
        with steer(model, Ablate(start)):
            answers = _generated(model, harmful, config, system)
        targets["ablation"] = _kept(harmful, harmful_ids, answers.token_ids,
                                    [_said(a) and not detector.is_refusal(a) for a in answers.texts], system, generated=generated)
    with steer(model, AddDirection(start, scale, where=hook)):
        answers = _generated(model, harmless, config, system)
    targets["addition"] = _kept(harmless, harmless_ids, answers.token_ids, [_said(a) and detector.is_refusal(a) for a in answers.texts],
                                system, generated=generated)
    answers = _generated(model, harmless, config, system)
    targets["retain"] = _kept(harmless, harmless_ids, answers.token_ids, [True] * len(harmless), system, generated=generated)
    read = config.refusal_weight > 0  # no target tokens: the loss reads the first response token, where the answer starts
    targets["refusal"] = _kept(harmful, harmful_ids, [()] * len(harmful), [read] * len(harmful), system,
                               tokenless=True, generated=False)
    return targets


def _generated(model: ModelAdapter, prompts: list[str], config: OptimizeConfig, system: str | None = None) -> Generation:
    """The model's greedy answers to `prompts`, at most `target_tokens` each, as texts and the token ids generated. On a
    harmony model (GPT-OSS) generation starts after the answer opening (`ModelAdapter.direct_answer_prefill`): from the
    generation prompt the first `target_tokens` would be the start of its reasoning, so the losses would teach the
    reasoning and the detector would judge it."""
    return model.generate_with_tokens(prompts, max_new_tokens=config.target_tokens, batch_size=config.batch_size, keep_logits=False,
                                      system=system, prefill=model.direct_answer_prefill(len(prompts)))


def _said(answer: str) -> bool:
    """Does the answer say anything? One that only ends its turn is no target of the cross-entropy losses (the detector
    reads an empty answer as a refusal); the retain loss keeps it, where the position that predicts the end of the turn
    is its one position."""
    return bool(answer.strip())


def _kept(prompts: Sequence[str], encoded: EncodedPrompts | None, answers: Sequence[Sequence[int]], keep: Sequence[bool],
          system: str | None = None, tokenless: bool = False, generated: bool = True) -> _Targets:
    """The rows of `prompts` to `keep` with their answers' ids, and their rows of the prompts' one encoding `encoded`
    (of the generation prompts when the answers were `generated`, else of the prompts ending at the answer's start).
    An answer of no token teaches nothing and is left out, unless the loss reads none (`tokenless`: the refusal loss)."""
    rows = [i for i, k in enumerate(keep) if k and (tokenless or len(answers[i]) > 0)]
    picked = None if encoded is None or not rows else EncodedPrompts(
        [encoded.input_ids[i] for i in rows], [encoded.n_post_instruction[i] for i in rows], None)
    return _Targets(tuple(prompts[i] for i in rows), tuple(tuple(int(t) for t in answers[i]) for i in rows),
                    tuple(len(ids) for ids in picked.input_ids) if picked else (), system, generated, picked)


def _encoded(model: ModelAdapter, prompts: Sequence[str], system: str | None, for_generation: bool) -> EncodedPrompts | None:
    """Each prompt chat-formatted with `system` and tokenized, once (`tokenize` without the padding, `for_generation` as
    there); None for no prompts."""
    return model.encode_prompts(prompts, system, True, None, for_generation=for_generation) if prompts else None


def _batch(model: ModelAdapter, targets: _Targets, picked: list[int]) -> TokenBatch:
    """The picked prompts as `tokenize` gives them (left-padded, in `picked`'s order), padded from the targets' encoding."""
    if targets.encoded is None:
        raise FeatsteerError("these targets hold no prompts: nothing to batch")
    return model.pad_encoded(targets.encoded, picked)


def _text_tokens(model: ModelAdapter, text: str, max_tokens: int) -> tuple[int, ...]:
    """A target known only as text (an affirmative opening), tokenized on its own as plain text and cut to `max_tokens`: it
    has no end-of-turn token. Generated answers are taken as the ids generated instead (`_generated`)."""
    if not text:
        return ()
    return tuple(plain_token_ids(model.tokenizer, text)[:max_tokens])


def _teacher_forced(model: ModelAdapter, targets: _Targets, picked: list[int]) -> Tensor:
    """Logits (with autograd) of the picked prompts followed by their target tokens, from each prompt's last token on:
    column `j` of row `r` predicts target token `j` of `picked[r]`."""
    return model.run_continued(_batch(model, targets, picked), [targets.tokens[i] for i in picked], grad=True)


def _cross_entropy(logits: Tensor, targets: _Targets, picked: list[int]) -> Tensor:
    """Mean cross-entropy per target token over the picked rows."""
    losses = []
    for row, i in enumerate(picked):
        wanted = torch.tensor(targets.tokens[i], dtype=torch.long, device=logits.device)
        losses.append(torch.nn.functional.cross_entropy(logits[row, : len(wanted)].double(), wanted, reduction="sum"))
    return torch.stack(losses).sum() / sum(len(targets.tokens[i]) for i in picked)


def _ablation_loss(model: ModelAdapter, direction: Tensor, targets: _Targets, picked: list[int], hook: str, scale: float) -> Tensor:
    with steer(model, Ablate(direction)):
        logits = _teacher_forced(model, targets, picked)
    return _cross_entropy(logits, targets, picked)


def _addition_loss(model: ModelAdapter, direction: Tensor, targets: _Targets, picked: list[int], hook: str, scale: float) -> Tensor:
    with steer(model, AddDirection(direction, scale, where=hook)):
        logits = _teacher_forced(model, targets, picked)
    return _cross_entropy(logits, targets, picked)


def _retain_loss(model: ModelAdapter, direction: Tensor, targets: _Targets, picked: list[int], hook: str, scale: float,
                 first_weight: float = 1.0) -> Tensor:
    """Mean KL(unedited || ablated) over the prompt's last position and every target position but the last, the first
    of those counted `first_weight` times."""
    continuations = [targets.tokens[i][:-1] for i in picked]
    batch = _batch(model, targets, picked)
    # the unedited pass is repeated whenever a prompt is drawn again: keeping every retain prompt's full-vocabulary
    # distributions instead would hold about 1.2 GB for Qwen's 151k-token vocabulary (128 prompts x 16 positions)
    base = model.run_continued(batch, continuations).double()
    with steer(model, Ablate(direction)):
        edited = model.run_continued(batch, continuations, grad=True).double()
    parts = []
    for row, c in enumerate(continuations):
        columns = slice(0, len(c) + 1)
        base_lp = torch.log_softmax(base[row, columns], dim=-1)
        edited_lp = torch.log_softmax(edited[row, columns], dim=-1)
        per_position = (base_lp.exp() * (base_lp - edited_lp)).sum(dim=-1)
        parts.append(per_position.sum() + (first_weight - 1) * per_position[0])
    return torch.stack(parts).sum() / sum(_positions(targets, i, first_weight) for i in picked)


def _refusal_loss(model: ModelAdapter, direction: Tensor, targets: _Targets, picked: list[int], hook: str, scale: float,
                  tokens: RefusalTokens) -> Tensor:
    """Mean `-log(1 - P(refusal))` of the ablated model's first response token over the picked harmful prompts:
    `softplus` of the refusal log-odds (`evaluation.metrics.refusal_log_odds`), about `P` where a refusal is unlikely."""
    with steer(model, Ablate(direction)):
        logits = model.run(_batch(model, targets, picked), last_only=True, grad=True)[:, -1, :]
    return torch.nn.functional.softplus(refusal_log_odds(logits.double(), tokens)).mean()


_LOSSES = {"ablation": _ablation_loss, "addition": _addition_loss, "retain": _retain_loss, "refusal": _refusal_loss}
