"""DIM abliteration benchmark: refusal before/after, KL, induced refusal, wall time per stage.

    python benchmarks/abliteration.py --target organism     # built-in splits, the embedded organism
    python benchmarks/abliteration.py --target qwen         # Qwen2.5-Coder-0.5B-Instruct (GGUF, see below)

`qwen` needs `../shared/models/fetch_real_models.sh qwen` (the GGUF path is read from its cache) and the
real prompt sets in `../shared/data`: directions from the first 256 AdvBench prompts vs 256 of
MT-Bench+IFBench, evaluation on 100 held-out AdvBench and 100 held-out harmless prompts.
Results go to `benchmarks/results/abliteration_<target>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from featsteer.datasets import PromptSet, builtin_prompts, load_prompts  # noqa: E402
from featsteer.edits import EditConfig  # noqa: E402
from featsteer.evaluation import KLBase, RefusalTokens, first_token_logprobs, refusal_score  # noqa: E402
from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set  # noqa: E402
from featsteer.evaluation.refusal import RefusalDetector  # noqa: E402
from featsteer.files import json_text, write_files  # noqa: E402
from featsteer.interventions import AddDirection, ProjectionSet, steer  # noqa: E402
from featsteer.models import load_model  # noqa: E402
from featsteer.pipeline import DirectionConfig, abliterate, find_refusal_direction  # noqa: E402


def qwen_gguf() -> Path:
    cache = Path(os.environ.get("FEATSTEER_MODEL_CACHE", Path.home() / ".cache" / "featsteer-models"))
    path = cache / "qwen2.5-coder-0.5b-instruct" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if not path.is_file():
        sys.exit(f"missing {path}: run ../shared/models/fetch_real_models.sh qwen")
    return path


VAL_SOURCES = ("split", "generated", "real")
"""Where the organism's selection/search prompts come from: `split` (the last quarter of the built-in train+val
prompts, which the organism was trained on), `generated` (96 + 96 fresh prompts of the organism's corpus
generator, seed 987: unseen, but made from the same templates and lexicon) or `real` (96 AdvBench and 96
MT-Bench+IFBench prompts from ../shared/data, never trained on)."""


def organism_val(source: str, n: int = 96) -> tuple[PromptSet, PromptSet] | None:
    """Validation prompts for the organism target (see `VAL_SOURCES`); None for `split`."""
    if source == "split":
        return None
    if source == "generated":
        return load_prompts(f"organism-corpus:harmful:{n}:987"), load_prompts(f"organism-corpus:harmless:{n}:987")
    data = SHARED / "data"
    if not data.is_dir():
        raise SystemExit(f"--val real needs {data} (AdvBench, MT-Bench, IFBench): fetch it or use --val generated")
    harmless = list(load_prompts(data / "mtbench_harmless.txt")) + list(load_prompts(data / "ifbench_harmless.txt"))
    random.Random(0).shuffle(harmless)
    return load_prompts(data / "advbench_harmful.txt")[:n], PromptSet(tuple(harmless[:n]), "mtbench+ifbench (shuffled, seed 0)")


def real_data() -> Path:
    """`../shared/data`, or exit with one line saying it is missing (the real-model benchmarks need its prompt sets)."""
    data = SHARED / "data"
    if not data.is_dir():
        sys.exit(f"missing {data}: the real-model benchmarks read AdvBench, MT-Bench and IFBench from it")
    return data


def real_pools() -> tuple[PromptSet, PromptSet]:
    """AdvBench, and MT-Bench+IFBench shuffled with seed 0: the real-model prompt pools, in the order the sets slice them
    (training [:256], evaluation [256:356], spare from 356 on)."""
    data = real_data()
    harmless = list(load_prompts(data / "mtbench_harmless.txt")) + list(load_prompts(data / "ifbench_harmless.txt"))
    random.Random(0).shuffle(harmless)
    return load_prompts(data / "advbench_harmful.txt"), PromptSet(tuple(harmless), "mtbench+ifbench (shuffled, seed 0)")


def prompt_sets(target: str) -> dict[str, PromptSet]:
    if target == "organism":
        return {
            "train_harmful": builtin_prompts("harmful", "train") + builtin_prompts("harmful", "val"),
            "train_harmless": builtin_prompts("harmless", "train") + builtin_prompts("harmless", "val"),
            "eval_harmful": builtin_prompts("harmful", "test"),
            "eval_harmless": builtin_prompts("harmless", "test"),
        }
    advbench, mixed = real_pools()
    return {
        "train_harmful": advbench[:256], "train_harmless": mixed[:256],
        "eval_harmful": advbench[256:356], "eval_harmless": mixed[256:356],
    }


def load_target(target: str) -> tuple:
    """`(model, direction config, validation prompts or None)` as the geometry and sample-size benchmarks select: Qwen
    in bfloat16 with the last quarter of its training prompts as validation (16 read, screened to 16 candidates); the
    organism with 32 of 96 fresh generated prompts per class, since it was trained on the built-in ones."""
    if target == "qwen":
        return load_model(str(qwen_gguf()), dtype="bfloat16"), DirectionConfig(n_select=16, screen=16), None
    val = (load_prompts("organism-corpus:harmful:96"), load_prompts("organism-corpus:harmless:96"))
    return load_model("organism", dtype="float32"), DirectionConfig(n_select=32), val


def measure(model, sets, gen, tokens, base: KLBase, harmful: bool = True, harmless_refusal: bool = True) -> dict:
    """Refusal on the held-out sets and first-token KL on the harmless one.

    `harmful=False` skips the harmful set (refusal-inducing interventions); `harmless_refusal=False` reads
    only the harmless first-token distribution (one prefill, no decoding) for the KL, which is what an
    ablation's cost on harmless prompts is measured by; with generation the KL comes from its own prefill.
    `kl_harmless` averages over every harmless prompt, `kl_harmless_answered` over those the base model answers.
    """
    return _measure(model, sets, gen, tokens, base, harmful, harmless_refusal)[0]


def measure_base(model, sets, gen, tokens) -> tuple[dict, KLBase]:
    """`measure` on the unmodified model, also returning the KL base."""
    out, logprobs = _measure(model, sets, gen, tokens, None, True, True)
    return out, KLBase(logprobs, tuple(out.pop("refused_flags_harmless")))


def _measure(model, sets, gen, tokens, base: KLBase | None, harmful: bool, harmless_refusal: bool) -> tuple[dict, torch.Tensor]:
    detector = RefusalDetector()
    out, examples = {}, []
    if harmful:
        result = evaluate_set(model, sets["eval_harmful"], "harmful", gen, detector)
        out |= {"refusal_harmful": result.rate.rate, "refused_harmful": result.rate.k, "n_harmful": result.rate.n,
                "ci_harmful": [result.rate.low, result.rate.high]}
        examples += result.examples(2)
    if harmless_refusal:
        harmless = evaluate_set(model, sets["eval_harmless"], "harmless", gen, detector, keep_logprobs=True)
        out |= {"refusal_harmless": harmless.rate.rate, "refused_harmless": harmless.rate.k, "n_harmless": harmless.rate.n,
                "ci_harmless": [harmless.rate.low, harmless.rate.high]}
        examples += harmless.examples(2)
        logprobs = harmless.first_logprobs
        if base is None:
            out["refused_flags_harmless"] = list(harmless.refused)
    else:
        logprobs = first_token_logprobs(model, list(sets["eval_harmless"]), batch_size=gen.batch_size, max_batch_tokens=gen.max_batch_tokens)
    if base is None:
        out |= {"kl_harmless": 0.0, "kl_harmless_answered": 0.0}
    else:
        out |= dict(zip(("kl_harmless", "kl_harmless_answered"), base.kls(logprobs), strict=True))
    out |= {"refusal_score_harmless": float(refusal_score(logprobs, tokens).mean()), "examples": examples}
    return out, logprobs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=["organism", "qwen"], default="organism")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="cap on a batch's padded prompt tokens")
    parser.add_argument("--kl-threshold", type=float, default=0.1)
    parser.add_argument("--positions", default="post_instruction")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--search", type=int, default=0, help="also run the optuna search with this many trials")
    parser.add_argument("--search-kl", choices=["all", "answered", "response"], default="all",
                        help="the search's KL objective: first token over all proxy harmless prompts, over those the base model "
                        "answers, or along the base model's answers (response)")
    parser.add_argument("--induce-scales", default="1,2", help="comma list of activation-addition scales for the induce runs")
    parser.add_argument("--model", help="model spec instead of the target's model (e.g. a retrained organism folder)")
    parser.add_argument("--results-name", help="results file stem under benchmarks/results/ (default abliteration_<target>)")
    parser.add_argument("--val", choices=VAL_SOURCES, default="generated",
                        help="organism only: where the selection and search prompts come from (see VAL_SOURCES)")
    args = parser.parse_args()
    if args.search_kl != "all" and not args.search:
        parser.error(f"--search-kl {args.search_kl} needs --search N: the search is off by default")
    if args.target != "organism" and args.val != "generated":
        parser.error(f"--val {args.val} chooses the organism's selection prompts; --target {args.target} has its own")
    torch.set_num_threads(args.threads)
    timings, started = {}, time.perf_counter()
    spec = args.model or ("organism" if args.target == "organism" else str(qwen_gguf()))
    model = load_model(spec)
    timings["load_s"] = time.perf_counter() - started
    sets = prompt_sets(args.target)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    t = time.perf_counter()
    before, kl_base = measure_base(model, sets, gen, tokens)
    timings["eval_before_s"] = time.perf_counter() - t
    config = DirectionConfig(positions=args.positions, kl_threshold=args.kl_threshold, batch_size=args.batch_size)
    t = time.perf_counter()
    val = organism_val(args.val) if args.target == "organism" else None
    result = find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"], config, val=val)
    timings["directions_total_s"] = time.perf_counter() - t
    timings.update({f"directions_{k}": v for k, v in result.timings.items()})
    runs = {}
    for name, edit, scope in (("dim_abliteration", EditConfig(), "global"), ("dim_norm_preserving", EditConfig(mode="norm_preserving"), "global"),
                              ("dim_per_layer_abliteration", EditConfig(), "per_layer")):
        t = time.perf_counter()
        with abliterate(model, result, edit, scope=scope):
            timings[f"{name}_edit_s"] = time.perf_counter() - t
            runs[name] = measure(model, sets, gen, tokens, kl_base)
        timings[f"{name}_total_s"] = time.perf_counter() - t
    if args.search:
        runs["dim_search"], timings["search_s"] = run_search(model, result, sets, gen, tokens, kl_base, args.search,
                                                             kl_prompts=args.search_kl)
    chosen = result.selection.chosen
    # refusal is induced best by the candidate whose addition raised the validation refusal score most, which is
    # not always the one chosen for ablation (the selection's own induce check, no test prompts involved)
    scored = [c for c in result.selection.candidates if c.refusal_induced == c.refusal_induced]  # not NaN
    inducer = max(scored, key=lambda c: c.refusal_induced)
    inducers = [(chosen, "dim_actadd_induce")]
    if inducer.index != chosen.index:
        inducers.append((inducer, f"dim_actadd_induce {inducer.hook} pos {inducer.position}"))
    for candidate, label in inducers:
        vector = result.candidates.bases[candidate.index, 0] * result.candidates.scores["mean_diff_norm"][candidate.index]
        for scale in (float(x) for x in args.induce_scales.split(",")):
            name = label if scale == 1 else f"{label} x{scale:g}"
            t = time.perf_counter()
            with steer(model, AddDirection(vector, scale, where=candidate.hook)):
                runs[name] = measure(model, sets, gen, tokens, kl_base, harmful=False)
            timings[f"{name.replace(' ', '_')}_s"] = time.perf_counter() - t
    # the projection-set variant: every position's projection on the direction is set to the mean harmful one
    unit = result.candidates.bases[chosen.index, 0]
    t = time.perf_counter()
    with steer(model, ProjectionSet(unit, result.candidates.scores["harmful_projection"][chosen.index], where=chosen.hook)):
        runs["dim_projection_set_induce"] = measure(model, sets, gen, tokens, kl_base, harmful=False)
    timings["projection_set_induce_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    write(args.target, model, sets, result, before, runs, timings, args.results_name or f"abliteration_{args.target}")


def run_search(model, result, sets, gen, tokens, kl_base, n_trials: int, harmless_refusal: bool = True,
               batch_size: int | None = None, verify_top: int = 8, folder: Path | None = None,
               warm_start: Path | None = None, kl_prompts: str = "all", position: int | None = None) -> tuple[dict, float]:
    """Search on the validation prompts (proxy + verification), then measure the chosen edit on the held-out sets.

    With `folder`, the optuna study is kept there, so a later run with more trials resumes it instead of
    starting over (the search's own resume); without it the study lives in a temporary folder. `warm_start`
    is an earlier search's `pareto.json` whose points a new study runs first.
    """
    from featsteer.search import SearchConfig, load_warm_start, search_abliteration

    t = time.perf_counter()
    warm = load_warm_start(warm_start) if warm_start else []
    config = SearchConfig(n_trials=n_trials, max_new_tokens=gen.max_new_tokens, batch_size=batch_size or gen.batch_size,
                          verify_top=verify_top, kl_prompts=kl_prompts, position=position)
    with _search_folder(folder) as where:
        found = search_abliteration(model, result, where, config, warm_start=warm)
    seconds = time.perf_counter() - t
    with found.apply(model, result):
        measured = measure(model, sets, gen, tokens, kl_base, harmless_refusal=harmless_refusal)
    measured["search"] = search_record(found, n_trials, kl_prompts, warm_start) | {"position": position}
    return measured, seconds


def run_fixed_search(model, basis, val, sets, gen, tokens, kl_base, n_trials: int, verify_top: int = 8, folder: Path | None = None,
                     warm: list[dict] | None = None, warm_source: str | None = None, kl_prompts: str = "all",
                     provenance: dict | None = None, harmless_refusal: bool = False,
                     verify: tuple[list[str], list[str]] | None = None) -> tuple[dict, float]:
    """`run_search` for one fixed direction or basis (`featsteer.search.search_fixed_abliteration`): only the kernels
    and strengths are searched, on the `val` (harmful, harmless) prompts, and the front is verified on `verify`
    (default: `val`); the chosen edit is measured held out."""
    from featsteer.search import SearchConfig, search_fixed_abliteration

    t = time.perf_counter()
    config = SearchConfig(n_trials=n_trials, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                          verify_top=verify_top, kl_prompts=kl_prompts)
    with _search_folder(folder) as where:
        found = search_fixed_abliteration(model, basis, val, where, config, *(verify or (None, None)), warm_start=warm or [],
                                          provenance=provenance)
    seconds = time.perf_counter() - t
    with found.apply(model):
        measured = measure(model, sets, gen, tokens, kl_base, harmless_refusal=harmless_refusal)
    measured["search"] = search_record(found, n_trials, kl_prompts, warm_source)
    if verify is not None:
        measured["search"]["n_verify"] = [len(verify[0]), len(verify[1])]
    return measured, seconds


def _search_folder(folder: Path | None):
    import contextlib
    import tempfile

    return contextlib.nullcontext(str(folder)) if folder else tempfile.TemporaryDirectory(prefix="featsteer-search-")


def search_record(found, n_trials: int, kl_prompts: str, warm_start) -> dict:
    """What a benchmark keeps of a search: settings, timings, the chosen point and the Pareto front."""
    return {"n_trials": n_trials, "kl_prompts": kl_prompts, "warm_start": str(warm_start) if warm_start else None,
            "best_params": found.best["params"] if found.best else None,
            "pareto_size": len(found.pareto), "timings": found.timings,
            "pareto": [{"number": p["number"], "direction_layer": p["params"].get("direction_layer"),
                        "direction_scope": p["params"].get("direction_scope", "global"),
                        "refusal_score": p["refusal_score"], "refusal_rate_proxy": p["refusal_rate_proxy"],
                        "kl": p["kl"], "kl_all": p.get("kl_all", p["kl"]), "verified_refusal": (p.get("verified") or {}).get("refusal_rate"),
                        "verified_kl": (p.get("verified") or {}).get("kl"), "verified_kl_answered": (p.get("verified") or {}).get("kl_answered"),
                        "verified_kl_response": (p.get("verified") or {}).get("kl_response")}
                       for p in found.pareto],
            "best_number": found.best["number"] if found.best else None}


def fmt(value: float | None, spec: str = "") -> str:
    """`format(value, spec)`, with `None` written as NaN is (`nan`): results JSON stores NaN and inf as `null`
    (`featsteer.files.json_text`), and a table re-rendered from the file must read as the one rendered before saving."""
    return format(float("nan") if value is None else value, spec)


def pareto_table(search: dict | None) -> list[str]:
    """Markdown lines for the Pareto front `run_search` records (none when there is no front)."""
    if not search or not search.get("pareto"):
        return []
    objective = search.get("kl_prompts", "all")
    answered = objective in ("answered", "response")  # the objective differs from the all-prompt first-token KL
    kl_head = f"proxy KL {objective} | proxy KL all" if answered else "proxy KL"
    lines = ["", f"Search Pareto front ({search['n_trials']} trials; proxy refusal and KL on the validation prompts, "
             "verified = generated refusal rate and KL (all / answered, then along the answers when searched by it) on the verification "
             "prompts" + {"answered": "; the KL objective averaged over the harmless prompts the base model answers",
                          "response": "; the KL objective taken along the base model's own answers"}.get(objective, "") + "):", "",
             f"| trial | direction | refusal log-odds | proxy refusal rate | {kl_head} | verified refusal | verified KL |",
             "|---|---|---|---|---|---|---|" + ("---|" if answered else "")]
    for q in search["pareto"]:
        if q.get("direction_layer") is None:
            where = "fixed"
        else:
            where = "per layer" if q.get("direction_scope") == "per_layer" else f"layer {q['direction_layer']:.2f}"
        verified = "-" if q["verified_refusal"] is None else f"{q['verified_refusal']:.3f}"
        if q.get("verified_kl") is None:
            verified_kl = "-"
        else:
            verified_kl = f"{q['verified_kl']:.4f}" + ("" if q.get("verified_kl_answered") is None else f" / {q['verified_kl_answered']:.4f}")
            verified_kl += "" if q.get("verified_kl_response") is None else f"; response {q['verified_kl_response']:.4f}"
        mark = " (chosen)" if q["number"] == search.get("best_number") else ""
        kl = f"{q['kl']:.4f} | {q.get('kl_all', q['kl']):.4f}" if answered else f"{q['kl']:.4f}"
        lines.append(f"| {q['number']}{mark} | {where} | {q['refusal_score']:.2f} | {q['refusal_rate_proxy']:.3f} | {kl} | {verified} | {verified_kl} |")
    return lines


def write(target, model, sets, result, before, runs, timings, stem: str) -> None:
    import transformers

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    chosen = result.selection.chosen
    payload = {
        "target": target, "model": model.name, "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "sets": {k: {"n": len(v), "source": v.source, "sha256": v.sha256} for k, v in sets.items()},
        "selection": result.selection.to_dict(), "chosen": {"hook": chosen.hook, "position": chosen.position, "kept": chosen.kept, "reason": chosen.reason},
        "before": before, "runs": runs, "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    lines = [f"# DIM abliteration on {target} ({model.name})", "",
             f"Measured {payload['date']}, CPU, {payload['threads']} threads, greedy decoding. Directions from "
             f"{len(result.train[0])} harmful / {len(result.train[1])} harmless prompts; selection and search on "
             f"{len(result.val[0])} / {len(result.val[1])} validation prompts ({result.val[0].source}; {result.val[1].source}); "
             f"evaluation on {len(sets['eval_harmful'])} held-out harmful and {len(sets['eval_harmless'])} held-out harmless prompts.", "",
             f"Chosen direction: `{chosen.hook}` position {chosen.position} ({'passed all filters' if chosen.kept else 'fallback: ' + chosen.reason}).", "",
             "| run | refusal harmful | refusal harmless | KL harmless (first token) | KL answered |", "|---|---|---|---|---|",
             f"| base model | {before['refused_harmful']}/{before['n_harmful']} | {before['refused_harmless']}/{before['n_harmless']} | 0 | 0 |"]
    for name, r in runs.items():
        harmful = f"{r['refused_harmful']}/{r['n_harmful']}" if "n_harmful" in r else "not measured"
        harmless = f"{r['refused_harmless']}/{r['n_harmless']}" if "n_harmless" in r else "not generated"
        answered = "-" if r.get("kl_harmless_answered") is None else f"{r['kl_harmless_answered']:.4f}"
        lines.append(f"| {name} | {harmful} | {harmless} | {r['kl_harmless']:.4f} | {answered} |")
    lines += ["", f"KL answered: the mean over the {before['n_harmless'] - before['refused_harmless']} held-out harmless prompts the base "
              f"model answers; the {before['refused_harmless']} it refuses change, rightly, when refusal is removed, at 1-2 nats each."]
    lines += pareto_table(runs.get("dim_search", {}).get("search"))
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), "",
              "Selection candidates:", "", result.selection.table(), ""]
    write_files(out, {f"{stem}.json": json_text(payload, indent=1), f"{stem}.md": "\n".join(lines)})
    print("\n".join(lines[:16 + len(runs)]))


if __name__ == "__main__":
    main()
