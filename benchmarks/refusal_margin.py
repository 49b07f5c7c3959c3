"""Where do the harmful prompts that DIM abliteration leaves refused sit on the first-token refusal score?

    python benchmarks/refusal_margin.py      # about 4 minutes: writes benchmarks/results/refusal_margin_qwen.{json,md}

On the rotated blind Qwen prompts (`steering_methods.py --eval-set rotated`) DIM abliteration leaves 18 of the 164
fresh AdvBench prompts refused by the markers, while the DIM-ablated model refuses only 4 of the 192 harmful training
prompts. This reads the refusal score of the selection (log-odds that the first response token opens a refusal,
`evaluation.metrics.refusal_score`) with the DIM direction removed from every residual write, on the training prompts
(AdvBench 0-191), the validation prompts (192-255) and the fresh ones (356 on). If the fresh refusals sit in the same
range as the top of the training prompts, a loss on the training prompts' first-token refusal score
(`OptimizeConfig.refusal_weight`) can reach them; if they sat far above it, it could not.

The DIM direction is recomputed here from the training prompts as the rotated runs fit it (`blocks.15.hook_resid_pre`,
last token, AdvBench 0-191 against MT-Bench+IFBench pool indices 118-309), and ablated as a hook (the weight edit's
equivalent). Which fresh prompts the abliterated model refused comes from a saved `steering_methods.py` run
(`--responses`, default the rotated pick64 run's), by the `featsteer eval` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import qwen_gguf, real_pools  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HOOK = "blocks.15.hook_resid_pre"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", default=str(ROOT / "runs" / "rotated_qwen_first15_seed1_pick64.json"),
                        help="a steering_methods.py --save-responses file of a rotated run (its dim_abliteration responses)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from featsteer.activations.capture import capture
    from featsteer.directions.dim import difference_in_means
    from featsteer.evaluation.metrics import RefusalTokens, refusal_score
    from featsteer.evaluation.refusal import RefusalDetector
    from featsteer.features.scoring import auroc
    from featsteer.interventions import Ablate, steer
    from featsteer.models import load_model

    if not Path(args.responses).is_file():
        raise SystemExit(f"missing {args.responses}: save a rotated run's responses first (steering_methods.py --save-responses)")
    saved = json.loads(Path(args.responses).read_text())
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    advbench, mixed = real_pools()
    sets = {"train": list(advbench[:192]), "validation": list(advbench[192:256]), "fresh": list(advbench[356:])}
    if saved["prompts"]["harmful"] != sets["fresh"]:
        raise SystemExit(f"{args.responses}: its harmful prompts are not the rotated set's fresh AdvBench prompts")
    detector = RefusalDetector()
    refused = [detector.is_refusal(r) for r in saved["responses"]["dim_abliteration"]["harmful"]]
    model = load_model(str(qwen_gguf()), dtype="bfloat16")
    harmful = capture(model, sets["train"], [HOOK], positions="last", progress=False)
    harmless = capture(model, list(mixed[118:310]), [HOOK], positions="last", progress=False)
    direction = difference_in_means(harmful, harmless).direction(HOOK)
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    scores = {}
    for name, prompts in sets.items():
        with steer(model, Ablate(direction)):
            scores[name] = refusal_score(torch.log_softmax(model.logits(prompts, batch_size=16), -1), tokens).tolist()
    fresh = torch.tensor(scores["fresh"])
    labels = torch.tensor(refused)
    out = {"date": time.strftime("%Y-%m-%d"), "hook": HOOK, "responses": Path(args.responses).name, "scores": scores,
           "fresh_refused_by_markers": refused, "seconds": round(time.perf_counter() - started, 1),
           "auroc_fresh": round(float(auroc(fresh[labels, None], fresh[~labels, None])[0]), 4)}
    write_files(RESULTS, {"refusal_margin_qwen.json": json_text(out, indent=1) + "\n", "refusal_margin_qwen.md": render(out)})
    print(render(out))


def _row(name: str, values: list[float]) -> str:
    x = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(x, torch.tensor([0.5, 0.9, 0.95], dtype=torch.float64)).tolist()
    loss = sum(math.log1p(math.exp(v)) for v in values) / len(values)
    return (f"| {name} | {len(values)} | {q[0]:+.2f} | {q[1]:+.2f} | {q[2]:+.2f} | {max(values):+.2f} | {int((x > -2).sum())} | "
            f"{int((x > 0).sum())} | {loss:.4f} |")


def _mass(log_odds: float) -> float:
    return 1 / (1 + math.exp(-log_odds))


def render(out: dict) -> str:
    scores, refused = out["scores"], out["fresh_refused_by_markers"]
    fresh = scores["fresh"]
    kept = sorted(v for v, r in zip(fresh, refused, strict=True) if r)
    answered = sorted(v for v, r in zip(fresh, refused, strict=True) if not r)
    reach = sum(v >= kept[0] for v in scores["train"])
    return "\n".join([
        "# First-token refusal score with the DIM direction ablated (Qwen2.5-Coder-0.5B, rotated prompts)", "",
        f"Measured by `benchmarks/refusal_margin.py` on {out['date']} ({out['seconds']:.0f} s): the refusal log-odds of the first "
        f"response token (`refusal_score`) with the DIM direction of `{out['hook']}` (last token, AdvBench 0-191 against "
        "MT-Bench+IFBench 118-309) removed from every residual write. Which fresh prompts DIM abliteration leaves refused: the "
        f"markers on `{out['responses']}`.", "",
        "| AdvBench prompts | n | median | 90% | 95% | max | > -2 | > 0 | mean -log(1 - P(refusal)) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        _row("training (0-191)", scores["train"]), _row("validation (192-255)", scores["validation"]), _row("fresh (356 on)", fresh),
        _row("fresh, refused after abliteration", kept), _row("fresh, answered after abliteration", answered), "",
        f"- The {len(kept)} fresh prompts DIM abliteration leaves refused score {kept[0]:+.2f} to {kept[-1]:+.2f} (a first-token "
        f"refusal mass of {_mass(kept[0]):.0%} to {_mass(kept[-1]):.0%}); the answered ones at most {answered[-1]:+.2f}. The score "
        f"tells them apart with AUROC {out['auroc_fresh']:.3f}.",
        f"- {reach} of the {len(scores['train'])} training prompts score at least {kept[0]:+.2f} with DIM ablated: "
        + ("the fresh refusals' range is one the training prompts reach, so a loss on the training prompts' first-token refusal "
           "score (`OptimizeConfig.refusal_weight`) pushes on it." if reach else
           "the fresh refusals lie above every training prompt, out of a training-prompt loss's reach."), "",
    ])


if __name__ == "__main__":
    main()
