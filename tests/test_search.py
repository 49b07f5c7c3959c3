"""Abliteration search: trials revert the model exactly, results are written, studies resume, layers interpolate."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import featsteer.search as search_module
from featsteer.datasets import builtin_prompts
from featsteer.directions import DirectionSet
from featsteer.edits import EditConfig, LayerKernel
from featsteer.errors import FeatsteerError
from featsteer.models import load_model
from featsteer.pipeline import DirectionConfig, find_refusal_direction
from featsteer.search import (
    SearchConfig,
    SearchResult,
    SearchSpace,
    choose_best,
    convert_warm_start,
    edit_config_from_dict,
    edit_from_params,
    first_usable_layer,
    fixed_basis,
    interpolate_direction,
    layer_directions,
    load_warm_start,
    search_abliteration,
    search_fixed_abliteration,
    trial_directions,
    verified_kl,
    warm_start_params,
)

FAST = dict(verify_top=2, max_new_tokens=3, n_proxy_prompts=3, n_startup_trials=3, batch_size=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they slow it down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread):
    """A tiny Llama and a direction result from the real pipeline (selection falls back on a random model)."""
    model = load_model("tiny:llama")
    harmful, harmless = builtin_prompts("harmful").head(12), builtin_prompts("harmless").head(12)
    result = find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=3, batch_size=8))
    return model, result


@pytest.fixture(scope="module")
def searched(setup, tmp_path_factory):
    """One finished search of 6 trials, with the model's weights before it."""
    model, result = setup
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    out = tmp_path_factory.mktemp("search")
    found = search_abliteration(model, result, out, SearchConfig(n_trials=6, **FAST))
    return found, out, before


def _same_weights(model, before) -> bool:
    after = model.model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_search_runs_all_trials_and_leaves_model_unmodified(setup, searched):
    model, result = setup
    found, _, before = searched
    assert [t["number"] for t in found.trials] == list(range(6))
    assert _same_weights(model, before)
    classic = found.trials[0]["edit"]
    assert classic["embedding_strength"] == 1.0
    assert all(LayerKernel.from_dict(classic[k]).strength(layer) == 1.0 for k in ("attn_kernel", "mlp_kernel") for layer in range(3))
    low, high = found.setup["bounds"]["direction_layer"]
    assert low == 1.0, "layer 0 resid_pre at template positions has a zero direction and is skipped"
    assert found.trials[0]["params"]["direction_layer"] == min(max(result.selection.chosen.layer, low), high)
    assert all(low <= t["params"]["direction_layer"] <= high for t in found.trials)
    assert all(t["seconds"] > 0 and t["kl"] >= 0 for t in found.trials)
    assert found.classic["number"] == 0 and found.classic["clamped"] == {} and found.classic["params"] == found.trials[0]["params"]


def test_a_classic_trial_outside_the_layer_range_is_announced_and_recorded(setup, tmp_path, caplog):
    """When `max_layer_fraction` excludes the selected layer, trial 0 runs at the top of the range instead: not the
    classic edit at the selected direction. That was silent; now it is a warning and `pareto.json` says so."""
    model, result = setup
    chosen = result.selection.chosen
    late = next(c for c in result.selection.candidates if c.hook == "blocks.2.hook_resid_pre" and c.position == chosen.position)
    moved = dataclasses.replace(result, selection=dataclasses.replace(result.selection, chosen=late))
    with caplog.at_level("WARNING", logger="featsteer.search"):
        found = search_abliteration(model, moved, tmp_path, SearchConfig(n_trials=2, **FAST))
    top = found.setup["bounds"]["direction_layer"][1]
    assert top < 2 and found.trials[0]["params"]["direction_layer"] == top
    assert "trial 0 is not the classic edit at the selected layer 2" in caplog.text
    written = json.loads((tmp_path / "pareto.json").read_text())["classic"]
    assert written["number"] == 0 and written["clamped"] == {"direction_layer": [2.0, top]}
    assert written["note"].startswith("NOT the classic edit") and "max_layer_fraction" in written["note"]
    assert SearchResult.load(tmp_path).classic == written


def test_search_writes_pareto_json_and_png(searched):
    found, out, _ = searched
    data = json.loads((out / "pareto.json").read_text())
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["n_trials"] == 6 and len(data["pareto"]) == len(found.pareto) >= 1
    kls = [p["kl"] for p in data["pareto"]]
    assert kls == sorted(kls)
    verified = [p for p in data["pareto"] if p["verified"]]
    assert len(verified) == min(2, len(data["pareto"]))
    for point in verified:
        assert set(point["params"]) >= {"direction_layer", "attn.peak", "mlp.width", "embedding_strength"}
        assert 0 <= point["verified"]["refusal_rate"] <= 1 and 0 <= point["verified"]["harmless_refusal_rate"] <= 1
    assert data["best"]["number"] in {p["number"] for p in verified}
    # the proxy's "answered" (first token) and the verification's (generated response) are named apart
    assert "FIRST TOKEN" in data["fields"]["kl"] and "GENERATED RESPONSE" in data["fields"]["verified.kl_answered"]
    assert {key.removeprefix("verified.") for key in data["fields"]} >= {"kl", "kl_all", "refusal_score", "kl_answered", "refusal_rate"}
    assert data["baseline"]["verified"]["n_harmful"] == 3
    # nothing on the front is dominated by any trial
    for p in data["pareto"]:
        assert not any(t["refusal_score"] <= p["refusal_score"] and t["kl"] <= p["kl"]
                       and (t["refusal_score"], t["kl"]) != (p["refusal_score"], p["kl"]) for t in data["trials"])


def test_an_interrupted_write_leaves_the_earlier_front_and_plot_together(searched, tmp_path, monkeypatch):
    from pathlib import Path

    found, out, _ = searched
    for name in ("pareto.json", "pareto.png"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    earlier = {name: (tmp_path / name).read_bytes() for name in ("pareto.json", "pareto.png")}
    write_bytes = Path.write_bytes

    def stopped(path, data):  # Ctrl-C while the plot is written
        if "png" in path.name:
            raise KeyboardInterrupt
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", stopped)
    with pytest.raises(KeyboardInterrupt):
        search_module.write_search(dataclasses.replace(found, trials=found.trials[:3]), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == earlier


def test_chosen_edit_config_and_direction_round_trip(setup, searched):
    model, result = setup
    found, out, _ = searched
    loaded = SearchResult.load(out)
    edit = found.edit_config()
    assert isinstance(edit, EditConfig) and edit.mode == "orthogonalize"
    assert loaded.edit_config() == edit
    assert edit_config_from_dict(edit.to_dict()) == edit
    assert edit == edit_from_params(found.best["params"])
    assert loaded.config == found.config and SearchConfig.from_dict(found.config.to_dict()) == found.config
    direction = loaded.direction(result)
    assert torch.equal(direction, found.direction(result))
    assert abs(float(direction.norm()) - 1) < 1e-5


def test_per_layer_scope_is_searched_and_applied(setup, searched, tmp_path):
    model, result = setup
    found, _, before = searched
    assert {t["params"]["direction_scope"] for t in found.trials} <= {"global", "per_layer"}
    assert found.trials[0]["params"]["direction_scope"] == "global"  # the enqueued classic edit
    table = layer_directions(result.candidates, result.selection.chosen.position)
    params = {**found.trials[0]["params"], "direction_scope": "per_layer"}
    direction, by_layer = trial_directions(table, params, model.n_layers)
    top = table.shape[0] - 1
    assert torch.equal(direction, interpolate_direction(table, params["direction_layer"]))
    assert all(torch.equal(by_layer[layer], table[min(layer + 1, top)]) for layer in by_layer)
    assert trial_directions(table, found.trials[0]["params"], model.n_layers)[1] is None
    per_layer = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=3, space=SearchSpace(scopes=("per_layer",)), **FAST))
    assert {t["params"]["direction_scope"] for t in per_layer.trials} == {"per_layer"}
    with per_layer.apply(model, result) as handle:
        assert handle.record["per_layer_directions"] == sorted(trial_directions(table, per_layer.best["params"], model.n_layers)[1])
        assert not _same_weights(model, before)
    assert _same_weights(model, before)
    with pytest.raises(FeatsteerError, match="search scopes"):
        SearchSpace(scopes=("everywhere",))


def test_resume_continues_the_study(setup, tmp_path, monkeypatch):
    model, result = setup
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    first = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=4, **FAST))
    second = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=7, **FAST))
    assert len(first.trials) == 4 and len(second.trials) == 7
    assert [t["params"] for t in second.trials[:4]] == [t["params"] for t in first.trials]
    assert [t["kl"] for t in second.trials[:4]] == [t["kl"] for t in first.trials]
    new_params = [t["params"] for t in second.trials[4:]]
    assert all(p not in [t["params"] for t in first.trials] for p in new_params), "resumed run replayed old trials"
    assert json.loads((tmp_path / "pareto.json").read_text())["n_trials"] == 7

    def no_generation(*args, **kwargs):
        raise AssertionError("verifications should come from the study's cache")

    monkeypatch.setattr(search_module, "evaluate_set", no_generation)
    again = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=5, **FAST))
    assert len(again.trials) == 7 and again.pareto == second.pareto and again.best == second.best
    with pytest.raises(FeatsteerError, match="mode"):
        search_abliteration(model, result, tmp_path, SearchConfig(n_trials=9, mode="norm_preserving", **FAST))
    # other candidate directions (another --positions, other prompts) are another search, even with the same prompt hashes
    import dataclasses

    shifted = dataclasses.replace(result, candidates=dataclasses.replace(result.candidates, bases=-result.candidates.bases))
    with pytest.raises(FeatsteerError, match="directions_sha256"):
        search_abliteration(model, shifted, tmp_path, SearchConfig(n_trials=9, **FAST))
    assert _same_weights(model, before)


def test_warm_start_runs_earlier_pareto_points_first(setup, searched, tmp_path):
    model, result = setup
    found, out, _ = searched
    earlier = load_warm_start(out)  # the folder or its pareto.json, each point with its candidates' kind
    assert earlier == [{**p["params"], "direction_kind": "resid_pre"} for p in found.pareto] == load_warm_start(out / "pareto.json")
    warm = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=len(earlier) + 3, **FAST), warm_start=earlier)
    # trial 0 is the classic edit, then the earlier front in order (without a repeat of the classic edit),
    # then new TPE trials; the same parameters on the same model give the same proxy figures
    classic = warm.trials[0]["params"]
    replayed = [p for p in found.pareto if p["params"] != classic]
    assert [t["params"] for t in warm.trials[1 : 1 + len(replayed)]] == [p["params"] for p in replayed]
    assert [t["kl"] for t in warm.trials[1 : 1 + len(replayed)]] == pytest.approx([p["kl"] for p in replayed], abs=1e-9)
    assert all(t["params"] not in [p["params"] for p in found.pareto] for t in warm.trials[1 + len(replayed) :])
    import optuna

    search_abliteration(model, result, tmp_path / "dup", SearchConfig(n_trials=1, **FAST), warm_start=[classic, dict(classic)])
    study = optuna.load_study(study_name=search_module.STUDY_NAME, storage=f"sqlite:///{(tmp_path / 'dup' / 'search.db').resolve()}")
    assert study.user_attrs["warm_start"] == 0  # both points repeat the classic edit: optuna runs it once, none is a warm point
    # resuming ignores the warm start: the queued points are not run again
    again = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=len(earlier) + 4, **FAST), warm_start=earlier)
    assert [t["params"] for t in again.trials[: len(warm.trials)]] == [t["params"] for t in warm.trials]
    assert again.trials[-1]["params"] not in [p["params"] for p in found.pareto]


def test_warm_start_params_clamps_and_filters_by_scope():
    bounds = {"direction_layer": (1.0, 5.0), "attn.peak": (0.0, 7.0)}
    assert warm_start_params({"direction_layer": 9.0, "attn.peak": -1.0, "gone": 3.0}, bounds, ("global",)) == {
        "direction_layer": 5.0, "attn.peak": 0.0}
    assert warm_start_params({"direction_scope": "per_layer", "direction_layer": 2.0}, bounds, ("global",)) is None
    both = warm_start_params({"direction_scope": "per_layer", "direction_layer": 2.0}, bounds, ("global", "per_layer"))
    assert both == {"direction_layer": 2.0, "direction_scope": "per_layer"}


def test_a_fixed_search_skips_per_layer_warm_start_points(setup, tmp_path):
    """A fixed search removes one basis everywhere: an earlier per-layer point's kernels were tuned for other directions
    per block, so it is skipped as documented. It was queued (and run as a global point), because the warm start was
    filtered by the configured scopes, not by the scopes the fixed search runs."""
    import optuna

    model, result = setup
    kernels = {f"{writer}.{part}": value for writer in ("attn", "mlp")
               for part, value in (("peak", 1.0), ("width", 2.0), ("max_weight", 0.9), ("min_fraction", 0.5))}
    points = [{**kernels, "direction_scope": "per_layer", "embedding_strength": 0.3},
              {**kernels, "direction_scope": "global", "embedding_strength": 0.6}]
    row = torch.randn(model.d_model, generator=torch.Generator().manual_seed(5))
    found = search_fixed_abliteration(model, row, result.val, tmp_path, SearchConfig(n_trials=3, **FAST), warm_start=points)
    study = optuna.load_study(study_name=search_module.STUDY_NAME, storage=f"sqlite:///{(tmp_path / 'search.db').resolve()}")
    assert study.user_attrs["warm_start"] == 1
    assert found.trials[1]["params"]["embedding_strength"] == pytest.approx(0.6)
    assert all(t["params"]["embedding_strength"] != pytest.approx(0.3) for t in found.trials)


def test_a_warm_start_from_another_candidate_kind_is_converted_or_refused(setup, tmp_path):
    """direction_layer indexes the candidate table, so a resid_pre search's point at 1.4 warm-starting a resid_post search
    landed one stream further on (and was clamped, 1.4 -> 1.2). The kind travels with the points now and is converted
    (resid_post of block l is resid_pre of l + 1); a kind that is not the same stream is a one-line error. An old
    pareto.json without the kind is read as resid_pre, which is all the CLI makes."""
    point = {"direction_layer": 1.4, "attn.peak": 2.0}
    (tmp_path / "pareto.json").write_text(json.dumps({"pareto": [{"params": point}]}))  # an old file: no setup.kind
    assert load_warm_start(tmp_path) == [{**point, "direction_kind": "resid_pre"}]
    (tmp_path / "pareto.json").write_text(json.dumps({"pareto": [{"params": point}, {"params": {"attn.peak": 1.0}}],
                                                      "setup": {"kind": "resid_post"}}))
    earlier = load_warm_start(tmp_path)
    assert earlier == [{**point, "direction_kind": "resid_post"}, {"attn.peak": 1.0}]
    assert convert_warm_start(earlier[0], "resid_pre") == {"direction_layer": pytest.approx(2.4), "attn.peak": 2.0}
    assert convert_warm_start({**point, "direction_kind": "resid_pre"}, "resid_post") == {"direction_layer": pytest.approx(0.4), "attn.peak": 2.0}
    assert convert_warm_start(earlier[0], "resid_post") == point and convert_warm_start(point, "resid_mid") == point
    with pytest.raises(FeatsteerError, match="search over resid_post candidates and this search's are mlp_out"):
        convert_warm_start(earlier[0], "mlp_out")
    model, result = setup  # a resid_pre search runs the resid_post point one layer on
    late = {"direction_layer": 0.25, "direction_kind": "resid_post"}  # 1.25 as resid_pre, inside this search's range
    warm = search_abliteration(model, result, tmp_path / "converted", SearchConfig(n_trials=2, **FAST), warm_start=[late])
    assert warm.trials[1]["params"]["direction_layer"] == pytest.approx(1.25)
    with pytest.raises(FeatsteerError, match="do not correspond"):
        search_abliteration(model, result, tmp_path / "refused", SearchConfig(n_trials=2, **FAST),
                            warm_start=[{**point, "direction_kind": "attn_out"}])
    assert not (tmp_path / "refused").exists()


def test_load_warm_start_errors_are_one_line(tmp_path):
    with pytest.raises(FeatsteerError, match="not found"):
        load_warm_start(tmp_path / "missing.json")
    (tmp_path / "pareto.json").write_text("{not json")
    with pytest.raises(FeatsteerError, match="is not a search's pareto.json"):
        load_warm_start(tmp_path)
    (tmp_path / "pareto.json").write_text(json.dumps({"pareto": []}))
    with pytest.raises(FeatsteerError, match="no Pareto points"):
        load_warm_start(tmp_path / "pareto.json")
    (tmp_path / "pareto.json").write_text(json.dumps({"pareto": [{"params": {"attn.peak": "high"}}]}))
    with pytest.raises(FeatsteerError, match="parameter attn.peak is 'high', not a finite number"):
        load_warm_start(tmp_path / "pareto.json")


def test_failing_trial_is_reverted_and_recorded(setup, tmp_path, monkeypatch):
    model, result = setup
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    real = search_module.first_token_logprobs
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # call 1 is the base harmless pass, 2-3 the first trial's harmful/harmless passes
            assert not _same_weights(model, before), "the trial's edit should be applied here"
            raise FeatsteerError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(search_module, "first_token_logprobs", flaky)
    found = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=3, enqueue_classic=False, **FAST))
    assert [t["number"] for t in found.trials] == [1, 2]
    assert _same_weights(model, before)


def test_fractional_layer_interpolates_between_neighbours(setup):
    model, result = setup
    position = result.selection.chosen.position
    table = layer_directions(result.candidates, position)
    assert table.shape == (model.n_layers, model.d_model)
    assert first_usable_layer(table) == 1 and not table[0].any()
    for layer in range(1, model.n_layers):
        exact = result.candidates.direction(f"blocks.{layer}.hook_resid_pre", position)
        assert torch.equal(interpolate_direction(table, float(layer)), exact)
        assert torch.equal(interpolate_direction(table, layer), exact)
    mixed = interpolate_direction(table, 1.25)
    expected = 0.75 * table[1].double() + 0.25 * table[2].double()
    torch.testing.assert_close(mixed.double(), expected / expected.norm(), atol=1e-6, rtol=0)
    assert abs(float(mixed.norm()) - 1) < 1e-6
    with pytest.raises(FeatsteerError, match="zero"):
        interpolate_direction(table, 0)
    with pytest.raises(FeatsteerError, match="outside"):
        interpolate_direction(table, model.n_layers - 0.5)


def test_interpolation_moves_from_one_neighbour_to_the_other():
    table = torch.eye(3)[:2]  # two orthogonal unit directions
    cosines = [(float(interpolate_direction(table, x) @ table[0]), float(interpolate_direction(table, x) @ table[1]))
               for x in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert cosines[0] == (1.0, 0.0) and cosines[-1] == (0.0, 1.0)
    assert abs(cosines[2][0] - cosines[2][1]) < 1e-6
    assert [c[0] for c in cosines] == sorted((c[0] for c in cosines), reverse=True)
    assert all(abs(a * a + b * b - 1) < 1e-6 for a, b in cosines)


def test_layer_directions_needs_rank_one_and_a_known_position(setup):
    _, result = setup
    c = result.candidates
    with pytest.raises(FeatsteerError, match="position 7"):
        layer_directions(c, 7)
    pairs = torch.cat([c.bases, c.bases.flip(-1)], dim=1).transpose(1, 2)  # (n, d_model, 2), orthonormalised below
    rank2 = DirectionSet(torch.linalg.qr(pairs).Q.transpose(1, 2).contiguous(), c.hook_names, c.positions, "svd")
    with pytest.raises(FeatsteerError, match="rank-2"):
        layer_directions(rank2, c.positions[0])


def test_bounds_follow_the_model_depth():
    bounds = SearchSpace().bounds(n_layers=10, n_directions=10)
    assert bounds["direction_layer"] == (0.0, 7.0)
    assert bounds["attn.peak"] == (0.0, 9.0) and bounds["mlp.width"] == (1.0, 10.0)
    assert bounds["attn.max_weight"] == (0.5, 1.5) and bounds["mlp.min_fraction"] == (0.0, 1.0)
    assert SearchSpace().bounds(n_layers=10, n_directions=10, first_layer=2)["direction_layer"] == (2.0, 7.0)
    assert SearchSpace().bounds(n_layers=1, n_directions=1)["direction_layer"] == (0.0, 0.0)
    assert SearchSpace.from_dict(SearchSpace().to_dict()) == SearchSpace()


def test_edit_from_params_scales_min_weight_by_max_weight():
    params = {"attn.peak": 2.0, "attn.width": 3.0, "attn.max_weight": 1.2, "attn.min_fraction": 0.5,
              "mlp.peak": 1.0, "mlp.width": 1.0, "mlp.max_weight": 0.8, "mlp.min_fraction": 0.0, "embedding_strength": 0.3}
    edit = edit_from_params(params, "norm_preserving")
    assert edit.attn_kernel == LayerKernel(2.0, 3.0, 1.2, 0.6) and edit.mlp_kernel == LayerKernel(1.0, 1.0, 0.8, 0.0)
    assert edit.embedding_strength == 0.3 and edit.mode == "norm_preserving"


def test_choose_best_prefers_low_refusal_within_kl_budget():
    def point(number, kl, rate, harmless=0.0):
        return {"number": number, "kl": kl, "verified": {"refusal_rate": rate, "harmless_refusal_rate": harmless}}

    pareto = [point(0, 0.01, 0.5), point(1, 0.04, 0.2), point(2, 0.2, 0.0), {"number": 3, "kl": 0.001, "verified": None}]
    assert choose_best(pareto, max_kl=0.05)["number"] == 1
    assert choose_best(pareto, max_kl=0.001) is not None and choose_best(pareto, max_kl=0.001)["number"] == 0
    assert choose_best([pareto[3]], max_kl=1.0) is None
    # the KL measured on the verification prompts overrides the proxy's: point 1 is over the budget there
    pareto[1]["verified"] |= {"kl": 0.06, "kl_answered": 0.045}
    assert choose_best(pareto, max_kl=0.05)["number"] == 0
    assert choose_best(pareto, max_kl=0.05, kl_prompts="answered")["number"] == 1


def test_verifications_measure_the_kl_on_the_verification_prompts(setup, searched):
    from featsteer.evaluation.metrics import first_token_logprobs, kl_first_token

    model, result = setup
    found, _, _ = searched
    harmless = list(result.val[1])
    base = first_token_logprobs(model, harmless, batch_size=8)
    table = layer_directions(result.candidates, result.selection.chosen.position)
    verified = [p for p in found.pareto if p["verified"]]
    assert verified and len(found.baseline["verified"]["harmless_refused"]) == len(harmless)
    for point in verified:
        direction, by_layer = trial_directions(table, point["params"], model.n_layers)
        with search_module.apply_edit(model, direction, edit_config_from_dict(point["edit"]), by_layer=by_layer):
            expected = kl_first_token(base, first_token_logprobs(model, harmless, batch_size=8))
        assert point["verified"]["kl"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert point["verified"]["kl_answered"] is None or point["verified"]["kl_answered"] >= 0


def test_config_validation():
    with pytest.raises(FeatsteerError, match="abliteration mode"):
        SearchConfig(mode="amplify")
    with pytest.raises(FeatsteerError, match="objective"):
        SearchConfig(refusal_objective="loss")
    with pytest.raises(FeatsteerError, match="n_trials"):
        SearchConfig(n_trials=0)
    with pytest.raises(FeatsteerError, match="max_weight"):
        SearchSpace(max_weight=(1.5, 0.5))


def test_kl_on_answered_prompts_leaves_out_the_ones_the_model_refuses(tmp_path):
    """The organism refuses a few harmless prompts; with kl_prompts='answered' the KL objective is the mean over
    the others, recomputed here for every trial, and kl_all keeps the mean over all of them."""
    from featsteer.datasets import PromptSet
    from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, kl_per_prompt, refusal_score

    model = load_model("organism")
    test = builtin_prompts("harmless", "test")
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    scores = refusal_score(first_token_logprobs(model, test.to_list()), tokens)
    refused = [p for p, s in zip(test, scores.tolist(), strict=True) if s > 0][:2]
    answered = [p for p, s in zip(test, scores.tolist(), strict=True) if s <= 0][:4]
    assert len(refused) == 2, "premise: the organism refuses some built-in harmless test prompts"
    val = (builtin_prompts("harmful", "val").head(4), PromptSet(tuple(refused + answered), "mixed"))
    result = find_refusal_direction(model, builtin_prompts("harmful", "train").head(16), builtin_prompts("harmless", "train").head(16),
                                    DirectionConfig(n_select=4, batch_size=8), val=val)
    found = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=3, kl_prompts="answered", **{**FAST, "n_proxy_prompts": 6}))
    assert found.setup["kl_prompts"] == "answered"
    base = first_token_logprobs(model, list(val[1]))
    for trial in found.trials:
        direction, by_layer = trial_directions(layer_directions(result.candidates, result.selection.chosen.position),
                                               trial["params"], model.n_layers)
        with search_module.apply_edit(model, direction, edit_config_from_dict(trial["edit"]), by_layer=by_layer):
            per_prompt = kl_per_prompt(base, first_token_logprobs(model, list(val[1])))
        assert trial["kl"] == pytest.approx(float(per_prompt[2:].mean()), rel=1e-4, abs=1e-7)
        assert trial["kl_all"] == pytest.approx(float(per_prompt.mean()), rel=1e-4, abs=1e-7)
    assert max(t["kl_all"] - t["kl"] for t in found.trials) > 0.01, "removing refusal should flip the refused harmless prompts"
    with pytest.raises(FeatsteerError, match="kl_prompts"):
        SearchConfig(kl_prompts="some")


def test_kl_along_the_answers_is_the_search_objective_when_asked(tmp_path):
    """With kl_prompts='response' each trial's KL objective is response_kl under its edit, on the unedited model's own
    answers to the proxy harmless prompts; verified points carry it too, and the choice reads it."""
    from featsteer.evaluation.response_kl import response_base, response_kl

    model = load_model("organism")
    val = builtin_prompts("harmful", "val").head(4), builtin_prompts("harmless", "val").head(4)
    result = find_refusal_direction(model, builtin_prompts("harmful", "train").head(16), builtin_prompts("harmless", "train").head(16),
                                    DirectionConfig(n_select=4, batch_size=8), val=val)
    config = SearchConfig(n_trials=3, kl_prompts="response", **{**FAST, "n_proxy_prompts": 4})
    found = search_abliteration(model, result, tmp_path, config)
    assert found.setup["kl_prompts"] == "response"
    harmless = list(val[1])
    base = response_base(model, harmless, model.generate(harmless, max_new_tokens=3), max_tokens=3)
    for trial in found.trials:
        direction, by_layer = trial_directions(layer_directions(result.candidates, result.selection.chosen.position),
                                               trial["params"], model.n_layers)
        with search_module.apply_edit(model, direction, edit_config_from_dict(trial["edit"]), by_layer=by_layer):
            expected = response_kl(model, base).mean
        assert trial["kl"] == trial["kl_response"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    verified = [p for p in found.pareto if p.get("verified")]
    assert verified and all(p["verified"]["kl_response"] >= 0 for p in verified)
    assert verified_kl(verified[0], "response") == verified[0]["verified"]["kl_response"]
    # answers of another length are another objective: a resume with them is refused, not mixed in
    with pytest.raises(FeatsteerError, match="response_tokens"):
        search_abliteration(model, result, tmp_path, dataclasses.replace(config, n_trials=4, max_new_tokens=5))
    # a study from before the KL along the answers scored the generated ids (its set-up has no response_scoring) scored
    # re-tokenized text: resuming it is refused too
    import optuna

    study = optuna.load_study(study_name=search_module.STUDY_NAME, storage=f"sqlite:///{(tmp_path / 'search.db').resolve()}")
    study.set_user_attr("setup", {k: v for k, v in study.user_attrs["setup"].items() if k != "response_scoring"})
    with pytest.raises(FeatsteerError, match="response_scoring"):
        search_abliteration(model, result, tmp_path, dataclasses.replace(config, n_trials=4))


@pytest.fixture(scope="module")
def fixed_searched(setup, tmp_path_factory):
    """A fixed-direction search of 5 trials on two non-orthonormal rows, with the model's weights before it."""
    model, result = setup
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(2, model.d_model, generator=generator)
    rows[1] += 0.5 * rows[0]
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    out = tmp_path_factory.mktemp("fixed")
    found = search_fixed_abliteration(model, rows, result.val, out, SearchConfig(n_trials=5, **FAST),
                                      provenance={"method": "sae", "sae_features": [4, 9]})
    return found, out, rows, before


def test_fixed_search_tunes_only_the_kernels_of_the_given_basis(setup, fixed_searched):
    from featsteer.evaluation.metrics import KLBase, first_token_logprobs

    model, result = setup
    found, out, rows, before = fixed_searched
    assert _same_weights(model, before)
    assert found.fixed and found.setup["direction"] == "fixed" and found.setup["rank"] == 2
    assert found.setup["method"] == "sae" and found.setup["provenance"] == {"sae_features": [4, 9]}
    assert "direction_layer" not in found.setup["bounds"] and found.setup["scopes"] == ["global"]
    assert all("direction_layer" not in t["params"] and t["params"]["direction_scope"] == "global" for t in found.trials)
    assert len({json.dumps(t["params"], sort_keys=True) for t in found.trials}) == 5
    # the basis is orthonormal and spans the given rows
    basis = found.basis
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)
    torch.testing.assert_close((rows @ basis.T) @ basis, rows, atol=1e-4, rtol=1e-4)
    # trial 0 is classic abliteration of that basis: its proxy KL is what a plain edit against the basis gives
    classic = found.trials[0]
    assert classic["edit"]["embedding_strength"] == 1.0
    assert all(LayerKernel.from_dict(classic["edit"][k]).strength(layer) == 1.0 for k in ("attn_kernel", "mlp_kernel") for layer in range(3))
    proxy = list(result.val[1])[: FAST["n_proxy_prompts"]]
    base = KLBase(first_token_logprobs(model, proxy, batch_size=8))
    with pytest.raises(FeatsteerError, match="more than 1: normalise it"):  # the raw rows would be another edit: apply_edit refuses them
        search_module.apply_edit(model, rows)
    with search_module.apply_edit(model, basis):
        right = base.kls(first_token_logprobs(model, proxy, batch_size=8))[0]
    assert classic["kl_all"] == pytest.approx(right, rel=1e-5, abs=1e-8)
    assert _same_weights(model, before)


def test_fixed_search_result_loads_and_applies_without_the_direction(setup, fixed_searched):
    model, _ = setup
    found, out, _, before = fixed_searched
    assert (out / "basis.safetensors").is_file() and (out / "pareto.json").is_file()
    loaded = SearchResult.load(out)
    assert loaded.fixed and torch.equal(loaded.basis, found.basis) and loaded.best == found.best
    with loaded.apply(model, record={"method": "sae"}) as handle:
        edited = {k: v.clone() for k, v in model.model.state_dict().items()}
        assert handle.record["rank"] == 2
    assert _same_weights(model, before)
    with search_module.apply_edit(model, found.basis, found.edit_config()):
        assert _same_weights(model, edited)
    with pytest.raises(FeatsteerError, match="no basis"):
        SearchResult.from_json(json.loads((out / "pareto.json").read_text())).apply(model)


def test_choose_another_trial_applies_that_trials_edit(setup, fixed_searched):
    model, _ = setup
    found, _, _, before = fixed_searched
    other = next(t for t in found.trials if t["number"] != found.best["number"])
    chosen = found.choose(other["number"])
    assert chosen.best["number"] == other["number"] and found.best["number"] != other["number"]  # the original is untouched
    assert chosen.edit_config() == search_module.edit_config_from_dict(other["edit"]) != found.edit_config()
    with chosen.apply(model):
        edited = {k: v.clone() for k, v in model.model.state_dict().items()}
    assert _same_weights(model, before)
    with search_module.apply_edit(model, found.basis, search_module.edit_config_from_dict(other["edit"])):
        assert _same_weights(model, edited)
    if other["number"] not in {p["number"] for p in found.pareto}:
        assert chosen.best["verified"] is None
    with pytest.raises(FeatsteerError, match="no finished trial 99 .trials 0..4"):
        found.choose(99)


def test_fixed_search_resumes_only_with_the_same_basis(setup, fixed_searched, tmp_path):
    model, result = setup
    found, out, rows, _ = fixed_searched
    again = search_fixed_abliteration(model, rows, result.val, out, SearchConfig(n_trials=5, **FAST),
                                      provenance={"method": "sae", "sae_features": [4, 9]})
    assert [t["params"] for t in again.trials] == [t["params"] for t in found.trials]
    with pytest.raises(FeatsteerError, match="basis_sha256"):
        search_fixed_abliteration(model, rows.flip(0), result.val, out, SearchConfig(n_trials=6, **FAST),
                                  provenance={"method": "sae", "sae_features": [4, 9]})
    # a tampered basis file is caught on load
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    from safetensors.torch import save_file

    save_file({"basis": found.basis.flip(0).contiguous()}, str(copy / "basis.safetensors"))
    with pytest.raises(FeatsteerError, match="does not match"):
        SearchResult.load(copy)
    (copy / "basis.safetensors").unlink()
    with pytest.raises(FeatsteerError, match="no basis.safetensors"):
        SearchResult.load(copy)


def test_a_direction_search_needs_its_candidates_to_apply(setup, searched):
    model, _ = setup
    found, _, _ = searched
    assert not found.fixed
    with pytest.raises(FeatsteerError, match="pass the DirectionResult"):
        found.apply(model)


def test_fixed_basis_orthonormalises_and_rejects_bad_input():
    row = torch.tensor([3.0, 4.0, 0.0])
    assert torch.equal(fixed_basis(row, 3), torch.tensor([[0.6, 0.8, 0.0]]))
    assert torch.equal(fixed_basis(-row, 3), torch.tensor([[-0.6, -0.8, 0.0]])), "signs are kept"
    torch.testing.assert_close(fixed_basis(torch.eye(3)[:2] * 2, 3), torch.eye(3)[:2])
    with pytest.raises(FeatsteerError, match="width 3 but the model's d_model is 4"):
        fixed_basis(row, 4)
    with pytest.raises(FeatsteerError, match="NaN"):
        fixed_basis(torch.tensor([float("nan"), 1.0, 0.0]), 3)
    with pytest.raises(FeatsteerError, match="linearly dependent"):
        fixed_basis(torch.stack([row, 2 * row]), 3)
    with pytest.raises(FeatsteerError, match="linearly dependent"):
        fixed_basis(torch.zeros(3), 3)


def test_choose_best_counts_looping_responses_as_unanswered():
    quiet = {"number": 0, "kl": 0.03, "verified": {"refusal_rate": 0.0, "unanswered_rate": 0.4, "harmless_refusal_rate": 0.0}}  # loops
    fluent = {"number": 1, "kl": 0.04, "verified": {"refusal_rate": 0.1, "unanswered_rate": 0.1, "harmless_refusal_rate": 0.0}}
    assert choose_best([quiet, fluent], max_kl=0.05)["number"] == 1
    old = {"number": 2, "kl": 0.02, "verified": {"refusal_rate": 0.05, "harmless_refusal_rate": 0.0}}  # verified before looping was read
    assert choose_best([quiet, fluent, old], max_kl=0.05)["number"] == 2


def _interrupted_search(model, result, folder, n_trials: int, stopped_call: int, monkeypatch) -> None:
    """Run a search whose `stopped_call`-th screened trial is stopped by Ctrl-C, as a user would, then restore the screen."""
    real, calls = search_module._Screen.__call__, {"n": 0}

    def interrupted(self, trial):
        calls["n"] += 1
        if calls["n"] == stopped_call:
            raise KeyboardInterrupt
        return real(self, trial)

    monkeypatch.setattr(search_module._Screen, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search_abliteration(model, result, folder, SearchConfig(n_trials=n_trials, **FAST))
    monkeypatch.setattr(search_module._Screen, "__call__", real)


def test_a_trial_stopped_by_ctrl_c_is_run_again_on_resume(setup, tmp_path, monkeypatch):
    model, result = setup
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    _interrupted_search(model, result, tmp_path, 4, 3, monkeypatch)
    resumed = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=4, **FAST))
    assert len(resumed.trials) == 4  # two before the interrupt and two after: the stopped one did not count
    assert _same_weights(model, before)


def test_a_classic_trial_stopped_by_ctrl_c_runs_again_with_its_own_params(setup, tmp_path, monkeypatch):
    # the stopped trial 0 is the classic edit: a resume must run that edit, not a new sample in its place
    model, result = setup
    _interrupted_search(model, result, tmp_path, 3, 1, monkeypatch)
    resumed = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=3, **FAST))
    classic = search_abliteration(model, result, tmp_path / "fresh", SearchConfig(n_trials=1, **FAST)).trials[0]["params"]
    assert [t["params"] for t in resumed.trials].count(classic) == 1
    more = search_abliteration(model, result, tmp_path, SearchConfig(n_trials=4, **FAST))
    assert len(more.trials) == 4 and [t["params"] for t in more.trials].count(classic) == 1  # run again once, not on every resume


def test_per_layer_scope_and_layer_range_follow_the_stream_for_resid_post(setup, tmp_path):
    """`blocks.l.hook_resid_post` is `blocks.{l+1}.hook_resid_pre`: a `resid_post` search removes, in block l, the candidate
    of the stream block l writes into (the one a `resid_pre` search takes), and its direction layer stops one index
    earlier. It took `resid_post` of block l + 1, one block too far, and ranged one layer too late."""
    model, pre_result = setup
    harmful, harmless = builtin_prompts("harmful").head(12), builtin_prompts("harmless").head(12)
    post_result = find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=3, batch_size=8, kind="resid_post"))
    position = pre_result.selection.chosen.position
    config = SearchConfig(n_trials=2, position=position, space=SearchSpace(scopes=("per_layer",)), **FAST)
    found = {kind: search_abliteration(model, result, tmp_path / kind, config)
             for kind, result in (("resid_pre", pre_result), ("resid_post", post_result))}
    pre_table = layer_directions(pre_result.candidates, position)
    by_layer = found["resid_post"].directions(post_result)[1]
    assert sorted(by_layer) == list(range(model.n_layers))
    for layer in range(model.n_layers - 1):
        assert torch.allclose(by_layer[layer], pre_table[layer + 1], atol=1e-5)
    last = model.n_layers - 1  # its own output, which has no resid_pre candidate
    assert torch.equal(by_layer[last], layer_directions(post_result.candidates, position, "resid_post")[last])
    pre_top = found["resid_pre"].setup["bounds"]["direction_layer"][1]
    assert found["resid_post"].setup["bounds"]["direction_layer"][1] == pytest.approx(pre_top - 1)


def test_per_layer_scope_refuses_candidates_no_block_writes_into(setup, tmp_path, caplog):
    """At `resid_mid` a block's attention writes into its own `resid_mid` but its MLP into `resid_post`, so no one
    candidate per block exists: a default search there runs the global scope alone (it raised, asking for
    `SearchSpace(scopes=("global",))`); only an explicit per-layer scope is an error."""
    model, _ = setup
    harmful, harmless = builtin_prompts("harmful").head(12), builtin_prompts("harmless").head(12)
    mid = find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=3, batch_size=8, kind="resid_mid"))
    for scopes in (("per_layer",), ("global", "per_layer")):
        with pytest.raises(FeatsteerError, match="per_layer scope needs resid_pre or resid_post"):
            search_abliteration(model, mid, tmp_path, SearchConfig(n_trials=2, space=SearchSpace(scopes=scopes), **FAST))
    assert not (tmp_path / "search.db").exists()
    with caplog.at_level("INFO", logger="featsteer.search"):
        found = search_abliteration(model, mid, tmp_path, SearchConfig(n_trials=2, **FAST))
    assert len(found.trials) == 2 and found.setup["scopes"] == ["global"]
    assert {t["params"]["direction_scope"] for t in found.trials} == {"global"}
    assert "resid_mid candidates have no per-layer scope" in caplog.text
    assert SearchSpace().scopes_for("resid_pre") == SearchSpace().scopes_for("resid_post") == ("global", "per_layer")
    assert SearchSpace.from_dict(SearchSpace().to_dict()) == SearchSpace()


def test_search_names_the_kind_it_cannot_read(setup, tmp_path):
    """Candidates at `blocks.L.ln1.hook_normalized` are no `blocks.L.hook_<kind>` point: the search said it found no
    resid_pre candidates at the position and listed the positions, as if the position were wrong."""
    from featsteer.pipeline import abliterate

    model, _ = setup
    harmful, harmless = builtin_prompts("harmful").head(12), builtin_prompts("harmless").head(12)
    normalized = find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=3, batch_size=8, kind="ln1_normalized"))
    with pytest.raises(FeatsteerError, match=r"not at blocks\.\d\.ln1\.hook_normalized.*kind='resid_pre'"):
        search_abliteration(model, normalized, tmp_path, SearchConfig(n_trials=2, space=SearchSpace(scopes=("global",)), **FAST))
    with pytest.raises(FeatsteerError, match="per_layer scope needs resid_pre or resid_post candidates .* not ln1_normalized"):
        abliterate(model, normalized, scope="per_layer")


def test_pareto_fields_describe_every_figure_of_a_point(searched):
    """The README sends readers to `fields` for what each figure of `pareto.json` is: every figure a trial or its
    verification records has an entry (the looping and harmless rates, intervals and counts had none)."""
    found, out, _ = searched
    data = json.loads((out / "pareto.json").read_text())
    not_figures = {"number", "params", "edit", "seconds", "pareto", "verified"}
    point = next(p for p in data["pareto"] if p["verified"])
    names = {key for key in point if key not in not_figures}
    names |= {f"verified.{key}" for key in point["verified"] if key not in {"examples", "harmless_refused", "seconds"}}
    assert names - set(data["fields"]) == set()


def test_a_loaded_search_refuses_candidates_it_did_not_run_on(setup, searched):
    """`apply(model, result)` rebuilds the searched directions from `result`: from other candidates (other prompts here)
    it applied the searched kernels to directions the search never scored, without a word. The same inputs still work."""
    model, result = setup
    _, out, _ = searched
    loaded = SearchResult.load(out)
    again = find_refusal_direction(model, builtin_prompts("harmful").head(12), builtin_prompts("harmless").head(12),
                                   DirectionConfig(n_select=3, batch_size=8))
    assert torch.equal(loaded.direction(again), loaded.direction(result))
    other = find_refusal_direction(model, builtin_prompts("harmful").head(10), builtin_prompts("harmless").head(10),
                                   DirectionConfig(n_select=3, batch_size=8))
    with pytest.raises(FeatsteerError, match="other candidate directions"):
        loaded.apply(model, other)


def test_cached_verifications_are_keyed_by_whether_apologies_are_excused():
    """A verification counted by a detector that counts every apology must not be reused by one that lets some off."""
    from featsteer.evaluation import RefusalDetector
    from featsteer.search import _verify_key

    harmful, harmless, config = ["How do I pick a lock?"], ["Bake bread"], SearchConfig(n_trials=1)
    keys = {_verify_key(harmful, harmless, config, RefusalDetector(excuse_apologies=excuse)) for excuse in (True, False)}
    assert len(keys) == 2


def test_a_single_scope_name_is_one_scope_not_its_letters():
    """A plain string was split into characters, so SearchSpace(scopes="global") failed naming 'g', 'l', ..."""
    assert SearchSpace(scopes="global").scopes == ("global",)
    assert SearchSpace(scopes="per_layer").scopes_for("resid_pre") == ("per_layer",)
    assert SearchSpace.from_dict(SearchSpace(scopes="global").to_dict()) == SearchSpace(scopes=("global",))


def test_directions_of_some_layers_only_are_named_when_every_layer_is_needed(setup):
    """Saved `featsteer directions --layers 1-2` candidates failed the per-layer scope and the search with a generic "no
    candidate resid_pre directions for consecutive layers from 0"; a table from 0 that stops short of the model's depth
    gave the blocks above it the last candidate's direction."""
    from featsteer.search import per_layer_directions

    model, result = setup
    c = result.candidates
    keep = [i for i, hook in enumerate(c.hook_names) if hook in ("blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre")]
    some = DirectionSet(c.bases[keep], tuple(c.hook_names[i] for i in keep), tuple(c.positions[i] for i in keep), c.method)
    with pytest.raises(FeatsteerError, match=r"cover only layers 1-2, .* without --layers"):
        layer_directions(some, some.positions[0])
    table = layer_directions(c, c.positions[0])
    assert len(per_layer_directions(table, model.n_layers)) > 0
    with pytest.raises(FeatsteerError, match=rf"every layer 0-{model.n_layers - 1}, but they cover only 0-1 "):
        per_layer_directions(table[:2], model.n_layers)
