"""How much the first-order screen (`--screen N`) speeds up the Arditi selection, and whether it picks the same.

    python benchmarks/selection_screen.py                      # writes benchmarks/results/selection_screen_qwen_bfloat16.{json,md}
    python benchmarks/selection_screen.py --dtype float32 --screens 24

Needs `../shared/models/fetch_real_models.sh qwen` and `../shared/data`. On Qwen2.5-Coder-0.5B-Instruct (2 threads),
with the prompts and settings of `real_model.py` (DIM candidates from the first 256 AdvBench vs 256 MT-Bench+IFBench
prompts, the last quarter held out, 16 validation prompts per set, KL and induce checks for the best 8):

1. the plain selection: every candidate is ablated on the harmful validation prompts (its exact score);
2. for each N of `--screens`: the same selection on the same capture (`reuse=`) with `screen=N`, which ablates only
   the N candidates with the lowest first-order estimate.

It reports each selection's seconds, whether the screened one chose the same candidate, how many of the plain
selection's 8 finalists (the 8 lowest exact scores) the screen kept, the rank correlation between estimate and
exact score over every eligible candidate, and the seconds of the one attribution pass.
bfloat16 is the default because it is 2.3x faster on this CPU with the same selection (`precision_qwen.md`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import fmt, prompt_sets, qwen_gguf  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> torch.Tensor:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = torch.empty(len(values), dtype=torch.float64)
        out[torch.tensor(order)] = torch.arange(len(values), dtype=torch.float64)
        return out

    ra, rb = ranks(a), ranks(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    from featsteer.directions.attribution import ablation_attribution
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model spec instead of the Qwen GGUF (e.g. organism, for a smoke run)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--screens", default="16,24,32", help="comma list of N for --screen")
    parser.add_argument("--n-select", type=int, default=16)
    parser.add_argument("--method", default="dim", help="candidate method (dim, projected, pca, svd)")
    parser.add_argument("--rank", type=int, default=2, help="subspace size for --method svd")
    parser.add_argument("--filter-train", action="store_true", help="the Arditi train filter (as real_model.py --filter-train)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-name", help="results file stem (default: selection_screen_qwen_<dtype>)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variant = ("" if args.method == "dim" else f"_{args.method}{args.rank if args.method == 'svd' else ''}") + ("_filtered" if args.filter_train else "")
    name = args.results_name or f"selection_screen_{'qwen' if args.model is None else args.model}_{args.dtype}{variant}"
    start = time.perf_counter()
    model = load_model(args.model or str(qwen_gguf()), dtype=args.dtype)
    if args.model == "organism":
        from featsteer.datasets import builtin_prompts

        sets = {"train_harmful": builtin_prompts("harmful", "train"), "train_harmless": builtin_prompts("harmless", "train")}
    else:
        sets = prompt_sets("qwen")
    out: dict = {"model": args.model or "qwen2.5-coder-0.5b-instruct (Q4_K_M GGUF, dequantised)", "dtype": args.dtype,
                 "threads": args.threads, "n_select": args.n_select, "load_s": round(time.perf_counter() - start, 1)}
    settings = {"method": args.method, "rank": args.rank, "filter_train": args.filter_train}
    out.update(settings)
    config = DirectionConfig(n_select=args.n_select, **settings)
    full = find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"], config, keep_activations=True)
    print(f"plain selection: {full.timings}", flush=True)
    exact = {c.index: c for c in full.selection.candidates if c.refusal_ablated == c.refusal_ablated}
    finalists = sorted(exact, key=lambda i: exact[i].refusal_ablated)[:8]
    chosen = full.selection.chosen
    out["capture_s"] = round(full.timings["capture_s"], 1)
    out["plain"] = {"selection_s": round(full.timings["selection_s"], 1), "n_candidates": len(full.selection.candidates),
                    "n_ablated": len(exact), "n_finalists": len(finalists), "chosen": [chosen.hook, chosen.position], "chosen_kl": chosen.kl_harmless,
                    "chosen_refusal_ablated": chosen.refusal_ablated, "base_refusal_harmful": full.selection.base_refusal_harmful}
    started = time.perf_counter()
    ablation_attribution(model, list(full.val[0].head(args.n_select).prompts), batch_size=config.batch_size)
    out["attribution_pass_s"] = round(time.perf_counter() - started, 1)
    out["screened"] = []
    for n in (int(x) for x in args.screens.split(",")):
        result = find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"],
                                        DirectionConfig(n_select=args.n_select, screen=n, **settings), reuse=full)
        rows = {c.index: c for c in result.selection.candidates}
        kept = {i for i, c in rows.items() if c.refusal_ablated == c.refusal_ablated}
        estimates = {i: c.refusal_estimate for i, c in rows.items() if c.refusal_estimate == c.refusal_estimate}
        common = sorted(set(estimates) & set(exact))
        picked = result.selection.chosen
        row = {"screen": n, "selection_s": round(result.timings["selection_s"], 1), "chosen": [picked.hook, picked.position],
               "same_choice": picked.index == chosen.index, "chosen_kl": picked.kl_harmless,
               "chosen_refusal_ablated": picked.refusal_ablated, "finalists_kept": sum(i in kept for i in finalists),
               "spearman_estimate_vs_exact": round(_spearman([estimates[i] for i in common], [exact[i].refusal_ablated for i in common]), 3),
               "worst_estimate_rank_of_a_finalist": max(sorted(estimates, key=estimates.get).index(i) for i in finalists) + 1,
               "mean_ratio_estimate_to_exact_change": round(sum((estimates[i] - full.selection.base_refusal_harmful)
                                                                / (exact[i].refusal_ablated - full.selection.base_refusal_harmful)
                                                                for i in finalists) / len(finalists), 3)}
        out["screened"].append(row)
        print(json.dumps(row), flush=True)
    out["total_s"] = round(time.perf_counter() - start, 1)
    write_files(RESULTS, {f"{name}.json": json_text(out, indent=1) + "\n", f"{name}.md": render(out)})
    print(render(out))


def render(out: dict) -> str:
    plain = out["plain"]
    method = out.get("method", "dim") + (f" rank {out.get('rank')}" if out.get("method") == "svd" else "") + \
        (", Arditi train filter" if out.get("filter_train") else "")
    lines = [f"# Screened Arditi selection ({out['model']}, {out['dtype']}, {out['threads']} threads; candidates: {method})", "",
             f"Written by `benchmarks/selection_screen.py`. Capture of the training prompts: {out['capture_s']} s (shared by "
             f"every row). One attribution pass over the {out['n_select']} harmful validation prompts: "
             f"{out['attribution_pass_s']} s. {plain['n_ablated']} of {plain['n_candidates']} candidates are eligible "
             "(the rest are in the last 20% of layers or zero).", "",
             f"| selection | seconds | ablated exactly | chosen | same choice | plain finalists kept (of {plain['n_finalists']}) | Spearman, estimate vs exact | worst estimate rank of a plain finalist |",
             "|---|---:|---:|---|---|---:|---:|---:|",
             f"| plain (every candidate ablated) | {plain['selection_s']} | {plain['n_ablated']} | {plain['chosen'][0]} pos {plain['chosen'][1]} "
             f"(KL {plain['chosen_kl']:.3f}) | - | {plain['n_finalists']} | - | - |"]
    for row in out["screened"]:
        lines.append(f"| `screen={row['screen']}` | {row['selection_s']} | {row['screen']} | {row['chosen'][0]} pos {row['chosen'][1]} "
                     f"(KL {row['chosen_kl']:.3f}) | {'yes' if row['same_choice'] else 'no'} | {row['finalists_kept']} | "
                     f"{fmt(row['spearman_estimate_vs_exact'])} | {row['worst_estimate_rank_of_a_finalist']} |")
    ratio = out["screened"][0]["mean_ratio_estimate_to_exact_change"] if out["screened"] else float("nan")
    lines += ["", f"The first-order estimate of a finalist's score change is on average {fmt(ratio)} of the exact change: it ranks, "
              "it does not measure. Seconds include the base passes and the KL/induce checks of the 8 finalists, which "
              "the screen does not shorten.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
