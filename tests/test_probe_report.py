"""The probe report's SAE sources: an SAE on any residual hook or on hook_z joins the sweep where its vectors live."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from featsteer.datasets import builtin_prompts
from featsteer.errors import FeatsteerError
from featsteer.features import decoder_directions, score_prompts
from featsteer.probe_report import probe_report, write_probe_report
from tests.test_sae_hook_z import heads_sae, narrow_heads_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def organism():
    from featsteer.models import load_model

    return load_model("organism")


def _pairs(n: int = 16):
    harmful, harmless = builtin_prompts("harmful", "train")[: 2 * n], builtin_prompts("harmless", "train")[: 2 * n]
    return (harmful[:n], harmless[:n]), (harmful[n:], harmless[n:])


def test_saes_off_the_swept_kind_join_at_the_next_resid_pre(tmp_path, caplog):
    model = narrow_heads_model()  # 3 layers, heads 4 x 8 = 32 wide, stream 64 wide
    saes = {
        "blocks.1.hook_resid_pre": heads_sae(64, reshape="none", hook="blocks.1.hook_resid_pre", seed=1),
        "blocks.0.attn.hook_z": heads_sae(32, hook="blocks.0.attn.hook_z", seed=2),
        "blocks.1.hook_mlp_out": heads_sae(64, reshape="none", hook="blocks.1.hook_mlp_out", seed=3),
        "blocks.2.hook_resid_post": heads_sae(64, reshape="none", hook="blocks.2.hook_resid_post", seed=4),
    }
    train, test = _pairs()
    with caplog.at_level(logging.WARNING, logger="featsteer.probe_report"):
        report = probe_report(model, train, test, n_effect=3, n_shuffles=1, saes=saes)
    assert "blocks.2.hook_resid_post" in caplog.text  # no resid_pre follows the last layer's output
    assert report.sae_sources == {
        "sae": {"blocks.1.hook_resid_pre": "blocks.1.hook_resid_pre"},
        "sae@attn_z": {"blocks.1.hook_resid_pre": "blocks.0.attn.hook_z"},
        "sae@mlp_out": {"blocks.2.hook_resid_pre": "blocks.1.hook_mlp_out"},
    }
    effects = {(e.source, e.layer) for e in report.effects}
    assert {("sae", 1), ("sae@attn_z", 1), ("sae@mlp_out", 2)} <= effects
    # the hook_z source is the top feature's decoder row written through W_O, signed towards harmful
    scores = score_prompts(model, {"blocks.0.attn.hook_z": saes["blocks.0.attn.hook_z"]}, list(train[0]), list(train[1]))
    top = int(scores.top(1).feature_ids[0])
    written = decoder_directions(saes["blocks.0.attn.hook_z"], top, model=model).bases[0, 0]
    row = next(r for r in report.cosines if r["hook"] == "blocks.1.hook_resid_pre")
    assert abs(row["sae~sae@attn_z"]) <= 1.0
    cosine_dim = row["dim~sae@attn_z"]
    from featsteer.activations import capture
    from featsteer.directions import find_directions

    acts = [capture(model, list(p), ["blocks.1.hook_resid_pre"], progress=False) for p in train]
    dim = find_directions(*acts, "dim").direction("blocks.1.hook_resid_pre")
    sign = torch.sign((acts[0].mean("blocks.1.hook_resid_pre") - acts[1].mean("blocks.1.hook_resid_pre")).float() @ written)
    assert cosine_dim == pytest.approx(float(dim @ (written * sign)), abs=1e-5)
    folder = write_probe_report(report, tmp_path / "p")
    page = (folder / "report.html").read_text()
    assert "blocks.0.attn.hook_z" in page and "sae@attn_z" in page
    assert (folder / "sweep.md").read_text().startswith("Swept: every layer.\nControl task: surface:first-words:1 (")
    some = dataclasses.replace(report, layers=[0, 2])  # sweep.md says which layers a --layers run asked for
    assert (write_probe_report(some, tmp_path / "q") / "sweep.md").read_text().startswith("Swept: layers 0, 2 (asked for).")


def test_an_sae_in_a_parallel_block_joins_the_sweep_where_the_stream_holds_it():
    """A parallel block (no `resid_mid`) writes both branches into its output and feeds both from its input. The probe
    report placed its `attn_out` and MLP norm halfway through the block as in a sequential one, while the selection's
    late-layer rule counted that `attn_out` at the block's output: an SAE on block 1's MLP input joined a `resid_post`
    sweep at block 1's output (after the block's own writes) instead of block 0's, which is block 1's input, and one on
    block 1's output joined an `attn_out` sweep at block 2's write. Both now read `models.stream_point`."""
    from featsteer.models import load_model
    from featsteer.probe_report import _carrier

    model = load_model("tiny:cohere")  # 3 parallel layers, 64 wide
    model.show_progress = False
    saes = {"blocks.1.ln2.hook_normalized": heads_sae(64, reshape="none", hook="blocks.1.ln2.hook_normalized", seed=1)}
    train, test = _pairs(8)
    report = probe_report(model, train, test, kind="resid_post", n_effect=2, n_shuffles=1, saes=saes)
    assert report.sae_sources == {"sae@ln2_normalized": {"blocks.0.hook_resid_post": "blocks.1.ln2.hook_normalized"}}
    assert _carrier(model, "blocks.1.hook_resid_post", model.hook_names(("attn_out",))) == "blocks.1.hook_attn_out"
    assert _carrier(model, "blocks.1.attn.hook_z", model.hook_names(("resid_pre",))) == "blocks.2.hook_resid_pre"
    from featsteer.models import stream_point

    sequential = load_model("organism")
    assert [stream_point(sequential.hook_site(f"blocks.1.hook_{kind}"), 4) for kind in ("resid_pre", "attn_out", "mlp_out")] == [1, 1.5, 2]
    assert [stream_point(model.hook_site(h), 3, True) for h in ("blocks.1.ln2.hook_normalized", "blocks.1.hook_attn_out")] == [1, 2]


def test_saes_no_swept_layer_follows_are_a_clear_error():
    model = narrow_heads_model()
    saes = {"blocks.2.hook_resid_post": heads_sae(64, reshape="none", hook="blocks.2.hook_resid_post", seed=4)}
    train, test = _pairs(8)
    with pytest.raises(FeatsteerError, match="none of the SAEs .* is read at or just before a swept hook"):
        probe_report(model, train, test, n_effect=2, n_shuffles=1, saes=saes, layers=[0, 1])


def test_probe_report_inputs_it_cannot_use_are_one_line_errors(organism):
    harmful, harmless = builtin_prompts("harmful", "train")[:12], builtin_prompts("harmless", "train")[:12]
    with pytest.raises(FeatsteerError, match="--positions all gives every token"):
        probe_report(organism, (harmful, harmless), (harmful, harmless), positions="all")
    # post_instruction used to be accepted and read at its last position only: the same numbers as --positions last
    with pytest.raises(FeatsteerError, match="only the last would be read"):
        probe_report(organism, (harmful, harmless), (harmful, harmless), positions="post_instruction")
    # 4 per class are too few now: the layer choice's 3 folds would leave the linear probe's own C search 2 per class
    with pytest.raises(FeatsteerError, match="need at least 5 training prompts per class; got 4 harmful"):
        probe_report(organism, (harmful[:4], harmless), (harmful, harmless))
    with pytest.raises(FeatsteerError, match="no resid_pre hook tells the two sets apart"):
        probe_report(organism, (harmful, harmful), (harmful, harmful))
    # a head-space direction is as wide as the stream here (5 heads x 32 = 160): it used to be ablated from the
    # residual writes as if it were a residual direction, giving refusal drops that mean nothing
    with pytest.raises(FeatsteerError, match="attn_z vectors are not residual-stream vectors"):
        probe_report(organism, (harmful, harmless), (harmful, harmless), kind="attn_z", layers=[1])
    # n_effect=-1 used to measure the effects on all test prompts but the last one, silently
    for n_effect, n_shuffles in ((-1, 5), (0, 5), (4, 0)):
        with pytest.raises(FeatsteerError, match="must be at least 1"):
            probe_report(organism, (harmful, harmless), (harmful, harmless), n_effect=n_effect, n_shuffles=n_shuffles)


def test_probe_report_reads_the_instruction_end(organism):
    train = builtin_prompts("harmful", "train")[:14], builtin_prompts("harmless", "train")[:14]
    test = builtin_prompts("harmful", "val")[:8], builtin_prompts("harmless", "val")[:8]
    report = probe_report(organism, train, test, positions="instruction_end", n_effect=4, n_shuffles=1)
    assert report.hooks and report.best("linear").accuracy > 0.8


def test_an_sae_at_a_hook_left_out_for_constant_activations_is_named_as_such(organism, caplog):
    from featsteer.sae import load_saes

    saes = load_saes("organism", organism)
    assert "blocks.0.hook_resid_pre" in saes  # the organism's layer-0 stream is the shared template token's embedding
    train, test = _pairs(8)
    with caplog.at_level(logging.WARNING, logger="featsteer.probe_report"):
        report = probe_report(organism, train, test, n_effect=2, n_shuffles=1, saes=saes)
    assert "blocks.0.hook_resid_pre read a hook where every prompt has the same activation" in caplog.text
    assert "no swept hook follows" not in caplog.text
    assert "blocks.0.hook_resid_pre" not in report.hooks


def test_first_words_are_lower_cased_without_edge_punctuation():
    from featsteer.probe_report import first_words

    assert first_words("How do I pick a lock?", 2) == "how do"
    assert first_words("What's the fastest way?", 1) == "what's"
    assert first_words("Hi, there... friend", 2) == "hi there" and first_words("Explain", 3) == "explain"


def test_the_report_uses_and_names_a_surface_control_by_default(organism, tmp_path):
    import json

    from featsteer.probe_report import _probe, first_words, surface_control
    from probes import SurfaceControl, layer_sweep

    train, test = _pairs(16)
    report = probe_report(organism, train, test, n_effect=1, n_shuffles=2, layers=[2])
    assert report.control == "surface:first-words:1"
    keys = {first_words(p, 1) for pair in (*train, *test) for p in pair}
    assert report.control_keys["n_keys"] == len(keys) and 0 < report.control_keys["seen_share"] <= 1
    # the sweep's control is the first-word SurfaceControl on the harmful-then-harmless rows of each split
    control = surface_control("first-words:1", train, test)
    assert isinstance(control, SurfaceControl) and control.train_keys == tuple(first_words(p, 1) for pair in train for p in pair)
    # the same rows, swept with the same control, give the report's numbers
    from featsteer.activations import capture

    hook = "blocks.2.hook_resid_pre"
    rows = [torch.cat([capture(organism, a, [hook]).at_position(hook), capture(organism, b, [hook]).at_position(hook)]).double().numpy()
            for a, b in (train, test)]
    labels = [[1] * len(a) + [0] * len(b) for a, b in (train, test)]
    (expected,) = layer_sweep({hook: (rows[0], labels[0], rows[1], labels[1])}, lambda: _probe("diffmean"), n_shuffles=2, cv=3,
                              control=control)
    assert report.sweep["diffmean"][0] == expected
    permutation = probe_report(organism, train, test, n_effect=1, n_shuffles=2, layers=[2], control="permutation")
    assert permutation.control == "permutation" and permutation.control_keys is None
    assert permutation.sweep["diffmean"][0].accuracy == expected.accuracy
    assert permutation.sweep["diffmean"][0].control_accuracy != expected.control_accuracy
    write_probe_report(report, tmp_path / "p")
    assert "\nControl task: surface:first-words:1 (labels a random function of the key" in (tmp_path / "p" / "sweep.md").read_text()
    assert json.loads((tmp_path / "p" / "results.json").read_text())["control"] == "surface:first-words:1"
    by_length = probe_report(organism, train, test, n_effect=1, n_shuffles=1, layers=[2], control=lambda prompt: len(prompt) > 60)
    assert by_length.control == "surface:<lambda>"


def test_a_bad_control_is_a_one_line_error(organism):
    train, test = _pairs(8)
    for spec in ("first-word:1", "first-words:0", "length", "shuffle"):
        with pytest.raises(FeatsteerError, match=f"control '{spec}': give first-words:N .* or permutation"):
            probe_report(organism, train, test, n_effect=1, n_shuffles=1, control=spec)
    with pytest.raises(FeatsteerError, match="gives all 16 training prompts the same key .* choose a finer key"):
        probe_report(organism, train, test, n_effect=1, n_shuffles=1, control=lambda prompt: "same")


def test_the_reports_effect_table_says_which_kl_it_gives(organism, tmp_path):
    """The effect table's KL is the first token's (`kl_first_token`), but its header read "KL harmless", which the compare
    report uses beside a KL along the responses: a reader comparing the two reports could not tell which one this was."""
    import re

    train, test = _pairs(8)
    report = probe_report(organism, train, test, n_effect=2, n_shuffles=1, layers=[2])
    page = (write_probe_report(report, tmp_path / "p") / "report.html").read_text()
    head = re.search(r"<tr><th>layer</th><th>source</th>(.*?)</tr>", page).group(1)
    assert head == "<th>held-out AUROC</th><th>refusal-score drop</th><th>first-token KL (harmless)</th>"


def test_the_sae_sources_are_listed_in_layer_order(organism, tmp_path):
    """The report's `sae:` notes and the printed `sae:` line followed the feature ranking, which put the best
    feature's SAE first: on the organism they read layers 3, 2, 1. They read down the layers now."""
    from featsteer.sae import load_sae_source

    train, test = _pairs()
    report = probe_report(organism, train, test, n_effect=2, n_shuffles=1, saes=load_sae_source("organism", organism))
    swept = list(report.sae_sources["sae"])
    assert swept == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre", "blocks.3.hook_resid_pre"]
    page = (write_probe_report(report, tmp_path / "p") / "report.html").read_text()
    notes = [page.index(f"the top composite feature of the SAE at {hook}") for hook in swept]
    assert notes == sorted(notes)
