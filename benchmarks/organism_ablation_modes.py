"""Why DIM abliteration falls short on the organism: zero- vs mean-ablation of every DIM candidate.

    python benchmarks/organism_ablation_modes.py      # writes benchmarks/results/organism_ablation_modes.{json,md}

For each (layer, position) DIM candidate of the Arditi selection (the same prompt sets as
`abliteration.py --target organism`), three runtime interventions on the built-in test prompts:

- zero-ablation, `x - (x.r) r` at every residual write: what abliteration does;
- mean-ablation, the projection on r set at every `resid_pre` to its mean over the harmless training
  prompts at the candidate's position (the value differs per layer; a weight edit cannot express it);
- the projected-DIM direction (component along the harmless mean removed), zero-ablated.

It also prints the mean +- std of the harmful and harmless projections on r at every layer: when the
harmless projection is far from zero, zero-ablation pushes harmless-looking activations *past* their own
mean, and refusal can go up instead of down.
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

from abliteration import measure, measure_base, prompt_sets  # noqa: E402

from featsteer.activations import capture  # noqa: E402
from featsteer.evaluation import RefusalTokens  # noqa: E402
from featsteer.evaluation.behaviour import GenerationConfig  # noqa: E402
from featsteer.files import json_text, write_files  # noqa: E402
from featsteer.interventions import Ablate, ProjectionSet, steer  # noqa: E402
from featsteer.models import load_model  # noqa: E402
from featsteer.pipeline import DirectionConfig, find_refusal_direction  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    torch.set_num_threads(parser.parse_args().threads)
    started = time.perf_counter()
    model = load_model("organism")
    sets = prompt_sets("organism")
    gen = GenerationConfig(max_new_tokens=32, batch_size=32)
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    base, kl_base = measure_base(model, sets, gen, tokens)
    hooks = model.hook_names(("resid_pre",))
    results = {method: find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"], DirectionConfig(method=method))
               for method in ("dim", "projected")}
    acts = {label: capture(model, sets[f"train_{label}"], hooks, positions="post_instruction", progress=False)
            for label in ("harmful", "harmless")}
    rows = []
    for i in range(len(results["dim"].candidates)):
        candidates = results["dim"].candidates
        hook, position = candidates.hook_names[i], candidates.positions[i]
        norm = float(candidates.bases[i, 0].norm())
        if norm == 0 or model.hook_site(hook).layer >= int(0.8 * model.n_layers):
            continue  # zero direction (layer 0 template tokens) or a late layer the selection skips
        r = candidates.bases[i, 0] / norm
        projections = {}
        for h in hooks:
            values = {label: acts[label].at_position(h, position) @ r for label in acts}
            projections[h] = {label: [round(float(v.mean()), 2), round(float(v.std()), 2)] for label, v in values.items()}
        with steer(model, Ablate(r)):
            zero = measure(model, sets, gen, tokens, kl_base, harmless_refusal=False)
        with steer(model, *[ProjectionSet(r, projections[h]["harmless"][0], where=h) for h in hooks]):
            mean = measure(model, sets, gen, tokens, kl_base, harmless_refusal=False)
        projected = results["projected"].candidates
        p = projected.bases[i, 0] / projected.bases[i, 0].norm()
        with steer(model, Ablate(p)):
            zero_projected = measure(model, sets, gen, tokens, kl_base, harmless_refusal=False)
        row = {"hook": hook, "position": position, "projections": projections,
               **{name: {"refused_harmful": m["refused_harmful"], "n_harmful": m["n_harmful"], "kl_harmless": m["kl_harmless"]}
                  for name, m in (("zero_ablation", zero), ("mean_ablation", mean), ("projected_zero_ablation", zero_projected))}}
        rows.append(row)
        print(hook, position, {k: row[k] for k in ("zero_ablation", "mean_ablation", "projected_zero_ablation")}, flush=True)
    chosen = results["dim"].selection.chosen
    payload = {"base": {"refused_harmful": base["refused_harmful"], "n_harmful": base["n_harmful"]},
               "chosen": {"hook": chosen.hook, "position": chosen.position, "reason": chosen.reason},
               "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    lines = ["# Zero- vs mean-ablation of the organism's DIM candidates", "",
             f"`benchmarks/organism_ablation_modes.py`, {time.strftime('%Y-%m-%d')}, {payload['seconds']:.0f}s. Built-in test prompts "
             f"(base: {base['refused_harmful']}/{base['n_harmful']} harmful refused); KL is the first-token KL on the harmless test prompts. "
             f"The Arditi selection chose `{chosen.hook}` position {chosen.position} ({chosen.reason or 'passed'}).", "",
             "| candidate | zero-ablation (abliteration) | mean-ablation (every resid_pre) | projected DIM, zero-ablated | harmful / harmless projection at that layer (mean +- std) |",
             "|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[k]['refused_harmful']}/{row[k]['n_harmful']} at KL {row[k]['kl_harmless']:.3f}"
                 for k in ("zero_ablation", "mean_ablation", "projected_zero_ablation")]
        proj = row["projections"][row["hook"]]
        lines.append(f"| `{row['hook']}` pos {row['position']} | " + " | ".join(cells)
                     + f" | {proj['harmful'][0]} +- {proj['harmful'][1]} / {proj['harmless'][0]} +- {proj['harmless'][1]} |")
    write_files(RESULTS, {"organism_ablation_modes.json": json_text(payload, indent=1) + "\n",
                          "organism_ablation_modes.md": "\n".join(lines) + "\n"})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
