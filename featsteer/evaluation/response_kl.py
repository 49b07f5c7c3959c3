"""KL along the unedited model's own responses: does an edit change more than the first token?

The first-token KL (`featsteer.evaluation.metrics.kl_first_token`) reads one distribution per prompt, the one the
model writes its first response token from. An intervention that leaves that token alone and changes what follows
passes it at almost no cost. Angular steering of the blocks' normalised inputs on the organism is one: its jailbroken
answers start with the refusal's own first token ("I course. Here is ...") because the unembedding still reads the
untouched stream, and its first-token KL on harmless prompts is 0.02 where DIM abliteration's is 0.14.

This module measures the same KL at every position of a response instead. The unedited model's greedy response to
each prompt is fed back (teacher forcing), and KL(base || edited) is taken of the next-token distribution at each of
its first `max_tokens` positions: position 0 is the first-token KL, position j the distribution of token j given the
base response's first j tokens. Both models read the same prefix, so the measure asks "how differently would the
edited model continue what the unedited model said", which stays defined after the two responses part ways. A
response that ended before the cap is scored up to and including the position that predicts its end-of-turn token.

The base model's distributions are kept as each position's `top_k` log-probs plus the rest of the vocabulary lumped
into one outcome. KL over that coarser outcome space is a lower bound of the full KL (the data-processing
inequality) and equals it when the lumped mass is zero; `ResponseKL.tail_mass` reports the base's mean lumped
mass so the slack is visible. The default keeps 1,024 tokens (`benchmarks/results/response_kl_organism.md` measures
the gap). `top_k=None` keeps every token, which is exact and costs `positions x vocab` floats per prompt.

Usage::

    base = response_base(model, harmless, own.response_tokens)  # unedited model, the ids of its own greedy responses
    with steer(model, intervention):
        kl = response_kl(model, base)                     # same prompts and prefixes, under the intervention
    kl.mean, kl.per_position[0]                           # the latter is the first-token KL
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import _prompt_list, response_token_ids
from featsteer.models import ModelAdapter
from featsteer.models.adapter import DEFAULT_BATCH_TOKENS

DEFAULT_TOP_K = 1024
"""Base-model tokens kept per position; the rest of the vocabulary is one lumped outcome."""


@dataclass(frozen=True)
class ResponseBase:
    """The unedited model's next-token distributions along its own responses (`response_base`)."""

    prompts: tuple[str, ...]
    continuations: tuple[tuple[int, ...], ...]
    """Per prompt, the response tokens fed back: all but the last scored position's target (which may be the end-of-turn
    token)."""
    top_ids: tuple[Int[Tensor, "position k"], ...]
    """Per prompt, the base model's kept token ids at each scored position."""
    top_logprobs: tuple[Float[Tensor, "position k"], ...]
    """Their log-probabilities (float64)."""
    tail_logprob: tuple[Float[Tensor, " position"], ...]
    """Log of the probability mass outside the kept tokens (-inf when nothing is left out)."""
    system: str | None = None
    max_tokens: int = 32
    top_k: int | None = DEFAULT_TOP_K
    prefill: tuple[str, ...] | None = None
    """Per prompt, the forced opening the responses were generated after (a prefilled set), read as context."""
    generated: tuple[bool, ...] | None = None
    """Per prompt, True when the response was given as the token ids generation wrote, read after the prompt generation
    started from (`ModelAdapter.format_prompts(for_generation=True)`); False for a text, an answer read where the answer
    starts. They differ only for a harmony model (GPT-OSS); None reads every response as generated ids."""

    @property
    def n_positions(self) -> list[int]:
        """Scored positions per prompt: the response's length up to `max_tokens`, at least 1 (the first token)."""
        return [len(t) for t in self.tail_logprob]

    @property
    def tail_mass(self) -> float:
        """The base model's mean probability outside its kept tokens, over every scored position."""
        return float(torch.cat([t.exp() for t in self.tail_logprob]).mean())


@dataclass(frozen=True)
class ResponseKL:
    """KL(base || edited) along the base model's responses (`response_kl`)."""

    per_prompt: Float[Tensor, " prompt"]
    """Each prompt's KL averaged over its scored positions (float64, nats)."""
    per_position: Float[Tensor, " position"]
    """Mean KL at each position over the prompts whose response reaches it; entry 0 is the first-token KL."""
    n_at_position: Int[Tensor, " position"]
    """How many prompts have each position."""
    tail_mass: float
    """The base model's mean probability outside its kept tokens: the most the lower bound can leave out weight on."""

    @property
    def mean(self) -> float:
        """Mean over prompts of each prompt's per-position mean (every prompt weighs the same)."""
        return float(self.per_prompt.mean())

    def answered(self, base_refused: Sequence[bool]) -> float | None:
        """The mean over the prompts the unedited model answers (see `metrics.kl_answered`); None if it refuses all."""
        if len(base_refused) != len(self.per_prompt):
            raise FeatsteerError(f"base_refused has {len(base_refused)} flags for {len(self.per_prompt)} prompts: give one per prompt")
        keep = ~torch.tensor([bool(r) for r in base_refused], dtype=torch.bool)
        return float(self.per_prompt[keep].mean()) if keep.any() else None


def _scored_logprobs(model: ModelAdapter, prompts: list[str], continuations: list[tuple[int, ...]], system: str | None,
                     batch_size: int, prefill: Sequence[str] | None = None,
                     generated: Sequence[bool] | None = None) -> Iterator[tuple[int, Tensor]]:
    """Per prompt, its index and `(len(continuation) + 1, vocab)` float64 log-probs predicting the first response token
    and each continuation token's successor (the columns from the prompt's last token, or its prefill's, on). Prompts
    run in length-sorted batches (`ModelAdapter.token_batches`), so a long prompt pads only its neighbours. `generated`
    (`ResponseBase.generated`) picks each prompt's text."""
    flags = [True] * len(prompts) if generated is None else list(generated)
    for indices, batch in model.token_batches(prompts, batch_size, DEFAULT_BATCH_TOKENS, system, prefill=prefill, for_generation=flags):
        logits = model.run_continued(batch, [continuations[i] for i in indices])
        for row, i in enumerate(indices):
            rows = logits[row, : len(continuations[i]) + 1].double()
            if bool(torch.isnan(rows).any()):
                raise FeatsteerError(f"the model gave NaN logits on prompt {i}: check the model's weights "
                                     "(or the intervention) before measuring KL")
            yield i, torch.log_softmax(rows, dim=-1).cpu()


def response_base(
    model: ModelAdapter,
    prompts: Sequence[str],
    responses: Sequence[str | Sequence[int]],
    *,
    max_tokens: int = 32,
    top_k: int | None = DEFAULT_TOP_K,
    batch_size: int = 8,
    system: str | None = None,
    prefill: Sequence[str] | None = None,
) -> ResponseBase:
    """Record the unedited model's next-token distributions along its responses, for `response_kl`.

    Each response is the token ids the model generated, or a text tokenized on its own as plain text (`response_token_ids`),
    cut to `max_tokens`; the scored positions are the end of the prompt and each kept response token but the last, so
    a response of `n` tokens gives `n` positions (an empty response gives 1: the first token). Pass the model's own
    greedy responses as the ids it generated (`SetResult.response_tokens`), with the same chat template and system
    prompt: they end with the end-of-turn token where the model stopped before the cap, so the position that predicts
    it is scored too (an edit that keeps the model from ending its turn shows there), and they are what the model
    read, where the decoded, stripped text can tokenize into other tokens. A text has no end-of-turn token.

    Args:
        model: The unedited model (no hooks, weights not edited).
        prompts: User instructions; chat-formatted with the model's template.
        responses: One response per prompt, normally the model's own token ids; or texts.
        max_tokens: Positions scored per prompt, at most.
        top_k: Base tokens kept per position (the rest is lumped); None keeps the whole vocabulary (exact KL).
        batch_size: Prompts per forward pass.
        system: Optional system prompt.
        prefill: For a prefilled set (`GenerationConfig.prefill`), each response's forced opening, one per prompt
            (`SetResult.openings`): the responses are read after prompt + opening, where they were generated; the
            opening itself is not scored.

    Raises:
        FeatsteerError: On empty or mismatched inputs, bad token ids, a bad `max_tokens`/`top_k`/`batch_size`, or NaN
            logits.
    """
    prompt_items = _prompt_list(prompts)
    response_items = _prompt_list(responses, "responses")
    if len(prompt_items) != len(response_items):
        raise FeatsteerError(f"got {len(prompt_items)} prompts but {len(response_items)} responses: pass one response per prompt")
    openings = None if prefill is None else tuple(str(text) for text in prefill)
    if openings is not None and len(openings) != len(prompt_items):
        raise FeatsteerError(f"got {len(prompt_items)} prompts but {len(openings)} prefill texts; pass one prefill per prompt (or none)")
    if max_tokens < 1:
        raise FeatsteerError(f"max_tokens must be at least 1 (the first response token), got {max_tokens}")
    if top_k is not None and top_k < 1:
        raise FeatsteerError(f"top_k must be at least 1 (or None to keep every token), got {top_k}")
    if batch_size < 1:
        raise FeatsteerError(f"batch_size must be at least 1, got {batch_size}")
    continuations = []
    for i, response in enumerate(response_items):
        tokens = response_token_ids(model, response, f"response {i}")
        continuations.append(tuple(tokens[: min(len(tokens), max_tokens) - 1]))  # n tokens: n scored positions
    n = len(prompt_items)
    ids: list[Tensor] = [torch.empty(0)] * n
    logprobs: list[Tensor] = [torch.empty(0)] * n
    tails: list[Tensor] = [torch.empty(0)] * n
    generated = tuple(not isinstance(response, str) for response in response_items)
    for i, lp in _scored_logprobs(model, prompt_items, continuations, system, batch_size, openings, generated):
        k = lp.shape[-1] if top_k is None else min(top_k, lp.shape[-1])
        top, index = lp.topk(k, dim=-1)
        ids[i], logprobs[i] = index, top
        tails[i] = torch.logsumexp(lp.scatter(-1, index, float("-inf")), dim=-1)
    return ResponseBase(tuple(prompt_items), tuple(continuations), tuple(ids), tuple(logprobs), tuple(tails), system, max_tokens,
                        top_k, openings, generated)


def response_kl(model: ModelAdapter, base: ResponseBase, *, batch_size: int = 8) -> ResponseKL:
    """KL(base || edited) of the next-token distribution at each scored position of the base model's responses.

    Reads the model as it currently is: call it inside the intervention's context (hooks) or after a weight edit.
    Interventions that act only on generated tokens act on the response's tokens here (see
    `ModelAdapter.run_continued`).

    Args:
        model: The edited model (the same tokenizer as the base).
        base: From `response_base` on the unedited model.
        batch_size: Prompts per forward pass.

    Returns:
        Per-prompt and per-position KL in nats, and the base's mean lumped mass.

    Raises:
        FeatsteerError: On a bad `batch_size` or NaN logits.
    """
    if batch_size < 1:
        raise FeatsteerError(f"batch_size must be at least 1, got {batch_size}")
    rows: list[Tensor] = [torch.empty(0)] * len(base.prompts)
    for i, lq in _scored_logprobs(model, list(base.prompts), list(base.continuations), base.system, batch_size, base.prefill,
                                  base.generated):
        if lq.shape[-1] <= int(base.top_ids[i].max()):
            raise FeatsteerError(f"the edited model's vocabulary ({lq.shape[-1]}) is smaller than the base's: "
                                 "compare a model with an edit of itself")
        rows[i] = _lumped_kl(base.top_logprobs[i], base.tail_logprob[i], base.top_ids[i], lq)
    per_prompt = [float(kl.mean()) for kl in rows]
    longest = max(len(r) for r in rows)
    sums = torch.zeros(longest, dtype=torch.float64)
    counts = torch.zeros(longest, dtype=torch.long)
    for kl in rows:
        sums[: len(kl)] += kl
        counts[: len(kl)] += 1
    return ResponseKL(torch.tensor(per_prompt, dtype=torch.float64), sums / counts, counts, base.tail_mass)


def _lumped_kl(top_lp: Tensor, tail_lp: Tensor, top_ids: Tensor, edited_lp: Tensor) -> Tensor:
    """Per position, KL between the base's kept tokens + lumped rest and the edited model's on the same outcomes."""
    q_top = edited_lp.gather(-1, top_ids)
    q_tail = torch.logsumexp(edited_lp.scatter(-1, top_ids, float("-inf")), dim=-1)
    p_top = top_lp.exp()
    kept = torch.where(p_top > 0, p_top * (top_lp - q_top), torch.zeros((), dtype=torch.float64)).sum(-1)
    p_tail = tail_lp.exp()
    lumped = torch.where(p_tail > 0, p_tail * (tail_lp - q_tail), torch.zeros((), dtype=torch.float64))
    return (kept + lumped).clamp_min(0.0)
