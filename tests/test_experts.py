"""Expert routing on mixture-of-experts models: the routing hook, the selection statistics and ExpertSteer."""

from __future__ import annotations

import json

import pytest
import torch

from featsteer.cli import main
from featsteer.errors import FeatsteerError
from featsteer.interventions import ConditionalSteer, ExpertSteer, expert_routing, steer
from featsteer.models import load_model
from featsteer.testing import tiny_model
from tests.conftest import count_hooks

PROMPTS = ["how do I pick a lock", "write a poem about the sea and the sky", "x"]
ROUTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dots1", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe",
          "phimoe", "gpt_oss", "granitemoe", "qwen3_5_moe", "qwen3_next", "gemma4", "granitemoehybrid", "llama4_text", "llama4")
"""Every MoE model type (written out apart from featsteer's family rows): the experts take the router's choice as (index,
weights), except Llama 4's, which read inputs the router's dense scores have already weighted."""
TOP_K = 2  # num_experts_per_tok of every tiny MoE config but Llama 4's
TOP_K_OF = {"llama4_text": 1, "llama4": 1}


def _adapter(family):
    model, tokenizer = tiny_model(family)
    return model, load_model(model, tokenizer=tokenizer)


def _routing(adapter, prompts=PROMPTS):
    seen = {}
    names = adapter.hook_names(("routing",))
    with adapter.hooks([(name, lambda x, s: seen.__setitem__(s.name, x.clone())) for name in names]):
        logits = adapter.run(adapter.tokenize(prompts))  # one batch in the given order, so rows match tokenize()'s mask
    return seen, logits


def _zero_expert(model, adapter, layer, expert):
    """Zero one expert's output projection (and GPT-OSS's bias): the expert writes nothing."""
    experts = adapter._experts(layer)
    with torch.no_grad():
        experts.down_proj[expert].zero_()
        if getattr(experts, "down_proj_bias", None) is not None:
            experts.down_proj_bias[expert].zero_()


@pytest.mark.parametrize("family", ROUTED)
def test_routing_hook_is_the_routers_choice_and_switching_an_expert_off_is_zeroing_it(family):
    """Each real token gives nonzero weight to exactly top-k experts; handing back a copy changes nothing; deactivating
    an expert without renormalising gives the logits of the model whose expert writes nothing."""
    model, adapter = _adapter(family)
    assert adapter.moe_layers and adapter.n_experts == 4
    seen, base = _routing(adapter)
    batch = adapter.tokenize(PROMPTS)
    for name, weights in seen.items():
        assert weights.shape == (*batch.input_ids.shape, 4), name
        picked = (weights != 0).sum(-1)[batch.attention_mask.bool()]
        assert bool((picked == TOP_K_OF.get(family, TOP_K)).all()), (name, picked.unique())
    with adapter.hooks([(name, lambda x, s: x.clone()) for name in seen]):
        torch.testing.assert_close(adapter.run(adapter.tokenize(PROMPTS)), base, atol=1e-6, rtol=0)
    layer = adapter.moe_layers[0]  # the last layer reaches the last position only, which may not use the expert
    with steer(adapter, ExpertSteer(deactivate={layer: [1]}, renormalize=False)):
        switched_off = adapter.run(adapter.tokenize(PROMPTS))
    assert (switched_off - base).abs().max() > 1e-6
    _zero_expert(model, adapter, layer, 1)
    torch.testing.assert_close(adapter.run(adapter.tokenize(PROMPTS)), switched_off, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ROUTED)
def test_router_logits_hook_makes_the_router_choose_again(family):
    """The router's logits, handed back unchanged, change nothing; SteerMoE at the logits keeps top-k experts per token,
    never picks a deactivated expert and always picks an activated one (read at the same layer's routing hook)."""
    _, adapter = _adapter(family)
    layer = adapter.moe_layers[0]
    names = [f"blocks.{layer}.mlp.hook_router_logits", f"blocks.{layer}.mlp.hook_routing"]
    assert adapter.hook_names(("router_logits",), layers=[layer]) == names[:1]
    batch = adapter.tokenize(PROMPTS)
    mask = batch.attention_mask.bool()
    seen = {}
    with adapter.hooks([(name, lambda x, s: seen.__setitem__(s.name, x.clone())) for name in names]):
        base = adapter.run(batch)
    assert seen[names[0]].shape == (*batch.input_ids.shape, 4)
    with adapter.hooks([(names[0], lambda x, s: x.clone())]):
        torch.testing.assert_close(adapter.run(batch), base, atol=0, rtol=0)
    assert 0 < int((seen[names[1]][mask][:, 1] != 0).sum()) < int(mask.sum())  # expert 1 serves some tokens, not all
    for side, wanted in (("deactivate", 0), ("activate", int(mask.sum()))):
        routed = []
        with steer(adapter, ExpertSteer(**{side: {layer: [1]}}, at="router_logits")), \
                adapter.hooks([(names[1], lambda x, s, into=routed: into.append(x.clone()))]):
            adapter.run(batch)
        weights = routed[0][mask]
        assert int((weights[:, 1] != 0).sum()) == wanted, side
        assert bool(((weights != 0).sum(-1) == TOP_K_OF.get(family, TOP_K)).all()), side


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "dots1", "ernie4_5_moe"])
def test_a_router_whose_correction_bias_overrides_the_logits_rule_is_an_error(family):
    """These routers choose by their scores plus a per-expert correction bias (zero in the tiny configs, not in real
    checkpoints): with expert 1's bias above the others' the router kept picking it for every token under
    deactivation at the logits, without a word (and passed over an activated expert held back by its bias). The choice is checked at the routing and refused in one line."""
    model, adapter = _adapter(family)
    layer = adapter.moe_layers[0]
    bias = next(b for name, b in [*model.named_buffers(), *model.named_parameters()]
                if name.endswith("e_score_correction_bias") and f"layers.{layer}." in name)
    with torch.no_grad():
        bias.view(-1).copy_(torch.tensor([0.0, 0.3, -1.0, 0.0]))  # expert 1 favoured, expert 2 held back
    before = count_hooks(model)
    for side, expert, message in (("deactivate", 1, r"still picks deactivated expert\(s\) \[1\]"),
                                  ("activate", 2, r"passes over activated expert\(s\) \[2\]")):
        with pytest.raises(FeatsteerError, match=f"layer {layer}'s router {message}.*at='routing'"), \
                steer(adapter, ExpertSteer(**{side: {layer: [expert]}}, at="router_logits")):
            adapter.run(adapter.tokenize(PROMPTS))
    assert count_hooks(model) == before
    with steer(adapter, ExpertSteer(deactivate={layer: [1]})):  # at the routing weights the switch holds
        adapter.run(adapter.tokenize(PROMPTS))


def test_steermoe_at_the_logits_is_the_routers_softmax_over_the_changed_logits():
    """Mixtral: what the experts receive under SteerMoE deactivation is a softmax over the logits with the expert set below
    the token's lowest, top-2, renormalised, recomputed here from the captured logits."""
    _, adapter = _adapter("mixtral")
    layer = adapter.moe_layers[0]
    names = [f"blocks.{layer}.mlp.hook_router_logits", f"blocks.{layer}.mlp.hook_routing"]
    batch = adapter.tokenize(PROMPTS)
    seen = {}
    # hooks see what the hooks installed before them made: the capture, installed first, reads the router's own logits,
    # and the routing it reads at the experts is what the steering made of them
    with adapter.hooks([(name, lambda x, s: seen.__setitem__(s.name, x.clone())) for name in names]), \
            steer(adapter, ExpertSteer(deactivate={layer: [0, 2]}, at="router_logits")):
        adapter.run(batch)
    logits = seen[names[0]].double()
    logits = logits.index_fill(-1, torch.tensor([0, 2]), 0.0) + torch.zeros_like(logits).index_fill(-1, torch.tensor([0, 2]), 1.0) * (
        logits.min(-1, keepdim=True).values - 0.01)
    top = logits.softmax(-1).topk(TOP_K, dim=-1)
    expected = torch.zeros_like(logits).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(seen[names[1]].double(), expected, atol=1e-5, rtol=0)
    assert float(seen[names[1]][..., [0, 2]].abs().max()) == 0.0
    with pytest.raises(FeatsteerError, match="unknown ExpertSteer site 'weights'"):
        ExpertSteer(deactivate={layer: [1]}, at="weights")
    with pytest.raises(FeatsteerError, match="renormalize=False applies to at='routing'"):
        ExpertSteer(deactivate={layer: [1]}, at="router_logits", renormalize=False)
    with pytest.raises(FeatsteerError, match="blocks.0.mlp.hook_router_logits does not exist"):
        load_model("tiny:qwen2_moe").hook_site("blocks.0.mlp.hook_router_logits")


def test_a_gated_logits_rule_checks_only_the_rows_the_gate_steered():
    """The router-obeyed check of `ExpertSteer(at="router_logits")` ran on every row under a gate, so a prompt the gate
    left alone (its router free to pick the deactivated experts) failed every gated run; in a lookahead pre-pass, which
    steers nothing, it failed too. Now the steered rows route around the experts and the others route as unsteered."""
    _, adapter = _adapter("mixtral")
    layer = 2
    name = adapter.hook_names(("routing",), layers=[layer])[0]
    condition = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(3))
    probe = ConditionalSteer(condition, "blocks.0.hook_resid_pre", 2.0, ExpertSteer(deactivate={layer: [0, 1]}))
    with steer(adapter, probe):
        adapter.run(adapter.tokenize(PROMPTS))
    scores = probe.similarity.sort().values
    threshold = float(scores[:2].mean())  # the gate fires on the two prompts of highest cosine
    free, _ = _routing(adapter)
    rule = ExpertSteer(deactivate={layer: [0, 1]}, at="router_logits")
    for hook, lookahead in (("blocks.0.hook_resid_pre", False), ("blocks.2.hook_resid_post", True)):
        gate = ConditionalSteer(condition, hook, threshold, rule, lookahead=lookahead)
        with steer(adapter, gate):
            seen, _ = _routing(adapter)
        on = gate.active
        assert on.tolist().count(True) == 2, on
        assert float(seen[name][on][..., [0, 1]].abs().max()) == 0.0
        assert torch.equal(seen[name][~on], free[name][~on]) and bool(free[name][~on][..., [0, 1]].any())
    with steer(adapter, ConditionalSteer(condition, "blocks.0.hook_resid_pre", -2.0, rule)):  # every row steered: checked as before
        adapter.run(adapter.tokenize(PROMPTS))


def test_a_router_whose_logits_featsteer_cannot_see_is_a_one_line_error_and_leaves_nothing_behind():
    """A router computing its logits without `F.linear` (here a matmul) gets a clear error, and the function mode that
    watched it is gone afterwards: the same model then runs, and with a logits hook on a normal router, as before."""
    import types

    import torch.nn.functional as F

    model, adapter = _adapter("mixtral")
    layer = adapter.moe_layers[0]
    router = adapter._router(layer)
    batch = adapter.tokenize(PROMPTS)
    base = adapter.run(batch)

    def matmul_router(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = hidden_states @ self.weight.T
        top, index = torch.topk(F.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    router.forward = types.MethodType(matmul_router, router)
    name = f"blocks.{layer}.mlp.hook_router_logits"
    with pytest.raises(FeatsteerError, match="computed no 4-wide linear output .* hook blocks.L.mlp.hook_routing"), \
            adapter.hooks([(name, lambda x, s: x)]):
        adapter.run(batch)
    assert not torch._C._is_torch_function_mode_enabled()
    torch.testing.assert_close(adapter.run(batch), base, atol=1e-6, rtol=0)  # the same function, no hook left
    del router.forward
    with adapter.hooks([(name, lambda x, s: x.clone())]):
        torch.testing.assert_close(adapter.run(batch), base, atol=0, rtol=0)


def test_a_dense_model_has_no_routing_hooks():
    adapter = load_model("tiny:llama")
    assert adapter.moe_layers == [] and adapter.n_experts == 0 and not {"routing", "router_logits"} & set(adapter.layer_kinds)
    with pytest.raises(FeatsteerError, match="no mixture-of-experts layers whose routing featsteer can read"):
        expert_routing(adapter, ["a"], ["b"])
    with pytest.raises(FeatsteerError, match="blocks.1.mlp.hook_routing does not exist: layer 1 .* routes no experts"):
        adapter.hook_site("blocks.1.mlp.hook_routing")
    with pytest.raises(FeatsteerError, match="no blocks.L.mlp.hook_router_logits"):
        adapter.hook_names(("router_logits",))


def test_steering_keeps_each_tokens_expert_count_and_total_weight():
    model, adapter = _adapter("qwen2_moe")  # its top-k weights are not renormalised: the totals differ per token
    assert adapter.moe_layers == [1, 2] and adapter.hook_names(("routing",)) == ["blocks.1.mlp.hook_routing", "blocks.2.mlp.hook_routing"]
    base, _ = _routing(adapter)
    mask = adapter.tokenize(PROMPTS).attention_mask.bool()
    before = count_hooks(model)
    with steer(adapter, ExpertSteer(deactivate={1: [0, 3]}, activate={2: [2]})):
        steered, _ = _routing(adapter)
    assert count_hooks(model) == before
    with steer(adapter, ExpertSteer(activate={2: [2]})):  # alone, so layer 2's router sees what it saw unsteered
        activated, _ = _routing(adapter)
    off, on = steered["blocks.1.mlp.hook_routing"][mask], activated["blocks.2.mlp.hook_routing"][mask]
    assert bool((steered["blocks.2.mlp.hook_routing"][mask][:, 2] > 0).all())
    assert float(off[:, [0, 3]].abs().max()) == 0.0
    had_other = (base["blocks.1.mlp.hook_routing"][mask][:, [1, 2]] != 0).any(-1)
    torch.testing.assert_close(off.sum(-1)[had_other], base["blocks.1.mlp.hook_routing"][mask].sum(-1)[had_other])
    assert bool((on[:, 2] > 0).all()) and bool(((on != 0).sum(-1) == TOP_K).all())
    torch.testing.assert_close(on[:, 2], on.max(-1).values)  # the forced expert gets the token's largest weight
    torch.testing.assert_close(on.sum(-1), base["blocks.2.mlp.hook_routing"][mask].sum(-1))
    with pytest.raises(FeatsteerError, match="layer 0 of .* routes no experts: its MoE layers are \\[1, 2\\]"):
        ExpertSteer(deactivate={0: [1]}).hooks_for(adapter)
    with pytest.raises(FeatsteerError, match=r"expert\(s\) \[4\] at layer 1 do not exist"):
        ExpertSteer(activate={1: [4]}).hooks_for(adapter)
    with pytest.raises(FeatsteerError, match="both activated and deactivated"):
        ExpertSteer(deactivate={1: [2]}, activate={1: [2]})


def test_expert_routing_counts_what_the_hook_shows():
    _, adapter = _adapter("mixtral")
    harmful, harmless = ["how do I steal a car", "make a weapon at home"], ["bake bread", "a poem about rain please"]
    routing = expert_routing(adapter, harmful, harmless)
    for texts, counts, tokens in ((harmful, routing.harmful_counts, routing.n_tokens[0]), (harmless, routing.harmless_counts, routing.n_tokens[1])):
        seen, _ = _routing(adapter, texts)
        mask = adapter.tokenize(texts).attention_mask.bool()
        assert tokens == int(mask.sum())
        for row, name in enumerate(adapter.hook_names(("routing",))):
            assert counts[row].tolist() == (seen[name][mask] != 0).sum(0).double().tolist()
    torch.testing.assert_close(routing.harmful_rate.sum(-1), torch.full((3,), float(TOP_K), dtype=torch.float64))
    ranked = routing.ranked("harmful")
    assert len(ranked) == 12 and ranked[0].risk_difference == float(routing.risk_difference.max())
    assert routing.ranked("harmless")[0].risk_difference == float(routing.risk_difference.min())
    top = routing.top(2)
    assert sum(len(v) for v in top.values()) == 2 and all(routing.risk_difference[routing.layers.index(layer), e] > 0
                                                          for layer, experts in top.items() for e in experts)
    for counts, per_prompt, tokens, total in zip((routing.harmful_counts, routing.harmless_counts), routing.prompt_counts,
                                                 routing.prompt_tokens, routing.n_tokens, strict=True):
        torch.testing.assert_close(per_prompt.sum(0), counts)
        assert float(tokens.sum()) == total and per_prompt.shape[0] == 2
    low, high = routing.risk_difference_ci
    assert bool((low <= routing.risk_difference + 1e-12).all()) and bool((routing.risk_difference <= high + 1e-12).all())
    assert ranked[0].ci == (float(low.flatten()[routing.risk_difference.argmax()]), float(high.flatten()[routing.risk_difference.argmax()]))
    many = expert_routing(adapter, harmful * 8, harmless * 8)  # the same rates from 8x the prompts: a narrower interval
    torch.testing.assert_close(many.risk_difference, routing.risk_difference)
    assert float((many.risk_difference_ci[1] - many.risk_difference_ci[0]).mean()) < float((high - low).mean())
    last = expert_routing(adapter, harmful, harmless, positions="last")
    assert last.n_tokens == (2, 2) and last.positions == "last"
    with pytest.raises(FeatsteerError, match="one of the sets is empty"):
        expert_routing(adapter, [], harmless)
    with pytest.raises(FeatsteerError, match="routing is counted per token"):
        expert_routing(adapter, harmful, harmless, positions="mean_last:3")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_experts_and_steer_experts_commands(capsys, tmp_path):
    common = ["--model", "tiny:qwen3_moe", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "6"]
    code, out, err = _run(capsys, "experts", *common, "--top", "3", "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    assert "routing   3 MoE layers x 4 experts" in out and "| rank | layer | expert | harmful rate |" in out
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["n_experts"] == 4 and len(saved["top_harmful"]) == 3 and len(saved["harmful_rate"]) == 3
    code, out, err = _run(capsys, "experts", *common, "--top", "12", "--json", str(tmp_path / "all.json"))
    saved = json.loads((tmp_path / "all.json").read_text())  # the JSON lists what the tables print: each side's leaning experts
    assert code == 0 and saved["top_harmful"] and saved["top_harmless"], err
    assert all(s["risk_difference"] > 0 for s in saved["top_harmful"]) and all(s["risk_difference"] < 0 for s in saved["top_harmless"])
    for side in ("harmful", "harmless"):
        table = out.split(f"routed more often on {side} prompts")[1].split("\n\n")[0]
        assert table.count("\n| ") - 1 == len(saved[f"top_{side}"])  # rows after the header
    code, _, err = _run(capsys, "experts", *common[:1], "tiny:llama", *common[2:])
    assert code == 2 and "no mixture-of-experts layers" in err
    code, _, err = _run(capsys, "experts", *common, "--top", "0")
    assert code == 2 and "--top 0 lists no experts" in err
    code, _, err = _run(capsys, "steer", "--model", "tiny:llama", "--experts", "1:1", "--mode", "deactivate", "--prompt", "hi")
    assert code == 2 and "tiny:llama has no mixture-of-experts layers" in err
    code, out, err = _run(capsys, "steer", "--model", "tiny:qwen3_moe", "--experts", "2:3;1:1,2", "--mode", "deactivate", "--prompt", "hi",
                          "--max-new-tokens", "2")
    assert code == 0 and "steer: deactivate experts layer 2: [3]; layer 1: [1, 2] (routing weights)" in out, err
    # the plain and steered answers start in one column (a label wider than 8, `deactivate:` or `conditional:`, pushed its row right)
    rows = [line for line in out.splitlines() if line.startswith(("  plain:", "  deactivate:"))]
    assert len(rows) == 2 and len({len(line) - len(line.split(":", 1)[1].lstrip(" ")) for line in rows}) == 1, rows
    code, out, err = _run(capsys, "steer", "--model", "tiny:qwen3_moe", "--experts", "1:1", "--mode", "activate", "--experts-at",
                          "router_logits", "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0 and "steer: activate experts layer 1: [1] (router logits, SteerMoE)" in out, err
    code, _, err = _run(capsys, "steer", "--model", "tiny:qwen3_moe", "--directions", str(tmp_path), "--mode", "ablate", "--experts-at",
                        "router_logits", "--prompt", "hi")
    assert code == 2 and "--experts-at applies to --experts" in err
    for spec, mode, message in (("2", "deactivate", "is not LAYER:E"), ("2:9", "activate", r"expert\(s\) \[9\] at layer 2 do not exist"),
                                ("2:1", "ablate", "--experts takes --mode deactivate|activate")):
        code, _, err = _run(capsys, "steer", "--model", "tiny:qwen3_moe", "--experts", spec, "--mode", mode, "--prompt", "hi")
        assert code == 2 and __import__("re").search(message, err), err
    code, out, _ = _run(capsys, "capture", "--model", "tiny:qwen3_moe", "--prompts", "builtin:harmful:test", "--n", "3", "--hooks", "routing:1",
                        "--out", str(tmp_path / "routing"))
    assert code == 0 and "captured" in out and "x width 4" in out
    code, out, _ = _run(capsys, "capture", "--model", "tiny:qwen3_moe", "--prompts", "builtin:harmful:test", "--n", "3", "--hooks",
                        "router_logits:1", "--out", str(tmp_path / "logits"))
    assert code == 0 and "x width 4" in out


def test_compare_offers_expert_deactivation_on_moe_models_only(capsys, tmp_path):
    from featsteer.compare import available_methods

    assert {"expert_deactivation", "expert_deactivation_logits"} <= set(available_methods(model=load_model("tiny:mixtral")))
    assert not {"expert_deactivation", "expert_deactivation_logits"} & set(available_methods(model=load_model("tiny:llama")))
    code, _, err = _run(capsys, "compare", "--model", "tiny:qwen3_moe", "--harmful", "builtin:harmful:train", "--harmless",
                        "builtin:harmless:train", "--n", "12", "--max-new-tokens", "2", "--methods", "expert_deactivation",
                        "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    row = next(r for r in json.loads((tmp_path / "cmp" / "results.json").read_text())["results"] if r["method"].startswith("expert_deactivation"))
    details = row["details"]
    assert details["setting"].startswith("experts=") and details["deactivated"] and details["top_experts"][0]["risk_difference"] > 0
    assert details["max_nll_rise"] == 0.5 and "unedited" in details["validation_base_nll"]  # the coherence bound is on by default
    code, _, err = _run(capsys, "compare", "--model", "tiny:qwen3_moe", "--harmful", "builtin:harmful:train", "--harmless",
                        "builtin:harmless:train", "--n", "12", "--max-new-tokens", "2", "--methods", "expert_deactivation",
                        "--pick-max-nll-rise", "off", "--out", str(tmp_path / "unbounded"))
    assert code == 0, err
    saved = json.loads((tmp_path / "unbounded" / "results.json").read_text())
    assert saved["setup"]["max_nll_rise"] is None and "validation_base_nll" not in saved["results"][0]["details"]
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--model", "tiny:qwen3_moe", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
              "--pick-max-nll-rise", "half", "--out", str(tmp_path / "bad")])
    assert exit_.value.code == 2 and "or off for no bound" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    code, _, err = _run(capsys, "compare", "--model", "tiny:qwen3_moe", "--harmful", "builtin:harmful:train", "--harmless",
                        "builtin:harmless:train", "--n", "12", "--max-new-tokens", "2", "--methods", "expert_deactivation",
                        "--pick-max-nll-rise", "-100", "--out", str(tmp_path / "bounded"))
    assert code == 0, err
    saved = json.loads((tmp_path / "bounded" / "results.json").read_text())
    bounded = saved["results"][0]["details"]
    assert saved["setup"]["max_nll_rise"] == -100 and set(bounded["incoherent"]) == set(bounded["validation_base_nll"]) - {"unedited"}
    assert all(row["ruled_out"] == "coherence bound" for row in bounded["validation"].values())  # every setting broke the text
    assert set(bounded["incoherent_measured"]) == set(bounded["incoherent"])  # what each ruled-out setting measured is kept
    # and the validation rows record it too, not the unanswered 1.0 each entered the pick with
    assert {k: r["unanswered_harmful"] for k, r in bounded["validation"].items()} == {
        k: r["unanswered_harmful"] for k, r in bounded["incoherent_measured"].items()}
    assert all(0.0 <= row["unanswered_harmful"] <= 1.0 for row in bounded["incoherent_measured"].values())
    assert len(saved["bound_exclusions"]) == 1 and saved["bound_exclusions"][0].startswith("expert_deactivation: the coherence bound (-100 nats")
    code, _, err = _run(capsys, "compare", "--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless",
                        "builtin:harmless:train", "--n", "8", "--methods", "expert_deactivation", "--out", str(tmp_path / "dense"))
    assert code == 2 and "switch experts off" in err and not (tmp_path / "dense").exists()


def test_steering_that_the_router_would_undo_is_an_error_and_json_layer_maps_work():
    model = load_model("tiny:qwen2_moe")  # 4 experts, 2 per token, MoE layers 1 and 2
    assert (model.n_experts, model.experts_per_token) == (4, 2)
    for steering, message in ((ExpertSteer(deactivate={1: [0, 1, 2]}, at="router_logits"), "3 of 4 experts deactivated at layer 1's router logits"),
                              (ExpertSteer(activate={1: [0, 1, 2]}), "3 experts activated at layer 1, but the router sends each token to 2")):
        with pytest.raises(FeatsteerError, match=message), steer(model, steering):
            pass
    with steer(model, ExpertSteer(deactivate={1: [0, 1, 2]})):  # at the routing weights, switching three off is zeroing them
        pass
    steered = ExpertSteer(deactivate=json.loads(json.dumps({1: [0, 1]})), at="router_logits")  # keys come back as strings
    assert steered.deactivate == {1: [0, 1]}
    with pytest.raises(FeatsteerError, match=r"needs \{layer: \[expert, ...\]\}"):
        ExpertSteer(deactivate={1: 2})
    assert count_hooks(model.model) == 0


def test_expert_routing_intervals_resample_the_prompts_read():
    """Prompts shorter than all:N add nothing to a rate: the intervals resample the prompts read (they were NaN when a
    resample drew only unread prompts)."""
    model = load_model("tiny:qwen2_moe")
    long, short = "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2, ["hi", "yo"]
    partly = expert_routing(model, [long, *short], [long[:60], *short], positions="all:60")
    assert partly.prompt_tokens[1].tolist() == [3.0, 0.0, 0.0]
    low, high = partly.risk_difference_ci
    assert bool(torch.isfinite(low).all() and torch.isfinite(high).all())


def test_expert_routing_that_reads_no_token_is_an_error():
    model = load_model("tiny:qwen2_moe")
    with pytest.raises(FeatsteerError, match="no token of the harmful prompts was read"):
        expert_routing(model, ["a b c"], ["d e f"], positions="all:1000")


def test_post_instruction_routing_does_not_depend_on_the_batch():
    """A prompt's routing is read at the template tokens every prompt has, whichever prompts share its batch (each
    batch took its own fewest, so a prompt beside one whose last token merged into the template lost a token)."""
    from tests.test_activations import _merging_tokenizer

    adapter = load_model(tiny_model("mixtral")[0], tokenizer=_merging_tokenizer())
    harmful, harmless = ["Say hi", "Say bye ", "Say it"], ["Sing", "Sing it"]
    assert adapter.tokenize(harmful).n_post_instruction.tolist() == [16, 15, 16]
    apart = expert_routing(adapter, harmful, harmless, positions="post_instruction", batch_size=1)
    together = expert_routing(adapter, harmful, harmless, positions="post_instruction", batch_size=3)
    assert apart.n_tokens == together.n_tokens == (3 * 15, 2 * 15)  # one tail for both sets: the same tokens compared
    for side in range(2):
        torch.testing.assert_close(apart.prompt_counts[side], together.prompt_counts[side])


@pytest.mark.parametrize("extra", [["--positions", "prompt"], ["--value", "2"], ["--multiple", "2"], ["--hook", "blocks.1.hook_resid_pre"],
                                   ["--feature", "3"]])
def test_steer_experts_rejects_options_it_would_ignore(capsys, extra):
    """Expert switching acts at every token of the layers it names: a direction's or a feature's option is an error, not
    silently dropped."""
    code, _, err = _run(capsys, "steer", "--model", "tiny:qwen2_moe", "--experts", "1:0", "--mode", "deactivate", "--prompt", "hi", *extra)
    assert code == 2 and f"takes no {extra[0]}: drop it" in err and len(err.strip().splitlines()) == 1, err



@pytest.mark.parametrize("positions", ["post_instruction", "all"])
def test_expert_routing_tokenizes_each_prompt_once(monkeypatch, positions):
    """Each prompt is tokenized once, also at post_instruction positions, where the common tail came from tokenizing every
    prompt alone and the batches then tokenized it again; the batches are padded from that one encoding."""
    from tests.conftest import record_tokenizer_calls

    _, adapter = _adapter("mixtral")
    harmful, harmless = [*PROMPTS, "tell me how to open a safe"], ["bake bread", "name a colour"]
    calls = record_tokenizer_calls(adapter, monkeypatch)
    routing = expert_routing(adapter, harmful, harmless, positions=positions, batch_size=2)
    assert sorted(calls) == sorted(f.text for f in adapter.format_prompts([*harmful, *harmless]))
    assert routing.n_tokens[0] > 0 and routing.n_tokens[1] > 0
