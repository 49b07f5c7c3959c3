"""Direction methods on synthetic activation sets with a planted refusal direction."""

from __future__ import annotations

import pytest
import torch

from featsteer.activations import ActivationSet
from featsteer.directions import (
    DirectionSet,
    difference_in_means,
    find_directions,
    separability,
    weighted_basis,
)
from featsteer.errors import FeatsteerError

D = 32


def _set(vectors: torch.Tensor, label: str, hooks=("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")) -> ActivationSet:
    n = vectors.shape[0]
    acts = torch.stack([vectors, vectors * 0.5], 1)
    return ActivationSet(acts, tuple(hooks), torch.arange(n), torch.full((n,), -1), tuple(f"p{i}" for i in range(n)), label=label)


@pytest.fixture
def planted():
    g = torch.Generator().manual_seed(0)
    direction = torch.zeros(D)
    direction[3] = 1.0
    shared = torch.randn(D, generator=g) * 4  # a common offset both classes carry
    harmless = shared + torch.randn(200, D, generator=g)
    harmful = shared + torch.randn(200, D, generator=g) + 3.0 * direction
    return _set(harmful, "harmful"), _set(harmless, "harmless"), direction


@pytest.mark.parametrize("method", ["dim", "projected", "pca", "svd"])
def test_methods_recover_planted_direction(planted, method):
    harmful, harmless, direction = planted
    found = find_directions(harmful, harmless, method=method, rank=2)
    assert len(found) == 2 and found.method == method
    cosine = float(found.bases[0, 0] @ direction)
    assert cosine > 0.9, cosine
    norms = found.bases.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_svd_basis_orthonormal_with_ridge_weights(planted):
    harmful, harmless, _ = planted
    found = find_directions(harmful, harmless, method="svd", rank=3)
    basis = found.bases[0]
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    weights = found.scores["ridge_weights"][0]
    assert weights[0] > 0.9 and all(0 < w <= 1 for w in weights) and weights[0] >= weights[-1]
    scaled = weighted_basis(found, 0)
    torch.testing.assert_close(scaled.norm(dim=-1) ** 2, torch.tensor(weights, dtype=torch.float32), atol=1e-5, rtol=0)


def test_svd_rank_above_the_stream_width_names_the_width(planted):
    """The limit is the smaller of the prompts' count and the stream's width; the message called either 'prompts'."""
    harmful, harmless, _ = planted
    with pytest.raises(FeatsteerError, match=r"rank 40 is more than the SVD of 200 harmful prompts in 32 dimensions can give \(32\)"):
        find_directions(harmful, harmless, method="svd", rank=40)


def test_projected_dim_is_orthogonal_to_harmless_mean(planted):
    harmful, harmless, _ = planted
    found = find_directions(harmful, harmless, method="projected")
    mean = harmless.mean("blocks.0.hook_resid_pre").float()
    assert abs(float(found.direction("blocks.0.hook_resid_pre") @ mean)) < 1e-4


def test_separability_and_zero_difference(planted):
    harmful, harmless, direction = planted
    score = separability(direction, harmful.hook("blocks.0.hook_resid_pre"), harmless.hook("blocks.0.hook_resid_pre"),
                         harmful.hook("blocks.0.hook_resid_pre"), harmless.hook("blocks.0.hook_resid_pre"))
    assert score.accuracy > 0.9 and score.auroc > 0.95 and score.gap > 2
    same = difference_in_means(harmless, harmless)
    assert float(same.bases.abs().max()) == 0 and same.scores["mean_diff_norm"][0] == 0


def test_direction_set_round_trip(planted, tmp_path):
    harmful, harmless, _ = planted
    found = find_directions(harmful, harmless, method="svd", rank=2)
    found.save(tmp_path / "d")
    loaded = DirectionSet.load(tmp_path / "d")
    assert torch.equal(loaded.bases, found.bases) and loaded.scores == found.scores and loaded.hook_names == found.hook_names
    with pytest.raises(FeatsteerError, match="rank-2"):
        loaded.direction("blocks.0.hook_resid_pre")
    with pytest.raises(FeatsteerError, match="no direction"):
        loaded.basis("blocks.7.hook_resid_pre")
    with pytest.raises(FeatsteerError, match="directions.json missing"):
        DirectionSet.load(tmp_path)
    with pytest.raises(FeatsteerError, match="unknown direction method"):
        find_directions(harmful, harmless, method="magic")


@pytest.mark.parametrize("method", ["linear", "whitened"])
def test_probe_directions_are_direction_sets(planted, method):
    harmful, harmless, direction = planted
    found = find_directions(harmful, harmless, method=method)
    assert found.method == f"probe:{method}" and len(found) == 2
    assert float(found.bases[0, 0] @ direction) > 0.8
    assert all(a > 0.9 for a in found.scores["train_accuracy"])


@pytest.mark.parametrize(("method", "setting"), [("linear", "C_"), ("whitened", "shrinkage_")])
def test_probe_directions_record_the_class_projections_and_the_fitted_probe(planted, method, setting, tmp_path):
    # without the class means' projections `steer --mode set` refused a probe direction; without the chosen C or
    # shrinkage nobody could say which probe a saved direction came from
    harmful, harmless, _ = planted
    found = find_directions(harmful, harmless, method=method)
    for index, hook in enumerate(found.hook_names):
        direction = found.direction(hook).double()
        assert found.scores["harmful_projection"][index] == pytest.approx(float(harmful.mean(hook) @ direction))
        assert found.scores["harmless_projection"][index] == pytest.approx(float(harmless.mean(hook) @ direction))
        assert found.scores["harmful_projection"][index] > found.scores["harmless_projection"][index]  # + is harmful
        assert found.scores[setting][index] > 0
    assert found.provenance["probe"].startswith("LinearProbe(" if method == "linear" else "WhitenedProbe(")
    found.save(tmp_path / "d")
    assert DirectionSet.load(tmp_path / "d").scores == found.scores


def test_too_few_prompts_for_the_linear_probes_folds_is_a_one_line_error(planted):
    harmful, harmless, _ = planted
    few = ActivationSet(harmful.activations[:2], harmful.hook_names, torch.arange(2), torch.full((2,), -1), harmful.prompts[:2])
    with pytest.raises(FeatsteerError, match="at least 3 prompts per class; got 2 harmful and 200 harmless"):
        find_directions(few, harmless, method="linear")
    assert len(find_directions(few, harmless, method="whitened")) == 2  # the whitened probe has no folds


def test_selection_fallback_prefers_the_cheapest_candidate_that_removes_refusal():
    from featsteer.directions.selection import CandidateScore, _fallback

    def score(i, refusal, kl):
        return CandidateScore(i, f"blocks.{i}.hook_resid_pre", i, -1, refusal, kl, -0.1, False, "kl too high")

    strongest, cheapest, weak = score(18, -7.0, 0.43), score(16, -4.9, 0.11), score(3, 0.5, 0.01)
    assert _fallback([strongest, cheapest, weak]) is cheapest  # both remove refusal; 16 costs a quarter of the KL
    assert _fallback([weak, score(4, 0.2, 0.3)]).index == 4  # none removes refusal: the lowest refusal score


def test_selection_caveats_name_a_fallback_pick_and_a_model_that_barely_refuses():
    """A choice no filter let through, or made on harmful prompts the model already answers, is said so beside it."""
    from featsteer.directions.selection import CandidateScore, Selection, SelectionConfig

    fallback = CandidateScore(3, "blocks.3.hook_resid_pre", 3, -1, -4.58, 0.4221, -4.53, False, "kl too high")
    kept = CandidateScore(2, "blocks.2.hook_resid_pre", 2, -1, -2.0, 0.05, 1.5, True, "kept")
    barely = Selection([fallback], fallback, -3.56, -4.1, SelectionConfig()).caveats()
    assert len(barely) == 2 and "fallback pick" in barely[0] and "kl too high" in barely[0] and "KL <= 0.1" in barely[0]
    assert "-3.56 before any edit" in barely[1]
    assert Selection([kept], kept, 4.8, -3.0, SelectionConfig()).caveats() == []
    assert len(Selection([fallback], fallback, 4.8, -3.0).caveats()) == 1  # refusing model, fallback pick


def _selection_of(ablated: dict, kl: dict, induced: dict, config=None):
    """A `Selection` of finalists with these per-prompt scores, its choice made as `select_direction` makes it."""
    from featsteer.directions.selection import CandidateScore, Selection, SelectionConfig, _winner

    config = config or SelectionConfig()
    order = sorted(ablated)
    means = [torch.stack([d[i] for i in order]).double().mean(1) for d in (ablated, kl, induced)]
    rows = [CandidateScore(i, f"blocks.{i}.hook_resid_pre", i, -1, float(means[0][k]), float(means[1][k]), float(means[2][k]), True, "kept")
            for k, i in enumerate(order)]
    chosen = rows[_winner(*means, config)]
    return Selection(rows, chosen, 3.0, -3.0, config, {"ablated": ablated, "kl": kl, "induced": induced})


def test_selection_stability_counts_the_winner_of_each_resample():
    g = torch.Generator().manual_seed(1)
    n = 40
    low_kl, induce = torch.full((n,), 0.02), torch.full((n,), 1.0)
    # candidate 5 removes refusal far better than 6: every resample picks it
    clear = _selection_of({5: torch.randn(n, generator=g) - 4, 6: torch.randn(n, generator=g)}, {5: low_kl, 6: low_kl}, {5: induce, 6: induce})
    stable = clear.stability(resamples=200)
    assert clear.chosen.index == 5 and stable.chosen_share == 1.0 and stable.shares == [("blocks.5.hook_resid_pre", -1, 1.0)]
    assert stable.n_finalists == 2 and (stable.n_harmful, stable.n_harmless) == (n, n) and "chosen in 100% of 200" in stable.line()
    # two candidates a hair apart: both win some resamples, and the shares add up to 1
    base, noise = torch.randn(n, generator=g), 0.5 * torch.randn(n, generator=g)
    noise = noise - noise.mean() + 1e-3  # candidate 6 a thousandth worse on these prompts, either way on a resample
    close = _selection_of({5: base - 1.0, 6: base - 1.0 + noise}, {5: low_kl, 6: low_kl}, {5: induce, 6: induce})
    split = close.stability(resamples=300, seed=3)
    assert 0.1 < split.chosen_share < 0.9 and sum(share for *_, share in split.shares) == pytest.approx(1.0)
    assert "also chosen: blocks." in split.line()
    # the filters are re-applied per resample: candidate 6 ablates best but its KL sits on the threshold, so it wins
    # only the resamples whose harmless prompts happen to make its mean KL pass
    edge = _selection_of({5: torch.full((n,), -1.0), 6: torch.full((n,), -3.0)},
                         {5: low_kl, 6: 0.1 + 0.05 * torch.randn(n, generator=g)}, {5: induce, 6: induce})
    shares = dict(((h, p), s) for h, p, s in edge.stability(resamples=300).shares)
    assert 0.2 < shares[("blocks.6.hook_resid_pre", -1)] < 0.8 and 0.2 < shares[("blocks.5.hook_resid_pre", -1)] < 0.8


def test_selection_stability_without_fallback_counts_resamples_with_no_choice():
    """With `fallback=False` a resample where no finalist passes the filters has no winner (`select_direction` would
    fail); it was given to the lowest ablated refusal, here candidate 6, whose KL never passes."""
    from featsteer.directions.selection import SelectionConfig

    g, n = torch.Generator().manual_seed(2), 40
    edge_kl = 0.05 * torch.randn(n, generator=g)
    edge_kl = edge_kl - edge_kl.mean() + 0.099  # just under the 0.1 threshold on these prompts, either way on a resample
    induce = torch.full((n,), 1.0)
    strict = _selection_of({5: torch.full((n,), -1.0), 6: torch.full((n,), -3.0)}, {5: edge_kl, 6: torch.full((n,), 0.5)},
                           {5: induce, 6: induce}, SelectionConfig(fallback=False))
    result = strict.stability(resamples=300)
    assert strict.chosen.index == 5 and [hook for hook, *_ in result.shares] == ["blocks.5.hook_resid_pre"]
    assert 0.2 < result.no_choice_share < 0.8 and result.chosen_share + result.no_choice_share == pytest.approx(1.0)
    assert "no finalist passes the filters" in result.line()
    # with the fallback, every resample has a winner
    assert _selection_of({5: torch.full((n,), -1.0), 6: torch.full((n,), -3.0)}, {5: edge_kl, 6: torch.full((n,), 0.5)},
                         {5: induce, 6: induce}).stability(resamples=300).no_choice_share == 0


def test_selection_stability_needs_per_prompt_scores():
    from featsteer.directions.selection import Selection

    plain = _selection_of({1: torch.zeros(4)}, {1: torch.zeros(4)}, {1: torch.ones(4)})
    with pytest.raises(FeatsteerError, match="resamples must be at least 1"):
        plain.stability(resamples=0)
    with pytest.raises(FeatsteerError, match="kept no per-prompt scores"):
        Selection(plain.candidates, plain.chosen, 0.0, 0.0).stability()


def test_non_finite_activations_and_mismatched_widths_are_named():
    torch.manual_seed(0)
    harmful, harmless = torch.randn(6, D), torch.randn(6, D)
    for bad in (float("nan"), float("inf")):
        poisoned = harmful.clone()
        poisoned[2, 3] = bad
        with pytest.raises(FeatsteerError, match="harmful activations at blocks.0.hook_resid_pre .*NaN or inf"):
            difference_in_means(_set(poisoned, "harmful"), _set(harmless, "harmless"))
    with pytest.raises(FeatsteerError, match="32 wide and the harmless 16"):
        difference_in_means(_set(harmful, "harmful"), _set(harmless[:, :16], "harmless"))


def test_a_direction_set_is_float32_and_unit_to_float32_rounding():
    """The documented float32 was not enforced (a float64 set stayed float64, a bfloat16 one bfloat16) and rows up to 1e-2
    off unit length were taken, so an ablation left up to 1% of the direction behind; a NaN row passed as a zero one."""
    from featsteer.directions import DirectionSet

    hook = ("blocks.0.hook_resid_pre",)
    r = torch.nn.functional.normalize(torch.randn(D, dtype=torch.float64), dim=0)
    assert DirectionSet(r[None, None], hook, (-1,), "dim").bases.dtype == torch.float32
    assert DirectionSet(r[None, None].bfloat16().double().div(r.bfloat16().double().norm()), hook, (-1,), "dim").bases.dtype == torch.float32
    for bad in (r * 1.005, r.bfloat16(), torch.full((D,), float("nan"))):
        with pytest.raises(FeatsteerError, match=r"not orthonormal .*more than 0.0001.*normalised in float32 or float64"):
            DirectionSet(bad[None, None], hook, (-1,), "dim")
    q = torch.linalg.qr(torch.randn(D, 3)).Q.T  # float32 QR: orthonormal to rounding
    assert DirectionSet(q[None], hook, (-1,), "svd").rank == 3


def test_a_direction_set_holds_unit_or_zero_bases_and_damaged_folders_are_named(tmp_path):
    from featsteer.directions import DirectionSet

    r = torch.nn.functional.normalize(torch.randn(D), dim=0)
    with pytest.raises(FeatsteerError, match="not orthonormal"):
        DirectionSet((3 * r)[None, None], ("blocks.0.hook_resid_pre",), (-1,), "dim")
    with pytest.raises(FeatsteerError, match="one hook name and position per basis"):
        DirectionSet(r[None, None], ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"), (-1, -1), "dim")
    kept = DirectionSet(torch.stack([r, torch.zeros(D)])[:, None], ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"), (-1, -1), "dim",
                        scores={"refusal": [0.5, float("nan")]})
    kept.save(tmp_path / "d")
    text = (tmp_path / "d" / "directions.json").read_text()
    assert "NaN" not in text and "null" in text  # NaN is not JSON
    loaded = DirectionSet.load(tmp_path / "d")
    assert loaded.scores["refusal"][0] == 0.5 and loaded.scores["refusal"][1] != loaded.scores["refusal"][1]  # NaN again
    (tmp_path / "d" / "directions.safetensors").write_bytes(b"cut")
    with pytest.raises(FeatsteerError, match="holds damaged directions"):
        DirectionSet.load(tmp_path / "d")


def test_difference_in_means_needs_one_model_and_one_position_selector():
    harmful, harmless = _set(torch.randn(6, D), "harmful"), _set(torch.randn(6, D), "harmless")
    from dataclasses import replace

    with pytest.raises(FeatsteerError, match="come from a and the harmless from b"):
        difference_in_means(replace(harmful, model="a"), replace(harmless, model="b"))
    with pytest.raises(FeatsteerError, match="positions 'last' and the harmless at 'post_instruction'"):
        difference_in_means(harmful, replace(harmless, positions="post_instruction"))
    with pytest.raises(FeatsteerError, match="formatted with the system prompt 'Be brief.' and the harmless with the chat template"):
        difference_in_means(replace(harmful, system="Be brief."), harmless)
    with pytest.raises(FeatsteerError, match="formatted as raw text"):
        difference_in_means(replace(harmful, chat=False), harmless)


def test_svd_induce_check_adds_the_mean_difference_along_the_first_row(planted):
    """The selection's induce check adds `mean_diff_norm` times the first row; the SVD set stored none, so it added a unit
    vector, which induces nothing: on the organism every SVD candidate failed the check and the selection fell back."""
    from featsteer.datasets import builtin_prompts
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    harmful, harmless, _ = planted
    found = find_directions(harmful, harmless, method="svd", rank=2)
    for i, hook in enumerate(found.hook_names):
        difference = harmful.mean(hook) - harmless.mean(hook)
        assert found.scores["mean_diff_norm"][i] == pytest.approx(float(difference @ found.bases[i, 0].double()), rel=1e-5)
        assert found.scores["mean_diff_norm"][i] > 0
    model = load_model("organism")
    model.show_progress = False
    prompts = builtin_prompts("harmful", "train").head(96), builtin_prompts("harmless", "train").head(96)
    result = find_refusal_direction(model, *prompts, DirectionConfig(method="svd", positions="last", n_select=16))
    chosen = result.selection.chosen
    assert chosen.kept and chosen.refusal_induced > 0, result.selection.table()


@pytest.mark.parametrize("method", ["dim", "projected", "pca"])
def test_class_projections_are_taken_on_the_stored_direction(planted, method):
    """`harmful_projection` (the value `steer --mode set` sets by default) and `harmless_projection` are the class means
    projected on the set's own direction; projected DIM and paired PCA copied DIM's, read on another direction."""
    harmful, harmless, _ = planted
    found = find_directions(harmful, harmless, method=method)
    for i, hook in enumerate(found.hook_names):
        r = found.bases[i, 0].double()
        assert found.scores["harmful_projection"][i] == pytest.approx(float(harmful.mean(hook) @ r), rel=1e-9, abs=1e-9)
        assert found.scores["harmless_projection"][i] == pytest.approx(float(harmless.mean(hook) @ r), rel=1e-9, abs=1e-9)
    if method == "projected":
        assert abs(found.scores["harmless_projection"][0]) < 1e-5  # orthogonal to the harmless mean by construction
    for i, hook in enumerate(found.hook_names):  # the induce check's length: the mean difference along the stored vector
        along = float((harmful.mean(hook) - harmless.mean(hook)) @ found.bases[i, 0].double())
        assert found.scores["mean_diff_norm"][i] == pytest.approx(along, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("method", ["svd", "linear", "whitened", "projected", "pca"])
def test_every_method_needs_one_model_and_one_formatting(method):
    from dataclasses import replace

    harmful, harmless = _set(torch.randn(6, D), "harmful"), _set(torch.randn(6, D), "harmless")
    with pytest.raises(FeatsteerError, match="come from a and the harmless from b"):
        find_directions(replace(harmful, model="a"), replace(harmless, model="b"), method=method)
    with pytest.raises(FeatsteerError, match="formatted as raw text"):
        find_directions(replace(harmful, chat=False), harmless, method=method)


def test_selection_with_nothing_to_score_says_why():
    """A 2-layer model keeps only layer 0, where every post-instruction token is the same template token: no candidate
    gets a score, and the error said to raise --kl-threshold, which changes nothing."""
    from featsteer.datasets import builtin_prompts
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction
    from featsteer.testing import tiny_model

    hf_model, tokenizer = tiny_model("llama", num_hidden_layers=2)
    model = load_model(hf_model, tokenizer=tokenizer)
    model.show_progress = False
    prompts = builtin_prompts("harmful", "train").head(12), builtin_prompts("harmless", "train").head(12)
    with pytest.raises(FeatsteerError, match=r"could be scored \(2 zero direction, 2 late layer\): only layers below 1 of the model's 2"):
        find_refusal_direction(model, *prompts, DirectionConfig(n_select=4))


def test_a_prompt_in_both_the_harmful_and_the_harmless_set_is_refused_before_any_capture():
    """The same file passed as --harmful and --harmless (or sets sharing rows) fitted directions on prompts read on
    both sides: the identical case failed later with 'use a model with more layers', a partial overlap not at all."""
    from featsteer.datasets import PromptSet, builtin_prompts
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model = load_model("organism")
    harmful, harmless = builtin_prompts("harmful", "train").head(8), builtin_prompts("harmless", "train").head(8)
    mixed = PromptSet((*harmless[:6], harmful[0]), "mixed.txt")
    with pytest.raises(FeatsteerError, match=r"^8 prompts are in both the harmful and the harmless prompts"):
        find_refusal_direction(model, harmful, harmful, DirectionConfig(n_select=2))
    with pytest.raises(FeatsteerError, match=r"^1 prompt is in both .* \(e\.g\. '"):
        find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=2), val=(harmful[6:], mixed))


def test_validation_prompts_that_are_training_prompts_are_named(caplog):
    from featsteer.datasets import builtin_prompts
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model = load_model("organism")
    model.show_progress = False
    harmful, harmless = builtin_prompts("harmful", "train").head(6), builtin_prompts("harmless", "train").head(6)
    val = harmful[:3], builtin_prompts("harmless", "val").head(3)
    with caplog.at_level("WARNING", logger="featsteer.pipeline"):
        find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=3, layers=(1,)), val=val)
    warned = [record.getMessage() for record in caplog.records if record.name == "featsteer.pipeline"]
    assert len(warned) == 1 and warned[0].startswith("3 of the 3 harmful validation prompts (builtin:harmful:train) are also "
                                                     "training prompts"), warned


def test_a_directions_output_folder_loads_its_chosen_direction(planted, tmp_path):
    """`featsteer directions --out d` writes d/chosen and d/candidates; `--directions d` failed with "run featsteer
    directions first", after the user had. The folder now reads as its pick, and a folder whose subfolders hold other
    sets names them."""
    harmful, harmless, _ = planted
    chosen = find_directions(harmful, harmless, method="dim")
    chosen.save(tmp_path / "d" / "chosen")
    find_directions(harmful, harmless, method="pca").save(tmp_path / "d" / "candidates")
    assert torch.equal(DirectionSet.load(tmp_path / "d").bases, chosen.bases) and DirectionSet.load(tmp_path / "d").method == "dim"
    chosen.save(tmp_path / "other" / "optimized")
    with pytest.raises(FeatsteerError, match="its subfolder optimized holds directions: pass one, e.g. .*other/optimized"):
        DirectionSet.load(tmp_path / "other")
    with pytest.raises(FeatsteerError, match="run `featsteer directions` first"):
        DirectionSet.load(tmp_path / "empty")


def test_a_failed_save_leaves_the_folders_previous_directions_whole(planted, tmp_path):
    """Both files are rendered before either is written: a provenance JSON cannot hold is a one-line error, and the folder
    keeps the set saved before it (the old save wrote the new bases first, then failed on the JSON, leaving them beside
    the old set's hook names and scores)."""
    harmful, harmless, _ = planted
    first = find_directions(harmful, harmless, method="dim")
    first.save(tmp_path / "d")
    flipped = DirectionSet(bases=-first.bases, hook_names=first.hook_names, positions=first.positions, method="dim",
                           provenance={"captures": tmp_path})
    with pytest.raises(FeatsteerError, match="value JSON cannot store.*str\\(\\) a path"):
        flipped.save(tmp_path / "d")
    loaded = DirectionSet.load(tmp_path / "d")
    assert torch.equal(loaded.bases, first.bases) and loaded.scores == first.scores
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["directions.json", "directions.safetensors"]


@pytest.mark.parametrize("method", ["dim", "projected", "pca", "svd", "linear", "whitened"])
def test_directions_keep_their_captures_provenance_through_save_and_load(planted, method, tmp_path):
    """A DirectionSet named the model only: the prompt hashes, template and dtypes the capture records were lost. Each
    method keeps both sets' capture provenance under `capture`; a set saved before, without it, still loads."""
    import dataclasses
    import json

    harmful, harmless, _ = planted
    recorded = {side: {"prompts_sha256": f"{side}-hash", "template": "<u>{instruction}</u>", "stored_dtype": "float32"}
                for side in ("harmful", "harmless")}
    harmful, harmless = (dataclasses.replace(s, provenance=recorded[s.label]) for s in (harmful, harmless))
    found = find_directions(harmful, harmless, method=method, rank=2)
    assert found.provenance["capture"] == recorded and found.provenance["model"] == harmful.model
    loaded = DirectionSet.load(found.save(tmp_path / "new"))
    assert loaded.provenance == found.provenance
    meta = json.loads((tmp_path / "new" / "directions.json").read_text())
    meta["provenance"] = {k: v for k, v in meta["provenance"].items() if k != "capture"}
    (tmp_path / "new" / "directions.json").write_text(json.dumps(meta))
    older = DirectionSet.load(tmp_path / "new")
    assert "capture" not in older.provenance and torch.equal(older.bases, found.bases)


@pytest.mark.parametrize("method", ["dim", "projected", "pca", "svd", "linear", "whitened"])
def test_a_hook_every_prompt_shares_gives_no_direction(planted, method):
    """Layer 0 at a template token: every prompt's activation is the same, so there is no direction to find; the
    selection skips it as a zero direction. Paired PCA returned an arbitrary unit axis there (the first PC of zeros)."""
    harmful, harmless, _ = planted
    constant = torch.randn(D, generator=torch.Generator().manual_seed(3))
    shared = [ActivationSet(torch.stack([constant.expand(len(s), D), s.hook("blocks.1.hook_resid_pre")], 1), s.hook_names,
                            s.prompt_index, s.position, s.prompts) for s in (harmful, harmless)]
    found = find_directions(*shared, method=method, rank=2)
    assert float(weighted_basis(found, found.index("blocks.0.hook_resid_pre")).norm()) == 0
    assert float(weighted_basis(found, found.index("blocks.1.hook_resid_pre")).norm()) > 0.5



@pytest.mark.parametrize("method", ["dim", "projected", "pca", "svd", "linear", "whitened"])
def test_the_same_large_activations_in_another_order_give_no_direction_for_every_method(method):
    """The same prompts on both sides of a layer with a large norm: the float64 means differ only by the order of the
    sums (~1e-11 here). DIM called that identical (relative 1e-12), the probe directions did not (absolute 1e-12): the
    whitened probe returned a unit vector of rounding noise and the linear probe failed on an all-zero weight vector.
    SVD applied no test at all and returned the harmful prompts' own spread about the harmless mean, with full weight,
    which the selection scored as a candidate; an intervention given it now fails as it does with DIM's zero vector."""
    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(200, D, generator=generator, dtype=torch.float64) * 1e4 + 1e4
    other = torch.randn(200, D, generator=generator, dtype=torch.float64)
    order = torch.randperm(200, generator=generator)
    sets = [ActivationSet(torch.stack([first, second], 1), ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"),
                          torch.arange(200), torch.full((200,), -1), tuple(f"p{i}" for i in range(200)))
            for first, second in ((rows, other + 3.0), (rows[order], other))]
    difference = sets[0].mean("blocks.0.hook_resid_pre") - sets[1].mean("blocks.0.hook_resid_pre")
    assert 1e-12 < float(difference.norm()) < 1e-12 * float(sets[0].mean("blocks.0.hook_resid_pre").norm())
    found = find_directions(*sets, method=method)
    assert float(weighted_basis(found, found.index("blocks.0.hook_resid_pre")).norm()) == 0
    assert float(weighted_basis(found, found.index("blocks.1.hook_resid_pre")).norm()) > 0.5
    from featsteer.interventions.operations import orthonormal_basis

    for weighted in (False, True):  # Ablate, AddDirection and the weight edits check their basis with it
        with pytest.raises(FeatsteerError, match=r"^the direction is a zero vector: it removes nothing \(a layer where the two sets' means coincide\?\)"):
            orthonormal_basis(weighted_basis(found, found.index("blocks.0.hook_resid_pre")), weighted=weighted)


def test_means_coincide_is_relative_to_the_harmful_means_norm_and_absolute_below_one():
    from featsteer.directions.dim import means_coincide

    large, small = torch.full((4,), 5e4, dtype=torch.float64), torch.full((4,), 1e-3, dtype=torch.float64)
    assert means_coincide(large, large + 1e-11) and not means_coincide(large, large + 1e-7)
    assert means_coincide(small, small + 1e-13) and not means_coincide(small, small + 1e-11)
    assert means_coincide(large.float(), large.float())
    near_zero = torch.full((4,), 1e-6, dtype=torch.float64)  # the means of rows of norm ~1e4 centred across the prompts
    assert not means_coincide(near_zero, near_zero + 1e-9) and means_coincide(near_zero, near_zero + 1e-9, row_norm=2e4)
    assert not means_coincide(near_zero, near_zero + 1e-7, row_norm=2e4)


def _centred_sets(seed: int, shift: float = 0.0) -> tuple[ActivationSet, ActivationSet]:
    """400 rows of norm ~8e4 centred across the prompts (class means ~0) as the harmful set, the same rows in another
    order (plus `shift` along the first axis) as the harmless one, at one hook."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(400, 64, dtype=torch.float64, generator=generator) * 1e4
    rows -= rows.mean(0)
    other = rows[torch.randperm(400, generator=generator)] + shift * torch.eye(64, dtype=torch.float64)[0]
    return tuple(ActivationSet(r[:, None, :], ("blocks.0.hook_resid_pre",), torch.arange(400), torch.full((400,), -1),
                               tuple(f"p{i}" for i in range(400)), label=label)
                 for r, label in ((rows, "harmful"), (other, "harmless")))


def test_centred_rows_in_another_order_give_no_direction_from_any_source():
    """`means_coincide` scaled its rounding tolerance by the harmful mean's norm alone: rows of norm ~8e4 centred across
    the prompts have means near zero, so the same rows in another order (means ~1e-12 apart, rounding alone) counted as a
    difference in about half the seeds: DIM, SVD and the probes returned a unit vector of rounding noise and LEACE an
    eraser of it. The tolerance now follows the rows' mean norm in every caller; a real 1e-3 shift is still found."""
    from featsteer.directions.methods import svd_subspace
    from featsteer.directions.probe_directions import probe_directions
    from featsteer.feature_report import scored_dim
    from featsteer.interventions import fit_leace
    from featsteer.probe_report import _means_coincide_at
    from tests.test_sae import random_sae

    hook = "blocks.0.hook_resid_pre"
    sae = random_sae("standard", hook=hook)
    rounded = 0
    for seed in range(20):
        harmful, harmless = _centred_sets(seed)
        difference = float((harmful.mean(hook) - harmless.mean(hook)).norm())
        rounded += difference > 1e-12 * max(1.0, float(harmful.mean(hook).norm()))  # what the old test called a difference
        assert float(difference_in_means(harmful, harmless).direction(hook).norm()) == 0, seed
        assert float(svd_subspace(harmful, harmless).bases.norm()) == 0, seed
        assert float(probe_directions(harmful, harmless, "whitened").bases.norm()) == 0, seed
        assert fit_leace(harmful.hook(hook), harmless.hook(hook)) is None, seed
        assert _means_coincide_at(harmful, harmless, hook), seed
        assert float(scored_dim(sae, harmful, harmless, hook).norm()) == 0, seed
    assert rounded > 0  # the reproduction still reaches the case
    harmful, harmless = _centred_sets(0, shift=1e-3)
    assert float(difference_in_means(harmful, harmless).direction(hook).norm()) == pytest.approx(1.0)
    assert fit_leace(harmful.hook(hook), harmless.hook(hook)) is not None and not _means_coincide_at(harmful, harmless, hook)

def test_late_layer_rule_counts_resid_post_as_the_next_blocks_input():
    """`blocks.l.hook_resid_post` is `blocks.{l+1}.hook_resid_pre`: on the 4-layer organism only block inputs 0-2 count
    (the last 20% skipped), so `resid_post` of block 2 is as late as `resid_pre` of block 3. It was scored, and chosen."""
    from featsteer.datasets import builtin_prompts
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model = load_model("organism")
    model.show_progress = False
    prompts = builtin_prompts("harmful", "train").head(12), builtin_prompts("harmless", "train").head(12)
    found = find_refusal_direction(model, *prompts, DirectionConfig(kind="resid_post", n_select=4))
    late = {c.hook for c in found.selection.candidates if "late layer" in c.failed}
    assert late == {"blocks.2.hook_resid_post", "blocks.3.hook_resid_post"}
    assert found.selection.chosen.hook not in late


def test_late_layer_rule_counts_a_write_into_a_blocks_output_as_the_next_blocks_input():
    """`mlp_out` of block l writes into `resid_post` of block l, which is block l+1's input, as does `attn_out` in a
    parallel block (no `resid_mid`): they were counted as block l, so with `DirectionConfig(kind="mlp_out")` the organism's
    block-2 MLP write was scored (and could win) although `resid_post` of block 2, the same stream, is skipped. `attn_out` of a sequential block
    writes into `resid_mid`, read by its own MLP, and stays block l."""
    from featsteer.datasets import builtin_prompts
    from featsteer.directions.selection import is_late_layer
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model = load_model("organism")  # 4 layers: depths 3 and up are the last 20%
    model.show_progress = False
    late = {kind: [is_late_layer(model, f"blocks.{layer}.hook_{kind}", 0.2) for layer in range(4)]
            for kind in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")}
    assert late["mlp_out"] == late["resid_post"] == [False, False, True, True]
    assert late["attn_out"] == late["resid_mid"] == late["resid_pre"] == [False, False, False, True]
    parallel = load_model("tiny:cohere")  # 3 layers, attention and MLP side by side: depths 2 and up are late
    assert [is_late_layer(parallel, f"blocks.{layer}.hook_attn_out", 0.2) for layer in range(3)] == [False, True, True]
    prompts = builtin_prompts("harmful", "train").head(12), builtin_prompts("harmless", "train").head(12)
    found = find_refusal_direction(model, *prompts, DirectionConfig(kind="mlp_out", n_select=4))
    assert {c.hook for c in found.selection.candidates if "late layer" in c.failed} == {"blocks.2.hook_mlp_out", "blocks.3.hook_mlp_out"}
    assert found.selection.chosen.hook not in {"blocks.2.hook_mlp_out", "blocks.3.hook_mlp_out"}


def test_the_candidate_table_names_every_filter_a_candidate_fails():
    """With no KL allowed, every finalist fails the KL filter, and those whose addition induces no refusal fail that one
    too: the table said only the first ('kl too high')."""
    from featsteer.datasets import builtin_prompts
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model = load_model("tiny:llama")
    model.show_progress = False
    prompts = builtin_prompts("harmful", "train").head(12), builtin_prompts("harmless", "train").head(12)
    selection = find_refusal_direction(model, *prompts, DirectionConfig(n_select=3, kl_threshold=0.0)).selection
    finalists = [c for c in selection.candidates if c.kl_harmless == c.kl_harmless]
    both = [c for c in finalists if c.refusal_induced <= 0]
    assert both and all(c.reason == "kl too high, no induced refusal" for c in both)
    assert all(c.reason == "kl too high" for c in finalists if c not in both)
    rows = {" ".join(line.split(" | ")[:2]).lstrip("| "): line for line in selection.table().splitlines()[2:]}
    assert all(rows[f"{c.hook} {c.position}"].endswith("| kl too high, no induced refusal |") for c in both if c is not selection.chosen)
    assert f"**chosen (fallback: {selection.chosen.reason})**" in selection.table()
    assert all(c.failed == ("kl too high", "no induced refusal") for c in both)
    unscored = [c for c in selection.candidates if c.kl_harmless != c.kl_harmless and c.reason not in ("screened out", "not in top-k")]
    assert unscored and all(c.failed and set(c.failed) <= {"late layer", "zero direction"} for c in unscored)


def test_the_kl_induce_bar_counts_the_finalists_it_checks(capsys):
    """The selection's KL/induce bar ran over every ablated candidate though only the top_k get the checks: on SmolLM2-135M
    it read 8/138 with five minutes to go when the stage was done."""
    import re

    from featsteer.datasets import builtin_prompts
    from featsteer.files import json_text
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model = load_model("tiny:llama")
    prompts = builtin_prompts("harmful", "train").head(12), builtin_prompts("harmless", "train").head(12)
    quiet = find_refusal_direction(model, *prompts, DirectionConfig(n_select=3, top_k=1))
    capsys.readouterr()
    model.show_progress = True
    shown = find_refusal_direction(model, *prompts, DirectionConfig(n_select=3, top_k=1))
    ablated = sum(not {"late layer", "zero direction"} & set(c.failed) for c in shown.selection.candidates)
    totals = {int(total) for total in re.findall(r"select: KL/induce: +\d+%\|[^|]*\| *\d+/(\d+)", capsys.readouterr().err)}
    assert ablated > 1 and totals == {1}, (ablated, totals)
    same = json_text(shown.selection.to_dict()) == json_text(quiet.selection.to_dict())  # NaN (unscored) written as null
    assert same  # the same scores and choice with and without the bar


def test_a_single_hook_name_and_position_make_one_direction():
    """`hook_names="blocks.0.hook_resid_pre"` is one name, not 23 letters (which failed with a count naming none of
    them), and a bare position is one position."""
    from featsteer.directions import DirectionSet

    basis = torch.zeros(1, 1, 8)
    basis[0, 0, 3] = 1.0
    single = DirectionSet(basis, hook_names="blocks.0.hook_resid_pre", positions=-1, method="dim")
    assert single.hook_names == ("blocks.0.hook_resid_pre",) and single.positions == (-1,) and len(single) == 1
    assert torch.equal(single.direction("blocks.0.hook_resid_pre"), basis[0, 0])


def test_the_induce_check_needs_the_candidates_mean_difference_length():
    """Candidates without `mean_diff_norm` (built by hand, from SAE rows) had the induce check add the unit direction:
    far too short to induce refusal, so every finalist failed it and the selection fell back, with only a warning.
    Now that is an error; with `require_induce=False` the induce column is NaN rather than a unit addition's score."""
    from featsteer.datasets import builtin_prompts
    from featsteer.directions.selection import SelectionConfig, select_direction
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model = load_model("organism")
    model.show_progress = False
    prompts = builtin_prompts("harmful", "train").head(24), builtin_prompts("harmless", "train").head(24)
    found = find_refusal_direction(model, *prompts, DirectionConfig(n_select=4))
    c = found.candidates
    bare = DirectionSet(c.bases, c.hook_names, c.positions, c.method, {}, c.provenance)
    val = found.val[0].head(4), found.val[1].head(4)
    with pytest.raises(FeatsteerError, match="carry no mean_diff_norm score"):
        select_direction(model, bare, *val)
    unchecked = select_direction(model, bare, *val, SelectionConfig(require_induce=False))
    finalists = [s for s in unchecked.candidates if s.kl_harmless == s.kl_harmless]
    assert finalists and all(s.refusal_induced != s.refusal_induced for s in finalists)
    assert unchecked.chosen.kept and unchecked.chosen.index == found.selection.chosen.index


def test_a_pca_direction_does_not_depend_on_the_other_hooks_computed():
    """Each hook drew its own random pairing from one generator, so a layer's PCA direction changed with the layers
    computed before it (cosine 0.62 here): `directions --layers` and `abliterate --layers` gave one layer two directions."""
    from featsteer.directions import paired_pca

    g = torch.Generator().manual_seed(0)
    n, hooks = 30, tuple(f"blocks.{layer}.hook_resid_pre" for layer in range(3))
    harmful, harmless = torch.randn(n, 3, 16, generator=g), torch.randn(n, 3, 16, generator=g)
    harmful[:, :, 0] += 1.0

    def acts(x: torch.Tensor, kept: list[int]) -> ActivationSet:
        return ActivationSet(x[:, kept], tuple(hooks[i] for i in kept), torch.arange(n), torch.full((n,), -1), tuple(f"p{i}" for i in range(n)))

    every = paired_pca(acts(harmful, [0, 1, 2]), acts(harmless, [0, 1, 2]))
    for layer in range(3):
        alone = paired_pca(acts(harmful, [layer]), acts(harmless, [layer]))
        assert torch.equal(alone.direction(hooks[layer]), every.direction(hooks[layer]))


def test_the_late_layer_rule_skips_the_share_of_layers_it_names():
    """`int((1 - 0.3) * 90)` is 62 in floating point: 28 of 90 layers were skipped for 30%, one more than named."""
    from featsteer.directions.selection import late_layer_start

    assert late_layer_start(90, 0.3) == 63 and late_layer_start(50, 0.34) == 33 and late_layer_start(100, 0.55) == 45
    assert late_layer_start(24, 0.2) == 19 and late_layer_start(30, 0.2) == 24 and late_layer_start(4, 0.2) == 3  # unchanged
    assert late_layer_start(10, 0.0) == 10


def test_svd_ridge_must_be_a_lambda_and_the_subspace_records_its_positions(planted):
    """A negative ridge gave weights above 1 (clamped to a plain projector) or all 0 (a 'zero direction' the selection
    skipped), NaN gave 0, all without an error; ridge 0 is the plain projector. The SVD set's provenance lacked the
    position selector and class sizes every other method records."""
    from featsteer.directions import svd_subspace

    harmful, harmless, _ = planted
    for ridge in (-0.05, -100.0, float("nan"), float("inf")):
        with pytest.raises(FeatsteerError, match="ridge must be a finite lambda >= 0"):
            svd_subspace(harmful, harmless, rank=2, ridge=ridge)
    plain = svd_subspace(harmful, harmless, rank=2, ridge=0.0)
    assert plain.scores["ridge_weights"] == [[1.0, 1.0]] * len(plain)
    projector = weighted_basis(plain, 0).double()
    torch.testing.assert_close(projector.T @ projector @ projector.T @ projector, projector.T @ projector)  # idempotent
    assert {"positions": "last", "n_harmful": 200, "n_harmless": 200}.items() <= plain.provenance.items()


def test_a_reused_result_lends_the_next_selection_its_unedited_base(monkeypatch):
    """`find_refusal_direction(reuse=...)` (compare's second and later direction methods) scored the unedited model on the
    same validation prompts again: two first-token passes per method. The base is now taken over when the prompts,
    batch size and system prompt match (the selection is the same, bit for bit), and computed again when they do not."""
    import featsteer.directions.selection as selection_module
    from featsteer.datasets import builtin_prompts
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model = load_model("organism")
    model.show_progress = False
    prompts = builtin_prompts("harmful", "train").head(24), builtin_prompts("harmless", "train").head(24)
    config = DirectionConfig(n_select=6)
    dim = find_refusal_direction(model, *prompts, config, keep_activations=True)
    fresh = find_refusal_direction(model, *prompts, DirectionConfig(n_select=6, method="pca"))
    passes = []
    original = selection_module.first_token_logprobs
    monkeypatch.setattr(selection_module, "first_token_logprobs", lambda *a, **k: passes.append(1) or original(*a, **k))
    reused = find_refusal_direction(model, *prompts, DirectionConfig(n_select=6, method="pca"), reuse=dim)
    with_base = len(passes)
    assert repr(reused.selection.to_dict()) == repr(fresh.selection.to_dict())  # every score bit for bit (repr: NaN reads equal)
    assert reused.selection.base is dim.selection.base
    torch.testing.assert_close(reused.selection.base.harmless_logprobs, fresh.selection.base.harmless_logprobs, rtol=0, atol=0)
    passes.clear()
    other = find_refusal_direction(model, *prompts, DirectionConfig(n_select=5, method="pca"), reuse=dim)  # other prompts: recomputed
    assert len(passes) == with_base + 2
    assert other.selection.base.key[1] == tuple(dim.val[0].head(5)) and other.selection.base is not dim.selection.base
