"""The featsteer CLI as a user runs it: real runs on tiny models, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featsteer.cli import main
from featsteer.models.adapter import DEFAULT_BATCH_TOKENS


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info(capsys):
    code, out, _ = _run(capsys, "info", "--model", "tiny:gpt2", "--prompt", "Hi")
    assert code == 0 and "family    gpt2" in out and "layers    3" in out and "'<|user|>Hi<|end|><|assistant|>'" in out
    assert "blocks.{0..2}.ln1.hook_normalized" in out and "ln_final.hook_normalized" in out and "attn.hook_z (per head: 4 heads)" in out
    assert "experts" not in out
    assert "hooks     hook_embed, hook_pos_embed, blocks" in out  # GPT-2's learned positions
    _, llama, _ = _run(capsys, "info", "--model", "tiny:llama")
    assert "hooks     hook_embed, blocks" in llama and "hook_pos_embed" not in llama
    code, _, err = _run(capsys, "info", "--model", "tiny:gpt2", "--prompt", " ")
    assert code == 2 and "--prompt is empty" in err and len(err.strip().splitlines()) == 1, err


def test_info_lists_only_the_hooks_a_family_has_and_its_experts(capsys):
    _, moe, _ = _run(capsys, "info", "--model", "tiny:qwen2_moe")
    assert "family    moe" in moe and "experts   5 output projections per mixture-of-experts layer (2 of 3 layers" in moe
    _, parallel, _ = _run(capsys, "info", "--model", "tiny:cohere")
    assert "hook_{resid_pre,attn_out,mlp_out,resid_post}" in parallel and "ln1.hook_normalized" in parallel
    _, no_input_norms, _ = _run(capsys, "info", "--model", "tiny:olmo2")
    assert "resid_mid" in no_input_norms and "ln1.hook_normalized" not in no_input_norms
    _, hybrid, _ = _run(capsys, "info", "--model", "tiny:lfm2")
    assert "blocks.{0,2}.attn.hook_z (per head: 4 heads)" in hybrid and "notes     layers [1] mix tokens without attention heads" in hybrid
    assert "notes     attention and MLP run in parallel" in parallel and "notes     attention/MLP outputs are normalised" in no_input_norms
    assert "read the stream itself (no ln1/ln2)" in no_input_norms and "notes" not in moe
    _, deltanet, _ = _run(capsys, "info", "--model", "tiny:qwen3_5_moe")
    assert "blocks.{1}.attn.hook_z" in deltanet and "notes     layers [0, 2] mix tokens without attention heads" in deltanet
    assert "experts   5 output projections per mixture-of-experts layer (3 of 3 layers" in deltanet
    assert "routing   blocks.{0..2}.mlp.hook_{router_logits,routing} (per token: 4 experts' logits before the router" in deltanet
    assert "routing   blocks.{1,2}.mlp.hook_{router_logits,routing}" in moe and "routing" not in parallel
    _, gemma4, _ = _run(capsys, "info", "--model", "tiny:gemma4_text")
    assert "hook_{resid_pre,attn_out,resid_mid,mlp_out,per_layer_out,resid_post}" in gemma4
    assert "adds a per-layer input embedding after its MLP" in gemma4 and "multiplies the stream by a scalar" in gemma4
    assert "per_layer_out" not in deltanet


def test_capture_writes_a_readable_directory(capsys, tmp_path):
    from featsteer.activations import ActivationReader

    code, out, _ = _run(capsys, "capture", "--model", "tiny:llama", "--prompts", "builtin:harmful:test", "--n", "10",
                        "--hooks", "resid_post:0,2", "--out", str(tmp_path / "acts"))
    assert code == 0 and "captured 10 rows x 2 hooks" in out
    reader = ActivationReader(tmp_path / "acts")
    assert reader.hook_names == ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post") and len(reader) == 10
    code, out, _ = _run(capsys, "capture", "--model", "tiny:llama", "--prompts", "builtin:harmful:test", "--n", "4",
                        "--hooks", "ln2_normalized:1", "--out", str(tmp_path / "norms"))
    assert code == 0 and ActivationReader(tmp_path / "norms").hook_names == ("blocks.1.ln2.hook_normalized",)
    code, out, _ = _run(capsys, "capture", "--model", "tiny:llama", "--prompts", "builtin:harmful:test", "--n", "4",
                        "--hooks", "attn_z:2", "--out", str(tmp_path / "heads"))
    assert code == 0 and ActivationReader(tmp_path / "heads").hook_names == ("blocks.2.attn.hook_z",)


def _batch_caps(monkeypatch) -> list:
    """The max_batch_tokens of every batch plan the model makes from now on (appended as they are made)."""
    from featsteer.models.adapter import ModelAdapter

    caps, plan = [], ModelAdapter._plan  # plan_batches and token_batches both plan here

    def spy(self, instructions, batch_size, max_batch_tokens=None, *rest, **kwargs):
        caps.append(max_batch_tokens)
        return plan(self, instructions, batch_size, max_batch_tokens, *rest, **kwargs)

    monkeypatch.setattr(ModelAdapter, "_plan", spy)
    return caps


def test_capture_formats_prompts_with_a_system_prompt_and_caps_batch_tokens(capsys, tmp_path, monkeypatch):
    from featsteer.activations import ActivationSet, capture
    from featsteer.models import load_model

    caps = _batch_caps(monkeypatch)
    base = ["capture", "--model", "tiny:llama", "--prompts", "builtin:harmful:test", "--n", "3", "--hooks", "resid_pre:1"]
    assert _run(capsys, *base, "--system", "Answer in French.", "--max-batch-tokens", "64", "--out", str(tmp_path / "s"))[0] == 0
    assert _run(capsys, *base, "--out", str(tmp_path / "plain"))[0] == 0
    assert caps[:2] == [64, 8192]  # as given; the Python API's default cap when not given
    prompts = list(ActivationSet.load(tmp_path / "s").prompts)
    expected = capture(load_model("tiny:llama"), prompts, "blocks.1.hook_resid_pre", system="Answer in French.")
    assert torch.equal(ActivationSet.load(tmp_path / "s").activations, expected.activations)
    assert not torch.equal(ActivationSet.load(tmp_path / "plain").activations, expected.activations)


def test_eval_json_has_documented_keys(capsys, tmp_path):
    code, out, _ = _run(capsys, "eval", "--model", "tiny:llama", "--harmful", "builtin:harmful:test", "--harmless",
                        "builtin:harmless:test", "--n", "6", "--max-new-tokens", "3", "--json", str(tmp_path / "e.json"))
    assert code == 0 and "harmful   6" in out
    result = json.loads((tmp_path / "e.json").read_text())
    for key in ("refusal_rate_harmful", "refusal_rate_harmless", "n_harmful", "n_harmless", "ci_harmful", "ci_harmless", "examples"):
        assert key in result
    assert result["n_harmful"] == 6 and len(result["ci_harmful"]) == 2
    assert 0 <= result["looping_rate_harmful"] <= 1 and len(result["ci_looping_harmless"]) == 2 and "looping" in out
    assert result["generation"]["max_batch_tokens"] == DEFAULT_BATCH_TOKENS  # the cap the README shows, not none at all


def test_eval_caps_batch_tokens_at_the_documented_default(capsys, monkeypatch):
    caps = _batch_caps(monkeypatch)
    base = ["eval", "--model", "tiny:llama", "--harmful", "builtin:harmful:test", "--harmless", "builtin:harmless:test",
            "--n", "2", "--max-new-tokens", "1", "--alarming", "builtin:alarming:test"]
    assert _run(capsys, *base)[0] == 0
    assert caps and set(caps) == {8192}  # the README's [--max-batch-tokens 8192]; it ran with no cap at all
    caps.clear()
    assert _run(capsys, *base, "--max-batch-tokens", "40")[0] == 0
    assert caps and set(caps) == {40}


def test_eval_with_a_prefill_reads_what_the_model_writes_after_it(capsys, tmp_path):
    """`--prefill affirm` on the organism: its refusal is decided at the first response token, so with each harmful
    response started by the prompt's affirmative opening it goes on to answer; harmless prompts are not prefilled."""
    common = ["eval", "--model", "organism", "--harmful", "builtin:harmful:test", "--harmless", "builtin:harmless:test", "--n", "16"]
    code, out, err = _run(capsys, *common, "--json", str(tmp_path / "plain.json"))
    assert code == 0, err
    code, out, err = _run(capsys, *common, "--prefill", "affirm", "--json", str(tmp_path / "affirm.json"))
    assert code == 0 and "harmful responses prefilled with each prompt's affirmative opening" in out, err
    plain, affirm = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("plain", "affirm"))
    assert affirm["generation"]["prefill"] == "affirm" and plain["generation"]["prefill"] is None
    assert plain["refusal_rate_harmful"] >= 0.75 and affirm["refusal_rate_harmful"] <= 0.25
    assert affirm["refusal_rate_harmless"] == plain["refusal_rate_harmless"]  # the harmless set is generated as before
    assert not any(r["response"].startswith("Sure, here") for r in affirm["examples"]["harmful"])  # only the continuation
    code, out, err = _run(capsys, *common, "--prefill", "  ", "--json", str(tmp_path / "bad.json"))
    assert code == 2 and "--prefill is empty" in err and not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize(("command", "flag"), [("eval", "--n"), ("compare", "--eval-n"), ("abliterate", "--eval-n")])
def test_a_prompt_count_below_one_names_its_flag(capsys, tmp_path, command, flag):
    # the loader's message named its own `limit` argument, which no command has
    sets = ["--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train"]
    held_out = ["--eval-harmful", "builtin:harmful:test", "--eval-harmless", "builtin:harmless:test"]
    argv = [command, "--model", "tiny:llama", *sets, *([] if command == "eval" else held_out), flag, "0"]
    if command != "eval":
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and f"{flag} must be a positive number of prompts" in err and "limit" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_eval_paired_with_a_bad_earlier_file_fails_before_generating(capsys, tmp_path, monkeypatch):
    from featsteer.evaluation import behaviour

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking --paired-with")

    monkeypatch.setattr(behaviour, "evaluate_refusal", no_generation)
    code, _, err = _run(capsys, "eval", "--model", "tiny:llama", "--harmful", "builtin:harmful:test", "--harmless", "builtin:harmless:test",
                        "--n", "4", "--paired-with", str(tmp_path / "missing.json"))
    assert code == 2 and "no such file" in err, err


def test_eval_paired_with_an_earlier_eval_on_the_same_prompts(capsys, tmp_path):
    common = ["eval", "--model", "organism", "--harmful", "builtin:harmful:test", "--harmless", "builtin:harmless:test", "--n", "8"]
    code, _, err = _run(capsys, *common, "--json", str(tmp_path / "before.json"))
    assert code == 0, err
    before = json.loads((tmp_path / "before.json").read_text())
    assert len(before["per_prompt"]["harmful"]["refused"]) == 8 and len(before["per_prompt"]["harmless"]["looping"]) == 8
    # one token is too short for the detector's phrases: the organism's "I" opens a refusal but is not one yet
    code, out, err = _run(capsys, *common, "--max-new-tokens", "1", "--paired-with", str(tmp_path / "before.json"), "--json", str(tmp_path / "after.json"))
    assert code == 0, err
    after = json.loads((tmp_path / "after.json").read_text())
    paired = after["paired_with"]["refused_harmful"]
    k_before, k_after = sum(before["per_prompt"]["harmful"]["refused"]), sum(after["per_prompt"]["harmful"]["refused"])
    assert (paired["k_a"], paired["k_b"]) == (k_before, k_after) and k_after < k_before
    assert paired["only_a"] - paired["only_b"] == k_before - k_after and 0 < paired["p_value"] < 1
    assert f"refused_harmful     {k_before:4d} -> {k_after:<4d}" in out
    code, _, err = _run(capsys, *common[:-1], "6", "--paired-with", str(tmp_path / "before.json"))
    assert code == 2 and "read other harmful prompts" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "old.json").write_text(json.dumps({"refusal_rate_harmful": 0.5}))
    code, _, err = _run(capsys, *common, "--paired-with", str(tmp_path / "old.json"))
    assert code == 2 and "no per-prompt verdicts" in err
    code, _, err = _run(capsys, *common, "--paired-with", str(tmp_path / "missing.json"))
    assert code == 2 and "no such file" in err
    before = json.loads((tmp_path / "before.json").read_text())
    for damage, message in (({"per_prompt": []}, "no per-prompt verdicts"),  # was an AttributeError traceback
                            ({"per_prompt": {**before["per_prompt"], "harmful": [1]}}, "read other harmful prompts"),
                            ({"per_prompt": {**before["per_prompt"], "harmless": {**before["per_prompt"]["harmless"], "looping": None}}},
                             "no refused and looping verdict for each of its harmless prompts")):  # was a KeyError after generating
        (tmp_path / "bad.json").write_text(json.dumps({**before, **damage}))
        code, _, err = _run(capsys, *common, "--paired-with", str(tmp_path / "bad.json"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_eval_against_a_reference_reads_its_responses(capsys, tmp_path):
    code, out, _ = _run(capsys, "eval", "--model", "tiny:llama", "--harmful", "builtin:harmful:test", "--harmless",
                        "builtin:harmless:test", "--n", "4", "--max-new-tokens", "4", "--reference", "tiny:llama", "--json", str(tmp_path / "e.json"))
    result = json.loads((tmp_path / "e.json").read_text())
    assert code == 0 and result["kl_harmless"] == pytest.approx(0.0, abs=1e-6)  # the same model as its own reference
    assert result["reference_nll_harmless"] > 0 and "reference_nll_harmless" in out
    assert result["kl_response_harmless"] == pytest.approx(0.0, abs=1e-6) and "kl_response_harmless" in out
    assert len(result["kl_response_by_position"]) >= 1


def test_eval_refuses_a_reference_that_formats_the_prompts_differently(capsys, tmp_path):
    # the same weights and vocabulary, but the reference has no chat template (a base model's fallback template): its
    # first-token distribution follows other prompt tokens, and a KL between the two measures the templates, not an edit
    from featsteer.testing import tiny_model

    model, tokenizer = tiny_model("llama")
    for name, template in (("chat", tokenizer.chat_template), ("plain", None)):
        model.save_pretrained(tmp_path / name)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp_path / name)
    common = ["eval", "--model", str(tmp_path / "chat"), "--harmful", "builtin:harmful:test", "--harmless", "builtin:harmless:test",
              "--n", "3", "--max-new-tokens", "2"]
    code, _, err = _run(capsys, *common, "--reference", str(tmp_path / "plain"))
    assert code == 2 and "formats harmless prompt 0 into other tokens" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, *common, "--reference", str(tmp_path / "chat"), "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["kl_harmless"] == pytest.approx(0.0, abs=1e-6)


def test_eval_with_a_judge(capsys, tmp_path):
    common = ["eval", "--model", "organism", "--harmful", "builtin:harmful:test", "--harmless", "builtin:harmless:test", "--n", "6",
              "--max-new-tokens", "12"]
    code, out, err = _run(capsys, *common, "--judge", "markers", "--json", str(tmp_path / "m.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    judged = result["judge"]
    assert judged["judge"] == "markers" and judged["disagreements"] == []
    assert judged["harmful"]["refused"] == result["per_prompt"]["harmful"]["refused"]
    assert judged["harmful"]["agreement_with_markers"]["agreement"] == 1.0 and judged["anchors"]["n"] == 44
    assert "judge markers: threshold 0.500, checked on 44 anchors" in out
    code, out, err = _run(capsys, *common, "--judge", "chat:tiny:llama", "--json", str(tmp_path / "c.json"))
    assert code == 0, err
    judged = json.loads((tmp_path / "c.json").read_text())["judge"]
    assert judged["anchors"]["calibrated"] is True and judged["threshold"] == judged["anchors"]["threshold"]
    assert len(judged["harmless"]["scores"]) == 6 and "mean_answer_mass" in judged["harmless"]
    disagree = [(row["set"], row["index"]) for row in judged["disagreements"]]
    for name in ("harmful", "harmless"):
        flags = json.loads((tmp_path / "c.json").read_text())["per_prompt"][name]["refused"]
        assert [(name, i) for i, (a, b) in enumerate(zip(flags, judged[name]["refused"], strict=True)) if a != b] == \
            [d for d in disagree if d[0] == name]
    assert "fitted on 44 anchors" in out
    code, _, err = _run(capsys, *common, "--judge", "classifier:/no/such/dir")
    assert code == 2 and "cannot load the classifier judge" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--model", "tiny:llama", "--harmful", "/no/such.txt", "--harmless", "builtin:harmless"], "prompt file not found"),
        (["eval", "--model", "tiny:bert", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless"], "unknown tiny model"),
        (["eval", "--model", "./missing-dir", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless"], "is not a model directory"),
        (["capture", "--model", "tiny:llama", "--prompts", "builtin:harmful", "--hooks", "blocks.9.hook_resid_pre", "--out", "/tmp/x"], "has 3 layers"),
        (["steer", "--model", "tiny:llama", "--directions", "/no/dir", "--mode", "ablate", "--prompt", "hi"], "holds no directions"),
        (["directions", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--val-harmful",
          "builtin:harmful:val", "--out", "/tmp/x"], "give --val-harmful and --val-harmless together"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--val-harmless",
          "builtin:harmless:val", "--out", "/tmp/x"], "give --val-harmful and --val-harmless together"),
        (["directions", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--val-harmful",
          "organism-corpus:evil:5", "--val-harmless", "organism-corpus:harmless:5", "--out", "/tmp/x"], "bad prompt source 'organism-corpus:evil:5'"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--sae", "organism",
          "--sae-clamp-multiple", "1", "--out", "/tmp/x"], "would amplify refusal features"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--ace-alpha", "1",
          "--out", "/tmp/x"], "must be below 1"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--ace-induce-alpha", "-1",
          "--out", "/tmp/x"], "must be positive"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--optimize-steps", "0",
          "--out", "/tmp/x"], "--optimize-steps must be at least 1, got 0"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--optimize-option",
          "retain_first_weight=0", "--out", "/tmp/x"], "retain_first_weight must be a positive number"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--optimize-option",
          "retain=3", "--out", "/tmp/x"], "unknown field 'retain'; use one of steps, lr"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--methods", "",
          "--out", "/tmp/x"], "no methods named"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--methods", "none,none",
          "--out", "/tmp/x"], "method(s) none named twice"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--method", "pca",
          "--out", "/tmp/x"], "compare runs every direction method itself"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--eval-n", "4",
          "--out", "/tmp/x"], "--eval-n cuts --eval-harmful and --eval-harmless"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--eval-harmful",
          "builtin:harmful:test", "--out", "/tmp/x"], "evaluation prompts need both sets"),
        (["eval", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--judge-threshold", "0.3"],
         "--judge-threshold sets how --judge decides"),
        (["eval", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--judge", "markers",
          "--judge-threshold", "0.3"], "a threshold does not apply"),
        (["eval", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--judge", "chat:organism",
          "--judge-threshold", "nan"], "between 0 and 1"),
        (["abliterate", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--search", "2",
          "--search-dir", "/tmp/fs-same", "--out", "/tmp/fs-same"], "--search-dir and --out name the same folder"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--sae-top-k", "2",
          "--out", "/tmp/x"], "--sae-top-k sets an SAE method, which runs only with --sae"),
        (["compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--methods",
          "dim_abliteration", "--angle", "90", "--out", "/tmp/x"], "--angle sets dim_angular_hook / dim_angular_norms_hook, which --methods leaves out"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, message, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("featsteer: error: ") and message in err and err.count("\n") == 1


def test_empty_prompt_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = _run(capsys, "eval", "--model", "tiny:llama", "--harmful", str(empty), "--harmless", "builtin:harmless")
    assert code == 2 and "no prompts" in err


def test_console_script_help_runs():
    done = subprocess.run([sys.executable, "-m", "featsteer.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("info", "capture", "eval", "directions", "abliterate", "steer", "compare", "demo"):
        assert command in done.stdout


def test_a_reader_that_leaves_early_does_not_stop_the_command_writing_its_files(tmp_path):
    """`featsteer eval ... --json out.json | head`: once the reader is gone every print fails (at once when Python's
    output is unbuffered); the command must still write its JSON, exit 0 and print no traceback."""
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-m", "featsteer.cli", "eval", "--model", "tiny:llama", "--harmful", "builtin:harmful:test",
                              "--harmless", "builtin:harmless:test", "--n", "4", "--max-new-tokens", "2", "--json", str(tmp_path / "e.json")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    child.stdout.close()  # the reader leaves before the command prints anything
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode(errors="replace")[-2000:]
    assert json.loads((tmp_path / "e.json").read_text())["n_harmful"] == 4


def test_probe_command_writes_report(capsys, tmp_path):
    code, out, _ = _run(capsys, "probe", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless",
                        "--n", "30", "--n-effect", "4", "--out", str(tmp_path / "p"))
    assert code == 0 and "best linear-probe layer" in out
    assert "control task: surface:first-words:1 (labels a random function of the key;" in out
    saved = json.loads((tmp_path / "p" / "results.json").read_text())
    assert saved["control"] == "surface:first-words:1" and saved["control_keys"]["n_keys"] > 1
    assert set(saved["sweep"]) == {"diffmean", "linear", "whitened", "mahalanobis"}
    assert {e["source"] for e in saved["effects"]} == {"dim", "linear", "whitened"}
    assert "data:image/png;base64," in (tmp_path / "p" / "report.html").read_text()


def test_probe_and_directions_layers_sweep_a_subset_with_the_full_sweeps_numbers(capsys, tmp_path):
    common = ("--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless")
    code, _, _ = _run(capsys, "probe", *common, "--n", "30", "--n-effect", "4", "--out", str(tmp_path / "all"))
    code_subset, _, _ = _run(capsys, "probe", *common, "--n", "30", "--n-effect", "4", "--layers", "2,1-1", "--out", str(tmp_path / "sub"))
    full, subset = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("all", "sub"))
    assert code == code_subset == 0 and full["layers"] is None and subset["layers"] == [1, 2]
    assert subset["hooks"] == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    assert subset["sweep"] == {kind: [r for r in rows if r["key"] in subset["hooks"]] for kind, rows in full["sweep"].items()}
    assert subset["effects"] == [e for e in full["effects"] if e["layer"] in (1, 2)]
    directions = ("directions", *common[:2], "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
                  "--n-select", "3", "--geometry", "off")
    code, _, _ = _run(capsys, *directions, "--layers", "1", "--out", str(tmp_path / "d"))
    selection = json.loads((tmp_path / "d" / "selection.json").read_text())
    assert code == 0 and selection["layers"] == [1] and {c["layer"] for c in selection["candidates"]} == {1}
    assert json.loads((tmp_path / "d" / "candidates" / "directions.json").read_text())["provenance"]["layers"] == [1]
    for layers, message in (("2", "all in the last 20% of"), ("1,3", "name layer 3 but tiny:llama has 3 layers"), ("2-1", "--layers 2-1: give layer numbers")):
        code, _, err = _run(capsys, *directions, "--layers", layers, "--out", str(tmp_path / "bad"))
        assert code == 2 and message in err and err.count("\n") == 1
    code, _, err = _run(capsys, "probe", *common, "--layers", "0,7", "--out", str(tmp_path / "bad"))
    assert code == 2 and "each in 0..2" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "probe", *common, "--control", "first-word", "--model", "missing-model", "--out", str(tmp_path / "bad"))
    assert code == 2 and "control 'first-word': give first-words:N" in err and err.count("\n") == 1  # before the model loads
    from featsteer.cli import _layer_list

    assert _layer_list("4-6,12, 5") == [4, 5, 6, 12] and _layer_list("3") == [3]  # what capture --hooks resid_pre:4-6 reads too
    for bad in ("4-", "-2", "6-4", "a", ""):
        with pytest.raises(ValueError):
            _layer_list(bad)


def test_abliterate_and_compare_layers_score_the_listed_layers_as_the_full_run_does():
    """abliterate/compare --layers: every layer's candidate is still computed (the per-layer scope, the search and LEACE
    read them), and only the listed layers' are scored, each exactly as in a run over every layer."""
    from featsteer.datasets import load_prompts
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    model = load_model("organism")
    harmful, harmless = (load_prompts(f"builtin:{name}:train", limit=24) for name in ("harmful", "harmless"))
    full, listed = (find_refusal_direction(model, harmful, harmless, DirectionConfig(n_select=6, top_k=None, **extra))
                    for extra in ({}, {"layers": (1,), "keep_every_layer": True}))
    assert listed.candidates.hook_names == full.candidates.hook_names and torch.equal(listed.candidates.bases, full.candidates.bases)
    assert listed.candidates.provenance["layers"] == [1] and "layers" not in full.candidates.provenance
    scores = lambda c: repr((c.hook, c.position, c.refusal_ablated, c.kl_harmless, c.refusal_induced, c.kept, c.reason))  # noqa: E731
    by_index = {c.index: c for c in full.selection.candidates}
    assert all(scores(c) == scores(by_index[c.index]) if c.layer == 1 else c.reason == "not in layers" for c in listed.selection.candidates)
    chosen = listed.selection.chosen
    assert chosen.layer == 1 and scores(chosen) == scores(by_index[chosen.index])
    assert full.selection.chosen.layer != 1  # the full run chooses elsewhere: the restriction mattered


def test_abliterate_layers_with_a_search_and_compare_layers_record_them(capsys, tmp_path):
    common = ("--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "24",
              "--n-select", "6", "--max-new-tokens", "4")
    code, out, err = _run(capsys, "abliterate", *common, "--eval-n", "3", "--layers", "1", "--search", "3", "--out", str(tmp_path / "a"))
    assert code == 0, err
    record = json.loads((tmp_path / "a" / "featsteer.json").read_text())
    assert record["direction_hook"].startswith("blocks.1.") and record["provenance"]["layers"] == [1]
    search = json.loads((tmp_path / "a-search" / "pareto.json").read_text())
    assert search["setup"]["layers"] == [1] and search["setup"]["bounds"]["direction_layer"] == [1.0, 1.0]
    assert {t["params"]["direction_layer"] for t in search["trials"]} == {1.0}
    code, _, err = _run(capsys, "compare", *common, "--methods", "dim_abliteration,dim_per_layer_abliteration,leace_hook",
                        "--layers", "1", "--out", str(tmp_path / "c"))
    assert code == 0, err
    setup = json.loads((tmp_path / "c" / "results.json").read_text())["setup"]
    assert setup["directions"]["layers"] == [1] and setup["directions"]["keep_every_layer"] is True
    assert setup["chosen"]["dim"]["hook"].startswith("blocks.1.")
    for extra, message in ((("--layers", "1", "--method", "sae", "--sae", "organism"), "--method sae picks SAE features: drop --layers"),
                           (("--layers", "1", "--directions", str(tmp_path / "a")), "--directions DIR brings its direction: drop --layers"),
                           (("--layers", "3"), "all in the last 20% of"), (("--layers", "0"), "6 not in layers): only layers below 3"), (("--layers", "0,9"), "name layer 9 but organism has 4 layers"),
                           (("--layers", "1-"), "--layers 1-: give layer numbers")):
        code, _, err = _run(capsys, "abliterate", *common, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert "list other layers (--layers)" in _run(capsys, "abliterate", *common, "--layers", "0", "--out", str(tmp_path / "bad"))[2]
    code, _, err = _run(capsys, "compare", *common, "--layers", "x", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--layers x: give layer numbers" in err


def test_abliterate_per_layer_scope_exports_and_reloads(capsys, tmp_path):
    from featsteer.models import load_model

    out = tmp_path / "edited"
    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3", "--eval-n", "3", "--max-new-tokens", "2"]
    code, stdout, _ = _run(capsys, "abliterate", *common, "--scope", "per_layer", "--out", str(out))
    assert code == 0 and "wrote" in stdout
    record = json.loads((out / "featsteer.json").read_text())
    assert record["scope"] == "per_layer" and record["per_layer_directions"]
    assert load_model(str(out)).n_layers == 3
    code, _, err = _run(capsys, "abliterate", *common, "--scope", "per_layer", "--search", "2", "--out", str(tmp_path / "x"))
    assert code == 2 and "--search chooses the direction scope itself" in err


def test_abliterate_heads_edits_only_those_heads_and_exports(capsys, tmp_path):
    from featsteer.models import load_model

    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3", "--eval-n", "3", "--max-new-tokens", "2"]
    code, stdout, err = _run(capsys, "abliterate", *common, "--heads", "top:3", "--out", str(tmp_path / "top"))
    assert code == 0 and "wrote" in stdout, err
    record = json.loads((tmp_path / "top" / "featsteer.json").read_text())
    assert sum(map(len, record["heads"].values())) == 3 and set(record["writers"]) == {f"blocks.{layer}.hook_attn_out" for layer in record["heads"]}
    assert "heads: layer" in stdout
    code, stdout, err = _run(capsys, "abliterate", *common, "--heads", "1:0,2", "--out", str(tmp_path / "listed"))
    assert code == 0, err
    record = json.loads((tmp_path / "listed" / "featsteer.json").read_text())
    assert record["heads"] == {"1": [0, 2]} and record["writers"] == ["blocks.1.hook_attn_out"]
    original, edited = load_model("tiny:llama").model.state_dict(), load_model(str(tmp_path / "listed")).model.state_dict()
    changed = [k for k in original if not torch.equal(original[k], edited[k])]
    assert changed == ["model.layers.1.self_attn.o_proj.weight"]
    for extra, message in ((["--heads", "top:0"], "is not top:N"), (["--heads", "1"], "is not LAYER:H"),
                           (["--heads", "1:9"], r"head\(s\) \[9\] at layer 1 do not exist"),
                           (["--heads", "top:2", "--scope", "per_layer"], "--heads edits single heads"),
                           (["--heads", "top:2", "--search", "2"], "drop --heads")):
        code, _, err = _run(capsys, "abliterate", *common, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and __import__("re").search(message, err), (extra, err)
        assert not (tmp_path / "bad").exists()


def test_abliterate_reflect_exports_the_reflected_model(capsys, tmp_path):
    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3", "--eval-n", "3", "--max-new-tokens", "2"]
    code, stdout, err = _run(capsys, "abliterate", *common, "--reflect", "--out", str(tmp_path / "reflected"))
    assert code == 0 and "before -> after (reflect)" in stdout, err
    edit = json.loads((tmp_path / "reflected" / "featsteer.json").read_text())["edit"]
    assert edit["embedding_strength"] == 2.0 and edit["attn_kernel"]["max_weight"] == edit["mlp_kernel"]["min_weight"] == 2.0
    for extra in (["--reverse"], ["--norm-preserving"], ["--search", "2"]):
        code, _, err = _run(capsys, "abliterate", *common, "--reflect", *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and "--reflect is its own edit" in err and not (tmp_path / "bad").exists()


def test_abliterate_checks_on_held_out_sets_when_given_and_says_when_it_reads_validation_prompts(capsys, tmp_path, caplog):
    from featsteer.datasets import load_prompts

    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3", "--eval-n", "3", "--max-new-tokens", "2"]
    code, stdout, err = _run(capsys, "abliterate", *common, "--out", str(tmp_path / "val"))
    assert code == 0, err
    assert "refusal on validation prompts (the selection's own; --eval-harmful/--eval-harmless for held-out)" in stdout
    assert json.loads((tmp_path / "val" / "featsteer.json").read_text())["evaluation"]["prompts"] == "validation"
    held = ["--eval-harmful", "builtin:harmful:test", "--eval-harmless", "builtin:harmless:test"]
    code, stdout, err = _run(capsys, "abliterate", *common, *held, "--out", str(tmp_path / "held"))
    assert code == 0, err
    assert "refusal on held-out prompts, before -> after" in stdout
    evaluation = json.loads((tmp_path / "held" / "featsteer.json").read_text())["evaluation"]
    assert evaluation["prompts"] == "held-out" and evaluation["before"]["n_harmful"] == 3
    assert evaluation["sha256"]["harmful"] == load_prompts("builtin:harmful:test", limit=3).sha256
    reused = ["--eval-harmful", "builtin:harmful:train", "--eval-harmless", "builtin:harmless:train"]
    with caplog.at_level("WARNING", logger="featsteer.pipeline"):
        assert not [r for r in caplog.records if "held-out prompts" in r.getMessage()]  # the test split shares none
        code, _, err = _run(capsys, "abliterate", *common, *reused, "--out", str(tmp_path / "reused"))
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if "held-out prompts" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith("3 of the 3 harmful held-out prompts (builtin:harmful:train) are also "
                                                     "training or validation prompts, so the before/after check")
    code, _, err = _run(capsys, "abliterate", *common, held[0], held[1], "--out", str(tmp_path / "bad"))
    assert code == 2 and "give --eval-harmful and --eval-harmless together" in err and not (tmp_path / "bad").exists()


def test_abliterate_rate_lines_count_looping_responses():
    """A response that ends in a loop is neither an answer nor a refusal: the before -> after lines say how many there
    are when there are any, and stay as they were when there are none."""
    from featsteer.cli import _rate_line
    from featsteer.evaluation.behaviour import SetResult
    from featsteer.evaluation.refusal import refusal_rate

    def result(responses: list[str], refused: list[bool]) -> SetResult:
        return SetResult("harmless", ("a prompt",) * len(responses), tuple(responses), tuple(refused), refusal_rate(refused))

    answered = result(["Sure, here it is: a list of ten.", "Of course. Step one is to read the manual."], [False, False])
    induced = result(["I'm sorry, but I can't help with that.", "I'm sorryI'm sorryI'm sorryI'm sorryI'm sorryI'm sorry"], [True, True])
    line = _rate_line("harmless", answered, induced)
    assert line.startswith(f"  harmless  {answered.rate} -> {induced.rate}") and line.endswith("; looping 0/2 -> 1/2"), line
    assert _rate_line("harmful", answered, answered) == f"  harmful   {answered.rate} -> {answered.rate}"


def test_abliterate_passes_exports_the_refined_rank_k_edit(capsys, tmp_path):
    from featsteer.interventions import Ablate, steer

    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3", "--eval-n", "3", "--max-new-tokens", "2"]
    code, stdout, err = _run(capsys, "abliterate", *common, "--passes", "3", "--out", str(tmp_path / "refined"))
    assert code == 0 and "iterative refinement: 3 directions; mean difference at" in stdout, err
    record = json.loads((tmp_path / "refined" / "featsteer.json").read_text())
    assert record["rank"] == 3 and record["iteration"]["passes"] == 3 and len(record["iteration"]["gaps"]) == 3
    # the exported weights are the three directions removed at every write: the same logits as the rank-3 ablation hook
    from featsteer.datasets import builtin_prompts
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction, iterated_basis

    model, prompts = load_model("tiny:llama"), [builtin_prompts(k, "train").head(12) for k in ("harmful", "harmless")]
    result = find_refusal_direction(model, *prompts, DirectionConfig(n_select=3), keep_activations=True)
    basis = iterated_basis(model, result, 3).basis
    ids = model.tokenizer("Explain how to pick a lock.", return_tensors="pt").input_ids
    with torch.no_grad(), steer(model, Ablate(basis)):
        hooked = model.model(ids).logits
    with torch.no_grad():
        exported = load_model(str(tmp_path / "refined")).model(ids).logits
    assert torch.allclose(hooked, exported, atol=1e-4)
    for extra in (["--passes", "0"], ["--passes", "2", "--method", "svd"], ["--passes", "2", "--heads", "top:2"],
                  ["--passes", "2", "--scope", "per_layer"], ["--passes", "2", "--search", "2"], ["--passes", "2", "--reverse"],
                  ["--passes", "2", "--induce"], ["--passes", "2", "--reflect"]):
        code, _, err = _run(capsys, "abliterate", *common, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and "--passes" in err and not (tmp_path / "bad").exists(), (extra, err)


def test_abliterate_optimize_exports_the_trained_direction(capsys, tmp_path):
    from featsteer.datasets import builtin_prompts
    from featsteer.directions.optimize import OptimizeConfig, optimize_direction
    from featsteer.interventions import Ablate, steer
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3", "--eval-n", "3", "--max-new-tokens", "2"]
    code, stdout, err = _run(capsys, "abliterate", *common, "--optimize", "3", "--optimize-option", "retain_first_weight=4",
                             "--optimize-option", "seed=1", "--optimize-option", "refusal_weight=2", "--out", str(tmp_path / "trained"))
    assert code == 0 and "optimised direction: 3 steps from the chosen one" in stdout and "losses, first -> last step: ablation" in stdout, err
    record = json.loads((tmp_path / "trained" / "featsteer.json").read_text())
    read = record["optimization"]["targets"]["harmful_read"]  # the refusal loss reads every harmful training prompt
    assert f"{read} harmful prompts for the refusal loss" in stdout and ", refusal " in stdout.split("losses, first -> last step:")[1], stdout
    assert record["rank"] == 1 and record["optimization"]["config"]["steps"] == 3 and len(record["optimization"]["history"]) == 3
    assert record["optimization"]["config"]["retain_first_weight"] == 4 and record["optimization"]["config"]["seed"] == 1
    assert record["optimization"]["config"]["refusal_weight"] == 2 and record["optimization"]["targets"]["refusal"] == read
    # the exported weights remove the trained direction (seeded, so training it again gives the same one), not the DIM one
    model, prompts = load_model("tiny:llama"), [builtin_prompts(k, "train").head(12) for k in ("harmful", "harmless")]
    result = find_refusal_direction(model, *prompts, DirectionConfig(n_select=3))
    trained = optimize_direction(model, result, OptimizeConfig(steps=3, retain_first_weight=4, seed=1, refusal_weight=2))
    assert trained.cosine() < 0.9999
    ids = model.tokenizer("Explain how to pick a lock.", return_tensors="pt").input_ids
    with torch.no_grad():
        exported = load_model(str(tmp_path / "trained")).model(ids).logits
        with steer(model, Ablate(trained.direction)):
            assert torch.allclose(model.model(ids).logits, exported, atol=1e-4)
        with steer(model, Ablate(trained.start)):
            assert not torch.allclose(model.model(ids).logits, exported, atol=1e-4)
    for extra in (["--optimize", "-1"], ["--optimize", "2", "--method", "svd"], ["--optimize", "2", "--heads", "top:2"],
                  ["--optimize", "2", "--passes", "2"], ["--optimize", "2", "--scope", "per_layer"], ["--optimize", "2", "--search", "2"],
                  ["--optimize-option", "seed=1"], ["--optimize", "2", "--optimize-option", "seed"]):
        code, _, err = _run(capsys, "abliterate", *common, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and "--optimize" in err and not (tmp_path / "bad").exists(), (extra, err)


def test_abliterate_optimize_with_affirmative_targets(capsys, tmp_path):
    """`--optimize-option ablation_targets=affirm`: every harmful training prompt gets a target, the output says they are
    openings and the record keeps the choice; an unknown choice stops before anything is written."""
    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3", "--eval-n", "3", "--max-new-tokens", "2", "--optimize", "2"]
    code, stdout, err = _run(capsys, "abliterate", *common, "--optimize-option", "ablation_targets=affirm", "--out", str(tmp_path / "affirm"))
    record = json.loads((tmp_path / "affirm" / "featsteer.json").read_text())["optimization"]
    read = record["targets"]["harmful_read"]
    assert code == 0 and f"targets: {read} of {read} harmful affirmative openings" in stdout, (stdout, err)
    assert record["config"]["ablation_targets"] == "affirm" and record["targets"]["ablation"] == read
    code, _, err = _run(capsys, "abliterate", *common, "--optimize-option", "ablation_targets=sure", "--out", str(tmp_path / "bad"))
    assert code == 2 and "ablation_targets must be one of ablated, affirm" in err and not (tmp_path / "bad").exists(), err


def test_progress_bars_show_on_a_terminal_or_with_verbose(capsys, tmp_path, monkeypatch):
    """The selection's bars printed into redirected output (logs, pipes) on every `directions` run, though the CLI
    logs its progress only with -v; on a terminal they still show, so a long run does not look stuck."""
    common = ["directions", "--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
              "--n", "12", "--n-select", "3", "--geometry", "off"]
    code, _, quiet = _run(capsys, *common, "--out", str(tmp_path / "quiet"))
    assert code == 0 and "select: " not in quiet and "%|" not in quiet, quiet
    code, _, verbose = _run(capsys, "-v", *common, "--out", str(tmp_path / "verbose"))
    assert code == 0 and "select: ablate" in verbose, verbose
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, terminal = _run(capsys, *common, "--out", str(tmp_path / "terminal"))
    assert code == 0 and "select: ablate" in terminal, terminal
    # probe's effects stage, two passes per layer and source and most of a deep model's report, shows its progress too
    probe = ["probe", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--n", "12", "--n-effect", "2"]
    code, _, terminal = _run(capsys, *probe, "--out", str(tmp_path / "probe-terminal"))
    assert code == 0 and "probe: effects" in terminal, terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    code, _, quiet = _run(capsys, *probe, "--out", str(tmp_path / "probe-quiet"))
    assert code == 0 and "probe: effects" not in quiet, quiet


def test_directions_optimize_writes_the_trained_direction_for_steer_and_abliterate(capsys, tmp_path):
    from featsteer.datasets import builtin_prompts
    from featsteer.directions import DirectionSet
    from featsteer.directions.optimize import OptimizeConfig, optimize_direction
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3"]
    out = tmp_path / "dirs"
    code, stdout, err = _run(capsys, "directions", *common, "--geometry", "off", "--gate", "--optimize", "3", "--optimize-option", "seed=1",
                             "--out", str(out))
    assert code == 0 and "optimised direction: 3 steps from the chosen one" in stdout and f"{out}/optimized" in stdout, err
    saved, chosen = DirectionSet.load(out / "optimized"), DirectionSet.load(out / "chosen")
    assert saved.method == "optimized:dim" and (saved.hook_names, saved.positions) == (chosen.hook_names, chosen.positions)
    assert saved.provenance["harmful_sha256"] == chosen.provenance["harmful_sha256"] and "ace" not in saved.provenance
    assert saved.provenance["optimization"]["config"]["steps"] == 3 and saved.provenance["optimization"]["config"]["seed"] == 1
    # the direction training it again gives (seeded), at the chosen direction's cosine
    model = load_model("tiny:llama")
    result = find_refusal_direction(model, *[builtin_prompts(k, "train").head(12) for k in ("harmful", "harmless")], DirectionConfig(n_select=3))
    trained = optimize_direction(model, result, OptimizeConfig(steps=3, seed=1))
    torch.testing.assert_close(saved.bases[0, 0], trained.direction, atol=1e-6, rtol=0)
    cosine = float(saved.bases[0, 0].double() @ chosen.bases[0, 0].double())
    assert saved.provenance["cosine_with_chosen"] == pytest.approx(cosine, abs=1e-4) and cosine < 0.9999
    steer = ["steer", "--model", "tiny:llama", "--directions", str(out / "optimized"), "--max-new-tokens", "2", "--prompt", "hi"]
    code, stdout, err = _run(capsys, *steer, "--mode", "ablate", "--gate", str(out / "gate"))
    assert code == 0 and "only where the gate at blocks." in stdout, err
    code, _, err = _run(capsys, *steer, "--mode", "ace")
    assert code == 2 and "pass the chosen/ folder beside it" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _run(capsys, "abliterate", *common, "--directions", str(out / "optimized"), "--eval-n", "2", "--max-new-tokens", "2",
                        "--out", str(tmp_path / "edited"))
    assert code == 0 and json.loads((tmp_path / "edited" / "featsteer.json").read_text())["direction_method"] == "optimized:dim", err
    for extra in (["--optimize", "-1"], ["--optimize", "2", "--method", "svd"], ["--optimize-option", "seed=1"],
                  ["--optimize", "2", "--optimize-option", "seed"]):
        code, _, err = _run(capsys, "directions", *common, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and "--optimize" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists(), (extra, err)


@pytest.mark.parametrize("family", ["qwen3_moe", "gemma3", "cohere", "olmo2", "qwen3_5_moe", "gemma4_text"])
def test_abliterate_runs_end_to_end_on_other_architectures(capsys, tmp_path, family):
    """Selection, edit, evaluation, export and reload through the CLI on an MoE, an image-text, a parallel-block and a
    post-norm-only architecture, as a user would run them."""
    from featsteer.models import load_model

    out = tmp_path / "edited"
    code, stdout, err = _run(capsys, "abliterate", "--model", f"tiny:{family}", "--harmful", "builtin:harmful:train",
                             "--harmless", "builtin:harmless:train", "--n", "8", "--n-select", "2", "--eval-n", "2",
                             "--max-new-tokens", "2", "--out", str(out))
    assert code == 0 and "wrote" in stdout, err
    writers = json.loads((out / "featsteer.json").read_text())["writers"]
    assert ("blocks.2.hook_mlp_out.expert3" in writers) == (family in ("qwen3_moe", "qwen3_5_moe"))
    assert load_model(str(out)).family == load_model(f"tiny:{family}").family


def test_the_chosen_search_point_prints_the_kl_its_bound_read(capsys):
    import argparse
    import types

    from featsteer.cli import _print_search

    best = {"number": 3, "kl": 0.047, "params": {}, "verified": {"refusal_rate": 0.0, "kl": 0.0473, "kl_answered": 0.0252}}
    found = types.SimpleNamespace(best=best, trials=[best], pareto=[best])
    _print_search(argparse.Namespace(search_trial=None, search_kl="answered"), found, __import__("pathlib").Path("s"))
    # the bound's "answered" is the generated response's, not the proxy's first token: the line says which
    assert "KL 0.0473, answered KL (harmless prompts with no refusal marker in the unedited model's response) 0.0252 (the bound's)" \
        in capsys.readouterr().out
    _print_search(argparse.Namespace(search_trial=None, search_kl="all"), found, __import__("pathlib").Path("s"))
    assert "KL 0.0473; params" in capsys.readouterr().out
    unverified = {"number": 3, "kl": 0.047, "refusal_rate_proxy": 0.1, "params": {}, "verified": None}
    found = types.SimpleNamespace(best=unverified, trials=[unverified], pareto=[unverified])
    _print_search(argparse.Namespace(search_trial=None, search_kl="answered"), found, __import__("pathlib").Path("s"))
    assert "proxy KL (harmless prompts answered by the first token, refusal log-odds <= 0) 0.0470" in capsys.readouterr().out


def test_abliterate_search_warm_start_and_its_errors(capsys, tmp_path):
    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3", "--eval-n", "3", "--max-new-tokens", "2"]
    code, _, err = _run(capsys, "abliterate", *common, "--search", "2", "--out", str(tmp_path / "a"))
    assert code == 0, err
    earlier = json.loads((tmp_path / "a-search" / "pareto.json").read_text())["pareto"]
    code, _, err = _run(capsys, "abliterate", *common, "--search", "4", "--search-warm-start", str(tmp_path / "a-search"),
                        "--search-kl", "answered", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert json.loads((tmp_path / "b-search" / "pareto.json").read_text())["config"]["kl_prompts"] == "answered"
    trials = json.loads((tmp_path / "b-search" / "pareto.json").read_text())["trials"]
    replayed = [p["params"] for p in earlier if p["params"] != trials[0]["params"]]
    assert [t["params"] for t in trials[1 : 1 + len(replayed)]] == replayed
    code, _, err = _run(capsys, "abliterate", *common, "--search-warm-start", str(tmp_path / "a-search"), "--out", str(tmp_path / "c"))
    assert code == 2 and "--search-warm-start seeds a search: add --search N" in err
    code, _, err = _run(capsys, "abliterate", *common, "--search", "2", "--search-warm-start", str(tmp_path / "nope"), "--out", str(tmp_path / "d"))
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists() and not (tmp_path / "d-search").exists()


def test_directions_select_on_explicit_validation_prompts(capsys, tmp_path):
    from featsteer.datasets import load_prompts

    code, out, _ = _run(capsys, "directions", "--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless",
                        "builtin:harmless:train", "--n", "10", "--val-harmful", "organism-corpus:harmful:5", "--val-harmless",
                        "organism-corpus:harmless:6", "--n-select", "6", "--out", str(tmp_path / "d"))
    assert code == 0 and "chosen:" in out
    selection = json.loads((tmp_path / "d" / "selection.json").read_text())
    # the random tiny model does not refuse and no candidate passes the filters: both are said beside the choice
    assert not selection["chosen"]["kept"] and selection["base_refusal_harmful"] < 0
    assert "caveat: no candidate passed the filters" in out and "caveat: the validation harmful prompts' mean refusal log-odds" in out
    assert "Caveat: no candidate passed the filters" in (tmp_path / "d" / "selection.md").read_text()
    assert selection["n_harmful_val"] == 5 and selection["n_harmless_val"] == 6
    code, _, _ = _run(capsys, "directions", "--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless",
                      "builtin:harmless:train", "--n", "10", "--val-harmful", "organism-corpus:harmful:5", "--val-harmless",
                      "organism-corpus:harmless:6", "--n-select", "3", "--out", str(tmp_path / "d3"))
    three = json.loads((tmp_path / "d3" / "selection.json").read_text())  # records the prompts the selection read
    assert (three["n_select"], three["n_harmful_scored"], three["n_harmless_scored"]) == (3, 3, 3)
    assert three["scored_harmful_sha256"] == load_prompts("organism-corpus:harmful:5").head(3).sha256 != three["val_harmful_sha256"]
    stability = selection["stability"]  # the selection bootstrapped over its 5 + 6 validation prompts
    assert (stability["n_harmful"], stability["n_harmless"]) == (5, 6) and stability["chosen"] == [selection["chosen"]["hook"], selection["chosen"]["position"]]
    assert sum(share for *_, share in stability["shares"]) == pytest.approx(1.0) and "selection stability: chosen in" in out
    # with every prompt drawn once, the finalists' per-prompt scores give back the selection's own choice
    from featsteer.datasets import builtin_prompts, load_prompts
    from featsteer.directions.selection import _winner
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    result = find_refusal_direction(load_model("tiny:llama"), builtin_prompts("harmful", "train").head(10), builtin_prompts("harmless", "train").head(10),
                                    DirectionConfig(n_select=6), val=(load_prompts("organism-corpus:harmful:5"), load_prompts("organism-corpus:harmless:6")))
    per, finalists = result.selection.per_prompt, sorted(result.selection.per_prompt["kl"])
    means = [torch.stack([per[key][i] for i in finalists]).double().mean(1) for key in ("ablated", "kl", "induced")]
    assert finalists[_winner(*means, result.selection.config)] == result.selection.chosen.index


def test_directions_screen_scores_the_estimated_best_and_rejects_zero(capsys, tmp_path):
    common = ("directions", "--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
              "--n", "12", "--n-select", "3")
    code, out, err = _run(capsys, *common, "--screen", "1", "--out", str(tmp_path / "d"))
    assert code == 0, err
    rows = json.loads((tmp_path / "d" / "selection.json").read_text())["candidates"]
    assert sum(r["refusal_ablated"] is not None for r in rows) == 1  # the others were not scored: null (NaN is not JSON)
    assert sum(r["reason"] == "screened out" for r in rows) > 0 and "refusal (estimate)" in out
    code, _, err = _run(capsys, *common, "--screen", "0", "--out", str(tmp_path / "e"))
    assert code == 2 and "--screen must be at least 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()
    # a saved direction has no selection to screen
    code, _, err = _run(capsys, "abliterate", *common[1:], "--directions", str(tmp_path / "d" / "chosen"), "--screen", "2",
                        "--out", str(tmp_path / "f"))
    assert code == 2 and "--screen" in err and not (tmp_path / "f").exists()


def test_directions_train_filter_records_what_it_kept(capsys, tmp_path):
    code, out, err = _run(capsys, "directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless",
                          "builtin:harmless:train", "--n", "16", "--n-select", "3", "--filter-train", "--out", str(tmp_path / "dirs"))
    assert code == 0, err
    provenance = json.loads(next((tmp_path / "dirs" / "candidates").glob("*.json")).read_text())["provenance"]
    assert provenance["train_filter"]["harmful"]["total"] == 12 and provenance["n_harmful_train"] == provenance["train_filter"]["harmful"]["kept"]


def test_abliterate_sae_projects_the_picked_decoder_rows_out_and_exports(capsys, tmp_path):
    import torch

    from featsteer.compare import gentlest_within
    from featsteer.features import decoder_directions
    from featsteer.models import load_model
    from featsteer.sae import load_sae_source

    common = ["--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "48",
              "--val-harmful", "organism-corpus:harmful:12", "--val-harmless", "organism-corpus:harmless:12", "--n-select", "12",
              "--eval-n", "6", "--max-new-tokens", "8", "--method", "sae", "--sae", "organism"]
    out = tmp_path / "picked"
    code, stdout, err = _run(capsys, "abliterate", *common, "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "featsteer.json").read_text())
    assert record["method"] == "sae" and record["sae_source"] == "organism"
    rows = {int(label.split("=")[1]): (r["unanswered_harmful"], r["kl_harmless"]) for label, r in record["sae_validation"].items()}
    assert sorted(rows) == [1, 2, 4, 8, 16] and gentlest_within(rows, 0.05) == record["sae_top_k"] == len(record["sae_features"])
    assert f"features {record['sae_features']} at {record['sae_hook']} (picked on validation)" in stdout

    base, edited = load_model("organism"), load_model(str(out))
    sae = load_sae_source("organism", base)[record["sae_hook"]]
    basis = decoder_directions(sae, record["sae_features"], subspace=len(record["sae_features"]) > 1).bases[0].double()
    embed = lambda m: m.model.get_input_embeddings().weight.detach().double()  # noqa: E731
    assert float((embed(base) @ basis.T).abs().max()) > 1e-2  # the rows were there ...
    assert float((embed(edited) @ basis.T).abs().max()) < 1e-4  # ... and are projected out of the exported model
    assert torch.equal(embed(base), embed(load_model("organism")))  # the shipped model is untouched

    code, _, err = _run(capsys, "abliterate", *common, "--sae-top-k", "1", "--out", str(tmp_path / "fixed"))
    record = json.loads((tmp_path / "fixed" / "featsteer.json").read_text())
    assert code == 0 and len(record["sae_features"]) == 1 and "sae_validation" not in record
    for extra, message in ((["--reverse"], "--method sae projects decoder rows out"), (["--sae-top-k", "0"], "top_k must be at least 1")):
        code, _, err = _run(capsys, "abliterate", *common, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    code, _, err = _run(capsys, "abliterate", *common[:-2], "--out", str(tmp_path / "bad"))
    assert code == 2 and "--method sae needs SAEs" in err


def test_abliterate_sae_prints_what_a_k_ruled_out_by_the_coherence_bound_measured(capsys, tmp_path, monkeypatch):
    """A k the coherence bound rules out enters the pick as unanswered 1.0; the printed row gave that 1.0 as if every
    validation harmful prompt had gone unanswered (the README's k=16 read 1.000 where it measured 0.125), and
    featsteer.json's sae_validation still records it so: it now records what the k measured, marked ruled out."""
    import re

    from featsteer.compare import CompareContext

    # an unedited floor far below any answers' NLL: the bound rules out every k
    monkeypatch.setattr(CompareContext, "validation_answers_nll", lambda self: -100.0)
    out = tmp_path / "bounded"
    code, stdout, err = _run(capsys, "abliterate", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless",
                             "builtin:harmless:train", "--n", "48", "--val-harmful", "organism-corpus:harmful:12", "--val-harmless",
                             "organism-corpus:harmless:12", "--n-select", "12", "--eval-n", "6", "--max-new-tokens", "8",
                             "--method", "sae", "--sae", "organism", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "featsteer.json").read_text())
    measured = record["incoherent_measured"]
    assert sorted(measured) == sorted(record["sae_validation"]) and min(r["unanswered_harmful"] for r in measured.values()) < 1.0
    assert record["sae_validation"] == {k: {**r, "ruled_out": "coherence bound"} for k, r in measured.items()}  # as measured, marked
    printed = dict(re.findall(r"^\s+(k=\d+): validation unanswered ([0-9.]+), .*; ruled out: .* above the coherence bound", stdout, re.M))
    assert printed == {k: f"{r['unanswered_harmful']:.3f}" for k, r in measured.items()}, stdout


def test_sae_validation_lines_print_the_kl_the_pick_weighed_and_name_it():
    """The lines read `kl_harmless`, which a pick with `pick_kl="response"` does not record (`compare._pick_kl_key`):
    they raised KeyError; now each names the KL it prints."""
    from featsteer.cli import _sae_validation_lines

    response = {"sae_validation": {"k=1": {"unanswered_harmful": 0.25, "kl_response_harmless": 0.0123}}}
    assert _sae_validation_lines(response) == ["     k=1: validation unanswered 0.250, response KL 0.0123"]
    first = {"sae_validation": {"k=16": {"unanswered_harmful": 0.125, "kl_harmless": 3.5}}, "incoherent": ["k=16"],
             "validation_base_nll": {"unedited": 0.8, "k=16": 3.2}, "max_nll_rise": 0.5}
    assert _sae_validation_lines(first) == ["    k=16: validation unanswered 0.125, first-token KL 3.5000; ruled out: its validation "
                                            "harmless answers cost 3.20 nats per token, above the coherence bound (0.80 for the "
                                            "model's own + 0.5)"]


def test_sae_validation_lines_print_an_induce_clamps_rows():
    """An induce clamp's validation rows (`compare._pick_induce`) hold `refusal_harmless` and `clamp_norm`, no
    `unanswered_harmful`: the lines raised KeyError on them; now they print what was measured."""
    from featsteer.cli import _sae_validation_lines

    induce = {"sae_validation": {"k=1, x2": {"refusal_harmless": 0.5, "clamp_norm": 12.345},
                                 "k=2, x0.5": {"refusal_harmless": 0.0625, "clamp_norm": 3.0}}}
    assert _sae_validation_lines(induce) == ["  k=1, x2: validation harmless refused 0.500, clamp write norm 12.35",
                                             "  k=2, x0.5: validation harmless refused 0.062, clamp write norm 3.00"]


def test_abliterate_sae_search_tunes_the_strengths_of_the_picked_rows_and_exports(capsys, tmp_path):
    import torch

    from featsteer.features import decoder_directions
    from featsteer.models import load_model
    from featsteer.sae import load_sae_source
    from featsteer.search import SearchResult

    out, search_dir = tmp_path / "searched", tmp_path / "study"
    code, stdout, err = _run(capsys, "abliterate", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless",
                             "builtin:harmless:train", "--n", "48", "--val-harmful", "organism-corpus:harmful:8", "--val-harmless",
                             "organism-corpus:harmless:8", "--eval-n", "4", "--max-new-tokens", "6", "--method", "sae", "--sae", "organism",
                             "--sae-top-k", "1", "--search", "4", "--search-dir", str(search_dir), "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "featsteer.json").read_text())
    found = SearchResult.load(search_dir)
    assert found.fixed and found.setup["method"] == "sae" and len(found.trials) == 4
    assert found.setup["provenance"]["sae_features"] == record["sae_features"] and record["search"]["best"]["number"] == found.best["number"]
    assert f"search: 4 trials, {len(found.pareto)} on the Pareto front" in stdout
    # the searched basis is the picked feature's decoder row, and the exported model is that search's edit
    base = load_model("organism")
    sae = load_sae_source("organism", base)[record["sae_hook"]]
    row = decoder_directions(sae, record["sae_features"]).bases[0]
    torch.testing.assert_close(found.basis, row.reshape(1, -1).float(), atol=1e-6, rtol=0)
    with found.apply(base):
        expected = {k: v.clone() for k, v in base.model.state_dict().items()}
    exported = load_model(str(out)).model.state_dict()
    assert all(torch.allclose(exported[k].float(), v.float(), atol=1e-6) for k, v in expected.items())


def test_abliterate_a_saved_direction_with_and_without_a_search(capsys, tmp_path):
    import torch

    from featsteer.directions import DirectionSet
    from featsteer.models import load_model
    from featsteer.search import SearchResult

    code, _, err = _run(capsys, "directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless",
                        "builtin:harmless:train", "--n", "32", "--n-select", "6", "--out", str(tmp_path / "dirs"))
    assert code == 0, err
    chosen = DirectionSet.load(tmp_path / "dirs" / "chosen")
    common = ["--model", "organism", "--harmful", "builtin:harmful:val", "--harmless", "builtin:harmless:val", "--n", "16",
              "--eval-n", "4", "--max-new-tokens", "6"]
    code, stdout, err = _run(capsys, "abliterate", *common, "--directions", str(tmp_path / "dirs" / "chosen"), "--out", str(tmp_path / "plain"))
    assert code == 0, err
    record = json.loads((tmp_path / "plain" / "featsteer.json").read_text())
    assert record["method"] == "saved" and record["direction_hook"] == chosen.hook_names[0] and record["direction_method"] == "dim"
    assert f"direction: dim from {tmp_path / 'dirs' / 'chosen'} at {chosen.hook_names[0]}" in stdout
    direction = chosen.bases[0].double()
    embed = lambda m: m.model.get_input_embeddings().weight.detach().double()  # noqa: E731
    assert float((embed(load_model("organism")) @ direction.T).abs().max()) > 1e-2
    assert float((embed(load_model(str(tmp_path / "plain"))) @ direction.T).abs().max()) < 1e-4

    # one of the candidates, picked by hook and position, with a search over its kernels
    candidates = DirectionSet.load(tmp_path / "dirs" / "candidates")
    hook, position = candidates.hook_names[-1], candidates.positions[-1]
    code, stdout, err = _run(capsys, "abliterate", *common, "--directions", str(tmp_path / "dirs" / "candidates"), "--direction-hook", hook,
                             "--direction-position", str(position), "--search", "3", "--out", str(tmp_path / "searched"))
    assert code == 0, err
    found = SearchResult.load(tmp_path / "searched-search")
    assert found.fixed and found.setup["method"] == "saved" and found.setup["provenance"]["direction_hook"] == hook
    torch.testing.assert_close(found.basis, candidates.bases[-1].float(), atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "searched" / "featsteer.json").read_text())["search"]["best"]["number"] == found.best["number"]

    # export trial 0 of the finished study instead (the plain edit: strength 1 on the embedding); nothing new runs
    resumed = [*common, "--directions", str(tmp_path / "dirs" / "candidates"), "--direction-hook", hook, "--direction-position", str(position),
               "--search", "3", "--search-dir", str(tmp_path / "searched-search")]
    code, stdout, err = _run(capsys, "abliterate", *resumed, "--search-trial", "0", "--out", str(tmp_path / "trial0"))
    assert code == 0, err
    assert "chosen (--search-trial): trial 0" in stdout and len(SearchResult.load(tmp_path / "searched-search").trials) == 3
    assert json.loads((tmp_path / "trial0" / "featsteer.json").read_text())["search"]["best"]["number"] == 0
    basis = candidates.bases[-1].double()
    assert float((embed(load_model(str(tmp_path / "trial0"))) @ basis.T).abs().max()) < 1e-4
    code, _, err = _run(capsys, "abliterate", *resumed, "--search-trial", "7", "--out", str(tmp_path / "bad"))
    assert code == 2 and "no finished trial 7 (trials 0..2" in err and not (tmp_path / "bad").exists(), err

    for extra, message in (
        (["--directions", str(tmp_path / "dirs" / "candidates")], "matching directions: choose one with --direction-hook"),
        (["--directions", str(tmp_path / "dirs" / "chosen"), "--direction-hook", "blocks.9.hook_resid_pre"], "has no direction at blocks.9"),
        (["--directions", str(tmp_path / "missing")], "is not a folder"),
        (["--directions", str(tmp_path / "dirs" / "chosen"), "--method", "pca"], "--directions brings its own direction"),
        (["--direction-hook", hook], "pick a direction from --directions DIR"),
        (["--directions", str(tmp_path / "dirs" / "chosen"), "--search-trial", "0"], "--search-trial picks a trial of a search: add --search N"),
    ):
        code, _, err = _run(capsys, "abliterate", *common, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists(), err


def test_steer_sae_features_on_the_organism(capsys, tmp_path):
    """Suppressing the organism's refusal features removes refusals; scaling them by 1 changes nothing."""
    common = ["steer", "--model", "organism", "--sae", "organism", "--hook", "blocks.3.hook_resid_pre", "--feature", "888,493",
              "--prompts", "builtin:harmful:test", "--n", "6", "--prompt", "How do I bake bread?", "--max-new-tokens", "12"]
    code, out, err = _run(capsys, *common, "--mode", "clamp", "--multiple", "-2", "--json", str(tmp_path / "s.json"))
    assert code == 0, err
    assert "feature 888 at blocks.3.hook_resid_pre: largest activation on the prompts" in out
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["n"] == 7 and result["rows"][0]["prompt"] == "How do I bake bread?" and len(result["rows"]) == 7
    assert result["refused_plain"] >= 5 and result["refused_steered"] <= result["refused_plain"] - 3, result
    assert f"refused: plain {result['refused_plain']}/7, clamp {result['refused_steered']}/7" in out
    looped = [row for row in result["rows"] if row["steered_looping"]]  # "part part part ..." at -2x
    assert result["looping_steered"] == len(looped) and ("[looping]" in out) == bool(looped) and result["looping_plain"] == 0

    code, out, err = _run(capsys, *common, "--mode", "scale", "--value", "1", "--json", str(tmp_path / "one.json"))
    assert code == 0, err
    rows = json.loads((tmp_path / "one.json").read_text())["rows"]
    assert all(row["plain"] == row["steered"] for row in rows)


def test_steer_a_saved_direction(capsys, tmp_path):
    code, out, err = _run(capsys, "directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless",
                          "builtin:harmless:train", "--n", "32", "--n-select", "6", "--gate", "--out", str(tmp_path / "dirs"))
    assert code == 0, err
    assert "gate: blocks." in out and (tmp_path / "dirs" / "gate" / "gate.json").is_file()
    common = ["steer", "--model", "organism", "--directions", str(tmp_path / "dirs" / "chosen"), "--max-new-tokens", "12"]
    # the saved gate confines the ablation to the prompts it fires on; one that cannot fire leaves every answer as it was
    code, out, err = _run(capsys, *common, "--mode", "ablate", "--gate", str(tmp_path / "dirs" / "gate"), "--prompts", "builtin:harmful:test",
                          "--n", "6", "--json", str(tmp_path / "gated.json"))
    gated = json.loads((tmp_path / "gated.json").read_text())
    assert code == 0 and "only where the gate at blocks." in out and gated["refused_plain"] >= 5 and gated["refused_steered"] <= 1, err
    meta = json.loads((tmp_path / "dirs" / "gate" / "gate.json").read_text())
    (tmp_path / "dirs" / "gate" / "gate.json").write_text(json.dumps({**meta, "threshold": 2.0}))  # above any cosine
    code, out, err = _run(capsys, *common, "--mode", "ablate", "--gate", str(tmp_path / "dirs" / "gate"), "--prompts", "builtin:harmful:test",
                          "--n", "6", "--json", str(tmp_path / "shut.json"))
    shut = json.loads((tmp_path / "shut.json").read_text())
    assert code == 0 and all(row["plain"] == row["steered"] for row in shut["rows"]), err
    code, _, err = _run(capsys, *common, "--mode", "ablate", "--gate", str(tmp_path / "dirs" / "chosen"), "--prompt", "hi")
    assert code == 2 and "holds no gate" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = _run(capsys, *common, "--mode", "ablate", "--prompts", "builtin:harmful:test", "--n", "6", "--json", str(tmp_path / "a.json"))
    assert code == 0, err
    ablated = json.loads((tmp_path / "a.json").read_text())
    assert ablated["refused_plain"] >= 5 and ablated["refused_steered"] <= 1 and "ablate the direction from every residual write" in out
    # read-side placements: the organism's refusal is read by the unembedding, not by the blocks (directions.readers)
    steered = {}
    for where in ("blocks", "unembedding", "readers"):
        code, out, err = _run(capsys, *common, "--mode", "ablate", "--ablate-at", where, "--prompts", "builtin:harmful:test", "--n", "6",
                              "--json", str(tmp_path / f"{where}.json"))
        assert code == 0 and "the stream untouched" in out, err
        steered[where] = json.loads((tmp_path / f"{where}.json").read_text())["refused_steered"]
    assert steered["blocks"] >= 4 and steered["readers"] <= 1, steered
    code, out, err = _run(capsys, *common, "--mode", "add", "--scale", "1", "--positions", "prompt", "--prompts", "builtin:harmless:test",
                          "--n", "2", "--json", str(tmp_path / "p.json"))
    assert code == 0 and "(prompt tokens only)" in out, err
    added = [row["steered"] for row in json.loads((tmp_path / "p.json").read_text())["rows"]]
    for threshold, expected in (("-1", added), ("1", None)):  # a gate that always fires is the addition; one that never fires, nothing
        code, out, err = _run(capsys, *common, "--mode", "conditional", "--pool", "last", "--threshold", threshold, "--scale", "1",
                              "--positions", "prompt", "--prompts", "builtin:harmless:test", "--n", "2", "--json", str(tmp_path / "g.json"))
        assert code == 0 and f"last-token activation exceeds {threshold}" in out, err
        rows = json.loads((tmp_path / "g.json").read_text())["rows"]
        assert [row["steered"] for row in rows] == (expected or [row["plain"] for row in rows])
    assert added != [row["plain"] for row in rows]
    # a gate at a later layer than the addition decides in a pre-pass: always open, it is the addition itself
    (tmp_path / "dirs" / "gate" / "gate.json").write_text(json.dumps({**meta, "hook": "blocks.3.hook_resid_pre", "threshold": -2.0}))
    code, out, err = _run(capsys, *common, "--mode", "add", "--scale", "1", "--positions", "prompt", "--gate", str(tmp_path / "dirs" / "gate"),
                          "--prompts", "builtin:harmless:test", "--n", "2", "--json", str(tmp_path / "late.json"))
    assert code == 0 and "decided in a pre-pass" in out, err
    assert [row["steered"] for row in json.loads((tmp_path / "late.json").read_text())["rows"]] == added
    code, out, err = _run(capsys, *common, "--mode", "set", "--prompts", "builtin:harmless:test", "--n", "6", "--json", str(tmp_path / "i.json"))
    assert code == 0, err
    induced = json.loads((tmp_path / "i.json").read_text())
    assert induced["refused_plain"] <= 1 and induced["refused_steered"] >= 5
    # the chosen set records each layer's class means and the rotation axis, which ace and angular read
    code, out, err = _run(capsys, *common, "--mode", "ace", "--prompts", "builtin:harmful:test", "--n", "6", "--json", str(tmp_path / "c.json"))
    assert code == 0, err
    ace = json.loads((tmp_path / "c.json").read_text())
    assert ace["refused_plain"] >= 5 and ace["refused_steered"] <= 1 and "alpha=0 on the harmless-to-harmful mean line" in out
    code, out, err = _run(capsys, *common, "--mode", "angular", "--angle", "135", "--prompts", "builtin:harmful:test", "--n", "6",
                          "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    turned = json.loads((tmp_path / "r.json").read_text())
    assert turned["refused_plain"] >= 5 and turned["refused_steered"] <= 1 and "135 degrees" in out
    code, out, err = _run(capsys, *common, "--mode", "angular", "--angle", "135", "--angle-at", "norms", "--prompts", "builtin:harmful:test",
                          "--n", "6", "--json", str(tmp_path / "n.json"))
    assert code == 0, err
    at_norms = json.loads((tmp_path / "n.json").read_text())
    assert at_norms["refused_steered"] <= 1 and "normalised attention and MLP inputs" in out
    assert [r["steered"] for r in at_norms["rows"]] != [r["steered"] for r in turned["rows"]]  # another placement, other outputs
    # a direction set without them (one saved by hand, or by an older featsteer) is a one-line error
    from featsteer.directions import DirectionSet

    bare = DirectionSet.load(tmp_path / "dirs" / "chosen")
    DirectionSet(bare.bases, bare.hook_names, bare.positions, bare.method, bare.scores, {}).save(tmp_path / "bare")
    for mode, extra in (("ace", []), ("angular", ["--angle", "90"])):
        code, _, err = _run(capsys, "steer", "--model", "organism", "--directions", str(tmp_path / "bare"), "--mode", mode, *extra, "--prompt", "hi")
        assert code == 2 and "re-run `featsteer directions`" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "ablate", "--prompt", "hi"], "steer needs one source"),
        (["--sae", "organism", "--directions", "/x", "--mode", "ablate", "--prompt", "hi"], "steer needs one source"),
        (["--sae", "organism", "--feature", "1", "--mode", "set", "--prompt", "hi"], "--mode set steers a direction"),
        (["--sae", "organism", "--mode", "ablate", "--prompt", "hi"], "--feature ID"),
        (["--sae", "organism", "--feature", "1", "--mode", "clamp", "--prompt", "hi"], "exactly one of --value V or --multiple M"),
        (["--sae", "organism", "--feature", "x", "--mode", "ablate", "--prompt", "hi", "--hook", "blocks.3.hook_resid_pre"], "integer feature ids"),
        (["--sae", "organism", "--feature", "1", "--mode", "ablate", "--prompt", "hi"], "choose one with --hook"),
        (["--sae", "organism", "--feature", "1", "--mode", "ablate", "--prompt", "hi", "--hook", "blocks.9.hook_resid_pre"], "has no SAE at blocks.9"),
        (["--sae", "organism", "--feature", "99999", "--mode", "ablate", "--prompt", "hi", "--hook", "blocks.3.hook_resid_pre"], "out of range"),
        (["--directions", "/x", "--feature", "1", "--mode", "ablate", "--prompt", "hi"], "apply to --sae features"),
        (["--directions", "/x", "--mode", "clamp", "--prompt", "hi"], "edits SAE features"),
        (["--directions", "/x", "--mode", "ablate"], "steer has no prompts"),
        (["--directions", "/x", "--mode", "ablate", "--prompt", ""], "--prompt is empty"),
        (["--directions", "/x", "--mode", "ablate", "--prompt", "hi", "--prompt", "  "], "--prompt is empty"),
        (["--directions", "/x", "--mode", "angular", "--prompt", "hi"], "--mode angular needs --angle"),
        (["--directions", "/x", "--mode", "ablate", "--angle", "90", "--prompt", "hi"], "apply to --mode angular"),
        (["--directions", "/x", "--mode", "add", "--angle-at", "norms", "--prompt", "hi"], "apply to --mode angular"),
        (["--directions", "/x", "--mode", "ace", "--hook", "blocks.1.hook_resid_pre", "--prompt", "hi"], "so it takes no --hook"),
        (["--directions", "/x", "--mode", "angular", "--angle", "90", "--hook", "blocks.1.hook_resid_pre", "--prompt", "hi"], "takes no --hook"),
        (["--directions", "/x", "--mode", "set", "--alpha", "0.5", "--prompt", "hi"], "--alpha applies to --mode ace"),
        (["--directions", "/x", "--mode", "add", "--pool", "last", "--prompt", "hi"], "--pool applies to --mode conditional"),
        (["--directions", "/x", "--mode", "set", "--gate", "/g", "--prompt", "hi"], "--gate applies to --directions with --mode ablate"),
        (["--directions", "/x", "--mode", "ablate", "--ablate-at", "residual", "--gate", "/g", "--prompt", "hi"], "--gate applies"),
        (["--directions", "/x", "--mode", "ablate", "--positions", "prompt", "--prompt", "hi"], "--positions applies to --sae features and to --mode add"),
        (["--directions", "/x", "--mode", "conditional", "--threshold", "nan", "--prompt", "hi"], "--threshold must be a finite number"),
        (["--directions", "/x", "--mode", "add", "--scale", "inf", "--prompt", "hi"], "--scale must be a finite number"),
        (["--directions", "/x", "--mode", "angular", "--angle", "nan", "--prompt", "hi"], "--angle must be a finite number"),
    ],
)
def test_steer_bad_options_are_one_line_errors(capsys, extra, message):
    code, _, err = _run(capsys, "steer", "--model", "organism", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_compare_refuses_a_folder_with_an_earlier_run(capsys, tmp_path, monkeypatch):
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "responses.labels.json").write_text("{}")
    from featsteer import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model loaded before the folder was checked"))
    code, _, err = _run(capsys, "compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless",
                        "--methods", "none", "--out", str(tmp_path / "cmp"))
    assert code == 2 and "is not empty" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in (tmp_path / "cmp").iterdir()] == ["responses.labels.json"]


def test_compare_interrupted_while_writing_leaves_no_output_folder(capsys, tmp_path, monkeypatch):
    """The files were renamed into --out one by one: stopped between two, the folder held pareto.png and results.json
    without report.html or responses.json, a run that looked finished."""
    import os

    import featsteer.files as files

    rename = os.replace

    def interrupted(source, target):
        if os.path.basename(target) == "report.html":
            raise KeyboardInterrupt
        rename(source, target)

    monkeypatch.setattr(files.os, "replace", interrupted)
    code, _, err = _run(capsys, "compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless",
                        "--n", "12", "--n-select", "3", "--methods", "none", "--max-new-tokens", "2", "--out", str(tmp_path / "cmp"))
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


def test_compare_fixes_the_angle_and_alpha_from_the_command_line(capsys, tmp_path):
    code, out, err = _run(capsys, "compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless",
                          "--n", "16", "--n-select", "3", "--methods", "dim_ace_hook,dim_angular_hook", "--ace-alpha", "-0.1",
                          "--angle", "160", "--angle-everywhere", "--max-new-tokens", "2", "--out", str(tmp_path / "out"))
    assert code == 0, err
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    ace, angular = (r["details"] for r in saved["results"])
    assert ace["ace_alpha"] == -0.1 and "validation" not in ace and angular["angle"] == 160.0 and angular["adaptive"] is False
    assert "dim_ace_hook (alpha=-0.1)" in out and "dim_angular_hook (angle=160)" in out
    assert "paired with the baseline" not in out  # neither dim_abliteration nor none ran
    code, out, err = _run(capsys, "compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless",
                          "--n", "16", "--n-select", "3", "--methods", "none,dim_ace_hook", "--ace-alpha", "-0.1", "--baseline",
                          "dim_ace_hook", "--max-new-tokens", "2", "--out", str(tmp_path / "paired"))
    assert code == 0, err
    assert "paired with the baseline" in out and "| refused harmful vs dim_ace_hook |" in out and "\n| none | " in out
    code, _, err = _run(capsys, "compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless",
                        "--methods", "none", "--baseline", "dim_abliteration", "--out", str(tmp_path / "nobase"))
    assert code == 2 and "baseline 'dim_abliteration' is not among the methods run" in err and len(err.strip().splitlines()) == 1
    code, out, err = _run(capsys, "compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless",
                          "--n", "16", "--n-select", "3", "--methods", "dim_angular_norms_hook", "--pick-tolerance", "0",
                          "--pick-kl", "response", "--max-new-tokens", "2", "--out", str(tmp_path / "strict"))
    assert code == 0, err
    saved = json.loads((tmp_path / "strict" / "results.json").read_text())
    rows = {k: (v["unanswered_harmful"], v["kl_response_harmless"]) for k, v in saved["results"][0]["details"]["validation"].items()}
    assert saved["setup"]["steering"]["tolerance"] == 0.0 and saved["setup"]["pick_kl"] == "response"
    assert rows[f"angle={saved['results'][0]['details']['angle']:g}"][0] == min(r for r, _ in rows.values())  # level with the best
    code, _, err = _run(capsys, "compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless",
                        "--pick-tolerance", "1.5", "--out", str(tmp_path / "bad"))
    assert code == 2 and "tolerance" in err and len(err.strip().splitlines()) == 1


def test_direction_notes_of_the_demo_read_the_compare_setup():
    from featsteer.cli import _direction_notes

    chosen = {"hook": "blocks.2.hook_resid_pre", "selection_stability": {"chosen_share": 0.962, "n_resamples": 1000, "n_harmful": 32, "n_harmless": 32},
              "sample_size": {"n_harmful": 357, "n_harmless": 368, "cosine": 0.99991, "needed": {"0.9": 0.4, "0.95": 0.9, "0.99": 3.2}}}
    assert _direction_notes(chosen) == [
        "selection: chosen in 96% of 1000 bootstrap resamples of the 32 + 32 validation prompts",
        "sample size: from 357 + 368 training prompts, expected cosine 0.9999 with the direction of unlimited such prompts; 0.99 needs 4 prompts per class"]
    chosen["sample_size"]["needed"]["0.99"] = None  # no signal: no count to give
    assert _direction_notes(chosen)[1].endswith("unlimited such prompts") and _direction_notes({"hook": "h"}) == []


def test_abliterate_induce_bias_exports_the_addition_and_its_errors(capsys, tmp_path):
    """`--induce-bias --directions DIR`: the exported model equals the runtime addition of --scale times the saved mean
    difference written into the value biases (tiny Qwen2), and option clashes or a set without the mean difference's
    length exit 2 with one line and no output folder."""
    from featsteer.directions import DirectionSet
    from featsteer.interventions import AddDirection, steer
    from featsteer.models import load_model

    r = torch.randn(64, generator=torch.Generator().manual_seed(2))
    r = r / r.norm()
    DirectionSet(r[None, None], ("blocks.2.hook_resid_pre",), (-1,), "dim", {"mean_diff_norm": [3.0]}).save(tmp_path / "dirs")
    DirectionSet(r[None, None], ("blocks.2.hook_resid_pre",), (-1,), "dim", {}).save(tmp_path / "bare")
    common = ["--model", "tiny:qwen2", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "8",
              "--eval-n", "2", "--max-new-tokens", "2"]
    code, stdout, err = _run(capsys, "abliterate", *common, "--directions", str(tmp_path / "dirs"), "--induce-bias", "--scale", "2",
                             "--out", str(tmp_path / "added"))
    assert code == 0 and "before -> after (bias_addition)" in stdout, err
    assert ("bias addition: 2 x the mean difference (length 3) at blocks.2.hook_resid_pre through 2 biases, blocks.0.attn.b_V to "
            "blocks.1.attn.b_V (decay 2)") in stdout
    meta = json.loads((tmp_path / "added" / "featsteer.json").read_text())
    assert meta["edit"]["mode"] == "bias_addition" and meta["scale"] == 2.0 and sorted(meta["bias_writers"]) == ["blocks.0.attn.b_V", "blocks.1.attn.b_V"]
    base, edited = load_model("tiny:qwen2"), load_model(str(tmp_path / "added"))
    prompts = ["hello there", "x"]
    assert (edited.logits(prompts) - base.logits(prompts)).abs().max() > 1e-2
    writes = [(f"blocks.{w.layer}.hook_attn_out", w.reach() @ (e.read().double() - w.read().double()))
              for w, e in zip(base.bias_writers(), edited.bias_writers(), strict=True)]
    torch.testing.assert_close(sum(v for _, v in writes), 6.0 * r.double(), atol=1e-4, rtol=0)
    with steer(base, *[AddDirection(v.float(), 1.0, where=hook) for hook, v in writes]):
        torch.testing.assert_close(base.logits(prompts), edited.logits(prompts), atol=1e-4, rtol=0)
    for extra, message in ((["--reverse"], "drop --reverse"), (["--search", "2"], "drop --search"), (["--bias-decay", "0.5"], "--bias-decay"),
                           (["--directions", str(tmp_path / "bare")], "stores no mean_diff_norm")):
        args = extra if "--directions" in extra else ["--directions", str(tmp_path / "dirs"), *extra]
        code, _, err = _run(capsys, "abliterate", *common, *args, "--induce-bias", "--out", str(tmp_path / "bad"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists(), err
    code, _, err = _run(capsys, "abliterate", "--model", "tiny:mistral", *common[2:], "--directions", str(tmp_path / "dirs"), "--induce-bias",
                        "--out", str(tmp_path / "bad"))
    assert code == 2 and "no bias that adds a constant" in err and not (tmp_path / "bad").exists(), err


def test_abliterate_induce_bias_fits_the_direction_and_writes_the_mlp_bias(capsys, tmp_path):
    """The fitting path of --induce-bias on a model with MLP output biases: the whole addition in the bias of the block
    before the chosen hook, recorded as equal to the runtime addition."""
    code, stdout, err = _run(capsys, "abliterate", "--model", "tiny:starcoder2", "--harmful", "builtin:harmful:train", "--harmless",
                             "builtin:harmless:train", "--n", "12", "--n-select", "3", "--eval-n", "3", "--max-new-tokens", "2",
                             "--induce-bias", "--scale", "3", "--out", str(tmp_path / "added"))
    assert code == 0 and "before -> after (bias_addition)" in stdout, err
    meta = json.loads((tmp_path / "added" / "featsteer.json").read_text())
    layer = int(meta["direction_hook"].split(".")[1])
    assert f"through the bias of blocks.{layer - 1}.hook_mlp_out; the same as the runtime addition" in stdout
    assert meta["edit"]["exact_at_hook"] and list(meta["bias_writers"]) == [f"blocks.{layer - 1}.hook_mlp_out"] and meta["scale"] == 3.0
    assert meta["bias_writers"][f"blocks.{layer - 1}.hook_mlp_out"] == pytest.approx(3 * meta["length"], rel=1e-4)


def test_abliterate_induce_bias_scale_auto_picks_on_validation_prompts_the_check_does_not_read(capsys, tmp_path, monkeypatch):
    """`--scale auto`: the scale `pick_induce_scale` picks on the validation harmless prompts after the check's first
    --eval-n (at most --n-select of them), printed and recorded; none left is a one-line error before anything runs."""
    import featsteer.compare as compare_module
    from featsteer.compare import weakest_within
    from featsteer.datasets import builtin_prompts
    from featsteer.pipeline import split

    seen = []
    real = compare_module.pick_induce_scale
    monkeypatch.setattr(compare_module, "pick_induce_scale", lambda model, add, prompts, **k: seen.append(list(prompts)) or real(model, add, prompts, **k))
    common = ["--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "48",
              "--n-select", "6", "--eval-n", "4", "--max-new-tokens", "4", "--induce-bias"]
    code, stdout, err = _run(capsys, "abliterate", *common, "--scale", "auto", "--out", str(tmp_path / "added"))
    assert code == 0, err
    val_harmless = list(split(builtin_prompts("harmless", "train").head(48), 0.25)[1])
    assert seen == [val_harmless[4:10]]  # after the 4 the check reads, 6 of them
    meta = json.loads((tmp_path / "added" / "featsteer.json").read_text())
    rates = {float(k): v for k, v in meta["scale_pick"]["coherent_refusal"].items()}
    assert sorted(rates) == [0.25, 0.5, 0.75, 1.0, 1.5, 2.0] and meta["scale_pick"]["prompts"] == 6
    assert meta["scale"] == weakest_within(rates, 0.05)
    assert "scale picked on 6 validation harmless prompts the check does not read" in stdout
    assert f"bias addition: {meta['scale']:g} x the mean difference" in stdout
    code, _, err = _run(capsys, "abliterate", *common, "--eval-n", "12", "--scale", "auto", "--out", str(tmp_path / "bad"))
    assert code == 2 and "are all among the --eval-n 12" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists(), err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error: usage and one line
        main(["abliterate", *common, "--scale", "big", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and "argument --scale: 'big' is neither a number nor auto" in capsys.readouterr().err


def test_abliterate_induce_template_writes_the_template_tokens_row_and_its_errors(capsys, tmp_path):
    """`--induce-template`: the mean difference added to the embedding row of the organism's <|assistant|>; the export
    refuses the held-out harmless prompts it answered; clashes with the bias options exit 2 with one line."""
    common = ["--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "96",
              "--n-select", "8", "--eval-n", "16", "--max-new-tokens", "12", "--induce-template"]
    code, stdout, err = _run(capsys, "abliterate", *common, "--scale", "1", "--out", str(tmp_path / "added"))
    assert code == 0, err
    assert "token addition: 1 x the mean difference" in stdout and "added to the embedding row of <|assistant|>" in stdout
    meta = json.loads((tmp_path / "added" / "featsteer.json").read_text())
    assert meta["edit"]["mode"] == "token_addition" and list(meta["edit"]["tokens"].values()) == ["<|assistant|>"] and meta["scale"] == 1.0
    harmless = next(line for line in stdout.splitlines() if line.strip().startswith("harmless"))
    assert harmless.split("->")[1].strip().startswith(("1.000", "0.9")), harmless  # (before: the organism answers nearly all of them)
    assert json.loads((tmp_path / "added" / "config.json").read_text())["tie_word_embeddings"] is False
    for extra, message in ((["--induce-bias"], "drop --induce-template"), (["--bias-decay", "3"], "--bias-decay spreads"),
                           (["--reverse"], "drop --reverse")):
        code, _, err = _run(capsys, "abliterate", *common, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists(), err


def test_unwritable_outputs_fail_before_any_work(capsys, tmp_path, monkeypatch):
    import featsteer.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: pytest.fail("the model was loaded before the output path was checked"))
    (tmp_path / "afile").write_text("x")
    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless"]
    for argv, message in (
        (["eval", *common, "--json", str(tmp_path)], "is a folder: give a file path"),
        (["eval", *common, "--json", str(tmp_path / "afile" / "x.json")], "is a file, so nothing can be written below it"),
        (["rank-features", *common, "--sae", "organism", "--out", str(tmp_path / "afile")], "is an existing file: give a folder path"),
        (["probe", *common, "--out", str(tmp_path / "afile")], "is an existing file"),
        (["abliterate", *common, "--out", str(tmp_path / "new"), "--search", "2", "--search-dir", str(tmp_path / "afile")],
         "--search-dir"),
    ):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_steer_feature_options_that_would_be_ignored_or_misread_are_errors(capsys):
    common = ["steer", "--model", "organism", "--sae", "organism", "--hook", "blocks.3.hook_resid_pre", "--prompt", "hi"]
    for extra, message in (
        (["--feature", "888", "--mode", "ablate", "--value", "3"], "--mode ablate sets the features to zero and takes no --value"),
        (["--feature", "888", "--mode", "clamp", "--value", "nan"], "--value must be a finite number"),
        (["--feature", "888", "--mode", "add", "--multiple", "inf"], "--multiple must be a finite number"),
        (["--feature", "888,-5", "--mode", "ablate"], "feature id -5 is out of range"),
        (["--feature", "888", "--mode", "clamp", "--multiple", "2"], "feature 888 never fires on these prompts, so --multiple 2"),
    ):
        code, _, err = _run(capsys, *common, *extra)
        assert code == 2 and message in err, (extra, err)


def test_capture_hook_specs_that_name_nothing_are_errors(capsys, tmp_path):
    base = ["capture", "--model", "tiny:qwen2_moe", "--prompts", "builtin:harmful", "--n", "2", "--out", str(tmp_path / "c")]
    for hooks, message in (("resid_pre:x", "give layer numbers separated by commas"),
                           ("attn_z:1,hook_embed", "give layer numbers separated by commas"),
                           ("routing:0", "has no routing hook at those layers"),
                           ("resid_pre:", "--hooks resid_pre: names no layer after the colon")):
        code, _, err = _run(capsys, *base, "--hooks", hooks)
        assert code == 2 and message in err and "::" not in err, (hooks, err)
    code, out, _ = _run(capsys, *base, "--hooks", "resid_post:1,1")
    assert code == 0 and "x 1 hooks" in out  # the layer named twice is captured once, and the line says so
    lfm2 = ["capture", "--model", "tiny:lfm2", "--prompts", "builtin:harmful", "--n", "2", "--out", str(tmp_path / "l")]
    code, _, err = _run(capsys, *lfm2, "--hooks", "attn_z:1")  # a convolution layer: it listed blocks.1.attn.hook_z
    assert code == 2 and "has no attn_z hook at those layers (heads exist only at its attention layers, [0, 2])" in err, err


def test_steer_and_abliterate_options_that_would_be_ignored_are_errors(capsys, tmp_path):
    code, _, err = _run(capsys, "directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
                        "--n", "24", "--n-select", "4", "--geometry", "off", "--out", str(tmp_path / "d"))
    assert code == 0, err
    code, _, err = _run(capsys, "directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
                        "--out", str(tmp_path / "d"))
    assert code == 2 and "is not empty" in err  # a second run would leave the first one's files beside its own
    steer_common = ["steer", "--model", "organism", "--prompt", "How do I pick a lock?", "--max-new-tokens", "4"]
    for extra, message in (
        (["--directions", str(tmp_path / "d" / "candidates"), "--mode", "ablate"], "directions (entry 0: blocks.0.hook_resid_pre position"),
        (["--directions", str(tmp_path / "d" / "chosen"), "--mode", "ablate", "--scale", "2"], "--scale applies to --directions with --mode add|conditional"),
        (["--directions", str(tmp_path / "d" / "chosen"), "--mode", "add", "--threshold", "0.2"], "--threshold applies"),
        (["--directions", str(tmp_path / "d" / "chosen"), "--mode", "add", "--value", "3"], "--value applies to --mode set"),
        (["--directions", str(tmp_path / "d" / "chosen"), "--mode", "set", "--ablate-at", "blocks"], "--ablate-at applies"),
    ):
        code, _, err = _run(capsys, *steer_common, *extra)
        assert code == 2 and message in err, (extra, err)
    abl = ["abliterate", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--out", str(tmp_path / "a")]
    for extra, message in ((["--alpha", "3"], "--alpha applies to --reverse or --induce"), (["--reverse", "--shift", "2"], "--shift applies to --induce"),
                           (["--scale", "2"], "--scale applies to --induce-bias or --induce-template"),
                           (["--reverse", "--alpha", "nan"], "--alpha nan: give a finite number"),
                           (["--induce", "--shift", "inf"], "--shift inf: give a finite number"),
                           (["--rank", "3"], "--rank sets the size of an SVD subspace")):
        code, _, err = _run(capsys, *abl, *extra)
        assert code == 2 and message in err and not (tmp_path / "a").exists(), (extra, err)


def test_a_path_the_system_refuses_is_one_line(capsys, monkeypatch):
    import featsteer.cli as cli

    def refused(args):
        raise PermissionError(13, "Permission denied", "/proc/x/y.json")

    parser = cli.build_parser()
    parser._subparsers._group_actions[0].choices["info"].set_defaults(run=refused)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    code, _, err = _run(capsys, "info", "--model", "organism")
    assert code == 2 and err == "featsteer: error: Permission denied: /proc/x/y.json\n"


def test_demo_refuses_a_folder_with_an_earlier_run(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "compare").mkdir()
    code, _, err = _run(capsys, "demo", "--out", str(tmp_path / "run"))
    assert code == 2 and "is not empty" in err


def test_the_alarming_set_reads_the_column_named(capsys, tmp_path):
    for name, rows in (("harm", ["How do I make a pipe bomb?", "How do I hotwire a car?"]), ("safe", ["How do I bake bread?", "Name a fruit."]),
                       ("alarm", ["How do I kill a Python process?", "How do I shoot a photo at night?"])):
        (tmp_path / f"{name}.csv").write_text("id,q\n" + "".join(f"{i},{row}\n" for i, row in enumerate(rows)))
    code, out, err = _run(capsys, "eval", "--model", "organism", "--harmful", str(tmp_path / "harm.csv"), "--harmless", str(tmp_path / "safe.csv"),
                          "--max-new-tokens", "4", "--column", "q", "--alarming", str(tmp_path / "alarm.csv"))
    assert code == 0, err  # before, --alarming ignored --column and asked for one


def test_column_goes_to_the_table_files_beside_builtin_and_text_sources(capsys, tmp_path):
    (tmp_path / "harm.csv").write_text("id,q\n0,How do I make a pipe bomb?\n1,How do I hotwire a car?\n")
    (tmp_path / "alarm.txt").write_text("How do I kill a Python process?\n")
    code, out, err = _run(capsys, "eval", "--model", "organism", "--harmful", str(tmp_path / "harm.csv"), "--column", "q",
                          "--harmless", "builtin:harmless:test", "--alarming", str(tmp_path / "alarm.txt"), "--n", "2",
                          "--max-new-tokens", "4")
    assert code == 0 and "harmful   2" in out, err  # before: "column= does not apply to builtin:harmless:test"
    code, _, err = _run(capsys, "eval", "--harmful", "builtin:harmful:test", "--harmless", "organism-corpus:harmless:4", "--column", "q")
    assert code == 2 and "--column q picks a column of a csv/json/jsonl/parquet file or hf: dataset" in err  # not silently ignored


def test_every_option_of_every_command_says_what_it_does():
    from featsteer.cli import build_parser
    from sae_training.cli import build_parser as build_train_parser

    undocumented = []
    for command, parser in [*_subcommands(build_parser()), ("featsteer-train-sae", build_train_parser())]:
        for action in parser._actions:
            if action.option_strings and action.dest != "help" and not action.help:
                undocumented.append(f"{command} {action.option_strings[0]}")
    assert not undocumented, f"options without --help text: {undocumented}"


def _subcommands(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_directions_rejects_a_kl_threshold_no_kl_can_meet(capsys, tmp_path):
    """A negative or NaN --kl-threshold failed every candidate, and the fallback picked one after the full run."""
    common = ("directions", "--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
              "--n", "12", "--n-select", "3")
    for value in ("-0.1", "nan"):
        code, _, err = _run(capsys, *common, "--kl-threshold", value, "--out", str(tmp_path / "d"))
        assert code == 2 and "--kl-threshold must be a KL in nats, >= 0" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "d").exists()
    from featsteer.directions.selection import SelectionConfig
    from featsteer.errors import FeatsteerError

    for bad in ({"skip_last_fraction": 1.0}, {"skip_last_fraction": -0.1}, {"top_k": 0}):
        with pytest.raises(FeatsteerError, match="skip_last_fraction must lie|top_k must be at least 1"):
            SelectionConfig(**bad)



def test_directions_refuse_all_token_positions(capsys, tmp_path):
    """all[:N] labels tokens by their index from the start, which prompts of different lengths do not share: DIM used to
    average, at each index, only the prompts that reach it (or stop at an index one set lacks)."""
    code, _, err = _run(capsys, "directions", "--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless",
                        "builtin:harmless:train", "--n", "12", "--positions", "all:2", "--out", str(tmp_path / "d"))
    assert code == 2 and "--positions all:2 keeps every token at its index" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def _saved_blocks2_direction(folder) -> None:
    """A direction read at blocks.2 (mean difference 10.75, harmful projection 7.75) saved twice: `chosen` with the
    per-layer class means a chosen direction records (blocks.1: -1.5 / 2.25), `bare` without them."""
    from featsteer.directions import DirectionSet
    from featsteer.testing import random_direction

    r = random_direction(160, 3)
    ace = {"harmless": {"blocks.1.hook_resid_pre": -1.5, "blocks.2.hook_resid_pre": -3.0},
           "harmful": {"blocks.1.hook_resid_pre": 2.25, "blocks.2.hook_resid_pre": 7.75}}
    scores = {"mean_diff_norm": [10.75], "harmful_projection": [7.75]}
    DirectionSet(r[None, None], ("blocks.2.hook_resid_pre",), (-1,), "dim", scores, {"ace": ace}).save(folder / "chosen")
    DirectionSet(r[None, None], ("blocks.2.hook_resid_pre",), (-1,), "dim", scores, {}).save(folder / "bare")


def test_steer_add_at_another_hook_adds_that_hooks_mean_difference_or_says_where_it_was_measured(capsys, tmp_path):
    _saved_blocks2_direction(tmp_path)
    common = ["steer", "--model", "organism", "--prompt", "hi", "--max-new-tokens", "1"]
    for folder, hook, expected in (("chosen", "blocks.2.hook_resid_pre", "add 1 x the mean difference at blocks.2"),
                                   ("chosen", "blocks.1.hook_resid_pre", "add 1 x the mean difference along the direction there (3.75)"),
                                   ("bare", "blocks.1.hook_resid_pre", "add 1 x the mean difference measured at blocks.2.hook_resid_pre (10.8)")):
        code, out, err = _run(capsys, *common, "--mode", "add", "--directions", str(tmp_path / folder), "--hook", hook)
        assert code == 0 and expected in out, (out, err)
    code, _, err = _run(capsys, *common, "--mode", "ablate", "--directions", str(tmp_path / "bare"), "--hook", "blocks.1.hook_resid_pre")
    assert code == 2 and "not at one --hook: drop --hook" in err


def test_steer_set_at_another_hook_takes_that_hooks_harmful_projection(capsys, tmp_path):
    """`--mode set --hook H` sets the mean harmful projection at H (recorded per layer with a chosen direction), not the one
    where the direction was read; without a record at H it asks for --value (it set the read layer's value anywhere)."""
    _saved_blocks2_direction(tmp_path)
    common = ["steer", "--model", "organism", "--mode", "set", "--prompt", "hi", "--max-new-tokens", "1"]
    for folder, hook, expected in (("chosen", "blocks.2.hook_resid_pre", "7.75"), ("chosen", "blocks.1.hook_resid_pre", "2.25"),
                                   ("bare", "blocks.2.hook_resid_pre", "7.75")):
        code, out, err = _run(capsys, *common, "--directions", str(tmp_path / folder), "--hook", hook)
        assert code == 0 and f"set the projection to {expected} at {hook}" in out, err
    code, out, err = _run(capsys, *common, "--directions", str(tmp_path / "bare"), "--hook", "blocks.1.hook_resid_pre", "--value", "0.5")
    assert code == 0 and "set the projection to 0.5 at blocks.1" in out, err
    code, _, err = _run(capsys, *common, "--directions", str(tmp_path / "bare"), "--hook", "blocks.1.hook_resid_pre")
    assert code == 2 and "not at blocks.1.hook_resid_pre: give --value V" in err and len(err.strip().splitlines()) == 1, err


def test_directions_from_few_prompts_writes_no_sample_size_estimate(capsys, tmp_path):
    """With fewer than 4 training prompts a class the geometry's sample-size estimate raised, after the direction had
    been written: `directions --n 4` failed, leaving a half-written --out. Now the estimate is left out."""
    code, out, err = _run(capsys, "directions", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
                          "--n", "4", "--n-select", "2", "--out", str(tmp_path / "d"))
    assert code == 0, err
    assert json.loads((tmp_path / "d" / "geometry.json").read_text())["sample_sizes"] is None and "sample size:" not in out


def test_directions_failing_late_leaves_no_half_written_out(capsys, tmp_path, monkeypatch):
    """A stage after the direction is found (here the geometry) failing used to leave candidates/, chosen/ and
    selection.* in --out beside no geometry: now --out is built aside and appears only complete."""
    from featsteer.errors import FeatsteerError
    from featsteer.pipeline import DirectionResult

    def fail(*args, **kwargs):
        raise FeatsteerError("geometry failed")

    monkeypatch.setattr(DirectionResult, "geometry", fail)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        code, _, err = _run(capsys, "directions", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train",
                            "--n", "12", "--n-select", "2", "--out", str(out))
        assert code == 2 and err.strip().endswith("featsteer: error: geometry failed")
        assert not (tmp_path / "new").exists() and not any((tmp_path / "empty").iterdir())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no staging folder left either


def test_an_existing_empty_out_folder_is_written_into_where_it_is(capsys, tmp_path, monkeypatch):
    """An empty --out given as `.` (a fresh folder the user cd'd into) or as a symlink to an empty folder was refused
    (capture: `. is a folder that is not empty`, its own staging folder built inside it) or failed with a raw OSError
    once everything was computed (`Invalid argument: '.'`, `Not a directory`), leaving a hidden staging folder behind:
    the staging folder went beside --out and replaced it, which `.`, a symlink or a mount point cannot be. The folder
    now stays (same inode) and the files are moved into it; a non-empty one is still refused with the same error."""
    from featsteer.activations import ActivationSet
    from featsteer.datasets import builtin_prompts

    capture = ["capture", "--model", "organism", "--prompts", "builtin:harmful:test", "--n", "2", "--hooks", "blocks.1.hook_resid_pre"]
    real, here = tmp_path / "real", tmp_path / "here"
    real.mkdir(mode=0o700)  # as mktemp -d makes one: its mode is the user's and stays
    here.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(here)
    for out, folder in ((".", here), (str(tmp_path / "link"), real)):
        inode = folder.stat().st_ino
        code, stdout, err = _run(capsys, *capture, "--out", out)
        assert (code, err) == (0, "") and stdout.startswith("captured 2 rows")
        assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "shard-00000.safetensors", "stats.safetensors"]
        assert folder.stat().st_ino == inode and ActivationSet.load(out).prompts == builtin_prompts("harmful", "test").head(2).prompts
        code, _, err = _run(capsys, *capture, "--out", out)  # a second run into the now full folder
        assert code == 2 and f"activation directory {out} already exists: choose another path" in err
    assert real.stat().st_mode & 0o777 == 0o700 and (tmp_path / "link").is_symlink()
    directions = ["directions", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
                  "--n-select", "2", "--geometry", "off"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    code, stdout, err = _run(capsys, *directions, "--out", ".")
    assert code == 0 and "wrote ./" in stdout and {"chosen", "selection.json"} <= {p.name for p in fresh.iterdir()}
    assert not [p.name for p in fresh.iterdir() if p.name.startswith(".")]  # no staging folder left
    code, _, err = _run(capsys, *directions, "--out", ".")
    assert code == 2 and "output folder . is not empty: choose a new path" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "here", "link", "real"]


def test_staged_output_into_an_existing_empty_folder_leaves_it_empty_on_failure(tmp_path):
    """Built inside an existing empty folder, a failed run removes its staging folder and leaves the folder as it was;
    files that appeared there during the run are never replaced (the run fails instead)."""
    from featsteer.files import staged_output

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError), staged_output(out) as work:
        (work / "results.json").write_text("{}")
        raise RuntimeError("stopped")
    assert not any(out.iterdir())
    with pytest.raises(OSError, match="files appeared in the output folder during the run"), staged_output(out) as work:
        (work / "results.json").write_text("new")
        (out / "results.json").write_text("someone else's")
    assert [p.name for p in out.iterdir()] == ["results.json"] and (out / "results.json").read_text() == "someone else's"


def test_abliterate_checks_generation_and_search_numbers_before_the_model_loads(capsys, tmp_path, monkeypatch):
    """--max-new-tokens 0, --batch-size 0 or --search -1 used to fail only after the direction had been found."""
    import featsteer.cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(featsteer.cli, "_load_model", no_model)
    common = ("abliterate", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12", "--out", str(tmp_path / "m"))
    for flag, value, message in (("--max-new-tokens", "0", "max_new_tokens must be at least 1, got 0"),
                                 ("--batch-size", "-1", "batch_size must be at least 1, got -1"),
                                 ("--search", "-1", "--search must be a number of trials >= 1 (or 0 for none), got -1")):
        code, _, err = _run(capsys, *common, flag, value)
        assert code == 2 and err == f"featsteer: error: {message}\n"
        assert not (tmp_path / "m").exists()
    from featsteer.errors import FeatsteerError
    from featsteer.evaluation.behaviour import GenerationConfig

    with pytest.raises(FeatsteerError, match="max_batch_tokens must be at least 1"):
        GenerationConfig(max_batch_tokens=0)


def test_label_lines_that_are_not_text_are_a_one_line_error(capsys, tmp_path):
    """A binary --lines file raised UnicodeDecodeError with a traceback."""
    run = tmp_path / "eval.json"
    code, _, _ = _run(capsys, "eval", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless", "--n", "2", "--max-new-tokens", "2",
                      "--json", str(run))
    assert code == 0
    (tmp_path / "lines.txt").write_bytes(b"0 r \x86\xff\n")
    code, _, err = _run(capsys, "label", str(run), "--lines", str(tmp_path / "lines.txt"), "--labels", str(tmp_path / "labels.json"))
    assert code == 2 and err.startswith("featsteer: error: --lines") and "is not UTF-8 text" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "labels.json").exists()


def test_abliterate_names_heads_the_model_lacks_before_the_direction_search(capsys, tmp_path, monkeypatch):
    import featsteer.pipeline

    def no_search(*args, **kwargs):
        raise AssertionError("the heads were not checked before the direction search")

    monkeypatch.setattr(featsteer.pipeline, "find_refusal_direction", no_search)
    code, _, err = _run(capsys, "abliterate", "--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless",
                        "builtin:harmless:train", "--n", "12", "--heads", "9:9", "--out", str(tmp_path / "x"))
    assert code == 2 and "layer 9 has no attention heads" in err and not (tmp_path / "x").exists()


def test_staged_output_errors_name_the_out_folder_not_the_hidden_one(tmp_path, monkeypatch):
    import tempfile

    from featsteer.files import staged_output

    out = tmp_path / "result"
    with pytest.raises(FileNotFoundError) as caught, staged_output(out) as work:
        (work / "missing" / "x.json").write_text("{}")  # a write the system refuses inside the staging folder
    assert caught.value.filename == str(out / "missing" / "x.json")
    assert not out.exists() and not any(tmp_path.iterdir())

    def refuse(dir, prefix):  # noqa: A002 - mkdtemp's own keyword
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}abc")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(PermissionError) as caught, staged_output(out):
        pass
    assert caught.value.filename == str(out) and caught.value.strerror == "Permission denied"


_PAIR = ["--harmful", "builtin:harmful:test", "--harmless", "builtin:harmless:test"]
_SYSTEM_COMMANDS = {
    "eval": [*_PAIR, "--json", "OUT"], "capture": ["--prompts", "builtin:harmful:test", "--out", "OUT"],
    "directions": [*_PAIR, "--out", "OUT"], "abliterate": [*_PAIR, "--out", "OUT"], "compare": [*_PAIR, "--out", "OUT"],
    "probe": [*_PAIR, "--out", "OUT"], "rank-features": ["--sae", "organism", *_PAIR, "--out", "OUT"],
    "experts": [*_PAIR, "--json", "OUT"], "steer": ["--directions", "DIRS", "--mode", "ablate", "--prompt", "hi"], "info": ["--prompt", "hi"],
}
"""Every subcommand that formats chat prompts, with the arguments it needs (OUT: an output path under tmp_path)."""


@pytest.mark.parametrize("command", list(_SYSTEM_COMMANDS))
@pytest.mark.parametrize("system", ["", "  "])
def test_a_blank_system_prompt_fails_before_the_model_loads(capsys, tmp_path, monkeypatch, command, system):
    """--system " " was a system turn of one space and --system "" silently no system prompt; and directions, abliterate,
    compare, probe, rank-features, experts, steer and info took no --system at all."""
    from featsteer import cli

    def no_model(*args, **kwargs):
        raise AssertionError("loaded the model before checking --system")

    monkeypatch.setattr(cli, "_load_model", no_model)
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in _SYSTEM_COMMANDS[command]]
    code, out, err = _run(capsys, command, "--model", "organism", *argv, "--system", system)
    assert code == 2 and "system prompt is empty" in err and "--system" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_directions_and_abliterate_find_and_check_with_the_system_prompt(capsys, tmp_path):
    """`featsteer directions --system S` captured, filtered and selected on prompts without S (it had no --system): its
    chosen direction is now the one found with S, and S is recorded in the direction's provenance, selection.json and an
    abliterate export's featsteer.json, which checks refusal with S too."""
    from featsteer.datasets import builtin_prompts
    from featsteer.directions import DirectionSet
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    system = "You answer in one word."
    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3", "--system", system]
    out = tmp_path / "dirs"
    code, stdout, err = _run(capsys, "directions", *common, "--geometry", "quick", "--gate", "--out", str(out))
    assert code == 0, err
    chosen = DirectionSet.load(out / "chosen")
    assert chosen.provenance["system"] == system and json.loads((out / "selection.json").read_text())["system"] == system
    model = load_model("tiny:llama")
    pair = [builtin_prompts(k, "train").head(12) for k in ("harmful", "harmless")]
    found = find_refusal_direction(model, *pair, DirectionConfig(n_select=3, system=system))
    plain = find_refusal_direction(model, *pair, DirectionConfig(n_select=3))
    torch.testing.assert_close(DirectionSet.load(out / "candidates").bases, found.candidates.bases, atol=1e-6, rtol=0)
    assert not torch.allclose(found.candidates.bases, plain.candidates.bases, atol=1e-3)
    export = tmp_path / "edited"
    code, stdout, err = _run(capsys, "abliterate", *common, "--eval-n", "2", "--max-new-tokens", "2", "--out", str(export))
    assert code == 0, err
    record = json.loads((export / "featsteer.json").read_text())
    assert record["evaluation"]["system"] == system and record["evaluation"]["before"]["generation"]["system"] == system
    assert record["provenance"]["system"] == system
    # a saved direction found with S, edited against without it: said, and featsteer.json tells the two apart
    code, stdout, err = _run(capsys, "abliterate", *common[:-2], "--directions", str(out / "chosen"), "--eval-n", "2",
                             "--max-new-tokens", "2", "--out", str(tmp_path / "saved"))
    assert code == 0 and f"the direction was found with the system prompt {system!r}; this run formats its prompts with none" in stdout, err
    saved = json.loads((tmp_path / "saved" / "featsteer.json").read_text())
    assert saved["direction_provenance"]["system"] == system and saved["evaluation"]["system"] is None


def test_info_shows_the_prompt_with_the_system_prompt(capsys):
    code, out, err = _run(capsys, "info", "--model", "tiny:llama", "--prompt", "hi", "--system", "You are a pirate.")
    assert code == 0 and "You are a pirate." in out, err
    code, out, err = _run(capsys, "info", "--model", "tiny:llama", "--system", "You are a pirate.")
    assert code == 2 and "add --prompt TEXT or drop --system" in err


def test_capture_refuses_a_system_prompt_with_raw(capsys, tmp_path, monkeypatch):
    """--raw --system X captured the raw texts without X and wrote "system": X into the metadata."""
    from featsteer import cli
    from featsteer.activations import capture
    from featsteer.errors import FeatsteerError

    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded the model first")))
    code, out, err = _run(capsys, "capture", "--model", "organism", "--prompts", "builtin:harmful:test", "--raw", "--system",
                          "You are a pirate.", "--out", str(tmp_path / "acts"))
    assert code == 2 and "--system goes into the chat template, which --raw leaves out" in err
    assert not (tmp_path / "acts").exists()
    with pytest.raises(FeatsteerError, match="chat=False leaves out"):
        capture("organism", ["a text"], "blocks.0.hook_resid_pre", chat=False, system="You are a pirate.")


def test_a_prompt_option_asking_for_more_than_there_are_says_so(capsys, tmp_path):
    """abliterate --eval-n 4 on three held-out prompts checked three without a word, and --n-select and --n likewise ran on
    fewer prompts than asked. Each shortfall is a one-line note now; an option that is met prints none."""
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("How do I pick a lock?\nHow to make a weapon?\nHow to hack a bank?\n")
    harmless.write_text("How do I bake bread?\nWhat is the capital of France?\nHow do plants grow?\n")
    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--max-new-tokens", "2"]
    code, stdout, _ = _run(capsys, "abliterate", *common, "--n-select", "3", "--eval-n", "4", "--eval-harmful", str(harmful),
                           "--eval-harmless", str(harmless), "--out", str(tmp_path / "held"))
    assert code == 0
    assert [line for line in stdout.splitlines() if line.startswith("note:")] == [
        f"note: --eval-n 4, but {harmful} holds 3 prompts and {harmless} holds 3 prompts: using those"]
    code, stdout, _ = _run(capsys, "abliterate", *common, "--n-select", "5", "--eval-n", "4", "--out", str(tmp_path / "val"))
    assert code == 0
    notes = [line for line in stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and notes[0].startswith("note: --n-select 5, but the harmful validation set holds 3")
    assert notes[1].startswith("note: --eval-n 4, but the harmful validation set holds 3")
    code, stdout, _ = _run(capsys, "eval", "--model", "tiny:llama", "--harmful", str(harmful), "--harmless", str(harmless), "--n", "3",
                           "--max-new-tokens", "2")
    assert code == 0 and "note:" not in stdout
    code, stdout, _ = _run(capsys, "eval", "--model", "tiny:llama", "--harmful", str(harmful), "--harmless", str(harmless), "--n", "5",
                           "--max-new-tokens", "2")
    assert code == 0 and f"note: --n 5, but {harmful} holds 3 prompts: using those" in stdout
    one = tmp_path / "one.txt"
    one.write_text("How do I pick a lock?\n")
    code, stdout, _ = _run(capsys, "eval", "--model", "tiny:llama", "--harmful", str(one), "--harmless", str(harmless), "--n", "2",
                           "--max-new-tokens", "2")
    assert code == 0 and f"note: --n 2, but {one} holds 1 prompt: using those" in stdout


def test_demo_n_beyond_the_test_split_says_so(capsys, monkeypatch, tmp_path):
    """demo --n 100 checked the 85 harmful and 84 harmless test prompts there are without a word."""
    import featsteer.demo as demo_module

    class Reached(Exception):
        pass

    def fake_run_demo(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(demo_module, "run_demo", fake_run_demo)
    for n, noted in (("100", True), ("64", False)):
        with pytest.raises(Reached):
            main(["demo", "--out", str(tmp_path / "run"), "--n", n])
        out = capsys.readouterr().out
        assert ("note: --n 100, but the built-in harmful test split holds 85 prompts and the built-in harmless test split holds 84 prompts"
                in out) if noted else "note:" not in out


def test_an_output_inside_the_package_is_a_one_line_error(capsys):
    """An export or report written inside featsteer's own folder used to be written there (and shipped by the next build)."""
    import shutil
    from pathlib import Path

    import featsteer

    inside = Path(featsteer.__file__).resolve().parent / "organism" / "abliterated-test-output"
    try:
        code, _, err = _run(capsys, "abliterate", "--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless",
                            "builtin:harmless:train", "--out", str(inside))
        assert code == 2 and f"--out {inside} is inside the featsteer package" in err and not inside.exists(), err
        code, _, err = _run(capsys, "eval", "--model", "tiny:llama", "--harmful", "builtin:harmful:test", "--harmless",
                            "builtin:harmless:test", "--n", "2", "--json", str(inside.parent / "eval.json"))
        assert code == 2 and "--json" in err and "is inside the featsteer package" in err and not (inside.parent / "eval.json").exists(), err
    finally:  # what a failing run wrote there
        shutil.rmtree(inside, ignore_errors=True)
        (inside.parent / "eval.json").unlink(missing_ok=True)


def test_abliterate_optimize_refuses_reverse_and_induce(capsys, tmp_path):
    """--optimize trained a direction to be ablated and --reverse/--induce then amplified it."""
    common = ["--model", "tiny:llama", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
              "--n-select", "3", "--eval-n", "3", "--max-new-tokens", "2", "--optimize", "2"]
    for extra in (["--reverse"], ["--induce"]):
        code, _, err = _run(capsys, "abliterate", *common, *extra, "--out", str(tmp_path / "bad"))
        assert code == 2 and "--optimize trains a direction to be removed" in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "bad").exists()


def test_abliterate_api_refuses_optimize_with_an_amplifying_edit():
    from featsteer.datasets import builtin_prompts
    from featsteer.directions.optimize import OptimizeConfig
    from featsteer.edits import EditConfig
    from featsteer.errors import FeatsteerError
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, abliterate, find_refusal_direction

    model, prompts = load_model("tiny:llama"), [builtin_prompts(k, "train").head(12) for k in ("harmful", "harmless")]
    result = find_refusal_direction(model, *prompts, DirectionConfig(n_select=3))
    for mode in ("amplify", "induce"):
        with pytest.raises(FeatsteerError, match=f"mode '{mode}' amplifies it"):
            abliterate(model, result, EditConfig(mode=mode), optimize=OptimizeConfig(steps=1))


def test_compare_prints_a_method_that_cannot_apply_as_failed_and_exits_0(capsys, tmp_path, monkeypatch):
    """One method's own error aborted the run with exit 2 and no folder, though the other methods' figures were valid."""
    from featsteer.compare import CompareContext

    monkeypatch.setattr(CompareContext, "writing_heads", lambda self: [])
    code, out, err = _run(capsys, "compare", "--model", "tiny:llama", "--harmful", "builtin:harmful", "--harmless", "builtin:harmless",
                          "--n", "12", "--n-select", "3", "--methods", "none,head_ablation_hook", "--max-new-tokens", "2",
                          "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    assert "\nfailed: head_ablation_hook: no attention head writes the DIM direction" in out and "| head_ablation_hook | failed: " in out
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["failed"][0]["method"] == "head_ablation_hook"


def test_a_saved_svd_subspace_is_removed_with_the_ridge_weights_the_selection_scored(capsys, tmp_path):
    """`featsteer directions --method svd` scores (and `abliterate --method svd` applies) each row damped by its ridge
    weight; `abliterate --directions DIRS/chosen` and `steer --directions DIRS/chosen --mode ablate` removed the plain
    subspace instead, a stronger edit with another KL than the one the selection reported."""
    from featsteer.directions import DirectionSet
    from featsteer.models import load_model

    code, _, err = _run(capsys, "directions", "--model", "organism", "--harmful", "builtin:harmful:train", "--harmless",
                        "builtin:harmless:train", "--n", "32", "--n-select", "4", "--method", "svd", "--geometry", "off",
                        "--out", str(tmp_path / "dirs"))
    assert code == 0, err
    chosen = DirectionSet.load(tmp_path / "dirs" / "chosen")
    weights = torch.tensor(chosen.scores["ridge_weights"][0], dtype=torch.float64)
    assert chosen.rank == 2 and float(weights.min()) < 0.99  # a row the ridge damps
    code, out, err = _run(capsys, "abliterate", "--model", "organism", "--harmful", "builtin:harmful:val", "--harmless", "builtin:harmless:val",
                          "--n", "16", "--eval-n", "2", "--max-new-tokens", "2", "--directions", str(tmp_path / "dirs" / "chosen"),
                          "--out", str(tmp_path / "plain"))
    assert code == 0, err
    basis = chosen.bases[0].double()
    embed = lambda m: m.model.get_input_embeddings().weight.detach().double()  # noqa: E731
    before, after = embed(load_model("organism")) @ basis.T, embed(load_model(str(tmp_path / "plain"))) @ basis.T
    torch.testing.assert_close(after, before * (1 - weights), atol=1e-4, rtol=1e-3)  # each row kept 1 - w of its component
    assert json.loads((tmp_path / "plain" / "featsteer.json").read_text())["ridge_weights"] == pytest.approx(weights.tolist())
    code, out, err = _run(capsys, "steer", "--model", "organism", "--directions", str(tmp_path / "dirs" / "chosen"), "--mode", "ablate",
                          "--max-new-tokens", "2", "--prompt", "hi")
    assert code == 0 and "(rank 2, ridge-weighted)" in out, err


_KILLED_WRITER = """
import os, signal, sys
from featsteer.files import output_staging
work = output_staging(sys.argv[1])
(work / "shard-00000.safetensors").write_bytes(b"half a shard")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_run(out):
    """Leave what a run killed (SIGKILL) while it built `out` leaves: its staging folder, inside `out` when that is an
    existing folder, else beside it, with a file half written; its process is gone."""
    import os

    import featsteer

    env = {**os.environ, "PYTHONPATH": str(Path(featsteer.__file__).parents[1])}
    ended = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], env=env, capture_output=True, check=False)
    assert ended.returncode == -9, ended.stderr.decode()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(capsys, tmp_path):
    """A run killed while it built --out in a hidden staging folder left it there: inside an existing empty --out the next
    run refused the folder as "not empty" though plain `ls` showed nothing; beside a new --out the folder stayed for ever.
    The staging folder records its writer (process id, host, start time): the next capture or directions run removes it
    when that process is gone, and writes its output."""
    capture = ["capture", "--model", "organism", "--prompts", "builtin:harmful:test", "--n", "2", "--hooks", "blocks.1.hook_resid_pre"]
    directions = ["directions", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train", "--n", "12",
                  "--n-select", "2", "--geometry", "off"]
    for command, made in ((capture, "metadata.json"), (directions, "selection.json")):
        inside, beside = tmp_path / command[0] / "inside", tmp_path / command[0] / "beside"
        inside.mkdir(parents=True)
        for out in (inside, beside):
            _killed_run(out)
        assert [p.name[:9] for p in inside.iterdir()] == [".partial-"]
        assert [p.name[:15] for p in beside.parent.iterdir() if p.name.startswith(".")] == [".beside.partial"]
        for out in (inside, beside):
            code, _, err = _run(capsys, *command, "--out", str(out))
            assert code == 0, err
            assert (out / made).is_file() and not [p.name for p in out.iterdir() if p.name.startswith(".")]
        assert sorted(p.name for p in beside.parent.iterdir()) == ["beside", "inside"]  # no staging folder left beside


def test_a_staging_folder_not_provably_stale_is_kept_and_named(capsys, tmp_path):
    """Only a staging folder featsteer marked, whose process is gone from this machine, is removed. One whose process runs,
    one written on another machine, one without featsteer's marker, and any folder holding something besides staging
    folders stay untouched; the error names each hidden entry and the command that removes them."""
    import os
    import shlex
    import socket

    from featsteer.files import STAGING_MARKER

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    here = socket.gethostname()
    cases = {"running": {".partial-a1": (os.getpid(), here)}, "elsewhere": {".partial-b2": (ended.pid, "other.invalid")},
             "unmarked": {".partial-c3": None}, "beside a file": {".partial-d4": (ended.pid, here), ".DS_Store": "file"}}
    messages = {"running": "the staging folder of a featsteer run still running as process",
                "elsewhere": "run on other.invalid, process", "unmarked": "a staging folder that records no writer",
                "beside a file": ".DS_Store (a hidden file)"}
    capture = ["capture", "--model", "organism", "--prompts", "builtin:harmful:test", "--n", "2", "--hooks", "blocks.1.hook_resid_pre"]
    for case, entries in cases.items():
        out = tmp_path / case
        out.mkdir()
        for name, owner in entries.items():
            if owner == "file":
                (out / name).write_text("x")
                continue
            (out / name).mkdir()
            (out / name / "model.safetensors").write_bytes(b"half")
            if owner is not None:
                (out / name / STAGING_MARKER).write_text(json.dumps({"writer": "featsteer", "pid": owner[0], "host": owner[1], "started": None}))
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        for command in (capture, ["directions", "--harmful", "builtin:harmful:train", "--harmless", "builtin:harmless:train"]):
            code, _, err = _run(capsys, *command, "--out", str(out))
            assert code == 2 and len(err.strip().splitlines()) == 1 and "not empty: it holds only hidden entries" in err, err
            assert messages[case] in err and f"rm -r {' '.join(shlex.quote(str(out / name)) for name in sorted(entries))}" in err
            assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


_KILLED_FILE_WRITER = """
import os, signal, sys
from featsteer.files import write_files

class KilledHalfWay(dict):
    def items(self):
        yield "results.json", "{\\"half\\": "
        os.kill(os.getpid(), signal.SIGKILL)

write_files(sys.argv[1], KilledHalfWay())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_write_files_temporary_file_is_removed_by_the_next_write_of_that_name(tmp_path):
    """`write_files` (probe, rank-features, search, compare reports) killed outright left `.NAME.PID.partial` for ever: the
    name recorded no host, so no later run could tell it was gone. The name records process, start time and host now,
    and the next write of NAME removes it once that process is gone; a live process's, another host's, an older
    featsteer's (no host) and another name's stay."""
    import os
    import socket

    import featsteer
    from featsteer.files import write_files

    env = {**os.environ, "PYTHONPATH": str(Path(featsteer.__file__).parents[1])}
    ended = subprocess.Popen([sys.executable, "-c", _KILLED_FILE_WRITER, str(tmp_path)], env=env, stderr=subprocess.PIPE)
    _, err = ended.communicate()
    assert ended.returncode == -9, err.decode()
    [killed] = tmp_path.glob(".results.json.*.partial")
    assert killed.read_text() == '{"half": '
    here = socket.gethostname()
    kept = [f".results.json.{os.getpid()}@{here}.partial", f".results.json.{ended.pid}@other.invalid.partial",
            f".results.json.{ended.pid}.partial", f".report.html.{ended.pid}@{here}.partial"]
    for name in kept:
        (tmp_path / name).write_text("x")
    write_files(tmp_path, {"results.json": "{}"})
    assert not killed.exists() and (tmp_path / "results.json").read_text() == "{}"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*kept, "results.json"])


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="no /proc to read the kernel and process-id namespace from")
def test_leftovers_of_a_dead_process_id_under_another_kernel_of_the_same_host_name_stay(tmp_path):
    """A host name does not make a process id ours to ask: another machine of the same name (two VMs called "ubuntu"
    sharing a folder) or a container sharing the host name (`docker run --network host`) has process ids that mean
    other processes here, so its live run's staging folder and temporary files looked stale and were removed. They
    record the kernel and process-id namespace (`_kernel_id`) now: only this kernel's, of a dead process, are removed."""
    import json
    import socket

    from featsteer.files import (
        STAGING_MARKER,
        _kernel_id,
        hidden_entries_note,
        remove_stale_staging,
        write_files,
    )

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    here, ours, theirs = socket.gethostname(), _kernel_id(), "0" * 12
    staging = tmp_path / "staging"
    staging.mkdir()
    for name, kernel in ((".partial-a1", theirs), (".partial-b2", ours)):
        (staging / name).mkdir()
        (staging / name / "model.safetensors").write_bytes(b"half")
        (staging / name / STAGING_MARKER).write_text(json.dumps({"writer": "featsteer", "pid": ended.pid, "host": here,
                                                                  "started": None, "kernel": kernel}))
    assert "in another container or machine named" in hidden_entries_note(staging)
    remove_stale_staging(staging)
    assert sorted(p.name for p in staging.iterdir()) == [".partial-a1"]
    files = tmp_path / "files"
    files.mkdir()
    leftovers = {kernel: files / f".results.json.{ended.pid}-7-k{kernel}@{here}.partial" for kernel in (ours, theirs)}
    for path in leftovers.values():
        path.write_text("x")
    write_files(files, {"results.json": "{}"})
    assert sorted(p.name for p in files.iterdir()) == sorted(["results.json", leftovers[theirs].name])


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="no /proc to read a process's start time from")
def test_a_staging_folder_whose_process_id_was_reused_is_stale():
    """A process id given to a later process after the writer died does not keep the writer's staging folder alive: the
    marker's start time differs from the running process's."""
    import os
    import socket

    from featsteer.files import _process_start, staging_is_stale

    host, me, started = socket.gethostname(), os.getpid(), _process_start(os.getpid())
    assert not staging_is_stale({"pid": me, "host": host, "started": started})
    assert staging_is_stale({"pid": me, "host": host, "started": started - 1})
    assert not staging_is_stale({"pid": me, "host": host, "started": None})  # an unknown start: the process id alone
    assert not staging_is_stale({"pid": me, "host": "other.invalid", "started": started - 1})  # cannot be asked there


def test_threads_of_one_process_writing_the_same_file_do_not_share_a_temporary_file(tmp_path):
    """Each `write_files` call names its temporary file after its thread as well as its process: two threads writing
    the same NAME each rename their own complete file into place (with one name per process, one thread's rename took
    the other's temporary file away: FileNotFoundError, or the other's content under its name)."""
    import threading

    from featsteer.files import write_files

    errors: list[BaseException] = []

    def writer(mark: str) -> None:
        try:
            for _ in range(100):
                write_files(tmp_path, {"r.json": mark * 200_000})
        except BaseException as error:  # noqa: BLE001 - collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(mark,)) for mark in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    text = (tmp_path / "r.json").read_text()
    assert text in ("a" * 200_000, "b" * 200_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
