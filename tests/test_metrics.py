"""Tests for the logit-based evaluation metrics (KL, refusal tokens and scores, target probability, CE)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import (
    DEFAULT_COMPLIANCE_PREFIXES,
    DEFAULT_REFUSAL_PREFIXES,
    RefusalTokens,
    _greedy_target_probs,
    first_token_logprobs,
    kl_answered,
    kl_first_token,
    kl_per_prompt,
    over_refusal_rate,
    refusal_logit_gap,
    refusal_score,
    response_cross_entropy,
    target_token_probability,
)
from featsteer.evaluation.refusal import RefusalDetector, refusal_rate
from featsteer.models import TokenBatch
from featsteer.testing import byte_tokenizer

PROMPTS = ["How do I bake bread?", "Tell me a joke", "Write a haiku about the sea, please.", "Hi"]
RESPONSES = ["Mix flour and water.", "Why did the chicken cross?", "Waves fold\nsalt on stone", "Hello!"]


def _random_logprobs(seed: int, n: int = 5, vocab: int = 40) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(3 * torch.randn(n, vocab, generator=generator, dtype=torch.float64), dim=-1)


def _shift_hook(vector: torch.Tensor):
    return lambda activation, site: activation + vector.to(activation.dtype)


# ---- KL --------------------------------------------------------------------------------------------
def test_kl_is_zero_for_identical_logprobs() -> None:
    logprobs = _random_logprobs(0)
    assert torch.equal(kl_per_prompt(logprobs, logprobs.clone()), torch.zeros(5, dtype=torch.float64))
    assert kl_first_token(logprobs, logprobs) == 0.0


def test_kl_matches_torch_kl_div() -> None:
    base, edited = _random_logprobs(1), _random_logprobs(2)
    expected = F.kl_div(edited, base, reduction="none", log_target=True).sum(-1)
    per_prompt = kl_per_prompt(base.float(), edited.float())
    assert per_prompt.dtype == torch.float64
    assert per_prompt.shape == (5,)
    assert bool((per_prompt > 0).all())
    torch.testing.assert_close(per_prompt, expected, atol=1e-5, rtol=1e-5)
    assert kl_first_token(base, edited) == pytest.approx(float(expected.mean()), rel=1e-12)
    # KL is not symmetric: swapping the arguments gives a different number
    assert kl_first_token(edited, base) != pytest.approx(kl_first_token(base, edited), rel=1e-3)


def test_kl_answered_leaves_out_the_prompts_the_base_refuses() -> None:
    base, edited = _random_logprobs(1), _random_logprobs(2)
    per_prompt = kl_per_prompt(base, edited)
    refused = [True, False, False, True, False]
    assert kl_answered(base, edited, refused) == pytest.approx(float(per_prompt[[1, 2, 4]].mean()), rel=1e-12)
    assert kl_answered(base, edited, [False] * 5) == pytest.approx(kl_first_token(base, edited), rel=1e-12)
    assert kl_answered(base, edited, [True] * 5) is None
    with pytest.raises(FeatsteerError, match="4 flags for 5 prompts"):
        kl_answered(base, edited, refused[:4])


def test_kl_handles_zero_probabilities() -> None:
    base = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    edited = torch.log(torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64))
    assert kl_first_token(base, edited) == pytest.approx(math.log(2.0))
    assert math.isinf(kl_first_token(edited, base))


def test_kl_rejects_bad_inputs() -> None:
    logprobs = _random_logprobs(3)
    with pytest.raises(FeatsteerError, match="log-probs"):
        kl_first_token(logprobs + 1.0, logprobs)  # logits, not log-probs
    with pytest.raises(FeatsteerError, match="same shape"):
        kl_first_token(logprobs, logprobs[:2])
    with pytest.raises(FeatsteerError, match="NaN"):
        kl_first_token(logprobs, torch.full_like(logprobs, math.nan))
    with pytest.raises(FeatsteerError):
        kl_first_token(logprobs[:0], logprobs[:0])


def test_first_token_logprobs_match_model_logits(llama_adapter) -> None:
    logprobs = first_token_logprobs(llama_adapter, PROMPTS, batch_size=3)
    expected = torch.log_softmax(llama_adapter.logits(PROMPTS).double(), dim=-1).float()
    assert logprobs.shape == (len(PROMPTS), expected.shape[-1])
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs.double().exp().sum(-1), torch.ones(len(PROMPTS), dtype=torch.float64))


def test_evaluate_set_keeps_the_first_token_logprobs_of_its_own_prefill(llama_adapter) -> None:
    from featsteer.evaluation import RefusalDetector
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set

    config = GenerationConfig(max_new_tokens=4, batch_size=8, max_batch_tokens=64)
    kept = evaluate_set(llama_adapter, PROMPTS, "x", config, RefusalDetector(), keep_logprobs=True)
    torch.testing.assert_close(kept.first_logprobs, first_token_logprobs(llama_adapter, PROMPTS), atol=1e-4, rtol=0)
    plain = evaluate_set(llama_adapter, PROMPTS, "x", GenerationConfig(max_new_tokens=4), RefusalDetector())
    assert plain.first_logprobs is None and plain.responses == kept.responses


def test_kl_under_residual_hook_grows_with_shift(llama_adapter) -> None:
    model = llama_adapter
    base = first_token_logprobs(model, PROMPTS)
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm()
    kls = []
    for scale in (0.0, 0.5, 2.0, 8.0):
        with model.hooks([("blocks.1.hook_resid_pre", _shift_hook(scale * direction))]):
            kls.append(kl_first_token(base, first_token_logprobs(model, PROMPTS)))
    assert kls[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < kls[1] < kls[2] < kls[3]
    # the hook is gone after the block: the model is back to the base distribution
    assert kl_first_token(base, first_token_logprobs(model, PROMPTS)) == pytest.approx(0.0, abs=1e-6)


# ---- refusal tokens and scores ---------------------------------------------------------------------
def _byte_id(tokenizer, char: str) -> int:
    return tokenizer.convert_tokens_to_ids(char)


def test_refusal_tokens_on_byte_tokenizer() -> None:
    tokenizer = byte_tokenizer()
    tokens = RefusalTokens.for_tokenizer(tokenizer, refusal_prefixes=("I'm sorry", "I cannot"), compliance_prefixes=("Sure", "Here"))
    assert tokens.refusal == (_byte_id(tokenizer, "I"),)
    assert tokens.compliance == (_byte_id(tokenizer, "S"), _byte_id(tokenizer, "H"))
    # a leading space is a lone byte-level token; the first real token is taken
    spaced = RefusalTokens.for_tokenizer(tokenizer, refusal_prefixes=(" I cannot",), compliance_prefixes=(" Sure",))
    assert spaced == tokens.__class__((_byte_id(tokenizer, "I"),), (_byte_id(tokenizer, "S"),))


def test_default_refusal_tokens_are_disjoint_and_drop_shared(caplog) -> None:
    tokenizer = byte_tokenizer()
    with caplog.at_level(logging.WARNING, logger="featsteer.evaluation.metrics"):
        tokens = RefusalTokens.for_tokenizer(tokenizer)
    assert not set(tokens.refusal) & set(tokens.compliance)
    assert len(set(tokens.refusal)) == len(tokens.refusal)
    assert len(set(tokens.compliance)) == len(tokens.compliance)
    as_chars = lambda ids: {tokenizer.convert_ids_to_tokens(i) for i in ids}  # noqa: E731
    # "Sorry"/"Sure"/"Step" share "S" and "As an AI"/"Absolutely" share "A": dropped from both
    assert as_chars(tokens.refusal) == {"I", "U"}
    assert as_chars(tokens.compliance) == {"H", "C", "O", "T", "1"}
    assert "dropped from both" in caplog.text
    assert DEFAULT_REFUSAL_PREFIXES and DEFAULT_COMPLIANCE_PREFIXES
    assert RefusalTokens.from_dict(tokens.to_dict()) == tokens


def test_refusal_tokens_reject_empty_or_overlapping_sets() -> None:
    tokenizer = byte_tokenizer()
    with pytest.raises(FeatsteerError):
        RefusalTokens.for_tokenizer(tokenizer, refusal_prefixes=("Sorry",), compliance_prefixes=("Sure",))
    with pytest.raises(FeatsteerError):
        RefusalTokens.for_tokenizer(tokenizer, refusal_prefixes=(), compliance_prefixes=("Sure",))
    with pytest.raises(FeatsteerError):
        RefusalTokens(refusal=(5, 6), compliance=(6,))
    with pytest.raises(FeatsteerError):
        RefusalTokens(refusal=(), compliance=(6,))


TOKENS = RefusalTokens(refusal=(3, 7), compliance=(1, 9, 11))


def test_refusal_score_extremes() -> None:
    all_refusal = torch.full((1, 20), -math.inf)
    all_refusal[0, [3, 7]] = math.log(0.5)
    assert float(refusal_score(all_refusal, TOKENS)[0]) > 500  # clamped, still finite
    assert math.isfinite(float(refusal_score(all_refusal, TOKENS)[0]))
    logits = torch.zeros(2, 20)
    logits[0, [3, 7]] = 40.0
    logits[1, [1, 9, 11]] = 40.0
    scores = refusal_score(torch.log_softmax(logits, dim=-1), TOKENS)
    assert float(scores[0]) > 30
    assert float(scores[1]) < -30
    gaps = refusal_logit_gap(logits, TOKENS)
    torch.testing.assert_close(gaps, torch.tensor([40.0, -40.0], dtype=torch.float64))


def test_refusal_score_matches_formula() -> None:
    logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    mass = probs[:, [3, 7]].sum(-1)
    expected = torch.log(mass) - torch.log(1 - mass)
    torch.testing.assert_close(refusal_score(torch.log_softmax(logits, -1), TOKENS), expected)
    torch.testing.assert_close(refusal_score(logits, TOKENS), expected)  # logits are re-normalised
    expected_gap = logits[:, [3, 7]].amax(-1) - logits[:, [1, 9, 11]].amax(-1)
    torch.testing.assert_close(refusal_logit_gap(logits, TOKENS), expected_gap)
    torch.testing.assert_close(refusal_logit_gap(torch.log_softmax(logits, -1), TOKENS), expected_gap)


def test_refusal_scores_reject_bad_inputs() -> None:
    with pytest.raises(FeatsteerError, match="vocabulary"):
        refusal_score(torch.zeros(2, 5), TOKENS)
    with pytest.raises(FeatsteerError, match="NaN"):
        refusal_logit_gap(torch.full((2, 20), math.nan), TOKENS)
    with pytest.raises(FeatsteerError):
        refusal_score(torch.zeros(0, 20), TOKENS)


# ---- target token probability ----------------------------------------------------------------------
def test_target_probability_first_step_equals_max_prob(llama_adapter) -> None:
    model = llama_adapter
    probs = torch.softmax(model.logits(PROMPTS).double(), dim=-1)
    first_tokens = sorted(set(probs.argmax(-1).tolist()))
    one_step = target_token_probability(model, PROMPTS, first_tokens, max_new_tokens=1, batch_size=3)
    torch.testing.assert_close(one_step, probs.amax(-1), atol=1e-6, rtol=0)
    peak = target_token_probability(model, PROMPTS, first_tokens, max_new_tokens=6, batch_size=3)
    mean = target_token_probability(model, PROMPTS, first_tokens, max_new_tokens=6, aggregate="mean")
    assert bool((peak >= one_step - 1e-9).all())
    assert bool((mean <= peak + 1e-12).all())
    assert bool((mean > 0).all()) and bool((peak <= 1).all())


def test_target_probability_batching_and_greedy_tokens(llama_adapter) -> None:
    model = llama_adapter
    targets = [40, 41, 72]
    batched = target_token_probability(model, PROMPTS, targets, max_new_tokens=5, aggregate="mean", batch_size=4)
    single = torch.cat([target_token_probability(model, [p], targets, max_new_tokens=5, aggregate="mean") for p in PROMPTS])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    batch = model.tokenize(PROMPTS)
    _, active, tokens = _greedy_target_probs(model, batch, targets, 6)
    expected, _ = model._greedy(batch, 6)
    stops = model.stop_token_ids
    got = [[t for t in row if t >= 0 and t not in stops] for row in tokens.tolist()]
    assert got == expected
    assert bool(active[:, 0].all())


def test_target_probability_ignores_steps_after_stop(llama_adapter) -> None:
    model = llama_adapter
    unembed, _ = model.unembed()
    eos_direction = unembed[model.tokenizer.eos_token_id].detach() / unembed[model.tokenizer.eos_token_id].norm()

    def force_eos_in_first_row(activation, site):
        activation = activation.clone()
        activation[0] += 50 * eos_direction.to(activation.dtype)
        return activation

    targets = [40, 41, 72]
    with model.hooks([(f"blocks.{model.n_layers - 1}.hook_resid_post", force_eos_in_first_row)]):
        _, active, tokens = _greedy_target_probs(model, model.tokenize(PROMPTS), targets, 6)
        first_step = target_token_probability(model, PROMPTS, targets, max_new_tokens=1)
        mean = target_token_probability(model, PROMPTS, targets, max_new_tokens=6, aggregate="mean")
        peak = target_token_probability(model, PROMPTS, targets, max_new_tokens=6, aggregate="max")
    assert int(tokens[0, 0]) == model.tokenizer.eos_token_id
    assert active[0].tolist() == [True] + [False] * (active.shape[1] - 1)
    assert bool(active[1:, 1].all())  # the other rows keep generating
    # the finished row is aggregated over its single step only
    assert float(mean[0]) == pytest.approx(float(first_step[0]), abs=1e-9)
    assert float(peak[0]) == pytest.approx(float(first_step[0]), abs=1e-9)


def test_target_probability_reads_hooks(llama_adapter) -> None:
    model = llama_adapter
    base = target_token_probability(model, PROMPTS[:2], [40], max_new_tokens=2)
    shift = torch.full((model.d_model,), 3.0)
    with model.hooks([("blocks.0.hook_resid_pre", _shift_hook(shift))]):
        hooked = target_token_probability(model, PROMPTS[:2], [40], max_new_tokens=2)
    assert not torch.allclose(base, hooked)


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_target_probability_decodes_as_generate_under_position_steering(llama_adapter, positions) -> None:
    # an addition on the prompt's (or the generated) tokens only must steer the same tokens here as in `generate`:
    # each decoding step is a generation pass, not a fresh prompt pass over the grown sequence
    from featsteer.interventions import AddDirection, steer
    from featsteer.testing import random_direction

    model = llama_adapter
    batch = model.tokenize(PROMPTS)
    addition = AddDirection(random_direction(model.d_model, 3), 40.0, where="blocks.1.hook_resid_pre", positions=positions)
    with steer(model, addition):
        expected, _ = model._greedy(batch, 6)
        _, _, tokens = _greedy_target_probs(model, batch, [40, 41, 72], 6)
    stops = model.stop_token_ids
    assert [[t for t in row if t >= 0 and t not in stops] for row in tokens.tolist()] == expected


def test_run_continued_last_only_is_the_last_column(llama_adapter) -> None:
    model = llama_adapter
    batch = model.tokenize(PROMPTS)
    continuations = [[40, 41, 72]] * len(PROMPTS)
    last = model.run_continued(batch, continuations, last_only=True)
    assert last.shape[1] == 1
    torch.testing.assert_close(last, model.run_continued(batch, continuations)[:, -1:], atol=1e-5, rtol=0)


# ---- response cross-entropy ------------------------------------------------------------------------
def _manual_nll(model, prompt: str, response: str) -> tuple[float, int]:
    prompt_ids = model.tokenize([prompt]).input_ids[0].tolist()
    response_ids = model.tokenizer(response, add_special_tokens=False)["input_ids"]
    full = torch.tensor([prompt_ids + response_ids])
    logits = model.run(TokenBatch(full, torch.ones_like(full)))[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
    nll = -sum(float(log_probs[pos, full[0, pos + 1]]) for pos in positions)
    return nll, len(response_ids)


def test_response_cross_entropy_matches_manual(llama_adapter) -> None:
    result = response_cross_entropy(llama_adapter, PROMPTS[:1], RESPONSES[:1])
    nll, n_tokens = _manual_nll(llama_adapter, PROMPTS[0], RESPONSES[0])
    assert result.n_tokens == n_tokens
    assert result.mean_nll == pytest.approx(nll / n_tokens, abs=1e-5)
    assert float(result.per_prompt[0]) == pytest.approx(nll / n_tokens, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.mean_nll), rel=1e-12)


def test_response_cross_entropy_sees_responses_as_generated_tokens(llama_adapter) -> None:
    # an addition on the prompt's tokens only must leave the response's tokens alone (as while decoding them)
    from featsteer.interventions import AddDirection, steer
    from featsteer.testing import random_direction

    model = llama_adapter
    vector = random_direction(model.d_model, 3)
    n_prompt = model.tokenize(PROMPTS[:1]).input_ids.shape[1]

    def add_to_prompt(activation, site):
        shifted = activation.clone()
        shifted[:, :n_prompt] += 5.0 * vector.to(activation.dtype)
        return shifted

    with model.hooks([("blocks.1.hook_resid_pre", add_to_prompt)]):
        nll, n_tokens = _manual_nll(model, PROMPTS[0], RESPONSES[0])
    with steer(model, AddDirection(vector, 5.0, where="blocks.1.hook_resid_pre", positions="prompt")):
        result = response_cross_entropy(model, PROMPTS[:1], RESPONSES[:1])
    assert result.mean_nll == pytest.approx(nll / n_tokens, abs=1e-5)


def test_response_cross_entropy_batch_equals_single(llama_adapter) -> None:
    model = llama_adapter
    batched = response_cross_entropy(model, PROMPTS, RESPONSES, batch_size=4)
    singles = [response_cross_entropy(model, [p], [r]) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    torch.testing.assert_close(batched.per_prompt, torch.cat([s.per_prompt for s in singles]), atol=1e-5, rtol=0)
    counts = torch.tensor([s.n_tokens for s in singles], dtype=torch.float64)
    assert batched.n_tokens == int(counts.sum())
    weighted = float((batched.per_prompt * counts).sum() / counts.sum())
    assert batched.mean_nll == pytest.approx(weighted, rel=1e-9)
    assert batched.perplexity == pytest.approx(math.exp(batched.mean_nll), rel=1e-12)
    with model.hooks([("blocks.1.hook_resid_pre", _shift_hook(torch.full((model.d_model,), 2.0)))]):
        hooked = response_cross_entropy(model, PROMPTS, RESPONSES, batch_size=4)
    assert hooked.mean_nll != pytest.approx(batched.mean_nll, rel=1e-4)


def _manual_ids_nll(model, prompt: str, response_ids: list[int], prefill: str | None = None) -> float:
    """Summed NLL of given response token ids after the chat-formatted prompt (and the prefill after it), from one
    unpadded forward pass."""
    prompt_ids = model.tokenize([prompt], prefill=None if prefill is None else [prefill]).input_ids[0].tolist()
    full = torch.tensor([prompt_ids + list(response_ids)])
    log_probs = torch.log_softmax(model.run(TokenBatch(full, torch.ones_like(full)))[0].double(), dim=-1)
    return -sum(float(log_probs[len(prompt_ids) - 1 + j, token]) for j, token in enumerate(response_ids))


def test_response_cross_entropy_scores_token_ids_as_given(llama_adapter) -> None:
    model = llama_adapter
    generated, _ = model._greedy(model.tokenize(PROMPTS), 6)
    result = response_cross_entropy(model, PROMPTS, generated, batch_size=3)
    for i, (prompt, row) in enumerate(zip(PROMPTS, generated, strict=True)):
        assert float(result.per_prompt[i]) == pytest.approx(_manual_ids_nll(model, prompt, row) / len(row), abs=1e-5)
    assert result.n_tokens == sum(len(row) for row in generated)
    with pytest.raises(FeatsteerError, match="response 1 must be a text or a sequence of non-negative token ids"):
        response_cross_entropy(model, PROMPTS[:2], [generated[0], [3, -1]])
    with pytest.raises(FeatsteerError, match="response 0 must be a text or"):
        response_cross_entropy(model, PROMPTS[:1], [[1.5]])


def test_responses_nll_reads_the_generated_tokens(llama_adapter) -> None:
    # the tiny model writes byte tokens whose decoded, stripped text tokenizes into other tokens (a half of a UTF-8
    # character comes back as three replacement-character tokens): its NLL is of the tokens it generated
    import dataclasses

    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set, responses_nll

    model = llama_adapter
    generated, _ = model._greedy(model.tokenize(PROMPTS), 6)
    assert any(model.tokenizer(model.tokenizer.decode(row, skip_special_tokens=True).strip(), add_special_tokens=False)["input_ids"]
               != row for row in generated)
    result = evaluate_set(model, PROMPTS, "harmless", GenerationConfig(max_new_tokens=6), RefusalDetector())
    expected = sum(_manual_ids_nll(model, p, row) for p, row in zip(PROMPTS, generated, strict=True)) / sum(map(len, generated))
    assert responses_nll(model, result) == pytest.approx(expected, abs=1e-5)
    # a response that ended its turn before the cap: its end-of-turn token is scored too, as the response KL scores the
    # position that predicts it (the responses above hit the cap and have none)
    eos = model.tokenizer.eos_token_id
    assert not any(row[-1] in model.stop_token_ids for row in generated)
    ended = dataclasses.replace(result, response_tokens=(result.response_tokens[0] + (eos,), *result.response_tokens[1:]))
    rows = [generated[0] + [eos], *generated[1:]]
    expected = sum(_manual_ids_nll(model, p, row) for p, row in zip(PROMPTS, rows, strict=True)) / sum(map(len, rows))
    assert responses_nll(model, ended) == pytest.approx(expected, abs=1e-5)
    # an empty response that ended its turn at once is its end-of-turn token: scored, not left out
    silent = dataclasses.replace(result, response_tokens=((eos,), *result.response_tokens[1:]))
    rows = [[eos], *generated[1:]]
    expected = sum(_manual_ids_nll(model, p, row) for p, row in zip(PROMPTS, rows, strict=True)) / sum(map(len, rows))
    assert responses_nll(model, silent) == pytest.approx(expected, abs=1e-5)


def test_responses_nll_of_a_prefilled_set_reads_the_prefill_as_context(llama_adapter) -> None:
    # under a prefilling attack the model wrote its response after the forced opening: the NLL is of the response given
    # prompt + opening, the context it was generated in (not given the prompt alone), and the opening is not scored
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set, prefill_texts, responses_nll

    model = llama_adapter
    gen = GenerationConfig(max_new_tokens=6, prefill="Sure, here is")
    result = evaluate_set(model, PROMPTS, "harmful", gen, RefusalDetector(), prefill=prefill_texts(gen.prefill, PROMPTS))
    assert result.openings == ("Sure, here is",) * len(PROMPTS)
    assert not any(ids[-1] in model.stop_token_ids for ids in result.response_tokens)  # every response is scored whole
    rows = list(zip(PROMPTS, result.response_tokens, strict=True))
    expected = sum(_manual_ids_nll(model, p, ids, "Sure, here is") for p, ids in rows) / sum(len(ids) for _, ids in rows)
    without = sum(_manual_ids_nll(model, p, ids) for p, ids in rows) / sum(len(ids) for _, ids in rows)
    assert abs(expected - without) > 1e-3  # the opening changes what the model expects (0.02 nats here)
    assert responses_nll(model, result, gen) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(FeatsteerError, match="pass one prefill per prompt"):
        response_cross_entropy(model, PROMPTS, list(result.response_tokens), prefill=["Sure"])


def test_response_cross_entropy_takes_the_log_softmax_in_float64() -> None:
    # large logits (an unembedding scaled up) put float32's rounding of the log-softmax at 1e-7 of the NLL
    from featsteer.models import load_model
    from featsteer.testing import tiny_model

    hf_model, tokenizer = tiny_model("llama")
    with torch.no_grad():
        hf_model.lm_head.weight.mul_(1000.0)
    model = load_model(hf_model, tokenizer=tokenizer)
    row = [11, 19, 160, 23, 36, 160, 23, 36]
    result = response_cross_entropy(model, PROMPTS[:1], [row])
    assert float(result.per_prompt[0]) == pytest.approx(_manual_ids_nll(model, PROMPTS[0], row) / len(row), rel=1e-9)


def test_evaluate_set_keeps_a_masked_first_token_as_first_token_logprobs_does(llama_adapter, monkeypatch) -> None:
    # an -inf logit (a token masked out) is a probability of 0 in both; NaN is an error in both
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set

    model = llama_adapter
    generate, logits = model.generate_with_tokens, model.logits

    def with_logit(value: float):
        def masked_generate(*args, **kwargs):
            generation = generate(*args, **kwargs)
            generation.first_logits[:, 5] = value
            return generation

        def masked_logits(*args, **kwargs):
            out = logits(*args, **kwargs)
            out[:, 5] = value
            return out

        monkeypatch.setattr(model, "generate_with_tokens", masked_generate)
        monkeypatch.setattr(model, "logits", masked_logits)

    with_logit(float("-inf"))
    result = evaluate_set(model, PROMPTS, "harmless", GenerationConfig(max_new_tokens=2), RefusalDetector(), keep_logprobs=True)
    direct = first_token_logprobs(model, PROMPTS)
    assert bool((result.first_logprobs[:, 5] == float("-inf")).all())
    torch.testing.assert_close(result.first_logprobs, direct, atol=1e-5, rtol=0)
    with_logit(float("nan"))
    with pytest.raises(FeatsteerError, match="NaN or \\+inf first-token logits while evaluating 'harmless'"):
        evaluate_set(model, PROMPTS, "harmless", GenerationConfig(max_new_tokens=2), RefusalDetector(), keep_logprobs=True)
    with pytest.raises(FeatsteerError, match="NaN or \\+inf logits"):
        first_token_logprobs(model, PROMPTS)


# ---- over-refusal and errors -----------------------------------------------------------------------
def test_over_refusal_rate_matches_generation(llama_adapter) -> None:
    detector = RefusalDetector(markers=("(0",))
    rate = over_refusal_rate(llama_adapter, PROMPTS, detector, max_new_tokens=8)
    responses = llama_adapter.generate(PROMPTS, max_new_tokens=8)
    assert rate == refusal_rate(detector.classify(responses))
    assert rate.n == len(PROMPTS)


def test_errors(llama_adapter) -> None:
    model = llama_adapter
    with pytest.raises(FeatsteerError):
        first_token_logprobs(model, [])
    with pytest.raises(FeatsteerError, match="not one string"):
        first_token_logprobs(model, "a single prompt")
    with pytest.raises(FeatsteerError):
        target_token_probability(model, [], [1])
    with pytest.raises(FeatsteerError, match="target_ids"):
        target_token_probability(model, PROMPTS, [])
    with pytest.raises(FeatsteerError, match="aggregate"):
        target_token_probability(model, PROMPTS, [1], aggregate="median")
    with pytest.raises(FeatsteerError):
        response_cross_entropy(model, [], [])
    with pytest.raises(FeatsteerError, match="responses"):
        response_cross_entropy(model, PROMPTS, RESPONSES[:2])
    with pytest.raises(FeatsteerError, match="empty"):
        response_cross_entropy(model, PROMPTS[:1], [""])
    with pytest.raises(FeatsteerError):
        over_refusal_rate(model, [])
    nan_hook = [("blocks.1.hook_resid_pre", lambda x, site: torch.full_like(x, math.nan))]
    with model.hooks(nan_hook), pytest.raises(FeatsteerError, match="NaN"):
        first_token_logprobs(model, PROMPTS)
    with model.hooks(nan_hook), pytest.raises(FeatsteerError, match="NaN"):
        response_cross_entropy(model, PROMPTS, RESPONSES)
