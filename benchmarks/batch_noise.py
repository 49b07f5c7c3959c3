"""How much of a refusal count is the arithmetic: the same model, prompts and edit under other batch sizes,
thread counts and dtypes.

    python benchmarks/batch_noise.py          # writes benchmarks/results/batch_noise_qwen.{json,md}

Needs `../shared/models/fetch_real_models.sh qwen` and `../shared/data`. A CPU's matrix kernels sum in an order
that depends on the matrix shapes and the thread count, so a prompt's logits change in their last bits when it
shares a batch with other prompts (its padding and its neighbours change the shapes) or runs on another number of
threads. In float32 the change is about 1e-6; in bfloat16, with 8 bits of mantissa, it is large enough to flip a
greedy token now and then, and one flipped token can turn a refusal into an answer. This benchmark measures how
often, so that a difference between two methods can be read against it.

Each setting runs in its own process on Qwen2.5-Coder-0.5B-Instruct: greedy decoding (32 new tokens) of the 100
held-out AdvBench and 100 held-out MT-Bench+IFBench prompts of `abliteration.py --target qwen`, unedited, then
the 100 harmful prompts again after DIM abliteration with one fixed direction (float32 DIM at
`blocks.16.hook_resid_pre`, last token, 256 + 256 training prompts; computed once and cached in the work folder),
so every setting edits with the same vector. Responses are compared with the reference setting's, prompt by
prompt: how many texts differ at all, and how many refusal verdicts flip.
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

from abliteration import prompt_sets, qwen_gguf, real_data  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HOOK = "blocks.16.hook_resid_pre"
# name: (dtype, threads, batch_size, max_batch_tokens); the first is the reference.
SETTINGS = {
    "float32_b64_t2": ("float32", 2, 64, 8192),
    "float32_b16_t2": ("float32", 2, 16, 8192),
    "bfloat16_b64_t2": ("bfloat16", 2, 64, 8192),
    "bfloat16_b16_t2": ("bfloat16", 2, 16, 8192),
    "bfloat16_b64_t1": ("bfloat16", 1, 64, 8192),
}


def direction(work: Path, n_train: int) -> None:
    """The fixed float32 DIM direction every setting abliterates with."""
    from featsteer.activations import capture
    from featsteer.directions import difference_in_means
    from featsteer.models import load_model

    torch.set_num_threads(2)
    model = load_model(str(qwen_gguf()), dtype="float32")
    sets = prompt_sets("qwen")
    acts = [capture(model, sets[key][:n_train], [HOOK], positions="last", batch_size=16, progress=False)
            for key in ("train_harmful", "train_harmless")]
    torch.save(difference_in_means(*acts).direction(HOOK).float(), work / "direction.pt")


def worker(name: str, work: Path, n_eval: int) -> None:
    from featsteer.edits import apply_edit
    from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set
    from featsteer.evaluation.refusal import RefusalDetector
    from featsteer.models import load_model

    dtype, threads, batch_size, max_batch_tokens = SETTINGS[name]
    torch.set_num_threads(threads)
    model = load_model(str(qwen_gguf()), dtype=dtype)
    sets = prompt_sets("qwen")
    gen = GenerationConfig(max_new_tokens=32, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    detector = RefusalDetector()
    out: dict = {"setting": name, "dtype": dtype, "threads": threads, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens}
    start = time.perf_counter()
    for key, label in (("eval_harmful", "harmful"), ("eval_harmless", "harmless")):
        result = evaluate_set(model, sets[key][:n_eval], label, gen, detector)
        out[label] = {"responses": list(result.responses), "refused": list(result.refused)}
    with apply_edit(model, torch.load(work / "direction.pt")):
        result = evaluate_set(model, sets["eval_harmful"][:n_eval], "harmful", gen, detector)
    out["abliterated_harmful"] = {"responses": list(result.responses), "refused": list(result.refused)}
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {out['seconds']:.0f}s", flush=True)
    (work / f"{name}.json").write_text(json_text(out, indent=1))


def compare_runs(runs: dict[str, dict]) -> dict:
    """Per setting and prompt set: refused count, and the texts that differ and verdicts that flip against the
    reference (the first setting) and against the first setting of the same dtype."""
    reference = next(iter(runs.values()))
    first_of = {}
    for run in runs.values():
        first_of.setdefault(run["dtype"], run)

    def differences(ours: dict, ref: dict) -> dict:
        return {"texts_differ": sum(a != b for a, b in zip(ours["responses"], ref["responses"], strict=True)),
                "verdicts_flip": sum(a != b for a, b in zip(ours["refused"], ref["refused"], strict=True))}

    table = {}
    for name, run in runs.items():
        table[name] = {key: {"refused": sum(run[key]["refused"]), **differences(run[key], reference[key]),
                             "same_dtype": {"against": first_of[run["dtype"]]["setting"], **differences(run[key], first_of[run["dtype"]][key])}}
                       for key in ("harmful", "harmless", "abliterated_harmful")}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list; the first is the reference")
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "featsteer" / "bench" / "batch_noise")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--direction-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.direction_only:
        direction(args.work, args.n_train)
        return
    if args.worker:
        worker(args.worker, args.work, args.n_eval)
        return
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"error: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    qwen_gguf(), real_data()  # one line now, not a worker's traceback later
    if not (args.work / "direction.pt").exists():
        subprocess.run([sys.executable, __file__, "--direction-only", "--work", str(args.work), "--n-train", str(args.n_train)], check=True)
    for name in names:
        if not (args.work / f"{name}.json").exists():
            subprocess.run([sys.executable, __file__, "--worker", name, "--work", str(args.work), "--n-eval", str(args.n_eval)], check=True)
    runs = {name: json.loads((args.work / f"{name}.json").read_text()) for name in names}
    payload = {"model": qwen_gguf().name, "date": time.strftime("%Y-%m-%d"), "n_eval": args.n_eval, "n_train": args.n_train,
               "reference": names[0], "settings": {n: {k: runs[n][k] for k in ("dtype", "threads", "batch_size", "max_batch_tokens", "seconds")}
                                                   for n in names},
               "table": compare_runs(runs)}
    write_files(RESULTS, {"batch_noise_qwen.json": json_text(payload, indent=1), "batch_noise_qwen.md": render(payload)})
    print(render(payload))


def render(payload: dict) -> str:
    n = payload["n_eval"]
    lines = [
        f"# Batch, thread and dtype noise in refusal counts: {payload['model']}",
        "",
        f"Measured {payload['date']} by `benchmarks/batch_noise.py`: greedy, 32 new tokens, {n} held-out AdvBench and {n} held-out "
        f"MT-Bench+IFBench prompts; abliterated = DIM abliteration with one fixed float32 direction at `{HOOK}`. "
        f"Each cell: refused / responses whose text differs from `{payload['reference']}` / refusal verdicts that flip against it.",
        "",
        "| setting | dtype | threads | batch (token cap) | harmful | harmless | abliterated harmful | seconds |",
        "|---|---|---:|---|---|---|---|---:|",
    ]
    keys = ("harmful", "harmless", "abliterated_harmful")
    for name, row in payload["table"].items():
        s = payload["settings"][name]
        cap = s["max_batch_tokens"] or "none"
        cells = [f"{row[k]['refused']}/{n} / {row[k]['texts_differ']} / {row[k]['verdicts_flip']}" for k in keys]
        lines.append(f"| {name} | {s['dtype']} | {s['threads']} | {s['batch_size']} ({cap}) | {' | '.join(cells)} | {s['seconds']:.0f} |")
    lines += ["", "Within a dtype (each cell: texts that differ / verdicts that flip against the first setting of the same dtype):", "",
              "| setting | against | harmful | harmless | abliterated harmful |", "|---|---|---|---|---|"]
    for name, row in payload["table"].items():
        same = [row[k]["same_dtype"] for k in keys]
        if same[0]["against"] != name:
            lines.append(f"| {name} | {same[0]['against']} | " + " | ".join(f"{c['texts_differ']} / {c['verdicts_flip']}" for c in same) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
