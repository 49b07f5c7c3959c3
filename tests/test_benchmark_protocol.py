"""Benchmark protocols: what a script chooses on which prompts, checked without running the benchmark."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their siblings (organism.py, abliteration.py)
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def fake_layer_rows():
    """Four layers where the test split's best (blocks.3, 0.917) is not the layer CV on the train split chooses (blocks.2)."""
    from featsteer.demo import LayerRow
    from featsteer.directions import Separability

    scores = [(0.497, None, None), (0.905, 0.990, 0.999), (0.899, 1.0, 1.0), (0.917, 0.995, 1.0)]
    return [LayerRow(f"blocks.{i}.hook_resid_pre", i, 1.0, Separability(accuracy=test, auroc=0.9, gap=1.0), cv, auroc)
            for i, (test, cv, auroc) in enumerate(scores)]


def test_moe_organism_reports_dim_at_the_layer_cv_on_the_train_split_chooses(monkeypatch):
    """moe_organism.py reported the DIM accuracy "at the best layer" of the training report, the layer with the highest
    test-split accuracy (0.917), while organism.py and the demo choose it by 3-fold CV on the train split. It now measures
    the layers as organism.py does and reports the test accuracy at the CV's choice, next to the highest any layer reached."""
    moe = load_script("moe_organism")
    organism = sys.modules[moe.dim_layers.__module__]
    monkeypatch.setattr(organism, "layer_separability", lambda model: (fake_layer_rows(), None))
    table, chosen = moe.dim_layers(object())
    assert chosen == "blocks.2.hook_resid_pre"
    text = "\n".join(moe.dim_lines({"dim_layers": table, "dim_chosen": chosen}))
    assert "chosen by 3-fold CV on the train split (blocks.2.hook_resid_pre): 0.899" in text
    assert "| blocks.3.hook_resid_pre | 0.995 / 1.000 | 0.917 / 0.900 |" in text
    assert "highest held-out accuracy of any layer is 0.917" in text


def test_induce_edit_picks_its_scales_at_the_batch_size_it_evaluates_at(monkeypatch):
    """induce_edit.py picked the `--induce-bias`/`--induce-template` scales generating 16 prompts a batch (the default of
    `pick_induce_scale`) and evaluated every row at 64 on Qwen; in bfloat16 the batch changes greedy responses. Both now
    generate with `--batch-size` (64 on Qwen, 16 on the organism when not given)."""
    import argparse
    import contextlib

    import featsteer.compare as compare_module
    from featsteer.datasets import PromptSet

    induce_edit = load_script("induce_edit")
    seen = []

    def pick(model, add, prompts, **kwargs):
        seen.append(kwargs.get("batch_size"))
        return 1.0, {1.0: 0.5}

    monkeypatch.setattr(compare_module, "pick_induce_scale", pick)
    monkeypatch.setattr(induce_edit, "_harmless_row", lambda model, harmless, gen, base: {"row": {"batch_size": gen.batch_size, "refused": 0, "looping": 0,
                                                                                                  "clean_refusals": 0, "kl": 0.0}})
    for target, given, expected in (("qwen", None, 64), ("organism", None, 16), ("qwen", 8, 8)):
        args = argparse.Namespace(target=target, batch_size=given, n_pick=4)
        gen = induce_edit.generation_config(args)
        assert gen.batch_size == expected
        result = argparse.Namespace(val=(None, PromptSet(("a", "b", "c", "d", "e"), "val")))
        out = induce_edit._picked_rows(args, None, result, lambda scale, variant: contextlib.nullcontext(), [1.0], [0.0], "--induce-bias", "weight edit",
                                       ["h"], gen, None)
        assert seen[-1] == expected and {row["batch_size"] for row in out["rows"]} == {expected}
    old = {"target": "qwen"}
    assert "old protocol" in induce_edit.batch_text(old)
    assert "old protocol" not in induce_edit.batch_text({**old, "batch_size": 64})


def test_steering_methods_picks_at_the_batch_size_it_evaluates_at(monkeypatch):
    """steering_methods.py evaluated Qwen at 64 prompts a batch while `compare` generated the validation picks at the
    direction config's batch size, the default 16; in bfloat16 the batch changes greedy responses. `--batch-size` (64 on
    Qwen, 16 on the organism when not given) now sets both, the results JSON records it, and the markdown of a run from
    before says it is the old protocol."""
    import argparse
    import json

    import featsteer.compare as compare_module
    import featsteer.models as models_module

    steering = load_script("steering_methods")
    seen, written = [], {}

    def fake_compare(model, harmful, harmless, **kwargs):
        seen.append((kwargs["direction_config"].batch_size, kwargs["generation"].batch_size))
        return argparse.Namespace(results=[], setup={}, context=None)

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    monkeypatch.setattr(models_module, "load_model", lambda name, dtype: argparse.Namespace(name=name))
    monkeypatch.setattr(steering, "qwen_gguf", lambda: "qwen.gguf")
    monkeypatch.setattr(steering, "prompt_sets", lambda target: {k: ["p"] for k in ("train_harmful", "train_harmless", "eval_harmful",
                                                                                     "eval_harmless")})
    monkeypatch.setattr(steering, "write_files", lambda folder, files: written.update(files))
    monkeypatch.setattr(steering, "render", lambda out: "")
    for argv, expected in ((["--no-everywhere"], 64), (["--no-everywhere", "--batch-size", "8"], 8)):
        monkeypatch.setattr(sys, "argv", ["steering_methods.py", "--methods", "none", *argv])
        steering.main()
        assert seen[-1] == (expected, expected)
        assert json.loads(written["steering_methods_qwen.json"])["batch_size"] == expected
    old = {"dtype": "bfloat16", "setup": {"directions": {"batch_size": 16}, "generation": {"batch_size": 64}}}
    assert "Old protocol" in steering.batch_text(old)
    assert "Old protocol" not in steering.batch_text({**old, "batch_size": 64})
