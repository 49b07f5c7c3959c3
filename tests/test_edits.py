"""Interventions and weight edits: ablation hook == orthogonalised weights, exact revert, export."""

from __future__ import annotations

import json
import re

import pytest
import torch

from featsteer.edits import (
    EditConfig,
    LayerKernel,
    apply_edit,
    norm_preserving_orthogonalize,
    orthogonalize_weight,
)
from featsteer.errors import FeatsteerError
from featsteer.interventions import (
    RESIDUAL,
    Ablate,
    AddDirection,
    AffineEdit,
    ConditionalSteer,
    HeadAblate,
    ProjectionSet,
    ablate,
    steer,
)
from featsteer.models import load_model
from featsteer.models.families import family_for
from featsteer.testing import FAMILY_NAMES, tiny_model
from tests.conftest import count_hooks

PROMPTS = ["hello there", "a longer instruction with more words", "x"]
POST_NORM_FAMILIES = ("gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4", "olmo2", "olmo3", "exaone4", "glm4")
"""Families that normalise the attention/MLP output before adding it to the stream (listed here by hand, apart from
featsteer's FamilySpec rows, which `test_post_norm_flags_match_the_architectures` checks against this list)."""
EXACT_FAMILIES = tuple(f for f in FAMILY_NAMES if f not in POST_NORM_FAMILIES)
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "dots1", "phimoe", "gpt_oss", "granitemoe", "llama4_text",
                "llama4", "deepseek_v2", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next", "gemma4", "granitemoehybrid")


def _direction(d_model: int, seed: int = 5) -> torch.Tensor:
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", EXACT_FAMILIES)
def test_ablation_hook_equals_orthogonalised_weights(family):
    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    r = _direction(adapter.d_model)
    base = adapter.logits(PROMPTS)
    with steer(adapter, Ablate(r)):
        hooked = adapter.logits(PROMPTS)
    with steer(adapter, Ablate(r, where=RESIDUAL)):
        hooked_residual = adapter.logits(PROMPTS)
    before = _snapshot(model)
    handle = apply_edit(adapter, r)
    edited = adapter.logits(PROMPTS)
    assert (hooked - base).abs().max() > 1e-3
    torch.testing.assert_close(edited, hooked, atol=1e-4, rtol=0)
    torch.testing.assert_close(hooked_residual, hooked, atol=1e-4, rtol=0)
    handle.revert()
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_per_layer_edit_equals_per_layer_ablation_hooks():
    model, tokenizer = tiny_model("llama")
    adapter = load_model(model, tokenizer=tokenizer)
    embed = _direction(adapter.d_model, seed=1)
    own = {layer: _direction(adapter.d_model, seed=10 + layer) for layer in range(adapter.n_layers - 1)}  # last block: `embed`
    hooks = [Ablate(embed, where=["hook_embed", f"blocks.{adapter.n_layers - 1}.hook_attn_out", f"blocks.{adapter.n_layers - 1}.hook_mlp_out"])]
    hooks += [Ablate(r, where=[f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]) for layer, r in own.items()]
    with steer(adapter, *hooks):
        hooked = adapter.logits(PROMPTS)
    with steer(adapter, Ablate(embed)):
        single = adapter.logits(PROMPTS)
    before = _snapshot(model)
    with apply_edit(adapter, embed, by_layer=own) as handle:
        edited = adapter.logits(PROMPTS)
        assert handle.record["per_layer_directions"] == sorted(own)
    torch.testing.assert_close(edited, hooked, atol=1e-4, rtol=0)
    assert (single - hooked).abs().max() > 1e-3  # the per-layer directions really were used
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same direction for every layer is the plain edit, bit for bit
    with apply_edit(adapter, embed):
        plain = _snapshot(model)
    with apply_edit(adapter, embed, by_layer=dict.fromkeys(range(adapter.n_layers), embed)):
        assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FeatsteerError, match="by_layer names layers"):
        apply_edit(adapter, embed, by_layer={adapter.n_layers: embed})
    with pytest.raises(FeatsteerError, match=r"by_layer\[0\] has width 3"):
        apply_edit(adapter, embed, by_layer={0: torch.ones(3)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_post_norm_flags_match_the_architectures():
    assert sorted(f for f in FAMILY_NAMES if family_for(f).post_norms) == sorted(POST_NORM_FAMILIES)


def test_dense_granite4_hybrid_writes_through_its_shared_mlp_alone():
    """Granite 4's dense checkpoints (num_local_experts 0: granite-4.0-h-1b, -350m) have no experts beside the shared MLP:
    one MLP writer per layer, and hook == weights as on the MoE ones."""
    model, tokenizer = tiny_model("granitemoehybrid", num_local_experts=0)
    adapter = load_model(model, tokenizer=tokenizer)
    assert adapter.moe_layers == [] and [w.name for w in adapter.residual_writers() if w.layer == 0] == [
        "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    r = _direction(adapter.d_model)
    with steer(adapter, Ablate(r)):
        hooked = adapter.logits(PROMPTS)
    with apply_edit(adapter, r):
        torch.testing.assert_close(adapter.logits(PROMPTS), hooked, atol=1e-4, rtol=0)
    seen = {}
    names = adapter.hook_names(("resid_mid", "mlp_out", "resid_post"))
    with adapter.hooks([(n, lambda x, s: seen.__setitem__(s.name, x.clone())) for n in names]):
        adapter.run(adapter.tokenize(PROMPTS))
    for layer in range(adapter.n_layers):
        torch.testing.assert_close(seen[f"blocks.{layer}.hook_resid_post"],
                                   seen[f"blocks.{layer}.hook_resid_mid"] + seen[f"blocks.{layer}.hook_mlp_out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_edit_reaches_every_expert_and_the_shared_ones(family):
    """Each routed expert's slice of the fused down_proj (and a shared expert's projection) is one writer: the edit
    removes r from every one of them, so no expert the router picks later can write r back; dense layers of an MoE
    model keep their single MLP writer."""
    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    r = _direction(adapter.d_model).double()
    writers = [w for w in adapter.residual_writers() if w.kind == "mlp_out"]
    config = model.config.get_text_config()
    n_experts = next(getattr(config, key) for key in ("num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts")
                     if getattr(config, key, None))
    dense = {"qwen2_moe": {0}, "deepseek_v3": {0}, "dots1": {0}, "llama4_text": {0, 2}, "llama4": {0, 2}, "deepseek_v2": {0}, "glm4_moe": {0},
             "ernie4_5_moe": {0}}.get(family, set())
    with_shared = ("qwen2_moe", "deepseek_v3", "dots1", "llama4_text", "llama4", "deepseek_v2", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe",
                   "qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next", "granitemoehybrid")
    shared = 1 if family in with_shared else 0
    shared += family == "gemma4"  # the dense MLP beside the experts: blocks.{l}.hook_mlp_out.dense
    for layer in range(adapter.n_layers):
        names = [w.name for w in writers if w.layer == layer]
        expected = 1 if layer in dense else n_experts + shared
        assert len(names) == expected == len(set(names)), (layer, names)
    with apply_edit(adapter, r.float()):
        for writer in writers:
            weight, bias = writer.read()
            assert float((r @ weight.double()).abs().max()) < 1e-5, writer.name
            if bias is not None:
                assert abs(float(r @ bias.double())) < 1e-5, writer.name


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_post_norm_families_edit_but_are_not_exactly_equivalent(family):
    """Gemma 2/3, OLMo 2, EXAONE 4 and GLM-4 renormalise attention/MLP outputs before the residual add, so
    orthogonalising o_proj/down_proj cannot remove r exactly; the edit must still apply, change behaviour and revert
    exactly."""
    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    r = _direction(adapter.d_model)
    before, base = _snapshot(model), adapter.logits(PROMPTS)
    with apply_edit(adapter, r):
        assert (adapter.logits(PROMPTS) - base).abs().max() > 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rank_k_subspace_edit_matches_hook():
    model, tokenizer = tiny_model("llama")
    adapter = load_model(model, tokenizer=tokenizer)
    basis = torch.linalg.qr(torch.randn(adapter.d_model, 3, generator=torch.Generator().manual_seed(1)))[0].T
    with steer(adapter, Ablate(basis)):
        hooked = adapter.logits(PROMPTS)
    with apply_edit(adapter, basis):
        torch.testing.assert_close(adapter.logits(PROMPTS), hooked, atol=1e-4, rtol=0)


def test_pure_weight_functions():
    g = torch.Generator().manual_seed(0)
    weight, r = torch.randn(16, 8, generator=g), _direction(16)
    assert (r @ orthogonalize_weight(weight, r)).abs().max() < 1e-5
    half = orthogonalize_weight(weight, r, 0.5)
    torch.testing.assert_close(r @ half, 0.5 * (r @ weight), atol=1e-5, rtol=0)
    kept = norm_preserving_orthogonalize(weight, r)
    torch.testing.assert_close(kept.norm(dim=0), weight.norm(dim=0), atol=1e-5, rtol=0)
    assert (r @ kept).abs().max() < 1e-5
    x = torch.randn(2, 3, 16, generator=g)
    assert (ablate(x, r) @ r).abs().max() < 1e-5


def test_kernel_strengths():
    kernel = LayerKernel(peak=4, width=2, max_weight=1.0, min_weight=0.5)
    assert [kernel.strength(layer) for layer in range(8)] == [0, 0, 0.5, 0.75, 1.0, 0.75, 0.5, 0]
    assert LayerKernel.from_dict(kernel.to_dict()) == kernel


@pytest.mark.parametrize(("make", "message"), [
    (lambda: EditConfig(mode="amplify", alpha=float("nan")), "alpha=nan: give finite numbers"),
    (lambda: EditConfig(embedding_strength=float("inf")), "embedding_strength=inf: give finite numbers"),
    (lambda: EditConfig(mode="induce", shift=float("nan")), "shift=nan: give finite numbers"),
    (lambda: EditConfig(attn_kernel=LayerKernel(peak=float("nan"), width=1.0)), "LayerKernel peak=nan: give finite numbers"),
    (lambda: LayerKernel(peak=1, width=1, max_weight=float("inf")), "LayerKernel max_weight=inf"),
    (lambda: LayerKernel(peak=1, width=-1), "width=-1 reaches no layer"),
    (lambda: EditConfig(mode="amplify", shift=2.0), "shift=2.0 applies to mode='induce' only"),
    (lambda: EditConfig(mode="norm_preserving", alpha=3.0), "alpha=3.0 applies to mode='amplify' or 'induce' only"),
])
def test_edit_settings_that_would_write_nan_or_be_ignored_are_errors(make, message):
    """Before, a NaN alpha, strength or kernel value wrote NaN into every weight it reached, a negative kernel width edited
    no layer, and shift or alpha outside the modes that read them were dropped: all without a word."""
    with pytest.raises(FeatsteerError, match=re.escape(message)):
        make()


def test_kernel_edit_only_touches_layers_in_range(tmp_path):
    model, tokenizer = tiny_model("llama")
    adapter = load_model(model, tokenizer=tokenizer)
    config = EditConfig(attn_kernel=LayerKernel(1, 0.5), mlp_kernel=LayerKernel(2, 0.5), embedding_strength=0)
    with apply_edit(adapter, _direction(adapter.d_model), config) as handle:
        assert handle.record["writers"] == ["blocks.1.hook_attn_out", "blocks.2.hook_mlp_out"]
    # kernels between layers reach none: the handle used to carry (and export) the unedited model as an edit
    nowhere = EditConfig(attn_kernel=LayerKernel(1.5, 0.2), mlp_kernel=LayerKernel(7, 1), embedding_strength=0)
    before = adapter.logits(PROMPTS)
    with apply_edit(adapter, _direction(adapter.d_model), nowhere) as handle:  # a sweep's zero point: allowed, changes nothing
        assert handle.originals == {} and torch.equal(adapter.logits(PROMPTS), before)
        with pytest.raises(FeatsteerError, match="the edit changes no weight: .*layers 0-2.*exporting it would write the unedited"):
            handle.export(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    with apply_edit(adapter, _direction(adapter.d_model), nowhere, heads={1: [0]}) as handle, \
            pytest.raises(FeatsteerError, match="for the heads named"):
        handle.export(tmp_path / "nothing")
    with apply_edit(adapter, _direction(adapter.d_model), EditConfig(attn_kernel=LayerKernel(1, 0.2)), heads={1: [0]}) as handle:
        assert handle.record["writers"] == ["blocks.1.hook_attn_out"]


def test_amplify_strengthens_component():
    model, tokenizer = tiny_model("llama")
    adapter = load_model(model, tokenizer=tokenizer)
    r = _direction(adapter.d_model)
    writer = adapter.residual_writers()[3]
    weight = writer.read()[0].clone()
    with apply_edit(adapter, r, EditConfig(mode="amplify", alpha=1.0)):
        torch.testing.assert_close(r @ writer.read()[0], 2 * (r @ weight), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma", "granite"])
def test_induce_shift_moves_the_stream_by_the_shift_whatever_the_embedding_scale(family):
    # Gemma multiplies its embeddings by sqrt(d_model) and Granite by a multiplier: the shift is the stream's
    from featsteer.activations import capture

    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    r = _direction(adapter.d_model)
    before = capture(adapter, PROMPTS, ["hook_embed"], positions="last", progress=False).activations[:, 0].double()
    config = EditConfig(mode="induce", alpha=0.0, shift=1.5, embedding_strength=0.0)
    with apply_edit(adapter, r, config) as handle:
        after = capture(adapter, PROMPTS, ["hook_embed"], positions="last", progress=False).activations[:, 0].double()
        assert handle.record["edit"]["shift"] == 1.5
    torch.testing.assert_close((after - before) @ r.double(), torch.full((len(PROMPTS),), 1.5, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gpt_oss", "mixtral", "lfm2"])
def test_head_edit_removes_the_direction_from_those_heads_writes_alone(family):
    """`apply_edit(heads=...)`: the edited layer's attention output is the unedited one minus the direction's component
    of the named heads' writes (each head's `hook_z` slice times its columns of the output projection), computed here
    from the unedited model; nothing but that projection is touched, and revert is exact."""
    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    layer = adapter.attention_layers[-1]
    r = _direction(adapter.d_model).to(adapter.dtype)
    seen = {}
    names = [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"]
    batch = adapter.tokenize(PROMPTS)
    with adapter.hooks([(name, lambda x, s: seen.__setitem__(s.name, x.clone())) for name in names]):
        adapter.run(batch)
    writer = next(w for w in adapter.residual_writers() if w.kind == "attn_out" and w.layer == layer)
    weight = writer.read()[0]
    z = seen[names[0]]  # (batch, pos, n_heads, d_head)
    d_head = z.shape[-1]
    removed = sum((z[:, :, h] @ weight[:, h * d_head:(h + 1) * d_head].T) @ r for h in (0, 2))
    expected = seen[names[1]] - removed[..., None] * r
    before = _snapshot(model)
    with apply_edit(adapter, r, heads={layer: [2, 0]}) as handle:
        edited = {}
        with adapter.hooks([(names[1], lambda x, s: edited.__setitem__("attn", x.clone()))]):
            adapter.run(batch)
        assert list(handle.originals) == [writer.name] and handle.record["heads"] == {str(layer): [0, 2]}
        changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
        assert len(changed) == 1 and changed[0].endswith("weight"), changed  # one projection's weight, not its bias
    assert float(removed.abs().max()) > 1e-3
    torch.testing.assert_close(edited["attn"], expected, atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FeatsteerError, match=r"head\(s\) \[99\] at layer .* do not exist"):
        apply_edit(adapter, r, heads={layer: [99]})
    with pytest.raises(FeatsteerError, match="names no attention head"):
        apply_edit(adapter, r, heads={layer: []})
    if len(adapter.attention_layers) < adapter.n_layers:  # LFM2: a convolution layer has no heads
        other = next(i for i in range(adapter.n_layers) if i not in adapter.attention_layers)
        with pytest.raises(FeatsteerError, match=f"layer {other} has no attention heads to edit"):
            apply_edit(adapter, r, heads={other: [0]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "gpt2", "cohere", "qwen2_moe", "granite"])
def test_reflection_hook_equals_reflected_weights(family):
    """Strength 2 at every write (the direction's component reflected) is the same model as a hook and as weights, and
    differs from ablation; at the first block's input (the embedding alone) the component is the unedited one's
    negated and the rest unchanged; revert is exact."""
    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    r = _direction(adapter.d_model)
    with steer(adapter, Ablate(r, strength=2.0)):
        hooked = adapter.logits(PROMPTS)
    with steer(adapter, Ablate(r)):
        ablated = adapter.logits(PROMPTS)
    before = _snapshot(model)
    seen = []
    first = [("blocks.0.hook_resid_pre", lambda x, s: seen.append(x.clone()))]
    with adapter.hooks(first):
        adapter.run(adapter.tokenize(PROMPTS))
    with apply_edit(adapter, r, EditConfig.reflection(adapter.n_layers)):
        edited = adapter.logits(PROMPTS)
        with adapter.hooks(first):
            adapter.run(adapter.tokenize(PROMPTS))
    torch.testing.assert_close(edited, hooked, atol=1e-4, rtol=0)
    assert (hooked - ablated).abs().max() > 1e-3
    base, reflected = seen
    rr = r.to(base.dtype)
    torch.testing.assert_close(reflected @ rr, -(base @ rr), atol=1e-5, rtol=0)
    torch.testing.assert_close(reflected - (reflected @ rr)[..., None] * rr, base - (base @ rr)[..., None] * rr, atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "gpt2", "lfm2"])
def test_head_ablation_is_zeroing_the_heads_output_columns(family):
    from featsteer.interventions import HeadAblate

    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    layer = adapter.attention_layers[-1]
    base = adapter.logits(PROMPTS)
    before = count_hooks(model)
    with steer(adapter, HeadAblate({layer: [1, 0]})):
        switched_off = adapter.logits(PROMPTS)
    assert count_hooks(model) == before and (switched_off - base).abs().max() > 1e-4
    writer = next(w for w in adapter.residual_writers() if w.kind == "attn_out" and w.layer == layer)
    weight, bias = writer.read()
    d_head = weight.shape[1] // adapter.n_heads
    zeroed = weight.clone()
    zeroed[:, : 2 * d_head] = 0
    original = (weight.clone(), None if bias is None else bias.clone())
    writer.write(zeroed, bias)
    torch.testing.assert_close(adapter.logits(PROMPTS), switched_off, atol=1e-5, rtol=0)
    writer.write(*original)
    with pytest.raises(FeatsteerError, match=r"head\(s\) \[50\] at layer"):
        HeadAblate({layer: [50]}).hooks_for(adapter)
    with pytest.raises(FeatsteerError, match="names no attention head"):
        HeadAblate({}).hooks_for(adapter)


def test_edit_errors_leave_model_untouched():
    model, tokenizer = tiny_model("llama")
    adapter = load_model(model, tokenizer=tokenizer)
    before = _snapshot(model)
    with pytest.raises(FeatsteerError, match="width 7 but the model's d_model is 64"):
        apply_edit(adapter, torch.ones(7))
    with pytest.raises(FeatsteerError, match="NaN"):
        apply_edit(adapter, torch.full((64,), float("nan")))
    with pytest.raises(FeatsteerError, match="unknown edit mode"):
        EditConfig(mode="melt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_failure_part_way_through_an_edit_restores_the_writers_already_edited(monkeypatch):
    """Writers are edited one at a time; when the fifth fails, the four before it are put back bit for bit."""
    import featsteer.edits.apply as apply_module

    model, tokenizer = tiny_model("qwen3_moe")
    adapter = load_model(model, tokenizer=tokenizer)
    before = _snapshot(model)
    real, calls = apply_module.edited_tensors, []

    def failing(writer, *args):
        calls.append(writer.name)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(writer, *args)

    monkeypatch.setattr(apply_module, "edited_tensors", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        apply_edit(adapter, _direction(adapter.d_model))
    assert len(calls) == 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ctrl_c_part_way_through_an_edit_restores_the_writers_and_leaves_no_live_edit(monkeypatch):
    """Ctrl-C is no `Exception`: before, it skipped the restore and left the first writers edited, with the handle of an
    edit the caller never got still on the model's stack of edits."""
    import featsteer.edits.apply as apply_module

    model, tokenizer = tiny_model("qwen2")
    adapter = load_model(model, tokenizer=tokenizer)
    before = _snapshot(model)
    real, calls = apply_module.edited_tensors, []

    def interrupted(writer, *args):
        calls.append(writer.name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(writer, *args)

    monkeypatch.setattr(apply_module, "edited_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apply_edit(adapter, _direction(adapter.d_model))
    assert len(calls) == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert adapter._featsteer_live_edits == []


def test_an_edit_that_fails_before_its_first_writer_is_not_recorded_under_a_later_export(tmp_path):
    """An induce edit of a model whose experts are quantised fails while measuring the embedding scale, before any writer
    is edited: its handle used to stay on the model's stack, and the next export's featsteer.json said it was applied
    on top of that induce edit."""
    model, tokenizer = tiny_model("gpt_oss")
    adapter = load_model(model, tokenizer=tokenizer)
    experts = model.model.layers[1].mlp.experts
    plain = experts.down_proj
    del experts.down_proj
    experts.down_proj_blocks = torch.nn.Parameter(torch.zeros(4, 64, 3, 16, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(FeatsteerError, match="hold no plain"):
        apply_edit(adapter, _direction(adapter.d_model), EditConfig(mode="induce", shift=1.0))
    del experts.down_proj_blocks
    experts.down_proj = plain
    with apply_edit(adapter, _direction(adapter.d_model), record={"tag": "only"}) as handle:
        handle.export(tmp_path / "edited")
    meta = json.loads((tmp_path / "edited" / "featsteer.json").read_text())
    assert meta["tag"] == "only" and "applied_on_top_of" not in meta


def test_export_loads_with_featsteer_and_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_model("qwen2")
    adapter = load_model(model, tokenizer=tokenizer)
    handle = apply_edit(adapter, _direction(adapter.d_model), record={"method": "dim", "layer": 1})
    expected = adapter.logits(PROMPTS)
    handle.export(tmp_path / "edited")
    meta = json.loads((tmp_path / "edited" / "featsteer.json").read_text())
    assert meta["method"] == "dim" and meta["edit"]["mode"] == "orthogonalize" and "torch" in meta["versions"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "edited" / meta["directions_file"]))  # the direction itself travels with the export
    assert torch.equal(saved["direction"][0], _direction(adapter.d_model).float())
    torch.testing.assert_close(load_model(str(tmp_path / "edited")).logits(PROMPTS), expected, atol=1e-5, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    assert isinstance(plain, type(model))
    with pytest.raises(FeatsteerError, match="not empty"):
        handle.export(tmp_path / "edited")
    (tmp_path / "notes.txt").write_text("mine")  # was a NotADirectoryError once the whole model had been written beside it
    with pytest.raises(FeatsteerError, match="export folder .*notes.txt is an existing file: give a folder path"):
        handle.export(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["edited", "notes.txt"]


def test_export_ships_the_tokenizer_with_the_pad_token_and_padding_side_it_came_with(tmp_path):
    """featsteer pads on the left and pads with EOS when a tokenizer has no pad token; the export used to save those
    settings as the model's own (an EOS pad token makes a fine-tune's collator mask EOS out of the labels)."""
    from transformers import AutoTokenizer

    model, tokenizer = tiny_model("qwen2")
    tokenizer.pad_token, tokenizer.padding_side = None, "right"
    adapter = load_model(model, tokenizer=tokenizer)
    with apply_edit(adapter, _direction(adapter.d_model)) as handle:
        handle.export(tmp_path / "edited")
    shipped = AutoTokenizer.from_pretrained(tmp_path / "edited")
    assert shipped.pad_token is None and shipped.padding_side == "right"
    assert shipped.chat_template == tokenizer.chat_template
    assert adapter.tokenizer.pad_token == adapter.tokenizer.eos_token and adapter.tokenizer.padding_side == "left"  # the adapter's again


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe", "gemma3", "mistral3", "qwen3_5", "qwen3_next", "gemma4_text", "gemma4"])
def test_export_of_moe_and_image_text_models_loads_back_edited(family, tmp_path):
    """Fused experts and an image-text model's text decoder are saved edited, and the directory loads back through
    `load_model` (Mistral 3 through the image-text auto class) with the edited logits."""
    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    base = adapter.logits(PROMPTS)
    handle = apply_edit(adapter, _direction(adapter.d_model))
    expected = adapter.logits(PROMPTS)
    assert (expected - base).abs().max() > 1e-3
    handle.export(tmp_path / "edited")
    reloaded = load_model(str(tmp_path / "edited"))
    assert type(reloaded.model) is type(model) and reloaded.family == adapter.family
    torch.testing.assert_close(reloaded.logits(PROMPTS), expected, atol=1e-5, rtol=0)


def test_add_projection_set_and_conditional_steering(llama_adapter):
    r = _direction(llama_adapter.d_model)
    site = "blocks.1.hook_resid_pre"
    seen = {}

    def record(x, s):
        seen[s.name] = x.clone()

    with steer(llama_adapter, ProjectionSet(r, 3.0, where=site)), llama_adapter.hooks([(site, record)]):
        llama_adapter.run(llama_adapter.tokenize(PROMPTS))
    torch.testing.assert_close(seen[site] @ r, torch.full_like(seen[site] @ r, 3.0), atol=1e-4, rtol=0)
    for short in (ProjectionSet(0.5 * r, 3.0, where=site), AffineEdit(0.5 * r, {site: 0.0}, {site: 1.0})):  # would set neither r's projection nor 0.5 r's
        with pytest.raises(FeatsteerError, match="norm 0.5"):
            short.hooks_for(llama_adapter)
    base = llama_adapter.logits(PROMPTS)
    behaviour = AddDirection(r, 8.0, where="blocks.2.hook_resid_pre")
    always = ConditionalSteer(r, "blocks.1.hook_resid_pre", threshold=-2.0, behaviour=behaviour)
    never = ConditionalSteer(r, "blocks.1.hook_resid_pre", threshold=2.0, behaviour=behaviour)
    with steer(llama_adapter, never):
        torch.testing.assert_close(llama_adapter.logits(PROMPTS), base)
    with steer(llama_adapter, always):
        assert (llama_adapter.logits(PROMPTS) - base).abs().amax(-1).min() > 1e-3
    with pytest.raises(FeatsteerError, match="must come before"):
        ConditionalSteer(r, "blocks.2.hook_resid_post", 0.0, behaviour).hooks_for(llama_adapter)


def test_activation_addition_on_the_prompt_or_the_generated_tokens_only(llama_adapter):
    """What each `positions` adds in every pass of a generation: the hooks around it see the activation before and after."""
    r = _direction(llama_adapter.d_model)
    site = "blocks.2.hook_resid_pre"
    base = llama_adapter.logits(PROMPTS[:2])
    added = {}
    for positions in ("all", "prompt", "generated"):
        before, after = [], []
        with llama_adapter.hooks([(site, lambda x, s, seen=before: seen.append(x.clone()))]), \
                steer(llama_adapter, AddDirection(r, 3.0, where=site, positions=positions)), \
                llama_adapter.hooks([(site, lambda x, s, seen=after: seen.append(x.clone()))]):
            llama_adapter.generate(PROMPTS[:2], max_new_tokens=3)
        added[positions] = [float(((b - a) @ r).abs().max()) for a, b in zip(before, after, strict=True)]
        assert len(added[positions]) == 3  # the prompt pass, then two cached decoding steps
        with steer(llama_adapter, AddDirection(r, 3.0, where=site, positions=positions)):
            logits = llama_adapter.logits(PROMPTS[:2])  # outside generation, every pass is a prompt
        if positions == "generated":
            torch.testing.assert_close(logits, base)
        else:
            assert not torch.allclose(logits, base, atol=1e-3)
    assert added["all"] == pytest.approx([3.0, 3.0, 3.0], abs=1e-4)
    assert added["prompt"] == pytest.approx([3.0, 0.0, 0.0], abs=1e-4)
    assert added["generated"] == pytest.approx([0.0, 3.0, 3.0], abs=1e-4)
    with pytest.raises(FeatsteerError, match="unknown positions"):
        AddDirection(r, 1.0, where=site, positions="middle")


def test_conditional_steering_decides_on_the_prompt_not_its_padding(llama_adapter):
    """A prompt's CAST cosine is the same alone and in a left-padded batch with a longer prompt."""
    r = _direction(llama_adapter.d_model)
    prompts = ["Hi", "Please write a long and detailed essay about the history of bread making in Europe."]
    cast = ConditionalSteer(r, "blocks.1.hook_resid_pre", threshold=0.0, behaviour=AddDirection(r, 1.0, where="blocks.2.hook_resid_pre"))
    alone = []
    with steer(llama_adapter, cast):
        for prompt in prompts:
            llama_adapter.logits([prompt])
            alone.append(float(cast.similarity[0]))
        llama_adapter.run(llama_adapter.tokenize(prompts))  # one left-padded batch, rows in input order
        batched = cast.similarity.tolist()
        llama_adapter.generate(prompts, max_new_tokens=3)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert llama_adapter.pass_attention_mask is None  # only set during a pass


def test_steer_removes_all_hooks_after_exception(llama_adapter):
    before = count_hooks(llama_adapter.model)
    r = _direction(llama_adapter.d_model)
    with pytest.raises(RuntimeError), steer(llama_adapter, Ablate(r), AddDirection(r, 1.0, where="blocks.0.hook_resid_post")):
        raise RuntimeError("user code")
    assert count_hooks(llama_adapter.model) == before


def test_quantized_experts_are_a_one_line_error():
    model, tokenizer = tiny_model("gpt_oss")
    adapter = load_model(model, tokenizer=tokenizer)
    experts = model.model.layers[1].mlp.experts
    del experts.down_proj  # what an MXFP4-quantized checkpoint leaves: blocks and scales instead of the weight
    experts.down_proj_blocks = torch.nn.Parameter(torch.zeros(4, 64, 3, 16, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(FeatsteerError, match="experts of layer 1 hold no plain .* down_proj weight .*dequantize"):
        apply_edit(adapter, _direction(adapter.d_model))


def test_quantised_dense_weights_are_a_one_line_error_and_leave_the_model_unedited():
    """An FP8 (or bitsandbytes int8) weight was edited as if its stored values were the weight, cast back and kept without
    a word, and a GPTQ/AWQ-style module with a packed `qweight` raised a raw AttributeError. Both are one line now, for
    the abliteration and the token addition, and nothing is left edited."""
    from featsteer.edits import add_at_tokens

    model, tokenizer = tiny_model("llama")
    adapter = load_model(model, tokenizer=tokenizer)
    before = _snapshot(model)
    down = model.model.layers[1].mlp.down_proj
    plain = down.weight
    down.weight = torch.nn.Parameter(plain.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(FeatsteerError, match="blocks.1.hook_mlp_out holds float8_e4m3fn weights .*load the model dequantized"):
        apply_edit(adapter, _direction(adapter.d_model))
    down.weight = plain

    class Packed(torch.nn.Module):  # what GPTQ/AWQ checkpoints put where the projection was
        qweight = torch.zeros(16, 64, dtype=torch.int32)

        def forward(self, x):
            return x[..., :64]

    model.model.layers[2].self_attn.o_proj = Packed()
    with pytest.raises(FeatsteerError, match="blocks.2.hook_attn_out: the Packed module holds no plain weight"):
        apply_edit(adapter, _direction(adapter.d_model))
    model.model.layers[2].self_attn.o_proj = torch.nn.Linear(64, 64, bias=False)
    model.model.layers[2].self_attn.o_proj.weight = torch.nn.Parameter(before["model.layers.2.self_attn.o_proj.weight"].clone())
    embed = model.model.embed_tokens
    plain = embed.weight
    embed.weight = torch.nn.Parameter(plain.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(FeatsteerError, match="hook_embed holds int8 weights"):
        add_at_tokens(adapter, torch.ones(adapter.d_model), [5])
    embed.weight = plain
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stacked_edits_revert_newest_first_and_export_from_the_top(tmp_path):
    model, tokenizer = tiny_model("qwen2")
    adapter = load_model(model, tokenizer=tokenizer)
    before = _snapshot(model)
    first = apply_edit(adapter, _direction(adapter.d_model, 1), record={"tag": "first"})
    second = apply_edit(adapter, _direction(adapter.d_model, 2), record={"tag": "second"})
    with pytest.raises(FeatsteerError, match="applied after this one are still in place: revert them first"):
        first.revert()  # before, this reported success and left the first edit in the weights
    with pytest.raises(FeatsteerError, match="an edit applied after this one is still in place"):
        first.export(tmp_path / "older")
    second.export(tmp_path / "both")
    meta = json.loads((tmp_path / "both" / "featsteer.json").read_text())
    assert meta["tag"] == "second" and [r["tag"] for r in meta["applied_on_top_of"]] == ["first"]
    second.revert()
    first.revert()
    first.revert()  # reverting twice does nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_revert_ties_a_shared_output_head_again():
    model, tokenizer = tiny_model("qwen2")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    adapter = load_model(model, tokenizer=tokenizer)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    expected = adapter.logits(PROMPTS)
    with apply_edit(adapter, _direction(adapter.d_model)):
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight  # the edit unties them
        assert model.config.tie_word_embeddings is False
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight and model.config.tie_word_embeddings is True
    torch.testing.assert_close(adapter.logits(PROMPTS), expected, atol=0, rtol=0)


def test_directions_that_would_not_be_removed_are_errors():
    model, tokenizer = tiny_model("llama")
    adapter = load_model(model, tokenizer=tokenizer)
    r = _direction(adapter.d_model)
    before = _snapshot(model)
    with pytest.raises(FeatsteerError, match="has norm 2, more than 1"):
        apply_edit(adapter, 2 * r)  # would flip and amplify the component
    with pytest.raises(FeatsteerError, match="zero vector"):
        apply_edit(adapter, torch.zeros(adapter.d_model))
    with pytest.raises(FeatsteerError, match="not orthonormal"):
        apply_edit(adapter, torch.stack([r, (r + _direction(adapter.d_model, 9)) / (r + _direction(adapter.d_model, 9)).norm()]))
    with pytest.raises(FeatsteerError, match="more than 1"), steer(adapter, Ablate(3 * r)):
        pass
    with pytest.raises(FeatsteerError, match="is 7 wide but blocks.0.hook_resid_pre of .* carries 64"), steer(adapter, AddDirection(torch.ones(7), 1.0, where="blocks.0.hook_resid_pre")):
        pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and count_hooks(model) == 0
    with apply_edit(adapter, 0.5 * r, weighted=True):  # opted in: orthogonal rows shorter than 1 are a damped projector (the SVD ridge basis)
        pass


def test_a_short_vector_is_refused_unless_weighted_and_hook_and_edit_agree_on_it():
    """A raw vector of norm 0.5 removed a quarter of its component (`x - B^T B x`) instead of all of it: by default it is
    refused, by hook and edit alike; with `weighted=True` (the ridge-weighted SVD basis) both damp it the same way."""
    model, tokenizer = tiny_model("llama")
    adapter = load_model(model, tokenizer=tokenizer)
    r = _direction(adapter.d_model)
    two = torch.stack([r, _direction(adapter.d_model, 9)])
    two[1] -= (two[1] @ r) * r
    two[1] /= two[1].norm()
    before = _snapshot(model)
    for short in (0.5 * r, torch.stack([two[0], 0.5 * two[1]])):
        with pytest.raises(FeatsteerError, match=r"less than 1: normalise it .*weighted=True"):
            apply_edit(adapter, short)
        with pytest.raises(FeatsteerError, match="less than 1"), steer(adapter, Ablate(short)):
            pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and count_hooks(model) == 0
    with steer(adapter, Ablate(0.999 * r)):  # within the tolerance: taken as it is
        pass
    with steer(adapter, Ablate(0.5 * r, weighted=True)):
        hooked = adapter.logits(PROMPTS)
    with apply_edit(adapter, 0.5 * r, weighted=True):
        edited = adapter.logits(PROMPTS)
    assert not torch.allclose(hooked, adapter.logits(PROMPTS), atol=1e-3)
    torch.testing.assert_close(hooked, edited, atol=2e-4, rtol=0)


def test_export_folders_follow_the_umask(tmp_path):
    import os

    model, tokenizer = tiny_model("qwen2")
    adapter = load_model(model, tokenizer=tokenizer)
    mask = os.umask(0o022)
    try:
        with apply_edit(adapter, _direction(adapter.d_model)) as handle:
            handle.export(tmp_path / "shared")
    finally:
        os.umask(mask)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 kept other users out
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "shared").iterdir()} == {0o644}  # save_pretrained wrote weights at 0600


def test_conditional_steering_decides_afresh_on_a_one_token_prompt(llama_adapter):
    """A one-token prompt's pass is a prompt pass like any other: the gate decides on it (it kept the previous prompt's
    decision, taking any one-token pass of the same batch size for a cached decoding step)."""
    r = _direction(llama_adapter.d_model)
    one = llama_adapter.tokenize(["a"], chat=False)
    assert one.input_ids.shape == (1, 1)
    cast = ConditionalSteer(r, "blocks.1.hook_resid_pre", threshold=0.0, behaviour=AddDirection(r, 1.0, where="blocks.2.hook_resid_pre"))
    with steer(llama_adapter, cast):
        llama_adapter.run(one)
        alone = float(cast.similarity[0])
        llama_adapter.run(llama_adapter.tokenize(PROMPTS[:1]))
        assert float(cast.similarity[0]) != pytest.approx(alone, abs=1e-4)
        llama_adapter.run(one)
        assert float(cast.similarity[0]) == pytest.approx(alone, abs=1e-6)
        llama_adapter.generate(["a"], chat=False, max_new_tokens=3)  # decided on the prompt, kept while decoding
        assert float(cast.similarity[0]) == pytest.approx(alone, abs=1e-6)


def test_conditional_head_ablation_acts_row_by_row(llama_adapter):
    """A gate around HeadAblate (hook_z is (batch, pos, heads, d_head)) switches the heads off for the sequences it fires
    on only (the decision broadcast against the positions: an error, or another row's decision where batch = pos)."""
    r = _direction(llama_adapter.d_model)
    heads = HeadAblate({1: [0, 1]})
    for batch in (llama_adapter.tokenize(PROMPTS[:2]), llama_adapter.tokenize(["a", "b"], chat=False)):
        base = llama_adapter.run(batch)
        with steer(llama_adapter, heads):
            full = llama_adapter.run(batch)
        probe = ConditionalSteer(r, "blocks.0.hook_resid_pre", 0.0, heads)
        with steer(llama_adapter, probe):
            llama_adapter.run(batch)
        similarity = probe.similarity
        assert float(similarity[0]) != pytest.approx(float(similarity[1]), abs=1e-6)
        gate = ConditionalSteer(r, "blocks.0.hook_resid_pre", float(similarity.mean()), heads)
        with steer(llama_adapter, gate):
            gated = llama_adapter.run(batch)
        for row, fired in enumerate(gate.active.tolist()):
            torch.testing.assert_close(gated[row], (full if fired else base)[row])
