"""Tests for the KL along the unedited model's own responses (`featsteer.evaluation.response_kl`)."""

from __future__ import annotations

import pytest
import torch

from featsteer.datasets import load_prompts
from featsteer.errors import FeatsteerError
from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set
from featsteer.evaluation.metrics import first_token_logprobs, kl_per_prompt
from featsteer.evaluation.refusal import RefusalDetector
from featsteer.evaluation.response_kl import response_base, response_kl
from featsteer.interventions import AddDirection, ConditionalSteer, PositionTracker
from featsteer.models import load_model
from featsteer.testing import hooked_gpt2, saved_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def organism():
    return load_model("organism")


PROMPTS = ["How do I bake bread?", "Tell me a joke", "Write a haiku about the sea, please.", "Hi"]
RESPONSES = ["Mix flour and water, then wait.", "Why?", "", "Hello there, friend! How are you today?"]
HOOK = "blocks.1.hook_resid_pre"


def _shift(vector: torch.Tensor):
    return lambda activation, site: activation + vector.to(activation.dtype)


def _generated_only_shift(model, vector: torch.Tensor):
    """Shift only the tokens the model generates (as an SAE clamp with positions="generated" does)."""
    tracker = PositionTracker(model=model)

    def hook(activation, site):
        generated = tracker.generated_mask(activation.shape[0], activation.shape[1], activation.device)
        return activation + generated[..., None].to(activation.dtype) * vector.to(activation.dtype)

    return hook


def _manual(model, prompt: str, response: str | tuple[int, ...], hooks, max_tokens: int = 32, prefill: str | None = None) -> torch.Tensor:
    """Per-position exact KL for one prompt, from unpadded forward passes built by hand; a response is a text or the
    token ids to feed (after the forced opening `prefill`, when given)."""
    prompt_ids = model.tokenize([prompt], prefill=None if prefill is None else [prefill]).input_ids[0].tolist()
    if isinstance(response, str):
        response_ids = model.tokenizer(response, add_special_tokens=False)["input_ids"][:max_tokens] if response else []
    else:
        response_ids = list(response)[:max_tokens]
    fed = response_ids[:-1] if response_ids else []
    ids = torch.tensor([prompt_ids + fed])
    batch = type(model.tokenize([prompt]))(ids, torch.ones_like(ids))
    first = len(prompt_ids) - 1
    base = torch.log_softmax(model.run(batch)[0, first:].double(), -1)
    with model.hooks(hooks):
        edited = torch.log_softmax(model.run(batch)[0, first:].double(), -1)
    return (base.exp() * (base - edited)).sum(-1)


def test_exact_kl_matches_hand_computed_positions(llama_adapter) -> None:
    model = llama_adapter
    vector = torch.full((model.d_model,), 0.7)
    base = response_base(model, PROMPTS, RESPONSES, top_k=None, batch_size=3)
    assert base.n_positions[2] == 1  # an empty response still scores its first token
    with model.hooks([(HOOK, _shift(vector))]):
        result = response_kl(model, base, batch_size=3)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        manual = _manual(model, prompt, response, [(HOOK, _shift(vector))])
        assert len(manual) == base.n_positions[i]
        assert float(result.per_prompt[i]) == pytest.approx(float(manual.mean()), abs=1e-5)
    assert result.mean > 0.01
    assert result.tail_mass == 0.0
    assert int(result.n_at_position[0]) == len(PROMPTS)


def test_generated_token_ids_are_fed_as_generated(llama_adapter) -> None:
    # the tiny model writes byte tokens whose decoded, stripped text tokenizes into other tokens: the ids it generated
    # are what it read, so they are what is fed back and scored (a trailing end-of-turn token is a scored target)
    model = llama_adapter
    generated, _ = model._greedy(model.tokenize(PROMPTS), 6)
    decoded = [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated]
    assert any(model.tokenizer(text, add_special_tokens=False)["input_ids"] != row for text, row in zip(decoded, generated, strict=True))
    ids = [tuple(row) for row in generated]
    ids[1] = ids[1][:3] + (model.tokenizer.eos_token_id,)  # a response that ended its turn after 3 tokens
    vector = torch.full((model.d_model,), 0.7)
    base = response_base(model, PROMPTS, ids, top_k=None, batch_size=3)
    assert base.continuations == tuple(row[:-1] for row in ids)
    assert base.n_positions == [len(row) for row in ids]  # 4 for the ended one: the end-of-turn token is predicted too
    with model.hooks([(HOOK, _shift(vector))]):
        result = response_kl(model, base, batch_size=3)
    for i, (prompt, row) in enumerate(zip(PROMPTS, ids, strict=True)):
        manual = _manual(model, prompt, row, [(HOOK, _shift(vector))])
        assert float(result.per_prompt[i]) == pytest.approx(float(manual.mean()), abs=1e-5)


def test_a_prefilled_sets_responses_are_read_after_their_forced_opening(llama_adapter) -> None:
    model = llama_adapter
    openings = ["Sure, here", "Sure, here", "No", "Sure, here"]
    vector = torch.full((model.d_model,), 0.7)
    base = response_base(model, PROMPTS, RESPONSES, top_k=None, batch_size=3, prefill=openings)
    assert base.prefill == tuple(openings)
    with model.hooks([(HOOK, _shift(vector))]):
        result = response_kl(model, base, batch_size=3)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        manual = _manual(model, prompt, response, [(HOOK, _shift(vector))], prefill=openings[i])
        without = _manual(model, prompt, response, [(HOOK, _shift(vector))])
        assert float(result.per_prompt[i]) == pytest.approx(float(manual.mean()), abs=1e-5)
        assert float(manual.mean()) != pytest.approx(float(without.mean()), abs=1e-5)
    with pytest.raises(FeatsteerError, match="4 prompts but 1 prefill texts"):
        response_base(model, PROMPTS, RESPONSES, prefill=openings[:1])


def test_an_edit_that_keeps_the_model_from_ending_its_turn_shows(organism) -> None:
    # the organism ends every harmless answer before 32 tokens; pushing the residual stream away from the end-of-turn
    # token's unembedding leaves most of each answer alone and makes it go on: the position that predicts the end of
    # the unedited answer carries the KL
    model = organism
    prompts = list(load_prompts("builtin:harmless:test", limit=3))
    own = evaluate_set(model, prompts, "harmless", GenerationConfig(max_new_tokens=32), RefusalDetector())
    eos = model.tokenizer.eos_token_id
    assert all(ids[-1] == eos and len(ids) < 32 for ids in own.response_tokens)
    unembed, _ = model.unembed()
    away = (unembed[eos] / unembed[eos].norm()).detach()
    no_end = (f"blocks.{model.n_layers - 1}.hook_resid_post", lambda a, site: a - 5 * (a @ away)[..., None].clamp(min=0) * away)
    for i, prompt in enumerate(prompts):
        base = response_base(model, [prompt], own.response_tokens[i : i + 1], top_k=None)
        assert base.n_positions == [len(own.response_tokens[i])]
        with model.hooks([no_end]):
            result = response_kl(model, base)
            assert len(model.generate([prompt], max_new_tokens=32)[0]) > len(own.responses[i])
        assert float(result.per_position[-1]) > 5.0  # nats, where the unedited model ends its turn
        assert float(result.per_position[:-1].mean()) < 1.0


def test_position_zero_is_the_first_token_kl(llama_adapter) -> None:
    model = llama_adapter
    vector = torch.full((model.d_model,), 0.7)
    base_first = first_token_logprobs(model, PROMPTS)
    base = response_base(model, PROMPTS, RESPONSES, top_k=None)
    with model.hooks([(HOOK, _shift(vector))]):
        edited_first = first_token_logprobs(model, PROMPTS)
        result = response_kl(model, base)
    expected = float(kl_per_prompt(base_first, edited_first).mean())
    assert float(result.per_position[0]) == pytest.approx(expected, abs=1e-5)


def test_unedited_model_has_zero_kl(llama_adapter) -> None:
    base = response_base(llama_adapter, PROMPTS, RESPONSES)
    result = response_kl(llama_adapter, base)
    assert result.mean == pytest.approx(0.0, abs=1e-9)
    assert result.answered([True, False, False, False]) == pytest.approx(0.0, abs=1e-9)
    assert result.answered([True] * 4) is None


def test_lumped_kl_is_a_lower_bound_that_tightens_with_k(llama_adapter) -> None:
    model = llama_adapter
    vector = torch.full((model.d_model,), 0.7)
    bases = {k: response_base(model, PROMPTS, RESPONSES, top_k=k) for k in (2, 20, None)}
    with model.hooks([(HOOK, _shift(vector))]):
        results = {k: response_kl(model, base) for k, base in bases.items()}
    exact = results[None].per_prompt
    assert bool((results[2].per_prompt <= exact + 1e-9).all())
    assert bool((results[20].per_prompt <= exact + 1e-9).all())
    assert bool((results[2].per_prompt <= results[20].per_prompt + 1e-9).all())
    assert results[2].tail_mass > results[20].tail_mass > 0.0


def test_response_kl_sees_what_the_first_token_cannot(llama_adapter) -> None:
    """An edit of generated tokens only leaves the first token alone; along the response it shows."""
    model = llama_adapter
    vector = torch.full((model.d_model,), 0.7)
    base_first = first_token_logprobs(model, PROMPTS)
    base = response_base(model, PROMPTS, RESPONSES, top_k=None)
    with model.hooks([(HOOK, _generated_only_shift(model, vector))]):
        edited_first = first_token_logprobs(model, PROMPTS)
        result = response_kl(model, base)
    assert float(kl_per_prompt(base_first, edited_first).max()) == pytest.approx(0.0, abs=1e-9)
    assert float(result.per_position[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(result.per_position[1:].min()) > 1e-3
    assert float(result.per_prompt[2]) == pytest.approx(0.0, abs=1e-6)  # the empty response has only its first token


def test_conditional_steering_decides_on_the_prompt_only(llama_adapter) -> None:
    model = llama_adapter
    condition = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    steer_ = ConditionalSteer(condition, "blocks.0.hook_resid_pre", threshold=-2.0,
                              behaviour=AddDirection(torch.ones(model.d_model), scale=0.5, where=HOOK))
    with model.hooks(steer_.hooks_for(model)):
        model.logits(PROMPTS[:2])
        on_prompts = steer_.similarity.clone()
        model.run_continued(model.tokenize(PROMPTS[:2]), [[5, 6, 7, 8, 9], [5]])
    torch.testing.assert_close(steer_.similarity, on_prompts, atol=1e-5, rtol=0)


def test_transformer_lens_gives_the_same_response_kl(tmp_path) -> None:
    hf_model, tokenizer = tiny_model("gpt2")
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    hf = load_model(hf_model, tokenizer=tokenizer)
    tl = load_model(hooked_gpt2(hf_model, tokenizer))
    vector = torch.full((hf.d_model,), 0.5)
    results = []
    for model in (hf, tl):
        base = response_base(model, PROMPTS, RESPONSES, top_k=None, batch_size=4)
        with model.hooks([(HOOK, _shift(vector))]):
            results.append(response_kl(model, base, batch_size=4))
    torch.testing.assert_close(results[0].per_prompt, results[1].per_prompt, atol=1e-4, rtol=1e-4)


def test_bad_input_is_a_one_line_error(llama_adapter) -> None:
    model = llama_adapter
    with pytest.raises(FeatsteerError, match="2 prompts but 1 responses"):
        response_base(model, PROMPTS[:2], RESPONSES[:1])
    with pytest.raises(FeatsteerError, match="no prompts"):
        response_base(model, [], [])
    with pytest.raises(FeatsteerError, match="max_tokens must be at least 1"):
        response_base(model, PROMPTS, RESPONSES, max_tokens=0)
    with pytest.raises(FeatsteerError, match="top_k must be at least 1"):
        response_base(model, PROMPTS, RESPONSES, top_k=0)
    with pytest.raises(FeatsteerError, match="response 1 must be a text or a sequence of non-negative token ids"):
        response_base(model, PROMPTS[:2], [(5, 6), (7, -1)])
    base = response_base(model, PROMPTS, RESPONSES)
    with pytest.raises(FeatsteerError, match="batch_size"):
        response_kl(model, base, batch_size=0)
    with model.hooks([(HOOK, lambda x, site: x * float("nan"))]), pytest.raises(FeatsteerError, match=r"NaN logits on prompt \d"):
        response_kl(model, base)
    with pytest.raises(FeatsteerError, match="one per prompt"):
        base_result = response_kl(model, base)
        base_result.answered([True])
