"""Does the selection's choice with more validation prompts abliterate better? DIM abliteration of the candidate the
selection picks reading n validation prompts per class, on the held-out prompts.

    python benchmarks/selection_choice.py --target qwen --n-select 32     # about 5 minutes

On Qwen2.5-Coder-0.5B the selection reading 16 prompts per class (what the other Qwen benchmarks use) picks layer 16
position -1 in 66% of bootstrap resamples; reading 32 or 64 it picks layer 17 position -2 in 81-91%
(`selection_stability.py`). This measures that choice's abliteration with `abliteration.py`'s `measure` (100 + 100
held-out prompts, greedy, 32 new tokens, first-token KL). Results: `benchmarks/results/selection_choice_<target>.json`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import load_target, measure, measure_base, prompt_sets  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    from featsteer.evaluation import RefusalTokens
    from featsteer.evaluation.behaviour import GenerationConfig
    from featsteer.pipeline import abliterate, find_refusal_direction

    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=["qwen", "organism"], default="qwen")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-select", default="32", help="comma list of validation prompts per class the selection reads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sets = prompt_sets(args.target)
    model, config, val = load_target(args.target)
    qwen = args.target == "qwen"
    gen = GenerationConfig(max_new_tokens=32, batch_size=64, max_batch_tokens=8192) if qwen else GenerationConfig(max_new_tokens=32)
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    base_row, base = measure_base(model, sets, gen, tokens)
    rows, reuse = [], None
    for n in map(int, args.n_select.split(",")):
        result = find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"], replace(config, n_select=n), val=val,
                                        keep_activations=True, reuse=reuse)
        reuse, chosen = result, result.selection.chosen
        with abliterate(model, result):
            row = measure(model, sets, gen, tokens, base, harmless_refusal=False)
        row.pop("examples", None)
        rows.append({"n_select": n, "hook": chosen.hook, "position": chosen.position, **row})
        print(f"n_select={n}: {chosen.hook} position {chosen.position}: refused {row['refused_harmful']}/{row['n_harmful']}, "
              f"KL {row['kl_harmless']:.4f} (answered {row['kl_harmless_answered']:.4f})", flush=True)
    out = {"target": args.target, "model": model.name, "date": time.strftime("%Y-%m-%d"), "command": shlex.join(sys.argv[1:]),
           "base_refused_harmful": base_row["refused_harmful"], "rows": rows, "seconds_total": round(time.perf_counter() - started, 1)}
    write_files(RESULTS, {f"selection_choice_{args.target}.json": json_text(out, indent=1) + "\n"})


if __name__ == "__main__":
    main()
