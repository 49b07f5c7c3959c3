"""How the chosen refusal direction looks on the organism and on Qwen2.5-Coder-0.5B-Instruct: its logit lens, where
each class sits on it at every layer, the cosines between the layers' directions, the heads that write it, whether
the model writes it back, and which readers carry the refusal (`DirectionResult.geometry`).

    python benchmarks/direction_geometry.py --target organism   # seconds
    python benchmarks/direction_geometry.py --target qwen       # about 10 minutes (bfloat16, selection screened to 16)

Writes `results/direction_geometry_<target>.{md,json,png}`. The prompts and the selection are those of
`steering_methods.py` (Qwen: the first 256 AdvBench vs 256 MT-Bench+IFBench prompts, the last quarter validating).
"""

from __future__ import annotations

import argparse
import sys
import time
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
    parser.add_argument("--k", type=int, default=15, help="tokens per side of the logit lens")
    parser.add_argument("--generate", type=int, default=None, metavar="N",
                        help="also generate (32 new tokens) on the first N held-out prompts of each set under the main read-side "
                        "conditions and count refusals (default: every held-out prompt for the organism, off for Qwen)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    qwen = args.target == "qwen"
    sets = prompt_sets(args.target)
    start = time.perf_counter()
    model, config, val = load_target(args.target)
    result = find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"], config, val=val, keep_activations=True)
    geometry = result.geometry(model, k=args.k)
    n_generate = args.generate if args.generate is not None else (0 if qwen else len(sets["eval_harmful"]))
    generated = read_side_generation(model, result.chosen_basis[0], sets, n_generate) if n_generate else None
    seconds = time.perf_counter() - start
    name = f"direction_geometry_{args.target}"
    header = (f"Measured by `benchmarks/direction_geometry.py --target {args.target}` on {time.strftime('%Y-%m-%d')} "
              f"({model.name}, {model.dtype}; {seconds:.0f} s with the direction selection). Class means are over the "
              f"training prompts ({len(result.train[0])} harmful, {len(result.train[1])} harmless) at the chosen position.\n\n")
    markdown = geometry.markdown()
    if generated:
        n_harmful, n_harmless = generated["n"]
        lines = ["", "## The read-side conditions in generation", "",
                 f"Greedy, 32 new tokens, the `featsteer eval` detector, on the first {n_harmful} held-out harmful and {n_harmless} "
                 "held-out harmless prompts (the evaluation split of `steering_methods.py`):", "",
                 "| direction removed from | refused harmful | refused harmless |", "|---|---:|---:|"]
        lines += [f"| {label} | {row['harmful']}/{n_harmful} | {row['harmless']}/{n_harmless} |" for label, row in generated["rows"].items()]
        cut = markdown.index("## Cosines between")
        markdown = markdown[:cut] + "\n".join(lines[1:]) + "\n\n" + markdown[cut:]
    title, _, body = markdown.partition("\n")
    write_files(RESULTS, {f"{name}.md": f"{title}\n\n{header}{body.lstrip()}",
                          f"{name}.json": json_text({"model": model.name, "seconds": round(seconds, 1), **geometry.to_dict(),
                                                     "read_side_generation": generated}, indent=1)})
    geometry.plot(RESULTS / f"{name}.png")
    print((RESULTS / f"{name}.md").read_text())


def read_side_generation(model, r, sets, n: int) -> dict:
    """Refusal counts in generation with `r` removed from nothing, every residual write, every block's inputs, the
    unembedding's input, and every reader (`directions.readers.reader_groups`)."""
    from featsteer.directions.readers import reader_groups
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set
    from featsteer.evaluation.refusal import RefusalDetector
    from featsteer.interventions import WRITES, Ablate, resolve_sites, steer

    harmful, harmless = sets["eval_harmful"].head(n), sets["eval_harmless"].head(n)
    groups = reader_groups(model, per_layer=False)
    conditions = {"nothing (unedited)": [], "every residual write": resolve_sites(model, WRITES)}
    conditions.update({label: groups[label] for label in ("blocks", "unembedding", "every reader")})
    config, detector, rows = GenerationConfig(max_new_tokens=32), RefusalDetector(), {}
    for label, hooks in conditions.items():
        with steer(model, *([Ablate(r, where=hooks)] if hooks else [])):
            counts = {kind: sum(evaluate_set(model, prompts, kind, config, detector).refused) for kind, prompts in
                      (("harmful", harmful), ("harmless", harmless))}
        rows[label] = counts
        print(label, counts, flush=True)
    return {"n": [len(harmful), len(harmless)], "rows": rows}


if __name__ == "__main__":
    main()
