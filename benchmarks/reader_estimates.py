"""How well one gradient pass estimates the read-side ablation's per-block rows (`direction_readers(per_layer="estimate")`).

    python benchmarks/reader_estimates.py --target organism   # seconds
    python benchmarks/reader_estimates.py --target qwen       # about 12 minutes (bfloat16)

A DIM direction (last token, `blocks.2` for the organism, `blocks.16` for Qwen, from 192 training prompts per class),
then `direction_readers` on 32 further prompts per class twice: with the per-block rows only estimated, and exactly with
the estimates alongside. Writes `results/reader_estimates_<target>.{md,json}`: both tables, the wall time of each run, and
the Spearman correlation between the exact and the estimated per-block shares.
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

from abliteration import prompt_sets, qwen_gguf  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    from scipy.stats import spearmanr

    from featsteer.activations import capture
    from featsteer.directions import difference_in_means
    from featsteer.directions.readers import direction_readers
    from featsteer.models import load_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=["qwen", "organism"], default="organism")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    qwen = args.target == "qwen"
    sets = prompt_sets(args.target)
    model = load_model(str(qwen_gguf()) if qwen else "organism", dtype="bfloat16" if qwen else "float32")
    hook = "blocks.16.hook_resid_pre" if qwen else "blocks.2.hook_resid_pre"
    acts = [capture(model, sets[name].head(192), [hook], positions="last", progress=False) for name in ("train_harmful", "train_harmless")]
    r = difference_in_means(*acts, [hook]).direction(hook, -1)
    harmful, harmless = (list(sets[name])[192:224] for name in ("train_harmful", "train_harmless"))
    start = time.perf_counter()
    estimated = direction_readers(model, r, harmful, harmless, per_layer="estimate")
    seconds_estimate = time.perf_counter() - start
    start = time.perf_counter()
    full = direction_readers(model, r, harmful, harmless, estimate=True)
    seconds_full = time.perf_counter() - start
    blocks = [row for row in full.rows if row.readers.startswith("blocks.")]
    exact, guess = [full.share(row) for row in blocks], [full.estimated_share(row) for row in blocks]
    rho = float(spearmanr(exact, guess).statistic)
    top = lambda values: [row.readers for _, row in sorted(zip(values, blocks, strict=True), key=lambda p: -p[0])[:5]]  # noqa: E731
    out = {"target": args.target, "model": model.name, "dtype": str(model.dtype), "hook": hook, "date": time.strftime("%Y-%m-%d"),
           "seconds_estimate_mode": round(seconds_estimate, 1), "seconds_exact_with_estimates": round(seconds_full, 1),
           "spearman_per_block": rho, "top_exact": top(exact), "top_estimated": top(guess),
           "estimate_mode": estimated.to_dict(), "exact": full.to_dict()}
    name = f"reader_estimates_{args.target}"
    lines = [f"# Read-side ablation: exact per-block rows against one gradient pass ({args.target})", "",
             f"Measured by `benchmarks/reader_estimates.py --target {args.target}` on {out['date']} ({model.name}, {model.dtype}, "
             f"{args.threads} threads). DIM direction at `{hook}` (last token, 192 training prompts per class); readers on the next "
             f"32 prompts per class.", "",
             f"- `per_layer=\"estimate\"` (6 exact conditions and one gradient pass): {seconds_estimate:.0f} s; every per-block row exact "
             f"with the estimates alongside: {seconds_full:.0f} s.",
             f"- Spearman correlation of the exact and the estimated per-block shares: {rho:.3f} over {len(blocks)} block inputs.",
             f"- The five block inputs with the largest exact share: {', '.join(out['top_exact'])}; by the estimate: "
             f"{', '.join(out['top_estimated'])}.", "", full.markdown(), ""]
    write_files(RESULTS, {f"{name}.json": json_text(out, indent=1), f"{name}.md": "\n".join(lines)})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
