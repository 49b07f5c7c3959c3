"""Reading a direction: cosines across layers, class means on it, and its logit lens."""

from __future__ import annotations

import json

import pytest
import torch

from featsteer.activations import capture
from featsteer.datasets import builtin_prompts
from featsteer.directions import (
    DirectionSet,
    class_projections,
    difference_in_means,
    head_attribution,
    layer_cosines,
    logit_lens,
)
from featsteer.directions.geometry import token_text
from featsteer.errors import FeatsteerError
from featsteer.models import load_model
from featsteer.pipeline import DirectionConfig, find_refusal_direction


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_lens_reads_the_direction_through_the_final_norm_scale(family):
    model = load_model(f"tiny:{family}")
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(4))
    lens = logit_lens(model, r, k=5)
    hf = model.model
    head = hf.get_output_embeddings().weight.detach().double()
    unit = (r / r.norm()).double()
    if family == "gpt2":  # LayerNorm: centre, then the weight (its bias reaches every vector alike)
        expected = head @ (hf.transformer.ln_f.weight.detach().double() * (unit - unit.mean()))
    else:
        expected = head @ (hf.model.norm.weight.detach().double() * unit)
    top, bottom = torch.topk(expected, 5).indices.tolist(), torch.topk(-expected, 5).indices.tolist()
    assert [t for t, _ in lens.promoted] == [token_text(model.tokenizer, i) for i in top]
    assert [t for t, _ in lens.suppressed] == [token_text(model.tokenizer, i) for i in bottom]
    values = [v for _, v in lens.promoted]
    assert values == sorted(values, reverse=True) and lens.suppressed[0][1] < 0 < values[-1]
    with pytest.raises(FeatsteerError, match="d_model is"):
        logit_lens(model, torch.ones(model.d_model + 1))


def test_the_organisms_refusal_direction_promotes_refusal_openers():
    model = load_model("organism")
    acts = [capture(model, builtin_prompts(kind, "train"), model.hook_names(("resid_pre",)), positions="last", progress=False)
            for kind in ("harmful", "harmless")]
    dim = difference_in_means(*acts)
    lens = logit_lens(model, dim.direction("blocks.3.hook_resid_pre"), k=3)
    assert {"I", "Sorry"} & {t for t, _ in lens.promoted}, lens  # it answers "I'm sorry, but ..." / "Sorry, ..."
    flipped = logit_lens(model, -dim.direction("blocks.3.hook_resid_pre"), k=3)
    assert [t for t, _ in flipped.promoted] == [t for t, _ in lens.suppressed]
    # class means on the direction: DIM is the unit mean difference, so the gap of the means is its norm
    rows = class_projections(*acts, dim.direction("blocks.2.hook_resid_pre"))
    by_hook = {row.hook: row for row in rows}
    gap = by_hook["blocks.2.hook_resid_pre"].harmful_mean - by_hook["blocks.2.hook_resid_pre"].harmless_mean
    assert gap == pytest.approx(dim.scores["mean_diff_norm"][2], rel=1e-5)
    assert by_hook["blocks.2.hook_resid_pre"].gap_sd > 2 and by_hook["blocks.0.hook_resid_pre"].gap_sd == 0.0


def test_layer_cosines_match_pairwise_cosines_and_reject_what_they_cannot_read():
    g = torch.Generator().manual_seed(1)
    bases = torch.nn.functional.normalize(torch.randn(4, 1, 8, generator=g), dim=-1)  # a DirectionSet holds unit vectors
    bases[0] = 0  # layer 0: every prompt ends the same way
    hooks = tuple(f"blocks.{i}.hook_resid_pre" for i in range(3)) + ("blocks.0.hook_resid_pre",)
    directions = DirectionSet(bases, hooks, (-1, -1, -1, -2), "dim", {}, {})
    names, matrix = layer_cosines(directions, -1)
    assert names == list(hooks[:3]) and torch.equal(matrix, matrix.T) and torch.equal(matrix.diagonal(), torch.ones(3, dtype=torch.float64))
    assert float(matrix[1, 2]) == pytest.approx(float(torch.nn.functional.cosine_similarity(bases[1, 0], bases[2, 0], dim=0)), abs=1e-6)
    assert float(matrix[0, 1:].abs().sum()) == 0.0
    with pytest.raises(FeatsteerError, match="no direction at position -5"):
        layer_cosines(directions, -5)
    with pytest.raises(FeatsteerError, match="rank-1"):
        layer_cosines(DirectionSet(torch.linalg.qr(torch.randn(2, 8, 2)).Q.transpose(1, 2).contiguous(), hooks[:2], (-1, -1), "svd", {}, {}), -1)


def test_direction_result_geometry_and_the_directions_command(tmp_path):
    from featsteer.cli import main

    model = load_model("organism")
    harmful, harmless = builtin_prompts("harmful", "train").head(24), builtin_prompts("harmless", "train").head(24)
    result = find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=4), keep_activations=True)
    geometry = result.geometry(model, k=4)
    assert geometry.hook == result.selection.chosen.hook and len(geometry.projections) == model.n_layers
    assert len(geometry.lens.promoted) == 4 and "## Logit lens" in geometry.markdown() and "## Heads that write it" in geometry.markdown()
    assert geometry.heads.n_prompts == (len(result.train[0]), len(result.train[1])) == (18, 18) and geometry.heads.harmful.shape == (model.n_layers, model.n_heads)
    assert float(geometry.heads.difference.sum()) > 0  # taken together the heads write the direction more on harmful prompts
    repair = geometry.repair  # the direction ablated at its own hook only, read on the 6 + 6 validation prompts
    assert repair.at == geometry.hook and (repair.n_harmful, repair.n_harmless) == (6, 6) and "## Does the model write it back?" in geometry.markdown()
    assert repair.refusal["every_write"] < repair.refusal["unedited"] and all(abs(row.gap_on_r["every_write"]) < 1e-3 for row in repair.rows)
    assert result.geometry(model, repair_prompts=None).repair is None
    readers = geometry.readers  # read-side ablation on the same validation prompts, per group and per block
    assert (readers.n_harmful, readers.n_harmless) == (6, 6) and len(readers.rows) == 6 + 2 * model.n_layers
    assert "## Which components read it?" in geometry.markdown()
    sizes = geometry.sample_sizes  # one sample-size estimate per captured hook, at the chosen position, from the 18 + 18 train prompts
    assert [row.hook for row in sizes] == list(result.activations[0].hook_names) and {(row.n_harmful, row.n_harmless) for row in sizes} == {(18, 18)}
    chosen = next(row for row in sizes if row.hook == geometry.hook)
    assert 0 < chosen.cosine <= 1 and chosen.needed[0.9] < chosen.needed[0.99] and "## Enough prompts?" in geometry.markdown()
    assert result.sample_sizes(draws=4, seed=1)[0].hook == sizes[0].hook
    quick = result.geometry(model, repair_prompts=None, reader_layers=False)
    assert len(quick.readers.rows) == 6 and result.geometry(model, reader_prompts=None).readers is None
    plain = find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=4))
    with pytest.raises(FeatsteerError, match="keep_activations=True"):
        plain.geometry(model)
    with pytest.raises(FeatsteerError, match="keep_activations=True"):
        plain.sample_sizes()
    out = tmp_path / "dirs"
    assert main(["directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
                 "--n", "24", "--n-select", "4", "--out", str(out)]) == 0
    saved = json.loads((out / "geometry.json").read_text())
    assert saved["hook"] == json.loads((out / "selection.json").read_text())["chosen"]["hook"]
    assert len(saved["cosines"]) == model.n_layers and (out / "layer_cosines.png").read_bytes()[:4] == b"\x89PNG"
    assert "| hook | harmful mean |" in (out / "geometry.md").read_text()
    assert saved["self_repair"]["at"] == saved["hook"] and saved["self_repair"]["rows"]
    assert saved["readers"]["rows"][0]["readers"] == "every residual write" and len(saved["readers"]["rows"]) == 6 + 2 * model.n_layers
    assert len(saved["sample_sizes"]) == model.n_layers and set(saved["sample_sizes"][0]["needed"]) == {"0.9", "0.95", "0.99"}
    assert main(["directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
                 "--n", "24", "--n-select", "4", "--geometry", "quick", "--out", str(tmp_path / "quick")]) == 0
    assert len(json.loads((tmp_path / "quick" / "geometry.json").read_text())["readers"]["rows"]) == 6
    assert main(["directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
                 "--n", "24", "--n-select", "4", "--geometry", "estimate", "--out", str(tmp_path / "estimate")]) == 0
    estimated = json.loads((tmp_path / "estimate" / "geometry.json").read_text())["readers"]["rows"]
    assert len(estimated) == 6 + 2 * model.n_layers and estimated[-1]["refusal"] is None and estimated[-1]["estimate"] is not None
    assert main(["directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
                 "--n", "24", "--n-select", "4", "--geometry", "off", "--out", str(tmp_path / "off")]) == 0
    assert (tmp_path / "off" / "selection.json").is_file() and not (tmp_path / "off" / "geometry.md").exists()


def test_self_repair_and_readers_read_held_out_prompts_when_given(capsys, tmp_path):
    """geometry.md's self-repair and read-side ablation read the validation prompts the direction was selected on, whose
    refusal log-odds carry the pick's bias (organism +4.06 there, +3.23 held out): `held_out=` / `directions
    --eval-harmful/--eval-harmless` read other prompts instead, and the output says which prompts they were."""
    from featsteer.cli import main
    from featsteer.directions.readers import direction_readers
    from featsteer.directions.repair import self_repair

    model = load_model("organism")
    harmful, harmless = builtin_prompts("harmful", "train").head(24), builtin_prompts("harmless", "train").head(24)
    result = find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=4), keep_activations=True)
    held = builtin_prompts("harmful", "test").head(5), builtin_prompts("harmless", "test").head(5)
    geometry = result.geometry(model, head_prompts=None, reader_layers=False, held_out=held)
    r = result.candidates.bases[result.selection.chosen.index, 0]
    expected = self_repair(model, r, list(held[0]), list(held[1]), at=geometry.hook)
    assert (geometry.repair.n_harmful, geometry.repair.n_harmless) == (5, 5)
    assert geometry.repair.refusal["unedited"] == pytest.approx(expected.refusal["unedited"], abs=1e-6)
    readers = direction_readers(model, r, list(held[0]), list(held[1]), per_layer=False)
    assert geometry.readers.unedited == pytest.approx(readers.unedited, abs=1e-6)
    assert geometry.read_on["prompts"] == "held-out" and geometry.read_on["harmful"] == "builtin:harmful:test"
    assert "Read on held-out prompts (builtin:harmful:test, builtin:harmless:test)." in geometry.markdown()
    default = result.geometry(model, head_prompts=None, reader_layers=False)
    assert default.read_on["prompts"] == "validation" and "selected on" in default.markdown()
    assert default.repair.refusal["unedited"] != pytest.approx(geometry.repair.refusal["unedited"], abs=1e-3)
    common = ["directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
              "--n", "24", "--n-select", "4", "--geometry", "quick"]
    capsys.readouterr()
    assert main([*common, "--eval-harmful", "builtin:harmful:test", "--eval-harmless", "builtin:harmless:test", "--out", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "self-repair and read-side ablation read on held-out prompts (builtin:harmful:test, builtin:harmless:test):" in out
    saved = json.loads((tmp_path / "h" / "geometry.json").read_text())
    assert saved["read_on"]["prompts"] == "held-out" and saved["self_repair"]["n_harmful"] == min(64, len(builtin_prompts("harmful", "test")))
    assert main([*common, "--out", str(tmp_path / "v")]) == 0
    assert "read on the validation prompts the direction was selected on" in capsys.readouterr().out
    assert main([*common, "--eval-harmful", "builtin:harmful:test", "--out", str(tmp_path / "one")]) == 2
    assert "give --eval-harmful and --eval-harmless together" in capsys.readouterr().err and not (tmp_path / "one").exists()


def test_directions_eval_n_cuts_what_geometry_reads(capsys, tmp_path):
    """`directions --eval-n N`: geometry.md's self-repair and read-side ablation read the first N prompts of each
    held-out set (before, every held-out prompt was loaded and 64 read whatever N), or of the validation sets without
    them; with --geometry off nothing reads it, which is an error before the model loads."""
    import inspect

    from featsteer.cli import GEOMETRY_EVAL_N, main
    from featsteer.pipeline import DirectionResult

    defaults = inspect.signature(DirectionResult.geometry).parameters
    assert defaults["repair_prompts"].default == defaults["reader_prompts"].default == GEOMETRY_EVAL_N
    common = ["directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
              "--n", "24", "--n-select", "4", "--geometry", "quick", "--eval-n", "3"]
    held = ["--eval-harmful", "builtin:harmful:test", "--eval-harmless", "builtin:harmless:test"]
    assert main([*common, *held, "--out", str(tmp_path / "h")]) == 0
    saved = json.loads((tmp_path / "h" / "geometry.json").read_text())
    counts = {(part, saved[part]["n_harmful"], saved[part]["n_harmless"]) for part in ("self_repair", "readers")}
    assert counts == {("self_repair", 3, 3), ("readers", 3, 3)}
    first = builtin_prompts("harmful", "test").head(3)
    assert saved["read_on"]["prompts"] == "held-out" and saved["read_on"]["harmful_sha256"] == first.sha256
    assert main([*common, "--out", str(tmp_path / "v")]) == 0
    saved = json.loads((tmp_path / "v" / "geometry.json").read_text())
    assert saved["read_on"]["prompts"] == "validation" and (saved["readers"]["n_harmful"], saved["readers"]["n_harmless"]) == (3, 3)
    # the hashes name the prompts read, the first 3 validation prompts, not the whole validation set
    assert (saved["read_on"]["n_harmful"], saved["read_on"]["n_harmless"]) == (3, 3)
    from featsteer.pipeline import DirectionConfig, split

    val = split(builtin_prompts("harmful", "train").head(24), DirectionConfig.val_fraction)[1]
    assert len(val) > 3 and saved["read_on"]["harmful_sha256"] == val.head(3).sha256 != val.sha256
    capsys.readouterr()
    off = [arg if arg != "quick" else "off" for arg in common]
    assert main([*off, "--out", str(tmp_path / "off")]) == 2
    assert "--geometry off writes no geometry.md" in capsys.readouterr().err and not (tmp_path / "off").exists()
    assert main([*common[:-1], "0", "--out", str(tmp_path / "zero")]) == 2
    assert "--eval-n must be a positive number" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3", "tl-gpt2"])
def test_head_writes_add_up_to_the_attention_output(family, tmp_path):
    """The heads' projections on a direction, plus the output projection's bias, are the attention output's projection."""
    from featsteer.testing import hooked_gpt2, saved_tokenizer, tiny_model

    if family == "tl-gpt2":
        hf, tokenizer = tiny_model("gpt2")
        model = load_model(hooked_gpt2(hf, saved_tokenizer(tokenizer, tmp_path)))
    else:
        model = load_model(f"tiny:{family}")
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(2))
    harmful, harmless = builtin_prompts("harmful", "test").head(5).to_list(), builtin_prompts("harmless", "test").head(3).to_list()
    heads = head_attribution(model, harmful, harmless, r, batch_size=2)
    assert heads.harmful.shape == (model.n_layers, model.n_heads) and heads.n_prompts == (5, 3)
    unit_r = (r / r.norm()).double()
    acts = capture(model, harmful, model.hook_names(("attn_out",)), positions="last", progress=False)
    for writer in (w for w in model.residual_writers() if w.kind == "attn_out"):
        bias = writer.read()[1]
        bias_part = 0.0 if bias is None else float(bias.double() @ unit_r)
        expected = float(acts.at_position(writer.name).double().mean(0) @ unit_r) - bias_part
        assert float(heads.harmful[writer.layer].sum()) == pytest.approx(expected, abs=1e-4)
    assert heads.top(3)[0][2] - heads.top(3)[0][3] == pytest.approx(float(heads.difference.max()))


def test_a_head_hook_acts_like_removing_that_heads_output_weights():
    model = load_model("tiny:llama")
    batch = model.tokenize(builtin_prompts("harmful", "test").head(4).to_list())

    def silence_head_1(z, site):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    with model.hooks([("blocks.1.attn.hook_z", silence_head_1)]):
        hooked = model.run(batch)
    writer = next(w for w in model.residual_writers() if w.name == "blocks.1.hook_attn_out")
    weight, bias = writer.read()
    original = weight.clone()
    d_head = weight.shape[1] // model.n_heads
    edited = weight.clone()
    edited[:, d_head : 2 * d_head] = 0
    writer.write(edited, bias)
    try:
        by_weights = model.run(batch)
    finally:
        writer.write(original, bias)
    torch.testing.assert_close(hooked, by_weights, atol=1e-5, rtol=0)
    assert (hooked - model.run(batch)).abs().max() > 1e-4
    assert capture(model, ["hi"], ["blocks.0.attn.hook_z"], progress=False).d_model == model.n_heads * d_head  # heads side by side
    from featsteer.interventions import Ablate, steer

    with pytest.raises(FeatsteerError, match="d_model-wide hook points"), steer(model, Ablate(torch.ones(model.d_model), where=["blocks.0.attn.hook_z"])):
        pass
    with pytest.raises(FeatsteerError, match="post-attention norms"):
        head_attribution(load_model("tiny:gemma2"), ["a"], ["b"], torch.ones(64))
    with pytest.raises(FeatsteerError, match="counts from the end"):
        head_attribution(model, ["a"], ["b"], torch.ones(model.d_model), position=0)
