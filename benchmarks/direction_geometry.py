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
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import prompt_sets, qwen_gguf  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    from featsteer.datasets import load_prompts
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig, find_refusal_direction

    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=["qwen", "organism"], default="organism")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=15, help="tokens per side of the logit lens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    qwen = args.target == "qwen"
    sets = prompt_sets(args.target)
    start = time.perf_counter()
    model = load_model(str(qwen_gguf()) if qwen else "organism", dtype="bfloat16" if qwen else "float32")
    if qwen:
        config, val = DirectionConfig(n_select=16, screen=16), None
    else:
        config = DirectionConfig(n_select=32)
        val = (load_prompts("organism-corpus:harmful:96"), load_prompts("organism-corpus:harmless:96"))
    result = find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"], config, val=val, keep_activations=True)
    geometry = result.geometry(model, k=args.k)
    seconds = time.perf_counter() - start
    name = f"direction_geometry_{args.target}"
    header = (f"Measured by `benchmarks/direction_geometry.py --target {args.target}` on {time.strftime('%Y-%m-%d')} "
              f"({model.name}, {model.dtype}; {seconds:.0f} s with the direction selection). Class means are over the "
              f"training prompts ({len(result.train[0])} harmful, {len(result.train[1])} harmless) at the chosen position.\n\n")
    markdown = geometry.markdown()
    title, _, body = markdown.partition("\n")
    (RESULTS / f"{name}.md").write_text(f"{title}\n\n{header}{body.lstrip()}")
    (RESULTS / f"{name}.json").write_text(json.dumps({"model": model.name, "seconds": round(seconds, 1), **geometry.to_dict()}, indent=1))
    geometry.plot(RESULTS / f"{name}.png")
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
