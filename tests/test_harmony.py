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


# ---- the prompt first-token measures read: at the answer's start, after <|channel|>final<|message|> ----------------
OPENED = "<|start|>user<|message|>bake bread<|end|><|start|>assistant<|channel|>final<|message|>"


def _last_logits(adapter, text: str) -> torch.Tensor:
    """The model's next-token logits after `text`, computed without featsteer's formatting."""
    ids = torch.tensor([adapter.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        return adapter.model(input_ids=ids).logits[0, -1].float()


def test_scored_prompts_end_at_the_answer_opening_and_generation_at_the_assistant_header(harmony_adapter):
    adapter, tokenizer = harmony_adapter, harmony_adapter.tokenizer
    assert adapter.format_prompts(["bake bread"])[0].text == OPENED
    assert adapter.format_prompts(["bake bread"], for_generation=True)[0].text == OPENED.removesuffix("<|channel|>final<|message|>")
    batch = adapter.tokenize(["bake bread", "hi"])
    assert int(batch.input_ids[0, -1]) == tokenizer.convert_tokens_to_ids("<|message|>")  # DIM's position -1
    assert batch.input_ids[0].tolist() == tokenizer(OPENED, add_special_tokens=False)["input_ids"]
    prefilled = adapter.tokenize(["bake bread"], prefill=["Sure"], for_generation=True)  # a prefill is the answer's start
    assert prefilled.input_ids[0].tolist() == tokenizer(OPENED + "Sure", add_special_tokens=False)["input_ids"]


def test_first_token_measures_read_the_logits_after_the_answer_opening(harmony_adapter):
    from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, refusal_score

    adapter = harmony_adapter
    by_hand = _last_logits(adapter, OPENED)
    assert torch.allclose(adapter.logits(["bake bread"])[0], by_hand, atol=1e-5)
    expected = torch.log_softmax(by_hand.double(), -1).float()
    assert torch.allclose(first_token_logprobs(adapter, ["bake bread"])[0], expected, atol=1e-5)
    tokens = RefusalTokens.for_tokenizer(adapter.tokenizer)
    assert torch.allclose(refusal_score(first_token_logprobs(adapter, ["bake bread"]), tokens),
                          refusal_score(expected[None], tokens), atol=1e-5)
    # the first-token log-probs eval keeps (first-token KL) are read there too, not where generation starts
    result = evaluate_set(adapter, ["bake bread"], "harmless", GenerationConfig(max_new_tokens=2), RefusalDetector(), keep_logprobs=True)
    assert torch.allclose(result.first_logprobs[0], expected, atol=1e-5)
    at_header = torch.log_softmax(_last_logits(adapter, OPENED.removesuffix("<|channel|>final<|message|>")).double(), -1).float()
    assert not torch.allclose(result.first_logprobs[0], at_header, atol=1e-3)


def test_teacher_forced_responses_follow_the_prompt_they_were_written_after(harmony_adapter):
    from featsteer.evaluation.metrics import response_cross_entropy
    from featsteer.evaluation.response_kl import response_base

    adapter, tokenizer = harmony_adapter, harmony_adapter.tokenizer
    header = OPENED.removesuffix("<|channel|>final<|message|>")
    turn = _script(tokenizer, "<|channel|>final<|message|>Ok")  # generated ids: a whole turn, after <|start|>assistant

    def nll_by_hand(prompt: str, response: list[int]) -> float:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = adapter.model(input_ids=torch.tensor([ids + response])).logits[0, len(ids) - 1 : -1].double()
        return float(-torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).mean())

    assert response_cross_entropy(adapter, ["bake bread"], [turn]).mean_nll == pytest.approx(nll_by_hand(header, turn), abs=1e-6)
    answer = _script(tokenizer, "Ok")  # a text is an answer: read after the opening
    assert response_cross_entropy(adapter, ["bake bread"], ["Ok"]).mean_nll == pytest.approx(nll_by_hand(OPENED, answer), abs=1e-6)
    base = response_base(adapter, ["bake bread", "bake bread"], [turn, "Ok"], top_k=None)
    assert base.generated == (True, False)
    for row, prompt in enumerate((header, OPENED)):
        expected = torch.log_softmax(_last_logits(adapter, prompt).double(), -1).sort(descending=True).values
        assert torch.allclose(base.top_logprobs[row][0], expected, atol=1e-5)


def test_harmony_opening_none_restores_the_generation_prompt_everywhere():
    from featsteer.errors import FeatsteerError
    from featsteer.models.chat import format_instruction

    model, tokenizer = tiny_model("gpt_oss", harmony=True)
    raw = load_model(model, tokenizer=tokenizer, harmony_opening="none")
    header = format_instruction(tokenizer, "bake bread").text
    assert raw.format_prompts(["bake bread"])[0].text == header == OPENED.removesuffix("<|channel|>final<|message|>")
    assert raw.tokenize(["bake bread"]).input_ids[0].tolist() == tokenizer(header, add_special_tokens=False)["input_ids"]
    assert torch.allclose(raw.logits(["bake bread"])[0], _last_logits(raw, header), atol=1e-5)
    with pytest.raises(FeatsteerError, match="harmony_opening must be 'final' or 'none', got 'analysis'"):
        load_model(model, tokenizer=tokenizer, harmony_opening="analysis")


@pytest.mark.parametrize("spec", ["tiny:llama", "tiny:gpt2", "organism"])
def test_non_harmony_prompts_are_the_templates_text_unchanged(spec):
    from featsteer.models.chat import format_instruction

    adapter = load_model(spec)
    assert adapter.answer_opening() == "" and not adapter.is_harmony
    for system in (None, "Be brief."):
        expected = format_instruction(adapter.tokenizer, "bake bread", system)
        assert adapter.format_prompts(["bake bread"], system)[0] == expected
        assert adapter.format_prompts(["bake bread"], system, for_generation=True)[0] == expected
        assert torch.equal(adapter.tokenize(["bake bread"], system=system).input_ids,
                           adapter.tokenize(["bake bread"], system=system, for_generation=True).input_ids)


def test_a_short_budget_on_a_harmony_model_is_warned_about_once(harmony_adapter, caplog):
    model, tokenizer = tiny_model("gpt_oss", harmony=True)
    adapter = load_model(model, tokenizer=tokenizer)
    with caplog.at_level("WARNING", logger="featsteer.models.adapter"):
        adapter.generate(["hi"], max_new_tokens=3)
        adapter.generate(["hi"], max_new_tokens=4)
    lines = [r.getMessage() for r in caplog.records if "is short for a harmony model" in r.getMessage()]
    assert lines == ["max_new_tokens=3 is short for a harmony model (GPT-OSS), which reasons before it answers: most responses "
                     "will have no final answer; use --max-new-tokens 256 or more (max_new_tokens= in Python)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="featsteer.models.adapter"):
        load_model("tiny:llama").generate(["hi"], max_new_tokens=3)
        load_model(model, tokenizer=tokenizer).generate(["hi"], max_new_tokens=3, prefill=["Sure"])  # answers directly
    assert "is short for a harmony model" not in caplog.text


def test_loading_a_harmony_model_says_which_prompt_is_read(caplog):
    model, tokenizer = tiny_model("gpt_oss", harmony=True)
    with caplog.at_level("INFO", logger="featsteer.models.loading"):
        load_model(model, tokenizer=tokenizer)
        load_model("tiny:llama")
    lines = [r.getMessage() for r in caplog.records if "harmony" in r.getMessage()]
    assert len(lines) == 1 and "read prompts ending in <|start|>assistant<|channel|>final<|message|>" in lines[0]


def test_cli_harmony_opening_switches_the_scored_prompt(tmp_path, capsys):
    from featsteer.cli import main

    model, tokenizer = tiny_model("gpt_oss", harmony=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path), "--prompt", "bake bread"]) == 0
    out = capsys.readouterr().out
    header = OPENED.removesuffix("<|channel|>final<|message|>")
    assert f"prompt    {OPENED!r}" in out and f"generate  {header!r}" in out
    assert main(["info", "--model", str(tmp_path), "--prompt", "bake bread", "--harmony-opening", "none"]) == 0
    out = capsys.readouterr().out
    assert f"prompt    {header!r}" in out and "generate" not in out


def test_what_acts_while_generating_is_fitted_on_the_prompt_generation_starts_from(harmony_adapter):
    from featsteer.edits.tokens import template_tokens
    from featsteer.interventions import prompt_means

    adapter, tokenizer = harmony_adapter, harmony_adapter.tokenizer
    header = OPENED.removesuffix("<|channel|>final<|message|>")
    ids = tokenizer(header, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        hidden = adapter.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0, -1].float()
    pooled = prompt_means(adapter, ["bake bread"], ["blocks.0.hook_resid_post"], pool="last")["blocks.0.hook_resid_post"]
    assert torch.allclose(pooled[0], hidden, atol=1e-5)  # the conditional-steering gate pools this prompt while generating
    own = template_tokens(adapter, ["bake bread", "hi"], n=10)  # <|channel|> is written again in every generated message
    assert own and tokenizer.convert_tokens_to_ids("<|channel|>") not in own


@pytest.mark.parametrize("budget", [None, 100_000])
def test_planned_batches_hold_the_prompt_each_use_asks_for(harmony_adapter, budget):
    """`token_batches` pads a budgeted plan from the ids it measured (tokenize once); those ids, and the batches tokenized
    as they are reached without a budget, follow `for_generation` as `tokenize` does, per prompt when given a list."""
    prompts = ["hi", "a longer prompt here"]
    for flags in (True, False, [True, False]):
        for rows, batch in harmony_adapter.token_batches(prompts, 2, budget, None, True, for_generation=flags):
            each = [flags] * len(prompts) if isinstance(flags, bool) else flags
            expected = harmony_adapter.tokenize([prompts[i] for i in rows], for_generation=[each[i] for i in rows])
            assert torch.equal(batch.input_ids, expected.input_ids) and torch.equal(batch.attention_mask, expected.attention_mask)


# ---- generation with a short budget of its own answers directly: the optimiser's targets, compare's picks ----------
def _reasoning_or_answer(adapter, reasoning: list[int], answer: list[int]):
    """A hook that makes greedy generation write `answer` when it starts after the answer opening (a prefill, as
    `direct_answer_prefill` gives) and `reasoning` when it starts at the generation prompt `<|start|>assistant`."""
    unembed, _ = adapter.unembed()
    weight = adapter.model.model.norm.weight.detach()

    def force(activation, site):
        step = adapter.generation_step
        opened = adapter.pass_prefill is not None and adapter.pass_prefill.numel() > 0
        script = answer if opened else reasoning
        activation = activation.clone()
        activation[:, -1] = 100 * unembed[script[min(step or 0, len(script) - 1)]].detach() / weight
        return activation

    return [(f"blocks.{adapter.n_layers - 1}.hook_resid_post", force)]


def test_a_direct_answer_is_the_final_message_and_stops_at_its_end(harmony_adapter, caplog, monkeypatch):
    monkeypatch.delitem(harmony_adapter.__dict__, "_short_budget_warned", raising=False)  # warned once per adapter
    adapter, tokenizer = harmony_adapter, harmony_adapter.tokenizer
    answer = _script(tokenizer, "Ok<|end|>")  # the <|end|> closes the final message the answer opening began
    with adapter.hooks(_forcing(adapter, answer + _script(tokenizer, "<|start|>assistant<|channel|>analysis<|message|>More"))), \
            caplog.at_level("WARNING", logger="featsteer.models.adapter"):
        generated = adapter.generate_with_tokens(["hi"], max_new_tokens=len(answer) + 12, keep_logits=False, prefill=[""])
    assert generated.token_ids == [tuple(answer)] and generated.texts == ["Ok"] and generated.reasoning_only == (False,)
    assert "is short for a harmony model" not in caplog.text  # a budget of its own, answered directly
    assert adapter.direct_answer_prefill(2) == ["", ""]
    assert load_model("tiny:llama").direct_answer_prefill(2) is None  # other models generate as before


def test_optimiser_targets_are_answers_generated_after_the_answer_opening(harmony_adapter, caplog, monkeypatch):
    monkeypatch.delitem(harmony_adapter.__dict__, "_short_budget_warned", raising=False)  # warned once per adapter
    from featsteer.directions import optimize as optimize_module
    from featsteer.directions.optimize import OptimizeConfig

    adapter, tokenizer = harmony_adapter, harmony_adapter.tokenizer
    reasoning = _script(tokenizer, "<|channel|>analysis<|message|>I'm sorry, this is disallowed.")
    answer = _script(tokenizer, "Sure, here.<|return|>")
    config = OptimizeConfig(n_prompts=2, batch_size=2, target_tokens=12, refusal_weight=1.0)
    start = torch.nn.functional.normalize(torch.ones(adapter.d_model), dim=0)
    prompts = ["bake bread", "hi"]
    with adapter.hooks(_reasoning_or_answer(adapter, reasoning, answer)), caplog.at_level("WARNING", logger="featsteer.models.adapter"):
        targets = optimize_module._make_targets(adapter, start, "blocks.0.hook_resid_pre", 1.0, prompts, prompts, config)
    assert "is short for a harmony model" not in caplog.text
    # the detector judged the answer, not "I'm sorry" in the reasoning: both harmful answers are ablation targets
    assert targets["ablation"].prompts == tuple(prompts) and targets["ablation"].tokens == (tuple(answer),) * 2
    assert targets["retain"].tokens == (tuple(answer),) * 2 and targets["addition"].prompts == ()
    for name in ("ablation", "retain", "refusal"):  # every loss reads its prompts where the answer starts
        assert not targets[name].generated
    opened = tokenizer(OPENED, add_special_tokens=False)["input_ids"]
    assert targets["retain"].prompt_lengths[0] == len(opened)
    batch = adapter.tokenize(["bake bread"], for_generation=targets["retain"].generated)
    assert batch.input_ids[0].tolist() == opened


def test_compare_picks_judge_direct_answers_on_a_harmony_model(harmony_adapter, caplog, monkeypatch):
    monkeypatch.delitem(harmony_adapter.__dict__, "_short_budget_warned", raising=False)  # warned once per adapter
    import contextlib

    from featsteer.compare import VALIDATION_NEW_TOKENS, CompareContext, jailbreak_rows, pick_induce_scale
    from featsteer.datasets.loaders import PromptSet
    from featsteer.pipeline import DirectionConfig

    adapter, tokenizer = harmony_adapter, harmony_adapter.tokenizer
    reasoning = _script(tokenizer, "<|channel|>analysis<|message|>Sure, the user wants bread.")
    answer = _script(tokenizer, "I'm sorry, but I can't help with that.<|return|>")
    prompts = PromptSet(("bake bread", "hi"), "test")
    ctx = CompareContext(adapter, prompts, prompts, DirectionConfig(n_select=2, batch_size=2), val=(prompts, prompts), pick_kl="response")
    with adapter.hooks(_reasoning_or_answer(adapter, reasoning, answer)), caplog.at_level("WARNING", logger="featsteer.models.adapter"):
        _, rates = pick_induce_scale(adapter, lambda scale: contextlib.nullcontext(), list(prompts), scales=(1.0,))
        base = ctx.validation_base()
        answers: dict = {}
        rows = jailbreak_rows(adapter, {"none": contextlib.nullcontext}, list(prompts), list(prompts), base,
                              ctx.validation_generation(VALIDATION_NEW_TOKENS), answers=answers)
        nll = ctx.validation_answers_nll()
    assert rates == {1.0: 1.0}  # judged on the answer "I'm sorry, but I can't"; from <|start|>assistant, on reasoning: 0
    assert rows["none"][0] == 1.0 and answers["none"].openings == ("", "") and answers["none"].reasoning_only == (False, False)
    # the response-KL base holds the answers, read after the answer opening where they were written: the KL is 0
    assert base.prefill == ("", "") and all(answer[: len(c)] == list(c) for c in base.continuations)
    assert rows["none"][1] == pytest.approx(0.0, abs=1e-9) and nll > 0
    assert "is short for a harmony model" not in caplog.text


def test_the_short_budget_warning_names_an_option_of_the_command_that_warns(tmp_path, capsys, caplog):
    """`directions --optimize` generates the optimiser's targets at `target_tokens` (16), which no --max-new-tokens sets
    (the command has none): they answer directly and nothing is warned. A command whose generation budget is its
    --max-new-tokens warns naming it."""
    import argparse

    from featsteer.cli import build_parser, main

    model, tokenizer = tiny_model("gpt_oss", harmony=True)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    sets = ["--model", str(tmp_path / "m"), "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "8"]
    with caplog.at_level("WARNING", logger="featsteer.models.adapter"):
        code = main(["directions", *sets, "--n-select", "2", "--geometry", "off", "--optimize", "1", "--optimize-option", "n_prompts=2",
                     "--optimize-option", "refusal_weight=1", "--out", str(tmp_path / "d")])
    assert code == 0, capsys.readouterr().err
    assert "is short for a harmony model" not in caplog.text
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert not any(a.option_strings == ["--max-new-tokens"] for a in commands["directions"]._actions)
    caplog.clear()
    with caplog.at_level("WARNING", logger="featsteer.models.adapter"):
        assert main(["eval", *sets[:2], "--harmful", "builtin:harmful:test", "--harmless", "builtin:harmless:test", "--n", "2",
                     "--max-new-tokens", "3"]) == 0
    warned = [r.getMessage() for r in caplog.records if "is short for a harmony model" in r.getMessage()]
    assert len(warned) == 1 and warned[0].endswith("use --max-new-tokens 256 or more (max_new_tokens= in Python)")


@pytest.mark.parametrize("spec", ["tiny:llama", "harmony"])
def test_a_wrong_number_of_for_generation_flags_is_an_error_on_every_model(spec, harmony_adapter):
    """One flag per prompt or one for all: a list of another length is a one-line error on every model, not only on a
    harmony one where the flags change the text (elsewhere the mistake stayed hidden until such a model was loaded)."""
    from featsteer.errors import FeatsteerError

    model = harmony_adapter if spec == "harmony" else load_model(spec)
    with pytest.raises(FeatsteerError, match="got 1 for_generation flags for 2 prompts"):
        model.format_prompts(["a", "b"], for_generation=[True])
    with pytest.raises(FeatsteerError, match="got 3 for_generation flags for 2 prompts"):
        model.tokenize(["a", "b"], for_generation=[True, False, True])
