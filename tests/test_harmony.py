"""GPT-OSS's harmony format: parsing a generated turn, and generation that scores the final channel's message."""

from __future__ import annotations

import pytest
import torch

from featsteer.evaluation.behaviour import GenerationConfig, RefusalReport, evaluate_set
from featsteer.evaluation.refusal import RefusalDetector
from featsteer.models import load_model
from featsteer.models.harmony import CONTROL_TOKENS, harmony_text, is_harmony_vocab, parse_harmony
from featsteer.testing import harmony_tokenizer, tiny_model

ANALYSIS = "<|channel|>analysis<|message|>The user asks how to bake bread. I'm sorry to say it takes time, but it is harmless.<|end|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>Mix flour, water, salt and yeast, then bake at 230 C.<|return|>"


def test_analysis_then_final_gives_the_final_message_as_the_answer():
    reply = parse_harmony(ANALYSIS + FINAL)
    assert reply.answer == "Mix flour, water, salt and yeast, then bake at 230 C."
    assert reply.reasoning == "The user asks how to bake bread. I'm sorry to say it takes time, but it is harmless."
    assert not reply.reasoning_only and reply.final_closed


def test_final_only_and_a_final_message_cut_by_the_budget():
    refusal = parse_harmony("<|channel|>final<|message|>I'm sorry, but I can't help with that.<|return|>")
    assert refusal.answer == "I'm sorry, but I can't help with that." and refusal.reasoning == ""
    assert not refusal.reasoning_only and refusal.final_closed
    cut = parse_harmony(ANALYSIS + "<|start|>assistant<|channel|>final<|message|>Mix flour, wat")
    assert cut.answer == "Mix flour, wat" and not cut.reasoning_only and not cut.final_closed


def test_truncated_analysis_falls_back_to_the_reasoning_without_control_tokens():
    reply = parse_harmony("<|channel|>analysis<|message|>The user wants a pipe bomb. This is disallowed; we must")
    assert reply.answer == reply.reasoning == "The user wants a pipe bomb. This is disallowed; we must"
    assert reply.reasoning_only and not reply.final_closed
    header_only = parse_harmony("<|channel|>analy")
    assert header_only.answer == "" and header_only.reasoning_only  # the budget ran out inside the first header


def test_text_without_channel_tokens_is_the_answer_as_written():
    assert parse_harmony("  Sure, here is how to bake bread.\n") == parse_harmony("  Sure, here is how to bake bread.\n<|return|>")
    reply = parse_harmony("  Sure, here is how to bake bread.\n")
    assert reply.answer == "Sure, here is how to bake bread." and not reply.reasoning_only and reply.reasoning == ""


def test_a_tool_call_after_the_reasoning_is_not_an_answer():
    call = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Tokyo"}<|call|>'
    reply = parse_harmony("<|channel|>analysis<|message|>Need the weather.<|end|>" + call)
    assert reply.reasoning_only and reply.answer == 'Need the weather.\n{"city": "Tokyo"}'


def test_harmony_text_keeps_only_the_control_tokens():
    tokenizer = harmony_tokenizer()
    vocab = tokenizer.get_vocab()
    assert is_harmony_vocab(vocab) and not is_harmony_vocab(load_model("tiny:llama").tokenizer.get_vocab())
    control = {vocab[token]: token for token in CONTROL_TOKENS}
    ids = tokenizer.encode(ANALYSIS + FINAL, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert harmony_text(tokenizer, ids, control) == ANALYSIS + FINAL  # </s> dropped, as skip_special_tokens drops it


def _forcing(adapter, script: list[int]):
    """A hook that makes greedy generation write `script` (then keep writing its last token): at every step the last
    position's final residual is replaced by the target's unembedding row divided by the final norm's weight."""
    unembed, _ = adapter.unembed()
    weight = adapter.model.model.norm.weight.detach()

    def force(activation, site):
        step = adapter.generation_step
        target = script[min(step, len(script) - 1)] if step is not None else script[0]
        activation = activation.clone()
        activation[:, -1] = 100 * unembed[target].detach() / weight
        return activation

    return [(f"blocks.{adapter.n_layers - 1}.hook_resid_post", force)]


def _script(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def harmony_adapter():
    model, tokenizer = tiny_model("gpt_oss", harmony=True)
    return load_model(model, tokenizer=tokenizer)


def test_generation_answers_with_the_final_message_and_keeps_the_whole_turn(harmony_adapter):
    adapter, tokenizer = harmony_adapter, harmony_adapter.tokenizer
    written = _script(tokenizer, "<|channel|>analysis<|message|>I must refuse.<|end|><|start|>assistant<|channel|>final<|message|>Sure.<|return|>")
    with adapter.hooks(_forcing(adapter, written + _script(tokenizer, "more"))):
        generated = adapter.generate_with_tokens(["hi", "bake bread"], max_new_tokens=len(written) + 10, keep_logits=False)
    assert generated.texts == ["Sure.", "Sure."] and generated.reasoning_only == (False, False)
    assert generated.token_ids == [tuple(written)] * 2  # stopped at <|return|>: whole turn, reasoning included
    detector = RefusalDetector()
    assert not any(detector.classify(generated.texts))  # "I must refuse" in the reasoning is not the answer's refusal


def test_generation_stops_where_the_final_message_ends(harmony_adapter):
    adapter, tokenizer = harmony_adapter, harmony_adapter.tokenizer
    turn = _script(tokenizer, "<|channel|>analysis<|message|>Fine.<|end|><|start|>assistant<|channel|>final<|message|>Ok<|end|>")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end not in adapter.stop_token_ids  # the analysis message's <|end|> does not end the turn
    with adapter.hooks(_forcing(adapter, turn + _script(tokenizer, "<|start|>assistant<|channel|>final<|message|>Again"))):
        generated = adapter.generate_with_tokens(["hi"], max_new_tokens=len(turn) + 12, keep_logits=False)
    assert generated.token_ids == [tuple(turn)] and generated.texts == ["Ok"]


def test_a_budget_spent_on_reasoning_keeps_the_reasoning_and_says_so(harmony_adapter, caplog):
    adapter, tokenizer = harmony_adapter, harmony_adapter.tokenizer
    header = _script(tokenizer, "<|channel|>analysis<|message|>")
    turn = header + _script(tokenizer, "I'm sorry, this is disallowed. We must refuse.<|end|>")
    budget = len(header) + 8  # one token a byte: the reasoning is cut after "I'm sorr"
    with adapter.hooks(_forcing(adapter, turn)), caplog.at_level("WARNING", logger="featsteer.models.adapter"):
        generated = adapter.generate_with_tokens(["a", "b"], max_new_tokens=budget, keep_logits=False, label="harmful")
    assert generated.texts == ["I'm sorr"] * 2 and generated.reasoning_only == (True, True)
    assert f"2 of 2 harmful responses reached no final answer within max_new_tokens={budget}" in caplog.text


def test_evaluation_classifies_the_answer_and_records_reasoning_only_responses(harmony_adapter):
    adapter, tokenizer = harmony_adapter, harmony_adapter.tokenizer
    turn = _script(tokenizer, "<|channel|>analysis<|message|>I can't refuse this.<|end|><|start|>assistant<|channel|>final<|message|>Here.<|return|>")
    config = GenerationConfig(max_new_tokens=len(turn))
    with adapter.hooks(_forcing(adapter, turn)):
        answered = evaluate_set(adapter, ["bake bread"], "harmless", config, RefusalDetector())
        cut = evaluate_set(adapter, ["bake bread"], "harmful", GenerationConfig(max_new_tokens=10), RefusalDetector())
    assert answered.responses == ("Here.",) and answered.refused == (False,) and answered.reasoning_only == (False,)
    assert cut.reasoning_only == (True,)
    report = RefusalReport(adapter.name, cut, answered, 0.0, GenerationConfig(max_new_tokens=10))
    assert report.to_json()["reasoning_only_harmful"] == 1 and "reasoning_only_harmless" not in report.to_json()
    assert report.table().splitlines()[-1] == ("harmful: 1 of 1 responses reached no final answer within max_new_tokens=10 "
                                               "and were judged on their reasoning: raise --max-new-tokens")
    plain = RefusalReport(adapter.name, answered, answered, 0.0, config)
    assert not [key for key in plain.to_json() if key.startswith("reasoning_only")] and len(plain.table().splitlines()) == 3


def test_non_harmony_generation_is_unchanged():
    adapter = load_model("tiny:llama")
    assert adapter.harmony_control_ids() is None
    generated = adapter.generate_with_tokens(["hello there", "third"], max_new_tokens=6, keep_logits=False)
    tokenizer = adapter.tokenizer
    stop = adapter.stop_token_ids
    expected = [tokenizer.decode(ids[:-1] if ids and ids[-1] in stop else ids, skip_special_tokens=True).strip()
                for ids in generated.token_ids]
    assert generated.texts == expected and generated.reasoning_only == (False, False)
    assert torch.equal(torch.tensor(sorted(stop)), torch.tensor(sorted(load_model("tiny:llama").stop_token_ids)))
