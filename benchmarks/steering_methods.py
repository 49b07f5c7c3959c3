"""Affine concept editing (ACE) and angular steering against DIM abliteration, on the same prompts and metrics.

    python benchmarks/steering_methods.py                   # Qwen2.5-Coder-0.5B-Instruct: benchmarks/results/steering_methods_qwen.{json,md}
    python benchmarks/steering_methods.py --target organism # the embedded organism: steering_methods_organism.{json,md}

Needs `../shared/models/fetch_real_models.sh qwen` and `../shared/data` for Qwen. One `featsteer.compare` call runs
the unedited model, DIM abliteration (the baseline), the DIM ablation hook, `dim_ace_hook`, `dim_angular_hook` (the
residual stream turned at each layer's input), `dim_angular_norms_hook` (each block's normalised attention and MLP
inputs turned, the paper's placement), and the two induce methods (`dim_actadd_induce`, `dim_ace_induce`); a second call on the same prompts runs angular
steering on every activation (`adaptive=False`) for the ablation of the adaptive gate, reusing the first call's
direction selection (`compare(..., reuse=)`; the committed Qwen run predates that option and selected twice). Every method's setting (the DIM
candidate, alpha, the angle, the induce scale) is picked on validation prompts, never on the evaluation prompts.

Qwen: `real_model.py`'s prompts (directions from the first 256 AdvBench vs 256 MT-Bench+IFBench prompts, the last
quarter held out for validation, 16 validation prompts per set; evaluation on 100 held-out prompts of each), in
bfloat16 (2.3x faster on this CPU with the same selection, `precision_qwen.md`) with the selection screened
(`--screen 16`, same choice as the plain selection on this model, `selection_screen_qwen_bfloat16.md`).
Organism: `abliteration.py --target organism`'s sets (train on the built-in train+val splits, fresh generated
validation prompts the organism never saw, evaluation on the built-in test split). `--batch-size` prompts a batch
(default 64 on Qwen, 16 on the organism) for the evaluation and for the direction search and the validation picks
(`compare` generates the picks at `DirectionConfig.batch_size`) alike: in bfloat16 a batch's padding can change a greedy
response, so a pick generated at another batch size than the rows it chose would be read under other arithmetic.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import fmt, prompt_sets, qwen_gguf, real_pools  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ["none", "dim_abliteration", "dim_ablation_hook", "dim_ace_hook", "dim_angular_hook", "dim_angular_norms_hook", "dim_actadd_induce",
           "dim_ace_induce"]


def main() -> None:
    from featsteer.compare import SteeringMethodConfig, compare
    from featsteer.datasets import load_prompts
    from featsteer.models import load_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=["qwen", "organism"], default="qwen")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 for Qwen, float32 for the organism)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--screen", type=int, default=None, help="--screen of the selection (default: 16 for Qwen, off for the organism)")
    parser.add_argument("--batch-size", type=int, help="prompts per batch, for the evaluation, the direction search and the validation "
                        "picks alike (default: 64 on qwen, 16 on the organism)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of compare methods for the first call")
    parser.add_argument("--angles", help="comma list of angles the angular methods pick from (default: compare's 60,75,90,120,150,180)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="the picks' tolerance (compare --pick-tolerance)")
    parser.add_argument("--n-pick", type=int, help="validation prompts per set the setting picks read (compare --n-pick; default: n_select)")
    parser.add_argument("--no-everywhere", action="store_true", help="skip the second call (angular steering on every activation)")
    parser.add_argument("--results-name", help="results file stem (default: steering_methods_<target>)")
    parser.add_argument("--render-only", action="store_true", help="re-write the markdown from the results JSON")
    parser.add_argument("--max-nll-rise", default="0.5",
                        help="the picks' coherence bound in nats per token, or off (compare --pick-max-nll-rise; default 0.5, compare's)")
    parser.add_argument("--optimize", default="", metavar="KEY=VALUE,...",
                        help="OptimizeConfig fields for dim_optimized_abliteration, e.g. steps=24,retain_weight=3 (default: compare's)")
    parser.add_argument("--eval-set", choices=["held-out", "spare", "rotated"], default="held-out",
                        help="Qwen's evaluation prompts: the 100 + 100 held-out ones every table uses; 'spare', a fresh set no "
                             "setting was ever tuned on (the 164 spare AdvBench prompts, and the 18 spare MT-Bench+IFBench ones with "
                             "the 84 built-in harmless test prompts); or 'rotated', the same 164 harmful prompts with the harmless "
                             "pool rotated: directions from MT-Bench+IFBench 118-373, evaluation on the first 118 (only ever "
                             "training prompts, so no setting was chosen on their KL)")
    parser.add_argument("--save-responses", metavar="PATH", help="also write the evaluation prompts and the first call's responses "
                        "of every method here (JSON; keep it outside the repository, e.g. under runs/)")
    parser.add_argument("--title", default="ACE and angular steering vs DIM abliteration", help="the markdown's heading")
    args = parser.parse_args()
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    name = args.results_name or f"steering_methods_{args.target}"
    if args.render_only:
        write_files(RESULTS, {f"{name}.md": render(json.loads((RESULTS / f"{name}.json").read_text()))})
        return
    torch.set_num_threads(args.threads)
    qwen = args.target == "qwen"
    dtype = args.dtype or ("bfloat16" if qwen else "float32")
    sets = prompt_sets(args.target)
    if args.eval_set != "held-out":
        if not qwen:
            raise SystemExit(f"--eval-set {args.eval_set} is for --target qwen (the organism's evaluation prompts are already its held-out split)")
        sets |= spare_sets() if args.eval_set == "spare" else rotated_sets()
    start = time.perf_counter()
    model = load_model(str(qwen_gguf()) if qwen else "organism", dtype=dtype)
    config, gen = run_configs(args)
    val = {} if qwen else {"val_harmful": load_prompts("organism-corpus:harmful:96"), "val_harmless": load_prompts("organism-corpus:harmless:96")}
    common = {"eval_harmful": sets["eval_harmful"], "eval_harmless": sets["eval_harmless"], "direction_config": config, "generation": gen,
              "n_pick": args.n_pick, "max_nll_rise": None if args.max_nll_rise == "off" else float(args.max_nll_rise), **val}
    angles = {"angles": tuple(float(a) for a in args.angles.split(","))} if args.angles else {}
    main_run = compare(model, sets["train_harmful"], sets["train_harmless"], methods=args.methods.split(","),
                       steering_config=SteeringMethodConfig(tolerance=args.tolerance, **angles),
                       optimize_config=_optimize_config(args.optimize), **common)
    rows = list(main_run.results)
    gated = [row for row in rows if "gate" in row.details]  # the conditional methods, which share one gate
    if gated:  # where it fired on the evaluation prompts (the gate reads the unsteered model)
        gate = main_run.context.gate()
        fires = {kind: {"fired": int((gate.scores(model, sets[f"eval_{kind}"], batch_size=gen.batch_size) > gate.threshold).sum()),
                        "n": len(sets[f"eval_{kind}"])} for kind in ("harmful", "harmless")}
        for row in gated:
            row.details["gate_fires_eval"] = fires
    if not args.no_everywhere:
        everywhere = compare(model, sets["train_harmful"], sets["train_harmless"], methods=["dim_angular_hook"],
                             steering_config=SteeringMethodConfig(adaptive=False, tolerance=args.tolerance, **angles), reuse=main_run, **common)
        rows.append(everywhere.results[0])
    if args.save_responses:
        Path(args.save_responses).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_responses).write_text(json_text(main_run.responses_json(), indent=1) + "\n")
    out = {
        "target": args.target, "title": args.title, "eval_set": _eval_description(args.eval_set, len(sets["eval_harmful"]), len(sets["eval_harmless"])), "command": shlex.join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"), "model": model.name, "dtype": dtype, "threads": args.threads, "batch_size": gen.batch_size, "seconds_total": round(time.perf_counter() - start, 1),
        "setup": main_run.setup,
        "results": [{**asdict(r), "variant": "every activation" if i >= len(main_run.results) else ""} for i, r in enumerate(rows)],
    }
    write_files(RESULTS, {f"{name}.json": json_text(out, indent=1, default=str), f"{name}.md": render(out)})
    print(render(out))


def run_configs(args: argparse.Namespace):
    """The `DirectionConfig` and `GenerationConfig` of a run, both at `--batch-size` (64 on Qwen, 16 on the organism when
    not given): `compare` generates the validation picks at the direction config's batch size and the evaluation at the
    generation config's, so one number keeps a pick and the rows it chose under the same arithmetic."""
    from featsteer.evaluation.behaviour import GenerationConfig
    from featsteer.pipeline import DirectionConfig

    qwen = args.target == "qwen"
    batch_size = args.batch_size if args.batch_size is not None else (64 if qwen else GenerationConfig.batch_size)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
    if qwen:
        return DirectionConfig(n_select=16, screen=args.screen or 16, batch_size=batch_size), gen
    return DirectionConfig(n_select=32, screen=args.screen, batch_size=batch_size), gen


def batch_text(out: dict) -> str:
    """The batch size sentence of the markdown. A run from before `--batch-size` (no `batch_size` in its JSON) generated
    the validation picks at the direction config's 16 and, on Qwen, the evaluation at 64: marked as the old protocol."""
    if "batch_size" in out:
        return f" {out['batch_size']} prompts a batch for the evaluation, the direction search and the validation picks alike."
    picks, rows = out["setup"]["directions"]["batch_size"], out["setup"]["generation"]["batch_size"]
    if picks == rows:
        return ""
    return (f" **Old protocol**: the validation picks generated {picks} prompts a batch and the evaluation {rows}, and in "
            f"{out['dtype']} the batch changes greedy responses, so a pick was read under other arithmetic than the rows it "
            "chose; these figures stand until a re-run, where `--batch-size` sets both.")


def spare_sets() -> dict:
    """Qwen evaluation prompts no featsteer setting was chosen on: AdvBench from index 356 (164 prompts), and the 18
    MT-Bench+IFBench prompts left after index 356 followed by the 84 built-in harmless test prompts (the real harmless
    pool has no more to spare)."""
    from featsteer.datasets import builtin_prompts

    advbench, mixed = real_pools()
    return {"eval_harmful": advbench[356:], "eval_harmless": mixed[356:] + builtin_prompts("harmless", "test")}


def rotated_sets() -> dict:
    """The blind harmful prompts of `spare_sets` with the real harmless pool rotated, so that the KL is read on 118
    MT-Bench+IFBench prompts instead of 18: training harmless prompts are pool indices 118-373 (256, the last quarter
    the validation prompts as usual) and the evaluation ones are indices 0-117. Those were training prompts of every
    other Qwen run, never evaluation or validation ones, so no setting or default was chosen on their KL."""
    advbench, mixed = real_pools()
    return {"train_harmless": mixed[118:374], "eval_harmful": advbench[356:], "eval_harmless": mixed[:118]}


def _eval_description(eval_set: str, n_harmful: int, n_harmless: int) -> str:
    if eval_set == "rotated":
        return (f"a blind set with the harmless pool rotated: the {n_harmful} spare AdvBench prompts (indices 356 on) and the first "
                f"{n_harmless} MT-Bench+IFBench prompts, with directions from AdvBench 0-255 and MT-Bench+IFBench 118-373; no setting "
                "or default was chosen on these prompts' refusals or KL")
    if eval_set == "spare":
        return (f"a blind set: the {n_harmful} spare AdvBench prompts (indices 356 on) and {n_harmless} harmless ones (the 18 spare "
                "MT-Bench+IFBench prompts and the 84 built-in harmless test prompts), never used to choose any setting or default")
    return f"{n_harmful} held-out harmful and {n_harmless} held-out harmless prompts"


def _optimize_config(spec: str):
    """`--optimize steps=24,retain_weight=3` as an `OptimizeConfig` (`OptimizeConfig.with_options`, as the CLI's
    `--optimize-option`)."""
    from featsteer.directions.optimize import OptimizeConfig
    from featsteer.errors import FeatsteerError

    try:
        return OptimizeConfig().with_options([item for item in spec.split(",") if item], "--optimize")
    except FeatsteerError as error:
        raise SystemExit(str(error)) from None


def _first_weight(config: dict) -> str:
    """How the retain loss counts its first position, when not as one answer position (older results have no field)."""
    weight = config.get("retain_first_weight", 1.0)
    return "" if weight == 1 else f" (its first position counted {weight:g} times)"


def _refusal_read(targets: dict) -> str:
    return f", the refusal loss on {targets['refusal']} harmful prompts" if targets.get("refusal") else ""


def _bound_phrase(max_nll_rise: float | None) -> str:
    if max_nll_rise is None:
        return "with no coherence bound"
    return (f"with a coherence bound of {max_nll_rise:g} nats per token (a setting whose validation harmless answers cost the "
            f"unedited model more than that above its own counts as answering nothing)")


def render(out: dict) -> str:
    setup = out["setup"]
    chosen = setup["chosen"]["dim"]
    validation = setup["validation"]
    if isinstance(validation, dict):
        validation = f"{validation['harmful']} and {validation['harmless']}"
    n_pick = setup.get("n_pick") or [setup["directions"]["n_select"]] * 2
    validation += (f"; the picks read the first {n_pick[0]} of each" if n_pick[0] == n_pick[1]
                   else f"; the picks read the first {n_pick[0]} harmful and {n_pick[1]} harmless")
    title = out.get("title", "ACE and angular steering vs DIM abliteration")
    command = out.get("command", f"--target {out['target']}")
    lines = [f"# {title}: {out['target']} ({out['dtype']}, {out['threads']} threads)", "",
             f"Measured by `benchmarks/steering_methods.py {command}` on {out.get('date', '2026-12-04')}. "
             f"{out.get('eval_set') or _eval_description('held-out', setup['n_eval_harmful'], setup['n_eval_harmless'])}, greedy decoding, "
             f"{setup['generation']['max_new_tokens']} new tokens, the `featsteer eval` detector. DIM direction: {chosen['hook']} position "
             f"{chosen['position']}. Every setting was picked on validation prompts ({validation}), "
             f"{_bound_phrase(setup.get('max_nll_rise'))}.{batch_text(out)} Total {out['seconds_total']:.0f} s.", "",
             "| method | setting | refused harmful | refused harmless | KL harmless (all) | KL answered | looping harmful / harmless "
             "| base NLL harmless | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        name = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        answered = "-" if r["kl_harmless_answered"] is None else f"{r['kl_harmless_answered']:.4f}"
        nh, nl = setup["n_eval_harmful"], setup["n_eval_harmless"]
        looping = ("-" if r.get("looping_harmful") is None else
                   f"{round(r['looping_harmful'] * nh)}/{nh} / {round(r['looping_harmless'] * nl)}/{nl}")
        nll = "-" if r.get("base_nll_harmless") is None else f"{r['base_nll_harmless']:.3f}"
        lines.append(f"| {name} | {r['details'].get('setting', '-')} | {round(r['refusal_harmful'] * nh)}/{nh} | "
                     f"{round(r['refusal_harmless'] * nl)}/{nl} | {fmt(r['kl_harmless'], '.4f')} | {answered} | {looping} | {nll} | {r['seconds']:.0f} |")
    lines += ["", "Looping: responses that end in repetition (`featsteer.evaluation.LoopDetector`). Base NLL: the unedited model's mean "
              "negative log-likelihood per token of the method's harmless responses (the `none` row is its own greedy answers)."]
    lines += paired_lines(out["results"])
    lines += ["", "Validation rows each pick read (refusal on validation harmful prompts, KL on validation harmless prompts; "
              "for the induce methods, refusal on validation harmless prompts):", ""]
    for r in out["results"]:
        picked = r["details"].get("validation") or r["details"].get("induce_val_refusal")
        if picked:
            name = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
            lines.append(f"- {name}: {json_text(picked, indent=None)}")
    lines += _optimization_lines(out["results"])
    lines += _gate_lines(out["results"])
    return "\n".join(lines) + "\n"


def _shared(results: list[dict], key: str) -> list[tuple[str, dict]]:
    """The rows whose details hold `key`, one per distinct value (methods that share a gate or a training run report it
    once), each with the names of the methods that hold it."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r["details"].get(key):
            groups.setdefault(json.dumps(r["details"][key], sort_keys=True), []).append(r)
    return [(", ".join(r["method"] for r in rows), rows[0]) for rows in groups.values()]


def _gate_lines(results: list[dict]) -> list[str]:
    """Where the conditional methods' gate sits, how well each candidate told the classes apart, and how often it
    fired on the validation and evaluation prompts."""
    lines = []
    for methods, r in _shared(results, "gate"):
        gate = r["details"]["gate"]
        val, held = r["details"]["gate_fires_val"], r["details"].get("gate_fires_eval")
        lines += ["", f"CAST gate ({methods}): {gate['hook']}, {gate['pool']} pooling, cosine threshold {gate['threshold']:.4f}; "
                  f"balanced accuracy {gate['balanced_accuracy']:.3f} on the validation prompts, where it fired on "
                  f"{val['harmful']:.3f} of the harmful and {val['harmless']:.3f} of the harmless ones"
                  + (f"; on the evaluation prompts it fired on {held['harmful']['fired']}/{held['harmful']['n']} harmful and "
                     f"{held['harmless']['fired']}/{held['harmless']['n']} harmless" if held else "") + ".", "",
                  "| hook | pooling | threshold | balanced accuracy, training | validation |", "|---|---|---:|---:|---:|"]
        lines += [f"| {c['hook']} | {c['pool']} | {c['threshold']:.4f} | {c['train_balanced_accuracy']:.3f} | "
                  f"{fmt(c.get('val_balanced_accuracy'), '.3f')} |" for c in gate["candidates"]]
    return lines


def _optimization_lines(results: list[dict]) -> list[str]:
    """What `dim_optimized_abliteration` (and its gated variant) trained: its config, targets, time, each snapshot's cosine with DIM and the
    losses (mean of each quarter of the steps)."""
    lines = []
    for methods, r in _shared(results, "optimization"):
        found = r["details"]["optimization"]
        config, history = found["config"], found["history"]
        losses = ["ablation", "addition", "retain"] + (["refusal"] if config.get("refusal_weight", 0) else [])
        refusal = f" / refusal {config['refusal_weight']:g}" if "refusal" in losses else ""
        lines += ["", f"Direction optimisation ({methods}): {config['steps']} Adam steps, lr {config['lr']:g}, batch "
                  f"{config['batch_size']}, weights ablation {config['ablation_weight']:g} / addition {config['addition_weight']:g} / "
                  f"retain {config['retain_weight']:g}{_first_weight(config)}{refusal}, {config['target_tokens']} target tokens, seed "
                  f"{config.get('seed', 0)}; targets: {found['targets']['ablation']} of "
                  f"{found['targets']['harmful_read']} harmful {_ablation_source(config)}, {found['targets']['addition']} "
                  f"refusals under DIM addition, {found['targets']['retain']} harmless answers"
                  f"{_refusal_read(found['targets'])}; {found['seconds']:.0f} s (with the targets' "
                  "generation).", "", "| steps | cosine with DIM | " + " | ".join(f"{k} loss" for k in losses) + " |",
                  "|---|---|" + "---|" * len(losses)]
        quarter = max(1, len(history) // 4)
        for step, cosine in found["cosine_with_start"].items():
            window = history[:1] if int(step) == 0 else history[max(0, int(step) - quarter): int(step)]
            mean = {k: sum(row[k] for row in window) / len(window) for k in losses if window and k in window[0]}
            cells = " | ".join(f"{mean[k]:.4f}" if k in mean else "-" for k in losses)
            lines.append(f"| {step} | {cosine:.4f} | {cells} |")
        lines += ["", "Losses are means over the steps since the previous row (the mini-batches those steps read); step 0 is DIM, "
                  "its losses those of the first mini-batch."]
        if "refusal" in losses:
            lines[-1] += (" The refusal loss is `-log(1 - P(refusal))` of the first response token with the direction removed, "
                          "over all harmful training prompts.")
    return lines


def _ablation_source(config: dict) -> str:
    """What the ablation loss's targets were (`OptimizeConfig.ablation_targets`)."""
    if config.get("ablation_targets", "ablated") == "affirm":
        return "prompts' affirmative openings (\"Sure, here is ...\", `ablation_targets=affirm`)"
    return "answers (not refusals under DIM ablation)"


def paired_lines(results: list[dict], baseline: str = "dim_abliteration") -> list[str]:
    """Every row against DIM abliteration on the same prompts (McNemar's exact test, paired bootstrap of the KL);
    computed here so the second call's rows are paired too. Empty for results saved before per-prompt verdicts."""
    from featsteer.errors import FeatsteerError
    from featsteer.evaluation.paired import paired_mean_difference, paired_rates

    base = next((r for r in results if r["method"] == baseline and not r["variant"]), None)
    if base is None or not base.get("per_prompt"):
        return []
    lines = ["", f"Paired with {baseline} on the same prompts: each cell is the difference (method minus {baseline}), the prompts "
             f"only {baseline} counts / only the method counts, and McNemar's exact p; KL: the mean per-prompt difference with its "
             "95% paired bootstrap interval.", "",
             "| method | refused harmful | unanswered harmful | refused harmless | KL harmless difference [95% CI] |", "|---|---|---|---|---|"]
    for r in results:
        if r is base:
            continue
        cells = []
        for key in ("refused_harmful", "unanswered_harmful", "refused_harmless"):
            t = paired_rates(base["per_prompt"][key], r["per_prompt"][key])
            cells.append(f"{t.difference:+.2f} ({t.only_a} / {t.only_b}, p {t.p_value:.2g})")
        try:
            kl = paired_mean_difference(base["per_prompt"]["kl_harmless"], r["per_prompt"]["kl_harmless"])
            kl_cell = f"{kl.difference:+.4f} [{kl.low:+.4f}, {kl.high:+.4f}]"
        except FeatsteerError:  # an infinite KL on some prompt
            kl_cell = "-"
        name = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        lines.append(f"| {name} | {' | '.join(cells)} | {kl_cell} |")
    return lines


if __name__ == "__main__":
    main()
