"""Activation addition written into biases (`edits.add_through_biases`): what it adds, where, exact revert, export."""

from __future__ import annotations

import json

import pytest
import torch

from featsteer.edits import add_through_biases
from featsteer.errors import FeatsteerError
from featsteer.interventions import AddDirection, steer
from featsteer.models import load_model
from featsteer.testing import hooked_gpt2, saved_tokenizer, tiny_model

PROMPTS = ["hello there", "a longer instruction with more words", "x"]
OUTPUT_BIAS_FAMILIES = ("gpt2", "gpt_neox", "phi", "starcoder2")
"""Families whose MLP output projection has a bias: the whole vector goes there, as the runtime addition at the hook."""
ATTENTION_BIAS_ONLY = ("gpt_oss", "lfm2")
"""Families whose only output bias is the attention's (or the convolution's) of a sequential block: the block's MLP
reads what it writes."""
VALUE_BIAS_FAMILIES = ("qwen2", "qwen2_moe", "seed_oss")
"""Families with attention value biases and no output bias: the vector is spread over earlier layers."""
SWITCHED_MLP = ("llama", "smollm3", "granite", "arcee")
"""Families without biases whose config's `mlp_bias` gives their MLPs some: the addition then equals the runtime one."""
SWITCHED_ATTENTION = ("qwen3", "gemma", "apertus", "hunyuan_v1_dense", "cohere")
"""Families whose `attention_bias` is their only switch (Cohere's blocks are parallel, so it equals the runtime one)."""


def _vector(d_model: int, seed: int = 3) -> torch.Tensor:
    return 2.0 * torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


def _adapter(family: str):
    model, tokenizer = tiny_model(family)
    return model, load_model(model, tokenizer=tokenizer)


def _writes(adapter, handle) -> list[tuple[str, torch.Tensor]]:
    """`(hook, vector)` of what each bias the edit changed now adds to the stream more than before."""
    current = {w.name: w for w in adapter.bias_writers()}
    return [(current[name].hook, current[name].reach() @ (current[name].read().double() - old.double()))
            for name, old in handle.bias_originals.items()]


@pytest.mark.parametrize("family", OUTPUT_BIAS_FAMILIES + ATTENTION_BIAS_ONLY + VALUE_BIAS_FAMILIES + SWITCHED_MLP + SWITCHED_ATTENTION)
def test_edited_biases_add_their_writes_and_revert_exactly(family):
    """The edited model gives the logits of the unedited one with each changed bias's write added at its hook at
    runtime, the writes sum to the vector, and leaving the handle restores every parameter bit for bit."""
    model, adapter = _adapter(family)
    layer = adapter.n_layers - 1
    vector = _vector(adapter.d_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    base = adapter.logits(PROMPTS)
    with add_through_biases(adapter, vector, layer, record={"method": "test"}) as handle:
        edited = adapter.logits(PROMPTS)
        writes = _writes(adapter, handle)
    assert (edited - base).abs().max() > 1e-2
    assert model.config.to_dict() == config and model.state_dict().keys() == before.keys()  # a created bias is removed again
    torch.testing.assert_close(sum(w for _, w in writes), vector.double(), atol=1e-4, rtol=0)
    with steer(adapter, *[AddDirection(w.float(), 1.0, where=hook) for hook, w in writes]):
        torch.testing.assert_close(adapter.logits(PROMPTS), edited, atol=1e-4, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert handle.record["method"] == "test" and set(handle.record["bias_writers"]) == set(handle.bias_originals)
    if family in VALUE_BIAS_FAMILIES:  # every attention layer before the last carries part of it
        assert sorted(handle.bias_originals) == [f"blocks.{i}.attn.b_V" for i in range(layer)]
    else:
        assert len(handle.bias_originals) == 1 and next(iter(handle.bias_originals)).startswith(f"blocks.{layer - 1}.hook_")
    assert handle.record["edit"]["exact_at_hook"] == (family in OUTPUT_BIAS_FAMILIES + SWITCHED_MLP + ("cohere",))
    assert handle.record["edit"].get("switched_on") == ("mlp_bias" if family in SWITCHED_MLP else
                                                        "attention_bias" if family in SWITCHED_ATTENTION else None)


@pytest.mark.parametrize("family", OUTPUT_BIAS_FAMILIES + SWITCHED_MLP)
def test_an_mlp_output_bias_equals_the_runtime_addition_at_the_hook(family):
    model, adapter = _adapter(family)
    vector = _vector(adapter.d_model, seed=4)
    with steer(adapter, AddDirection(vector, 0.5, where="blocks.2.hook_resid_pre")):
        expected = adapter.logits(PROMPTS)
    with add_through_biases(adapter, 0.5 * vector, 2):
        torch.testing.assert_close(adapter.logits(PROMPTS), expected, atol=1e-4, rtol=0)


def test_transformer_lens_output_biases_equal_the_runtime_addition(tmp_path):
    model, tokenizer = tiny_model("gpt2")
    adapter = load_model(hooked_gpt2(model, saved_tokenizer(tokenizer, tmp_path)))
    vector = _vector(adapter.d_model)
    base = adapter.logits(PROMPTS)
    with steer(adapter, AddDirection(vector, 1.0, where="blocks.1.hook_resid_pre")):
        expected = adapter.logits(PROMPTS)
    with add_through_biases(adapter, vector, 1) as handle:
        torch.testing.assert_close(adapter.logits(PROMPTS), expected, atol=1e-4, rtol=0)
    assert list(handle.bias_originals) == ["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(adapter.logits(PROMPTS), base, atol=0, rtol=0)


def test_value_biases_prefer_late_layers():
    """With a steep decay the latest layer carries most of the vector; with decay 1 the layers share it more evenly."""
    model, tokenizer = tiny_model("qwen2", num_hidden_layers=4, layer_types=["full_attention"] * 4)  # 3 x 32 columns for 64
    adapter = load_model(model, tokenizer=tokenizer)
    vector = _vector(adapter.d_model)
    norms = {}
    for decay in (1.0, 16.0):
        with add_through_biases(adapter, vector, 3, decay=decay) as handle:
            norms[decay] = handle.record["bias_writers"]
    late = {decay: n["blocks.2.attn.b_V"] / n["blocks.0.attn.b_V"] for decay, n in norms.items()}
    assert late[16.0] > 2 * late[1.0]


def test_export_with_created_biases_loads_with_the_switch_on(tmp_path):
    """Llama: the export carries `mlp_bias: true` and the zero biases of every MLP projection besides the written one, so
    plain transformers builds the same model; the live model is back to no biases after the handle is left."""
    from transformers import AutoModelForCausalLM

    model, adapter = _adapter("llama")
    with add_through_biases(adapter, _vector(adapter.d_model), 2) as handle:
        expected = adapter.logits(PROMPTS)
        handle.export(tmp_path / "edited")
    assert json.loads((tmp_path / "edited" / "config.json").read_text())["mlp_bias"] is True and not model.config.mlp_bias
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    assert plain.model.layers[0].mlp.gate_proj.bias is not None and model.model.layers[0].mlp.gate_proj.bias is None
    torch.testing.assert_close(load_model(str(tmp_path / "edited")).logits(PROMPTS), expected, atol=1e-5, rtol=0)


def test_export_of_a_bias_addition_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, adapter = _adapter("qwen2")
    handle = add_through_biases(adapter, _vector(adapter.d_model), 2, record={"method": "dim"})
    expected = adapter.logits(PROMPTS)
    handle.export(tmp_path / "edited")
    meta = json.loads((tmp_path / "edited" / "featsteer.json").read_text())
    assert meta["edit"]["mode"] == "bias_addition" and meta["edit"]["layer"] == 2 and len(meta["bias_writers"]) == 2
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "edited" / meta["directions_file"]))["vector"], _vector(adapter.d_model).float())
    torch.testing.assert_close(load_model(str(tmp_path / "edited")).logits(PROMPTS), expected, atol=1e-5, rtol=0)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "edited"), type(model))


@pytest.mark.parametrize("family", ["mistral", "phi3", "mixtral", "gemma2"])
def test_a_model_without_usable_biases_is_a_one_line_error(family):
    model, adapter = _adapter(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FeatsteerError, match="no bias that adds a constant.*steer --mode add"):
        add_through_biases(adapter, _vector(adapter.d_model), 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_inputs_are_one_line_errors():
    model, adapter = _adapter("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FeatsteerError, match="cannot write the vector"):  # one layer's value biases span 32 of 64 dimensions
        add_through_biases(adapter, _vector(adapter.d_model), 1)
    with pytest.raises(FeatsteerError, match="out of range"):
        add_through_biases(adapter, _vector(adapter.d_model), 0)
    with pytest.raises(FeatsteerError, match="width 5"):
        add_through_biases(adapter, torch.ones(5), 2)
    with pytest.raises(FeatsteerError, match="NaN"):
        add_through_biases(adapter, torch.full((adapter.d_model,), float("nan")), 2)
    with pytest.raises(FeatsteerError, match="decay"):
        add_through_biases(adapter, _vector(adapter.d_model), 2, decay=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inexact_writes_the_nearest_sum_and_says_what_it_misses():
    """`exact=False` (what compare uses): one layer's value biases write the vector's nearest reachable part, whose
    miss is recorded; at block 0 nothing is written and the whole vector is missed."""
    model, adapter = _adapter("qwen2")
    vector = _vector(adapter.d_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with add_through_biases(adapter, vector, 1, exact=False) as handle:
        (hook, write), = _writes(adapter, handle)
        missed = handle.record["edit"]["missed"]
        assert hook == "blocks.0.hook_attn_out" and 0.3 < missed < 0.95
        assert float((write - vector.double()).norm() / vector.norm()) == pytest.approx(missed, abs=1e-5)
        assert float(write @ (vector.double() - write)) == pytest.approx(0, abs=1e-6)  # the orthogonal projection: nearest
    with add_through_biases(adapter, vector, 0, exact=False) as handle:
        assert handle.record["edit"]["missed"] == 1.0 and not handle.bias_originals
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compare_runs_the_bias_induce_method_only_where_biases_exist():
    from featsteer.compare import INDUCE_SCALES, available_methods, compare
    from featsteer.datasets import builtin_prompts
    from featsteer.evaluation.behaviour import GenerationConfig
    from featsteer.pipeline import DirectionConfig

    harmful, harmless = builtin_prompts("harmful", "train").head(16), builtin_prompts("harmless", "train").head(16)
    mistral = load_model("tiny:mistral")
    assert "dim_bias_induce" not in available_methods(saes=False, model=mistral)
    assert "dim_bias_induce" in available_methods(saes=False, model=load_model("tiny:llama"))  # mlp_bias can be switched on
    with pytest.raises(FeatsteerError, match="dim_bias_induce edit biases that add a constant to the stream, and tiny:mistral has none"):
        compare(mistral, harmful, harmless, methods=["none", "dim_bias_induce"])
    model = load_model("tiny:qwen2")
    assert "dim_bias_induce" in available_methods(saes=False, model=model)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    comparison = compare(model, harmful, harmless, methods=["none", "dim_bias_induce"], direction_config=DirectionConfig(n_select=3),
                         generation=GenerationConfig(max_new_tokens=3))
    details = {r.method: r for r in comparison.results}["dim_bias_induce"].details
    assert details["induce_scale"] in INDUCE_SCALES and details["setting"] == f"x{details['induce_scale']:g}"
    layer = model.hook_site(details["induce_hook"]).layer
    assert list(details["bias_writers"]) == [f"blocks.{i}.attn.b_V" for i in range(layer)]  # 32 dimensions each, of 64
    assert details["missed"] == 1.0 if layer == 0 else 0 < details["missed"] < 1 if layer == 1 else details["missed"] < 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_a_failure_after_the_switch_removes_the_created_biases(monkeypatch):
    import featsteer.edits.biases as biases

    model, adapter = _adapter("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(*args):
        raise FeatsteerError("spread failed")

    monkeypatch.setattr(biases, "_spread", broken)
    with pytest.raises(FeatsteerError, match="spread failed"):
        add_through_biases(adapter, _vector(adapter.d_model), 2)
    assert model.state_dict().keys() == before.keys() and not model.config.mlp_bias and adapter.bias_writers() == []


def test_ctrl_c_after_the_switch_removes_the_created_biases_and_leaves_no_live_edit(monkeypatch):
    """Ctrl-C is no `Exception`: before, it left the switched-on zero biases in the model and the handle on its stack."""
    import featsteer.edits.biases as biases

    model, adapter = _adapter("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(biases, "_spread", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add_through_biases(adapter, _vector(adapter.d_model), 2)
    assert model.state_dict().keys() == before.keys() and not model.config.mlp_bias and adapter.bias_writers() == []
    assert adapter._featsteer_live_edits == []
