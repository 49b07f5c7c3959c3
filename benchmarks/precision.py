"""What running a real model in bfloat16 or float16 instead of float32 costs and saves, on CPU.

    python benchmarks/precision.py                      # writes benchmarks/results/precision_qwen.{json,md}

Needs `../shared/models/fetch_real_models.sh qwen` and `../shared/data`. Each dtype runs in its own process
(so its memory figures are its own) on Qwen2.5-Coder-0.5B-Instruct with 2 threads:

- speed: load time, resident memory after loading, one prefill of 32 held-out harmless prompts, and greedy
  generation of 16 tokens for 16 of them;
- quality (the dtypes in `--full`): refusal on the 100 + 100 held-out prompts of `abliteration.py --target qwen`,
  the first-token KL of the dtype's harmless distribution against float32's, the DIM direction at
  `blocks.16.hook_resid_pre` (last token, 256 + 256 training prompts; the Arditi choice in `real_model.py`) and
  its cosine with float32's, and DIM abliteration with the dtype's own direction (harmful refusal, KL against
  the same dtype's unedited model).

Targets are not set by an issue; the figures tell a user which `--dtype` to pick.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import fmt, prompt_sets, qwen_gguf, real_data  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HOOK = "blocks.16.hook_resid_pre"


def _memory() -> dict[str, float]:
    """Resident and peak resident memory of this process, GiB (Linux /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 2**20, 2)
    return {"rss_gib": fields.get("VmRSS", float("nan")), "peak_rss_gib": fields.get("VmHWM", float("nan"))}


def worker(dtype: str, work: Path, full: bool, n_eval: int, n_train: int) -> None:
    from featsteer.activations import capture
    from featsteer.directions import difference_in_means
    from featsteer.edits import apply_edit
    from featsteer.evaluation import KLBase
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set
    from featsteer.evaluation.metrics import first_token_logprobs
    from featsteer.evaluation.refusal import RefusalDetector
    from featsteer.models import load_model

    torch.set_num_threads(2)
    out: dict = {"dtype": dtype, "seconds": {}}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        out["seconds"][name] = round(time.perf_counter() - start, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {dtype} {name}: {out['seconds'][name]:.0f}s", flush=True)
        return value

    model = timed("load", lambda: load_model(str(qwen_gguf()), dtype=dtype))
    sets = prompt_sets("qwen")
    probe = sets["eval_harmless"].to_list()[:32]
    timed("prefill_32", lambda: model.logits(probe))
    timed("generate_16x16", lambda: model.generate(probe[:16], max_new_tokens=16, batch_size=16))
    out["after_speed"] = _memory()  # after the weights have been read (a float32 checkpoint is memory-mapped until then)
    if full:
        gen = GenerationConfig(max_new_tokens=32, batch_size=64)
        detector = RefusalDetector()
        harmful = timed("eval_harmful", lambda: evaluate_set(model, sets["eval_harmful"][:n_eval], "harmful", gen, detector))
        harmless = timed("eval_harmless", lambda: evaluate_set(model, sets["eval_harmless"][:n_eval], "harmless", gen, detector,
                                                               keep_logprobs=True))
        out["refused_harmful"], out["refused_harmless"] = list(harmful.refused), list(harmless.refused)
        torch.save(harmless.first_logprobs, work / f"{dtype}_logprobs.pt")
        acts = timed("capture", lambda: [capture(model, sets[key][:n_train], [HOOK], positions="last", batch_size=16, progress=False)
                                             for key in ("train_harmful", "train_harmless")])
        direction = difference_in_means(*acts).direction(HOOK)
        torch.save(direction, work / f"{dtype}_direction.pt")
        base = KLBase(harmless.first_logprobs, harmless.refused)

        def abliterated():
            with apply_edit(model, direction):
                edited = evaluate_set(model, sets["eval_harmful"][:n_eval], "harmful", gen, detector)
                logprobs = first_token_logprobs(model, sets["eval_harmless"].to_list()[:n_eval], batch_size=16)
            return edited, logprobs

        edited, logprobs = timed("abliterated_eval", abliterated)
        out["abliterated_refused_harmful"] = sum(edited.refused)
        out["abliterated_kl"], out["abliterated_kl_answered"] = base.kls(logprobs)
    out["end"] = _memory()
    (work / f"{dtype}.json").write_text(json_text(out, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--full", default="float32,bfloat16", help="dtypes that also run the quality stages (float32 always does)")
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=256, help="training prompts per set for the DIM direction")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "featsteer" / "bench" / "precision")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-full", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from featsteer.evaluation.metrics import kl_first_token

    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.worker, args.work, args.worker_full, args.n_eval, args.n_train)
        return
    qwen_gguf(), real_data()  # one line now, not a worker's traceback later
    dtypes = args.dtypes.split(",")
    full = set(args.full.split(",")) | {"float32"}
    for dtype in dtypes:
        cmd = [sys.executable, __file__, "--worker", dtype, "--work", str(args.work), "--n-eval", str(args.n_eval), "--n-train", str(args.n_train)]
        subprocess.run(cmd + (["--worker-full"] if dtype in full else []), check=True)
    runs = {dtype: json.loads((args.work / f"{dtype}.json").read_text()) for dtype in dtypes}
    reference = runs["float32"]
    ref_logprobs = torch.load(args.work / "float32_logprobs.pt")
    ref_direction = torch.load(args.work / "float32_direction.pt").double()
    for dtype, run in runs.items():
        if "refused_harmful" not in run:
            continue
        logprobs = torch.load(args.work / f"{dtype}_logprobs.pt")
        direction = torch.load(args.work / f"{dtype}_direction.pt").double()
        run["kl_vs_float32"] = kl_first_token(ref_logprobs, logprobs)
        run["direction_cosine_vs_float32"] = float(direction @ ref_direction / (direction.norm() * ref_direction.norm()))
        run["flips_vs_float32"] = sum(a != b for key in ("refused_harmful", "refused_harmless")
                                      for a, b in zip(run[key], reference[key], strict=True))
    payload = {"model": qwen_gguf().name, "date": time.strftime("%Y-%m-%d"), "threads": 2, "n_eval": args.n_eval, "n_train": args.n_train,
               "runs": runs}
    write_files(RESULTS, {"precision_qwen.json": json_text(payload, indent=1), "precision_qwen.md": render(payload)})
    print(render(payload))


def render(payload: dict) -> str:
    runs = payload["runs"]
    n = payload["n_eval"]
    lines = [
        f"# Model dtype on CPU: {payload['model']}",
        "",
        f"Measured {payload['date']} by `benchmarks/precision.py` (2 threads, one process per dtype, AMD EPYC with AVX-512 BF16).",
        "",
        "| dtype | load (s) | resident after the speed runs (GiB) | peak resident, whole run (GiB) | prefill, 32 prompts (s) | generate 16 x 16 tokens (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for dtype, run in runs.items():
        s = run["seconds"]
        lines.append(f"| {dtype} | {s['load']:.1f} | {fmt(run['after_speed']['rss_gib'], '.2f')} | {fmt(run['end']['peak_rss_gib'], '.2f')} | "
                     f"{s['prefill_32']:.1f} | {s['generate_16x16']:.1f} |")
    lines += [
        "",
        f"Quality, {n} held-out AdvBench and {n} held-out MT-Bench+IFBench prompts, greedy, 32 new tokens; DIM at `{HOOK}` "
        "(last token) from 256 + 256 training prompts, abliterated with each dtype's own direction:",
        "",
        "| dtype | harmful refused | harmless refused | responses flipped vs float32 | first-token KL vs float32 | DIM cosine vs float32 "
        "| abliterated: harmful refused | abliterated: KL (answered) | eval + capture + abliterated (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, run in runs.items():
        if "refused_harmful" not in run:
            continue
        s = run["seconds"]
        busy = s["eval_harmful"] + s["eval_harmless"] + s["capture"] + s["abliterated_eval"]
        lines.append(
            f"| {dtype} | {sum(run['refused_harmful'])}/{n} | {sum(run['refused_harmless'])}/{n} | {run['flips_vs_float32']} "
            f"| {fmt(run['kl_vs_float32'], '.4f')} | {run['direction_cosine_vs_float32']:.5f} | {run['abliterated_refused_harmful']}/{n} "
            f"| {fmt(run['abliterated_kl'], '.4f')} ({fmt(run['abliterated_kl_answered'], '.4f')}) | {busy:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
