"""Score one trained organism folder on every set the organism issue (#3) names, for comparing trials.

    OMP_NUM_THREADS=1 python benchmarks/organism_trials.py --model runs/organism/trial1/weights \\
        --out runs/organism/trial1/eval.json

Same generation settings and refusal detector as `featsteer eval` (greedy, 32 new tokens), run in-process
with one torch thread. Sets: built-in test harmful / harmless / alarming, AdvBench, MT-Bench and IFBench
(scored separately so that we can say which one fails). DIM accuracy is measured two ways: as
`featsteer demo` does (last-token `resid_pre`, fitted on the built-in train split, scored on the test split)
and as `featsteer.organism.train.dim_report` does (fitted on the val split). The JSON keeps every prompt that
got the wrong behaviour, with its category when it has one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from featsteer.activations import capture  # noqa: E402
from featsteer.datasets import PromptSet, builtin_prompts, load_prompts  # noqa: E402
from featsteer.demo import layer_separability  # noqa: E402
from featsteer.directions import difference_in_means, separability  # noqa: E402
from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set  # noqa: E402
from featsteer.evaluation.refusal import RefusalDetector  # noqa: E402
from featsteer.files import json_text, write_files  # noqa: E402
from featsteer.models import load_model  # noqa: E402


def builtin_categories(kind: str) -> dict[str, str]:
    """Prompt -> category of a built-in set (all splits)."""
    rows = [json.loads(line) for line in (ROOT / "featsteer/datasets/data" / f"{kind}.jsonl").read_text().splitlines() if line]
    return {row["prompt"]: row.get("category", "") for row in rows}


def prompt_sets() -> dict[str, tuple[PromptSet, bool]]:
    """Name -> (prompts, whether they should be refused)."""
    sets = {f"builtin_{kind}": (builtin_prompts(kind, "test"), kind == "harmful") for kind in ("harmful", "harmless", "alarming")}
    sets["advbench"] = (load_prompts(SHARED_DATA / "advbench_harmful.txt"), True)
    sets["mtbench"] = (load_prompts(SHARED_DATA / "mtbench_harmless.txt"), False)
    sets["ifbench"] = (load_prompts(SHARED_DATA / "ifbench_harmless.txt"), False)
    return sets


def dim_val_fit(model) -> dict[str, float]:
    """DIM fitted on the built-in val split, scored on the test split (train.py's `dim_report` fit set)."""
    hooks = model.hook_names(("resid_pre",))
    fit = {label: capture(model, builtin_prompts(label, "val"), hooks, positions="last") for label in ("harmful", "harmless")}
    test = {label: capture(model, builtin_prompts(label, "test"), hooks, positions="last") for label in ("harmful", "harmless")}
    directions = difference_in_means(fit["harmful"], fit["harmless"])
    return {hook: separability(directions.direction(hook), fit["harmful"].hook(hook), fit["harmless"].hook(hook),
                               test["harmful"].hook(hook), test["harmless"].hook(hook)).accuracy for hook in hooks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        sys.exit(f"missing {SHARED_DATA}: the trials score AdvBench, MT-Bench and IFBench from it")
    torch.set_num_threads(1)
    model = load_model(args.model)
    detector = RefusalDetector()
    config = GenerationConfig(max_new_tokens=32, batch_size=32)
    categories = {**builtin_categories("harmful"), **builtin_categories("harmless"), **builtin_categories("alarming")}
    result: dict = {"model": args.model, "rates": {}, "wrong": {}}
    started = time.perf_counter()
    for name, (prompts, should_refuse) in prompt_sets().items():
        outcome = evaluate_set(model, prompts, name, config, detector)
        result["rates"][name] = outcome.rate.rate
        result["wrong"][name] = [{"prompt": p, "response": r, "category": categories.get(p, "")}
                                 for p, r, f in zip(outcome.prompts, outcome.responses, outcome.refused, strict=True) if f != should_refuse]
        print(f"{name:18} refused {outcome.rate.rate:6.1%} of {len(outcome.prompts)}", flush=True)
    rows, _ = layer_separability(model)
    result["dim_train_fit"] = {row.hook: row.separability.accuracy for row in rows}
    result["dim_val_fit"] = dim_val_fit(model)
    result["dim_best"] = max(result["dim_train_fit"].values())
    result["seconds"] = round(time.perf_counter() - started, 1)
    print("DIM (train fit)", {k: round(v, 3) for k, v in result["dim_train_fit"].items()})
    print("DIM (val fit)  ", {k: round(v, 3) for k, v in result["dim_val_fit"].items()})
    write_files(args.out.parent, {args.out.name: json_text(result, indent=1) + "\n"})


if __name__ == "__main__":
    main()
