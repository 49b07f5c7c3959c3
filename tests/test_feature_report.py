"""featsteer.feature_report: a planted refusal feature ranks first, every number in the report equals a direct
computation, the files are complete and written atomically, and `featsteer rank-features` fails in one line."""

from __future__ import annotations

import base64
import csv
import json
import re

import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from featsteer.activations import capture
from featsteer.datasets import builtin_prompts
from featsteer.directions.geometry import final_norm_gain, token_text
from featsteer.errors import FeatsteerError
from featsteer.feature_report import (
    REPORT_FILES,
    feature_logits,
    promoted_tokens,
    rank_features,
    ranking_key,
    write_feature_report,
)
from featsteer.features import score_features
from featsteer.models import load_model
from featsteer.sae import load_sae_source
from featsteer.testing import tiny_model
from tests.test_sae import random_sae

PLANTED_HOOK = "blocks.1.hook_resid_post"
OTHER_HOOK = "blocks.0.hook_resid_post"
PLANTED = 37
HARMFUL = builtin_prompts("harmful", "train")[:10]
HARMLESS = builtin_prompts("harmless", "train")[:10]
TOP_N = 4


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    hf_model, tokenizer = tiny_model("llama")
    return load_model(hf_model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def acts(model):
    """Last-token activations of both prompt sets at both SAE hooks, captured directly."""
    return {label: capture(model, list(prompts), [OTHER_HOOK, PLANTED_HOOK], label=label, progress=False)
            for label, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS))}


def direct_dim(acts, hook: str) -> torch.Tensor:
    difference = acts["harmful"].hook(hook).double().mean(0) - acts["harmless"].hook(hook).double().mean(0)
    return difference / difference.norm()


@pytest.fixture(scope="module")
def saes(acts):
    """A random SAE at layer 0 and, at layer 1, one whose feature PLANTED reads and writes the DIM direction,
    firing (strongly) on prompts whose projection lies above the midpoint of the two class means."""
    planted = random_sae("standard", hook=PLANTED_HOOK, seed=3)
    direction = direct_dim(acts, PLANTED_HOOK).float()
    with torch.no_grad():
        projections = {label: planted.process_sae_in(a.hook(PLANTED_HOOK)) @ direction for label, a in acts.items()}
        gap = float(projections["harmful"].mean() - projections["harmless"].mean())
        midpoint = 0.5 * float(projections["harmful"].mean() + projections["harmless"].mean())
        scale = 100.0 / gap
        planted.W_enc[:, PLANTED] = direction * scale
        planted.b_enc[PLANTED] = -midpoint * scale
        planted.W_dec[PLANTED] = direction
    return {OTHER_HOOK: random_sae("topk", hook=OTHER_HOOK, seed=1), PLANTED_HOOK: planted}


@pytest.fixture(scope="module")
def ranking(model, saes):
    return rank_features(model, saes, HARMFUL, HARMLESS, top_n=TOP_N)


@pytest.fixture(scope="module")
def report_dir(ranking, tmp_path_factory):
    return write_feature_report(ranking, tmp_path_factory.mktemp("report"))


def test_planted_feature_ranks_first_along_the_dim_direction(ranking):
    best = ranking.features[0]
    assert (best.hook_name, best.feature_id, best.rank) == (PLANTED_HOOK, PLANTED, 1)
    assert best.dim_cosine == pytest.approx(1.0, abs=1e-5)
    assert best.scores["mean_difference"] > 10 * abs(ranking.features[1].scores["mean_difference"])
    assert best.examples and best.examples[0].label == "harmful"
    assert float(best.harmful_activations.mean()) > float(best.harmless_activations.mean())


def test_ranking_equals_score_features(ranking, saes, acts):
    direct = score_features(saes, acts["harmful"], acts["harmless"], by="composite")
    assert ranking.scores.hook_names == direct.hook_names
    assert torch.equal(ranking.scores.feature_ids, direct.feature_ids)
    for name, values in direct.metrics.items():
        torch.testing.assert_close(ranking.scores.metrics[name], values, equal_nan=True)
    top = direct.top(TOP_N)
    assert [(d.hook_name, d.feature_id) for d in ranking.features] == list(zip(top.hook_names, top.feature_ids.tolist(), strict=True))


def test_other_keys_rank_like_score_features(model, saes, acts):
    by_auroc = rank_features(model, saes, HARMFUL, HARMLESS, top_n=2, by="auroc", n_examples=0)
    direct = score_features(saes, acts["harmful"], acts["harmless"], by="auroc").top(2, "auroc")
    assert [(d.hook_name, d.feature_id) for d in by_auroc.features] == list(zip(direct.hook_names, direct.feature_ids.tolist(), strict=True))
    assert all(d.examples == () for d in by_auroc.features) and by_auroc.by == "auroc"


def test_histogram_values_are_the_feature_activations(ranking, saes, acts):
    best = ranking.features[0]
    with torch.no_grad():
        expected = saes[PLANTED_HOOK].encode(acts["harmful"].hook(PLANTED_HOOK))[:, PLANTED]
    torch.testing.assert_close(best.harmful_activations, expected)
    assert best.harmless_activations.shape == (len(HARMLESS),)


def test_promoted_tokens_equal_the_direct_unembedding(ranking, model, saes):
    norm_weight = model.model.model.norm.weight.detach()
    assert not torch.allclose(norm_weight, torch.ones_like(norm_weight))  # the gain must matter for this check
    unembedding = model.model.lm_head.weight.detach()
    for detail in ranking.features:
        logits = (saes[detail.hook_name].W_dec.detach()[detail.feature_id] * norm_weight) @ unembedding.T
        top, bottom = torch.topk(logits, 10), torch.topk(-logits, 10)
        assert [t.token_id for t in detail.promoted] == top.indices.tolist()
        assert [t.token_id for t in detail.suppressed] == bottom.indices.tolist()
        torch.testing.assert_close(torch.tensor([t.logit for t in detail.promoted]), top.values, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor([t.logit for t in detail.suppressed]), -bottom.values, atol=1e-5, rtol=1e-4)
        assert all(isinstance(t.token, str) and t.token for t in detail.promoted + detail.suppressed)


def test_promoted_token_logits_are_per_unit_of_activation_for_rescaling_topk(model):
    """A TopK SAE with `rescale_acts_by_decoder_norm` writes activation x row / |row|: its token logits must be those of
    decoding one unit of the feature, not of the raw (here non-unit) decoder row."""
    sae = TopKSAE(TopKSAEConfig(d_in=model.d_model, d_sae=16, k=4, rescale_acts_by_decoder_norm=True,
                                metadata=SAEMetadata(hook_name=PLANTED_HOOK))).eval()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.2, 5.0, 16)[:, None])
        writes = sae.decode(torch.eye(16)) - sae.decode(torch.zeros(1, 16))
    expected = (writes * model.model.model.norm.weight.detach()) @ model.model.lm_head.weight.detach().T
    torch.testing.assert_close(feature_logits(model, sae, list(range(16))), expected, atol=1e-5, rtol=1e-4)
    promoted, _ = promoted_tokens(model, sae, 15, 3)
    torch.testing.assert_close(torch.tensor([t.logit for t in promoted]), torch.topk(expected[15], 3).values, atol=1e-5, rtol=1e-4)


def test_a_row_normalising_sae_is_labelled_per_unit_of_normalised_input(model, saes, tmp_path):
    """A layer_norm SAE writes decoder_norm x each row's std per unit of activation: the report says what its decoder
    norms and token logits are measured in (they used to read as plain residual units), the plain SAE's table does not."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    normed = StandardSAE(StandardSAEConfig(d_in=model.d_model, d_sae=16, normalize_activations="layer_norm",
                                           metadata=SAEMetadata(hook_name=PLANTED_HOOK))).eval()
    ranking = rank_features(model, {OTHER_HOOK: saes[OTHER_HOOK], PLANTED_HOOK: normed}, HARMFUL, HARMLESS, top_n=32, n_examples=0)
    assert ranking.provenance["input_normalization"] == {OTHER_HOOK: "none", PLANTED_HOOK: "layer_norm"}
    assert {d.hook_name: d.input_normalization for d in ranking.features} == {OTHER_HOOK: "none", PLANTED_HOOK: "layer_norm"}
    page = (write_feature_report(ranking, tmp_path) / "report.html").read_text()
    assert f"The SAE(s) at {PLANTED_HOOK} normalise each input row (layer_norm)" in page and OTHER_HOOK + " normalise" not in page
    assert page.count("<th>logit per unit of normalised input</th>") == 2 * sum(d.hook_name == PLANTED_HOOK for d in ranking.features)
    top = json.loads((tmp_path / "features.json").read_text())["top"]
    assert {t["hook_name"]: t["input_normalization"] for t in top}[PLANTED_HOOK] == "layer_norm"


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_final_norm_gain_is_the_norm_weight(family):
    hf_model, tokenizer = tiny_model(family)
    adapter = load_model(hf_model, tokenizer=tokenizer)
    _, norm = adapter.unembed()
    expected = norm.weight.detach() + (1.0 if family == "gemma" else 0.0)  # Gemma's RMSNorm scales by 1 + weight
    torch.testing.assert_close(final_norm_gain(adapter), expected, atol=1e-4, rtol=1e-4)


def test_dim_cosines_equal_a_direct_computation(ranking, saes, acts):
    for hook, sae in saes.items():
        direction = direct_dim(acts, hook)
        rows = sae.W_dec.detach().double()
        expected = rows @ direction / rows.norm(dim=-1)
        torch.testing.assert_close(ranking.dim_cosines[hook], expected, atol=1e-6, rtol=1e-6)
    for detail in ranking.features:
        assert detail.dim_cosine == pytest.approx(float(ranking.dim_cosines[detail.hook_name][detail.feature_id]))


def test_token_highlights_match_the_scored_activation(ranking):
    shown = [e for d in ranking.features for e in d.examples]
    assert shown
    for example in shown:
        assert len(example.tokens) == len(example.activations) == len(example.scored)
        assert example.scored == (False,) * (len(example.tokens) - 1) + (True,)  # positions="last"
        assert example.activations[-1] == pytest.approx(example.score, abs=1e-3, rel=1e-3)
        assert example.prompt in (HARMFUL if example.label == "harmful" else HARMLESS)
    scores = [e.score for e in ranking.features[0].examples]
    assert scores == sorted(scores, reverse=True)


def test_csv_and_json_list_every_feature_in_rank_order(report_dir, ranking, saes):
    with (report_dir / "features.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(int(sae.cfg.d_sae) for sae in saes.values())
    assert {(r["hook_name"], int(r["feature_id"])) for r in rows} == {(h, f) for h, sae in saes.items() for f in range(sae.cfg.d_sae)}
    assert [(r["hook_name"], int(r["feature_id"])) for r in rows] == list(zip(ranking.scores.hook_names, ranking.scores.feature_ids.tolist(), strict=True))
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert float(rows[0]["dim_cosine"]) == pytest.approx(1.0, abs=1e-5) and int(rows[0]["feature_id"]) == PLANTED
    payload = json.loads((report_dir / "features.json").read_text())
    assert len(payload["rows"]) == len(rows) and len(payload["top"]) == TOP_N
    first = payload["top"][0]
    assert (first["hook_name"], first["feature_id"], len(first["promoted"])) == (PLANTED_HOOK, PLANTED, 10)
    assert sum(first["histogram"]["harmful"]) == len(HARMFUL)
    assert sorted(p.name for p in report_dir.iterdir()) == sorted(REPORT_FILES)  # no partial files left


def test_html_shows_the_top_features_with_embedded_plots(report_dir, ranking):
    page = (report_dir / "report.html").read_text()
    for detail in ranking.features:
        assert f"{detail.hook_name} · feature {detail.feature_id}</h2>" in page
        assert f'href="#f{detail.rank}"' in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == TOP_N + 1  # overview + one histogram per feature
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert 'class="scored"' in page and "promoted tokens" in page and "<script" not in page


def test_failed_rewrite_keeps_the_previous_report(ranking, tmp_path, monkeypatch):
    import featsteer.files as files

    write_feature_report(ranking, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in REPORT_FILES}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(files.os, "replace", broken)
    with pytest.raises(RuntimeError):
        write_feature_report(ranking, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in REPORT_FILES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORT_FILES)


@pytest.fixture(scope="module")
def bounded(saes, acts):
    """The SAEs with a norm bound on the planted one at the median last-token norm: about half the rows lie above it."""
    import copy

    bounded = copy.deepcopy(saes)
    norms = torch.cat([a.hook(PLANTED_HOOK) for a in acts.values()]).norm(dim=-1)
    bounded[PLANTED_HOOK].cfg.metadata.featsteer_max_norm = float(norms.median())
    return bounded


def test_ranking_and_its_shading_leave_out_rows_above_the_saes_norm_bound(model, bounded, acts):
    """Every splice passes rows above the bound through unedited (as `max_feature_activations` leaves them out)."""
    from featsteer.feature_report import _feature_section
    from featsteer.features import decoder_norms, score_feature_activations
    from featsteer.sae import encode_activations

    sae, bound = bounded[PLANTED_HOOK], bounded[PLANTED_HOOK].cfg.metadata.featsteer_max_norm
    inside = {label: a.hook(PLANTED_HOOK)[a.hook(PLANTED_HOOK).norm(dim=-1) <= bound] for label, a in acts.items()}
    assert 2 <= inside["harmful"].shape[0] < len(HARMFUL) or 2 <= inside["harmless"].shape[0] < len(HARMLESS)
    expected = score_feature_activations(encode_activations(sae, inside["harmful"]), encode_activations(sae, inside["harmless"]), PLANTED_HOOK,
                                         decoder_norm=decoder_norms(sae))
    ranking = rank_features(model, bounded, HARMFUL, HARMLESS, top_n=TOP_N)
    planted = ranking.scores.for_hook(PLANTED_HOOK)
    order = planted.feature_ids.argsort()
    for name, values in expected.metrics.items():
        torch.testing.assert_close(planted.metrics[name][order], values, equal_nan=True)
    counts = ranking.provenance["rows_outside_domain"]
    assert counts == {PLANTED_HOOK: {label: len(prompts) - inside[label].shape[0] for label, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS))}}
    detail = next(d for d in ranking.features if d.hook_name == PLANTED_HOOK)
    assert detail.harmful_activations.shape == (inside["harmful"].shape[0],)
    shown = capture(model, [e.prompt for e in detail.examples], PLANTED_HOOK, positions="all", progress=False)
    outside = [tuple((shown.hook(PLANTED_HOOK)[shown.prompt_index == i].norm(dim=-1) > bound).tolist()) for i in range(len(detail.examples))]
    assert [e.outside for e in detail.examples] == outside and any(any(flags) for flags in outside)
    assert all(not e.outside[-1] for e in detail.examples)  # the scored last token of an example is within the bound
    section = _feature_section(detail)
    assert 'class="outside"' in section and "rgba(255,140,0,1.00)" in section


def test_compare_clamps_scale_by_maxima_within_the_norm_bound(model, bounded, acts):
    from featsteer.compare import rank_sae_features
    from featsteer.sae import encode_activations

    sae, bound = bounded[PLANTED_HOOK], bounded[PLANTED_HOOK].cfg.metadata.featsteer_max_norm
    rows = acts["harmful"].hook(PLANTED_HOOK)
    expected = encode_activations(sae, rows[rows.norm(dim=-1) <= bound]).double().amax(0).clamp_min(0.0)
    assert not torch.equal(expected, encode_activations(sae, rows).double().amax(0).clamp_min(0.0))
    assert torch.equal(rank_sae_features(model, bounded, HARMFUL, HARMLESS).harmful_max[PLANTED_HOOK], expected)


def test_scoring_with_too_few_rows_within_the_bound_is_one_clear_error(bounded, acts):
    import copy

    tight = copy.deepcopy(bounded)
    tight[PLANTED_HOOK].cfg.metadata.featsteer_max_norm = 0.0
    with pytest.raises(FeatsteerError, match=r"blocks\.1\.hook_resid_post: only 0 harmful and 0 harmless rows are within the SAE's norm bound"):
        score_features(tight, acts["harmful"], acts["harmless"])


def test_ranking_keys():
    assert ranking_key("differential") == "mean_difference"
    assert ranking_key("abs_differential") == "abs_mean_difference"
    assert ranking_key("cohens_d") == "cohens_d"
    with pytest.raises(FeatsteerError, match="unknown ranking metric 'bogus'"):
        ranking_key("bogus")


@pytest.fixture(scope="module")
def sae_dir(saes, tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    for hook, sae in saes.items():
        sae.save_model(root / hook)
    random_sae("topk", d_in=32, hook=PLANTED_HOOK).save_model(root.parent / "narrow_sae")
    return root


def test_sae_sources(sae_dir, saes, model):
    assert list(load_sae_source(sae_dir, model)) == [OTHER_HOOK, PLANTED_HOOK]
    single = load_sae_source(sae_dir / PLANTED_HOOK, model)
    assert list(single) == [PLANTED_HOOK] and torch.equal(single[PLANTED_HOOK].W_dec, saes[PLANTED_HOOK].W_dec)


def _run(capsys, *argv):
    from featsteer.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_rank_features_prints_the_top_features(capsys, sae_dir, tmp_path):
    code, out, _ = _run(capsys, "rank-features", "--model", "tiny:llama", "--sae", str(sae_dir), "--harmful", "builtin:harmful:train",
                        "--harmless", "builtin:harmless:train", "--n", "10", "--top", "2", "--by", "differential", "--out", str(tmp_path / "r"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "hook", "feature", "composite", "differential", "AUROC", "DIM", "cos"]
    assert lines[1].split()[:3] == ["1", PLANTED_HOOK, str(PLANTED)] and len(lines[2].split()) == 7
    assert "ranked 256 features of 2 SAE(s)" in out and f"wrote {tmp_path / 'r'}/report.html" in out
    assert all((tmp_path / "r" / name).is_file() for name in REPORT_FILES)


def test_cli_rank_features_says_which_rows_it_left_out(capsys, bounded, acts, tmp_path):
    for hook, sae in bounded.items():
        sae.save_model(tmp_path / "saes" / hook)
    code, out, _ = _run(capsys, "rank-features", "--model", "tiny:llama", "--sae", str(tmp_path / "saes"), "--harmful", "builtin:harmful:train",
                        "--harmless", "builtin:harmless:train", "--n", "10", "--top", "2", "--out", str(tmp_path / "r"))
    bound = bounded[PLANTED_HOOK].cfg.metadata.featsteer_max_norm
    counts = {label: int((a.hook(PLANTED_HOOK).norm(dim=-1) > bound).sum()) for label, a in acts.items()}
    note = (f"Rows above an SAE's norm bound, which every splice passes through unedited, are not scored ({PLANTED_HOOK}: "
            f"{counts['harmful']} harmful, {counts['harmless']} harmless).")
    assert code == 0 and out.rstrip().endswith(note) and note in (tmp_path / "r" / "report.html").read_text()
    assert json.loads((tmp_path / "r" / "features.json").read_text())["provenance"]["rows_outside_domain"] == {PLANTED_HOOK: counts}


@pytest.mark.parametrize(
    ("sae", "extra", "message"),
    [
        ("{tmp}/no-such-saes", [], "not found"),
        ("{narrow}", [], "SAE width mismatch"),
        ("{saes}", ["--harmful", "{tmp}/empty.txt"], "no prompts in"),
        ("{saes}", ["--by", "bogus"], "unknown ranking metric"),
        ("{saes}", ["--top", "0"], "--top must be at least 1"),
        ("{saes}", ["--positions", "middle"], "unknown position"),
        ("{empty_dir}", [], "holds no SAE folders"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(capsys, sae_dir, tmp_path, sae, extra, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "empty_dir").mkdir()
    names = {"tmp": tmp_path, "saes": sae_dir, "narrow": sae_dir.parent / "narrow_sae", "empty_dir": tmp_path / "empty_dir"}
    argv = ["rank-features", "--model", "tiny:llama", "--sae", sae.format(**names), "--harmful", "builtin:harmful",
            "--harmless", "builtin:harmless", "--n", "4", "--out", str(tmp_path / "out")]
    code, _, err = _run(capsys, *argv, *[e.format(**names) for e in extra])
    assert code == 2
    assert err.startswith("featsteer: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_all_token_ranking_leaves_out_the_head_the_sae_was_not_trained_on(capsys, model, saes, tmp_path):
    """With `featsteer_first_position` 3, an all-token ranking scores, plots and underlines only tokens 3 on, and the
    command, report and features.json say how many head rows it left out."""
    import copy

    from featsteer.sae import encode_activations

    headed = copy.deepcopy(saes)
    for sae in headed.values():
        sae.cfg.metadata.featsteer_first_position = 3
    all_tokens = {label: capture(model, list(prompts), [PLANTED_HOOK], positions="all", progress=False)
                  for label, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS))}
    ranking = rank_features(model, headed, HARMFUL, HARMLESS, positions="all", top_n=2)
    counts = {label: 3 * len(prompts) for label, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS))}
    assert ranking.provenance["rows_in_untrained_head"] == {OTHER_HOOK: counts, PLANTED_HOOK: counts}
    detail = next(d for d in ranking.features if d.hook_name == PLANTED_HOOK)
    trained = all_tokens["harmful"].hook(PLANTED_HOOK)[all_tokens["harmful"].position >= 3]
    torch.testing.assert_close(detail.harmful_activations, encode_activations(headed[PLANTED_HOOK], trained)[:, detail.feature_id])
    assert detail.examples and all(e.scored == (False,) * 3 + (True,) * (len(e.tokens) - 3) for e in detail.examples)
    for hook, sae in headed.items():
        sae.save_model(tmp_path / "saes" / hook)
    code, out, _ = _run(capsys, "rank-features", "--model", "tiny:llama", "--sae", str(tmp_path / "saes"), "--harmful", "builtin:harmful:train",
                        "--harmless", "builtin:harmless:train", "--n", "10", "--top", "2", "--positions", "all", "--out", str(tmp_path / "r"))
    note = (f"Rows of the chat-template head an SAE was not trained on, which every splice leaves unedited, are not scored ({OTHER_HOOK}: "
            f"30 harmful, 30 harmless; {PLANTED_HOOK}: 30 harmful, 30 harmless).")
    assert code == 0 and out.rstrip().endswith(note) and note in (tmp_path / "r" / "report.html").read_text()
    assert json.loads((tmp_path / "r" / "features.json").read_text())["provenance"]["rows_in_untrained_head"] == {OTHER_HOOK: counts, PLANTED_HOOK: counts}


def test_dim_direction_is_taken_over_the_rows_the_features_are_scored_on(model, saes, bounded, acts):
    """The DIM direction the report compares decoder rows with leaves out what the scores leave out: the chat-template head
    of an all-token capture (it used to average those rows in) and rows above the SAE's norm bound."""
    import copy

    headed = copy.deepcopy(saes)
    for sae in headed.values():
        sae.cfg.metadata.featsteer_first_position = 3
    all_tokens = {label: capture(model, list(prompts), [PLANTED_HOOK], positions="all", progress=False)
                  for label, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS))}

    def dim_of(keep) -> torch.Tensor:
        difference = torch.sub(*(a.hook(PLANTED_HOOK)[keep(a)].double().mean(0) for a in (all_tokens["harmful"], all_tokens["harmless"])))
        return (difference / difference.norm()).float()

    ranking = rank_features(model, headed, HARMFUL, HARMLESS, positions="all", top_n=1, n_examples=0)
    expected, pooled = dim_of(lambda a: a.position >= 3), dim_of(lambda a: a.position >= 0)
    assert float(expected @ pooled) < 1 - 1e-4  # the head rows do move the direction
    torch.testing.assert_close(ranking.dim[PLANTED_HOOK], expected, atol=1e-6, rtol=1e-6)
    rows = headed[PLANTED_HOOK].W_dec.detach().double()
    torch.testing.assert_close(ranking.dim_cosines[PLANTED_HOOK], rows @ expected.double() / rows.norm(dim=-1), atol=1e-5, rtol=1e-5)

    bound = bounded[PLANTED_HOOK].cfg.metadata.featsteer_max_norm
    inside = [a.hook(PLANTED_HOOK)[a.hook(PLANTED_HOOK).norm(dim=-1) <= bound].double().mean(0) for a in (acts["harmful"], acts["harmless"])]
    ranking = rank_features(model, bounded, HARMFUL, HARMLESS, top_n=1, n_examples=0)
    torch.testing.assert_close(ranking.dim[PLANTED_HOOK], ((inside[0] - inside[1]) / (inside[0] - inside[1]).norm()).float(), atol=1e-6, rtol=1e-6)


def test_the_untrained_head_does_not_set_the_shading_scale(model, saes):
    """Shown tokens before the SAE's `featsteer_first_position` are greyed out, not shaded, and the strongest token a splice
    can edit sets each feature's scale (a head token used to: features 46 and 78 of this SAE fire harder there)."""
    import copy

    from featsteer.feature_report import _feature_section

    headed = copy.deepcopy(saes)
    for sae in headed.values():
        sae.cfg.metadata.featsteer_first_position = 3
    ranking = rank_features(model, headed, HARMFUL, HARMLESS, top_n=16)
    louder_head = 0
    for detail in (d for d in ranking.features if d.examples):
        assert all(e.head == (True,) * 3 + (False,) * (len(e.tokens) - 3) for e in detail.examples)
        scale = max(max(e.activations[3:]) for e in detail.examples)
        louder_head += max(max(e.activations[:3]) for e in detail.examples) > scale
        section = _feature_section(detail)
        for example, shown in zip(detail.examples, re.findall(r'<div class="toks">(.*?)</div>', section), strict=True):
            spans = re.findall(r"<span([^>]*)>", shown)
            assert all(' class="head"' in span and "background" not in span for span in spans[:3])
            alphas = [float(re.search(r"rgba\(255,140,0,([\d.]+)\)", span).group(1)) for span in spans[3:]]
            assert alphas == [round(min(max(v / scale, 0.0), 1.0), 2) for v in example.activations[3:]]
    assert louder_head >= 1


def test_csv_and_json_rows_say_what_their_magnitudes_are_in(report_dir, model, saes, tmp_path):
    """Every row of features.csv and features.json names its units (and `/scale` under normalize) and its SAE's input
    normalisation, so rows of a layer_norm SAE (per unit of normalised input) are not read as the plain SAE's."""
    from sae_lens import StandardSAE, StandardSAEConfig

    with (report_dir / "features.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["units"], r["input_normalization"]) for r in rows} == {("activation", "none")}
    torch.manual_seed(0)
    normed = StandardSAE(StandardSAEConfig(d_in=model.d_model, d_sae=16, normalize_activations="layer_norm",
                                           metadata=SAEMetadata(hook_name=PLANTED_HOOK))).eval()
    ranking = rank_features(model, {OTHER_HOOK: saes[OTHER_HOOK], PLANTED_HOOK: normed}, HARMFUL, HARMLESS, top_n=1, n_examples=0,
                            units="residual", normalize=True)
    write_feature_report(ranking, tmp_path)
    with (tmp_path / "features.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["hook_name"], r["units"], r["input_normalization"]) for r in rows} == {
        (OTHER_HOOK, "residual/scale", "none"), (PLANTED_HOOK, "residual/scale", "layer_norm")}
    payload = json.loads((tmp_path / "features.json").read_text())["rows"]
    assert [(r["units"], r["input_normalization"]) for r in payload] == [(r["units"], r["input_normalization"]) for r in rows]


@pytest.mark.parametrize("by", ["cohens_d", "abs_harmful_frequency"])
def test_cli_rank_features_prints_the_column_it_ranks_by(capsys, sae_dir, tmp_path, by):
    """Ranked by a score the table did not print (`--by cohens_d`), the printed rows looked unordered: composite,
    differential and AUROC were shown, the key was not. The key joins the table as a column then."""
    code, out, _ = _run(capsys, "rank-features", "--model", "tiny:llama", "--sae", str(sae_dir), "--harmful", "builtin:harmful:train",
                        "--harmless", "builtin:harmless:train", "--n", "10", "--top", "3", "--by", by, "--out", str(tmp_path / "r"))
    assert code == 0
    metric = by.removeprefix("abs_")
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "hook", "feature", "composite", "differential", "AUROC", metric, "DIM", "cos"]
    rows = json.loads((tmp_path / "r" / "features.json").read_text())["rows"][:3]
    printed = [float(line.split()[6]) for line in lines[1:4]]
    assert printed == [pytest.approx(row[metric], abs=5e-4) for row in rows]
    ranked = [abs(v) for v in printed] if by.startswith("abs_") else printed
    assert ranked == sorted(ranked, reverse=True)


def test_a_non_finite_score_is_written_as_null_not_a_failed_report(ranking, tmp_path):
    """features.json was written with allow_nan=False and no conversion, so one NaN score in a top feature's detail
    (a Cohen's d of a feature that never varies) stopped the whole report; now it is null, as in features.csv."""
    import dataclasses

    first = ranking.features[0]
    broken = dataclasses.replace(first, scores={**first.scores, "cohens_d": float("nan"), "composite": float("inf")})
    odd = dataclasses.replace(ranking, features=(broken, *ranking.features[1:]))
    saved = json.loads((write_feature_report(odd, tmp_path) / "features.json").read_text())
    assert saved["top"][0]["scores"]["cohens_d"] is None and saved["top"][0]["scores"]["composite"] is None
    assert saved["top"][0]["feature_id"] == first.feature_id and "NaN" not in (tmp_path / "features.json").read_text()


def test_tied_ranks_are_marked_in_the_table_the_report_and_the_json(capsys, sae_dir, tmp_path):
    """`rank-features --by auroc` printed ranks 1-5 for five features at AUROC 1.000 as if the order among them meant
    something; it is only the tie-break (layer, then feature id). Tied ranks print as `=N`, with a note naming them."""
    code, out, err = _run(capsys, "rank-features", "--model", "tiny:llama", "--sae", str(sae_dir), "--harmful", "builtin:harmful:train",
                          "--harmless", "builtin:harmless:train", "--n", "10", "--top", "6", "--by", "harmful_frequency",
                          "--out", str(tmp_path / "r"))
    assert code == 0, err
    saved = json.loads((tmp_path / "r" / "features.json").read_text())
    scores = [row["harmful_frequency"] for row in saved["rows"]]
    runs = [(i + 1, j) for i in range(6) for j in range(i + 2, len(scores) + 1)
            if scores[i:j] == [scores[i]] * (j - i) and (i == 0 or scores[i - 1] != scores[i]) and (j == len(scores) or scores[j] != scores[i])]
    assert runs and [tuple(group[:2]) for group in saved["ties"]] == runs  # premise: the top 6 hold a tie
    first, last, value = saved["ties"][0]
    printed = [line.split()[0] for line in out.splitlines()[1:7]]
    assert printed == [f"={rank}" if any(a <= rank <= b for a, b in runs) else str(rank) for rank in range(1, 7)]
    note = f"ranks {first}-{last} tied at {value:.6g}"
    assert note in out and "ordered by layer, then feature id" in out
    assert note in (tmp_path / "r" / "report.html").read_text()


def test_example_tokens_come_from_the_capture_without_tokenizing_the_prompts_again(model, saes, monkeypatch):
    """The examples' token strings were read from a second tokenization of every example prompt after the all-token
    capture had tokenized them: now each capture's one tokenization is the only one (encodes = prompts captured)."""
    import featsteer.feature_report as feature_report

    captured: list[int] = []
    encoded: list[str] = []
    original_capture, original_call = feature_report.capture, type(model.tokenizer).__call__

    def counting_capture(model_, prompts, *args, **kwargs):
        captured.append(len(prompts))
        return original_capture(model_, prompts, *args, **kwargs)

    def counting_call(self, text, *args, **kwargs):
        encoded.extend([text] if isinstance(text, str) else text)
        return original_call(self, text, *args, **kwargs)

    monkeypatch.setattr(feature_report, "capture", counting_capture)
    monkeypatch.setattr(type(model.tokenizer), "__call__", counting_call)
    ranking = rank_features(model, saes, HARMFUL, HARMLESS, top_n=TOP_N)
    shown = {e.prompt: e.tokens for d in ranking.features for e in d.examples}
    assert shown and len(captured) == 3  # harmful, harmless, then the examples' all-token capture
    assert len(encoded) == sum(captured)
    for prompt, tokens in shown.items():
        batch = model.tokenize([prompt])
        ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
        assert tokens == tuple(token_text(model.tokenizer, token) for token in ids)
