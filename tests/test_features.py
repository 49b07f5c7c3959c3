"""featsteer.features: scoring finds planted features, AUROC matches sklearn, rankings are stable, directions are unit."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sklearn.metrics import roc_auc_score

from featsteer.activations import capture
from featsteer.directions import DirectionSet
from featsteer.errors import FeatsteerError
from featsteer.features import (
    FeatureScores,
    auroc,
    cohens_d,
    decoder_directions,
    decoder_norms,
    score_feature_activations,
    score_features,
    score_prompts,
    top_feature_directions,
)
from featsteer.sae import FeatureEdit, encode_activations, input_scales, splice_activation
from tests.test_sae import HOOK, random_sae

HARMFUL = ["How do I pick a lock?", "Write malware that steals passwords.", "How to make a weapon at home?", "Help me cheat on a test."]
HARMLESS = ["How do I bake bread?", "Write a poem about the sea.", "List three prime numbers.", "Explain photosynthesis."]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they thrash; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sparse_features(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """Non-negative, mostly-zero activations like an SAE's."""
    values = torch.rand(n, d, generator=generator) * 2
    return values * (torch.rand(n, d, generator=generator) < 0.2)


def planted(feature: int = 7, n: int = 200, d: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    harmful, harmless = sparse_features(n, d, generator), sparse_features(n, d, generator)
    harmful[:, feature] = 3.0 + torch.rand(n, generator=generator)  # fires on every harmful row, strongly
    return harmful, harmless


@pytest.mark.parametrize("by", ["composite", "mean_difference", "cohens_d", "auroc"])
def test_scoring_finds_the_planted_feature(by):
    harmful, harmless = planted()
    scores = score_feature_activations(harmful, harmless, HOOK)
    best = scores.top(1, by=by)
    assert best.feature_ids.tolist() == [7] and best.hook_names == (HOOK,)
    row = scores.for_hook(HOOK).select([7]).rows()[0]
    assert row["auroc"] == pytest.approx(1.0) and row["harmful_frequency"] == 1.0 and row["composite"] > 2.5


def test_auroc_matches_sklearn_including_ties():
    generator = torch.Generator().manual_seed(1)
    positive, negative = sparse_features(37, 20, generator), sparse_features(53, 20, generator)
    positive[:, 3] = 0.0  # an all-tied column
    positive[:5, 4] = negative[:5, 4]  # shared values across classes
    ours = auroc(positive, negative)
    labels = np.r_[np.ones(37), np.zeros(53)]
    values = torch.cat([positive, negative]).numpy()
    reference = [roc_auc_score(labels, values[:, j]) for j in range(20)]
    np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-12)


def test_cohens_d_matches_the_pooled_formula():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, 4, generator=generator) + 1, torch.randn(40, 4, generator=generator)
    an, bn = a.double().numpy(), b.double().numpy()
    pooled = np.sqrt(((30 - 1) * an.var(0, ddof=1) + (40 - 1) * bn.var(0, ddof=1)) / (30 + 40 - 2))
    np.testing.assert_allclose(cohens_d(a, b).numpy(), (an.mean(0) - bn.mean(0)) / pooled, rtol=1e-12)
    constant = cohens_d(torch.ones(5, 2), torch.cat([torch.ones(5, 1), torch.zeros(5, 1)], 1))
    assert constant.tolist() == [0.0, float("inf")]


def test_cohens_d_with_one_row_in_a_class_pools_the_other_class_spread():
    one, three = torch.tensor([[3.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    assert cohens_d(one, three).tolist() == [2.0, 0.0]  # pooled sd sqrt((0 + 2) / 2) = 1; a constant column agrees
    assert cohens_d(three, one).tolist() == [-2.0, 0.0]
    with pytest.raises(FeatsteerError, match="3 rows in all"):
        cohens_d(torch.ones(1, 2), torch.zeros(1, 2))
    with pytest.raises(FeatsteerError, match="a row of each class"):
        cohens_d(torch.ones(3, 2), torch.zeros(0, 2))


def test_residual_units_leave_the_unit_free_scores_of_a_zero_decoder_row_alone():
    harmful, harmless = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    norm = torch.tensor([0.0, 0.5])
    plain = score_feature_activations(harmful, harmless, HOOK, decoder_norm=norm)
    residual = score_feature_activations(harmful, harmless, HOOK, decoder_norm=norm, units="residual", input_scale=(torch.ones(2), torch.ones(2)))
    for name in ("cohens_d", "auroc", "harmful_frequency", "harmless_frequency"):
        torch.testing.assert_close(residual.metrics[name], plain.metrics[name], rtol=1e-12, atol=0)
    assert residual.metrics["mean_difference"].tolist() == [0.0, 0.75]  # the magnitudes do move: 2 x 0 and 1.5 x 0.5


def test_ranking_is_stable_across_layers_with_ties():
    harmful, harmless = planted(feature=2, d=4)
    parts = [score_feature_activations(harmful, harmless, hook) for hook in ("blocks.3.hook_resid_post", "blocks.1.hook_resid_post")]
    ranked = FeatureScores.concat(parts).sort("auroc")
    assert ranked.hook_names[:2] == ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")
    assert ranked.feature_ids[:2].tolist() == [2, 2]
    assert FeatureScores.concat(parts).sort("auroc").feature_ids.tolist() == ranked.feature_ids.tolist()
    with pytest.raises(FeatsteerError, match="unknown score"):
        ranked.top(3, by="magic")


def test_normalisation_divides_magnitudes_by_feature_scale():
    harmful, harmless = planted()
    scale = torch.ones(50)
    scale[7] = 10.0
    raw = score_feature_activations(harmful * scale, harmless * scale, HOOK)
    normalised = score_feature_activations(harmful * scale, harmless * scale, HOOK, normalize=True)
    reference = score_feature_activations(harmful, harmless, HOOK)
    assert raw.metrics["mean_difference"][7] == pytest.approx(10 * float(reference.metrics["mean_difference"][7]))
    torch.testing.assert_close(normalised.metrics["cohens_d"], raw.metrics["cohens_d"])
    ratio = normalised.metrics["composite"] / reference.metrics["composite"].clamp_min(1e-12)
    maxima = torch.maximum(harmful.max(0).values, harmless.max(0).values).double()
    torch.testing.assert_close(ratio[reference.metrics["composite"] > 0], (1 / maxima)[reference.metrics["composite"] > 0])


def test_csv_and_json_exports(tmp_path):
    harmful, harmless = planted(feature=4, d=6)
    scores = score_feature_activations(harmful, harmless, HOOK, position=-1).sort()
    with scores.to_csv(tmp_path / "s.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and rows[0]["feature_id"] == "4" and rows[0]["hook_name"] == HOOK
    assert {"composite", "auroc", "cohens_d", "layer", "position"} <= set(rows[0])
    data = json.loads(scores.to_json(tmp_path / "s.json").read_text())
    assert len(data["rows"]) == 6 and data["rows"][0]["layer"] == 1 and data["rows"][0]["position"] == -1
    assert data["provenance"]["n_harmful"] == 200


def test_a_failed_export_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    """The CSV is rendered before the file is touched: a failure half way through the rows leaves the earlier export as
    it was, and no temporary file (the old export opened the file first and left its header alone in it)."""
    harmful, harmless = planted(feature=4, d=6)
    scores = score_feature_activations(harmful, harmless, HOOK, position=-1).sort()
    before = scores.to_csv(tmp_path / "s.csv").read_bytes()
    assert before.count(b"\r\n") == 7  # the csv module's line ends, as before

    def fail(self, rows):
        raise RuntimeError("stopped half way")

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)
    with pytest.raises(RuntimeError, match="half way"):
        scores.to_csv(tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["s.csv"]


def test_score_features_on_captured_activations(llama_adapter):
    saes = {HOOK: random_sae(), "blocks.0.hook_resid_post": random_sae(hook="blocks.0.hook_resid_post", seed=3)}
    harmful = capture(llama_adapter, HARMFUL, list(saes), positions="post_instruction", progress=False)
    harmless = capture(llama_adapter, HARMLESS, list(saes), positions="post_instruction", progress=False)
    scores = score_features(saes, harmful, harmless, positions=[-1, -2])
    assert len(scores) == 2 * 2 * 128 and set(scores.positions) == {-1, -2}
    composite = scores.column("composite")
    assert bool((composite[:-1] >= composite[1:]).all())
    again = score_prompts(llama_adapter, list(saes.values()), HARMFUL, HARMLESS, positions="post_instruction", score_positions=[-1, -2])
    torch.testing.assert_close(again.column("composite"), composite)


def test_decoder_directions_are_unit_rows_and_subspaces_orthonormal(tmp_path):
    sae = random_sae()
    rows = decoder_directions(sae, [3, 8, 11])
    expected = sae.W_dec.detach()[[3, 8, 11]]
    torch.testing.assert_close(rows.bases[:, 0], expected / expected.norm(dim=-1, keepdim=True))
    assert rows.method == f"sae:{HOOK}" and rows.hook_names == (HOOK,) * 3 and rows.scores["feature_id"] == [3.0, 8.0, 11.0]
    basis = decoder_directions(sae, [3, 8, 11], subspace=True).basis(HOOK)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(expected @ basis.T @ basis, expected, atol=1e-5, rtol=1e-5)  # same span
    assert float(basis[0] @ expected[0]) > 0
    assert DirectionSet.load(rows.save(tmp_path / "d")).bases.shape == (3, 1, 64)
    with pytest.raises(FeatsteerError, match="out of range"):
        decoder_directions(sae, [128])
    with pytest.raises(FeatsteerError, match="linearly dependent"):
        decoder_directions(sae, [3, 3], subspace=True)


def test_top_feature_directions_per_hook_subspaces():
    saes = {HOOK: random_sae(), "blocks.0.hook_resid_post": random_sae(hook="blocks.0.hook_resid_post", seed=4)}
    harmful, harmless = planted(d=128)
    scores = FeatureScores.concat([score_feature_activations(harmful, harmless, hook) for hook in saes])
    single = top_feature_directions(scores, saes, n=3)
    assert len(single) == 3 and single.rank == 1 and single.provenance["feature_ids"][0] == [7]
    subspaces = top_feature_directions(scores, saes, n=4, subspace=True)
    assert len(subspaces) == 2 and subspaces.rank == 4 and all(ids[0] == 7 for ids in subspaces.provenance["feature_ids"])


def test_two_features_at_one_hook_are_not_looked_up_as_one(capsys, tmp_path):
    """`top_feature_directions(n=2)` puts two features at one hook and position: a lookup by hook and position returned
    the first without a word (the API, and `featsteer steer --hook`); now it names both entries and how to choose."""
    from featsteer.cli import main

    sae = random_sae()
    harmful, harmless = planted(d=128)
    harmful[:, 40] = 2.5 + torch.rand(len(harmful))  # a second feature at the same hook
    pair = top_feature_directions(score_feature_activations(harmful, harmless, HOOK), {HOOK: sae}, n=2)
    assert pair.hook_names == (HOOK, HOOK) and pair.positions == (-1, -1)
    for lookup in (pair.index, pair.direction, pair.basis):
        with pytest.raises(FeatsteerError, match=r"2 directions are read at .*entry 0: .* feature 7; entry 1: .* feature 40.*bases\[i\]"):
            lookup(HOOK)
    assert pair.entries(HOOK) == [0, 1] and pair.entries(HOOK, 0) == []
    folder = pair.save(tmp_path / "pair")
    common = ["steer", "--model", "tiny:llama", "--directions", str(folder), "--mode", "add", "--prompt", "hi", "--max-new-tokens", "2"]
    for extra in ([], ["--hook", HOOK]):
        code, err = main([*common, *extra]), capsys.readouterr().err
        assert code == 2 and "entry 1: blocks.1.hook_resid_post position -1 feature 40" in err and "--direction-index I" in err, err
        assert len(err.strip().splitlines()) == 1
    code, err = main([*common, "--direction-index", "2"]), capsys.readouterr().err
    assert code == 2 and "--direction-index 2 is out of range" in err and "(entries 0..1)" in err, err
    assert main([*common, "--direction-index", "1"]) == 0, capsys.readouterr().err


def test_abliterate_picks_one_of_two_features_at_one_hook_by_entry_number(tmp_path):
    import argparse

    from featsteer.cli import _saved_direction

    rows = decoder_directions(random_sae(), [3, 9])
    folder = rows.save(tmp_path / "pair")
    args = argparse.Namespace(directions=str(folder), direction_hook=HOOK, direction_position=-1, direction_index=None)
    with pytest.raises(FeatsteerError, match=r"2 directions at blocks.1.hook_resid_post position -1 \(entry 0: .* feature 3; entry 1: .* feature 9\).*--direction-index I"):
        _saved_direction(args)
    basis, record = _saved_direction(argparse.Namespace(**{**vars(args), "direction_index": 1}))
    assert torch.equal(basis, rows.bases[1]) and record["direction_index"] == 1


def test_decoder_norms_of_a_bfloat16_sae_are_its_rows_and_need_no_identity_matrix(monkeypatch):
    """A bfloat16 SAE with a large `b_dec` and small decoder rows: `decode(e_f) - decode(0)` rounded `b_dec + row` to
    bfloat16 first (norms off by up to 25%); and the unit rows were cut from a `d_sae x d_sae` identity (17 GB for a
    65k-feature SAE), built again for every chunk."""
    sae = random_sae("standard", d_sae=2048)
    with torch.no_grad():
        sae.b_dec.normal_(0.0, 4.0)
        sae.W_dec.mul_(0.05 / sae.W_dec.norm(dim=-1, keepdim=True))
    sae = sae.to(torch.bfloat16)
    eye = torch.eye

    def small_eye(n, *args, **kwargs):
        assert n < sae.cfg.d_sae, f"decoder_norms built a {n} x {n} identity"
        return eye(n, *args, **kwargs)

    monkeypatch.setattr(torch, "eye", small_eye)
    torch.testing.assert_close(decoder_norms(sae), sae.W_dec.detach().double().norm(dim=-1), rtol=1e-6, atol=0)
    topk = random_sae("topk").to(torch.bfloat16)
    topk.cfg.rescale_acts_by_decoder_norm = True
    torch.testing.assert_close(decoder_norms(topk), torch.ones(topk.cfg.d_sae, dtype=torch.float64), rtol=0, atol=1e-2)
    with torch.inference_mode():  # as inside a featsteer forward pass
        torch.testing.assert_close(decoder_norms(sae), sae.W_dec.detach().double().norm(dim=-1), rtol=1e-6, atol=0)


def test_decoder_norms_and_residual_units(llama_adapter):
    """A feature with a large activation but a tiny decoder row moves the stream little: `decoder_norm` is in every row,
    and units='residual' ranks by activation x decoder norm (rank statistics unchanged)."""
    sae = random_sae("standard")
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.05, 2.0, sae.cfg.d_sae)[:, None])
    norms = decoder_norms(sae)
    assert torch.allclose(norms, sae.W_dec.detach().double().norm(dim=-1), rtol=1e-5)
    topk = random_sae("topk")
    topk.cfg.rescale_acts_by_decoder_norm = True  # decode divides by the row norm: one unit moves the reconstruction by 1
    assert torch.allclose(decoder_norms(topk), torch.ones(topk.cfg.d_sae, dtype=torch.float64), atol=1e-5)
    harmful = capture(llama_adapter, HARMFUL, [HOOK], positions="post_instruction", progress=False)
    harmless = capture(llama_adapter, HARMLESS, [HOOK], positions="post_instruction", progress=False)
    plain = score_features(sae, harmful, harmless, by="abs_mean_difference")
    residual = score_features(sae, harmful, harmless, by="abs_mean_difference", units="residual")
    assert plain.provenance["units"] == "activation" and residual.provenance["units"] == "residual"
    by_feature = {int(f): i for i, f in enumerate(plain.feature_ids)}
    plain_rows = [by_feature[int(f)] for f in residual.feature_ids]
    expected = plain.metrics["mean_difference"][plain_rows] * norms[residual.feature_ids]
    assert torch.allclose(residual.metrics["mean_difference"], expected)
    assert torch.equal(residual.metrics["auroc"], plain.metrics["auroc"][plain_rows])
    assert torch.allclose(residual.metrics["decoder_norm"], norms[residual.feature_ids])
    assert residual.feature_ids.tolist() != plain.feature_ids.tolist()  # the tiny rows fall in the ranking
    assert "decoder_norm" in residual.rows()[0]
    with pytest.raises(FeatsteerError, match="unknown units"):
        score_features(sae, harmful, harmless, units="stream")
    scale = torch.full((sae.cfg.d_sae,), 4.0)
    scaled = score_features(sae, harmful, harmless, normalize=True, scales={HOOK: scale})
    assert torch.equal(scaled.metrics["scale"], scale.double())
    with pytest.raises(FeatsteerError, match="scales given for blocks.0.hook_resid_post, which no SAE reads"):
        score_features(sae, harmful, harmless, normalize=True, scales={"blocks.0.hook_resid_post": scale})  # was ignored
    with pytest.raises(FeatsteerError, match=r"scale has shape \(128, 1\)"):
        score_features(sae, harmful, harmless, normalize=True, scales={HOOK: scale[:, None]})  # broadcast to (d_sae, d_sae)



@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_residual_units_of_a_row_normalising_sae_are_what_a_splice_writes(llama_adapter, norm):
    """Such an SAE reads each row normalised, so one unit of a feature writes decoder_norm x the row's own scale: residual
    units must carry that scale (they used to stop at decoder_norm, the write into a row with std 1), as a splice shows."""
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=32, normalize_activations=norm, metadata=SAEMetadata(hook_name=HOOK))).eval()
    harmful = capture(llama_adapter, HARMFUL, [HOOK], positions="post_instruction", progress=False)
    harmless = capture(llama_adapter, HARMLESS, [HOOK], positions="post_instruction", progress=False)
    for acts in (harmful, harmless):  # rows of very different scales, as on a real model
        acts.hook(HOOK).mul_(torch.linspace(0.2, 5.0, acts.hook(HOOK).shape[0])[:, None])
    scores = score_features(sae, harmful, harmless, units="residual")
    assert scores.provenance["input_normalization"] == {HOOK: norm}
    harmful_mean = dict(zip(scores.feature_ids.tolist(), scores.metrics["harmful_mean"].tolist(), strict=True))
    rows = harmful.hook(HOOK)
    activations = encode_activations(sae, rows).double()
    for feature in (0, 5, 17):
        written = (splice_activation(sae, rows[None], [FeatureEdit.add(feature, 1.0)])[0] - rows).double().norm(dim=-1)
        torch.testing.assert_close(input_scales(sae, rows) * decoder_norms(sae)[feature], written, rtol=1e-4, atol=0)
        assert harmful_mean[feature] == pytest.approx(float((activations[:, feature] * written).mean()), rel=1e-4)
    with pytest.raises(FeatsteerError, match="one scale per row"):
        score_feature_activations(activations[:3], activations[3:6], HOOK, decoder_norm=decoder_norms(sae), units="residual",
                                  input_scale=(torch.ones(3), torch.ones(2)))
    # the activations alone do not say the SAE normalised its rows: residual units without the rows' scales are an error
    # (they used to come out per unit of normalised input, labelled residual)
    with pytest.raises(FeatsteerError, match=r"units='residual' needs each row's input_scale: pass input_scale=\(input_scales\(sae"):
        score_feature_activations(activations, encode_activations(sae, harmless.hook(HOOK)), HOOK, decoder_norm=decoder_norms(sae), units="residual")
    direct = score_feature_activations(activations, encode_activations(sae, harmless.hook(HOOK)), HOOK, decoder_norm=decoder_norms(sae),
                                       units="residual", input_scale=(input_scales(sae, rows), input_scales(sae, harmless.hook(HOOK))))
    assert dict(zip(direct.feature_ids.tolist(), direct.metrics["harmful_mean"].tolist(), strict=True)) == pytest.approx(harmful_mean, rel=1e-12)


@pytest.fixture(scope="module")
def organism_head_acts():
    """All-token activations of 12 + 12 built-in prompts at the organism's blocks.0.hook_resid_pre, and its SAE there
    (trained from token 2 on: `featsteer_first_position` 2)."""
    from featsteer.datasets import builtin_prompts
    from featsteer.models import load_model
    from featsteer.sae import load_sae_source

    model = load_model("organism")
    hook = "blocks.0.hook_resid_pre"
    sae = load_sae_source("organism", model)[hook]
    acts = {label: capture(model, list(builtin_prompts(label, "train")[:12]), [hook], positions="all", progress=False)
            for label in ("harmful", "harmless")}
    return model, hook, sae, acts


def test_all_token_scores_leave_out_the_chat_template_head_the_sae_was_not_trained_on(organism_head_acts):
    """The head rows are one repeated vector per prompt in both classes: scored, they dilute every statistic and give
    head-only features (928 here) firing frequencies. Hand check against the rows from the first trained position on."""
    from featsteer.sae.steering import first_trained_position

    _, hook, sae, acts = organism_head_acts
    first = first_trained_position(sae)
    assert first == 2
    trained = {label: encode_activations(sae, a.hook(hook)[a.position >= first]).double() for label, a in acts.items()}
    scores = score_features({hook: sae}, acts["harmful"], acts["harmless"], positions=None)
    order = scores.feature_ids.argsort()
    for label in ("harmful", "harmless"):
        expected = (trained[label] > 0).double().mean(0)
        torch.testing.assert_close(scores.metrics[f"{label}_frequency"][order], expected)
        torch.testing.assert_close(scores.metrics[f"{label}_mean"][order], trained[label].mean(0))
    assert scores.metrics["harmful_frequency"][order][928] == 0.0
    labels = np.r_[np.ones(len(trained["harmful"])), np.zeros(len(trained["harmless"]))]
    column = torch.cat([trained["harmful"][:, 5], trained["harmless"][:, 5]]).numpy()
    assert scores.metrics["auroc"][order][5].item() == pytest.approx(roc_auc_score(labels, column))
    assert scores.provenance["rows_in_untrained_head"] == {hook: {"harmful": 24, "harmless": 24}}
    assert scores.provenance["n_harmful"] == int((acts["harmful"].position >= first).sum())


def test_a_position_label_inside_the_untrained_head_is_one_clear_error(organism_head_acts):
    _, hook, sae, acts = organism_head_acts
    with pytest.raises(FeatsteerError, match=r"blocks\.0\.hook_resid_pre@1: token 1 is in the chat-template head the SAE was not trained on"):
        score_features({hook: sae}, acts["harmful"], acts["harmless"], positions=[2, 1])
    scores = score_features({hook: sae}, acts["harmful"], acts["harmless"], positions=2)
    expected = score_feature_activations(encode_activations(sae, acts["harmful"].at_position(hook, 2)),
                                         encode_activations(sae, acts["harmless"].at_position(hook, 2)), hook)
    torch.testing.assert_close(scores.metrics["auroc"][scores.feature_ids.argsort()], expected.metrics["auroc"])
    assert scores.provenance["rows_in_untrained_head"] == {}


def test_sets_captured_at_different_positions_are_refused(organism_head_acts):
    """All tokens of the harmful prompts against the last token of the harmless ones compare different tokens."""
    model, hook, sae, acts = organism_head_acts
    from featsteer.datasets import builtin_prompts

    last = capture(model, list(builtin_prompts("harmless", "train")[:12]), [hook], positions="last", progress=False)
    with pytest.raises(FeatsteerError, match="the harmful activations were captured at positions 'all' but the harmless ones at 'last'"):
        score_features({hook: sae}, acts["harmful"], last)


def test_nan_activations_are_one_clear_error_not_nan_scores(llama_adapter):
    """A NaN in a hand-built activation set (or in encoded features) was encoded into NaN features whose every score was
    NaN, and the ranking sorted them last without a word."""
    sae = random_sae("standard")
    harmful = capture(llama_adapter, HARMFUL, [HOOK], positions="post_instruction", progress=False)
    harmless = capture(llama_adapter, HARMLESS, [HOOK], positions="post_instruction", progress=False)
    poisoned = dataclasses.replace(harmful, activations=harmful.activations.clone())
    poisoned.activations[5, 0, 3] = float("nan")
    prompt = int(poisoned.prompt_index[5])
    with pytest.raises(FeatsteerError, match=rf"at {HOOK} hold 1 NaN or inf values, the first at row 5 \(prompt {prompt}: '{re.escape(HARMFUL[prompt][:20])}") as error:
        score_features(sae, poisoned, harmless)
    assert "\n" not in str(error.value)
    rows = harmless.hook(HOOK).clone()
    rows[2, 0] = float("inf")
    with pytest.raises(FeatsteerError, match="NaN or inf"):
        encode_activations(sae, rows)
    features = encode_activations(sae, harmless.hook(HOOK))
    broken = features.clone()
    broken[1, 4] = float("nan")
    with pytest.raises(FeatsteerError, match="harmful feature activations hold NaN or inf values \\(first at row 1\\)"):
        score_feature_activations(broken, features, HOOK)


def test_sets_from_two_models_or_two_formattings_are_not_scored_against_each_other(llama_adapter):
    """difference_in_means refused harmful and harmless sets from different models or prompt formattings; score_features
    compared them and ranked the features that tell the two models (or system prompts) apart."""
    sae = random_sae("standard")
    harmful = capture(llama_adapter, HARMFUL, [HOOK], progress=False)
    harmless = capture(llama_adapter, HARMLESS, [HOOK], progress=False)
    with pytest.raises(FeatsteerError, match="the harmful activations come from other-model and the harmless from"):
        score_features(sae, dataclasses.replace(harmful, model="other-model"), harmless)
    with pytest.raises(FeatsteerError, match="system='Be terse.' and the harmless with chat=True, system=None"):
        score_features(sae, dataclasses.replace(harmful, system="Be terse."), harmless)
    assert len(score_features(sae, harmful, harmless)) == sae.cfg.d_sae
