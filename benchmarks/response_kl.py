"""First-token KL against the KL along the unedited model's own responses, for every jailbreak method.

    python benchmarks/response_kl.py --target organism   # benchmarks/results/response_kl_organism.{json,md,png}
    python benchmarks/response_kl.py --target qwen       # Qwen2.5-Coder-0.5B-Instruct: response_kl_qwen.{json,md,png}

The first-token KL on harmless prompts is the side-effect measure of Arditi et al. and heretic, and `featsteer compare`
ranks methods by it. A method that keeps the first token and changes what follows is invisible to it. `compare` now
also measures KL(base || method) at every position of the unedited model's greedy harmless responses, teacher-forced
into both models (`featsteer.evaluation.response_kl`). This benchmark runs the jailbreak methods through one `compare`
call and puts the two measures side by side: per method the mean over positions, the curve by position, and the
rank each measure gives. With `--exact-check` it also measures how much keeping only the base's top k tokens
hides, against the exact KL over the whole vocabulary.

Prompts, selection and picks are `steering_methods.py`'s (organism: built-in train+val, fresh generated validation
prompts, the built-in test split; Qwen: 256 + 256 AdvBench / MT-Bench+IFBench training prompts, 100 + 100 held out, in
bfloat16 with a screened selection).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import fmt, prompt_sets, qwen_gguf  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ["none", "dim_abliteration", "dim_per_layer_abliteration", "dim_ace_hook", "dim_angular_hook", "dim_angular_norms_hook", "leace_hook"]
SAE_METHODS = ["sae_top1_abliteration", "sae_clamp_hook"]
BUCKETS = ((0, 1), (1, 4), (4, 12), (12, 32))
"""Position ranges of the per-position table: the first token, the next three, then the rest in two parts."""


def main() -> None:
    from featsteer.compare import SteeringMethodConfig, compare
    from featsteer.datasets import load_prompts
    from featsteer.evaluation.behaviour import GenerationConfig
    from featsteer.models import load_model
    from featsteer.pipeline import DirectionConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=["qwen", "organism"], default="organism")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--methods", help="comma list of compare methods (default: the DIM jailbreaks, LEACE, and the organism's SAE methods)")
    parser.add_argument("--exact-check", action="store_true", help="also measure DIM abliteration's response KL over the whole vocabulary")
    parser.add_argument("--exact-n", type=int, help="evaluation prompts the exact check reads (default: all on the organism, 16 on Qwen)")
    parser.add_argument("--pick-kl", choices=("first", "response"), default="first",
                        help="the KL the validation picks weigh settings by (compare --pick-kl); response writes response_kl_<target>_pick_response")
    parser.add_argument("--render-only", action="store_true", help="re-write the markdown and plot from the results JSON")
    args = parser.parse_args()
    name = f"response_kl_{args.target}" + ("_pick_response" if args.pick_kl == "response" else "")
    if args.render_only:
        out = json.loads((RESULTS / f"{name}.json").read_text())
        write_files(RESULTS, {f"{name}.md": render(out), f"{name}.png": plot(out)})
        return
    torch.set_num_threads(args.threads)
    qwen = args.target == "qwen"
    dtype = "bfloat16" if qwen else "float32"
    sets = prompt_sets(args.target)
    start = time.perf_counter()
    model = load_model(str(qwen_gguf()) if qwen else "organism", dtype=dtype)
    if qwen:
        # the picks (generated at the direction config's batch size) and the rows at one batch size: in bfloat16 a
        # batch's padding can change a greedy answer
        config = DirectionConfig(n_select=16, screen=16, batch_size=64)
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=64, max_batch_tokens=8192)
        extra = {}
    else:
        config = DirectionConfig(n_select=32)
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
        extra = {"val_harmful": load_prompts("organism-corpus:harmful:96"), "val_harmless": load_prompts("organism-corpus:harmless:96"),
                 "saes": "organism"}
    methods = args.methods.split(",") if args.methods else METHODS + ([] if qwen else SAE_METHODS)
    if "saes" in extra and not any(m.startswith("sae_") for m in methods):
        extra.pop("saes")
    run = compare(model, sets["train_harmful"], sets["train_harmless"], methods=methods, eval_harmful=sets["eval_harmful"],
                  eval_harmless=sets["eval_harmless"], direction_config=config, generation=gen, steering_config=SteeringMethodConfig(),
                  pick_kl=args.pick_kl, **extra)
    out = {"target": args.target, "date": time.strftime("%Y-%m-%d"), "model": model.name, "dtype": dtype, "threads": args.threads,
           "response_scoring": RESPONSE_SCORING,
           "seconds_total": round(time.perf_counter() - start, 1), "setup": run.setup, "results": [asdict(r) for r in run.results]}
    if args.exact_check:
        out["exact_check"] = exact_check(run, gen, sets["eval_harmless"], args.exact_n or (16 if qwen else None))
    write_files(RESULTS, {f"{name}.json": json_text(out, indent=1, default=str), f"{name}.md": render(out), f"{name}.png": plot(out)})
    print(render(out))


def exact_check(run, gen, eval_harmless, n_prompts: int | None) -> dict:
    """DIM abliteration's response KL with the base's top 64, 256 and 1,024 tokens kept, against the whole vocabulary,
    on the first `n_prompts` evaluation prompts (None: all; the exact base costs positions x vocab floats)."""
    from featsteer.compare import method_context
    from featsteer.evaluation.behaviour import evaluate_set
    from featsteer.evaluation.refusal import RefusalDetector
    from featsteer.evaluation.response_kl import response_base, response_kl

    ctx = run.context
    prompts = eval_harmless if n_prompts is None else eval_harmless.head(n_prompts)
    base_set = evaluate_set(ctx.model, prompts, "harmless", gen, RefusalDetector())
    ks = (64, 256, 1024, None)
    bases = {k: response_base(ctx.model, list(base_set.prompts), list(base_set.response_tokens), max_tokens=gen.max_new_tokens, top_k=k)
             for k in ks}
    with method_context(ctx, "dim_abliteration"):
        kls = {k: response_kl(ctx.model, base) for k, base in bases.items()}
    exact = kls[None]
    return {"n_prompts": len(prompts), "exact": exact.mean,
            "rows": [{"top_k": k, "kl": kls[k].mean, "tail_mass": bases[k].tail_mass,
                      "max_per_prompt_gap": float((exact.per_prompt - kls[k].per_prompt).max())} for k in ks if k is not None]}


def _rank(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0] * len(values)
    for rank, i in enumerate(order, 1):
        ranks[i] = rank
    return ranks


RESPONSE_SCORING = "generated token ids, end-of-turn position scored"
"""What the KL along the responses reads; results without it re-tokenized the decoded text and never scored the end of the
turn (the protocol before 2026-12-07)."""


def _protocol_notes(out: dict) -> str:
    """Sentences saying how a recorded run differs from what the script does now (empty for a current run)."""
    setup, notes = out["setup"], []
    if out.get("response_scoring") != RESPONSE_SCORING:
        notes.append("Old protocol: the KL along the responses (and the exact check) read the unedited model's answers "
                     "re-tokenized from their decoded text, without the end-of-turn position; the script now reads the token "
                     "ids it generated and scores the end of the turn.")
    picks, rows = setup["directions"].get("batch_size"), setup["generation"].get("batch_size")
    if picks is not None and rows is not None and picks != rows:
        notes.append(f"Old protocol: the validation picks were generated {picks} prompts a batch and the rows {rows}; in "
                     "bfloat16 a batch's padding can change a greedy answer. The script now uses one batch size.")
    return "".join(" " + note for note in notes)


def render(out: dict) -> str:
    setup = out["setup"]
    nh, nl = setup["n_eval_harmful"], setup["n_eval_harmless"]
    results = [r for r in out["results"] if r["kl_response_harmless"] is not None]
    jail = [r for r in results if r["method"] != "none"]
    first_rank = dict(zip([r["method"] for r in jail], _rank([r["kl_harmless"] for r in jail]), strict=True))
    response_rank = dict(zip([r["method"] for r in jail], _rank([r["kl_response_harmless"] for r in jail]), strict=True))
    rkl = setup.get("response_kl", {})
    lines = [f"# First-token KL vs KL along the responses: {out['target']} ({out['dtype']}, {out['threads']} threads)", "",
             f"Measured by `benchmarks/response_kl.py --target {out['target']}"
             + (" --pick-kl response" if setup.get("pick_kl") == "response" else "") + f"` on {out['date']}. {nh} held-out harmful and {nl} held-out "
             f"harmless prompts, greedy decoding, {setup['generation']['max_new_tokens']} new tokens. DIM direction: "
             f"{setup['chosen']['dim']['hook']} position {setup['chosen']['dim']['position']}; every setting picked on validation prompts "
             f"by the {'KL along the answers' if setup.get('pick_kl') == 'response' else 'first-token KL'}. "
             f"KL response: KL(base || method) at each of the first {rkl.get('max_tokens')} positions of the unedited model's greedy "
             f"harmless responses ({rkl.get('positions')} positions in all), teacher-forced into both models, averaged per prompt and then "
             f"over prompts; the base keeps its top {rkl.get('top_k')} tokens per position and lumps the rest (mean lumped mass "
             f"{fmt(rkl.get('base_tail_mass'), '.2g')}). Total {out['seconds_total']:.0f} s." + _protocol_notes(out), "",
             "| method | setting | refused harmful | KL first token (all / answered) | KL response (all / answered) | rank: first token / response |",
             "|---|---|---|---|---|---|"]
    for r in results:
        rank = "-" if r["method"] == "none" else f"{first_rank[r['method']]} / {response_rank[r['method']]}"
        answered = "-" if r["kl_harmless_answered"] is None else f"{r['kl_harmless_answered']:.4f}"
        response_answered = "-" if r["kl_response_harmless_answered"] is None else f"{r['kl_response_harmless_answered']:.4f}"
        lines.append(f"| {r['method']} | {r['details'].get('setting', '-')} | {round(r['refusal_harmful'] * nh)}/{nh} | "
                     f"{fmt(r['kl_harmless'], '.4f')} / {answered} | {fmt(r['kl_response_harmless'], '.4f')} / {response_answered} | {rank} |")
    heads = " | ".join(f"position {a}" if b == a + 1 else f"positions {a}-{b - 1}" for a, b in BUCKETS)
    lines += ["", "Mean KL by position of the response (over the prompts whose base response reaches it):", "",
              f"| method | {heads} |", "|---|" + "---|" * len(BUCKETS)]
    for r in results:
        curve = r["kl_response_by_position"]
        cells = []
        for a, b in BUCKETS:
            part = curve[a:b]
            cells.append("-" if not part else f"{sum(part) / len(part):.4f}")
        lines.append(f"| {r['method']} | {' | '.join(cells)} |")
    paired = [r for r in results if r.get("paired") and r["paired"].get("kl_response_harmless")]
    if paired:
        lines += ["", f"Paired with {paired[0]['paired']['baseline']} on the same prompts (mean per-prompt difference, 95% bootstrap interval):", "",
                  "| method | KL first token difference | KL response difference |", "|---|---|---|"]
        for r in paired:
            cells = []
            for key in ("kl_harmless", "kl_response_harmless"):
                d = r["paired"].get(key)
                cells.append("-" if d is None else f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]")
            lines.append(f"| {r['method']} | {' | '.join(cells)} |")
    if "exact_check" in out:
        e = out["exact_check"]
        lines += ["", f"Truncation check: DIM abliteration's response KL on the first {e['n_prompts']} harmless prompts, with the base's "
                  f"top k tokens per position kept and the rest lumped, against the whole vocabulary ({e['exact']:.6f}):", "",
                  "| top k | KL response | share of the exact | largest per-prompt gap | base mass outside the top k |", "|---|---|---|---|---|"]
        for row in e["rows"]:
            share = row["kl"] / e["exact"] if e["exact"] > 0 else float("nan")
            lines.append(f"| {row['top_k']} | {row['kl']:.6f} | {share:.3f} | {row['max_per_prompt_gap']:.2g} | {row['tail_mass']:.2g} |")
    return "\n".join(lines) + "\n"


def plot(out: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in out["results"]:
        if r["method"] == "none" or not r.get("kl_response_by_position"):
            continue
        curve = r["kl_response_by_position"]
        ax.plot(range(len(curve)), curve, marker=".", label=r["method"])
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("position in the unedited model's harmless response (0 = first token)")
    ax.set_ylabel("mean KL(base || method), nats")
    ax.set_title(f"{out['target']}: where along the response each method costs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
