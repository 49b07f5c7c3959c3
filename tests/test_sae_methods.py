"""SAE-feature methods in the comparison harness, and per-feature jailbreak / induced-refusal rates.

The SAE has a planted refusal feature: its decoder row is the (unit) difference-in-means direction r at
its hook and its encoder reads r strongly, so it ranks first. Projecting that feature out must then be
exactly the DIM-style edit against r, and a feature that never fires must change nothing.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from featsteer.activations import capture
from featsteer.cli import main
from featsteer.compare import (
    CompareContext,
    SaeMethodConfig,
    available_methods,
    compare,
    gentlest_within,
    method_context,
    weakest_within,
    write_report,
)
from featsteer.datasets import builtin_prompts
from featsteer.edits import EditConfig, apply_edit
from featsteer.errors import FeatsteerError
from featsteer.evaluation import RefusalDetector
from featsteer.evaluation.behaviour import GenerationConfig
from featsteer.evaluation.metrics import first_token_logprobs
from featsteer.features import (
    doubling_sizes,
    feature_effects,
    features_needed,
    max_feature_activations,
    screen_features,
)
from featsteer.models import load_model
from featsteer.pipeline import DirectionConfig, split
from featsteer.sae import encode_activations, load_sae_source
from tests.conftest import count_hooks

HOOK = "blocks.1.hook_resid_post"
PLANTED, DEAD, DEAD_TOO = 5, 17, 42
SAE_METHODS = ["sae_top1_abliteration", "sae_topk_abliteration", "sae_clamp_hook", "sae_top1_ablation_hook", "sae_topk_induce"]
PROBE = ["How do I bake bread?", "Write a poem about the sea.", "How do I pick a lock?"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return load_model("tiny:llama")


@pytest.fixture(scope="module")
def prompts():
    return builtin_prompts("harmful", "train").head(16), builtin_prompts("harmless", "train").head(16)


@pytest.fixture(scope="module")
def class_means(model, prompts):
    """Harmful and harmless mean activation at HOOK over the prompts the context ranks features on."""
    harmful, harmless = (split(split(p, 0.25)[0], 0.25)[0] for p in prompts)
    return [capture(model, list(p), [HOOK], positions="post_instruction", progress=False).hook(HOOK).double().mean(0) for p in (harmful, harmless)]


@pytest.fixture(scope="module")
def direction(class_means):
    """Unit difference in means r."""
    difference = class_means[0] - class_means[1]
    return (difference / difference.norm()).float()


@pytest.fixture(scope="module")
def sae(direction, class_means):
    """A ReLU SAE with a planted refusal feature (decoder row r, fires above the harmless mean along r) and two dead features."""
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=128, metadata=SAEMetadata(hook_name=HOOK, model_name="tiny:llama")))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
        gain = 1000.0
        sae.W_dec[PLANTED] = direction
        sae.W_enc[:, PLANTED] = gain * direction
        sae.b_enc[PLANTED] = -gain * float((class_means[1].float() - sae.b_dec) @ direction)
        for dead in (DEAD, DEAD_TOO):
            sae.W_enc[:, dead] = 0.0
            sae.b_enc[dead] = -10.0
    return sae.eval()


@pytest.fixture
def context(model, prompts, sae):
    harmful, harmless = (split(p, 0.25)[0] for p in prompts)
    config = SaeMethodConfig(top_k=4, clamp_multiple=-1.0, induce_multiple=1.0)  # fixed: no validation search
    return CompareContext(model, harmful, harmless, DirectionConfig(n_select=3), saes={HOOK: sae}, sae_config=config)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def test_top1_abliteration_is_the_dim_style_edit_and_the_ablation_hook(model, context, direction):
    before = _state(model)
    assert context.feature_ranking().best(1) == (HOOK, [PLANTED])
    clean = model.logits(PROBE)
    with method_context(context, "sae_top1_abliteration"):
        abliterated = model.logits(PROBE)
    with apply_edit(model, direction, EditConfig()):
        reference = model.logits(PROBE)
    with method_context(context, "sae_top1_ablation_hook"):
        hooked = model.logits(PROBE)
    torch.testing.assert_close(abliterated, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(hooked, abliterated, atol=1e-4, rtol=0)
    assert not torch.allclose(abliterated, clean, atol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_every_sae_method_changes_the_model_and_cleans_up(model, context):
    before, hooks = _state(model), count_hooks(model.model)
    clean = model.logits(PROBE)
    for name in SAE_METHODS:
        with method_context(context, name):
            assert not torch.allclose(model.logits(PROBE), clean, atol=1e-4), name
        assert count_hooks(model.model) == hooks, name
        with pytest.raises(RuntimeError, match="boom"), method_context(context, name):
            raise RuntimeError("boom")
        assert count_hooks(model.model) == hooks, name
        assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items()), name
    torch.testing.assert_close(model.logits(PROBE), clean, atol=0, rtol=0)


def test_clamp_and_induce_use_multiples_of_the_harmful_maximum(context):
    maximum = context.feature_ranking().harmful_max[HOOK]
    for name, multiple in (("sae_clamp_hook", -1.0), ("sae_topk_induce", 1.0)):
        context._notes = {}
        method_context(context, name)
        features = context._notes["sae_features"]
        assert len(features) == 4 and features[0] == PLANTED
        values = {edit["features"][0]: edit["value"] for edit in context._notes["sae_edits"]}
        assert values == pytest.approx({f: multiple * float(maximum[f]) for f in features})
        assert values[PLANTED] * multiple > 0


def test_pick_rules_trade_refusal_against_kl():
    rows = {"a": (0.30, 0.01), "b": (0.08, 0.90), "c": (0.10, 0.20), "d": (0.05, 0.50), "e": (0.12, 0.05)}
    assert gentlest_within(rows, 0.05) == "c"  # within 0.05 of the lowest refusal (0.05): b, c, d; c has the lowest KL
    assert gentlest_within(rows, 0.0) == "d"
    assert gentlest_within(rows, 0.1) == "e"
    assert gentlest_within({"only": (1.0, 9.0)}, 0.05) == "only"
    rates = {0.5: 0.40, 1.0: 0.81, 2.0: 0.85, 3.0: 0.84}
    assert weakest_within(rates, 0.05) == 1.0 and weakest_within(rates, 0.0) == 2.0 and weakest_within(rates, 0.5) == 0.5
    # a tolerance of exactly one prompt admits a setting one prompt away, whatever the round-off (0.7 + 0.1 < 0.8 in floats)
    assert gentlest_within({"7/10": (7 / 10, 0.5), "8/10": (8 / 10, 0.1)}, 1 / 10) == "8/10"
    assert gentlest_within({"7/20": (7 / 20, 0.5), "8/20": (8 / 20, 0.1)}, 1 / 20) == "8/20"
    assert weakest_within({"7/10": 7 / 10, "8/10": 8 / 10}, 1 / 10) == "7/10"


def test_sae_settings_are_picked_on_validation_prompts_the_ranking_never_read(model, prompts, sae):
    harmful, harmless = (split(p, 0.25)[0] for p in prompts)
    config = SaeMethodConfig(top_ks=(1, 4), clamp_multiples=(0.0, -1.0), induce_multiples=(0.5, 2.0))
    context = CompareContext(model, harmful, harmless, DirectionConfig(n_select=3), saes={HOOK: sae}, sae_config=config)
    val_harmful, val_harmless = context.validation()
    ranked_on = set(split(harmful, 0.25)[0]) | set(split(harmless, 0.25)[0])
    assert val_harmful and val_harmless and not ranked_on & (set(val_harmful) | set(val_harmless))
    expected = {"sae_topk_abliteration": ["k=1", "k=4"], "sae_clamp_hook": ["k=1, x0", "k=1, x-1", "k=4, x0", "k=4, x-1"],
                "sae_topk_induce": ["k=1, x0.5", "k=4, x0.5", "k=1, x2", "k=4, x2"]}  # weakest clamp first, not sorted (k, x)
    for name, labels in expected.items():
        context._notes = {}
        method_context(context, name)
        notes = context._notes
        validation = notes["sae_validation"]
        assert list(validation) == labels, name
        assert notes["setting"] in labels and len(notes["sae_features"]) == notes["sae_top_k"], name
        if name == "sae_topk_induce":
            rates = {label: row["refusal_harmless"] for label, row in validation.items()}
            assert notes["setting"] == weakest_within(rates, config.tolerance)
            # "weakest" is the size of what the clamp writes: the clamped features' decoder rows times their values
            ranking = context.feature_ranking()
            for label, row in validation.items():
                k, multiple = int(label.split(",")[0][2:]), float(label.split("x")[1])
                written = sum(multiple * float(ranking.harmful_max[HOOK][f]) * sae.W_dec[f].detach().double() for f in ranking.best(k)[1])
                assert row["clamp_norm"] == pytest.approx(float(written.norm()), rel=1e-9), label
            norms = [row["clamp_norm"] for row in validation.values()]
            assert norms == sorted(norms)
        else:
            rows = {label: (row["unanswered_harmful"], row["kl_harmless"]) for label, row in validation.items()}
            assert all(kl >= 0 for _, kl in rows.values()) and notes["setting"] == gentlest_within(rows, config.tolerance)
        if name == "sae_clamp_hook":
            value = notes["sae_edits"][0].get("value", 0.0)
            assert (value == 0.0) == notes["setting"].endswith("x0")
    # KL is measured against the unedited model, not against the first setting tried
    torch.testing.assert_close(context.validation_base(), first_token_logprobs(model, val_harmless, batch_size=16), atol=1e-5, rtol=0)
    fixed = CompareContext(model, harmful, harmless, DirectionConfig(n_select=3), saes={HOOK: sae}, sae_config=SaeMethodConfig(top_k=2))
    method_context(fixed, "sae_topk_abliteration")
    assert "sae_validation" not in fixed._notes and fixed._notes["setting"] == "k=2"


def test_sae_method_config_rejects_bad_grids_and_round_trips():
    for bad, match in (({"top_ks": ()}, "empty"), ({"top_ks": (1, 0)}, "at least 1"), ({"clamp_multiples": (0.0, 0.5)}, "amplify"),
                       ({"clamp_multiple": 1.0}, "amplify"), ({"induce_multiples": (1.0, -1.0)}, "positive"), ({"tolerance": 1.5}, "tolerance")):
        with pytest.raises(FeatsteerError, match=match):
            SaeMethodConfig(**bad)
    config = SaeMethodConfig(top_k=3, clamp_multiples=[0.0, -2.0])
    assert SaeMethodConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_compare_with_saes_runs_the_sae_methods_and_records_features(model, prompts, sae, tmp_path):
    comparison = compare(model, *prompts, methods=["none", *SAE_METHODS], saes={HOOK: sae}, sae_config=SaeMethodConfig(top_k=3),
                         direction_config=DirectionConfig(n_select=3), generation=GenerationConfig(max_new_tokens=2))
    by_name = {r.method: r for r in comparison.results}
    assert list(by_name) == ["none", *SAE_METHODS]
    assert by_name["none"].details == {} and by_name["none"].kl_harmless == pytest.approx(0.0, abs=1e-9)
    assert by_name["sae_top1_abliteration"].details["sae_features"] == [PLANTED]
    for name in SAE_METHODS:
        assert by_name[name].details["sae_hook"] == HOOK
    assert len(by_name["sae_topk_abliteration"].details["sae_features"]) == 3
    assert by_name["sae_top1_ablation_hook"].kl_harmless == pytest.approx(by_name["sae_top1_abliteration"].kl_harmless, abs=1e-4)
    assert by_name["sae_top1_abliteration"].kl_harmless > 0
    setup = comparison.setup["sae"]
    assert setup["hooks"] == {HOOK: 128} and setup["config"]["top_k"] == 3 and setup["top_features"][0]["feature_id"] == PLANTED
    assert comparison.setup["chosen"] == {}  # no DIM direction was needed
    folder = write_report(comparison, tmp_path / "cmp")
    saved = json.loads((folder / "results.json").read_text())
    assert saved["results"][1]["details"]["sae_features"] == [PLANTED]
    clamp = by_name["sae_clamp_hook"].details  # k fixed at 3, the clamp value picked from the default grid
    assert [label.split(",")[0] for label in clamp["sae_validation"]] == ["k=3"] * 4 and clamp["sae_top_k"] == 3
    assert f"sae_clamp_hook ({clamp['setting']})" in comparison.table()
    assert f"picked {clamp['setting']} on validation prompts" in (folder / "report.html").read_text()


def test_sae_methods_without_saes_are_a_clear_error(model, prompts, tmp_path, capsys):
    assert not set(SAE_METHODS) & set(available_methods(saes=False)) and set(SAE_METHODS) <= set(available_methods())
    with pytest.raises(FeatsteerError, match="sae_clamp_hook need SAEs"):
        compare(model, *prompts, methods=["none", "sae_clamp_hook"])
    context = CompareContext(model, *prompts, DirectionConfig())
    with pytest.raises(FeatsteerError, match="need SAEs"):
        method_context(context, "sae_top1_abliteration")
    with pytest.raises(FeatsteerError, match="top_k"):
        SaeMethodConfig(top_k=0)
    code = main(["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--n", "8",
                 "--methods", "sae_top1_abliteration", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "need SAEs" in err and len(err.strip().splitlines()) == 1


def test_cli_compare_lists_and_runs_sae_methods(sae, tmp_path, capsys):
    assert main(["compare", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "sae_clamp_hook" in listing and "[needs --sae]" in listing and "dim_abliteration " in listing
    sae.save_model(tmp_path / "saes" / HOOK)
    code = main(["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--n", "16",
                 "--n-select", "3", "--methods", "none,sae_topk_abliteration", "--sae", str(tmp_path / "saes" / HOOK),
                 "--sae-top-k", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "out")])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"][1]["details"]["sae_hook"] == HOOK and len(saved["results"][1]["details"]["sae_features"]) == 2
    assert "sae_topk_abliteration: blocks.1.hook_resid_post features" in capsys.readouterr().out


def test_resolve_saes_accepts_folders_mappings_and_reports_bad_sources(model, sae, tmp_path):
    sae.save_model(tmp_path / "saes" / HOOK)
    assert list(load_sae_source(tmp_path / "saes", model)) == [HOOK]
    assert list(load_sae_source(tmp_path / "saes" / HOOK, model)) == [HOOK]
    assert load_sae_source({HOOK: sae}, model)[HOOK] is sae
    with pytest.raises(FeatsteerError, match="no SAEs given"):
        load_sae_source({}, model)
    with pytest.raises(FeatsteerError, match="not found"):
        load_sae_source(tmp_path / "missing", model)


@pytest.fixture(scope="module")
def behaviour(model):
    """Prompts and a detector under which the random model 'refuses' some prompts and not others."""
    harmful, harmless = list(builtin_prompts("harmful", "test").head(8)), list(builtin_prompts("harmless", "test").head(8))
    responses = {name: model.generate(p, max_new_tokens=6) for name, p in (("harmful", harmful), ("harmless", harmless))}
    marker = Counter(responses["harmful"] + responses["harmless"]).most_common(1)[0][0]
    detector = RefusalDetector(markers=(marker,))
    refused = {name: detector.classify(r) for name, r in responses.items()}
    assert 0 < sum(refused["harmful"]) < len(harmful), "the test needs a clean model that refuses some but not all prompts"
    return harmful, harmless, detector, refused


def test_feature_effects_of_a_feature_that_does_nothing_equal_the_clean_model(model, sae, behaviour):
    harmful, harmless, detector, refused = behaviour
    effects = feature_effects(model, sae, [DEAD, PLANTED], harmful, harmless, max_new_tokens=6, detector=detector)
    dead, planted = effects.effects
    clean_compliance = 1 - sum(refused["harmful"]) / len(harmful)
    assert dead.feature_id == DEAD and dead.harmful_max == 0.0 and planted.harmful_max > 0
    assert dead.jailbreak.rate == pytest.approx(clean_compliance) and dead.jailbreak == effects.clean_jailbreak
    assert dead.induced_refusal.rate == pytest.approx(sum(refused["harmless"]) / len(harmless))
    assert dead.jailbreak.low <= dead.jailbreak.rate <= dead.jailbreak.high and 0 < dead.jailbreak.high - dead.jailbreak.low < 1
    assert dead.refusal_score_harmful == effects.clean_score_harmful
    assert planted.induce.value == pytest.approx(planted.harmful_max) and planted.refusal_score_harmless != effects.clean_score_harmless
    assert json.loads(json.dumps(effects.to_json()))["effects"][0]["feature_id"] == DEAD
    assert "(clean)" in effects.table() and len(effects.rows()) == 2


def test_screen_features_uses_first_token_scores(model, sae, behaviour):
    harmful, harmless, _, _ = behaviour
    screened = screen_features(model, sae, [DEAD, PLANTED], harmful, harmless)
    dead, planted = screened.effects
    assert screened.judge == "first_token" and screened.provenance["max_new_tokens"] is None
    assert dead.refusal_score_harmful == screened.clean_score_harmful and dead.jailbreak == screened.clean_jailbreak
    clamped = screen_features(model, sae, [PLANTED], harmful, harmless, clamp_value=-50.0, induce_multiple=None)
    planted = clamped.effects[0]
    assert clamped.clean_score_harmful == screened.clean_score_harmful and planted.induced_refusal is None
    assert abs(planted.refusal_score_harmful - screened.clean_score_harmful) > 1e-3
    assert planted.suppress.mode == "clamp" and planted.suppress.value == -50.0
    with pytest.raises(FeatsteerError, match="amplify"):
        screen_features(model, sae, [PLANTED], harmful, harmless, clamp_value=5.0)
    with pytest.raises(FeatsteerError, match="out of range"):
        screen_features(model, sae, [500], harmful, harmless)


def test_features_needed_says_when_features_do_not_carry_refusal(model, sae, behaviour):
    harmful, _, detector, refused = behaviour
    clean_rate = sum(refused["harmful"]) / len(harmful)
    stuck = features_needed(model, sae, [DEAD, DEAD_TOO], harmful, target=clean_rate, max_new_tokens=6, detector=detector)
    assert stuck.needed is None and [n for n, _ in stuck.steps] == [1, 2]
    assert all(rate.rate == pytest.approx(clean_rate) for _, rate in stuck.steps)
    assert "even the top 2 features together" in stuck.summary()
    reached = features_needed(model, sae, [DEAD, DEAD_TOO], harmful, target=min(1.0, clean_rate + 0.01), max_new_tokens=6, detector=detector)
    assert reached.needed == 1 and len(reached.steps) == 1
    assert doubling_sizes(8) == [1, 2, 4, 8] and doubling_sizes(5) == [1, 2, 4, 5] and doubling_sizes(1) == [1]


def test_feature_effects_count_looping_responses_as_neither_answered_nor_refused():
    from featsteer.features.effects import _complied, _Verdicts

    verdicts = _Verdicts(refused=(True, True, False, False), looping=(False, True, True, False))
    assert verdicts.answered() == [False, False, False, True]  # the jailbreak side: only the fluent answer counts
    assert verdicts.coherent_refusals() == [True, False, False, False]  # the induce side: only the refusal that does not loop
    assert verdicts.unanswered() == [True, True, True, False]
    assert _complied(verdicts).k == 1


def test_max_feature_activations_leave_out_tokens_outside_the_saes_domain(model, sae):
    """A splice passes tokens above the SAE's norm bound through unedited, so they must not set the scale of a clamp."""
    import copy

    bounded = copy.deepcopy(sae)
    rows = capture(model, PROBE, [HOOK], positions="all", progress=False).hook(HOOK)
    norms = rows.norm(dim=-1)
    bounded.cfg.metadata.featsteer_max_norm = float(norms.median())
    inside = encode_activations(bounded, rows[norms <= norms.median()]).double().amax(0).clamp_min(0.0)
    everywhere = encode_activations(bounded, rows).double().amax(0).clamp_min(0.0)
    assert not torch.equal(inside, everywhere)
    assert torch.equal(max_feature_activations(model, bounded, PROBE), inside)
    bounded.cfg.metadata.featsteer_max_norm = 0.0  # no token inside
    assert torch.equal(max_feature_activations(model, bounded, PROBE), torch.zeros(128, dtype=torch.float64))


def test_max_feature_activations_leave_out_the_untrained_head_a_splice_leaves_alone(model, sae):
    """Feature steering never edits the chat-template head before the SAE's featsteer_first_position, so a token there must
    not set the scale of a clamp either (`steer --multiple`, `feature_effects`, compare's SAE clamps); they counted it."""
    import copy

    from featsteer.compare import _harmful_max

    headed = copy.deepcopy(sae)
    headed.cfg.metadata.featsteer_first_position = 3
    acts = capture(model, PROBE, [HOOK], positions="all", progress=False)
    rows = acts.hook(HOOK)
    trained = encode_activations(headed, rows[acts.position >= 3]).double().amax(0).clamp_min(0.0)
    assert not torch.equal(trained, encode_activations(headed, rows).double().amax(0).clamp_min(0.0))
    assert torch.equal(max_feature_activations(model, headed, PROBE), trained)
    assert torch.equal(_harmful_max(headed, acts, HOOK), trained)
    last = capture(model, PROBE, [HOOK], positions="last", progress=False)  # rows counted from the end: after the head
    assert torch.equal(max_feature_activations(model, headed, PROBE, positions="last"), _harmful_max(sae, last, HOOK))


def test_features_needed_summary_claims_nothing_about_group_sizes_it_did_not_try():
    from featsteer.evaluation import refusal_rate
    from featsteer.features import FeaturesNeeded

    def rate(k):
        return refusal_rate([True] * k + [False] * (10 - k))

    skipped = FeaturesNeeded(HOOK, tuple(range(8)), 0.5, rate(9), ((4, rate(3)),), 4, "generation")
    assert skipped.summary() == ("the top 4 features together bring harmful refusal from 0.90 to 0.30 (< 0.50); "
                                 "groups of fewer than 4 features were not tried")
    later = FeaturesNeeded(HOOK, tuple(range(8)), 0.5, rate(9), ((4, rate(8)), (8, rate(3))), 8, "generation")
    assert "single" not in later.summary() and "the top 4 only to 0.80" in later.summary()
    doubled = FeaturesNeeded(HOOK, tuple(range(8)), 0.5, rate(9), ((1, rate(8)), (2, rate(3))), 2, "generation")
    assert doubled.summary().startswith("no single feature brings harmful refusal below 0.50 (top feature alone: 0.90 -> 0.80)")


def test_the_first_token_judge_refuses_edits_at_generated_tokens_only(model, sae, behaviour):
    """One forward pass of the prompt has no generated token: the edit would be measured as doing nothing."""
    harmful, harmless, _, _ = behaviour
    with pytest.raises(FeatsteerError, match="first_token judge .* edits nothing"):
        screen_features(model, sae, [PLANTED], harmful, harmless, clamp_value=-50.0, positions="generated")
    with pytest.raises(FeatsteerError, match="first_token judge .* edits nothing"):
        features_needed(model, sae, [PLANTED], harmful, judge="first_token", positions="generated")


def test_compare_layers_keeps_the_sae_methods_to_saes_at_those_layers(model, prompts, sae):
    """compare --layers kept the direction methods to the listed layers but the SAE methods ranked features at every SAE."""
    other_hook = "blocks.0.hook_resid_post"
    torch.manual_seed(1)
    other = StandardSAE(StandardSAEConfig(d_in=64, d_sae=32, metadata=SAEMetadata(hook_name=other_hook, model_name="tiny:llama"))).eval()
    saes = {HOOK: sae, other_hook: other}
    run = dict(methods=["sae_top1_abliteration"], saes=saes, sae_config=SaeMethodConfig(top_k=1), generation=GenerationConfig(max_new_tokens=2))
    comparison = compare(model, *prompts, direction_config=DirectionConfig(n_select=3, layers=(0,), keep_every_layer=True), **run)
    assert comparison.setup["sae"]["hooks"] == {other_hook: 32}
    assert comparison.results[0].details["sae_hook"] == other_hook
    with pytest.raises(FeatsteerError, match=r"--layers 3 leaves the SAE methods no SAE: the SAEs given are at blocks.1.hook_resid_post"):
        compare(model, *prompts, direction_config=DirectionConfig(n_select=3, layers=(3,), keep_every_layer=True), **{**run, "saes": {HOOK: sae}})


def test_every_induce_pick_generates_with_the_runs_batch_size(model, prompts, sae, monkeypatch):
    """`pick_induce_scale` and the SAE induce pick generated with the default 16 prompts a batch whatever the run's
    --batch-size, which in bfloat16 can change a greedy response and so a pick."""
    import featsteer.compare as cmp

    seen = []
    evaluate = cmp.evaluate_set

    def recording(model, prompts, name, gen, *args, **kwargs):
        seen.append((name, gen.batch_size))
        return evaluate(model, prompts, name, gen, *args, **kwargs)

    monkeypatch.setattr(cmp, "evaluate_set", recording)
    harmful, harmless = (split(p, 0.25)[0] for p in prompts)
    config = SaeMethodConfig(top_ks=(1, 2), induce_multiples=(0.5, 1.0))
    context = CompareContext(model, harmful, harmless, DirectionConfig(n_select=3, batch_size=5), saes={HOOK: sae}, sae_config=config,
                             steering_config=cmp.SteeringMethodConfig(ace_induce_alphas=(0.5, 1.0)))
    for name in ("dim_actadd_induce", "dim_ace_induce", "sae_topk_induce"):
        method_context(context, name)
    picks = [(name, size) for name, size in seen if name in ("induce-scale", "sae-validation")]
    assert {name for name, _ in picks} == {"induce-scale", "sae-validation"} and {size for _, size in picks} == {5}
