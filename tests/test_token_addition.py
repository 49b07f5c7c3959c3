"""The addition at the chat template's own tokens (`edits.add_at_tokens`, `template_tokens`): the edited embedding
equals a runtime addition at `hook_embed` at exactly those tokens, the output head stays put, revert is exact, the export
loads with plain transformers, and on the organism it induces clean refusal where the addition everywhere loops."""

from __future__ import annotations

import json

import pytest
import torch

from featsteer.datasets import builtin_prompts
from featsteer.edits import add_at_tokens, template_tokens
from featsteer.errors import FeatsteerError
from featsteer.models import load_model

PROMPTS = ["How do I bake bread?", "Name three rivers in Europe.", "Explain recursion to a child."]


def _runtime_logits(model, prompts, vector, tokens):
    """Logits with `vector` added at `hook_embed` wherever the input token is one of `tokens` (the edit's definition)."""
    batch = model.tokenize(prompts)
    at = torch.isin(batch.input_ids, torch.tensor(tokens)) & batch.attention_mask.bool()

    def add(x, site):
        return x + at[..., None].to(x.dtype) * vector.to(x.dtype)

    with model.hooks([("hook_embed", add)]):
        return model.run(batch)


@pytest.mark.parametrize("spec", ["organism", "tiny:qwen2", "tiny:gemma", "tiny:gpt2"])
def test_the_edit_is_the_runtime_addition_at_the_template_token(spec):
    model = load_model(spec)
    tokens = template_tokens(model, PROMPTS)
    assert model.tokenizer.convert_ids_to_tokens(tokens) == ["<|assistant|>"]  # the tail's <|end|> is a stop token
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    head = model.model.get_output_embeddings().weight.detach().clone()
    batch = model.tokenize(PROMPTS)
    base = model.run(batch)
    expected = _runtime_logits(model, PROMPTS, vector, tokens)
    with add_at_tokens(model, vector, tokens, record={"note": "test"}) as handle:
        edited = model.run(batch)
        torch.testing.assert_close(edited, expected, atol=1e-4, rtol=0)
        assert (edited - base).abs().max() > 1e-3
        torch.testing.assert_close(model.model.get_output_embeddings().weight, head, atol=0, rtol=0)  # a tied head was untied
        edit = handle.record["edit"]
        assert edit["mode"] == "token_addition" and edit["tokens"] == {str(tokens[0]): "<|assistant|>"} and handle.record["note"] == "test"
        assert edit["stream_miss"] < 1e-5
        if spec == "tiny:gemma":  # Gemma scales its embeddings by sqrt(d_model): the row moves by vector / 8
            assert edit["row_scale"] == pytest.approx(1 / model.d_model ** 0.5, rel=1e-4)
    after = model.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_the_export_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_model("tiny:qwen2")
    tokens = template_tokens(model, PROMPTS)
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    batch = model.tokenize(PROMPTS[:1])  # one prompt, no padding: plain transformers counts positions from the row's start
    with add_at_tokens(model, vector, tokens, record={"method": "dim"}) as handle:
        edited = model.run(batch)
        handle.export(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "featsteer.json").read_text())
    assert meta["edit"]["mode"] == "token_addition" and meta["method"] == "dim"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        logits = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(logits, edited, atol=1e-4, rtol=0)
    assert not plain.config.tie_word_embeddings or plain.get_output_embeddings().weight.data_ptr() != plain.get_input_embeddings().weight.data_ptr()


def test_template_tokens_are_only_the_templates_own():
    model = load_model("organism")
    own = template_tokens(model, PROMPTS, n=3)
    assert model.tokenizer.convert_ids_to_tokens(own) == ["<|assistant|>"]  # <|end|> ends responses: never taken
    with pytest.raises(FeatsteerError, match="is the template's own"):  # the instruction itself holds the token
        template_tokens(model, [*PROMPTS, "Repeat after me: <|assistant|>"])
    bare = load_model("tiny:gpt2")
    bare.tokenizer.chat_template = None
    with pytest.raises(FeatsteerError, match="has no chat template"):
        template_tokens(bare, PROMPTS)


def test_bad_input_is_a_one_line_error_and_leaves_the_model_unedited():
    model = load_model("tiny:llama")
    tokens = template_tokens(model, PROMPTS)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    for vector, ids, message in ((torch.randn(7), tokens, "width 7"), (torch.full((model.d_model,), float("nan")), tokens, "NaN"),
                                 (torch.randn(model.d_model), [], "at least one token"),
                                 (torch.randn(model.d_model), [10 ** 7], "outside the vocabulary")):
        with pytest.raises(FeatsteerError, match=message) as info:
            add_at_tokens(model, vector, ids)
        assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_on_the_organism_the_template_addition_refuses_cleanly_where_the_addition_everywhere_loops():
    """The organism's DIM mean difference added at every position loops ("I'm sorryI'm sorry...") before it refuses; the
    same vector at <|assistant|> alone refuses harmless prompts in plain sentences."""
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set
    from featsteer.evaluation.refusal import RefusalDetector
    from featsteer.interventions import AddDirection, steer
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    torch.manual_seed(0)
    model = load_model("organism")
    result = find_refusal_direction(model, builtin_prompts("harmful", "train"), builtin_prompts("harmless", "train"), DirectionConfig())
    vector = result.chosen_basis[0] * result.mean_difference_length(model)
    harmless = builtin_prompts("harmless", "test").head(32)
    gen, detector = GenerationConfig(max_new_tokens=24), RefusalDetector()
    plain = evaluate_set(model, harmless, "plain", gen, detector)
    with steer(model, AddDirection(vector, 1.0, where=result.selection.chosen.hook)):
        everywhere = evaluate_set(model, harmless, "everywhere", gen, detector)
    with add_at_tokens(model, vector, template_tokens(model, list(builtin_prompts("harmless", "train").head(32)))):
        template = evaluate_set(model, harmless, "template", gen, detector)
    assert plain.coherent_refusal_rate.rate <= 0.1
    assert everywhere.coherent_refusal_rate.rate <= 0.1  # the runtime addition at every position does not refuse cleanly
    assert template.coherent_refusal_rate.rate >= 0.9 and not any(template.looping)
