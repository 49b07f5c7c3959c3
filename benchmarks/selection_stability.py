"""How sure is the Arditi selection of its choice? The selection bootstrapped over its validation prompts.

    python benchmarks/selection_stability.py --target qwen       # about 10 minutes (bfloat16, screened to 16)
    python benchmarks/selection_stability.py --target organism

The direction is selected as the other benchmarks select it, reading the first n validation prompts of each class for
each n in `--n-select`; `Selection.stability` then draws those prompts again with replacement 1000 times, re-applies
the filters to the finalists' per-prompt scores and counts which candidate wins. Results go to
`benchmarks/results/selection_stability_<target>.{json,md}`.
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

from abliteration import load_target, prompt_sets  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    from featsteer.pipeline import find_refusal_direction

    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=["qwen", "organism"], default="organism")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-select", default="16,64", help="comma list of validation prompts per class the selection reads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sets = prompt_sets(args.target)
    model, config, val = load_target(args.target)
    runs, reuse = [], None
    for n in map(int, args.n_select.split(",")):
        t0 = time.perf_counter()
        result = find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"], replace(config, n_select=n), val=val,
                                        keep_activations=True, reuse=reuse)
        reuse = result
        stability = result.selection.stability()
        chosen = result.selection.chosen
        runs.append({"n_select": n, "chosen": [chosen.hook, chosen.position], "kept": chosen.kept, "reason": chosen.reason,
                     "refusal_ablated": chosen.refusal_ablated, "kl_harmless": chosen.kl_harmless,
                     "stability": stability.to_dict(), "seconds": round(time.perf_counter() - t0, 1)})
        print(f"n_select={n}: {chosen.hook} position {chosen.position}: {stability.line()}", flush=True)
    out = {"target": args.target, "model": model.name, "date": time.strftime("%Y-%m-%d"), "command": shlex.join(sys.argv[1:]),
           "threads": args.threads, "screen": config.screen, "runs": runs, "seconds_total": round(time.perf_counter() - started, 1)}
    write_files(RESULTS, {f"selection_stability_{args.target}.json": json_text(out, indent=1) + "\n",
                          f"selection_stability_{args.target}.md": render(out)})
    print(render(out))


def render(out: dict) -> str:
    lines = [f"# How sure is the selection? {out['model']}", "",
             f"Measured by `benchmarks/selection_stability.py {out['command']}` on {out['date']} ({out['threads']} threads, "
             f"{out['seconds_total']:.0f} s; " + (f"selection screened to {out['screen']} candidates" if out["screen"] else "no screening")
             + "). Each row selects once "
             "on the first n validation prompts per class, then bootstraps that choice over those prompts (1000 resamples, "
             "the filters re-applied to the finalists' per-prompt scores).", "",
             "| validation prompts per class | chosen | passed the filters | share of resamples choosing it | also chosen |",
             "|---:|---|---|---:|---|"]
    for run in out["runs"]:
        stability = run["stability"]
        others = ", ".join(f"{hook} {position} ({share:.0%})" for hook, position, share in stability["shares"]
                           if [hook, position] != run["chosen"])
        passed = "yes" if run["kept"] else f"no (fallback: {run['reason']})"
        lines.append(f"| {run['n_select']} | {run['chosen'][0]} {run['chosen'][1]} | {passed} | {stability['chosen_share']:.0%} | "
                     f"{others or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
