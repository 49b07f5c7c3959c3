"""How many prompts does DIM abliteration need? The sample-size estimate against what smaller prompt sets really do.

    python benchmarks/sample_size.py --target organism
    python benchmarks/sample_size.py --target qwen      # needs ../shared/models/fetch_real_models.sh qwen and ../shared/data

The direction is selected once on the full training prompts (Arditi selection, as `steering_methods.py` selects it).
Then, at that hook and position, DIM directions are computed from random subsets of n training prompts per class
(several draws per n, seeded) and each is ablated at every residual write on the held-out prompts: harmful refusal
(greedy, 32 new tokens, the `featsteer eval` detector) and first-token KL on the harmless prompts. Each subset's
direction is compared with the full training set's, by its cosine, against what `directions.sample_size` predicts
from the full set alone: for a subset of n out of N prompts per class, `sqrt((S + T/N) / (S + T/n))` (S the squared
length of the population mean difference, T the two classes' total variance). Results go to
`benchmarks/results/sample_size_<target>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import load_target, measure, measure_base, prompt_sets  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZES = (2, 4, 8, 16, 32, 64, 128)


def main() -> None:
    from featsteer.directions import sample_size, unit
    from featsteer.evaluation import RefusalTokens
    from featsteer.evaluation.behaviour import GenerationConfig
    from featsteer.interventions import Ablate, steer
    from featsteer.pipeline import find_refusal_direction

    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=["qwen", "organism"], default="organism")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draws", type=int, default=3, help="random subsets per size")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma list of prompts per class")
    parser.add_argument("--render-only", action="store_true", help="re-write the markdown from the results JSON")
    args = parser.parse_args()
    name = f"sample_size_{args.target}"
    if args.render_only:
        write_files(RESULTS, {f"{name}.md": render(json.loads((RESULTS / f"{name}.json").read_text()))})
        return
    torch.set_num_threads(args.threads)
    qwen = args.target == "qwen"
    sets = prompt_sets(args.target)
    started = time.perf_counter()
    model, config, val = load_target(args.target)
    gen = GenerationConfig(max_new_tokens=32, batch_size=64, max_batch_tokens=8192) if qwen else GenerationConfig(max_new_tokens=32)
    result = find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"], config, val=val, keep_activations=True)
    chosen = result.selection.chosen
    hook, position = chosen.hook, result.candidates.positions[chosen.index]
    harmful_acts, harmless_acts = (acts.at_position(hook, position).double() for acts in result.activations)
    full = unit(harmful_acts.mean(0) - harmless_acts.mean(0))
    estimate = sample_size(harmful_acts, harmless_acts, hook=hook, position=position, draws=64)
    selection_seconds = time.perf_counter() - started
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    base_row, base = measure_base(model, sets, gen, tokens)
    n_max = min(len(harmful_acts), len(harmless_acts))
    sizes = [n for n in map(int, args.sizes.split(",")) if n < n_max] + [n_max]
    signal2, spread2 = estimate.signal**2, estimate.spread**2
    rows = []
    for n in sizes:
        for draw in range(1 if n == n_max else args.draws):
            generator = torch.Generator().manual_seed(1000 * n + draw)
            pick_h = torch.randperm(len(harmful_acts), generator=generator)[:n]
            pick_l = torch.randperm(len(harmless_acts), generator=generator)[:n]
            r = unit(harmful_acts[pick_h].mean(0) - harmless_acts[pick_l].mean(0))
            predicted = math.sqrt((signal2 + spread2 / n_max) / (signal2 + spread2 / n)) if signal2 > 0 else 0.0
            t0 = time.perf_counter()
            with steer(model, Ablate(r.float())):
                row = measure(model, sets, gen, tokens, base, harmless_refusal=False)
            row.pop("examples", None)
            rows.append({"n": n, "draw": draw, "cosine_with_full": float(r @ full), "predicted_cosine_with_full": predicted,
                         "expected_cosine_with_population": estimate.cosine_at(n), **row, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"n={n} draw={draw}: cos {rows[-1]['cosine_with_full']:.4f} (predicted {predicted:.4f}); "
                  f"refused {row['refused_harmful']}/{row['n_harmful']} KL {row['kl_harmless']:.4f}", flush=True)
    base_row.pop("examples", None)
    base_row.pop("refused_flags_harmless", None)
    out = {"target": args.target, "model": model.name, "date": time.strftime("%Y-%m-%d"), "command": shlex.join(sys.argv[1:]),
           "threads": args.threads, "hook": hook, "position": position, "n_train": [len(harmful_acts), len(harmless_acts)],
           "estimate": estimate.to_dict(), "base": base_row, "rows": rows, "selection_seconds": round(selection_seconds, 1),
           "seconds_total": round(time.perf_counter() - started, 1)}
    write_files(RESULTS, {f"{name}.json": json_text(out, indent=1) + "\n", f"{name}.md": render(out)})
    print(render(out))


def render(out: dict) -> str:
    est, base = out["estimate"], out["base"]
    nh, nl = out["n_train"]
    lines = [f"# How many prompts does DIM abliteration need? {out['model']}", "",
             f"Measured by `benchmarks/sample_size.py {out['command']}` on {out['date']} ({out['threads']} threads, "
             f"{out['seconds_total']:.0f} s). Direction selected on the full training prompts ({nh} harmful + {nl} harmless): "
             f"{out['hook']} position {out['position']}. Each row: DIM from n random training prompts per class at that hook, "
             "ablated at every residual write; refusal on the held-out harmful prompts (greedy, 32 new tokens), first-token KL "
             "on the held-out harmless prompts.", "",
             f"Sample-size estimate from the full training set (`directions.sample_size`): signal {est['signal']:.3g}, spread "
             f"{est['spread']:.3g}, expected cosine with the population direction {est['cosine']:.4f}; split-half cosine "
             f"{est['split_half']:.4f} against a predicted {est['split_half_predicted']:.4f}; prompts per class for a cosine of "
             + ", ".join(f"{c}: {'-' if v is None else max(1, math.ceil(v))}" for c, v in est["needed"].items()) + ".", "",
             f"Unedited: {base['refused_harmful']}/{base['n_harmful']} harmful refused.", "",
             "| n per class | draw | cosine with the full-set direction | predicted | expected cosine with the population's | "
             "refused harmful | KL harmless (all / answered) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        answered = "-" if r.get("kl_harmless_answered") is None else f"{r['kl_harmless_answered']:.4f}"
        lines.append(f"| {r['n']} | {r['draw']} | {r['cosine_with_full']:.4f} | {r['predicted_cosine_with_full']:.4f} | "
                     f"{r['expected_cosine_with_population']:.4f} | {r['refused_harmful']}/{r['n_harmful']} | "
                     f"{r['kl_harmless']:.4f} / {answered} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
