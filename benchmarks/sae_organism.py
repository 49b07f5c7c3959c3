"""SAE methods next to DIM on the refusal organism, with the organism's shipped SAEs.

    python benchmarks/sae_organism.py          # writes benchmarks/results/sae_organism.{json,md}

1. The shipped SAEs' quality (each layer's `metrics.json`, written by `featsteer-train-sae`).
2. `featsteer.compare.compare` with the SAE methods and the DIM baseline on the same held-out prompts
   (built-in train+val to find directions and rank features, 32 + 32 fresh `organism-corpus:` prompts to select
   the direction and pick the SAE settings, built-in test to evaluate), as `make demo` runs it.
3. Per-feature jailbreak and induced-refusal rates of the top features (generation + refusal detector),
   and how many top features must be ablated together to bring harmful refusal below a target.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featsteer.compare import SaeMethodConfig, compare, rank_sae_features  # noqa: E402
from featsteer.datasets import builtin_prompts, load_prompts  # noqa: E402
from featsteer.evaluation.behaviour import GenerationConfig  # noqa: E402
from featsteer.features import feature_effects, features_needed  # noqa: E402
from featsteer.files import json_text, write_files  # noqa: E402
from featsteer.models import load_model  # noqa: E402
from featsteer.organism import ORGANISM_SAE_DIR  # noqa: E402
from featsteer.sae import load_saes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ["none", "dim_abliteration", "dim_ablation_hook", "sae_top1_abliteration", "sae_topk_abliteration",
           "sae_top1_ablation_hook", "sae_clamp_hook", "sae_topk_induce", "dim_actadd_induce"]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    torch.set_num_threads(parser.parse_args().threads)
    started = time.perf_counter()
    model = load_model("organism")
    saes = load_saes("organism", model)
    quality = {hook: json.loads((ORGANISM_SAE_DIR / hook / "metrics.json").read_text()) for hook in saes}
    train = {label: builtin_prompts(label, "train") + builtin_prompts(label, "val") for label in ("harmful", "harmless")}
    test = {label: builtin_prompts(label, "test") for label in ("harmful", "harmless", "alarming")}
    gen = GenerationConfig(max_new_tokens=32)
    val = {"val_harmful": load_prompts("organism-corpus:harmful:96"), "val_harmless": load_prompts("organism-corpus:harmless:96")}
    comparison = compare(model, train["harmful"], train["harmless"], methods=METHODS, eval_harmful=test["harmful"],
                         eval_harmless=test["harmless"], alarming=test["alarming"], generation=gen, saes=saes,
                         sae_config=SaeMethodConfig(), **val)
    ranking = rank_sae_features(model, saes, train["harmful"], train["harmless"])
    hook, ids = ranking.best(16)
    effects = feature_effects(model, saes[hook], ids[:8], test["harmful"].to_list(), test["harmless"].to_list(),
                              harmful_max=ranking.harmful_max[hook])
    needed = features_needed(model, saes[hook], ids, test["harmful"].to_list(), target=0.25)
    payload = {"date": time.strftime("%Y-%m-%d"), "sae_quality": quality, "comparison": comparison.to_json(),
               "feature_effects": effects.to_json(), "features_needed": needed.to_dict(),
               "seconds": round(time.perf_counter() - started, 1)}
    text = markdown(payload, comparison, effects, needed)
    write_files(RESULTS, {"sae_organism.json": json_text(payload, indent=1, default=str) + "\n", "sae_organism.md": text})
    print(text)


def markdown(payload: dict, comparison, effects, needed) -> str:
    lines = ["# SAE methods vs DIM on the refusal organism", "",
             f"Measured {payload['date']} by `benchmarks/sae_organism.py` ({payload['seconds']:.0f}s, CPU). Directions and feature "
             "ranking from the built-in train+val split, selection and SAE settings on fresh generated prompts; every number on the built-in test split (85 harmful, 84 harmless, "
             "38 alarming-but-harmless prompts), greedy decoding, 32 new tokens.", "",
             "## The shipped SAEs (topk, `featsteer-train-sae`, held-out prompts)", "",
             "| hook | d_sae | explained variance | L0 | dead features | CE loss recovered | train tokens/s |", "|---|---|---|---|---|---|---|"]
    for hook, m in payload["sae_quality"].items():
        lines.append(f"| {hook} | {m['d_sae']} | {m['explained_variance']:.3f} | {m['l0']:.1f} | {m['dead_fraction']:.3f} | "
                     f"{m['ce_loss_recovered']:.3f} | {m['tokens_per_second']:.0f} |")
    lines += ["", "## Every method on the same prompts", "", comparison.table(), ""]
    details = {r.method: r.details for r in comparison.results if "sae_hook" in r.details}
    lines += ["## Settings picked on the validation prompts", "",
              "The top-k, clamp and induce methods pick their feature count and clamp value on the validation prompts "
              "(the first 32 of `organism-corpus:harmful:96` and `organism-corpus:harmless:96`: fresh prompts from the "
              "organism's corpus generator, seed 987, which neither the organism nor the feature ranking saw), never on "
              "the test split: the jailbreak methods take the lowest validation KL among the settings whose validation "
              "harmful refusal is within 0.05 of the lowest, the induce method the weakest setting within 0.05 of the "
              "highest induced refusal. Validation refusal from greedy generations of 16 new tokens.", "",
              "| method | hook | features | picked | validation (setting: refusal, KL) |", "|---|---|---|---|---|"]
    for method, d in details.items():
        rows = "; ".join(f"{label}: " + ", ".join(f"{v:.3f}" if not isinstance(v, str) else f"ruled out by the {v}" for v in row.values())
                         for label, row in d.get("sae_validation", {}).items())
        lines.append(f"| {method} | {d['sae_hook']} | {d['sae_features']} | {d.get('setting', '-')} | {rows or 'fixed'} |")
    lines.append("")
    lines += ["## Single features (top 8 by composite score at the best hook)", "", effects.table(), "", effects.summary(), "",
              "## How many features does it take?", "",
              "| features ablated together | harmful refusal |", "|---|---|",
              f"| 0 (clean) | {needed.clean.rate:.3f} |"]
    lines += [f"| {n} | {rate.rate:.3f} |" for n, rate in needed.steps]
    lines += ["", needed.summary(), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
