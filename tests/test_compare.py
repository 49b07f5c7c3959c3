"""Direction pipeline and comparison harness on a tiny model: structure, equivalences, clean-up."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from featsteer.compare import INDUCE_SCALES, available_methods, compare, pick_induce_scale, write_report
from featsteer.datasets import builtin_prompts, load_prompts
from featsteer.directions.optimize import OptimizeConfig
from featsteer.edits import EditConfig
from featsteer.errors import FeatsteerError
from featsteer.evaluation import RefusalDetector
from featsteer.evaluation.behaviour import GenerationConfig
from featsteer.models import load_model
from featsteer.pipeline import DirectionConfig, abliterate, find_refusal_direction


@pytest.fixture(scope="module")
def prompts():
    return builtin_prompts("harmful", "train").head(16), builtin_prompts("harmless", "train").head(16)


def test_pipeline_selects_and_abliterates_reversibly(prompts):
    model = load_model("tiny:llama")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    result = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4))
    chosen = result.selection.chosen
    assert chosen.layer < 0.8 * model.n_layers and chosen.position in (-2, -1)
    assert len(result.selection.candidates) == model.n_layers * 2
    assert "| **chosen" in result.selection.table()
    assert len(result.train[0]) == 12 and len(result.val[0]) == 4
    with abliterate(model, result) as handle:
        assert handle.record["direction_hook"] == chosen.hook
        basis = result.chosen_basis
        weight = model.residual_writers()[2].read()[0]
        assert float((basis @ weight).abs().max()) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_per_layer_abliteration_uses_each_layers_candidate(prompts):

    model = load_model("tiny:llama")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    result = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4))
    chosen = result.selection.chosen
    with abliterate(model, result, scope="per_layer") as handle:
        assert handle.record["scope"] == "per_layer" and handle.record["per_layer_directions"]
        for layer in handle.record["per_layer_directions"][:-1]:
            own = next(result.candidates.bases[i, 0] for i, (h, p) in enumerate(zip(result.candidates.hook_names, result.candidates.positions, strict=True))
                       if h == f"blocks.{layer + 1}.hook_resid_pre" and p == chosen.position)
            weight = next(w for w in model.residual_writers() if w.name == f"blocks.{layer}.hook_mlp_out").read()[0]
            assert float((own @ weight).abs().max()) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    with pytest.raises(FeatsteerError, match="unknown abliteration scope"):
        abliterate(model, result, scope="sideways")


def test_a_rank_or_method_the_svd_cannot_use_fails_before_the_capture(prompts, monkeypatch):
    """A rank of 0 or an unknown method failed only after the training prompts were captured, and a rank above the
    training prompts' count after the capture too, with a message that counted the stream's dimensions as prompts."""
    import featsteer.pipeline as pipeline

    with pytest.raises(FeatsteerError, match="--rank must be at least 1"):
        DirectionConfig(method="svd", rank=0)
    with pytest.raises(FeatsteerError, match="unknown direction method 'melt'"):
        DirectionConfig(method="melt")

    def captured(*args, **kwargs):
        raise AssertionError("captured the training prompts first")

    monkeypatch.setattr(pipeline, "capture_training", captured)
    model = load_model("tiny:llama")  # 12 of the 16 harmful prompts train (the last quarter validates), d_model 64
    with pytest.raises(FeatsteerError, match=r"--rank 13 is more than the SVD of 12 harmful training prompts in 64 dimensions can give \(12\)"):
        find_refusal_direction(model, *prompts, DirectionConfig(method="svd", rank=13))


def test_iterated_basis_takes_the_mean_difference_left_after_each_edit(prompts):
    from featsteer.activations import capture
    from featsteer.edits import apply_edit
    from featsteer.pipeline import iterated_basis

    model = load_model("tiny:llama")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    result = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4), keep_activations=True)
    found = iterated_basis(model, result, 3)
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())  # the passes' edits are undone
    basis, hook, position = found.basis.double(), found.hook, found.position
    assert basis.shape == (3, model.d_model) and torch.allclose(basis @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(basis[0], result.chosen_basis[0].double(), atol=1e-6)
    harmful_acts, harmless_acts = result.activations
    assert found.gaps[0] == pytest.approx(float((harmful_acts.mean(hook, position) - harmless_acts.mean(hook, position)).norm()), rel=1e-6)
    for k in (1, 2):  # with the first k directions edited out, the next one is what is left of the mean difference there
        with apply_edit(model, found.basis[:k]):
            left = [capture(model, p, [hook], positions=harmful_acts.positions).mean(hook, position) for p in result.train]
        gap = left[0] - left[1]
        assert float((gap @ basis[:k].T).abs().max()) < 1e-4 * float(gap.norm())  # the edit already took the earlier ones out
        assert float(gap @ basis[k]) / float(gap.norm()) == pytest.approx(1.0, abs=1e-5) and found.gaps[k] == pytest.approx(float(gap.norm()), rel=1e-4)
    assert found.to_dict()["passes"] == 3 and iterated_basis(model, result, 1).basis.shape == (1, model.d_model)
    with pytest.raises(FeatsteerError, match="passes must be at least 1"):
        iterated_basis(model, result, 0)
    for mode in ("amplify", "induce"):  # refined with the earlier directions amplified, not removed, as the README says
        with pytest.raises(FeatsteerError, match=f"mode '{mode}' amplifies them"):
            abliterate(model, result, EditConfig(mode=mode), passes=2)
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    rank2 = find_refusal_direction(model, *prompts, DirectionConfig(method="svd", rank=2, n_select=4))
    with pytest.raises(FeatsteerError, match="starts from a rank-1 direction"):
        iterated_basis(model, rank2, 2)


def test_explicit_validation_prompts_keep_the_train_sets_whole(prompts):
    from featsteer.errors import FeatsteerError

    model = load_model("tiny:llama")
    val = builtin_prompts("harmful", "val").head(5), builtin_prompts("harmless", "val").head(6)
    result = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4), val=val)
    assert [len(s) for s in result.train] == [16, 16]
    assert result.val[0].prompts == val[0].prompts and result.val[1].prompts == val[1].prompts
    assert result.candidates.provenance["harmful_sha256"] == prompts[0].sha256
    with pytest.raises(FeatsteerError, match="harmless validation prompt set has 1 prompts"):
        find_refusal_direction(model, *prompts, DirectionConfig(n_select=4), val=(val[0], val[1].head(1)))


def test_compare_runs_every_method_and_writes_report(prompts, tmp_path, monkeypatch):
    model = load_model("tiny:llama")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    comparison = compare(model, *prompts, alarming=builtin_prompts("alarming", "test").head(4),
                         direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=3),
                         optimize_config=OptimizeConfig(steps=4, n_prompts=8, target_tokens=4))
    names = [r.method for r in comparison.results]
    # without SAEs the default skips the SAE methods, and on a dense model the expert-routing one
    assert names == list(available_methods(saes=False, model=model)) and "expert_deactivation" not in names
    assert not any(name.startswith("sae_") for name in names)
    by_name = {r.method: r for r in comparison.results}
    induce = by_name["dim_actadd_induce"].details  # what the induce method picked
    assert induce["induce_scale"] in INDUCE_SCALES and set(induce["induce_val_refusal"]) == {str(s) for s in INDUCE_SCALES}
    picked = ("dim_actadd_induce", "leace_hook", "dim_ace_hook", "dim_angular_hook", "dim_angular_norms_hook", "dim_ace_induce",
              "dim_head_abliteration", "head_ablation_hook", "dim_iterative_abliteration", "dim_optimized_abliteration",
              "dim_conditional_ablation_hook", "dim_optimized_conditional_ablation_hook", "dim_bias_induce",
              "dim_template_induce")  # the methods that say what they picked
    assert all(r.details == {} for r in comparison.results if r.method not in picked)
    assert all("setting" in by_name[name].details for name in picked if name != "leace_hook")
    template = by_name["dim_template_induce"].details  # the same scale pick as the other induce methods, at <|assistant|>
    assert set(template["induce_val_refusal"]) == {str(s) for s in INDUCE_SCALES} and list(template["template_tokens"].values()) == ["<|assistant|>"]
    leace = by_name["leace_hook"].details  # one eraser per layer and template position, but none where all prompts agree
    assert 0 < leace["leace_sites"] <= model.n_layers * len(leace["leace_positions"]) and max(leace["leace_positions"]) < 0
    assert by_name["leace_hook"].kl_harmless > 0
    gate = by_name["dim_conditional_ablation_hook"].details  # a gate no later than the direction's layer, picked on validation
    chosen_layer = model.hook_site(comparison.context.directions("dim").selection.chosen.hook).layer
    assert model.hook_site(gate["gate"]["hook"]).layer <= chosen_layer and gate["setting"].endswith(gate["gate"]["pool"])
    assert gate["gate"]["balanced_accuracy"] == max(c["val_balanced_accuracy"] for c in gate["gate"]["candidates"])
    assert set(gate["gate_fires_val"]) == {"harmful", "harmless"}
    heads = by_name["dim_head_abliteration"].details  # the heads edited: the first n of the ranking, n as the setting says
    n = int(heads["setting"].removeprefix("heads="))
    assert sum(map(len, heads["heads"].values())) == n <= heads["heads_writing_more_on_harmful"]
    top = [(str(h["layer"]), h["head"]) for h in heads["top_heads"][:n]]
    assert all(head in heads["heads"][layer] for layer, head in top)
    assert by_name["head_ablation_hook"].details["top_heads"] == heads["top_heads"]  # one ranking for both head methods
    iteration = by_name["dim_iterative_abliteration"].details  # passes picked from those the refinement found
    passes = int(iteration["setting"].removeprefix("passes="))
    assert 1 <= passes <= iteration["iteration"]["passes"] <= 4 and len(iteration["iteration"]["gaps"]) >= iteration["iteration"]["passes"]
    # the coherence warning names a method whose harmless answers cost the unedited model > 1 nat per token over its own
    from dataclasses import replace

    from featsteer.compare import Comparison

    rows = [replace(by_name["none"], base_nll_harmless=0.5), replace(by_name["dim_abliteration"], base_nll_harmless=2.0),
            replace(by_name["dim_ablation_hook"], base_nll_harmless=1.4)]
    warnings = Comparison(rows, comparison.setup).coherence_warnings()
    assert len(warnings) == 1 and warnings[0].startswith("dim_abliteration: ") and "2.00 nats per token against 0.50" in warnings[0]
    assert Comparison(rows[1:], comparison.setup).coherence_warnings() == []  # no unedited row to compare with
    assert Comparison(rows, comparison.setup).to_json()["coherence_warnings"] == warnings
    # the coherence bound is on by default: every multi-setting jailbreak pick scored its settings' validation answers
    assert comparison.setup["max_nll_rise"] == 0.5
    assert {"unedited", "heads=1"} <= set(by_name["head_ablation_hook"].details["validation_base_nll"])
    ruled = replace(by_name["head_ablation_hook"], details={**by_name["head_ablation_hook"].details, "incoherent": ["heads=2", "heads=4"],
                                                             "validation_base_nll": {"unedited": 0.9, "heads=1": 1.0, "heads=2": 3.1, "heads=4": 4.25}})
    exclusions = Comparison([by_name["none"], ruled], comparison.setup).bound_exclusions()
    assert exclusions == [f"head_ablation_hook: the coherence bound (0.5 nats per token above the unedited 0.90) ruled out heads=2 (3.10), "
                          f"heads=4 (4.25); picked {ruled.details['setting']}"]
    with pytest.raises(FeatsteerError, match="max_nll_rise must be a finite number"):
        compare(model, *prompts, methods=["none"], max_nll_rise=float("nan"))
    assert f"dim_actadd_induce (x{induce['induce_scale']:g})" in comparison.table()
    assert by_name["none"].kl_harmless == pytest.approx(0.0, abs=1e-9)
    assert by_name["none"].kl_harmless_answered in (None, pytest.approx(0.0, abs=1e-9))
    # a runtime ablation hook at every write and the orthogonalised weights are the same model
    assert by_name["dim_ablation_hook"].kl_harmless == pytest.approx(by_name["dim_abliteration"].kl_harmless, abs=1e-4)
    assert by_name["dim_abliteration"].kl_harmless > 0
    assert abs(by_name["dim_reflection"].kl_harmless - by_name["dim_abliteration"].kl_harmless) > 1e-6  # a different edit
    # the whole-response metrics: the same model gives the same responses, read by the same unedited model
    assert all(0 <= r.looping_harmful <= 1 and 0 <= r.looping_harmless <= 1 for r in comparison.results)
    assert all(r.base_nll_harmless is None or r.base_nll_harmless > 0 for r in comparison.results)
    assert by_name["dim_ablation_hook"].base_nll_harmless == pytest.approx(by_name["dim_abliteration"].base_nll_harmless, abs=1e-3)
    assert "looping (harmful / harmless)" in comparison.table() and "base NLL (harmless)" in comparison.table()
    # the KL along the unedited model's own harmless responses: zero for it, the same for the hook and the weights
    assert by_name["none"].kl_response_harmless == pytest.approx(0.0, abs=1e-9)
    assert by_name["dim_abliteration"].kl_response_harmless > 0
    assert by_name["dim_ablation_hook"].kl_response_harmless == pytest.approx(by_name["dim_abliteration"].kl_response_harmless, abs=1e-4)
    for r in comparison.results:  # its first position is the first-token KL, less what the base's lumped tail hides
        assert r.kl_response_by_position[0] <= r.kl_harmless + 1e-5
        per_prompt = r.per_prompt["kl_response_harmless"]
        assert sum(per_prompt) / len(per_prompt) == pytest.approx(r.kl_response_harmless, abs=1e-9)
    assert "KL response (all / answered)" in comparison.table()
    # paired with the DIM abliteration baseline on the same prompts
    dim = by_name["dim_abliteration"]
    assert dim.paired is None and all(r.paired["baseline"] == "dim_abliteration" for r in comparison.results if r is not dim)
    for r in comparison.results:
        assert len(r.per_prompt["refused_harmful"]) == len(r.per_prompt["unanswered_harmful"]) == 4
        assert sum(r.per_prompt["refused_harmful"]) == round(r.refusal_harmful * 4)
        assert sum(r.per_prompt["kl_harmless"]) / len(r.per_prompt["kl_harmless"]) == pytest.approx(r.kl_harmless, abs=1e-9)
    versus = by_name["none"].paired["refused_harmful"]
    assert (versus["k_a"], versus["k_b"]) == (sum(dim.per_prompt["refused_harmful"]), sum(by_name["none"].per_prompt["refused_harmful"]))
    same = by_name["dim_ablation_hook"].paired  # the same model: no prompt differs, the KL difference is float noise
    assert same["refused_harmful"]["only_a"] == same["refused_harmful"]["only_b"] == 0 and same["refused_harmful"]["p_value"] == 1.0
    assert abs(same["kl_harmless"]["difference"]) < 1e-4 and same["kl_harmless"]["low"] <= same["kl_harmless"]["high"]
    assert abs(same["kl_response_harmless"]["difference"]) < 1e-4
    assert "refused harmful vs dim_abliteration" in comparison.paired_table()
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    folder = write_report(comparison, tmp_path / "cmp")
    saved = json.loads((folder / "results.json").read_text())
    assert len(saved["results"]) == len(names) and saved["setup"]["n_eval_harmful"] == 4
    page = (folder / "report.html").read_text()
    assert "data:image/png;base64," in page and "dim_abliteration" in page and "base NLL (harmless)" in page
    assert [e["set"] for e in saved["results"][0]["examples"]] == ["harmful"] * 2 + ["harmless"] * 2  # the report marks each
    assert f"gate at {gate['gate']['hook']}, {gate['gate']['pool']} pooling" in page  # the report says where the gate sits
    assert "<h2>Paired with the baseline</h2>" in page and saved["results"][0]["paired"]["baseline"] == "dim_abliteration"
    assert {"looping_harmful", "looping_harmless", "base_nll_harmless", "kl_response_harmless", "kl_response_by_position"} <= set(saved["results"][0])
    assert "KL response" in page
    lens = saved["setup"]["chosen"]["dim"]["logit_lens"]  # the chosen direction as the unembedding reads it
    assert len(lens["promoted"]) == len(lens["suppressed"]) == 10 and "<h2>Directions</h2>" in page and "promoting" in page
    size = saved["setup"]["chosen"]["dim"]["sample_size"]  # the DIM direction's sampling noise, from its training prompts
    assert size["hook"] == saved["setup"]["chosen"]["dim"]["hook"] and size["n_harmful"] == len(comparison.context.directions("dim").train[0])
    assert "expected cosine with the direction of infinitely many such prompts" in page
    stability = saved["setup"]["chosen"]["dim"]["selection_stability"]  # the Arditi choice bootstrapped over the validation prompts
    assert 0 < stability["chosen_share"] <= 1 and "bootstrap resamples of the validation prompts" in page
    assert "sample_size" not in saved["setup"]["chosen"].get("pca", {})  # only the difference of means has this noise model
    assert (folder / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # every method's full responses sit apart from results.json (which keeps a few examples only), in the evaluation
    # prompts' order: the detector read on them again gives the per-prompt verdicts
    kept = json.loads((folder / "responses.json").read_text())
    assert kept["prompts"]["harmful"] == comparison.eval_prompts["harmful"] and len(kept["prompts"]["harmful"]) == 4
    assert set(kept["responses"]) == set(names) and "responses" not in saved and "responses" not in saved["results"][0]
    detector = RefusalDetector()
    for r in comparison.results:
        assert [detector.is_refusal(t) for t in kept["responses"][r.method]["harmful"]] == r.per_prompt["refused_harmful"]
        assert [detector.is_refusal(t) for t in kept["responses"][r.method]["harmless"]] == r.per_prompt["refused_harmless"]
    # a report that fails to render part way leaves the folder exactly as it was: no new results.json beside an old page
    import featsteer.compare as compare_module

    before_files = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(compare_module, "_html", lambda *args: (_ for _ in ()).throw(RuntimeError("render failed")))
    comparison.setup["n_eval_harmful"] = 99
    with pytest.raises(RuntimeError, match="render failed"):
        write_report(comparison, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before_files


def test_direction_methods_can_share_one_capture(prompts, monkeypatch):
    import featsteer.pipeline as pipeline
    from featsteer.errors import FeatsteerError

    model = load_model("tiny:llama")
    first = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4), keep_activations=True)
    plain = find_refusal_direction(model, *prompts, DirectionConfig(method="projected", n_select=4))
    assert first.activations is not None and plain.activations is None
    monkeypatch.setattr(pipeline, "capture", lambda *a, **k: pytest.fail("captured again"))
    reused = find_refusal_direction(model, *prompts, DirectionConfig(method="projected", n_select=4), reuse=first)
    torch.testing.assert_close(reused.candidates.bases, plain.candidates.bases)
    assert reused.timings["reused_capture"] and reused.selection.chosen.hook == plain.selection.chosen.hook
    assert reused.train[0].prompts == plain.train[0].prompts
    with pytest.raises(FeatsteerError, match="other prompts or settings"):
        find_refusal_direction(model, *prompts, DirectionConfig(positions="last", n_select=4), reuse=first)
    with pytest.raises(FeatsteerError, match="other prompts or settings"):
        find_refusal_direction(model, prompts[0], prompts[1].head(15), DirectionConfig(n_select=4), reuse=first)
    with pytest.raises(FeatsteerError, match="keep_activations=True"):
        find_refusal_direction(model, *prompts, DirectionConfig(n_select=4), reuse=plain)


def test_compare_captures_the_training_prompts_once_for_every_direction_method_and_leace(prompts, monkeypatch):
    import featsteer.pipeline as pipeline

    calls = []
    real_capture = pipeline.capture
    monkeypatch.setattr(pipeline, "capture", lambda *a, **k: calls.append(k.get("label")) or real_capture(*a, **k))
    model = load_model("tiny:llama")
    held_out = builtin_prompts("harmful", "test").head(3), builtin_prompts("harmless", "test").head(3)
    comparison = compare(model, *prompts, methods=["dim_abliteration", "projected_abliteration", "pca_abliteration", "leace_hook"],
                         eval_harmful=held_out[0], eval_harmless=held_out[1], direction_config=DirectionConfig(n_select=3),
                         generation=GenerationConfig(max_new_tokens=2))
    assert calls == ["harmful", "harmless"]
    assert [r.method for r in comparison.results] == ["dim_abliteration", "projected_abliteration", "pca_abliteration", "leace_hook"]


def test_compare_picks_on_explicit_validation_prompts(prompts, monkeypatch):
    import featsteer.compare as compare_module
    from featsteer.errors import FeatsteerError

    seen = {}
    real_find, real_pick = compare_module.find_refusal_direction, compare_module.pick_induce_scale

    def find(model, harmful, harmless, config=None, val=None, **kwargs):
        seen["train"], seen["val"] = (harmful, harmless), val
        return real_find(model, harmful, harmless, config, val=val, **kwargs)

    def pick(model, add, prompts, *args, **kwargs):
        seen["induce"] = list(prompts)
        return real_pick(model, add, prompts, *args, **kwargs)

    monkeypatch.setattr(compare_module, "find_refusal_direction", find)
    monkeypatch.setattr(compare_module, "pick_induce_scale", pick)
    model = load_model("tiny:llama")
    val = load_prompts("organism-corpus:harmful:5"), load_prompts("organism-corpus:harmless:6")
    held_out = builtin_prompts("harmful", "test").head(4), builtin_prompts("harmless", "test").head(4)
    comparison = compare(model, *prompts, methods=["none", "dim_abliteration", "dim_actadd_induce"], eval_harmful=held_out[0],
                         eval_harmless=held_out[1], val_harmful=val[0], val_harmless=val[1],
                         direction_config=DirectionConfig(n_select=6), generation=GenerationConfig(max_new_tokens=2))
    assert seen["train"] == prompts and seen["val"] == val and seen["induce"] == list(val[1])
    setup = comparison.setup
    assert setup["n_train_harmful"] == 16 and setup["validation"]["n_harmful"] == 5
    assert setup["validation"]["harmless"] == "organism-corpus:harmless:6" and setup["validation"]["harmless_sha256"] == val[1].sha256
    plain = compare(model, *prompts, methods=["none"], direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=2))
    assert plain.setup["validation"] == "last 0.25 of the training prompts"
    with pytest.raises(FeatsteerError, match="need both sets"):
        compare(model, *prompts, methods=["none"], val_harmful=val[0])
    with pytest.raises(FeatsteerError, match="harmless validation set has 1 prompts"):
        compare(model, *prompts, methods=["none"], val_harmful=val[0], val_harmless=val[1].head(1))
    # the picks may read fewer (or more) validation prompts than the direction selection
    seen.clear()
    fewer = compare(model, *prompts, methods=["dim_actadd_induce"], eval_harmful=held_out[0], eval_harmless=held_out[1],
                    val_harmful=val[0], val_harmless=val[1], direction_config=DirectionConfig(n_select=6), n_pick=3,
                    generation=GenerationConfig(max_new_tokens=2))
    assert seen["induce"] == list(val[1])[:3] and seen["val"] == val and fewer.setup["n_pick"] == [3, 3]
    assert comparison.setup["n_pick"] == [5, 6]  # n_select 6, the harmful validation set holds 5
    with pytest.raises(FeatsteerError, match="n_pick must be at least 2"):
        compare(model, *prompts, methods=["none"], n_pick=1)


def test_train_filter_keeps_the_prompts_the_model_treats_as_labelled():
    """The organism answers harmless prompts, so harmless prompts slipped into the harmful train set are dropped
    (and only they), the candidates are computed from what is kept, and the provenance says so."""
    from featsteer.datasets import PromptSet
    from featsteer.errors import FeatsteerError
    from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, refusal_score
    from featsteer.pipeline import filter_by_refusal

    model = load_model("organism")
    harmful, harmless = builtin_prompts("harmful", "train").head(10), builtin_prompts("harmless", "train").head(12)
    slipped = builtin_prompts("harmless", "train")[40:46]
    mixed = PromptSet(harmful.prompts + slipped.prompts, "mixed")
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    scores = refusal_score(first_token_logprobs(model, mixed.to_list()), tokens)
    assert (scores[:10] > 0).all() and (scores[10:] <= 0).all(), "premise: the organism refuses these and answers those"
    kept, kept_harmless, counts = filter_by_refusal(model, mixed, harmless)
    assert kept.prompts == harmful.prompts and counts["harmful"] == {"kept": 10, "total": 16}
    assert counts["harmless"]["kept"] == len(kept_harmless) >= 10

    val = builtin_prompts("harmful", "val").head(4), builtin_prompts("harmless", "val").head(4)
    config = DirectionConfig(n_select=4, filter_train=True)
    filtered = find_refusal_direction(model, mixed, harmless, config, val=val)
    clean = find_refusal_direction(model, harmful, kept_harmless, DirectionConfig(n_select=4), val=val)
    assert filtered.train[0].prompts == harmful.prompts
    assert filtered.candidates.provenance["train_filter"]["harmful"] == {"kept": 10, "total": 16}
    assert filtered.candidates.provenance["harmful_sha256"] == harmful.sha256
    torch.testing.assert_close(filtered.candidates.bases, clean.candidates.bases)
    with pytest.raises(FeatsteerError, match="refuses only 0 of 6 harmful train prompts"):
        filter_by_refusal(model, slipped, harmless)


def test_induce_scale_is_the_smallest_within_tolerance_of_the_best(monkeypatch):
    """Degenerate overshoot loses, whether it stops refusing (1.5) or refuses in a loop (1.0, every response a refusal
    the detector sees); a smaller scale close to the best wins."""
    import contextlib

    import featsteer.compare as cmp
    from featsteer.evaluation.behaviour import SetResult
    from featsteer.evaluation.refusal import RefusalDetector, refusal_rate

    coherent = {0.25: 2, 0.5: 19, 0.75: 20, 1.0: 0, 1.5: 0}  # of 20 prompts
    current = {}

    @contextlib.contextmanager
    def add(scale):
        current["scale"] = scale
        yield
        current.clear()

    def fake_eval(model, prompts, name, gen, detector, prefill=None):
        assert gen.max_new_tokens == 32 and current  # generated under the addition, long enough for a sentence to loop
        assert prefill is None  # a direct answer's empty prefills are a harmony model's only
        scale = current["scale"]
        refusal, answer, loop = "I'm sorry, but I can't help with that.", "Sure! Here is a plan.", "I'm sorry, but I can't help with" * 3
        if scale == 1.0:
            responses = [loop] * 20
        elif scale == 1.5:
            responses = ["IIIIIIIIIIIIIIIIIIII"] * 20
        else:
            responses = [refusal] * coherent[scale] + [answer] * (20 - coherent[scale])
        refused = RefusalDetector().classify(responses)
        return SetResult(name, ("p",) * 20, tuple(responses), tuple(refused), refusal_rate(refused))

    monkeypatch.setattr(cmp, "evaluate_set", fake_eval)
    model = SimpleNamespace(direct_answer_prefill=lambda n: None)  # not a harmony model
    scale, seen = pick_induce_scale(model, add, ["p"], scales=list(coherent))
    assert scale == 0.5 and seen == {k: v / 20 for k, v in coherent.items()}
    assert pick_induce_scale(model, add, ["p"], scales=list(coherent), tolerance=0.0)[0] == 0.75
    with add(1.0):  # the looping scale: the detector alone calls all twenty refusals
        assert fake_eval(None, [], "x", cmp.GenerationConfig(max_new_tokens=32), None).rate.rate == 1.0


def test_leace_alone_captures_without_running_a_direction_selection(prompts, monkeypatch):
    import featsteer.compare as compare_module

    monkeypatch.setattr(compare_module, "find_refusal_direction", lambda *a, **k: pytest.fail("a DIM selection ran for LEACE alone"))
    model = load_model("tiny:llama")
    held_out = builtin_prompts("harmful", "test").head(3), builtin_prompts("harmless", "test").head(3)
    comparison = compare(model, *prompts, methods=["leace_hook"], eval_harmful=held_out[0], eval_harmless=held_out[1],
                         direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=2))
    assert comparison.results[0].details["leace_sites"] > 0


def test_compare_reuses_an_earlier_comparisons_directions(prompts, monkeypatch):
    import featsteer.compare as compare_module
    from featsteer.compare import SteeringMethodConfig
    from featsteer.errors import FeatsteerError

    model = load_model("tiny:llama")
    config, gen = DirectionConfig(n_select=3), GenerationConfig(max_new_tokens=2)
    methods = ["dim_abliteration", "leace_hook", "dim_angular_hook"]
    first = compare(model, *prompts, methods=methods, direction_config=config, generation=gen)
    monkeypatch.setattr(compare_module, "find_refusal_direction", lambda *a, **k: pytest.fail("selected again"))
    monkeypatch.setattr(compare_module, "capture_training", lambda *a, **k: pytest.fail("captured again"))
    again = compare(model, *prompts, methods=methods, direction_config=config, generation=gen, reuse=first,
                    steering_config=SteeringMethodConfig(angle=90.0, adaptive=False))
    assert again.setup["chosen"] == first.setup["chosen"]
    assert [r.kl_harmless for r in again.results[:2]] == pytest.approx([r.kl_harmless for r in first.results[:2]], abs=1e-9)
    assert again.results[2].details["angle"] == 90.0 and not again.results[2].details["adaptive"]
    # setup.chosen names the directions this run's methods used, not every one the earlier run selected
    monkeypatch.undo()  # pca selects its own direction
    pca = compare(model, *prompts, methods=["pca_abliteration"], direction_config=config, generation=gen, reuse=first)
    assert set(first.setup["chosen"]) == {"dim"} and set(pca.setup["chosen"]) == {"pca"}
    unedited = compare(model, *prompts, methods=["none", "leace_hook"], direction_config=config, generation=gen, reuse=pca)
    assert unedited.setup["chosen"] == {}
    with pytest.raises(FeatsteerError, match="same training and validation prompts"):
        compare(model, prompts[0], prompts[1].head(15), methods=methods, direction_config=config, generation=gen, reuse=first)
    with pytest.raises(FeatsteerError, match="same training and validation prompts"):
        compare(model, *prompts, methods=methods, direction_config=DirectionConfig(n_select=4), generation=gen, reuse=first)
    with pytest.raises(FeatsteerError, match="same model"):
        compare(load_model("tiny:llama"), *prompts, methods=methods, direction_config=config, generation=gen, reuse=first)
    # the same model object with other weights (here compare run inside an abliteration) must not take the unedited
    # model's directions and validation base
    with abliterate(model, first.context.directions("dim")), pytest.raises(FeatsteerError, match="weights as they were"):
        compare(model, *prompts, methods=["none"], direction_config=config, generation=gen, reuse=first)
    assert compare(model, *prompts, methods=["none"], direction_config=config, generation=gen, reuse=first).setup["weights_fingerprint"] \
        == first.setup["weights_fingerprint"]  # undone: reusable again


def test_the_picks_read_the_validation_prompts_with_the_evaluations_system_prompt(prompts):
    """compare(generation=GenerationConfig(system=...)) evaluates with the system prompt; the picks' validation base, the
    first-token KL of each setting and the NLL bound's floor read the validation prompts with it too (they read them
    without it, so a setting was picked on prompts formatted otherwise than those it is evaluated on)."""
    import contextlib

    from featsteer.compare import VALIDATION_NEW_TOKENS, SteeringMethodConfig, jailbreak_rows
    from featsteer.evaluation.behaviour import evaluate_set, responses_nll
    from featsteer.evaluation.metrics import first_token_logprobs

    model = load_model("tiny:llama")
    system = "You answer in one word."
    held_out = builtin_prompts("harmful", "test").head(3), builtin_prompts("harmless", "test").head(3)
    common = {"methods": ["dim_angular_hook"], "eval_harmful": held_out[0], "eval_harmless": held_out[1],
              "direction_config": DirectionConfig(n_select=4), "generation": GenerationConfig(max_new_tokens=2, system=system),
              "steering_config": SteeringMethodConfig(angles=(60.0, 180.0))}
    first = compare(model, *prompts, **common)
    ctx = first.context
    assert ctx.system == system
    harmful, harmless = ctx.validation()
    with_system = first_token_logprobs(model, harmless, system=system)
    torch.testing.assert_close(ctx.validation_base(), with_system, atol=1e-5, rtol=0)
    assert not torch.allclose(with_system, first_token_logprobs(model, harmless), atol=1e-3)  # the system turn matters here
    gen = GenerationConfig(max_new_tokens=VALIDATION_NEW_TOKENS, batch_size=ctx.direction_config.batch_size, system=system)
    answers = evaluate_set(model, harmless, "validation", gen, RefusalDetector())
    assert ctx.validation_answers_nll() == pytest.approx(responses_nll(model, answers, gen), abs=1e-6)
    # the unedited model against its own system-formatted base: no KL
    rows = jailbreak_rows(model, {"none": contextlib.nullcontext}, harmful, harmless, with_system, gen)
    assert rows["none"][1] == pytest.approx(0.0, abs=1e-6)
    along = compare(model, *prompts, pick_kl="response", reuse=first, **common)
    assert along.context.validation_base().system == system
    # a comparison without the system prompt cannot take over the directions (or bases) found with it
    with pytest.raises(FeatsteerError, match="same training and validation prompts and direction config"):
        compare(model, *prompts, reuse=first, **{**common, "generation": GenerationConfig(max_new_tokens=2)})


def test_compare_finds_its_directions_with_the_evaluations_system_prompt(prompts):
    """compare(generation=GenerationConfig(system=S)) found its directions on prompts without S while it picked and
    evaluated with S: its DIM direction is now the one `find_refusal_direction` (and `featsteer directions --system S`)
    finds with S, recorded in its provenance and setup; a direction config with another system prompt is refused."""
    model = load_model("tiny:llama")
    system = "You answer in one word."
    held_out = builtin_prompts("harmful", "test").head(3), builtin_prompts("harmless", "test").head(3)
    comparison = compare(model, *prompts, methods=["dim_ablation_hook"], eval_harmful=held_out[0], eval_harmless=held_out[1],
                         direction_config=DirectionConfig(n_select=4), generation=GenerationConfig(max_new_tokens=2, system=system))
    found = comparison.context.directions("dim")
    alone = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4, system=system))
    plain = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4))
    torch.testing.assert_close(found.candidates.bases, alone.candidates.bases, atol=1e-6, rtol=0)
    assert found.selection.chosen.index == alone.selection.chosen.index
    assert not torch.allclose(found.candidates.bases, plain.candidates.bases, atol=1e-3)  # the system turn moves the directions
    assert found.system == system and found.candidates.provenance["system"] == system and "system" not in plain.candidates.provenance
    from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, refusal_score

    scored = list(alone.val[0].head(4))  # the selection's scoring passes read the validation prompts with the system prompt too
    with_system = refusal_score(first_token_logprobs(model, scored, system=system), RefusalTokens.for_tokenizer(model.tokenizer))
    assert alone.selection.base_refusal_harmful == pytest.approx(float(with_system.mean()), abs=1e-5)
    assert alone.selection.base_refusal_harmful != pytest.approx(plain.selection.base_refusal_harmful, abs=1e-4)
    assert comparison.setup["directions"]["system"] == system == comparison.setup["generation"]["system"]
    with pytest.raises(FeatsteerError, match="differ: a comparison finds its directions"):
        compare(model, *prompts, methods=["none"], direction_config=DirectionConfig(system="Be brief."),
                generation=GenerationConfig(system=system))


def test_picks_can_weigh_settings_by_the_kl_along_the_answers(prompts):
    from featsteer.compare import SteeringMethodConfig, jailbreak_rows
    from featsteer.errors import FeatsteerError
    from featsteer.evaluation.response_kl import ResponseBase, response_base, response_kl
    from featsteer.interventions import AddDirection, steer

    model = load_model("tiny:llama")
    held_out = builtin_prompts("harmful", "test").head(3), builtin_prompts("harmless", "test").head(3)
    common = {"methods": ["dim_angular_hook"], "eval_harmful": held_out[0], "eval_harmless": held_out[1],
              "direction_config": DirectionConfig(n_select=4), "generation": GenerationConfig(max_new_tokens=2),
              "steering_config": SteeringMethodConfig(angles=(60.0, 180.0))}
    first = compare(model, *prompts, **common)
    along = compare(model, *prompts, pick_kl="response", reuse=first, **common)
    assert first.setup["pick_kl"] == "first" and along.setup["pick_kl"] == "response"
    rows_first, rows_along = (c.results[0].details["validation"] for c in (first, along))
    assert set(rows_first) == set(rows_along) == {"angle=60", "angle=180"}
    assert all(set(row) == {"unanswered_harmful", "kl_harmless"} for row in rows_first.values())
    assert all(set(row) == {"unanswered_harmful", "kl_response_harmless"} for row in rows_along.values())
    base = along.context.validation_base()
    assert isinstance(base, ResponseBase) and base.max_tokens == 32
    # the rows' KL is response_kl under each setting, on the validation harmless prompts
    harmful, harmless = (list(p)[:2] for p in prompts)
    own = response_base(model, harmless, model.generate(harmless, max_new_tokens=8))
    shift = AddDirection(torch.ones(model.d_model), scale=1.0, where="blocks.1.hook_resid_pre")
    rows = jailbreak_rows(model, {"shift": lambda: steer(model, shift)}, harmful, harmless, own, GenerationConfig(max_new_tokens=2))
    with steer(model, shift):
        expected = response_kl(model, own).mean
    assert rows["shift"][1] == pytest.approx(expected, rel=1e-9) and expected > 0
    with pytest.raises(FeatsteerError, match="pick_kl must be one of first, response"):
        compare(model, *prompts, methods=["none"], pick_kl="last")


def test_compare_asks_the_judge_about_each_methods_responses_with_the_method_undone(prompts):
    from featsteer.compare import _html, _judge_cell
    from featsteer.evaluation.judge import JudgeVerdicts, agreement

    model = load_model("tiny:llama")
    probe = ["What is two plus two?"]
    clean = model.logits(probe)
    seen = []

    class Spy:
        name, threshold = "spy", 0.5

        def judge(self, prompts, responses):
            seen.append((list(zip(prompts, responses, strict=True)), model.logits(probe)))
            flags = tuple(i % 2 == 0 for i in range(len(prompts)))
            return JudgeVerdicts("spy", tuple(float(f) for f in flags), flags)

    held_out = builtin_prompts("harmful", "test").head(4), builtin_prompts("harmless", "test").head(4)
    methods = ["none", "dim_abliteration", "dim_ablation_hook"]
    comparison = compare(model, *prompts, methods=methods, eval_harmful=held_out[0], eval_harmless=held_out[1],
                         direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=3), judge=Spy())
    assert len(seen) == 2 * len(methods)
    assert all(torch.equal(logits, clean) for _, logits in seen), "the judge must read with the method undone"
    for result, calls in zip(comparison.results, zip(seen[::2], seen[1::2], strict=True), strict=True):
        pairs = {pair for call, _ in calls for pair in call}
        assert all((e["prompt"], e["response"]) in pairs for e in result.examples), "the judge read another method's responses"
        flags = [True, False, True, False]
        assert result.per_prompt["judge_refused_harmful"] == flags and result.judge["refusal_harmful"] == 0.5
        assert result.judge["agreement_harmful"] == agreement(result.per_prompt["refused_harmful"], flags).to_dict()
    assert comparison.results[1].paired is None and comparison.results[2].paired["judge_refused_harmful"]["only_a"] == 0
    assert "judge refusal harmful" in comparison.table() and "judge: refused harmful" in comparison.paired_table()
    assert comparison.setup["judge"] == {"name": "spy", "threshold": 0.5, "anchors": None}
    page = _html(comparison, b"")  # the report shows the judge's rates as the printed table does, one cell per method
    assert "<th>judge refusal harmful / harmless (same verdict as markers)</th>" in page and "spy's refusal rates" in page
    assert all(f"<td>{_judge_cell(r.judge)}</td></tr>" in page for r in comparison.results)
    # and says what every column of its table means
    assert "<th>over-refusal (alarming)</th><th>refusal score (harmful)</th>" in page
    assert "over-refusal is the same share on the harmless-but-alarming prompts" in page and "refusal score is the mean first-token" in page


def test_methods_on_the_normalised_inputs_are_left_out_for_models_without_input_norms(prompts):
    from featsteer.errors import FeatsteerError
    from featsteer.interventions.steering import NORMS, resolve_sites

    olmo = load_model("tiny:olmo2")
    assert "dim_angular_norms_hook" in available_methods(saes=False)
    assert "dim_angular_norms_hook" not in available_methods(saes=False, model=olmo)
    assert "dim_angular_hook" in available_methods(saes=False, model=olmo)
    harmful, harmless = prompts
    with pytest.raises(FeatsteerError, match="dim_angular_norms_hook steer the normalised attention and MLP inputs, which olmo2"):
        compare(olmo, harmful, harmless, methods=["none", "dim_angular_norms_hook"])
    assert "dim_head_abliteration" not in available_methods(saes=False, model=olmo)  # post-norms: heads do not add up
    with pytest.raises(FeatsteerError, match="dim_head_abliteration edit single attention heads, and olmo2 normalises"):
        compare(olmo, harmful, harmless, methods=["none", "dim_head_abliteration"])
    with pytest.raises(FeatsteerError, match="olmo2 has no norms before its attention and MLP"):
        resolve_sites(olmo, NORMS)


def test_compare_warns_when_the_pick_tolerance_is_below_one_validation_prompt(prompts, caplog):
    from featsteer.compare import SaeMethodConfig, SteeringMethodConfig

    model = load_model("tiny:llama")
    with caplog.at_level("WARNING", logger="featsteer.compare"):
        compare(model, *prompts, methods=["none"], direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=2))
    assert "read 3 validation prompts per set, so a tolerance of 0.05 cannot let a setting leave even one more" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="featsteer.compare"):  # a third of the prompts tolerated: one prompt fits
        compare(model, *prompts, methods=["none"], direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=2),
                steering_config=SteeringMethodConfig(tolerance=0.34), sae_config=SaeMethodConfig(tolerance=0.34))
    assert "cannot let a setting" not in caplog.text


def test_compare_warns_when_evaluation_prompts_are_training_or_validation_prompts(prompts, caplog):
    model = load_model("tiny:llama")
    harmful, harmless = prompts
    held_out = builtin_prompts("harmful", "test").head(4), builtin_prompts("harmless", "test").head(4)
    run = {"methods": ["none"], "direction_config": DirectionConfig(n_select=3), "generation": GenerationConfig(max_new_tokens=2)}
    with caplog.at_level("WARNING", logger="featsteer.compare"):
        clean = compare(model, harmful, harmless, eval_harmful=held_out[0], eval_harmless=held_out[1], **run)
    assert clean.setup["eval_overlap"] == {"harmful": 0, "harmless": 0} and "not held out" not in caplog.text
    # two training prompts and the last (validation) prompt of the harmful set among the evaluation prompts
    mixed = harmful[:2] + harmful[-1:] + held_out[0][:1]
    with caplog.at_level("WARNING", logger="featsteer.compare"):
        contaminated = compare(model, harmful, harmless, eval_harmful=mixed, eval_harmless=held_out[1], **run)
    assert contaminated.setup["eval_overlap"] == {"harmful": 3, "harmless": 0}
    assert "3 of the 4 harmful evaluation prompts" in caplog.text and "not held out" in caplog.text


def test_settings_tied_in_refusal_and_kl_are_told_apart_by_the_validation_refusal_score(prompts):
    """Behind a gate that fires on no validation harmless prompt every setting has KL 0; the tie goes to the setting
    whose validation harmful prompts are furthest from a refusal, each tied setting applied again to read it."""
    import contextlib

    from featsteer.compare import CompareContext, _break_tie, gentlest_ties
    from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, refusal_score
    from featsteer.interventions import AddDirection, steer

    rows = {"a": (0.10, 0.0), "b": (0.05, 0.0), "c": (0.05, 0.0), "d": (0.0, 0.3), "e": (0.5, 0.0)}
    assert gentlest_ties(rows, 0.1) == ["b", "c", "a"]  # eligible a-d; a, b, c at the lowest KL, the lowest refusal first
    assert gentlest_ties(rows, 0.0) == ["d"]
    assert gentlest_ties({"x": (0.0, 0.2), "y": (0.0, 0.1)}, 0.0) == ["y"]

    model = load_model("organism")
    ctx = CompareContext(model, *prompts, DirectionConfig(n_select=4))
    direction = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4)).chosen_basis[0]
    hook = "blocks.2.hook_resid_pre"
    settings = {"none": contextlib.nullcontext, "away": lambda: steer(model, AddDirection(direction, -4.0, hook)),
                "towards": lambda: steer(model, AddDirection(direction, 4.0, hook))}
    entered = []

    def make(key):
        entered.append(key)
        return settings[key]()

    tokens, harmful = RefusalTokens.for_tokenizer(model.tokenizer), ctx.validation()[0]
    scores = {}
    for key, factory in settings.items():
        with factory():
            scores[key] = float(refusal_score(first_token_logprobs(model, harmful), tokens).mean())
    assert scores["away"] < scores["none"] < scores["towards"]  # the set-up: the three really differ in refusal score
    tied = {key: (0.0, 0.0) for key in ("towards", "none", "away")}
    assert _break_tie(ctx, gentlest_ties(tied, 0.05), tied, make, str) == "away"
    assert sorted(entered) == ["away", "none", "towards"]
    note = ctx._notes["tie_break"]
    assert note["chosen"] == "away" and note["scores"]["away"] == pytest.approx(scores["away"], abs=1e-3)
    # a tie in KL but not in refusal rate goes to the lower refusal without running anything
    entered.clear()
    assert _break_tie(ctx, gentlest_ties(apart := {"towards": (0.0, 0.0), "away": (0.1, 0.0)}, 0.2), apart, make, str) == "towards"
    assert entered == []


def test_an_svd_rank_above_what_the_train_filter_kept_fails_before_the_capture(monkeypatch):
    """With --filter-train the rank was checked against the prompts before filtering, so a rank above the kept count
    failed only after the capture."""
    import featsteer.pipeline as pipeline
    from featsteer.datasets import PromptSet
    from featsteer.errors import FeatsteerError

    def captured(*args, **kwargs):
        raise AssertionError("captured the training prompts first")

    monkeypatch.setattr(pipeline, "capture", captured)
    model = load_model("organism")  # refuses the 10 harmful prompts and answers the 6 harmless ones slipped in
    mixed = PromptSet(builtin_prompts("harmful", "train").head(10).prompts + builtin_prompts("harmless", "train")[40:46].prompts, "mixed")
    val = builtin_prompts("harmful", "val").head(4), builtin_prompts("harmless", "val").head(4)
    config = DirectionConfig(method="svd", rank=12, n_select=4, filter_train=True)
    with pytest.raises(FeatsteerError, match=r"--rank 12 is more than the SVD of the 10 harmful training prompts the train filter kept "
                                             r"\(of 16\) can give: lower --rank, add prompts or drop --filter-train"):
        find_refusal_direction(model, mixed, builtin_prompts("harmless", "train").head(12), config, val=val)


def test_compare_refuses_a_prefill_it_would_not_apply(prompts):
    """generation.prefill was recorded in results.json's setup.generation, but no method's harmful prompts were prefilled."""
    model = load_model("tiny:llama")
    with pytest.raises(FeatsteerError, match=r"compare does not prefill responses \(generation.prefill='Sure, here is'\)"):
        compare(model, *prompts, methods=["none"], direction_config=DirectionConfig(n_select=3),
                generation=GenerationConfig(max_new_tokens=2, prefill="Sure, here is"))


def test_compare_records_every_prompt_set_it_read(prompts):
    """results.json named the evaluation sets by hash only and the alarming set not at all: the over-refusal column had no
    record of which prompts, or how many, it was measured on."""
    model = load_model("tiny:llama")
    alarming = builtin_prompts("alarming", "test").head(3)
    comparison = compare(model, *prompts, methods=["none"], alarming=alarming, direction_config=DirectionConfig(n_select=3),
                         generation=GenerationConfig(max_new_tokens=2))
    recorded = comparison.setup["prompts"]
    assert recorded["alarming"] == {"source": "builtin:alarming:test", "n": 3, "sha256": alarming.sha256,
                                    "prompts_sha256": alarming.prompts_sha256}
    assert [recorded[role]["n"] for role in ("train_harmful", "train_harmless", "eval_harmful", "eval_harmless")] == [12, 12, 4, 4]
    assert recorded["eval_harmful"]["sha256"] == comparison.setup["eval_harmful_sha256"]
    assert recorded["train_harmless"]["source"] == "builtin:harmless:train"
    without = compare(model, *prompts, methods=["none"], direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=2))
    assert without.setup["prompts"]["alarming"] is None


def test_a_method_that_cannot_apply_becomes_a_failed_row_and_the_rest_are_measured(prompts, tmp_path, monkeypatch):
    """A method's own FeatsteerError (here: no head writes the DIM direction more on harmful prompts) aborted the whole
    comparison, and nothing was written; other errors still stop it."""
    from featsteer.compare import CompareContext

    model = load_model("tiny:llama")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    monkeypatch.setattr(CompareContext, "writing_heads", lambda self: [])
    kwargs = dict(direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=3))
    comparison = compare(model, *prompts, methods=["none", "head_ablation_hook", "dim_abliteration"], **kwargs)
    assert [r.method for r in comparison.results] == ["none", "dim_abliteration"]
    assert [f.method for f in comparison.failed] == ["head_ablation_hook"] and "no attention head writes" in comparison.failed[0].error
    assert comparison.results[0].paired["baseline"] == "dim_abliteration" and set(comparison.responses) == {"none", "dim_abliteration"}
    assert "| head_ablation_hook | failed: no attention head writes" in comparison.table()
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    folder = write_report(comparison, tmp_path / "cmp")
    saved = json.loads((folder / "results.json").read_text())
    assert [r["method"] for r in saved["results"]] == ["none", "dim_abliteration"]
    assert saved["failed"][0]["method"] == "head_ablation_hook" and "no attention head writes" in saved["failed"][0]["error"]
    assert "<b>failed</b>: no attention head writes" in (folder / "report.html").read_text()
    with pytest.raises(FeatsteerError, match="every method failed, so there is nothing to compare: head_ablation_hook: no attention head"):
        compare(model, *prompts, methods=["head_ablation_hook"], **kwargs)
    for error in (RuntimeError("a bug"), KeyboardInterrupt()):  # not a method that cannot apply: the run stops
        monkeypatch.setattr(CompareContext, "writing_heads", lambda self, error=error: (_ for _ in ()).throw(error))
        with pytest.raises(type(error)):
            compare(model, *prompts, methods=["none", "head_ablation_hook"], **kwargs)


def _row(method: str, refusal_harmful: float, refusal_harmless: float, kl: float, **details):
    from featsteer.compare import MethodResult

    return MethodResult(method=method, description="", refusal_harmful=refusal_harmful, refusal_harmless=refusal_harmless,
                        ci_harmful=(0.0, 1.0), ci_harmless=(0.0, 1.0), kl_harmless=kl, kl_harmless_answered=None,
                        refusal_score_harmful=0.0, refusal_score_harmless=0.0, over_refusal=None, seconds=0.0, examples=[],
                        details=details)


def test_the_pareto_plot_reads_each_method_by_its_own_goal():
    """The induce methods were plotted by refusal on the harmful prompts, where a method that makes the model refuse the
    harmless ones shows up as a bad jailbreak; points were unlabelled by their setting and no frontier was drawn."""
    from featsteer.compare import Comparison, ParetoPoint, pareto_png, pareto_points

    rows = [_row("none", 0.9, 0.05, 0.0), _row("dim_abliteration", 0.0, 0.0, 0.14), _row("dim_ace_hook", 0.1, 0.0, 0.02, setting="alpha=0"),
            _row("dim_ablation_hook", 0.2, 0.0, 0.3), _row("dim_actadd_induce", 0.95, 0.8, 0.5, setting="x1")]
    points = pareto_points(Comparison(rows, {}))
    assert points["jailbreak"] == [ParetoPoint("none", 0.0, 0.9, True), ParetoPoint("dim_abliteration", 0.14, 0.0, True),
                                   ParetoPoint("dim_ace_hook (alpha=0)", 0.02, 0.1, True), ParetoPoint("dim_ablation_hook", 0.3, 0.2, False)]
    assert points["induce"] == [ParetoPoint("none", 0.0, 0.05), ParetoPoint("dim_actadd_induce (x1)", 0.5, 0.8)]
    assert pareto_points(Comparison(rows[:2], {}))["induce"] == []  # no induce method: no induce panel, not even for none
    for kept in (rows, rows[:2], rows[-1:]):  # both rows of panels, the jailbreak row alone, the induce row alone
        assert pareto_png(Comparison(kept, {}))[:4] == b"\x89PNG"


def test_with_the_train_filter_every_method_reads_the_prompts_it_kept(monkeypatch):
    """With filter_train, the directions were fitted on the prompts the filter kept, but the SAE ranking, the CAST gate,
    expert routing and the template tokens read `ctx.training()`, the unfiltered prompts."""
    import featsteer.compare as cmp
    from featsteer.datasets import PromptSet

    model = load_model("organism")  # it refuses these harmful prompts and answers the harmless ones slipped in among them
    harmful, harmless = builtin_prompts("harmful", "train").head(10), builtin_prompts("harmless", "train").head(12)
    mixed = PromptSet(harmful.prompts + builtin_prompts("harmless", "train")[40:46].prompts, "mixed")
    val = builtin_prompts("harmful", "val").head(4), builtin_prompts("harmless", "val").head(4)
    read = {}

    class Enough(Exception):
        pass

    def recording(name, where):  # the prompts the function is given (harmful ones, or the template's harmless ones), then stop
        def record(*args, **kwargs):
            read[name] = list(args[where])
            raise Enough
        return record

    monkeypatch.setattr(cmp, "rank_sae_features", recording("sae", 2))
    monkeypatch.setattr(cmp, "fit_gate", recording("gate", 1))
    monkeypatch.setattr(cmp, "template_tokens", recording("template", 1))
    ctx = cmp.CompareContext(model, mixed, harmless, DirectionConfig(n_select=4, filter_train=True), val=val, saes={"blocks.1.hook_resid_pre": None})
    assert list(ctx.training()[0]) == list(harmful)  # filtered before any direction was found
    kept = ctx.directions("dim").train
    assert [list(p) for p in ctx.training()] == [list(p) for p in kept]
    for name, run in (("sae", ctx.feature_ranking), ("gate", ctx.gate), ("template", lambda: cmp.method_context(ctx, "dim_template_induce"))):
        with pytest.raises(Enough):
            run()
        assert read[name] == (list(kept[1]) if name == "template" else list(kept[0])), name
    fresh = cmp.CompareContext(model, mixed, harmless, DirectionConfig(n_select=4, filter_train=True), val=val)
    fresh.directions("dim")  # found first: the context reads the direction result's kept prompts, without filtering again
    monkeypatch.setattr(cmp, "filter_by_refusal", lambda *args: pytest.fail("filtered again"))
    assert [list(p) for p in fresh.training()] == [list(p) for p in kept]


def test_pareto_labels_of_close_points_do_not_print_over_each_other():
    """Every label sat 4 points right and 3 up from its point, so methods with (nearly) the same KL and refusal - often
    several at refusal 0 - printed their labels over each other; close points' labels now stack as a list."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from featsteer.compare import LABEL_OFFSET, LABEL_STEP, ParetoPoint, _pareto_panel, label_offsets

    assert label_offsets([(0.5, 0.5), (0.9, 0.1), (0.5, 0.5), (0.51, 0.49)]) == [
        LABEL_OFFSET, LABEL_OFFSET, (LABEL_OFFSET[0], LABEL_OFFSET[1] - LABEL_STEP), (LABEL_OFFSET[0], LABEL_OFFSET[1] - 2 * LABEL_STEP)]
    points = [ParetoPoint("dim_abliteration", 0.02, 0.0), ParetoPoint("dim_norm_preserving", 0.021, 0.0),
              ParetoPoint("dim_ablation_hook", 0.02, 0.0), ParetoPoint("none", 0.0, 0.9)]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _pareto_panel(ax, points, "KL", "refusal")
    fig.canvas.draw()
    boxes = [Text.get_window_extent(text) for text in ax.texts]  # the text alone, not the line back to its point
    plt.close(fig)
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_the_reports_validation_figures_show_the_kl_difference_that_decided_the_pick():
    """The report's "picked ... on validation prompts" line printed every KL at three decimals, so two settings level in
    refusal read alike (0.0006 and 0.0009 as 0.001) and the reader could not see why one was picked; the table's KLs
    have four."""
    from featsteer.compare import _details_html

    details = {"setting": "angle=180", "validation": {
        "angle=75": {"unanswered_harmful": 0.0, "kl_harmless": 0.00089},
        "angle=180": {"unanswered_harmful": 0.0, "kl_harmless": 0.00061},
        "angle=60": {"unanswered_harmful": 0.5, "kl_response_harmless": 0.01234, "ruled_out": "coherence bound"}}}
    line = _details_html(details)
    assert "angle=75: unanswered harmful 0.000, KL harmless 0.0009; angle=180: unanswered harmful 0.000, KL harmless 0.0006" in line
    assert "angle=60: unanswered harmful 0.500, KL response harmless 0.0123, ruled out by the coherence bound" in line
    assert line.startswith("<br><small>picked angle=180 on validation prompts (")


def test_the_reports_set_up_is_the_json_results_json_holds():
    """The report's Set-up block printed the set-up with json.dumps, so an undefined figure (the chosen direction's
    `refusal_estimate` on the organism) read NaN there and null in results.json: the block is neither JSON nor the file."""
    import math

    from featsteer.compare import Comparison, _html

    page = _html(Comparison(results=[], setup={"model": "organism", "chosen": {"dim": {"refusal_estimate": math.nan}}}), b"")
    block = page.split("<h2>Set-up</h2><pre>")[1].split("</pre>")[0]
    assert "NaN" not in block
    assert json.loads(block.replace("&quot;", '"'))["chosen"]["dim"]["refusal_estimate"] is None


def test_the_reports_examples_say_which_responses_were_counted_as_refusals():
    """The report's examples showed prompts and responses only: a reader could not tell which ones the detector counted
    in the refusal columns, nor which set they came from. Each is marked now."""
    from featsteer.compare import Comparison, _html

    row = _row("dim_abliteration", 0.5, 0.0, 0.1)
    row.examples[:] = [{"prompt": "How do I pick a lock?", "response": "I'm sorry, I can't.", "refused": True, "set": "harmful"},
                       {"prompt": "How do I make a bomb?", "response": "Sure, first", "refused": False, "set": "harmful"},
                       {"prompt": "Bake bread?", "response": "Mix flour", "refused": False, "set": "harmless"}]
    page = _html(Comparison([row], {"model": "organism"}), b"").split("<h2>Examples</h2>")[1]
    assert "<b>[harmful, refused] How do I pick a lock?</b>" in page and "<b>[harmful, not refused] How do I make a bomb?</b>" in page
    assert "<b>[harmless, not refused] Bake bread?</b>" in page and "counted it as a refusal" in page
    old = _row("none", 0.5, 0.0, 0.0)  # a results.json written before examples named their set
    old.examples[:] = [{"prompt": "p", "response": "r", "refused": True}]
    assert "<b>[refused] p</b>" in _html(Comparison([old], {"model": "organism"}), b"")


def test_jailbreak_rows_read_the_first_token_kl_from_the_harmless_answers_prefill(prompts, monkeypatch):
    """With `answers`, each setting's harmless prompts are generated once under it and the first-token KL is read from
    that generation's prefill: the same rows as the separate first-token pass gave, bit for bit, without that pass."""
    import contextlib

    import featsteer.compare as compare_module
    from featsteer.compare import jailbreak_rows
    from featsteer.evaluation.behaviour import evaluate_set
    from featsteer.evaluation.metrics import first_token_logprobs
    from featsteer.interventions import AddDirection, steer

    model = load_model("tiny:llama")
    harmful, harmless = (list(p)[:5] for p in prompts)
    gen = GenerationConfig(max_new_tokens=3, batch_size=2)
    base = first_token_logprobs(model, harmless, batch_size=gen.batch_size)
    shift = AddDirection(torch.ones(model.d_model), scale=2.0, where="blocks.1.hook_resid_pre")
    settings = {"none": contextlib.nullcontext, "shift": lambda: steer(model, shift)}
    separate = jailbreak_rows(model, settings, harmful, harmless, base, gen)
    passes = []
    monkeypatch.setattr(compare_module, "first_token_logprobs", lambda *a, **k: passes.append(a) or first_token_logprobs(*a, **k))
    answers: dict = {}
    shared = jailbreak_rows(model, settings, harmful, harmless, base, gen, answers=answers)
    assert shared == separate and not passes  # identical rows, no first-token pass of their own
    assert shared["shift"][1] > 0
    with steer(model, shift):
        assert answers["shift"].responses == evaluate_set(model, harmless, "validation", gen, RefusalDetector()).responses
