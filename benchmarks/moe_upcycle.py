"""Mixture-of-experts abliteration on real weights: Qwen2.5-Coder-0.5B-Instruct upcycled to Qwen2-MoE.

    python benchmarks/moe_upcycle.py        # about 15 minutes: writes benchmarks/results/moe_upcycle_qwen.{json,md}

This machine cannot download an MoE checkpoint, so the MoE path (fused expert weights, shared experts, one writer per
expert) has run on random tiny configs only. Sparse upcycling (Komatsuzaki et al. 2023) gives a real-weights MoE that
computes the same function as a dense model we have: every MLP becomes `--experts` identical routed experts (the
dense gate/up/down weights copied into each slice of the fused tensors), a random router picks two per token with
weights normalised to sum to one, and a shared expert with a random input side and a zero output projection (so it
adds nothing, but is there to be edited). Attention, norms and embeddings are copied. The upcycled model must give
the dense model's logits, and featsteer must find the same refusal direction in it and abliterate it to the same
behaviour:

1. the logits of both models on 32 held-out harmless prompts (max absolute difference, float32);
2. the DIM direction at `blocks.16.hook_resid_pre`, last token, from the 256 + 256 training prompts of
   `real_model.py`, captured from each model (cosine between them);
3. DIM abliteration of each model with its own direction: writers edited, edit seconds, refusal (markers) on the 100
   held-out AdvBench prompts (greedy, 32 tokens), first-token KL on the 100 held-out harmless prompts against its own
   unedited model, and how many of the 100 harmful responses are identical text in the two models;
4. after the edit, the largest component along the direction left in any expert's or shared expert's output weights.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import prompt_sets, qwen_gguf  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HOOK = "blocks.16.hook_resid_pre"


def upcycle(dense, n_experts: int, seed: int = 0):
    """A `Qwen2MoeForCausalLM` computing the dense Qwen2 model's function (see the module docstring)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = dense.config
    moe_config = Qwen2MoeConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_parameters=config.rope_parameters, tie_word_embeddings=config.tie_word_embeddings,
        hidden_act=config.hidden_act, qkv_bias=True, num_experts=n_experts, num_experts_per_tok=2, norm_topk_prob=True,
        moe_intermediate_size=config.intermediate_size, shared_expert_intermediate_size=256, decoder_sparse_step=1,
        mlp_only_layers=[], bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    torch.manual_seed(seed)
    moe = Qwen2MoeForCausalLM(moe_config).eval()
    dense_state = dense.state_dict()
    with torch.no_grad():
        for name, param in moe.named_parameters():
            if name in dense_state:
                param.copy_(dense_state[name])
        for layer, block in enumerate(moe.model.layers):
            mlp = dense.model.layers[layer].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # the fused layout: gate rows, then up rows
            block.mlp.experts.gate_up_proj.copy_(gate_up.expand(n_experts, -1, -1))
            block.mlp.experts.down_proj.copy_(mlp.down_proj.weight.expand(n_experts, -1, -1))
            block.mlp.gate.weight.normal_(0.0, 0.05)
            block.mlp.shared_expert.down_proj.weight.zero_()
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe


def run(n_experts: int) -> dict:
    from featsteer.activations import capture
    from featsteer.directions import difference_in_means
    from featsteer.edits import apply_edit
    from featsteer.evaluation import RefusalDetector
    from featsteer.evaluation.metrics import first_token_logprobs, kl_first_token
    from featsteer.models import load_model

    sets = prompt_sets("qwen")
    train_harmful, train_harmless = list(sets["train_harmful"]), list(sets["train_harmless"])
    eval_harmful, eval_harmless = list(sets["eval_harmful"]), list(sets["eval_harmless"])
    detector, out, timings = RefusalDetector(), {"n_experts": n_experts}, {}

    start = time.perf_counter()
    dense = load_model(str(qwen_gguf()))
    moe = load_model(upcycle(dense.model, n_experts), tokenizer=dense.tokenizer)
    timings["load_and_upcycle_s"] = time.perf_counter() - start
    out["params"] = {name: sum(p.numel() for p in m.model.parameters()) for name, m in (("dense", dense), ("moe", moe))}
    out["family"] = {"dense": dense.family, "moe": moe.family}

    start = time.perf_counter()
    probe = eval_harmless[:32]
    logit_gap = (dense.logits(probe, batch_size=16) - moe.logits(probe, batch_size=16)).abs().max()
    out["max_abs_logit_difference"] = float(logit_gap)
    timings["logit_check_s"] = time.perf_counter() - start

    directions, per_model = {}, {}
    for name, model in (("dense", dense), ("moe", moe)):
        start = time.perf_counter()
        acts = [capture(model, prompts, [HOOK], progress=False) for prompts in (train_harmful, train_harmless)]
        direction = difference_in_means(*acts).direction(HOOK, -1).double()
        directions[name] = direction / direction.norm()
        timings[f"{name}_capture_s"] = time.perf_counter() - start
        start = time.perf_counter()
        base = first_token_logprobs(model, eval_harmless, batch_size=16)
        timings[f"{name}_base_logprobs_s"] = time.perf_counter() - start
        start = time.perf_counter()
        handle = apply_edit(model, directions[name][None].float())
        edit_s = time.perf_counter() - start
        writers = model.residual_writers()
        r = directions[name]
        leftover = max(float((r @ w.read()[0].double()).abs().max()) for w in writers if w.kind == "mlp_out")
        start = time.perf_counter()
        responses = model.generate(eval_harmful, max_new_tokens=32, batch_size=32, max_batch_tokens=8192)
        timings[f"{name}_generate_s"] = time.perf_counter() - start
        kl = float(kl_first_token(base, first_token_logprobs(model, eval_harmless, batch_size=16)))
        start = time.perf_counter()
        handle.revert()
        revert_s = time.perf_counter() - start
        per_model[name] = {"writers": len(writers), "mlp_writers": sum(w.kind == "mlp_out" for w in writers), "edit_s": edit_s,
                           "revert_s": revert_s, "largest_mlp_component_left": leftover,
                           "refused_harmful": sum(detector.classify(responses)), "kl_harmless": kl, "responses": responses}
    out["direction_cosine"] = float(directions["dense"] @ directions["moe"])
    out["identical_responses"] = sum(a == b for a, b in zip(per_model["dense"]["responses"], per_model["moe"]["responses"], strict=True))
    for row in per_model.values():
        row.pop("responses")
    out["runs"], out["timings"] = per_model, timings
    return out


def render(out: dict) -> str:
    dense, moe = out["runs"]["dense"], out["runs"]["moe"]
    lines = [
        "# DIM abliteration of an upcycled mixture-of-experts model (Qwen2.5-Coder-0.5B-Instruct -> Qwen2-MoE)",
        "",
        f"Measured {out['date']} by `python benchmarks/moe_upcycle.py` on CPU ({out['threads']} threads, float32). The dense "
        f"model's every MLP became {out['n_experts']} identical routed experts (top-2, weights normalised) plus a shared expert "
        "with a zero output projection; see the script's docstring. Directions at `blocks.16.hook_resid_pre`, last token, "
        "from the 256 + 256 training prompts; 100 held-out AdvBench and 100 held-out MT-Bench+IFBench prompts.",
        "",
        f"- Parameters: dense {out['params']['dense'] / 1e6:.0f}M, upcycled {out['params']['moe'] / 1e6:.0f}M "
        f"(featsteer families `{out['family']['dense']}` / `{out['family']['moe']}`).",
        f"- Same function: the largest logit difference on 32 harmless prompts is {out['max_abs_logit_difference']:.2e}.",
        f"- Same direction: cosine {out['direction_cosine']:.6f} between the DIM directions captured from each model.",
        f"- Same behaviour after abliteration: {out['identical_responses']}/100 held-out harmful responses are identical text.",
        "",
        "| model | residual writers (MLP) | edit (s) | revert (s) | largest component left in an MLP writer | refused harmful | KL harmless |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in (("dense Qwen2", dense), ("upcycled Qwen2-MoE", moe)):
        lines.append(f"| {name} | {row['writers']} ({row['mlp_writers']}) | {row['edit_s']:.2f} | {row['revert_s']:.2f} | "
                     f"{row['largest_mlp_component_left']:.1e} | {row['refused_harmful']}/100 | {row['kl_harmless']:.4f} |")
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in out["timings"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4, help="routed experts per layer (two are active per token)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = run(args.experts)
    out |= {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}
    write_files(RESULTS, {"moe_upcycle_qwen.json": json_text(out, indent=1), "moe_upcycle_qwen.md": render(out)})
    print(render(out))


if __name__ == "__main__":
    main()
