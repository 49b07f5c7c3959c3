"""GPT-OSS's harmony format: parsing a generated turn, and generation that scores the final channel's message."""

from __future__ import annotations

from featsteer.models import load_model
from featsteer.models.harmony import CONTROL_TOKENS, harmony_text, is_harmony_vocab, parse_harmony
from featsteer.testing import harmony_tokenizer

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
