"""featsteer-train-sae: a real (small) training run on tiny:llama, its files and metrics, skipping, seeding, errors."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from featsteer.errors import FeatsteerError
from featsteer.models import load_model
from featsteer.sae import load_sae, sae_hook_name
from sae_training.cli import main, parse_layers
from sae_training.config import ArchitectureConfig, DataConfig, OptimConfig, TrainConfig
from sae_training.data import (
    ActivationBatches,
    cached_capture,
    capture_key,
    capture_tokens,
    load_texts,
    norm_limit,
    shared_prefix_length,
    split_texts,
)

HOOK = "blocks.1.hook_resid_post"
ARGS = ["--model", "tiny:llama", "--layers", "1", "--arch", "topk", "--d-sae", "128", "--k", "8", "--tokens", "20000",
        "--text", "builtin:harmless", "--batch-tokens", "512", "--lr", "2e-3", "--eval-prompts", "24"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One ~20k-token top-k training run at one layer, through the CLI entry function."""
    out = tmp_path_factory.mktemp("saes")
    code = main([*ARGS, "--quiet", "--out", str(out)])
    assert code == 0
    return out


def test_training_writes_sae_lens_files_and_metrics(trained):
    folder = trained / HOOK
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "training_config.json", "metrics.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob(".*")) and not list(trained.glob(".*"))  # no staging marker or folder left
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["hook_name"] == HOOK and metrics["d_sae"] == 128 and metrics["architecture"] == "topk"
    assert 0.3 < metrics["explained_variance"] <= 1.0 and 0.3 < metrics["train_explained_variance"] <= 1.0
    assert 0 < metrics["l0"] <= 8 and 0 <= metrics["dead_fraction"] < 1
    assert metrics["dead_fraction_measured_on"] == "training_tokens" and 0 < metrics["dead_fraction_tokens"] <= metrics["unique_tokens"]
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_loss_recovered", "tokens_per_second"):
        assert math.isfinite(metrics[key]), key
    assert metrics["ce_clean"] > 0 and metrics["tokens_per_second"] > 0 and metrics["ce_scored"] == "responses"
    recovered = (metrics["ce_zero_ablated"] - metrics["ce_spliced"]) / (metrics["ce_zero_ablated"] - metrics["ce_clean"])
    assert metrics["ce_loss_recovered"] == pytest.approx(recovered)
    assert 19_000 <= metrics["train_tokens"] <= 20_000 and metrics["unique_tokens"] >= 20_000 and not metrics["text_exhausted"]
    config = TrainConfig.from_dict(json.loads((folder / "training_config.json").read_text()))
    assert config.sae.d_sae == 128 and config.data.layers == (1,) and TrainConfig.from_dict(config.to_dict()) == config


def test_trained_sae_reloads_with_sae_lens_and_load_sae(trained):
    model = load_model("tiny:llama")
    reference = SAE.load_from_disk(trained / HOOK)
    ours = load_sae(trained / HOOK, model)
    assert sae_hook_name(reference) == HOOK and sae_hook_name(ours) == HOOK
    assert reference.cfg.d_in == 64 and reference.cfg.d_sae == 128 and reference.cfg.k == 8
    assert torch.equal(ours.W_dec, reference.W_dec) and torch.equal(ours.W_enc, reference.W_enc)


def test_rerun_skips_the_finished_layer(trained, monkeypatch, capsys):
    before = (trained / HOOK / "sae_weights.safetensors").read_bytes()
    stamp = (trained / HOOK / "metrics.json").stat().st_mtime_ns

    def no_capture(*args, **kwargs):
        raise AssertionError("a finished layer was captured again")

    monkeypatch.setattr("sae_training.train.capture_tokens", no_capture)
    assert main([*ARGS, "--quiet", "--out", str(trained)]) == 0
    assert HOOK in capsys.readouterr().out
    assert (trained / HOOK / "sae_weights.safetensors").read_bytes() == before
    assert (trained / HOOK / "metrics.json").stat().st_mtime_ns == stamp


_KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from featsteer.files import output_staging
work = output_staging(Path(sys.argv[1]), beside=True)  # as train_layer stages <out>/<hook>/
(work / "sae_weights.safetensors").write_bytes(b"half an SAE")
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(trained, monkeypatch):
    """A run killed outright while it saved a layer's SAE left `<out>/.<hook>.partial-*`, a whole SAE, for ever (load_saes
    skips hidden folders, so it only held the disk). It records its process now, and the next run removes it once that
    process is gone, even when the layer is finished and skipped; one of a live run and one without the marker stay."""
    import os
    import socket
    import subprocess

    import featsteer
    from featsteer.files import STAGING_MARKER

    env = {**os.environ, "PYTHONPATH": str(Path(featsteer.__file__).parents[1])}
    ended = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(trained / HOOK)], env=env, capture_output=True, check=False)
    assert ended.returncode == -9, ended.stderr.decode()
    [killed] = trained.glob(f".{HOOK}.partial-*")
    # and one of a hook this run does not ask for: it was left for ever, as only the requested hooks' were looked at
    other = "blocks.3.hook_resid_pre"
    ended = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(trained / other)], env=env, capture_output=True, check=False)
    assert ended.returncode == -9, ended.stderr.decode()
    [killed_other] = trained.glob(f".{other}.partial-*")
    kept = {"live": {"writer": "featsteer", "pid": os.getpid(), "host": socket.gethostname(), "started": None}, "unmarked": None}
    for name, owner in kept.items():
        (trained / f".{HOOK}.partial-{name}").mkdir()
        if owner is not None:
            (trained / f".{HOOK}.partial-{name}" / STAGING_MARKER).write_text(json.dumps(owner))
    try:
        monkeypatch.setattr("sae_training.train.capture_tokens", no_capture)
        assert main([*ARGS, "--quiet", "--out", str(trained)]) == 0
        assert sorted(path.name for path in trained.glob(f".{HOOK}.partial-*")) == [f".{HOOK}.partial-{name}" for name in sorted(kept)]
        assert not killed.exists() and not killed_other.exists()
    finally:
        for name in kept:
            shutil.rmtree(trained / f".{HOOK}.partial-{name}", ignore_errors=True)
        shutil.rmtree(killed, ignore_errors=True)
        shutil.rmtree(killed_other, ignore_errors=True)


def test_training_is_seeded_and_stops_when_the_text_is_exhausted(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Tell me fact number {i} about the ocean." for i in range(30)))
    args = ["--model", "tiny:llama", "--layers", "0", "--d-sae", "64", "--k", "4", "--tokens", "100000", "--text", str(text),
            "--no-cycle", "--batch-tokens", "128", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    weights = [(tmp_path / run / "blocks.0.hook_resid_post" / "sae_weights.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]
    metrics = json.loads((tmp_path / "a" / "blocks.0.hook_resid_post" / "metrics.json").read_text())
    assert metrics["text_exhausted"] and metrics["train_tokens"] <= metrics["unique_tokens"] < 100_000


def test_training_at_a_normalised_input(tmp_path):
    """An SAE on what the MLP reads (`ln2.hook_normalized`): trained, saved under its TransformerLens name, reloaded,
    and spliced back in for the loss-recovered figure."""
    args = ["--model", "tiny:llama", "--layers", "0", "--hook", "ln2_normalized", "--d-sae", "64", "--k", "4", "--tokens", "6000",
            "--text", "builtin:harmless", "--batch-tokens", "256", "--eval-prompts", "8", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    hook = "blocks.0.ln2.hook_normalized"
    metrics = json.loads((tmp_path / hook / "metrics.json").read_text())
    assert metrics["hook_name"] == hook and 0 < metrics["explained_variance"] <= 1 and math.isfinite(metrics["ce_loss_recovered"])
    assert metrics["ce_spliced"] != metrics["ce_clean"]  # the splice reached the model
    assert sae_hook_name(load_sae(tmp_path / hook, load_model("tiny:llama"))) == hook


def test_training_on_the_attention_heads(tmp_path):
    """`--hook attn_z`: an SAE on the heads side by side, saved as sae_lens saves hook_z SAEs, loaded and spliced back in."""
    from featsteer.activations import capture
    from featsteer.sae import FeatureEdit, encode_activations, splice_sae

    args = ["--model", "tiny:llama", "--layers", "1", "--hook", "attn_z", "--d-sae", "96", "--k", "4", "--tokens", "6000", "--lr", "3e-3",
            "--text", "builtin:harmless", "--batch-tokens", "128", "--eval-prompts", "8", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 0
    hook = "blocks.1.attn.hook_z"
    metrics = json.loads((tmp_path / hook / "metrics.json").read_text())
    assert metrics["hook_name"] == hook and metrics["d_in"] == 64 and 0.2 < metrics["explained_variance"] <= 1
    assert math.isfinite(metrics["ce_loss_recovered"]) and metrics["ce_spliced"] != metrics["ce_clean"]  # the splice reached the model
    config = json.loads((tmp_path / hook / "cfg.json").read_text())
    assert config["reshape_activations"] == "hook_z" and config["metadata"]["hook_name"] == hook and config["d_in"] == 64
    model = load_model("tiny:llama")
    sae = load_sae(tmp_path / hook, model)
    reference = SAE.load_from_disk(tmp_path / hook)  # sae_lens' own reading: (..., n_heads, d_head) in, flattened inside
    rows = capture(model, ["How do I bake bread?", "Name a colour."], [hook], positions="all", progress=False).hook(hook)
    with torch.no_grad():
        theirs = reference.encode(rows.unflatten(-1, (model.n_heads, 64 // model.n_heads)))
    assert torch.equal(encode_activations(sae, rows), theirs) and bool((theirs != 0).any())
    feature = int((theirs != 0).sum(0).argmax())
    clean = model.logits(["How do I bake bread?"])
    with splice_sae(model, sae):
        unchanged = model.logits(["How do I bake bread?"])
    with splice_sae(model, sae, FeatureEdit.clamp(feature, 4 * float(theirs[:, feature].max()))):
        clamped = model.logits(["How do I bake bread?"])
    torch.testing.assert_close(unchanged, clean, atol=1e-5, rtol=0)
    assert not torch.allclose(clamped, clean, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--arch": "gated-ish"}, "unknown SAE architecture"),
        ({"--expansion": "4"}, "exactly one of --d-sae"),
        ({"--d-sae": None}, "exactly one of --d-sae"),
        ({"--layers": "2,x"}, "bad layer list"),
        ({"--layers": "7"}, "layer 7 does not exist"),
        ({"--arch": "standard"}, "--k applies to topk"),
        ({"--text": "EMPTY"}, "empty"),
        ({"--k": "2.5"}, "topk keeps a whole number of features per token"),
        ({"--out": "FILE"}, "is an existing file: give a folder path"),
        ({"--work-dir": "FILE"}, "--work-dir"),  # these two raised NotADirectoryError with a traceback
        ({"--activation-cache": "FILE"}, "--activation-cache"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, change, message):
    (tmp_path / "empty.txt").write_text("")
    args = dict(zip(ARGS[0::2], ARGS[1::2], strict=True))
    args["--out"] = str(tmp_path / "out")
    for key, value in change.items():
        args[key] = {"EMPTY": str(tmp_path / "empty.txt"), "FILE": str(tmp_path / "empty.txt")}.get(value, value)
    argv = [item for key, value in args.items() if value is not None for item in (key, value)]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / HOOK / "metrics.json").exists()


@pytest.mark.parametrize("width", [["--d-sae", "8"], ["--expansion", "0.1"]])
def test_k_too_large_for_the_width_fails_before_the_capture_and_leaves_no_out(tmp_path, capsys, monkeypatch, width):
    import sae_training.train as train

    def no_capture(*args, **kwargs):
        raise AssertionError("captured before checking --k against the width")

    monkeypatch.setattr(train, "capture_tokens", no_capture)
    args = dict(zip(ARGS[0::2], ARGS[1::2], strict=True))
    del args["--d-sae"]
    argv = [item for pair in args.items() for item in pair] + width
    assert main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--k 8 must be smaller than the number of features" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_run_failing_before_any_layer_finishes_leaves_no_empty_out(tmp_path, capsys, monkeypatch):
    import sae_training.train as train

    def broken_capture(*args, **kwargs):
        raise FeatsteerError("capture failed")

    monkeypatch.setattr(train, "capture_tokens", broken_capture)
    assert main([*ARGS, "--out", str(tmp_path / "new" / "out"), "--quiet"]) == 2
    assert "capture failed" in capsys.readouterr().err and not (tmp_path / "new" / "out").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made is theirs: left in place
    assert main([*ARGS, "--out", str(tmp_path / "kept"), "--quiet"]) == 2
    assert (tmp_path / "kept").is_dir()


def test_parse_layers():
    assert parse_layers("all") is None
    assert parse_layers("2,4") == (2, 4) and parse_layers("0-2,5") == (0, 1, 2, 5)
    for bad in ("", "a", "3-1", "-1"):
        with pytest.raises(FeatsteerError):
            parse_layers(bad)


def test_configs_round_trip_and_validate():
    config = TrainConfig(data=DataConfig(model="tiny:llama", texts=("builtin:harmless",), layers=(0, 2)),
                         sae=ArchitectureConfig(architecture="batchtopk", expansion=2.0, k=4.5), optim=OptimConfig(seed=3), out="x")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.sae.width(64) == 128
    with pytest.raises(FeatsteerError, match="--lr"):
        OptimConfig(lr=0)
    with pytest.raises(FeatsteerError, match="hook kind"):
        DataConfig(model="tiny:llama", texts=("builtin:harmless",), hook_kind="resid_middle")


def test_held_out_texts_are_capped_at_a_tenth_with_a_warning(caplog):
    texts = [f"text {i}" for i in range(50)]
    with caplog.at_level(logging.WARNING, logger="sae_training.data"):
        train, held_out = split_texts(texts, 4, seed=0)
    assert len(held_out) == 4 and len(train) == 46 and not caplog.records  # asked for no more than the cap: quiet
    with caplog.at_level(logging.WARNING, logger="sae_training.data"):
        train, held_out = split_texts(texts, 24, seed=0)
    assert len(held_out) == 5 and sorted(train + held_out) == sorted(texts)
    assert "holding out 5 texts for evaluation, not the 24 asked for (--eval-prompts): at most a tenth of the 50 texts" in caplog.text


def test_activation_batches_are_seeded_shuffled_and_endless(tmp_path):
    model = load_model("tiny:llama")
    texts = [f"Sentence number {i} is here." for i in range(12)]
    captured = capture_tokens(model, texts, [HOOK], tmp_path, tokens=10_000, progress=False)
    assert captured.exhausted and captured.n_texts == 12

    def first(n: int, seed: int) -> list[torch.Tensor]:
        batches = ActivationBatches(captured.chunks, HOOK, 32, seed=seed)
        return [next(batches) for _ in range(n)]

    run, again, other = first(3 * captured.n_tokens // 32, 0), first(3 * captured.n_tokens // 32, 0), first(3, 1)
    assert all(torch.equal(a, b) for a, b in zip(run, again, strict=True))
    assert not torch.equal(run[0], other[0]) and all(batch.shape == (32, 64) for batch in run)


def test_a_layer_gets_the_same_training_stream_whichever_layers_are_captured_with_it(tmp_path):
    """A re-run that trains only the layers an interrupted run did not finish must feed each the rows, in the order,
    the full run would have: the chunks (shuffled as units) may not depend on how many hooks share the capture."""
    from featsteer.activations import ActivationReader

    model = load_model("tiny:llama")
    texts = load_texts(["builtin:harmless"])
    chunk_bytes = 256 << 10  # small enough that the chunk size is set by memory, as on a real model
    both = capture_tokens(model, texts, ["blocks.0.hook_resid_post", HOOK], tmp_path / "both", tokens=8000, start=1,
                          chunk_bytes=chunk_bytes, progress=False)
    alone = capture_tokens(model, texts, [HOOK], tmp_path / "alone", tokens=8000, start=1, chunk_bytes=chunk_bytes, progress=False)
    assert len(both.chunks) == len(alone.chunks) > 2
    streams = [ActivationBatches(captured.chunks, HOOK, 64, seed=3) for captured in (both, alone)]
    assert all(torch.equal(next(streams[0]), next(streams[1])) for _ in range(3 * both.n_tokens // 64))
    for chunk in both.chunks:  # memory stays bounded: no shard of all hooks is larger than chunk_bytes
        assert all(shard["rows"] * 2 * 64 * 4 <= chunk_bytes for shard in ActivationReader(chunk).metadata["shards"])


@pytest.mark.parametrize("budget", [1, 300, 3000])
def test_a_small_budget_captures_no_text_past_the_one_that_reaches_it(tmp_path, budget):
    """The first chunk (64 texts, sized before any were seen) captured about 4,500 tokens on tiny:llama whatever the budget,
    and the dead-feature fraction was then measured mostly on rows training never drew."""
    model = load_model("tiny:llama")
    texts, start = load_texts(["builtin:harmless"]), shared_prefix_length(model)
    captured = capture_tokens(model, texts, [HOOK], tmp_path, tokens=budget, start=start, progress=False)
    lengths = (model.tokenize(texts[: captured.n_texts]).attention_mask.sum(dim=1) - start).tolist()
    assert captured.n_tokens == sum(lengths) >= budget > sum(lengths[:-1]) and not captured.exhausted


def test_organism_corpus_text_source():
    texts = load_texts(["organism-corpus:12:5"])
    assert 0 < len(texts) <= 12 and all(text.strip() for text in texts)
    assert load_texts(["organism-corpus:12:5"]) == texts
    with pytest.raises(FeatsteerError, match="bad text source"):
        load_texts(["organism-corpus:many"])


@pytest.mark.parametrize("spec", ["organism", "tiny:llama"])
def test_shared_prefix_is_the_template_head_and_nothing_of_the_text(spec):
    model = load_model(spec)
    length = shared_prefix_length(model)
    batch = model.tokenize(["How do I bake bread?", "Why is the sky blue?"])
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]
    assert length >= 1 and rows[0][:length] == rows[1][:length] and rows[0][length] != rows[1][length]
    assert shared_prefix_length(model, chat=False) <= 1  # raw text: at most a BOS token


def test_training_skips_the_shared_prefix_and_records_the_norm_bound(trained):
    metrics = json.loads((trained / HOOK / "metrics.json").read_text())
    model = load_model("tiny:llama")
    assert metrics["first_position"] == shared_prefix_length(model) and metrics["first_position"] >= 1
    assert metrics["ce_first_position"] == metrics["first_position"]  # CE loss recovered splices the trained tokens only
    assert math.isfinite(metrics["max_norm"]) and 0 <= metrics["excluded_fraction"] < 0.05
    assert load_sae(trained / HOOK, model).cfg.metadata.featsteer_max_norm == metrics["max_norm"]


def test_activation_batches_leave_out_rows_above_the_norm_bound(tmp_path):
    model = load_model("tiny:llama")
    captured = capture_tokens(model, [f"Sentence number {i} is here." for i in range(12)], [HOOK], tmp_path, tokens=10_000, progress=False)
    limit = norm_limit(captured.chunks, HOOK, 1.05)  # just above the median: about half the rows go
    batches = ActivationBatches(captured.chunks, HOOK, 16, max_norm=limit)
    served = torch.cat([next(batches) for _ in range(20)])
    assert float(served.norm(dim=-1).max()) <= limit
    assert norm_limit(captured.chunks, HOOK, None) is None


def no_capture(*args, **kwargs):
    """Stands in for `capture_tokens` where the cache must answer."""
    raise AssertionError("captured again")


def test_activation_cache_captures_once_and_a_broken_capture_is_redone(tmp_path, monkeypatch):
    model = load_model("tiny:llama")
    texts = [f"Sentence number {i} is here." for i in range(12)]
    first = cached_capture(model, texts, [HOOK], tmp_path / "cache", tokens=10_000, progress=False)
    assert (first.chunks[0].parent / "captured.json").is_file()

    with monkeypatch.context() as patch:
        patch.setattr("sae_training.data.capture_tokens", no_capture)
        again = cached_capture(model, texts, [HOOK], tmp_path / "cache", tokens=10_000, progress=False)
    assert again == first
    staged = first.chunks[0].parent.parent / f".{first.chunks[0].parent.name}.partial-killed"
    shutil.copytree(first.chunks[0].parent, staged)  # a killed run's staging folder: never served, removed by the next capture
    (first.chunks[0].parent / "captured.json").unlink()  # as if the first run had died mid-capture
    redone = cached_capture(model, texts, [HOOK], tmp_path / "cache", tokens=10_000, progress=False)
    assert redone.n_tokens == first.n_tokens and (first.chunks[0].parent / "captured.json").is_file() and not staged.exists()
    assert redone.chunks == first.chunks
    other = cached_capture(model, texts[:6], [HOOK], tmp_path / "cache", tokens=10_000, progress=False)
    assert other.chunks[0].parent != first.chunks[0].parent and other.n_tokens < first.n_tokens


def test_activation_cache_serves_a_larger_budget_from_a_capture_that_ran_out_of_text(tmp_path, monkeypatch):
    model = load_model("tiny:llama")
    texts = [f"Sentence number {i} is here." for i in range(12)]
    first = cached_capture(model, texts, [HOOK], tmp_path / "cache", tokens=10_000, progress=False)
    assert first.exhausted and first.n_tokens < 10_000

    with monkeypatch.context() as patch:
        patch.setattr("sae_training.data.capture_tokens", no_capture)
        larger = cached_capture(model, texts, [HOOK], tmp_path / "cache", tokens=50_000, progress=False)
    assert larger == first
    smaller = cached_capture(model, texts, [HOOK], tmp_path / "cache", tokens=first.n_tokens // 2, progress=False)
    assert not smaller.exhausted and smaller.chunks[0].parent != first.chunks[0].parent
    with monkeypatch.context() as patch:  # the budget-limited capture is no stand-in for a larger budget
        patch.setattr("sae_training.data.capture_tokens", no_capture)
        again = cached_capture(model, texts, [HOOK], tmp_path / "cache", tokens=60_000, progress=False)
    assert again == first


def test_activation_cache_is_not_reused_after_the_chat_template_changes(tmp_path, monkeypatch):
    """Same weights, same texts, same first position, but an edited chat template: the tokens differ, so must the capture."""
    model = load_model("tiny:llama")
    texts = [f"Sentence number {i} is here." for i in range(12)]
    start = shared_prefix_length(model)
    first = cached_capture(model, texts, [HOOK], tmp_path / "cache", tokens=10_000, start=start, progress=False)
    model.tokenizer.chat_template = model.tokenizer.chat_template.replace("<|end|>", " Answer briefly.<|end|>")
    assert shared_prefix_length(model) == start and "Answer briefly" in model.format_prompts(["hi"])[0].text
    calls = []
    monkeypatch.setattr("sae_training.data.capture_tokens", lambda *args, **kwargs: calls.append(args) or capture_tokens(*args, **kwargs))
    again = cached_capture(model, texts, [HOOK], tmp_path / "cache", tokens=10_000, start=start, progress=False)
    assert len(calls) == 1 and again.chunks[0].parent != first.chunks[0].parent  # not served from the old template's capture


def test_activation_cache_finds_each_hook_in_whichever_capture_holds_it(tmp_path, monkeypatch):
    from sae_training.data import cached_captures

    model = load_model("tiny:llama")
    texts = [f"Sentence number {i} is here." for i in range(12)]
    first, second, third = (f"blocks.{layer}.hook_resid_post" for layer in range(3))
    both = cached_captures(model, texts, [first, second], tmp_path / "cache", tokens=10_000, progress=False)
    assert both[first] is both[second]
    with monkeypatch.context() as patch:
        patch.setattr("sae_training.data.capture_tokens", no_capture)
        alone = cached_captures(model, texts, [second], tmp_path / "cache", tokens=10_000, progress=False)
    assert alone[second] == both[second]
    hooks_captured = []
    monkeypatch.setattr("sae_training.data.capture_tokens",
                        lambda model, texts, hooks, *args, **kwargs: hooks_captured.append(list(hooks)) or capture_tokens(model, texts, hooks, *args, **kwargs))
    more = cached_captures(model, texts, [first, third], tmp_path / "cache", tokens=10_000, progress=False)
    assert hooks_captured == [[third]] and more[first] == both[first] and more[third].hook_names == (third,)


@pytest.mark.parametrize("threshold", [-1.0, 1.0])
def test_training_warns_when_too_many_features_are_dead(tmp_path, monkeypatch, caplog, threshold):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Tell me fact number {i} about the ocean." for i in range(30)))
    monkeypatch.setattr("sae_training.train.DEAD_WARNING", threshold)
    caplog.set_level(logging.WARNING, logger="sae_training.train")
    assert main(["--model", "tiny:llama", "--layers", "0", "--d-sae", "64", "--k", "4", "--tokens", "3000", "--text", str(text),
                 "--batch-tokens", "128", "--quiet", "--out", str(tmp_path / "out")]) == 0
    warned = [r.getMessage() for r in caplog.records if "likely undertrained" in r.getMessage()]
    assert len(warned) == (1 if threshold < 0 else 0)
    if warned:
        assert "blocks.0.hook_resid_post" in warned[0] and "optimiser steps of 128 tokens" in warned[0]


def test_dtype_and_device_options_reach_the_model_and_the_capture_key(capsys):
    from sae_training.cli import build_parser, config_from_args
    from sae_training.data import capture_key

    config = config_from_args(build_parser().parse_args([*ARGS, "--out", "x", "--dtype", "bf16", "--device", "cpu"]))
    assert (config.data.dtype, config.data.device) == ("bf16", "cpu")
    with pytest.raises(FeatsteerError, match="unknown dtype 'int8'"):
        DataConfig(model="tiny:llama", texts=("builtin:harmless",), dtype="int8")
    texts, hooks = ["a b c", "d e"], [HOOK]
    keys = {dtype: capture_key(load_model("tiny:llama", dtype=dtype), texts, hooks, tokens=100, chat=True, start=0)
            for dtype in ("float32", "bfloat16")}
    assert keys["float32"] != keys["bfloat16"]  # a bfloat16 capture never stands in for a float32 one
    retrained = load_model("tiny:llama")  # same name, other weights: a model retrained or re-exported at the same path
    with torch.no_grad():
        next(retrained.model.parameters()).add_(0.01)
    assert capture_key(retrained, texts, hooks, tokens=100, chat=True, start=0) != keys["float32"]
    assert capture_key(load_model("tiny:llama"), texts, hooks, tokens=100, chat=True, start=0) == keys["float32"]
    assert main([*ARGS, "--out", "x", "--dtype", "fp8"]) == 2
    assert capsys.readouterr().err.strip() == "featsteer-train-sae: error: unknown dtype 'fp8': use auto, float32, bfloat16 or float16"


def test_a_single_text_source_is_one_source_not_one_per_character():
    assert DataConfig(model="tiny:llama", texts="builtin:harmless").texts == ("builtin:harmless",)


def test_a_resumed_multi_layer_run_trains_the_rest_from_the_activation_cache(tmp_path, monkeypatch):
    """A run of layers 0 and 1 stopped after layer 0: the re-run trains layer 1 alone from the capture the first run
    made (the cache is keyed per hook, not by the layers still to train) and gets the weights the full run gave it."""
    args = ["--model", "tiny:llama", "--layers", "0,1", "--d-sae", "64", "--k", "4", "--tokens", "3000", "--text", "builtin:harmless",
            "--batch-tokens", "256", "--eval-prompts", "8", "--quiet", "--activation-cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    layer = tmp_path / "out" / HOOK
    weights = (layer / "sae_weights.safetensors").read_bytes()
    shutil.rmtree(layer)  # as if the run had been stopped before layer 1 finished
    monkeypatch.setattr("sae_training.data.capture_tokens", no_capture)
    monkeypatch.setattr("sae_training.train.capture_tokens", no_capture)
    assert main(args) == 0
    assert (layer / "sae_weights.safetensors").read_bytes() == weights


@pytest.mark.parametrize("flock", [True, False])
def test_two_runs_sharing_an_activation_cache_capture_once_and_leave_each_other_alone(tmp_path, monkeypatch, flock):
    """Run B asks for the capture run A is in the middle of (between two chunks): B waits for A and reuses A's capture.
    It used to delete A's unfinished folder and capture into it, and A then failed writing its next chunk there. Without
    fcntl (Windows) there was no lock at all, and so the same; an O_EXCL lock file stands in for flock there."""
    import threading

    import sae_training.data as data

    if not flock:
        monkeypatch.setattr(data, "fcntl", None)
        monkeypatch.setattr(data, "LOCK_POLL_SECONDS", 0.01)

    texts = load_texts(["builtin:harmless"])
    options = {"tokens": 8000, "start": 1, "chunk_bytes": 256 << 10, "progress": False}
    settled, outcome, threads, chunks_captured = threading.Event(), {}, [], []

    def run_b() -> None:
        try:
            outcome["b"] = cached_capture(load_model("tiny:llama"), texts, [HOOK], tmp_path / "cache", **options)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            outcome["b"] = error
        finally:
            settled.set()

    class WaitingMessage(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting" in record.getMessage():
                settled.set()

    real_capture = data.capture

    def capture_then_start_b(*args, **kwargs):
        rows = real_capture(*args, **kwargs)
        chunks_captured.append(kwargs["stream_to"])
        if not threads:  # after A's first chunk: B starts and runs until it waits for A (or ends)
            threads.append(threading.Thread(target=run_b))
            threads[0].start()
            assert settled.wait(timeout=600)
        return rows

    monkeypatch.setattr(data, "capture", capture_then_start_b)
    handler = WaitingMessage()
    logging.getLogger("sae_training.data").addHandler(handler)
    try:
        first = cached_capture(load_model("tiny:llama"), texts, [HOOK], tmp_path / "cache", **options)
    finally:
        logging.getLogger("sae_training.data").removeHandler(handler)
        for thread in threads:
            thread.join()
    assert len(first.chunks) > 1 and outcome["b"] == first
    assert len(chunks_captured) == len(first.chunks)  # B captured nothing
    assert all(chunk.is_dir() for chunk in first.chunks)


def test_the_table_flags_an_l0_far_above_k(capsys):
    """A BatchTopK SAE after a short run keeps about twice k features per token (its threshold has not converged):
    metrics.json had the L0, but the printed table gave no sign that it was wrong."""
    from sae_training.cli import _report

    row = {"d_sae": 128, "explained_variance": 0.52, "ce_loss_recovered": 0.786, "dead_fraction": 0.156, "tokens_per_second": 23480}
    _report({"blocks.0.hook_resid_post": {**row, "architecture": "topk", "k": 8, "l0": 8.0},
             "blocks.1.hook_resid_post": {**row, "architecture": "batchtopk", "k": 8.0, "l0": 12.0},
             "blocks.2.hook_resid_post": {**row, "architecture": "batchtopk", "k": 8.0, "l0": 14.4},
             "blocks.3.hook_resid_post": {**row, "architecture": "jumprelu", "k": None, "l0": 40.0}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "blocks.0.hook_resid_post        128    8.0   0.520   0.786  0.156     23480"  # unflagged rows as before
    assert lines[3] == "blocks.2.hook_resid_post        128   14.4!  0.520   0.786  0.156     23480"
    assert "!" not in lines[2] + lines[4] and len(lines) == 6
    assert lines[5].startswith("! blocks.2.hook_resid_post: L0 14.4 is above 1.5 x k (k = 8)") and "train longer" in lines[5]


def test_an_undefined_figure_is_null_in_metrics_json_and_n_a_in_the_table(tmp_path, monkeypatch, capsys):
    """An undefined figure (explained variance of held-out rows without variance, CE recovered when zeroing the hook
    costs nothing: both NaN) went into metrics.json as a bare NaN, which is not JSON: jq and JSON.parse refuse the file.
    It is null there, and the table prints n/a for it, on the run that measured it and on a re-run that reads it back."""
    import sae_training.train as train_module

    measured = train_module.evaluate_layer

    def undefined(*args, **kwargs):
        return {**measured(*args, **kwargs), "explained_variance": math.nan, "ce_loss_recovered": math.nan}

    monkeypatch.setattr(train_module, "evaluate_layer", undefined)
    out = tmp_path / "saes"
    assert main([*ARGS, "--tokens", "4000", "--quiet", "--out", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    metrics = json.loads((out / HOOK / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["explained_variance"] is None and metrics["ce_loss_recovered"] is None and metrics["l0"] > 0
    assert main([*ARGS, "--tokens", "4000", "--quiet", "--out", str(out)]) == 0  # skips the layer, reads the file back
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(HOOK)]
    assert len(rows) == 2 and all(row.split()[3:5] == ["n/a", "n/a"] for row in rows)


def _as_before_the_budget_cut(monkeypatch, cache, texts, hooks, tokens):
    """A capture as the code before capture format 2 made it: a first chunk of 64 texts whatever the budget, and no
    `format` in its manifest."""
    from sae_training.data import cached_captures

    with monkeypatch.context() as patch:
        patch.setattr("sae_training.data.texts_for_budget", lambda model, texts, tokens, **kwargs: len(texts))
        captured = cached_captures(load_model("tiny:llama"), texts, hooks, cache, tokens=tokens, progress=False)[hooks[0]]
    manifest = captured.chunks[0].parent / "captured.json"
    record = json.loads(manifest.read_text())
    record.pop("format", None)
    manifest.write_text(json.dumps(record))
    return captured


@pytest.mark.parametrize("hooks", [[HOOK], ["blocks.0.hook_resid_post", HOOK]])
def test_an_over_captured_capture_of_the_older_format_is_captured_again(tmp_path, monkeypatch, caplog, hooks):
    """A small budget's capture made before the first chunk stopped at the budget holds rows training never draws (the
    dead fraction was measured on them); it had the same key, and was served as if it were new."""
    from sae_training.data import cached_captures

    model, texts = load_model("tiny:llama"), load_texts(["builtin:harmless"])
    old = _as_before_the_budget_cut(monkeypatch, tmp_path / "cache", texts, hooks, 300)
    assert old.n_texts == 64 and old.n_tokens > 1000
    caplog.set_level(logging.WARNING, logger="sae_training.data")
    new = cached_captures(model, texts, [HOOK], tmp_path / "cache", tokens=300, progress=False)[HOOK]
    lengths = model.tokenize(texts[: new.n_texts]).attention_mask.sum(dim=1).tolist()
    assert new.n_tokens == sum(lengths) >= 300 > sum(lengths[:-1])
    assert any("not reusing" in r.getMessage() and "capturing again" in r.getMessage() for r in caplog.records)
    assert json.loads((new.chunks[0].parent / "captured.json").read_text())["format"] == 2
    with monkeypatch.context() as patch:  # the new capture is reused as any capture is
        patch.setattr("sae_training.data.capture_tokens", no_capture)
        assert cached_captures(model, texts, [HOOK], tmp_path / "cache", tokens=300, progress=False)[HOOK] == new


@pytest.mark.parametrize("tokens", [8000, 100_000])
def test_a_capture_of_the_older_format_cut_as_now_is_still_reused(tmp_path, monkeypatch, tokens):
    """Where the first 64 texts do not reach the budget (more chunks follow, or the text runs out) the older format cut
    the chunks the current one does: such captures stay valid and are not thrown away."""
    from sae_training.data import cached_captures

    texts = load_texts(["builtin:harmless"])
    old = _as_before_the_budget_cut(monkeypatch, tmp_path / "cache", texts, [HOOK], tokens)
    assert len(old.chunks) > 1 or old.exhausted
    monkeypatch.setattr("sae_training.data.capture_tokens", no_capture)
    assert cached_captures(load_model("tiny:llama"), texts, [HOOK], tmp_path / "cache", tokens=tokens, progress=False)[HOOK] == old
    assert cached_capture(load_model("tiny:llama"), texts, [HOOK], tmp_path / "cache", tokens=tokens, progress=False) == old


def test_metrics_record_the_chunking_of_a_capture_reused_with_another_chunk_size(tmp_path):
    """`chunk_megabytes` sets the chunks training shuffles, and is not in the cache key: a run reusing a capture made
    with another chunk size trains in the capture's order, so metrics.json must say which chunking that was."""
    from sae_training.train import train_saes

    def run(out: str, megabytes: int) -> dict:
        data = DataConfig(model="tiny:llama", texts=("builtin:harmless",), layers=(1,), tokens=3000, eval_prompts=8,
                          chunk_megabytes=megabytes, activation_cache=str(tmp_path / "cache"))
        config = TrainConfig(data=data, sae=ArchitectureConfig(d_sae=64, k=4), optim=OptimConfig(batch_tokens=256), out=str(tmp_path / out))
        return train_saes(config, progress=False)[HOOK]

    first, reused = run("first", 1), run("reused", 2)
    assert first["capture_chunk_megabytes"] == reused["capture_chunk_megabytes"] == 1
    assert reused["capture_token_budget"] == 3000 and reused["capture_chunks"] == first["capture_chunks"] >= 1
    saved = json.loads((tmp_path / "reused" / HOOK / "training_config.json").read_text())
    assert saved["data"]["chunk_megabytes"] == 2  # what the run asked for; metrics.json says what it trained on


def test_without_fcntl_a_dead_runs_lock_file_is_taken_over_and_a_live_one_is_kept_fresh(tmp_path, monkeypatch, caplog):
    """The O_EXCL lock file that stands in for flock on Windows is not released when its run dies: one left untouched
    for STALE_LOCK_SECONDS is taken over, and the holder touches its own so that it never looks dead."""
    import os
    import time

    import sae_training.data as data

    monkeypatch.setattr(data, "fcntl", None)
    lock = tmp_path / ".key.lock"
    held = tmp_path / ".key.lock.held"
    held.touch()
    os.utime(held, (0, 0))  # left by a run that died long ago
    caplog.set_level(logging.WARNING, logger="sae_training.data")
    with data._exclusive_lock(lock):
        assert held.is_file() and held.stat().st_mtime > 0
    assert not held.exists() and any("taking over the lock" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(data, "LOCK_REFRESH_SECONDS", 0.01)
    with data._exclusive_lock(lock):
        os.utime(held, (0, 0))  # as if untouched for long: the holder's thread touches it again
        for _ in range(10_000):
            if held.stat().st_mtime > 0:
                break
            time.sleep(0.01)
        assert not data._stale(held)
    assert not held.exists()


def test_the_help_names_what_a_cached_capture_is_keyed_on():
    """--help said a capture is reused with the same model, text and --tokens, leaving out the options that are in the key
    too (--dtype, --raw, --keep-shared-prefix: the first position) and the larger budgets a capture that ran out serves."""
    from sae_training.cli import build_parser

    action = next(action for action in build_parser()._actions if "--activation-cache" in action.option_strings)
    for named in ("--dtype", "--raw", "--keep-shared-prefix", "--tokens", "larger --tokens once the text ran out"):
        assert named in action.help
    model, texts = load_model("tiny:llama"), ["a b c", "d e"]
    base = {"tokens": 100, "chat": True, "start": 0}
    key = capture_key(model, texts, [HOOK], **base)
    assert all(capture_key(model, texts, [HOOK], **{**base, **change}) != key for change in ({"chat": False}, {"start": 1}, {"tokens": 101}))
