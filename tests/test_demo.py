"""The demo's index page renders the method table as HTML (cell for cell, separator row dropped)."""

from __future__ import annotations

from featsteer.compare import markdown_table_html


def test_markdown_table_becomes_html_rows():
    table = "| method | refusal |\n|---|---|\n| none | 0.765 |\n| dim<x> | 0.624 |"
    page = markdown_table_html(table)
    assert page.count("<tr>") == 3
    assert "<th>method</th><th>refusal</th>" in page
    assert "<td>dim&lt;x&gt;</td><td>0.624</td>" in page
    assert "---" not in page
    assert markdown_table_html("") == ""


def test_the_cli_demo_runs_the_organism_with_its_saes_and_fresh_validation_prompts(monkeypatch, tmp_path):
    """`featsteer demo` loads the model itself (for --dtype/--device) and hands run_demo an adapter, which must still
    count as the organism: its SAE methods and the generated validation prompts are part of the comparison."""
    import pytest

    import featsteer.compare as compare_module
    from featsteer.cli import main

    class Reached(Exception):
        pass

    seen = {}

    def fake_compare(model, harmful, harmless, **kwargs):
        seen.update(kwargs, dtype=model.dtype)
        raise Reached

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    with pytest.raises(Reached):
        main(["demo", "--out", str(tmp_path / "run"), "--n", "4", "--max-new-tokens", "2", "--dtype", "bfloat16"])
    assert seen["saes"] and "blocks.3.hook_resid_pre" in seen["saes"]
    assert seen["val_harmful"].source.startswith("organism-corpus:harmful") and len(seen["val_harmless"]) == 96
    assert str(seen["dtype"]) == "torch.bfloat16"
    assert list(tmp_path.iterdir()) == []  # stopped in the middle: no half-filled run folder, no hidden staging folder


def test_a_quick_demo_appears_whole_in_its_run_folder(tmp_path):
    from featsteer.demo import run_demo

    result = run_demo("organism", tmp_path / "run", n_eval=4, max_new_tokens=2, full=False)
    assert result.run_dir == tmp_path / "run" and (tmp_path / "run" / "index.html").is_file()
    assert {p.name for p in tmp_path.iterdir()} == {"run"}
    assert {"eval.json", "dim_layers.json", "logit_lens.json", "directions"} <= {p.name for p in (tmp_path / "run").iterdir()}


def test_the_best_dim_layer_is_chosen_on_the_training_prompts_not_the_test_split():
    """A layer whose held-out accuracy happens to be highest is not chosen over one that cross-validates better on the
    training prompts: choosing by the test split would report its luckiest score. Ties go to cv AUROC, then the earliest
    layer; a layer without a training direction (None) comes last."""
    from featsteer.demo import LayerRow, best_layer
    from featsteer.directions import Separability

    def row(layer, held_out, cv, cv_auroc=1.0):
        return LayerRow(f"blocks.{layer}.hook_resid_pre", layer, 1.0, Separability(held_out, held_out, 1.0), cv, cv_auroc)

    lucky, steady = row(1, 0.97, 0.90), row(2, 0.93, 0.98)
    assert best_layer([lucky, steady]).layer == 2
    assert best_layer([row(0, 0.99, None, None), row(3, 0.9, 1.0, 0.99), row(1, 0.8, 1.0)]).layer == 1
    assert best_layer([row(2, 0.9, 1.0), row(1, 0.8, 1.0)]).layer == 1


def test_layer_separability_cross_validates_dim_on_the_organisms_training_prompts():
    from featsteer.demo import layer_separability
    from featsteer.models import load_model

    rows, _ = layer_separability(load_model("organism"), n_train=24)
    assert rows[0].cv_accuracy is None  # layer 0's last token is a template token: one vector for both classes
    assert all(0.5 < r.cv_accuracy <= 1.0 and 0.5 < r.cv_auroc <= 1.0 for r in rows[1:])


def test_the_index_page_shows_the_scores_that_chose_the_best_layer():
    """index.html marked a "Best layer" under a table of held-out scores only, so the layer it named could be the one
    with the lowest held-out accuracy (the demo's blocks.2, 0.899 against blocks.3's 0.917) with nothing on the page
    saying why: it was chosen by CV on the training prompts. The page shows those CV scores and names the rule."""
    import re
    from pathlib import Path
    from types import SimpleNamespace

    from featsteer.demo import DemoResult, LayerRow, _index_html
    from featsteer.directions import Separability

    def row(layer, held_out, cv, cv_auroc):
        return LayerRow(f"blocks.{layer}.hook_resid_pre", layer, 1.0, Separability(held_out, held_out, 1.0), cv, cv_auroc)

    rows = [row(0, 0.497, None, None), row(1, 0.905, 0.996, 0.99996), row(2, 0.899, 1.0, 1.0), row(3, 0.917, 1.0, 1.0)]
    report = SimpleNamespace(model="organism", table=lambda: "set n refused")
    page = _index_html(DemoResult(Path("run"), report, rows, 1.0))
    head = re.search(r"<tr><th>hook</th>(.*?)</tr>", page).group(1)
    assert head == "<th>CV accuracy</th><th>CV AUROC</th><th>held-out accuracy</th><th>held-out AUROC</th>"
    assert "<tr><td>blocks.2.hook_resid_pre (chosen)</td><td>1.000</td><td>1.000</td><td>0.899</td><td>0.899</td></tr>" in page
    assert "<tr><td>blocks.0.hook_resid_pre</td><td>-</td><td>-</td><td>0.497</td>" in page
    assert page.count("(chosen)") == 1
    assert "Best layer: blocks.2.hook_resid_pre, the highest CV accuracy on the training prompts" in page
