"""Memory and time of a weight edit: what `apply_edit` adds to the process on top of the loaded model.

    python benchmarks/edit_memory.py                      # Qwen2.5-Coder-0.5B-Instruct (GGUF), float32
    python benchmarks/edit_memory.py --model tiny:llama   # any featsteer model spec

Each measurement runs in a fresh child process (peak resident memory only ever grows, so one process per figure):
load the model, note the peak resident set size, apply DIM-style abliteration against a seeded random unit direction
(what the direction is does not change the cost), note the peak again, revert, and check the weights are bit-identical
to the originals. The figure that matters is the peak added by the edit against the size of the weights it touches
(every residual writer: embedding, attention and MLP output projections, and on MoE models every expert's). An edit
that can revert must keep one copy of those weights; anything above one copy is overhead.
Writes `benchmarks/results/edit_memory.{json,md}` (rows of earlier runs with another label are kept).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: str, mode: str, trials: int) -> dict:
    import torch

    from featsteer.datasets import builtin_prompts
    from featsteer.edits import EditConfig, apply_edit
    from featsteer.evaluation.metrics import first_token_logprobs
    from featsteer.models import load_model
    from featsteer.testing import random_direction

    torch.set_num_threads(2)
    model = load_model(spec)
    loaded = peak_mib()
    writers = model.residual_writers()
    touched = sum(weight.numel() * weight.element_size() for weight, _ in (w.read() for w in writers)) / 2**20
    before = {name: p.detach().clone() for name, p in model.model.named_parameters()}
    after_snapshot = peak_mib()  # the snapshot for the bit-identity check is not the edit's cost: measured from here
    start = time.perf_counter()
    handle = apply_edit(model, random_direction(model.d_model), EditConfig(mode=mode))
    edit_s = time.perf_counter() - start
    edited = peak_mib()
    start = time.perf_counter()
    handle.revert()
    revert_s = time.perf_counter() - start
    identical = all(torch.equal(before[name], p) for name, p in model.model.named_parameters())
    # what one search trial costs: apply, first-token logits on 32 + 32 validation-sized prompts, revert
    prompts = list(builtin_prompts("harmful", "val").head(32)) + list(builtin_prompts("harmless", "val").head(32))
    trial_s = []
    for _ in range(trials):
        start = time.perf_counter()
        with apply_edit(model, random_direction(model.d_model), EditConfig(mode=mode)):
            first_token_logprobs(model, prompts, batch_size=16)
        trial_s.append(time.perf_counter() - start)
    return {"model": spec, "mode": mode, "writers": len(writers), "touched_mib": touched, "loaded_peak_mib": loaded,
            "edit_added_mib": edited - after_snapshot, "edit_s": edit_s, "revert_s": revert_s, "bit_identical_after_revert": identical,
            "trial_s": sorted(trial_s)[len(trial_s) // 2] if trial_s else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: the Qwen2.5-Coder-0.5B GGUF)")
    parser.add_argument("--modes", default="orthogonalize,norm_preserving")
    parser.add_argument("--label", default="current", help="name of this code version in the results table")
    parser.add_argument("--trials", type=int, default=3, help="search-trial timings per mode (median reported; 0 skips)")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.trials)))
        return
    from featsteer.files import json_text, write_files

    if args.model is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from abliteration import qwen_gguf

        args.model = str(qwen_gguf())
    rows = []
    for mode in args.modes.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", args.model, mode, "--trials", str(args.trials)],
                              capture_output=True, text=True, check=True)
        rows.append({"label": args.label, **json.loads(done.stdout.strip().splitlines()[-1])})
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "edit_memory.json"
    kept = [row for row in (json.loads(path.read_text())["rows"] if path.is_file() else []) if row["label"] != args.label]
    rows = kept + rows
    lines = ["# Memory and time of a weight edit (`benchmarks/edit_memory.py`)", "",
             f"Measured {time.strftime('%Y-%m-%d')}, CPU, 2 threads, one child process per row. `added` is the peak resident "
             "memory the edit adds; `touched` the size of the weights it edits (one copy is kept for revert). `trial` is the median "
             "of a search trial's cost: apply, first-token logits on 32 + 32 built-in val prompts, revert.", "",
             "| code | model | mode | writers | touched (MiB) | added by the edit (MiB) | added / touched | edit (s) | revert (s) | bit-identical after revert | trial (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        lines.append(f"| {row['label']} | `{Path(row['model']).name}` | {row['mode']} | {row['writers']} | {row['touched_mib']:.0f} | "
                     f"{row['edit_added_mib']:.0f} | {row['edit_added_mib'] / row['touched_mib']:.2f} | {row['edit_s']:.2f} | "
                     f"{row['revert_s']:.2f} | {row['bit_identical_after_revert']} | "
                     f"{'-' if row.get('trial_s') is None else format(row['trial_s'], '.2f')} |")
    write_files(RESULTS, {path.name: json_text({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1),
                          "edit_memory.md": "\n".join(lines) + "\n"})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
