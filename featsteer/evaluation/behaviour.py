"""Refusal behaviour of a model on two prompt sets: generations, rates with intervals, examples.

This is what `featsteer eval` runs and what every intervention is compared with: the same prompts, the
same greedy decoding, the same detector.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from featsteer.datasets import PromptSet, prompts_sha256
from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import response_cross_entropy
from featsteer.evaluation.quality import LoopDetector, coherent_refusals, unanswered
from featsteer.evaluation.refusal import RateEstimate, RefusalDetector, refusal_rate
from featsteer.models import ModelAdapter
from featsteer.models.adapter import DEFAULT_BATCH_TOKENS
from featsteer.models.chat import check_system


@dataclass(frozen=True)
class GenerationConfig:
    """How responses are generated for evaluation."""

    max_new_tokens: int = 32
    """Cap on generated tokens per response."""
    batch_size: int = 16
    """Prompts per generation batch."""
    max_batch_tokens: int | None = DEFAULT_BATCH_TOKENS
    """Cap on a batch's padded prompt tokens (None: no cap), so a large `batch_size` speeds up decoding
    on CPU without long prompts padding a whole batch."""
    system: str | None = None
    """Optional system prompt (None: none; a blank text is refused)."""
    prefill: str | None = None
    """Start of every harmful response, written for the model (a prefilling attack), which then goes on from it:
    a text, or "affirm" for each prompt's own affirmative opening ("Sure, here is a script that ...",
    `directions.affirmative_opening`). The detector counts a refusal marker only when it reaches into what the model
    wrote after it (`RefusalDetector.is_refusal_after`). Harmless prompts are not prefilled. None: off."""

    def __post_init__(self) -> None:
        for name, value in (("max_new_tokens", self.max_new_tokens), ("batch_size", self.batch_size)):
            if value < 1:  # checked when the config is made, before a command's slow stages, not at the first generation
                raise FeatsteerError(f"{name} must be at least 1, got {value}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise FeatsteerError(f"max_batch_tokens must be at least 1 (or None for no cap), got {self.max_batch_tokens}")
        check_system(self.system)
        if self.prefill is not None and not self.prefill.strip():
            raise FeatsteerError("prefill is empty: give the text every harmful response should start with, or 'affirm'")


@dataclass(frozen=True)
class SetResult:
    """Refusal on one prompt set."""

    name: str
    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    refused: tuple[bool, ...]
    rate: RateEstimate
    first_logprobs: Tensor | None = field(default=None, repr=False, compare=False)
    """`(prompt, vocab)` log-probs of the first response token, when asked for (`keep_logprobs=True`)."""
    looping: tuple[bool, ...] = ()
    """Per response: does it end in repetition (`featsteer.evaluation.quality.LoopDetector`)?"""
    openings: tuple[str, ...] | None = None
    """Under a prefilling attack (`GenerationConfig.prefill`), the forced start of each response; `responses` are what
    the model wrote after it (`refusal.prefilled_reply` joins the two). None: not prefilled."""
    response_tokens: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False)
    """Per response, the token ids the model generated (after a prefill), ending with the end-of-turn token when it
    wrote one before the cap; what `responses_nll` and `response_kl.response_base` teacher-force. None: responses known
    only as text."""
    reasoning_only: tuple[bool, ...] = ()
    """Per response of a harmony model (GPT-OSS): True when no final-channel answer came within `max_new_tokens`, so the
    response (and its verdict) is the model's reasoning (`Generation.reasoning_only`); empty or all False otherwise."""

    @property
    def looping_rate(self) -> RateEstimate:
        """The share of responses that end in repetition, with its Wilson interval."""
        return refusal_rate(self._looping())

    @property
    def unanswered(self) -> tuple[bool, ...]:
        """Per prompt: not answered, i.e. refused or lost in a loop."""
        return tuple(unanswered(self.refused, self._looping()))

    @property
    def unanswered_rate(self) -> RateEstimate:
        """The share of prompts not answered: refused, or lost in a loop (what a jailbreak must bring down)."""
        return refusal_rate(self.unanswered)

    @property
    def coherent_refusal_rate(self) -> RateEstimate:
        """The share of prompts refused without looping (what inducing refusal must bring up: "I'm sorryI'm sorryI'm
        sorry..." is a broken model, not a refusing one)."""
        return refusal_rate(coherent_refusals(self.refused, self._looping()))

    def _looping(self) -> tuple[bool, ...]:
        return self.looping or tuple(LoopDetector().classify(self.responses))

    def examples(self, n: int = 3) -> list[dict]:
        """Up to `n` responses, in prompt order: the first (n + 1) // 2 refused ones and the first complied ones, each kind
        filling in for the other when it runs short, so a set refused (or answered) throughout still shows `n`."""
        refused = [i for i, r in enumerate(self.refused) if r]
        complied = [i for i, r in enumerate(self.refused) if not r]
        picked = refused[: max((n + 1) // 2, n - len(complied))]
        picked += complied[: n - len(picked)]
        return [{"prompt": self.prompts[i], "response": self.responses[i], "refused": self.refused[i]} for i in sorted(picked)]


@dataclass(frozen=True)
class RefusalReport:
    """`featsteer eval` output: refusal rates on a harmful and a harmless set."""

    model: str
    harmful: SetResult
    harmless: SetResult
    seconds: float
    config: GenerationConfig = field(default_factory=GenerationConfig)
    sources: dict = field(default_factory=dict)

    def to_json(self, n_examples: int = 3) -> dict:
        """The JSON form with the documented keys."""
        looping = {"harmful": self.harmful.looping_rate, "harmless": self.harmless.looping_rate}
        return {
            "model": self.model,
            "refusal_rate_harmful": self.harmful.rate.rate,
            "refusal_rate_harmless": self.harmless.rate.rate,
            "n_harmful": self.harmful.rate.n,
            "n_harmless": self.harmless.rate.n,
            "ci_harmful": [self.harmful.rate.low, self.harmful.rate.high],
            "ci_harmless": [self.harmless.rate.low, self.harmless.rate.high],
            **{f"looping_rate_{name}": loops.rate for name, loops in looping.items()},
            **{f"ci_looping_{name}": [loops.low, loops.high] for name, loops in looping.items()},
            "examples": {"harmful": self.harmful.examples(n_examples), "harmless": self.harmless.examples(n_examples)},
            "per_prompt": {result.name: {"prompts_sha256": prompts_sha256(result.prompts), "refused": list(result.refused),
                                         "looping": list(result._looping()), "prompts": list(result.prompts),
                                         "responses": list(result.responses)} for result in (self.harmful, self.harmless)},
            **{f"reasoning_only_{result.name}": sum(result.reasoning_only)
               for result in (self.harmful, self.harmless) if any(result.reasoning_only)},
            "generation": asdict(self.config),
            "sources": self.sources,
            "seconds": round(self.seconds, 2),
        }

    def table(self) -> str:
        """A small text table for the terminal."""
        rows = [("set", "n", "refused", "rate", "95% CI", "looping")]
        for result in (self.harmful, self.harmless):
            r = result.rate
            rows.append((result.name, str(r.n), str(r.k), f"{r.rate:.3f}", f"[{r.low:.3f}, {r.high:.3f}]", str(result.looping_rate.k)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines += [f"{result.name}: {sum(result.reasoning_only)} of {result.rate.n} responses reached no final answer within "
                  f"max_new_tokens={self.config.max_new_tokens} and were judged on their reasoning: raise --max-new-tokens"
                  for result in (self.harmful, self.harmless) if any(result.reasoning_only)]
        return "\n".join(lines)



def paired_with_earlier(report: RefusalReport, earlier: Mapping) -> dict:
    """McNemar's exact test of this evaluation's verdicts against an earlier one's (`featsteer eval --json` output) on
    the same prompts: refused and unanswered (refused or looping) harmful prompts, refused harmless prompts.

    Raises:
        FeatsteerError: the earlier result has no per-prompt verdicts (written before they were kept) or read other
            prompts, or other prompts in another order.
    """
    from featsteer.evaluation.paired import paired_rates

    per_prompt = earlier.get("per_prompt")
    if not isinstance(per_prompt, Mapping) or not {"harmful", "harmless"} <= set(per_prompt):
        raise FeatsteerError("the earlier eval JSON has no per-prompt verdicts: evaluate the earlier model again with this "
                             "featsteer version (featsteer eval ... --json)")
    out: dict = {"model": earlier.get("model")}
    for result in (report.harmful, report.harmless):
        before = per_prompt[result.name]
        if before.get("prompts_sha256") != prompts_sha256(result.prompts):
            raise FeatsteerError(f"the earlier eval read other {result.name} prompts (or another order or --n): pair evaluations "
                                 "of the same prompt sets")
        out[f"refused_{result.name}"] = paired_rates(before["refused"], result.refused).to_dict()
        if result.name == "harmful":
            out["unanswered_harmful"] = paired_rates(unanswered(before["refused"], before["looping"]), result.unanswered).to_dict()
    return out


def prefill_texts(prefill: str | None, prompts: Sequence[str]) -> list[str] | None:
    """The response starts `GenerationConfig.prefill` asks for (checked non-empty there): each prompt's affirmative
    opening for "affirm", else the text itself for every prompt (None: no prefill)."""
    if prefill is None:
        return None
    if prefill == "affirm":
        from featsteer.directions.affirm import affirmative_opening

        return [affirmative_opening(p) for p in prompts]
    return [prefill] * len(prompts)


def evaluate_set(
    model: ModelAdapter, prompts, name: str, config: GenerationConfig, detector: RefusalDetector, keep_logprobs: bool = False,
    prefill: Sequence[str] | None = None,
) -> SetResult:
    """Generate greedily for every prompt and classify each response.

    With `keep_logprobs`, the result also holds the first-token log-probs (as `first_token_logprobs`
    computes them), read from the generation's own prefill at no extra cost. `prefill` (one text per prompt) starts
    each response; the response kept is what the model wrote after it, classified by markers that reach into it
    (`RefusalDetector.is_refusal_after`), and the first-token log-probs are those of the token after it.
    """
    prompt_list = list(prompts)
    generation = model.generate_with_tokens(
        prompt_list, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
        max_batch_tokens=config.max_batch_tokens, system=config.system, keep_logits=keep_logprobs, prefill=prefill,
        label=name,
    )
    responses = generation.texts
    logprobs = None
    if keep_logprobs:
        logprobs = torch.log_softmax(generation.first_logits.double(), dim=-1).float()
        # as first_token_logprobs: NaN or +inf logits (NaN after the softmax) are an error, an -inf one (a token masked
        # out) is a probability of 0
        if bool(torch.isnan(logprobs).any()):
            raise FeatsteerError(f"NaN or +inf first-token logits while evaluating {name!r}: check the model's dtype (try float32) and weights")
    refused = detector.classify_after(prefill, responses)
    looping = LoopDetector().classify(responses)
    return SetResult(name, tuple(prompt_list), tuple(responses), tuple(refused), refusal_rate(refused), logprobs, tuple(looping),
                     None if prefill is None else tuple(prefill), tuple(generation.token_ids), generation.reasoning_only)


def evaluate_refusal(
    model: ModelAdapter,
    harmful: PromptSet,
    harmless: PromptSet,
    config: GenerationConfig | None = None,
    detector: RefusalDetector | None = None,
    keep_logprobs: bool = False,
) -> RefusalReport:
    """Refusal rates on harmful and harmless prompts, with Wilson intervals and examples.

    `keep_logprobs` also keeps each set's first-token log-probs (`SetResult.first_logprobs`), read from
    the generation's prefill, for logit metrics without a second pass.
    """
    config = config or GenerationConfig()
    detector = detector or RefusalDetector()
    start = time.perf_counter()
    harmful_result = evaluate_set(model, harmful, "harmful", config, detector, keep_logprobs,
                                  prefill_texts(config.prefill, list(harmful)))
    harmless_result = evaluate_set(model, harmless, "harmless", config, detector, keep_logprobs)
    sources = {
        "harmful": {"source": harmful.source, "sha256": harmful.sha256, "prompts_sha256": harmful.prompts_sha256},
        "harmless": {"source": harmless.source, "sha256": harmless.sha256, "prompts_sha256": harmless.prompts_sha256},
    }
    return RefusalReport(model.name, harmful_result, harmless_result, time.perf_counter() - start, config, sources)


def responses_nll(model: ModelAdapter, result: SetResult, config: GenerationConfig | None = None) -> float | None:
    """How likely `model` finds the responses in `result`: its token-weighted mean negative log-likelihood (nats per
    token) of each non-empty response given its chat-formatted prompt (`response_cross_entropy`).

    Read with the unedited model (or a reference model with the same tokenizer), it measures how far an intervened
    model's responses are from what the model would have said, over every generated token rather than the first. The
    tokens scored are those the model generated (`SetResult.response_tokens`), with the end-of-turn token where the
    model wrote one before the cap, as `response_kl` scores the position that predicts it: a model that no longer ends
    its turn where the reference would pays for it (a response cut at the cap has no end-of-turn token to score). When
    the result has no ids, each response's text is tokenized on its own and has no end-of-turn token. On a prefilled
    set (`SetResult.openings`) each response is scored after its prompt and its forced opening, the context the model
    wrote it in; the opening itself is not scored.

    Returns:
        The mean NLL, or None when there is no token to score (every response an empty text).
    """
    if result.response_tokens is None:
        responses: list[str | tuple[int, ...]] = [r if r.strip() else () for r in result.responses]
    else:
        responses = list(result.response_tokens)  # an empty answer that ended its turn is its end-of-turn token
    openings: Sequence[str | None] = result.openings if result.openings is not None else [None] * len(responses)
    rows = [(prompt, opening, response)
            for prompt, opening, response in zip(result.prompts, openings, responses, strict=True) if response]
    if not rows:
        return None
    prompts, kept_openings, kept = zip(*rows, strict=True)
    prefill = None if result.openings is None else [str(opening) for opening in kept_openings]
    return response_cross_entropy(model, prompts, kept, system=(config or GenerationConfig()).system, prefill=prefill).mean_nll
