"""Model adapter: hook points, hook hygiene, padding, generation, loading errors, TL equivalence."""

from __future__ import annotations

import copy
import shutil
import weakref
from operator import attrgetter

import pytest
import torch

from featsteer.errors import FeatsteerError
from featsteer.models import FALLBACK_TEMPLATE, load_model, supported_model_types
from featsteer.models.harmony import CONTROL_TOKENS
from featsteer.testing import HARMONY_SPECIALS, byte_tokenizer, hooked_gpt2, saved_tokenizer, tiny_model
from tests.conftest import count_hooks

PROMPTS = ["hello there", "a much longer instruction that needs padding", "third"]
KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "per_layer_out", "resid_post")
NORMS = ("ln1_normalized", "ln2_normalized")


def _record(adapter, names, prompts=PROMPTS):
    seen = {}
    with adapter.hooks([(n, lambda x, s: seen.__setitem__(s.name, x.clone())) for n in names]):
        logits = adapter.run(adapter.tokenize(prompts))
    return seen, logits


PARALLEL_FAMILIES = ("cohere", "cohere2", "phi", "gpt_neox")
"""Attention and MLP read the block's input and are added together: no resid_mid (written out apart from featsteer's rows)."""
GEMMA_4 = ("gemma4_text", "gemma4")
"""Each layer ends by multiplying the stream by its `layer_scalar`; the E2B/E4B layout (`gemma4_text` here) adds a
per-layer input branch after the MLP, the 26B-A4B layout (`gemma4`) runs experts beside the MLP."""


def test_hook_points_match_residual_identities(family_model):
    family, model, tokenizer = family_model
    adapter = load_model(model, tokenizer=tokenizer)
    assert adapter.parallel_block == (family in PARALLEL_FAMILIES)
    assert adapter.per_layer_inputs == (family == "gemma4_text")
    names = ["hook_embed"] + adapter.hook_names(KINDS)
    assert any(name.endswith("hook_resid_mid") for name in names) != adapter.parallel_block
    seen, _ = _record(adapter, names)
    batch = adapter.tokenize(PROMPTS)
    hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   output_hidden_states=True).hidden_states
    for layer in range(adapter.n_layers):
        pre, attn, mlp, post = (seen[f"blocks.{layer}.hook_{k}"] for k in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
        torch.testing.assert_close(pre, hidden[layer], atol=1e-5, rtol=0)
        if family in PARALLEL_FAMILIES:
            torch.testing.assert_close(post, pre + attn + mlp, atol=1e-5, rtol=0)
        elif family in GEMMA_4:
            mid = seen[f"blocks.{layer}.hook_resid_mid"]
            torch.testing.assert_close(mid, pre + attn, atol=1e-5, rtol=0)
            per_layer = seen.get(f"blocks.{layer}.hook_per_layer_out", 0)
            assert (family == "gemma4_text") == torch.is_tensor(per_layer)
            torch.testing.assert_close(post, (mid + mlp + per_layer) * adapter.layers[layer].layer_scalar, atol=1e-5, rtol=0)
        else:
            mid = seen[f"blocks.{layer}.hook_resid_mid"]
            torch.testing.assert_close(mid, pre + attn, atol=1e-5, rtol=0)
            torch.testing.assert_close(post, mid + mlp, atol=1e-5, rtol=0)
        if layer + 1 < adapter.n_layers:
            torch.testing.assert_close(post, seen[f"blocks.{layer + 1}.hook_resid_pre"], atol=0, rtol=0)
    if family != "gpt2":  # GPT-2 adds a position embedding after hook_embed
        torch.testing.assert_close(seen["hook_embed"], seen["blocks.0.hook_resid_pre"], atol=0, rtol=0)


def _normalised(x, layer_norm, eps):
    """RMSNorm / LayerNorm without the weight, written out: what TransformerLens calls `hook_normalized`."""
    if layer_norm:
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _scaled(norm, z):
    """The norm's weight (and bias) applied to a normalised vector, as the module does after normalising."""
    name = type(norm).__name__
    offset = 1.0 if name.startswith(("Gemma", "Qwen3_5", "Qwen3Next")) and not name.startswith("Gemma4") else 0.0  # 1 + weight
    return z * (norm.weight + offset) + (norm.bias if getattr(norm, "bias", None) is not None else 0)


# Written out per family, apart from featsteer's FamilySpec rows, so the test checks them: the norm the MLP reads
# (None: it reads the stream itself), the norm on the MLP's output before the stream (if any), LayerNorm or RMSNorm.
MLP_INPUT_NORM = {"gpt2": "ln_2", "cohere": "input_layernorm", "cohere2": "input_layernorm", "phi": "input_layernorm", "gemma2": "pre_feedforward_layernorm", "gemma3_text": "pre_feedforward_layernorm",
                  "gemma3": "pre_feedforward_layernorm", "apertus": "feedforward_layernorm", "olmo2": None, "olmo3": None,
                  "exaone4": None, "lfm2": "ffn_norm", "gemma4_text": "pre_feedforward_layernorm", "gemma4": "pre_feedforward_layernorm"}
MLP_OUTPUT_NORM = {"gemma2": "post_feedforward_layernorm", "gemma4_text": "post_feedforward_layernorm", "gemma4": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm",
                   "gemma3": "post_feedforward_layernorm", "olmo2": "post_feedforward_layernorm", "olmo3": "post_feedforward_layernorm",
                   "exaone4": "post_feedforward_layernorm", "glm4": "post_mlp_layernorm"}
LAYER_NORM_FAMILIES = ("gpt2", "starcoder2", "phimoe", "cohere", "cohere2", "phi", "gpt_neox", "stablelm")
FINAL_NORM = {"gpt2": "transformer.ln_f", "phi": "model.final_layernorm", "gpt_neox": "gpt_neox.final_layer_norm",
              "llama4": "language_model.model.norm", "llama4_text": "model.norm", "lfm2": "model.embedding_norm"}
GRANITE = ("granite", "granitemoe", "granitemoehybrid")  # multiply each write by config.residual_multiplier and divide the logits


def _eps(norm) -> float:
    return getattr(norm, "variance_epsilon", None) or norm.eps


def test_norm_hooks_carry_what_attention_mlp_and_unembedding_read(family_model):
    """ln1/ln2/ln_final.hook_normalized are the normalised vectors the next module reads (before the norm's weight,
    as TransformerLens defines them), checked against the stream they normalise, the MLP re-run on ln2, and the
    logits recomputed from ln_final. Families whose branches read the raw stream have no ln1/ln2 and say so."""
    family, model, tokenizer = family_model
    adapter = load_model(model, tokenizer=tokenizer)
    layer_norm = family in LAYER_NORM_FAMILIES
    mlp_norm = MLP_INPUT_NORM.get(family, "post_attention_layernorm")
    norms = NORMS if mlp_norm else ()
    names = adapter.hook_names(("resid_pre", "resid_mid", "mlp_out", "resid_post") + norms)
    seen, logits = _record(adapter, [*names, "ln_final.hook_normalized"])
    mlp_reads = "resid_pre" if family in PARALLEL_FAMILIES else "resid_mid"
    with torch.inference_mode():  # the recorded tensors are inference tensors
        for layer in range(adapter.n_layers if mlp_norm else 0):
            block = adapter.layers[layer]
            eps = _eps(getattr(block, mlp_norm))
            ln1, ln2 = seen[f"blocks.{layer}.ln1.hook_normalized"], seen[f"blocks.{layer}.ln2.hook_normalized"]
            torch.testing.assert_close(ln1, _normalised(seen[f"blocks.{layer}.hook_resid_pre"], layer_norm, eps), atol=1e-5, rtol=0)
            torch.testing.assert_close(ln2, _normalised(seen[f"blocks.{layer}.hook_{mlp_reads}"], layer_norm, eps), atol=1e-5, rtol=0)
            mlp = {"granitemoe": "block_sparse_moe", "llama4": "feed_forward", "llama4_text": "feed_forward", "lfm2": "feed_forward",
                   "granitemoehybrid": "shared_mlp"}.get(family, "mlp")
            mlp_out = _first(getattr(block, mlp)(_scaled(getattr(block, mlp_norm), ln2))).view(ln2.shape)  # Llama 4 MoE: flat
            if family == "granitemoehybrid":  # Granite 4: the routed experts' output is added to the shared MLP's
                mlp_out = mlp_out + block.block_sparse_moe(_scaled(getattr(block, mlp_norm), ln2))
            if family == "gemma4":  # experts beside the MLP, each renormalised; the router and experts read the stream
                mid = seen[f"blocks.{layer}.hook_resid_mid"].flatten(0, 1)
                _, weights, index = block.router(mid)
                experts = block.experts(block.pre_feedforward_layernorm_2(mid), index, weights).view(ln2.shape)
                mlp_out = block.post_feedforward_layernorm_1(mlp_out) + block.post_feedforward_layernorm_2(experts)
            if family in MLP_OUTPUT_NORM:
                mlp_out = getattr(block, MLP_OUTPUT_NORM[family])(mlp_out)
            if family in GRANITE:
                mlp_out = mlp_out * model.config.residual_multiplier
            torch.testing.assert_close(mlp_out, seen[f"blocks.{layer}.hook_mlp_out"], atol=1e-4, rtol=0)
        final_norm = attrgetter(FINAL_NORM[family])(model) if family in FINAL_NORM else model.get_decoder().norm
        last = seen[f"blocks.{adapter.n_layers - 1}.hook_resid_post"]
        torch.testing.assert_close(seen["ln_final.hook_normalized"], _normalised(last, layer_norm, _eps(final_norm)), atol=1e-5, rtol=0)
        via_head = model.get_output_embeddings()(_scaled(final_norm, seen["ln_final.hook_normalized"]))
        config = model.config.get_text_config()
        if getattr(config, "final_logit_softcapping", None):
            cap = config.final_logit_softcapping
            via_head = torch.tanh(via_head / cap) * cap
        if family in GRANITE:
            via_head = via_head / config.logits_scaling
        if family in ("cohere", "cohere2"):
            via_head = via_head * config.logit_scale
        torch.testing.assert_close(via_head, logits, atol=1e-4, rtol=0)
    if not mlp_norm:
        with pytest.raises(FeatsteerError, match="has no norm before the attention.*blocks.1.hook_resid_pre"):
            _record(adapter, ["blocks.1.ln1.hook_normalized"])
        with pytest.raises(FeatsteerError, match="has no norm before the MLP.*blocks.0.hook_resid_mid"):
            _record(adapter, ["blocks.0.ln2.hook_normalized"])


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def test_norm_hook_edits_reach_only_their_branch(llama_adapter):
    batch = llama_adapter.tokenize(PROMPTS)
    seen, _ = _record(llama_adapter, llama_adapter.hook_names(("resid_mid", "attn_out", "mlp_out")))
    zero = [("blocks.1.ln2.hook_normalized", lambda x, s: torch.zeros_like(x))]
    names = llama_adapter.hook_names(("attn_out", "mlp_out"), [1])
    with llama_adapter.hooks(zero):
        edited, _ = _record(llama_adapter, names)
        changed = llama_adapter.run(batch)
    torch.testing.assert_close(edited["blocks.1.hook_attn_out"], seen["blocks.1.hook_attn_out"], atol=0, rtol=0)
    assert float(edited["blocks.1.hook_mlp_out"].abs().max()) == 0.0  # a bias-free MLP of zeros writes zeros
    assert (changed - llama_adapter.run(batch)).abs().max() > 1e-4
    site = llama_adapter.hook_site("blocks.2.ln1.hook_normalized")
    assert site.kind == "ln1_normalized" and site.layer == 2
    assert llama_adapter.hook_site("blocks.1.hook_mlp_out").order < site.order < llama_adapter.hook_site("blocks.2.hook_attn_out").order
    assert llama_adapter.hook_site("ln_final.hook_normalized").order > llama_adapter.hook_site("blocks.2.hook_resid_post").order


def test_writes_at_equivalent_points_give_equal_logits(family_model):
    _, model, tokenizer = family_model
    adapter = load_model(model, tokenizer=tokenizer)
    vector = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(3))
    batch = adapter.tokenize(PROMPTS)

    def add(x, site):
        return x + vector

    def logits_with(name):
        with adapter.hooks([(name, add)]):
            return adapter.run(batch)

    base = adapter.run(batch)
    via_attn = logits_with("blocks.1.hook_attn_out")
    assert (via_attn - base).abs().max() > 1e-3  # the write changes something
    torch.testing.assert_close(logits_with("blocks.0.hook_resid_post"), logits_with("blocks.1.hook_resid_pre"), atol=1e-5, rtol=0)
    if adapter.parallel_block:  # both branches' writes land in the stream together, after the block
        torch.testing.assert_close(logits_with("blocks.1.hook_mlp_out"), via_attn, atol=1e-4, rtol=0)
        torch.testing.assert_close(logits_with("blocks.1.hook_resid_post"), via_attn, atol=1e-4, rtol=0)
    else:
        torch.testing.assert_close(logits_with("blocks.1.hook_resid_mid"), via_attn, atol=1e-4, rtol=0)


@pytest.mark.parametrize("upstream", ["resid_pre", "attn_out"])
def test_resid_mid_includes_the_changes_of_hooks_installed_later(family_model, upstream):
    """resid_mid is derived as resid_pre + attn_out. Each installation kept its own resid_pre (in a pre-hook on the block)
    and added its own view of attn_out, so a resid_mid hook installed before a resid_pre or attn_out hook (a recording or
    SAE `with` around a steer) read the stream without that change. It must equal what an inner recording sees; and the
    shared hook goes once every installation has left."""
    _, model, tokenizer = family_model
    adapter = load_model(model, tokenizer=tokenizer)
    if adapter.parallel_block:
        return
    vector = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(5))
    shift = [(f"blocks.1.hook_{upstream}", lambda x, s: x + vector)]
    mid = "blocks.1.hook_resid_mid"
    before = count_hooks(model)
    with adapter.hooks(shift):
        inner, _ = _record(adapter, [mid])
    seen = {}
    with adapter.hooks([(mid, lambda x, s: seen.__setitem__(s.name, x.clone()))]), adapter.hooks(shift):
        adapter.run(adapter.tokenize(PROMPTS))
    torch.testing.assert_close(seen[mid], inner[mid], atol=1e-5, rtol=0)
    assert count_hooks(model) == before


@pytest.mark.parametrize("family", ["cohere", "phi", "gpt_neox"])
def test_parallel_blocks_norm_edits_reach_only_their_branch_and_resid_mid_is_refused(family):
    """Cohere and Phi-2 feed one norm's output to both branches; an edit at ln1 must reach the attention only and one
    at ln2 the MLP only, as on models with a norm per branch (GPT-NeoX)."""
    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    writes = adapter.hook_names(("attn_out", "mlp_out"), [1])
    seen, _ = _record(adapter, writes)
    for norm, untouched, touched in (("ln1", "mlp_out", "attn_out"), ("ln2", "attn_out", "mlp_out")):
        with adapter.hooks([(f"blocks.1.{norm}.hook_normalized", lambda x, s: x * 0.5)]):
            edited, _ = _record(adapter, writes)
        torch.testing.assert_close(edited[f"blocks.1.hook_{untouched}"], seen[f"blocks.1.hook_{untouched}"], atol=0, rtol=0)
        assert (edited[f"blocks.1.hook_{touched}"] - seen[f"blocks.1.hook_{touched}"]).abs().max() > 1e-3
    with pytest.raises(FeatsteerError, match="blocks.1.hook_resid_mid does not exist.*in parallel.*blocks.1.hook_resid_post"):
        _record(adapter, ["blocks.1.hook_resid_mid"])


@pytest.mark.parametrize(("family", "parallel"), [("stablelm", True), ("gpt_neox", False)])
def test_the_parallel_residual_flag_is_read_per_checkpoint(family, parallel):
    """StableLM and GPT-NeoX decide parallel vs sequential blocks by `use_parallel_residual`; the flipped setting of each
    tiny model's default must give the other layout (parallel StableLM has no MLP norm: the MLP reads ln1's)."""
    from transformers import AutoModelForCausalLM

    reference, tokenizer = tiny_model(family)
    config = reference.config
    config.use_parallel_residual = parallel
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    adapter = load_model(model, tokenizer=tokenizer)
    assert adapter.parallel_block is parallel
    seen, _ = _record(adapter, adapter.hook_names(KINDS + NORMS))
    for layer in range(adapter.n_layers):
        pre, attn, mlp, post = (seen[f"blocks.{layer}.hook_{k}"] for k in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
        mlp_reads = pre if parallel else pre + attn
        torch.testing.assert_close(post, mlp_reads + mlp if not parallel else pre + attn + mlp, atol=1e-5, rtol=0)
        eps = adapter.layers[layer].input_layernorm.eps
        torch.testing.assert_close(seen[f"blocks.{layer}.ln2.hook_normalized"], _normalised(mlp_reads, True, eps), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, mixer", [("lfm2", "conv"), ("qwen3_5", "linear_attn"), ("qwen3_next", "linear_attn"),
                                           ("granitemoehybrid", "mamba")])
def test_layers_without_heads_write_like_attention_but_have_no_heads(family, mixer):
    """LFM2 mixes tokens with a short convolution in some layers, Qwen3.5 and Qwen3-Next with a gated DeltaNet (linear
    attention): the mixer's output projection is that layer's attn_out writer (so hook and weight edits cover it), and
    asking for its heads is a one-line error."""
    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    heads_at = [0, 2] if family == "lfm2" else [1]
    other = 1 if family == "lfm2" else 0  # Granite 4 keeps the mixer a layer lacks as None (self_attn on its Mamba layers)
    assert adapter.attention_layers == heads_at and load_model("tiny:llama").attention_layers == [0, 1, 2]
    writer = next(w for w in adapter.residual_writers() if w.name == f"blocks.{other}.hook_attn_out")
    assert writer.read()[0].data_ptr() == getattr(adapter.layers[other], mixer).out_proj.weight.data_ptr()
    seen, _ = _record(adapter, [f"blocks.{layer}.attn.hook_z" for layer in heads_at])
    assert seen[f"blocks.{heads_at[0]}.attn.hook_z"].shape[-2:] == (4, 16)
    with pytest.raises(FeatsteerError, match=fr"blocks.{other}.attn.hook_z does not exist: layer {other} .* mixes tokens with "
                                             fr"{type(getattr(adapter.layers[other], mixer)).__name__}, not softmax attention heads; "
                                             fr"hook blocks.{other}.hook_attn_out"):
        _record(adapter, [f"blocks.{other}.attn.hook_z"])
    # hook_names listed every layer's hook_z, so capturing hook_names(("attn_z",)) failed at the first layer without heads
    assert adapter.hook_names(("attn_z",)) == [f"blocks.{layer}.attn.hook_z" for layer in heads_at]
    assert adapter.hook_names(("resid_pre", "attn_z"), [other]) == [f"blocks.{other}.hook_resid_pre"]
    from featsteer.activations import hook_width

    with pytest.raises(FeatsteerError, match=fr"^blocks.{other}.attn.hook_z does not exist: layer {other} [^\n]*$"):
        hook_width(adapter, f"blocks.{other}.attn.hook_z")  # it gave a width for a point that does not exist
    from featsteer.directions.geometry import head_attribution

    heads = head_attribution(adapter, ["how do I do it?"], ["what is it?"], torch.ones(adapter.d_model))
    assert heads.harmful.shape == (3, 4) and float(heads.harmful[other].abs().sum()) == 0.0
    assert float(heads.harmful[heads_at[0]].abs().sum()) > 0


def test_hooks_are_removed_after_exit_and_after_exception(llama_adapter):
    before = count_hooks(llama_adapter.model)
    with llama_adapter.hooks([(n, lambda x, s: None) for n in llama_adapter.hook_names(KINDS)]):
        assert count_hooks(llama_adapter.model) > before
        llama_adapter.run(llama_adapter.tokenize(PROMPTS))
    assert count_hooks(llama_adapter.model) == before

    def boom(x, site):
        raise RuntimeError("inside hook")

    with pytest.raises(RuntimeError, match="inside hook"), llama_adapter.hooks([("blocks.1.hook_resid_mid", boom)]):
        llama_adapter.run(llama_adapter.tokenize(PROMPTS))
    assert count_hooks(llama_adapter.model) == before
    with pytest.raises(KeyError), llama_adapter.hooks([("blocks.0.hook_resid_pre", lambda x, s: None)]):
        raise KeyError("user code failed")
    assert count_hooks(llama_adapter.model) == before
    llama_adapter.run(llama_adapter.tokenize(PROMPTS), stop_at="blocks.1.hook_resid_pre")
    assert count_hooks(llama_adapter.model) == before


def test_stop_at_skips_later_layers(llama_adapter):
    calls = []
    handle = llama_adapter.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        assert llama_adapter.run(llama_adapter.tokenize(PROMPTS), stop_at="blocks.1.hook_resid_post") is None
        assert calls == []
        assert llama_adapter.run(llama_adapter.tokenize(PROMPTS)) is not None
        assert calls == [1]
    finally:
        handle.remove()


def test_left_padding_does_not_change_results(family_model):
    _, model, tokenizer = family_model
    adapter = load_model(model, tokenizer=tokenizer)
    batched = adapter.logits(PROMPTS, batch_size=3)
    alone = torch.cat([adapter.logits([p]) for p in PROMPTS])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)


def test_gemma4_per_layer_inputs_are_a_residual_write_and_kv_sharing_layers_see_every_position():
    """Gemma 4 E2B/E4B add a third write per layer (`hook_per_layer_out`): ablating at every residual write removes the
    direction from it too, a weight edit projects its output projection (a writer of its own), and its KV-sharing layers (which transformers
    runs on the kept positions alone when `logits_to_keep` is an int) still see every position under `last_only`."""
    from featsteer.edits import apply_edit
    from featsteer.interventions import Ablate, steer

    model, tokenizer = tiny_model("gemma4_text")
    adapter = load_model(model, tokenizer=tokenizer)
    assert "blocks.1.hook_per_layer_out" in adapter.hook_names(("mlp_out", "per_layer_out"))
    r = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(3))
    r = r / r.norm()
    names = adapter.hook_names(("per_layer_out",))
    with steer(adapter, Ablate(r)):
        seen, _ = _record(adapter, names)
    assert max(float((x @ r).abs().max()) for x in seen.values()) < 1e-5
    writers = [w for w in adapter.residual_writers() if w.kind == "per_layer_out"]
    assert [w.name for w in writers] == names and writers[1].read()[0].data_ptr() == model.model.layers[1].per_layer_projection.weight.data_ptr()
    with apply_edit(adapter, r):  # the projection loses r; its post-norm puts some back, as Gemma 2/3's do (not exact)
        assert all(float((r @ w.read()[0]).abs().max()) < 1e-5 for w in writers)
    batch = adapter.tokenize(PROMPTS)
    seen = {}
    with adapter.hooks([("blocks.2.hook_resid_post", lambda x, s: seen.__setitem__("shared", x.shape))]):
        last = adapter.run(batch, last_only=True)
    assert seen["shared"][1] == batch.input_ids.shape[1] and last.shape[1] == 1
    torch.testing.assert_close(last[:, -1], adapter.run(batch)[:, -1], atol=1e-5, rtol=0)
    with adapter.hooks([("blocks.2.hook_resid_post", lambda x, s: seen.__setitem__("continued", x.shape))]):
        tail = adapter.run_continued(batch, [[5, 6]] * len(PROMPTS))
    assert seen["continued"][1] == batch.input_ids.shape[1] + 2 and tail.shape[1] == 3
    with pytest.raises(FeatsteerError, match="blocks.0.hook_per_layer_out does not exist: this llama model has no per-layer input"):
        _record(load_model("tiny:llama"), ["blocks.0.hook_per_layer_out"])
    with pytest.raises(FeatsteerError, match="no per-layer input embeddings, so no blocks.L.hook_per_layer_out"):
        load_model("tiny:gemma4").hook_names(("per_layer_out",))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "qwen3_5_moe", "lfm2", "gemma4_text", "granitemoehybrid"])
def test_greedy_generation_matches_transformers_generate(family):
    model, tokenizer = tiny_model(family)
    adapter = load_model(model, tokenizer=tokenizer)
    ours = adapter.generate(PROMPTS, max_new_tokens=8)
    batch = adapter.tokenize(PROMPTS)
    reference = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=8,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=list(adapter.stop_token_ids))
    expected = []
    for row in reference[:, batch.input_ids.shape[1]:].tolist():
        cut = [t for t in row[: next((i for i, t in enumerate(row) if t in adapter.stop_token_ids), len(row))]]
        expected.append(tokenizer.decode(cut, skip_special_tokens=True).strip())
    assert ours == expected


def test_a_prefill_starts_the_response_and_generation_goes_on_from_it(llama_adapter):
    """`prefill`: the model continues the formatted prompt followed by the prefill text (the same as generating from that
    text untemplated), returns only what it wrote after it, and needs one text per prompt."""
    starts = (["Sure, here is", "No", "1."] * len(PROMPTS))[: len(PROMPTS)]
    ours = llama_adapter.generate(PROMPTS, max_new_tokens=5, batch_size=2, prefill=starts)
    texts = [f.text + start for f, start in zip(llama_adapter.format_prompts(PROMPTS), starts, strict=True)]
    assert ours == llama_adapter.generate(texts, max_new_tokens=5, chat=False)
    assert ours != llama_adapter.generate(PROMPTS, max_new_tokens=5)
    batch, plain = llama_adapter.tokenize(PROMPTS[:1], prefill=["Sure, here is"]), llama_adapter.tokenize(PROMPTS[:1])
    assert batch.input_ids.shape[1] > plain.input_ids.shape[1] and int(batch.n_post_instruction[0]) > int(plain.n_post_instruction[0])
    with pytest.raises(FeatsteerError, match=f"prefill has 1 texts for {len(PROMPTS)} instructions"):
        llama_adapter.generate(PROMPTS, max_new_tokens=2, prefill=["Sure"])


def test_generation_is_batch_invariant(llama_adapter):
    assert llama_adapter.generate(PROMPTS, max_new_tokens=6, batch_size=3) == [
        llama_adapter.generate([p], max_new_tokens=6)[0] for p in PROMPTS
    ]


def test_a_row_that_ends_its_turn_leaves_the_other_rows_logits_bit_identical(monkeypatch):
    """A finished row reads on (its outputs dropped) with attention mask 1. Feeding it as masked-out padding instead was
    tried: in a batch without padding, the first row to finish moves SDPA to its masked kernel, which rounds the other
    rows' logits differently (up to 5e-6 on the organism), so a row's results would depend on when its neighbours stop."""
    from featsteer.models.adapter import TokenBatch

    model = load_model("organism")
    ids = torch.randint(3, 8000, (4, 12), generator=torch.Generator().manual_seed(0))
    batch, eos = TokenBatch(ids, torch.ones_like(ids)), model.tokenizer.eos_token_id  # rows of one length: no padding
    forward = model._forward

    def generate(stop_first_row: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
        seen = []

        def recorded(step, cache, want_cache, keep=0):
            logits, cache = forward(step, cache, want_cache, keep)
            seen.append(logits[:, -1].clone())
            if stop_first_row and model.generation_step == 1:  # row 0 ends its turn at the second token
                logits = logits.clone()
                logits[0, -1, eos] = 1e4
            return logits, cache

        monkeypatch.setattr(model, "_forward", recorded)
        return model._greedy(batch, 8, keep_stop=True)[0], seen

    (free, free_logits), (stopped, stopped_logits) = generate(False), generate(True)
    assert len(stopped[0]) == 2 and stopped[0][-1] == eos and len(free[0]) > 2
    assert stopped[1:] == free[1:] and max(len(row) for row in free[1:]) > 2
    for step, (a, b) in enumerate(zip(free_logits, stopped_logits, strict=False)):
        for row in range(1, 4):
            if len(free[row]) > step:
                assert torch.equal(a[row], b[row]), (step, row)


def test_a_finished_row_running_past_a_learned_position_table_leaves_the_batch_going(monkeypatch):
    """A finished row reads on, so the row with the longest prompt kept counting positions after it ended its turn, and on
    a learned position table (GPT-2's) the batch failed with "longer than the positions" although every row still
    generating fitted: whether a prompt could be answered depended on which prompts were batched with it."""
    model, tokenizer = tiny_model("gpt2")  # 256 positions
    adapter = load_model(model, tokenizer=tokenizer)
    long_text, short_text = "x" * 240, "hello"
    forward = adapter._forward

    def long_row_ends_at_step_1(step, cache, want_cache, keep=0):  # the long prompt's row (batches run longest first)
        logits, cache = forward(step, cache, want_cache, keep)
        if adapter.generation_step == 1 and logits.shape[0] == 2:
            logits = logits.clone()
            logits[0, -1, tokenizer.eos_token_id] = 1e4
        return logits, cache

    monkeypatch.setattr(adapter, "_forward", long_row_ends_at_step_1)
    alone = adapter.generate_with_tokens([short_text], max_new_tokens=30, chat=False, keep_logits=False).token_ids[0]
    both = adapter.generate_with_tokens([long_text, short_text], max_new_tokens=30, chat=False, batch_size=2, keep_logits=False)
    assert both.token_ids[1] == alone and len(alone) == 30 and both.token_ids[0][-1] == tokenizer.eos_token_id
    with pytest.raises(FeatsteerError, match="a sequence of 257 tokens is longer than the 256 positions"):
        adapter.generate([long_text], max_new_tokens=30, chat=False)  # a row still generating past the table is an error


def test_token_budget_batches_cap_rows_and_padded_tokens():
    from featsteer.models.adapter import token_budget_batches

    lengths = [10, 300, 40, 41, 5, 39, 1000]
    batches = token_budget_batches(lengths, batch_size=3, max_batch_tokens=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6] and batches[1] == [1]  # longer than the budget: a batch of its own
    for rows in batches:
        assert len(rows) <= 3
        assert len(rows) == 1 or len(rows) * max(lengths[i] for i in rows) <= 120
    assert [len(b) for b in batches] == [1, 1, 2, 3]  # 41+40 (3 x 41 > 120), then 39, 10, 5


def test_budgeted_generation_and_first_logits_match_plain_passes(llama_adapter):
    plain = llama_adapter.generate(PROMPTS, max_new_tokens=6)
    responses, first = llama_adapter.generate_with_first_logits(PROMPTS, max_new_tokens=6, batch_size=8, max_batch_tokens=40)
    assert responses == plain
    torch.testing.assert_close(first, llama_adapter.logits(PROMPTS), atol=1e-4, rtol=0)
    budgeted = llama_adapter.logits(PROMPTS, batch_size=8, max_batch_tokens=40)
    torch.testing.assert_close(budgeted, llama_adapter.logits(PROMPTS), atol=1e-4, rtol=0)
    with pytest.raises(FeatsteerError, match="max_new_tokens"):
        llama_adapter.generate(PROMPTS, max_new_tokens=0)


def test_generation_keeps_the_token_ids_and_the_end_of_turn_token(llama_adapter):
    model = llama_adapter
    unembed, _ = model.unembed()
    eos = model.tokenizer.eos_token_id
    towards_end = (unembed[eos] / unembed[eos].norm()).detach()
    expected, _ = model._greedy(model.tokenize(PROMPTS), 6)
    capped = model.generate_with_tokens(PROMPTS, max_new_tokens=6, batch_size=3, keep_logits=False)
    assert [list(ids) for ids in capped.token_ids] == expected  # no end-of-turn token within the cap
    assert capped.texts == model.generate(PROMPTS, max_new_tokens=6) and capped.first_logits is None

    def end_at_step_2(activation, site):  # every response ends its turn after two tokens
        return activation + 50 * towards_end.to(activation.dtype) if model.generation_step == 2 else activation

    with model.hooks([(f"blocks.{model.n_layers - 1}.hook_resid_post", end_at_step_2)]):
        ended = model.generate_with_tokens(PROMPTS, max_new_tokens=6, batch_size=3)
    assert [list(ids) for ids in ended.token_ids] == [row[:2] + [eos] for row in expected]
    assert ended.texts == [model.tokenizer.decode(row[:2], skip_special_tokens=True).strip() for row in expected]
    assert ended.first_logits is not None and ended.first_logits.shape[0] == len(PROMPTS)


def test_generation_stops_at_every_end_of_sequence_id_the_generation_config_lists():
    """Chat models end a turn with tokens other than their tokenizer's EOS that only `generation_config.eos_token_id` names
    (Llama 3's `<|end_of_text|>` and `<|eom_id|>`, GLM-4's `<|user|>`): generation went on past them, and the decoded text,
    which skips special tokens, held whatever the model wrote after its turn ended."""
    model, tokenizer = tiny_model("llama")
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, user]  # as GLM-4's generation_config.json lists them
    adapter = load_model(model, tokenizer=tokenizer)
    assert user in adapter.stop_token_ids and tokenizer.eos_token_id in adapter.stop_token_ids
    unembed, _ = adapter.unembed()
    towards_user = (unembed[user] / unembed[user].norm()).detach()
    expected, _ = adapter._greedy(adapter.tokenize(PROMPTS), 6)

    def user_turn_at_step_2(activation, site):
        return activation + 50 * towards_user.to(activation.dtype) if adapter.generation_step == 2 else activation

    with adapter.hooks([(f"blocks.{adapter.n_layers - 1}.hook_resid_post", user_turn_at_step_2)]):
        ended = adapter.generate_with_tokens(PROMPTS, max_new_tokens=6, batch_size=3)
    assert [list(ids) for ids in ended.token_ids] == [row[:2] + [user] for row in expected]
    assert ended.texts == [tokenizer.decode(row[:2], skip_special_tokens=True).strip() for row in expected]


def test_generation_goes_on_past_the_end_of_a_harmony_message():
    """GPT-OSS's harmony format closes its analysis message with `<|end|>` and its turn with `<|return|>`: a vocabulary that
    has `<|return|>` does not stop at `<|end|>`, which kept the reasoning as the response and dropped the answer."""
    model, tokenizer = tiny_model("llama")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|return|>"]}, replace_extra_special_tokens=False)
    adapter = load_model(model, tokenizer=tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end not in adapter.stop_token_ids and tokenizer.eos_token_id in adapter.stop_token_ids
    assert end in load_model("tiny:llama").stop_token_ids  # without <|return|>, <|end|> ends the turn (Phi-3)
    unembed, _ = adapter.unembed()
    towards_end = (unembed[end] / unembed[end].norm()).detach()

    def end_message_at_step_2(activation, site):
        return activation + 50 * towards_end.to(activation.dtype) if adapter.generation_step == 2 else activation

    with adapter.hooks([(f"blocks.{adapter.n_layers - 1}.hook_resid_post", end_message_at_step_2)]):
        generated = adapter.generate_with_tokens(PROMPTS, max_new_tokens=6, keep_logits=False)
    assert all(ids[2] == end and len(ids) > 3 for ids in generated.token_ids)


def test_a_system_prompt_without_the_chat_template_is_a_one_line_error(llama_adapter):
    """With `chat=False` the texts are tokenized as they are, so `system=` went nowhere: generation and logits ran without
    the system prompt the caller asked for."""
    for run in (lambda: llama_adapter.generate(PROMPTS[:2], max_new_tokens=2, chat=False, system="Be brief."),
                lambda: llama_adapter.tokenize(PROMPTS[:2], chat=False, system="Be brief.")):
        with pytest.raises(FeatsteerError, match="a system prompt goes into the chat template, which chat=False leaves out"):
            run()


def test_chat_formatting_and_post_instruction_tokens():
    model, tokenizer = tiny_model("llama")
    adapter = load_model(model, tokenizer=tokenizer)
    formatted = adapter.format_prompts(["Do X"], system="Be brief")[0]
    assert formatted.text == "<|system|>Be brief<|end|><|user|>Do X<|end|><|assistant|>"
    assert formatted.text[: formatted.instruction_end].endswith("Do X")
    assert adapter.tokenize(["Do X"]).n_post_instruction.tolist() == [2]  # <|end|><|assistant|>
    plain = load_model(model, tokenizer=byte_tokenizer(chat=False))
    fallback = plain.format_prompts(["Do X"])[0]
    assert fallback.text == FALLBACK_TEMPLATE.format(system="", instruction="Do X") and not fallback.uses_chat_template


@pytest.mark.parametrize("system", ["", " ", " \n"])
def test_a_blank_system_prompt_is_refused_by_every_entry_point(llama_adapter, system):
    """The CLI and GenerationConfig refused a blank system prompt, but capture, rank_features, the chat judge and the
    adapter took it: " " became a system turn of one space and "" silently none, with the metadata recording it."""
    from featsteer.activations import capture
    from featsteer.evaluation.behaviour import GenerationConfig
    from featsteer.evaluation.judge import ChatJudge
    from featsteer.feature_report import rank_features
    from featsteer.models import BLANK_SYSTEM, format_instruction
    from tests.test_sae import random_sae

    hook = "blocks.1.hook_resid_pre"
    entry_points = {
        "format_instruction": lambda: format_instruction(llama_adapter.tokenizer, "Do X", system),
        "format_prompts": lambda: llama_adapter.format_prompts(["Do X"], system),
        "tokenize raw": lambda: llama_adapter.tokenize(["Do X"], system=system, chat=False),
        "generate": lambda: llama_adapter.generate(["Do X"], max_new_tokens=1, system=system),
        "capture": lambda: capture(llama_adapter, ["Do X"], hook, system=system, progress=False),
        "rank_features": lambda: rank_features(llama_adapter, random_sae(hook=hook), ["Do X"] * 2, ["Say Y"] * 2, system=system),
        "ChatJudge": lambda: ChatJudge(llama_adapter, system=system),
        "GenerationConfig": lambda: GenerationConfig(system=system),
    }
    for name, call in entry_points.items():
        with pytest.raises(FeatsteerError) as raised:
            call()
        assert str(raised.value) == BLANK_SYSTEM, name
    assert "Be brief" in llama_adapter.format_prompts(["Do X"], "Be brief")[0].text


def test_a_tokenizer_without_character_offsets_is_a_one_line_error():
    """Where the instruction ends is read from the fast tokenizer's character offsets; a Python tokenizer has none, and
    every call that tokenizes died with a KeyError ('offset_mapping')."""
    from transformers import ByT5Tokenizer

    model, _ = tiny_model("llama", vocab_size=400)
    adapter = load_model(model, tokenizer=ByT5Tokenizer())
    with pytest.raises(FeatsteerError, match=r"the tokenizer \(ByT5Tokenizer\) gives no character offsets.*fast tokenizer"):
        adapter.tokenize(["Hi"])


def test_weights_writing_into_the_residual_have_documented_orientation(family_model):
    _, model, tokenizer = family_model
    adapter = load_model(model, tokenizer=tokenizer)
    writers = adapter.residual_writers()
    assert [w.kind for w in writers].count("attn_out") == adapter.n_layers
    for writer in writers:
        weight, bias = writer.read()
        assert weight.shape[0] == adapter.d_model, writer.name
        if bias is not None:
            assert bias.shape == (adapter.d_model,)
    # writing back what was read is a no-op; writing a change lands in the model
    writer = next(w for w in writers if w.kind == "mlp_out")
    weight, bias = writer.read()
    original = weight.clone()
    writer.write(weight * 0, bias)
    assert float(writer.read()[0].abs().sum()) == 0.0
    writer.write(original, bias)
    torch.testing.assert_close(writer.read()[0], original, atol=0, rtol=0)


def test_tl_hooked_transformer_gpt2_matches_native(tmp_path):
    model, tokenizer = tiny_model("gpt2")
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    native, lens = load_model(model, tokenizer=tokenizer), load_model(hooked_gpt2(model, tokenizer))
    _assert_same_activations(native, lens)
    assert native.generate(PROMPTS, max_new_tokens=5) == lens.generate(PROMPTS, max_new_tokens=5)


def test_tl_bridge_llama_matches_native(tmp_path):
    from transformer_lens.model_bridge import TransformerBridge

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=copy.deepcopy(model))  # keeps `model` as it is
    native, lens = load_model(model, tokenizer=tokenizer), load_model(bridge)
    _assert_same_activations(native, lens)
    before = count_hooks(bridge)
    with lens.hooks([("blocks.1.hook_resid_pre", lambda x, s: x * 0)]):
        lens.run(lens.tokenize(PROMPTS))
    assert count_hooks(bridge) == before


def test_a_model_a_bridge_was_booted_on_is_refused_and_a_copy_keeps_it_intact(tmp_path):
    """Booting a TransformerBridge on a Hugging Face model replaces the model's modules with the bridge's: the model then
    computed the same logits but generated other tokens with its key-value cache, and featsteer loaded and generated
    with it without a word. Booted on a copy, the original generates as before, with and without the cache; booted on the
    original, loading it and generating with an adapter loaded before are one-line errors."""
    from transformer_lens.model_bridge import TransformerBridge

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    native = load_model(model, tokenizer=tokenizer)
    expected = native.generate(PROMPTS, max_new_tokens=6)
    TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=copy.deepcopy(model))
    ids = tokenizer(PROMPTS[:1], return_tensors="pt")
    with_cache, without = (model.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=cached) for cached in (True, False))
    assert torch.equal(with_cache, without) and native.generate(PROMPTS, max_new_tokens=6) == expected
    TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=model)
    with pytest.raises(FeatsteerError, match=r"TransformerBridge was booted on this Hugging Face model.*copy.deepcopy"):
        native.generate(PROMPTS, max_new_tokens=6)
    with pytest.raises(FeatsteerError, match="TransformerBridge was booted on this Hugging Face model"):
        load_model(model, tokenizer=tokenizer)


def test_a_weight_edit_of_a_bridge_running_processed_weights_is_an_error(tmp_path):
    """enable_compatibility_mode() makes a bridge run folded, centred copies of its weights: an edit of the Hugging Face
    model under it changed nothing the bridge computes, silently. It is an error now, and the model is left as it was;
    without processing the edit reaches the forward pass."""
    from transformer_lens.model_bridge import TransformerBridge

    from featsteer.edits import apply_edit
    from featsteer.testing import random_direction

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    for processed in (True, False):
        bridge = TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=tiny_model("llama")[0])
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not processed)
        lens = load_model(bridge)
        before = lens.logits(PROMPTS)
        assert lens.residual_writers()[0].read()[0].shape[0] == lens.d_model  # reading stays possible
        if processed:
            with pytest.raises(FeatsteerError, match="runs processed copies of its weights"), apply_edit(lens, random_direction(lens.d_model)):
                pass
            torch.testing.assert_close(lens.logits(PROMPTS), before, atol=0, rtol=0)
        else:
            with apply_edit(lens, random_direction(lens.d_model)) as handle:
                assert (lens.logits(PROMPTS) - before).abs().max() > 1e-4
                # saving the bridge raised safetensors' shared-tensors error (thousands of characters): now one line, no folder
                with pytest.raises(FeatsteerError, match="an edit of a TransformerBridge cannot be exported"):
                    handle.export(tmp_path / "export")
                assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export.partial-*"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_processed_bridge_shifts_raw_logits_by_a_constant_per_position_that_no_score_reads(tmp_path, family):
    """enable_compatibility_mode() centres the unembedding: every logit of a position moves by the same constant (about 1e-2)
    and a direction's direct logits by one constant per direction. featsteer reads logits only through log-softmax
    (first-token log-probs, refusal scores, KL) or as differences at one position (logit gaps, token rankings), which the
    constant cancels from, so those match the Hugging Face model's; the README says so."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    from featsteer.directions import logit_lens
    from featsteer.evaluation import RefusalTokens, first_token_logprobs, refusal_logit_gap, refusal_score
    from featsteer.testing import random_direction

    model, tokenizer = tiny_model(family)
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    native = load_model(model, tokenizer=tokenizer)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=AutoModelForCausalLM.from_pretrained(tmp_path))
    bridge.enable_compatibility_mode(disable_warnings=True)
    lens = load_model(bridge)
    shift = lens.logits(PROMPTS) - native.logits(PROMPTS)
    assert shift.abs().max() > 1e-3  # the raw logits differ ...
    torch.testing.assert_close(shift, shift.mean(-1, keepdim=True).expand_as(shift), atol=1e-5, rtol=0)  # ... by one constant a position
    tokens = RefusalTokens(refusal=[5, 6, 7], compliance=[8, 9])
    expected, seen = first_token_logprobs(native, PROMPTS), first_token_logprobs(lens, PROMPTS)
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(refusal_score(seen, tokens), refusal_score(expected, tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(refusal_logit_gap(lens.logits(PROMPTS), tokens), refusal_logit_gap(native.logits(PROMPTS), tokens), atol=1e-5, rtol=0)
    direction = random_direction(lens.d_model)
    ours, theirs = logit_lens(lens, direction, k=5), logit_lens(native, direction, k=5)
    assert [t for t, _ in ours.promoted + ours.suppressed] == [t for t, _ in theirs.promoted + theirs.suppressed]
    moved = torch.tensor([a - b for (_, a), (_, b) in zip(ours.promoted + ours.suppressed, theirs.promoted + theirs.suppressed, strict=True)])
    torch.testing.assert_close(moved, moved.mean().expand_as(moved), atol=1e-5, rtol=0)  # values: one constant for the direction


def test_a_bridge_knows_its_family_particulars(tmp_path):
    """A bridge's config says nothing of post-norms, and every bridge lists a hook_pos_embed: a Gemma 2 bridge claimed no
    post-norms (head attribution ran where heads do not add up), and on a rotary Llama bridge hook_pos_embed never fired,
    so steering there did nothing and capturing there raised a KeyError. The particulars come from the family now."""
    from transformer_lens.model_bridge import TransformerBridge

    from featsteer.interventions import AddDirection, steer
    from featsteer.testing import random_direction

    for family, post_norms in (("llama", False), ("gemma2", True), ("gpt2", False)):
        model, tokenizer = tiny_model(family)
        folder = tmp_path / family
        model.save_pretrained(folder)
        tokenizer = saved_tokenizer(tokenizer, folder)
        lens = load_model(TransformerBridge.boot_transformers(str(folder), tokenizer=tokenizer, hf_model=copy.deepcopy(model)))
        native = load_model(model, tokenizer=tokenizer)
        assert (lens.post_norms, lens.learned_positions) == (post_norms, native.learned_positions), family
        assert lens.family == f"transformer_lens:{type(model).__name__}"
        if not native.learned_positions:
            with pytest.raises(FeatsteerError, match="hook_pos_embed does not exist"), steer(lens, AddDirection(random_direction(lens.d_model), 5.0,
                                                                                                             where="hook_pos_embed")):
                pass


def test_a_bridge_hook_point_that_never_runs_is_neither_offered_nor_hooked(tmp_path):
    """A Granite bridge lists blocks.L.hook_attn_out and hook_mlp_out but never calls them (Granite scales the branch outputs
    outside the bridged modules): steering there did nothing, Ablate(writes) silently skipped them, and capturing raised a
    KeyError. They are not offered now, and hooking them is a one-line error."""
    from transformer_lens.model_bridge import TransformerBridge

    from featsteer.activations import capture
    from featsteer.interventions import Ablate, AddDirection, steer
    from featsteer.testing import random_direction

    model, tokenizer = tiny_model("granite")
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=model)
    lens = load_model(bridge)
    lens.logits(PROMPTS)  # the bridge adds hooks of its own to the modules it wraps on its first pass
    before = count_hooks(bridge)
    assert "resid_mid" in lens.layer_kinds and not {"attn_out", "mlp_out"} & set(lens.layer_kinds)
    direction = random_direction(lens.d_model)
    with pytest.raises(FeatsteerError, match="blocks.0.hook_attn_out never runs on this TransformerLens model.*load the Hugging Face model"):
        capture(lens, PROMPTS, ["blocks.0.hook_attn_out"], progress=False)
    for intervention in (AddDirection(direction, 5.0, where="blocks.1.hook_mlp_out"), Ablate(direction)):
        with pytest.raises(FeatsteerError, match="never runs"), steer(lens, intervention):
            pass
    assert count_hooks(bridge) == before


def test_an_lfm2_bridge_convolution_layers_write_at_hook_attn_out(tmp_path):
    """An LFM2 bridge names no blocks.L.hook_attn_out at its short-convolution layers: hook_names offered it, so Ablate(direction)
    failed with "hook ... does not exist", capturing there failed, and attention_layers listed the convolutions. The
    convolution's output stands in for it now, as on the Hugging Face adapter, whose weight edit edits the same projection."""
    from transformer_lens.model_bridge import TransformerBridge

    from featsteer.activations import capture
    from featsteer.interventions import Ablate, steer
    from featsteer.testing import random_direction

    model, tokenizer = tiny_model("lfm2")
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    native = load_model(model, tokenizer=tokenizer)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=model)
    lens = load_model(bridge)
    assert lens.attention_layers == native.attention_layers == [0, 2]
    with pytest.raises(FeatsteerError, match="blocks.1.attn.hook_z does not exist: layer 1 .* hook blocks.1.hook_attn_out"):
        capture(lens, PROMPTS, ["blocks.1.attn.hook_z"], progress=False)
    assert lens.hook_names(("attn_z",)) == native.hook_names(("attn_z",)) == ["blocks.0.attn.hook_z", "blocks.2.attn.hook_z"]
    assert set(_record(lens, lens.hook_names(("attn_z",)))[0]) == {"blocks.0.attn.hook_z", "blocks.2.attn.hook_z"}
    hooks = lens.hook_names(("attn_out", "mlp_out"))
    seen, expected = (capture(adapter, PROMPTS, hooks, positions="all", progress=False).activations for adapter in (lens, native))
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=0)
    lens.logits(PROMPTS)  # the bridge adds hooks of its own to the modules it wraps on its first pass
    before = count_hooks(bridge)
    ablate = Ablate(random_direction(lens.d_model))
    with steer(native, ablate):
        native_logits = native.logits(PROMPTS)
    with steer(lens, ablate):
        torch.testing.assert_close(lens.logits(PROMPTS), native_logits, atol=1e-4, rtol=0)
    assert count_hooks(bridge) == before


def test_a_gemma4_bridge_ablates_its_per_layer_input_writes(tmp_path):
    """A Gemma 4 bridge names no blocks.L.hook_per_layer_out and the adapter claimed no per-layer inputs, so Ablate(writes) left
    the per-layer-input writes alone while the Hugging Face adapter (and the weight edit) ablate them: logits 0.18 apart, no
    error. The bridge's post_per_layer_input_norm output stands in for it now, and the family's particulars carry over."""
    from transformer_lens.model_bridge import TransformerBridge

    from featsteer.activations import capture
    from featsteer.interventions import Ablate, steer
    from featsteer.testing import random_direction

    model, tokenizer = tiny_model("gemma4_text")
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    native = load_model(model, tokenizer=tokenizer)
    lens = load_model(TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=model))
    assert (lens.per_layer_inputs, lens.scaled_layers) == (native.per_layer_inputs, native.scaled_layers) == (True, True)
    hooks = lens.hook_names(("per_layer_out", "resid_post"))
    assert len(hooks) == 2 * lens.n_layers
    seen, expected = (capture(adapter, PROMPTS, hooks, positions="all", progress=False).activations for adapter in (lens, native))
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=0)
    ablate = Ablate(random_direction(lens.d_model))
    with steer(native, ablate):
        native_logits = native.logits(PROMPTS)
    with steer(lens, ablate):
        torch.testing.assert_close(lens.logits(PROMPTS), native_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_5_text", "qwen3_next", "granitemoehybrid"])
def test_a_bridge_transformer_lens_cannot_run_fails_at_load_in_one_line(tmp_path, family):
    """TransformerLens 3.9's gated DeltaNet bridge reads `causal_conv1d_fn`, which transformers' Qwen3.5 and Qwen3-Next modules
    no longer have, and its Granite 4 hybrid bridge wraps a rotary embedding the model does not have: load_model(bridge)
    succeeded and the first layer_kinds or forward raised a raw AttributeError or RuntimeError from inside TransformerLens.
    It is one FeatsteerError at load time now, naming the workaround (or the bridge runs, once fixed)."""
    from transformer_lens.model_bridge import TransformerBridge

    model, tokenizer = tiny_model(family)
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=model)
    try:
        lens = load_model(bridge)
    except FeatsteerError as error:
        assert "inside TransformerLens" in str(error) and "load_model(path)" in str(error) and "\n" not in str(error)
        assert "causal_conv1d_fn" in str(error) or family == "granitemoehybrid"
        return
    assert "resid_pre" in lens.layer_kinds
    torch.testing.assert_close(lens.logits(PROMPTS), load_model(model, tokenizer=tokenizer).logits(PROMPTS), atol=1e-4, rtol=0)


def test_a_granite_bridge_hook_embed_carries_the_embedding_multiplier(tmp_path):
    """Granite multiplies the embedding by its embedding_multiplier after the embedding module, outside what a bridge wraps:
    a bridge's hook_embed saw a third of what the Hugging Face adapter's hook_embed and blocks.0.hook_resid_pre see, so a
    direction added there was scaled by the multiplier without a word. It carries the product now, on capture and steering."""
    from transformer_lens.model_bridge import TransformerBridge

    from featsteer.activations import capture
    from featsteer.interventions import AddDirection, steer
    from featsteer.testing import random_direction

    model, tokenizer = tiny_model("granite")
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    native = load_model(model, tokenizer=tokenizer)
    lens = load_model(TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=model))
    hooks = ["hook_embed", "blocks.0.hook_resid_pre"]
    seen, expected = (capture(adapter, PROMPTS, hooks, positions="all", progress=False).activations for adapter in (lens, native))
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[:, 0], seen[:, 1], atol=1e-5, rtol=0)
    steering = AddDirection(random_direction(lens.d_model), 4.0, where="hook_embed")
    with steer(native, steering):
        native_logits = native.logits(PROMPTS)
    with steer(lens, steering):
        torch.testing.assert_close(lens.logits(PROMPTS), native_logits, atol=1e-4, rtol=0)


def test_an_attention_only_hooked_transformer_offers_no_mlp_points_and_edits(tmp_path):
    """An attention-only HookedTransformer (attn_only=True) has no MLP: layer_kinds offered resid_mid (which it does not name),
    ln2 and mlp_out (which never run), and every weight edit failed with an AttributeError from the missing block.mlp."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from featsteer.edits import apply_edit
    from featsteer.interventions import Ablate, steer
    from featsteer.testing import random_direction

    tokenizer = saved_tokenizer(byte_tokenizer(), tmp_path)
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=len(tokenizer), n_ctx=64, attn_only=True,
                                  normalization_type="LN", positional_embedding_type="rotary", rotary_dim=16, default_prepend_bos=False, seed=0)
    adapter = load_model(HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="left"))
    assert adapter.layer_kinds == ("resid_pre", "ln1_normalized", "attn_out", "resid_post", "attn_z")
    assert adapter.family == "transformer_lens:HookedTransformer"  # it was transformer_lens:unknown in every error
    with pytest.raises(FeatsteerError, match=r"hook_mlp_out never runs on this TransformerLens model \(transformer_lens:HookedTransformer\)"):
        adapter.hook_site("blocks.0.hook_mlp_out")
    direction = random_direction(adapter.d_model)
    with steer(adapter, Ablate(direction)):
        hooked = adapter.logits(PROMPTS)
    with apply_edit(adapter, direction):
        torch.testing.assert_close(adapter.logits(PROMPTS), hooked, atol=1e-4, rtol=0)


def test_a_sequence_longer_than_n_ctx_of_a_tl_model_is_a_one_line_error(tmp_path):
    """A HookedTransformer's causal mask, position table and rotary angles have n_ctx rows: one token more raised an
    IndexError from inside the forward pass, for a learned position table (GPT-2) and for rotary angles alike."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from featsteer.models.adapter import TokenBatch

    model, tokenizer = tiny_model("gpt2")
    rotary_config = HookedTransformerConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64, d_vocab=len(tokenizer), n_ctx=40, act_fn="silu",
                                            normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=16, default_prepend_bos=False)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    for hooked in (hooked_gpt2(model, tokenizer), HookedTransformer(rotary_config, tokenizer=tokenizer, default_padding_side="left")):
        adapter, n_ctx = load_model(hooked), hooked.cfg.n_ctx
        assert adapter.run(TokenBatch(torch.full((2, n_ctx), 70), torch.ones((2, n_ctx), dtype=torch.long))).shape[1] == n_ctx
        with pytest.raises(FeatsteerError, match=f"a sequence of {n_ctx + 1} tokens is longer than the {n_ctx} positions"):
            adapter.run(TokenBatch(torch.full((2, n_ctx + 1), 70), torch.ones((2, n_ctx + 1), dtype=torch.long)))
        with pytest.raises(FeatsteerError, match="longer than the"):
            adapter.generate(["word " * (n_ctx // 5 - 3)], max_new_tokens=n_ctx)


def test_tl_parallel_block_model_has_no_resid_mid(tmp_path):
    """A HookedTransformer with parallel attention and MLP (Pythia-style) lists no resid_mid and adds both writes at once."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tokenizer = saved_tokenizer(byte_tokenizer(), tmp_path)
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, d_vocab=len(tokenizer), n_ctx=64, act_fn="gelu",
                                  normalization_type="LN", parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=16,
                                  default_prepend_bos=False)
    adapter = load_model(HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="left"))
    assert adapter.parallel_block and "resid_mid" not in adapter.layer_kinds
    assert adapter.hook_names(("resid_pre", "resid_mid", "resid_post"), [0]) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]
    seen, _ = _record(adapter, adapter.hook_names(("resid_pre", "attn_out", "mlp_out", "resid_post"), [0]))
    pre, attn, mlp, post = (seen[f"blocks.0.hook_{k}"] for k in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
    torch.testing.assert_close(post, pre + attn + mlp, atol=1e-5, rtol=0)


def test_tl_layer_kinds_offer_only_the_norm_points_that_exist(tmp_path):
    """layer_kinds offered ln1/ln2 on a HookedTransformer without norms and ln2 on a Phi-2 bridge (whose attention and MLP
    read one norm), where capturing them failed; on an OLMo 2 bridge, whose ln1/ln2 are its post-norms, ln1 captured the
    normalised attention output without a word. Each lists only what exists and means what the README says now (a Phi-2
    bridge's ln2 is its MLP's input, hooked on the Hugging Face norm: test_a_bridge_norm_points_are_the_hugging_face_ones)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.model_bridge import TransformerBridge

    from featsteer.directions.geometry import direct_logits

    tokenizer = saved_tokenizer(byte_tokenizer(), tmp_path)
    cfg = HookedTransformerConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64, d_vocab=len(tokenizer), n_ctx=64, act_fn="gelu",
                                  normalization_type=None, positional_embedding_type="rotary", rotary_dim=16, default_prepend_bos=False)
    plain = load_model(HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="left"))
    assert not plain.input_norms and not set(NORMS) & set(plain.layer_kinds)
    with pytest.raises(FeatsteerError, match="no norms before its attention and MLP"):
        plain.hook_names(NORMS)
    vectors = torch.randn(2, plain.d_model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(direct_logits(plain, vectors), vectors @ plain.model.W_U.detach(), atol=1e-5, rtol=0)  # no final norm
    lenses = {}
    for family, kinds in (("phi", ["ln1_normalized", "ln2_normalized"]), ("olmo2", [])):
        model, family_tokenizer = tiny_model(family)
        model.save_pretrained(tmp_path / family)
        family_tokenizer = saved_tokenizer(family_tokenizer, tmp_path / family)
        lens = lenses[family] = load_model(TransformerBridge.boot_transformers(str(tmp_path / family), tokenizer=family_tokenizer, hf_model=model))
        assert [kind for kind in lens.layer_kinds if kind in NORMS] == kinds, family
        assert set(_record(lens, lens.hook_names(kinds, [0]) if kinds else [])[0]) == {f"blocks.0.{kind[:3]}.hook_normalized" for kind in kinds}
        for missing in (kind for kind in NORMS if kind not in kinds):
            with pytest.raises(FeatsteerError, match="does not exist"), lens.hooks([(f"blocks.0.{missing[:3]}.hook_normalized", lambda x, s: x)]):
                pass


@pytest.mark.parametrize("family", ["gemma4_text", "phi"])
def test_a_bridge_norm_points_are_the_hugging_face_ones(tmp_path, family):
    """A Gemma 4 bridge names no ln1/ln2.hook_normalized (only the norms' hook_out, after their weight), so it offered no
    norm points at all; a Phi-2 bridge's ln1.hook_normalized is the one norm both branches read, so an edit there reached the
    MLP too and it offered no ln2. Both hook the Hugging Face norms under the bridge now: the same values, and edits that
    reach only their own branch, as on the Hugging Face adapter."""
    from transformer_lens.model_bridge import TransformerBridge

    from featsteer.activations import capture
    from featsteer.interventions import AddDirection, steer
    from featsteer.testing import random_direction

    model, tokenizer = tiny_model(family)
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    native = load_model(model, tokenizer=tokenizer)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=model)
    lens = load_model(bridge)
    assert [kind for kind in lens.layer_kinds if kind in NORMS] == list(NORMS)
    hooks = lens.hook_names(NORMS)
    assert hooks == native.hook_names(NORMS) and len(hooks) == 2 * lens.n_layers
    seen, expected = (capture(adapter, PROMPTS, hooks, positions="all", progress=False).activations for adapter in (lens, native))
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=0)
    lens.logits(PROMPTS)  # the bridge adds hooks of its own to the modules it wraps on its first pass
    before = count_hooks(bridge)
    for where in ("blocks.1.ln1.hook_normalized", "blocks.1.ln2.hook_normalized"):
        steering = AddDirection(random_direction(lens.d_model), 3.0, where=where)
        with steer(native, steering):
            native_logits = native.logits(PROMPTS)
        with steer(lens, steering):
            torch.testing.assert_close(lens.logits(PROMPTS), native_logits, atol=1e-4, rtol=0)
        assert count_hooks(bridge) == before
    lens.run(lens.tokenize(PROMPTS), stop_at="blocks.0.ln2.hook_normalized")  # the early stop reaches through as well


@pytest.mark.filterwarnings("ignore:Gemma4TextArchitectureAdapter does not support fold_ln")
def test_a_processed_gemma4_bridge_names_its_missing_norm_points_in_one_line(tmp_path):
    """A bridge running processed weights keeps its own hook points: a Gemma 4 one has no norm points to offer, and asking
    for one says what it has and how to get them."""
    from transformer_lens.model_bridge import TransformerBridge

    model, tokenizer = tiny_model("gemma4_text")
    model.save_pretrained(tmp_path)
    tokenizer = saved_tokenizer(tokenizer, tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), tokenizer=tokenizer, hf_model=model)
    bridge.enable_compatibility_mode(disable_warnings=True)
    lens = load_model(bridge)
    assert not set(NORMS) & set(lens.layer_kinds)
    message = r"names no ln1_normalized hook point and runs processed weights .*: its hook kinds are resid_pre, attn_out, .*without compatibility mode"
    with pytest.raises(FeatsteerError, match=message):
        lens.hook_names(("ln1_normalized",))
    with pytest.raises(FeatsteerError, match=r"^blocks.0.ln2.hook_normalized does not exist: this TransformerBridge [^\n]*load_model\(path\)"):
        lens.hook_site("blocks.0.ln2.hook_normalized")


def test_a_tl_shortformer_position_embedding_is_not_a_residual_write(tmp_path):
    """With shortformer positions a HookedTransformer adds W_pos to each attention's queries and keys, not to the stream:
    the weight edit and Ablate(writes) projected it anyway, which also changed what attention reads, so both differed
    from ablating the stream itself. Now the stream ablation, the write ablation and the edit are one model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from featsteer.edits import apply_edit
    from featsteer.interventions import Ablate, steer
    from featsteer.testing import random_direction

    tokenizer = saved_tokenizer(byte_tokenizer(), tmp_path)
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, d_vocab=len(tokenizer), n_ctx=64, act_fn="gelu",
                                  normalization_type="LN", positional_embedding_type="shortformer", default_prepend_bos=False, seed=0)
    adapter = load_model(HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="left"))
    assert not adapter.learned_positions and "hook_pos_embed" not in [w.name for w in adapter.residual_writers()]
    assert set(_record(adapter, ["hook_pos_embed"])[0]) == {"hook_pos_embed"}  # still a hook point, outside the stream
    direction = random_direction(adapter.d_model)
    with steer(adapter, Ablate(direction, where="residual")):
        stream = adapter.logits(PROMPTS)
    with steer(adapter, Ablate(direction)):
        torch.testing.assert_close(adapter.logits(PROMPTS), stream, atol=1e-4, rtol=0)
    with apply_edit(adapter, direction):
        torch.testing.assert_close(adapter.logits(PROMPTS), stream, atol=1e-4, rtol=0)


def test_a_weight_edit_of_a_tl_mixture_of_experts_model_edits_every_expert(tmp_path):
    """A HookedTransformer MoE layer has no W_out of its own: the edit raised AttributeError from torch. Each expert's
    output projection is a writer now, so the edit equals the ablation hook (the router's weights add the experts)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from featsteer.edits import apply_edit
    from featsteer.interventions import Ablate, steer
    from featsteer.testing import random_direction

    tokenizer = saved_tokenizer(byte_tokenizer(), tmp_path)
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=32, d_vocab=len(tokenizer), n_ctx=64, act_fn="silu",
                                  normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=16, gated_mlp=True,
                                  num_experts=4, experts_per_token=2, default_prepend_bos=False, seed=0)
    adapter = load_model(HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="left"))
    assert [w.name for w in adapter.residual_writers() if w.layer == 0] == ["blocks.0.hook_attn_out", *(f"blocks.0.hook_mlp_out.expert{e}" for e in range(4))]
    direction, before = random_direction(adapter.d_model), adapter.logits(PROMPTS)
    with steer(adapter, Ablate(direction)):
        hooked = adapter.logits(PROMPTS)
    with apply_edit(adapter, direction):
        torch.testing.assert_close(adapter.logits(PROMPTS), hooked, atol=1e-4, rtol=0)
    torch.testing.assert_close(adapter.logits(PROMPTS), before, atol=0, rtol=0)


def _assert_same_activations(native, lens):
    from featsteer.activations import capture

    hooks = ["hook_embed", *native.hook_names(KINDS + NORMS), "ln_final.hook_normalized"]
    a = capture(native, PROMPTS, hooks, positions="all", progress=False)
    b = capture(lens, PROMPTS, hooks, positions="all", progress=False)
    torch.testing.assert_close(a.activations, b.activations, atol=1e-4, rtol=0)
    assert a.activations.abs().max() > 0.1
    heads = native.hook_names(("attn_z",))  # per head, so read with hooks rather than captured
    (z_native, _), (z_lens, _) = _record(native, heads), _record(lens, heads)
    real = native.tokenize(PROMPTS).attention_mask.bool()  # the backends treat left padding differently
    for name in heads:
        assert z_native[name].shape[-2:] == (native.n_heads, native.d_model // native.n_heads) and native.n_heads == lens.n_heads
        torch.testing.assert_close(z_native[name][real], z_lens[name][real], atol=1e-4, rtol=0)


def test_a_gguf_file_is_converted_in_the_dtype_asked_for(tmp_path, monkeypatch):
    """A GGUF file was converted and cached in float32 whatever the dtype, so a bfloat16 load held the whole model in
    float32 first and cached twice the bytes. It is converted into the dtype asked for now; a float32 conversion, when
    there is one, serves the other dtypes, with the same numbers as their own conversions."""
    from featsteer.testing import tiny_gguf

    monkeypatch.setenv("FEATSTEER_CACHE", str(tmp_path / "cache"))
    tiny_gguf(tmp_path / "tiny.gguf")

    def cached() -> dict[str, set[str]]:
        """The tensor dtypes of each conversion, by its folder's dtype suffix ("" for float32's tiny-KEY)."""
        return {folder.name.split("-", 2)[2] if folder.name.count("-") == 2 else "": _tensor_dtypes(folder)
                for folder in (tmp_path / "cache" / "gguf").glob("tiny-*")}

    half = load_model(str(tmp_path / "tiny.gguf"), dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and cached() == {"bfloat16": {"BF16"}}
    half_logits = half.logits(PROMPTS)
    assert load_model(str(tmp_path / "tiny.gguf"), dtype="auto").dtype == torch.float32
    assert cached() == {"bfloat16": {"BF16"}, "": {"F32"}}
    for folder in (tmp_path / "cache" / "gguf").glob("tiny-*-bfloat16"):
        shutil.rmtree(folder)
    again = load_model(str(tmp_path / "tiny.gguf"), dtype="bfloat16")
    assert again.dtype == torch.bfloat16 and cached() == {"": {"F32"}}  # read from the float32 conversion, not converted again
    torch.testing.assert_close(again.logits(PROMPTS), half_logits, atol=0, rtol=0)


def test_a_gguf_file_of_an_unsupported_architecture_fails_before_converting(tmp_path, monkeypatch):
    """A GGUF file of an architecture featsteer does not support was converted and cached in full before its config was
    checked: the error came after the whole conversion and left the useless conversion in the cache. Its metadata is
    checked first now: one line, nothing cached."""
    from featsteer.testing import tiny_gguf

    monkeypatch.setenv("FEATSTEER_CACHE", str(tmp_path / "cache"))
    tiny_gguf(tmp_path / "other.gguf", architecture="nemotron")
    with pytest.raises(FeatsteerError, match="unsupported architecture 'nemotron'"):
        load_model(str(tmp_path / "other.gguf"))
    assert not list((tmp_path / "cache").rglob("*"))


def test_two_conversions_of_one_gguf_file_at_once_share_the_cache(tmp_path, monkeypatch):
    """Two processes converting the same GGUF file at once: the second one's final rename found the first one's folder in
    place and failed with a raw OSError (directory not empty). It uses the finished conversion now and leaves no partial
    folder. The race is replayed in one process: another conversion runs to the end while this one reads the weights."""
    from transformers import AutoModelForCausalLM

    from featsteer.models.loading import _converted_gguf
    from featsteer.testing import tiny_gguf

    monkeypatch.setenv("FEATSTEER_CACHE", str(tmp_path / "cache"))
    tiny_gguf(tmp_path / "tiny.gguf")
    read_weights, others = AutoModelForCausalLM.from_pretrained.__func__, []

    def racing(cls, *args, **kwargs):
        if not others:
            others.append(None)
            others[0] = _converted_gguf(tmp_path / "tiny.gguf")  # the other process finishes first
        return read_weights(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(racing))
    assert _converted_gguf(tmp_path / "tiny.gguf") == others[0]
    assert [folder.name for folder in (tmp_path / "cache" / "gguf").iterdir()] == [others[0].name]
    assert load_model(str(tmp_path / "tiny.gguf")).logits(PROMPTS).isfinite().all()


def test_a_conversion_removes_the_staging_folders_killed_conversions_left(tmp_path, monkeypatch):
    """A conversion killed before its rename left its .partial-* folder (a whole model's weights) in the cache for ever. The
    next conversion removes those whose process is gone, and those of unknown owner unchanged for a day; a folder whose
    process runs, or that changed lately, may be a conversion at work and stays."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from featsteer.testing import tiny_gguf

    monkeypatch.setenv("FEATSTEER_CACHE", str(tmp_path / "cache"))
    tiny_gguf(tmp_path / "tiny.gguf")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host, cache = socket.gethostname(), tmp_path / "cache" / "gguf"
    folders = {"dead": f".partial-{ended.pid}@{host}-a1", "alive": f".partial-{os.getppid()}@{host}-b2", "own": f".partial-{os.getpid()}@{host}-c3",
               "elsewhere": f".partial-{ended.pid}@other.invalid-d4", "old": ".partial-e5", "recent": ".partial-f6"}
    for name in folders.values():
        (cache / name).mkdir(parents=True)
        (cache / name / "model.safetensors").write_bytes(b"half a model")
    day_ago = time.time() - 25 * 3600
    for path in (cache / folders["old"] / "model.safetensors", cache / folders["old"]):
        os.utime(path, (day_ago, day_ago))
    assert load_model(str(tmp_path / "tiny.gguf")).logits(PROMPTS).isfinite().all()
    assert {path.name for path in cache.glob(".partial-*")} == {folders[kept] for kept in ("alive", "own", "elsewhere", "recent")}


def _tensor_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118 - safe_open is no dict


def test_unsupported_architecture_lists_supported_ones():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(FeatsteerError, match="unsupported architecture 'opt'.*llama"):
        load_model(model, tokenizer=byte_tokenizer())
    assert "gemma2" in supported_model_types() and "phi3" in supported_model_types()


def test_every_supported_model_type_has_a_tiny_config_in_the_family_tests():
    """A FamilySpec row's model types are claims; each must be built and run by the family-wide tests."""
    from featsteer.testing import FAMILY_NAMES

    assert sorted(FAMILY_NAMES) == supported_model_types()


@pytest.mark.parametrize(
    ("name", "message"),
    [("blocks.9.hook_resid_pre", "has 3 layers"), ("blocks.0.hook_resid", "unknown hook name"), ("resid_pre", "unknown hook"),
     ("blocks.0.ln3.hook_normalized", "ln1.hook_normalized"), ("blocks.5.ln1.hook_normalized", "has 3 layers")],
)
def test_bad_hook_names(llama_adapter, name, message):
    with pytest.raises(FeatsteerError, match=message), llama_adapter.hooks([(name, lambda x, s: None)]):
        pass


def test_hook_pos_embed_exists_only_with_learned_positions(llama_adapter):
    """A rotary model has no learned position embedding: naming hook_pos_embed is a one-line error, not an AttributeError
    from deep in the hook installation; GPT-2's is the position table's output."""
    assert not llama_adapter.learned_positions
    with pytest.raises(FeatsteerError, match="hook_pos_embed does not exist: this llama model adds no learned position"):
        llama_adapter.hook_site("hook_pos_embed")
    gpt2 = load_model("tiny:gpt2")
    assert gpt2.learned_positions
    seen, _ = _record(gpt2, ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"])
    torch.testing.assert_close(seen["hook_embed"] + seen["hook_pos_embed"], seen["blocks.0.hook_resid_pre"], atol=1e-6, rtol=0)


def test_load_model_from_directory_and_errors(tmp_path):
    model, tokenizer = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    adapter = load_model(str(tmp_path / "m"))
    assert adapter.family == "qwen" and adapter.n_layers == 3
    torch.testing.assert_close(adapter.logits(PROMPTS), load_model(model, tokenizer=tokenizer).logits(PROMPTS))
    with pytest.raises(FeatsteerError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatsteerError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(FeatsteerError, match="could not load model 'nobody/no-such-model'.*local path"):
        load_model("nobody/no-such-model")
    with pytest.raises(FeatsteerError, match="cannot load a model from a int"):
        load_model(3)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (tmp_path / "m").iterdir():
        (broken / name.name).write_bytes(name.read_bytes())
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(FeatsteerError, match="could not load the model in .*broken.*tokenizer"):
        load_model(str(broken))
    (broken / "tokenizer.json").write_bytes((tmp_path / "m" / "tokenizer.json").read_bytes())
    (broken / "model.safetensors").write_bytes((tmp_path / "m" / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(FeatsteerError, match="could not load the model in .*broken.*weights"):
        load_model(str(broken))  # weights cut off
    (broken / "config.json").write_text("{not json")
    with pytest.raises(FeatsteerError, match="could not load the model in .*broken.*config.json"):
        load_model(str(broken))


def test_non_finite_logits_stop_generation_with_an_error(llama_adapter):
    def poison(activation, site):
        return activation * float("nan")

    message = "logits are not finite .* for 2 of 2 prompts at generation step 0"
    with pytest.raises(FeatsteerError, match=message), llama_adapter.hooks([("blocks.1.hook_resid_pre", poison)]):
        llama_adapter.generate(PROMPTS[:2], max_new_tokens=4)
    assert llama_adapter.generate(PROMPTS[:2], max_new_tokens=4)  # the hook is gone and generation works again


def test_plan_batches_rejects_a_token_budget_below_one() -> None:
    from featsteer.errors import FeatsteerError
    from featsteer.models import load_model

    model = load_model("organism")
    with pytest.raises(FeatsteerError, match="max_batch_tokens must be at least 1"):
        model.plan_batches(["a", "b"], batch_size=2, max_batch_tokens=0)


def test_a_token_budget_plan_tokenizes_each_prompt_once(llama_adapter, monkeypatch):
    """A plan with `max_batch_tokens` tokenizes every prompt to learn its length; `generate`, `logits` and `capture` then
    tokenized each batch again (twice the tokenizer calls; `capture` at post_instruction positions a third time for the
    common tail). The batches are padded from the plan's ids now, and equal what
    `tokenize` gives for the same prompts, also with a prefill, without the chat template and with special-token text
    escaped. Without a budget, `capture` at post_instruction positions asks for the prompts' ids up front
    (`encode_all`) and pads its batches from them."""
    from featsteer.activations import capture
    from featsteer.activations.capture import common_tail
    from tests.conftest import record_tokenizer_calls

    model = llama_adapter
    prompts = [*PROMPTS, "four", "a fifth, longer prompt than most of the others"]
    prefill = [f"Sure {i}" for i in range(len(prompts))]
    calls = record_tokenizer_calls(model, monkeypatch)
    runs = {
        "generate": lambda: model.generate(prompts, max_new_tokens=2, batch_size=2, max_batch_tokens=60),
        "logits": lambda: model.logits(prompts, batch_size=2, max_batch_tokens=60),
        "capture": lambda: capture(model, prompts, "blocks.0.hook_resid_pre", batch_size=2, max_batch_tokens=60, progress=False),
        "capture post_instruction": lambda: capture(model, prompts, "blocks.0.hook_resid_pre", positions="post_instruction",
                                                    batch_size=2, max_batch_tokens=60, progress=False),  # its common tail too
        # without a budget the plan needs no lengths, but the common tail is read before the first batch
        "capture post_instruction, no budget": lambda: capture(model, prompts, "blocks.0.hook_resid_pre", positions="post_instruction",
                                                               batch_size=2, max_batch_tokens=None, progress=False),
    }
    for name, run in runs.items():
        calls.clear()
        run()
        assert len(calls) == len(prompts), name
    assert min(model.token_batches(prompts, 2, 60).n_post_instruction) == common_tail(model, prompts, None, True)
    assert model.token_batches(prompts, 2, None, encode_all=True).n_post_instruction == model.token_batches(prompts, 2, 60).n_post_instruction
    prompts.append("say <|user|> twice")  # special-token text, tokenized apart when escaped
    prefill.append("Sure <|user|>")
    for escape in (False, True):
        model.escape_special_tokens = escape
        for kwargs in ({}, {"prefill": prefill}, {"chat": False}, {"max_batch_tokens": None, "encode_all": True}):
            batches = list(model.token_batches(prompts, 2, **{"max_batch_tokens": 60, **kwargs}))
            assert len(batches) > 2 and sorted(i for rows, _ in batches for i in rows) == list(range(len(prompts)))
            for rows, batch in batches:
                chosen = {key: [value[i] for i in rows] for key, value in kwargs.items() if key == "prefill"}
                expected = model.tokenize([prompts[i] for i in rows], chat=kwargs.get("chat", True), **chosen)
                for field in ("input_ids", "attention_mask", "n_post_instruction", "n_prefill"):
                    assert torch.equal(getattr(batch, field), getattr(expected, field)), (escape, kwargs, field)
    model.escape_special_tokens = False


def _attention_weights_alive_in_mlp(adapter, forward) -> list[bool]:
    """Whether the first attention layer's attention probabilities are still alive when its MLP starts, per forward."""
    refs, alive, layer = [], [], adapter.attention_layers[0]  # Qwen3.5's layer 0 is a gated DeltaNet, which has none
    attention, mlp = adapter._module(adapter.spec.attn, layer), adapter._module(adapter.spec.mlp, layer)
    handles = [
        attention.register_forward_hook(lambda module, args, output: refs.append(weakref.ref(output[1]))),
        mlp.register_forward_pre_hook(lambda module, args: alive.append(refs[-1]() is not None)),
    ]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return alive


def test_forward_does_not_keep_attention_weights_through_the_mlp(family_model):
    _, model, tokenizer = family_model
    adapter = load_model(model, tokenizer=tokenizer)
    batch = adapter.tokenize(PROMPTS)
    # a plain transformers forward keeps the eager attention probabilities until the layer ends
    with torch.inference_mode():
        assert _attention_weights_alive_in_mlp(adapter, lambda: model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)) == [True]
    before = count_hooks(model)
    assert _attention_weights_alive_in_mlp(adapter, lambda: adapter.run(batch)) == [False]
    stop = f"blocks.{adapter.attention_layers[0] + 1}.hook_resid_pre"
    assert _attention_weights_alive_in_mlp(adapter, lambda: adapter.run(batch, stop_at=stop)) == [False]
    generation = _attention_weights_alive_in_mlp(adapter, lambda: adapter.generate(PROMPTS[:1], max_new_tokens=2))
    assert generation and not any(generation)
    assert count_hooks(model) == before
    model.config.output_attentions = True  # asked for: left alone
    try:
        assert _attention_weights_alive_in_mlp(adapter, lambda: adapter.run(batch)) == [True]
    finally:
        model.config.output_attentions = False


def test_a_sequence_longer_than_a_learned_position_table_is_a_one_line_error():
    model = load_model("tiny:gpt2")  # 256 learned positions
    assert model.logits(["x" * 200]).shape[0] == 1
    with pytest.raises(FeatsteerError, match="tokens is longer than the 256 positions of tiny:gpt2: use shorter prompts"):
        model.logits(["x" * 300])
    with pytest.raises(FeatsteerError, match="longer than the 256 positions"):
        model.generate(["x" * 230], max_new_tokens=40)


def test_a_sequence_past_the_trained_context_of_a_rotary_model_warns_once(llama_adapter, caplog):
    import logging

    llama_adapter.model.config.max_position_embeddings = 6
    with caplog.at_level(logging.WARNING, logger="featsteer.models.hf"):
        llama_adapter.logits(["a prompt long enough to pass six positions"])
        llama_adapter.logits(["another prompt long enough to pass six positions"])
    assert caplog.text.count("runs past the 6 positions the model was trained on") == 1


def _count_get_vocab(monkeypatch, tokenizer) -> list[int]:
    """Spy on the tokenizer class's `get_vocab`: one entry per call."""
    calls: list[int] = []
    original = type(tokenizer).get_vocab
    monkeypatch.setattr(type(tokenizer), "get_vocab", lambda self: calls.append(1) or original(self))
    return calls


def test_generation_reads_the_vocabulary_once_per_tokenizer(monkeypatch):
    """`generate_with_tokens` and every `_greedy` batch asked `stop_token_ids` and `harmony_control_ids`, each of which built
    the whole vocabulary dict anew (about 80 ms for Qwen's 151k tokens, 4 times per call): now once per tokenizer."""
    adapter = load_model("organism")
    adapter.show_progress = False
    calls = _count_get_vocab(monkeypatch, adapter.tokenizer)
    first = adapter.generate_with_tokens(["hello there", "bake bread"], max_new_tokens=3, batch_size=1)
    second = adapter.generate_with_tokens(["hello there", "bake bread"], max_new_tokens=3, batch_size=1)
    assert len(calls) <= 1 and first.token_ids == second.token_ids  # 0 when load_model already asked (is_harmony)
    assert adapter.stop_token_ids and adapter.harmony_control_ids() is None and not adapter.is_harmony and len(calls) <= 1


def test_vocabulary_caches_follow_added_tokens_a_new_tokenizer_and_the_generation_config():
    """The cached vocabulary reads are keyed on the tokenizer and its size: tokens added after the first read (a harmony
    vocabulary completed) and a replaced tokenizer are read again; the EOS ids of the generation settings are read on
    every call."""
    model, tokenizer = tiny_model("llama")
    adapter = load_model(model, tokenizer=tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in adapter.stop_token_ids and adapter.harmony_control_ids() is None and not adapter.is_harmony
    assert adapter.special_text(["say <|call|>"]) == []
    tokenizer.add_special_tokens({"additional_special_tokens": HARMONY_SPECIALS}, replace_extra_special_tokens=False)
    assert end not in adapter.stop_token_ids and tokenizer.convert_tokens_to_ids("<|return|>") in adapter.stop_token_ids
    assert adapter.is_harmony and set(adapter.harmony_control_ids().values()) == set(CONTROL_TOKENS)
    assert adapter.special_text(["say <|call|>"]) == [(0, ["<|call|>"])]
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    assert user not in adapter.stop_token_ids
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, user]
    assert user in adapter.stop_token_ids
    adapter.tokenizer = byte_tokenizer()
    assert end in adapter.stop_token_ids and adapter.harmony_control_ids() is None and not adapter.is_harmony


def test_special_text_follows_an_existing_token_made_special():
    """Making a token the vocabulary already has special adds no token (the size stays), yet the tokenizer then reads its
    text as that token: the kept special-token strings follow it."""
    adapter = load_model("organism")
    tokenizer, word = adapter.tokenizer, "thistle"
    size = len(tokenizer)
    assert word in tokenizer.get_vocab()
    assert adapter.special_text([f"a {word} b"]) == []
    tokenizer.add_special_tokens({"additional_special_tokens": [word]}, replace_extra_special_tokens=False)
    assert len(tokenizer) == size and adapter.special_text([f"a {word} b"]) == [(0, [word])]


def test_the_appended_special_token_count_follows_a_llama_tokenizers_add_eos_token_set_after_first_use():
    """The count of special tokens a tokenizer appends (cut from every prompt: an EOS is no part of it) was cached on the
    tokenizer object alone; a Llama tokenizer whose `add_eos_token` is set after the first tokenized batch rebuilds its
    post-processor and appends EOS from then on, and every later prompt ended with that EOS."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3, **{c: 4 + i for i, c in enumerate("Hdelo")}}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True, add_eos_token=False)
    adapter = load_model(tiny_model("llama")[0], tokenizer=tokenizer)
    before = adapter.tokenize(["Hello"], chat=False).input_ids[0].tolist()
    assert before[0] == 1 and before[-1] != 2 and adapter._appended_special_tokens() == 0
    tokenizer.add_eos_token = True
    assert tokenizer("Hello")["input_ids"][-1] == 2  # the flag reached the post-processor (transformers rebuilds it)
    assert adapter.tokenize(["Hello"], chat=False).input_ids[0].tolist() == before and adapter._appended_special_tokens() == 1
    tokenizer.add_eos_token = False
    assert adapter.tokenize(["Hello"], chat=False).input_ids[0].tolist() == before and adapter._appended_special_tokens() == 0
