"""Fitting CAST gates: the threshold rule, pooling as the gate pools, and gated ablation acting row by row."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from featsteer.datasets import builtin_prompts
from featsteer.errors import FeatsteerError
from featsteer.interventions import Ablate, ConditionalSteer, best_threshold, fit_gate, prompt_means, steer
from featsteer.interventions.condition import Gate
from featsteer.models import WRITE_KINDS, load_model

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["Hi", "Please write a long and detailed essay about the history of bread making in Europe.", "How do I bake rye bread?"]


def test_best_threshold_maximises_balanced_accuracy_and_ties_fire():
    threshold, accuracy = best_threshold(torch.tensor([0.2, 0.6, 0.9]), torch.tensor([0.1, 0.3, 0.5]))
    assert threshold == pytest.approx(0.55) and accuracy == pytest.approx((2 / 3 + 1) / 2)
    # perfectly separated: every cut between the classes is as good; the lowest wins
    threshold, accuracy = best_threshold(torch.tensor([0.8, 0.9]), torch.tensor([0.1, 0.2]))
    assert threshold == pytest.approx(0.5) and accuracy == 1.0
    # unequal class sizes: balanced accuracy, not plain accuracy (plain would reject everything: 9 of 10 right)
    threshold, accuracy = best_threshold(torch.tensor([1.0]), torch.zeros(9) + torch.linspace(0, 0.5, 9))
    assert 0.5 < threshold < 1.0 and accuracy == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_prompt_means_are_what_the_gate_thresholds(llama_adapter, pool, dtype):
    """The rows `prompt_means` pools give the cosine the running gate computes, in a left-padded batch too, and in
    bfloat16 (the running gate pooled and took the cosine in the model's dtype, 3e-3 off the float32 scores that fitted
    and rated it, enough to flip a prompt near a threshold of 0.006 on the bfloat16 organism)."""
    llama_adapter.model.to(dtype)
    hook = "blocks.1.hook_resid_pre"
    vector = torch.randn(llama_adapter.d_model, generator=torch.Generator().manual_seed(0))
    gate = Gate(hook, pool, vector / vector.norm(), 0.0, 1.0)
    expected = gate.scores(llama_adapter, PROMPTS, batch_size=2)
    cast = gate.steer(Ablate(vector / vector.norm(), where=["blocks.2.hook_attn_out"]))
    with steer(llama_adapter, cast):
        llama_adapter.run(llama_adapter.tokenize(PROMPTS))
    torch.testing.assert_close(cast.similarity.float(), expected, atol=1e-5, rtol=0)
    rows = prompt_means(llama_adapter, PROMPTS, [hook, "blocks.0.hook_resid_pre"], pool=pool)
    assert set(rows) == {hook, "blocks.0.hook_resid_pre"} and rows[hook].shape == (3, llama_adapter.d_model)
    alone = torch.cat([prompt_means(llama_adapter, [p], [hook], pool=pool)[hook] for p in PROMPTS])
    torch.testing.assert_close(rows[hook], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("condition", [torch.zeros(4), torch.tensor([1.0, float("nan"), 0.0, 0.0])])
def test_a_gate_without_a_usable_condition_vector_is_an_error(condition):
    """A zero vector's cosine is 0 for every prompt and a NaN one's NaN: the gate fired on all prompts (threshold below 0)
    or on none, without a word."""
    with pytest.raises(FeatsteerError, match="zero or holds NaN"):
        ConditionalSteer(condition, "blocks.1.hook_resid_pre", -0.5, Ablate(torch.ones(4) / 2))


def test_an_always_open_gate_at_the_first_layer_is_full_ablation(llama_adapter):
    """Clearing the stream at the gate's hook and every later write is ablation at every write when the gate is at
    layer 0 and fires on everything; a gate that never fires leaves the model alone."""
    r = torch.randn(llama_adapter.d_model, generator=torch.Generator().manual_seed(1))
    r = r / r.norm()
    base = llama_adapter.logits(PROMPTS)
    with steer(llama_adapter, Ablate(r)):
        full = llama_adapter.logits(PROMPTS)
    sites = ["blocks.0.hook_resid_pre", *llama_adapter.hook_names(WRITE_KINDS)]
    for pool in ("mean", "last"):
        with steer(llama_adapter, Gate("blocks.0.hook_resid_pre", pool, r, -2.0, 1.0).steer(Ablate(r, where=sites))):
            torch.testing.assert_close(llama_adapter.logits(PROMPTS), full, atol=1e-4, rtol=0)
        with steer(llama_adapter, Gate("blocks.0.hook_resid_pre", pool, r, 2.0, 1.0).steer(Ablate(r, where=sites))):
            torch.testing.assert_close(llama_adapter.logits(PROMPTS), base)
    assert not torch.allclose(full, base, atol=1e-3)


def test_a_fitted_gate_on_the_organism_ablates_only_the_prompts_it_fires_on():
    model = load_model("organism")
    harmful, harmless = builtin_prompts("harmful", "train").head(48), builtin_prompts("harmless", "train").head(48)
    val = builtin_prompts("harmful", "val").head(16), builtin_prompts("harmless", "val").head(16)
    hooks = model.hook_names(("resid_pre",))
    gate = fit_gate(model, harmful, harmless, hooks, val=val)
    assert gate.hook in hooks and gate.pool in ("mean", "last")
    # every prompt ends in the same template token, which layer 0 sees alone: no last-token gate there
    assert [(c["hook"], c["pool"]) for c in gate.candidates if c["hook"] == hooks[0]] == [(hooks[0], "mean")]
    assert len(gate.candidates) == 2 * len(hooks) - 1 and gate.accuracy == max(c["val_balanced_accuracy"] for c in gate.candidates)
    assert gate.accuracy > 0.8  # the organism tells its own harmful and harmless prompts apart from early on
    # of the candidates level with the best, the earliest hook wins, then mean pooling before the last token
    level = [c for c in gate.candidates if c["val_balanced_accuracy"] == gate.accuracy]
    first = min(level, key=lambda c: (hooks.index(c["hook"]), ("mean", "last").index(c["pool"])))
    assert (gate.hook, gate.pool) == (first["hook"], first["pool"])
    test = list(builtin_prompts("harmful", "test").head(12)) + list(builtin_prompts("harmless", "test").head(12))
    fires = gate.scores(model, test) > gate.threshold
    assert fires[:12].sum() > fires[12:].sum()
    assert 0 < int(fires.sum()) < len(test)  # a mixed batch: some rows steered, some not
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(2))
    direction = direction / direction.norm()
    sites = [gate.hook, *model.hook_names(WRITE_KINDS, range(model.hook_site(gate.hook).layer, model.n_layers))]
    base = model.logits(test, batch_size=24)
    with steer(model, Ablate(direction, where=sites)):
        ablated = model.logits(test, batch_size=24)
    with steer(model, gate.steer(Ablate(direction, where=sites))):
        gated = model.logits(test, batch_size=24)
    torch.testing.assert_close(gated[fires], ablated[fires], atol=1e-5, rtol=0)
    torch.testing.assert_close(gated[~fires], base[~fires], atol=1e-5, rtol=0)
    assert gate.rate(model, test) == pytest.approx(float(fires.double().mean()))
    # deciding in a pre-pass, the gate ablates the rows it fires on at every write from the embedding on: exactly the
    # ungated ablation there (which the stream-and-later-writes one is not: layers before the gate read the direction)
    with steer(model, Ablate(direction)):
        everywhere = model.logits(test, batch_size=24)
        everywhere_text = model.generate(test, max_new_tokens=6, batch_size=24)
    assert gate.hook != hooks[0] and not torch.allclose(everywhere[fires], ablated[fires], atol=1e-3)
    lookahead = gate.ablate(model, direction)
    assert lookahead.lookahead and gate.ablate(model, direction, lookahead=False).lookahead is False
    base_text = model.generate(test, max_new_tokens=6, batch_size=24)
    with steer(model, lookahead):
        gated = model.logits(test, batch_size=24)
        gated_text = model.generate(test, max_new_tokens=6, batch_size=24)
        assert int(lookahead.active.sum()) == int(fires.sum())  # one batch, in length order
    torch.testing.assert_close(gated[fires], everywhere[fires], atol=1e-5, rtol=0)
    torch.testing.assert_close(gated[~fires], base[~fires], atol=1e-5, rtol=0)
    assert gated_text == [e if f else b for e, b, f in zip(everywhere_text, base_text, fires.tolist(), strict=True)]
    assert model._prepasses == () and not model.in_prepass  # removed on exit


def test_a_lookahead_gate_decides_on_the_prompt_in_every_kind_of_pass(llama_adapter):
    """The pre-pass runs before `run`, the prompts of `run_continued` and the prefill of `generate`, never inside itself,
    and a gate without lookahead still refuses to steer hooks before its own."""
    r = torch.randn(llama_adapter.d_model, generator=torch.Generator().manual_seed(3))
    r = r / r.norm()
    calls = []
    gate = Gate("blocks.1.hook_resid_pre", "last", r, -2.0, 1.0)  # fires on every prompt
    cast = gate.steer(Ablate(r), lookahead=True)
    real = cast.prepass_for(llama_adapter)
    cast.prepass_for = lambda model: (lambda batch: (calls.append(batch.input_ids.shape), real(batch)))
    batch = llama_adapter.tokenize(PROMPTS)
    with steer(llama_adapter, Ablate(r)):
        full = llama_adapter.run_continued(batch, [[5, 6], [7], []])
    with steer(llama_adapter, cast):
        gated = llama_adapter.run_continued(batch, [[5, 6], [7], []])
        llama_adapter.generate(PROMPTS, max_new_tokens=3, batch_size=8)
    assert calls == [tuple(batch.input_ids.shape)] * 2  # the prompts alone, once per pass; not the decoding steps
    torch.testing.assert_close(gated, full, atol=1e-5, rtol=0)
    with pytest.raises(FeatsteerError, match="lookahead=True"), steer(llama_adapter, gate.steer(Ablate(r))):
        pass


@pytest.mark.parametrize("outer_lookahead", [False, True])
def test_a_lookahead_gate_inside_another_gate_decides_in_its_own_pre_pass(llama_adapter, outer_lookahead):
    """A lookahead gate as another gate's behaviour: `steer` ran only the outer gate's pre-pass, so the inner one never
    decided and steered every prompt (or kept the last batch's decision). Its pre-pass runs now; and a gate's hooks
    installed without their pre-pass are an error, not every row steered."""
    from featsteer.interventions import AddDirection

    r = torch.randn(llama_adapter.d_model, generator=torch.Generator().manual_seed(3))
    r = r / r.norm()
    add = AddDirection(r, 30.0, where="blocks.0.hook_resid_pre")
    base = llama_adapter.logits(PROMPTS)
    with steer(llama_adapter, add):
        full = llama_adapter.logits(PROMPTS)
    for inner_threshold, expected in ((2.0, base), (-2.0, full)):  # the inner gate never fires, then always
        inner = ConditionalSteer(r, "blocks.1.hook_resid_pre", inner_threshold, add, lookahead=True)
        outer = ConditionalSteer(r, "blocks.0.hook_resid_pre", -2.0, inner, lookahead=outer_lookahead)  # always fires
        with steer(llama_adapter, outer):
            torch.testing.assert_close(llama_adapter.logits(PROMPTS), expected, atol=1e-5, rtol=0)
            assert llama_adapter.generate(PROMPTS, max_new_tokens=3) is not None
        assert inner.active.tolist() == [inner_threshold < 0] * len(PROMPTS)
    unrun = ConditionalSteer(r, "blocks.1.hook_resid_pre", 2.0, add, lookahead=True)
    with pytest.raises(FeatsteerError, match="has no decision for this batch"), llama_adapter.hooks(unrun.hooks_for(llama_adapter)):
        llama_adapter.logits(PROMPTS)


def test_gate_inputs_are_checked(llama_adapter):
    hooks = ["blocks.1.hook_resid_pre"]
    with pytest.raises(FeatsteerError, match="at least 2 harmful and 2 harmless training prompts"):
        fit_gate(llama_adapter, ["a"], ["b", "c"], hooks)
    with pytest.raises(FeatsteerError, match="validation prompts"):
        fit_gate(llama_adapter, ["a", "b"], ["c", "d"], hooks, val=(["e"], []))
    with pytest.raises(FeatsteerError, match="pools must be"):
        fit_gate(llama_adapter, ["a", "b"], ["c", "d"], hooks, pools=["max"])
    with pytest.raises(FeatsteerError, match="no prompts"):
        prompt_means(llama_adapter, [], hooks)
    with pytest.raises(FeatsteerError, match="unknown pool"):
        ConditionalSteer(torch.ones(4), hooks[0], 0.0, Ablate(torch.ones(4)), pool="max")
    with pytest.raises(FeatsteerError, match="same mean activation"):
        fit_gate(llama_adapter, ["same", "same"], ["same", "same"], hooks)


def test_a_saved_gate_loads_back_and_checks_the_model(llama_adapter, tmp_path):
    vector = torch.randn(llama_adapter.d_model, generator=torch.Generator().manual_seed(3))
    gate = Gate("blocks.1.hook_resid_pre", "last", vector / vector.norm(), 0.125, 0.9, [{"hook": "blocks.1.hook_resid_pre", "pool": "last"}],
                {"harmful": 0.75, "harmless": 0.25})
    loaded = Gate.load(gate.save(tmp_path / "gate"))
    assert (loaded.hook, loaded.pool, loaded.threshold, loaded.accuracy, loaded.candidates) == (gate.hook, gate.pool, 0.125, 0.9, gate.candidates)
    assert loaded.val_fires == gate.val_fires and Gate.load(replace(gate, val_fires=None).save(tmp_path / "bare")).val_fires is None
    torch.testing.assert_close(loaded.vector, gate.vector)
    assert loaded.check(llama_adapter) == 1 and not list(tmp_path.glob("gate/*.partial"))
    with pytest.raises(FeatsteerError, match="dimensions but the model's stream has"):
        Gate(gate.hook, "last", torch.ones(3), 0.0, 1.0).check(llama_adapter)
    with pytest.raises(FeatsteerError, match="holds no gate"):
        Gate.load(tmp_path / "missing")
    (tmp_path / "gate" / "gate.json").write_text('{"hook": "blocks.1.hook_resid_pre"}')
    with pytest.raises(FeatsteerError, match="is not a gate that featsteer wrote"):
        Gate.load(tmp_path / "gate")


def test_a_failed_gate_save_leaves_the_previous_gate_whole(llama_adapter, tmp_path):
    """The vector and the JSON are rendered before either is written: a gate whose JSON cannot be written leaves the saved
    gate as it was (the old save replaced the vector first, so the folder held the new vector under the old threshold)."""
    vector = torch.randn(llama_adapter.d_model, generator=torch.Generator().manual_seed(5))
    gate = Gate("blocks.1.hook_resid_pre", "last", vector / vector.norm(), 0.125, 0.9)
    gate.save(tmp_path / "gate")
    with pytest.raises(TypeError):
        replace(gate, vector=-gate.vector, candidates=[{"hook": object()}]).save(tmp_path / "gate")
    torch.testing.assert_close(Gate.load(tmp_path / "gate").vector, gate.vector)
    assert sorted(p.name for p in (tmp_path / "gate").iterdir()) == ["gate.json", "gate.safetensors"]


def test_a_lookahead_gate_on_a_hooked_transformer(tmp_path):
    """The pre-pass runs through TransformerLens hooks too: an open gate is the full ablation (logits and greedy text),
    a shut one the model as it is, and no hook is left behind."""
    from featsteer.testing import hooked_gpt2, saved_tokenizer, tiny_model

    model, tokenizer = tiny_model("gpt2")
    lens = load_model(hooked_gpt2(model, saved_tokenizer(tokenizer, tmp_path)))
    r = torch.randn(lens.d_model, generator=torch.Generator().manual_seed(4))
    r = r / r.norm()
    hooks_before = sum(len(h.fwd_hooks) for h in lens.model.hook_dict.values())
    base, base_text = lens.logits(PROMPTS), lens.generate(PROMPTS, max_new_tokens=4)
    with steer(lens, Ablate(r)):
        full, full_text = lens.logits(PROMPTS), lens.generate(PROMPTS, max_new_tokens=4)
    assert not torch.allclose(full, base, atol=1e-3)
    for threshold, logits, text in ((-2.0, full, full_text), (2.0, base, base_text)):
        with steer(lens, Gate("blocks.1.hook_resid_pre", "mean", r, threshold, 1.0).ablate(lens, r)):
            torch.testing.assert_close(lens.logits(PROMPTS), logits, atol=1e-5, rtol=0)
            assert lens.generate(PROMPTS, max_new_tokens=4) == text
    assert sum(len(h.fwd_hooks) for h in lens.model.hook_dict.values()) == hooks_before and lens._prepasses == ()
