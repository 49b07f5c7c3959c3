"""Every direction source on a real model, one process: DIM, probes and SAE features on Qwen2.5-Coder-0.5B.

    python benchmarks/real_model.py                       # writes benchmarks/results/real_model_qwen.{json,md}
    python benchmarks/real_model.py --sae-dir ~/.cache/featsteer/real-model-sae/qwen2.5-coder-0.5b-instruct-q4_k_m-L16-x4-k32-4000000

Needs `../shared/models/fetch_real_models.sh qwen` and the real prompt sets in `../shared/data`. The prompt
sets are those of `abliteration.py --target qwen`: directions, probes and SAE features are fitted on the first
256 AdvBench prompts vs 256 MT-Bench+IFBench prompts; every number below is measured on 100 held-out AdvBench
and 100 held-out harmless prompts with the same greedy decoding and refusal detector.

Stages (each timed): the base model; Arditi-style DIM selection; DIM abliteration and its norm-preserving
variant; DIM activation addition (induce); linear- and whitened-probe directions at the DIM layer as weight
projections; with `--sae-dir`, an SAE at the DIM layer (trained and kept by `real_model_sae.py`), its
features ranked, and the top-1 / top-k decoder rows projected out; the probe sweep (accuracy, selectivity per
layer) on the layers given. This script no longer trains an SAE itself: its old default (60,000 tokens) gave an
SAE with explained variance near zero, and a useful one needs about an hour of capture and training on this
machine, which `real_model_sae.py` does once and caches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import fmt, measure, measure_base, pareto_table, prompt_sets, qwen_gguf, run_search  # noqa: E402

from featsteer.activations import capture  # noqa: E402
from featsteer.directions import find_directions  # noqa: E402
from featsteer.edits import EditConfig, apply_edit  # noqa: E402
from featsteer.evaluation import KLBase, RefusalTokens  # noqa: E402
from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set  # noqa: E402
from featsteer.evaluation.refusal import RefusalDetector  # noqa: E402
from featsteer.features import score_features  # noqa: E402
from featsteer.files import json_text, write_files  # noqa: E402
from featsteer.interventions import AddDirection, ProjectionSet, steer  # noqa: E402
from featsteer.models import load_model  # noqa: E402
from featsteer.pipeline import DirectionConfig, abliterate, find_refusal_direction  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class Clock:
    """Wall time per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = round(time.perf_counter() - self.start, 1)
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {clock.seconds[name]:.0f}s", flush=True)

        return _Stage()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per prefill-only pass (capture, selection)")
    parser.add_argument("--gen-batch-size", type=int, default=64, help="prompts per generation batch")
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="cap on a batch's padded prompt tokens")
    parser.add_argument("--n-select", type=int, default=16, help="validation prompts per set scoring each DIM candidate")
    parser.add_argument("--search", type=int, default=12, help="optuna trials of the search stage (0: skip)")
    parser.add_argument("--verify-top", type=int, default=4, help="search trials verified by generation")
    parser.add_argument("--search-dir", type=Path,
                        help="keep the search study here; a later run with a larger --search resumes it (default: temporary)")
    parser.add_argument("--sae-dir", type=Path, help="trained SAEs (sae_lens layout, e.g. the folder real_model_sae.py keeps) "
                        "with one at the DIM layer's resid_pre; without it the SAE stage is skipped")
    parser.add_argument("--sae-top-k", type=int, default=8)
    parser.add_argument("--probe-layers", default="4,8,12,16,20", help="layers of the probe sweep")
    parser.add_argument("--probe-effect-prompts", type=int, default=16, help="held-out prompts per class for the sweep's ablation effects")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--model", help="model spec instead of the Qwen GGUF (e.g. organism, for a smoke run)")
    parser.add_argument("--results-name", default="real_model_qwen", help="results file stem under benchmarks/results/")
    parser.add_argument("--render-only", action="store_true", help="re-render the markdown from the results JSON")
    parser.add_argument("--skip", default="", help="comma list of stages to skip: dim,induce,sae,probe_dirs,probes,per_layer,norm_preserving")
    parser.add_argument("--induce-scales", default="1", help="comma list of activation-addition scales for the induce stage")
    parser.add_argument("--induce-set", action="store_true",
                        help="also induce by setting the projection on the DIM direction to the mean harmful projection")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/featsteer/bench"),
                        help="folder where the base evaluation and the DIM selection are kept between runs")
    parser.add_argument("--fresh", action="store_true", help="recompute the base evaluation and DIM selection even when cached")
    parser.add_argument("--filter-train", action="store_true",
                        help="compute the DIM candidates from the train prompts the base model treats as labelled (Arditi filter)")
    parser.add_argument("--search-kl", choices=["all", "answered"], default="all",
                        help="the search's KL objective over all proxy harmless prompts, or those the base model answers")
    parser.add_argument("--search-position", type=int,
                        help="token position of the searched directions (default: the selected candidate's)")
    parser.add_argument("--warm-start", type=Path,
                        help="a pareto.json of an earlier search: its Pareto points are the new study's first trials")
    parser.add_argument("--merge", action="store_true",
                        help="keep the stages of the existing results file that this run skips (same DIM choice only)")
    args = parser.parse_args()
    if args.search_kl != "all" and not args.search:
        parser.error(f"--search-kl {args.search_kl} needs --search N (N >= 1): with --search 0 no search runs")
    if args.render_only:
        render(json.loads((RESULTS / f"{args.results_name}.json").read_text()), args.results_name)
        return
    skip = set(filter(None, args.skip.split(",")))
    if args.sae_dir is not None and "sae" not in skip and not args.sae_dir.expanduser().is_dir():
        raise SystemExit(f"--sae-dir {args.sae_dir} is not a folder: train an SAE with python benchmarks/real_model_sae.py "
                         "(it keeps it under ~/.cache/featsteer/real-model-sae/) or pass --skip sae")
    torch.set_num_threads(args.threads)
    clock, runs, extra = Clock(), {}, {"settings": vars(args)}
    spec = args.model or str(qwen_gguf())
    with clock.stage("load"):
        model = load_model(spec)
    sets = prompt_sets("qwen")
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size, max_batch_tokens=args.max_batch_tokens)
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)

    def checkpoint() -> None:  # results so far, so a late failure keeps the finished stages
        write(model, sets, runs, extra, clock.seconds, args.results_name)

    # the two most expensive stages that every later stage needs (the base model's outputs and the DIM
    # selection, ~28 min on Qwen) are kept on disk, keyed by everything they depend on
    key_parts = [spec, args.max_new_tokens, args.n_select, args.batch_size, {k: v.sha256 for k, v in sets.items()}]
    keys = {"base_eval": hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]}
    # the selection also depends on the train filter (older caches keep their key when it is off)
    keys["dim_selection"] = hashlib.sha256(json.dumps(key_parts + (["filter_train"] if args.filter_train else [])).encode()).hexdigest()[:16]
    extra["cached_stages"] = []

    def cached(stage: str, compute):
        path = args.cache.expanduser() / f"{args.results_name}-{stage}-{keys[stage]}.pt"
        if path.exists() and not args.fresh:
            stored = torch.load(path, weights_only=False)
            clock.seconds[stage] = stored["seconds"]
            extra["cached_stages"].append(stage)
            print(f"[{time.strftime('%H:%M:%S')}] {stage}: loaded from {path} (measured {stored['seconds']:.0f}s)", flush=True)
            return stored["value"]
        with clock.stage(stage):
            value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"value": value, "seconds": clock.seconds[stage]}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return value

    # an ablation is measured by harmful refusal and harmless KL (no harmless decoding: 100 long prompts
    # x 32 tokens per method); the base model and the refusal-inducing run generate on both sets
    def ablation(name: str) -> None:
        runs[name] = measure(model, sets, gen, tokens, kl_base, harmless_refusal=False)
        checkpoint()

    runs["base model"], kl_base = cached("base_eval", lambda: measure_base(model, sets, gen, tokens))
    if not isinstance(kl_base, KLBase):  # a cache from before the answered-only KL: decode the harmless set once more
        flags = evaluate_set(model, sets["eval_harmless"], "harmless", gen, RefusalDetector()).refused
        kl_base = KLBase(kl_base, tuple(flags))
        path = args.cache.expanduser() / f"{args.results_name}-base_eval-{keys['base_eval']}.pt"
        torch.save({"value": (runs["base model"], kl_base), "seconds": clock.seconds["base_eval"]}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    config = DirectionConfig(batch_size=args.batch_size, n_select=args.n_select, filter_train=args.filter_train)
    result = cached("dim_selection", lambda: find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"], config))
    chosen = result.selection.chosen
    extra["dim_chosen"] = {"hook": chosen.hook, "position": chosen.position, "kept": chosen.kept, "reason": chosen.reason}
    extra["dim_selection"] = {"table": result.selection.to_dict(), "timings": result.timings}
    if args.merge:
        merge_previous(args.results_name, runs, extra, clock.seconds)
    checkpoint()
    if "dim" not in skip:
        with clock.stage("dim_abliteration"), abliterate(model, result, EditConfig()):
            ablation("dim_abliteration")
    if "induce" not in skip:
        vector = result.candidates.bases[chosen.index, 0] * result.candidates.scores["mean_diff_norm"][chosen.index]
        for scale in (float(x) for x in args.induce_scales.split(",")):
            name = "dim_actadd_induce" if scale == 1 else f"dim_actadd_induce x{scale:g}"
            with clock.stage(name), steer(model, AddDirection(vector, scale, where=chosen.hook)):
                runs[name] = measure(model, sets, gen, tokens, kl_base, harmful=False)
            checkpoint()
        if args.induce_set:
            unit = result.candidates.bases[chosen.index, 0]
            value = result.candidates.scores["harmful_projection"][chosen.index]
            with clock.stage("dim_projection_set_induce"), steer(model, ProjectionSet(unit, value, where=chosen.hook)):
                runs["dim_projection_set_induce"] = measure(model, sets, gen, tokens, kl_base, harmful=False)
            checkpoint()
    # probe directions at the DIM layer, last token, as weight projections (same edit code)
    hook = chosen.hook
    acts = {}
    if args.sae_dir is None and "sae" not in skip:
        print("SAE stage skipped: pass --sae-dir with an SAE trained at the DIM layer (python benchmarks/real_model_sae.py "
              "trains one and keeps it under ~/.cache/featsteer/real-model-sae/)", flush=True)
        skip.add("sae")
    if not {"sae", "probe_dirs"} <= skip:  # only these stages read the DIM-layer activations
        with clock.stage("probe_capture"):
            acts = {label: capture(model, sets[f"train_{label}"], [hook], positions="last", batch_size=args.batch_size, label=label)
                    for label in ("harmful", "harmless")}
    if "sae" not in skip:
        sae_stage(model, result, args, clock, ablation, extra, acts)
    for source in () if "probe_dirs" in skip else ("linear", "whitened"):
        direction = find_directions(acts["harmful"], acts["harmless"], source).direction(hook)
        extra[f"{source}_cosine_with_dim"] = float(direction @ result.chosen_basis[0] / result.chosen_basis[0].norm())
        with clock.stage(f"{source}_probe_abliteration"), apply_edit(model, direction):
            ablation(f"{source}_probe_abliteration")
    if "probes" not in skip:
        with clock.stage("probe_sweep"):
            layers = [int(x) for x in args.probe_layers.split(",")]
            extra["probe_sweep"] = probe_sweep(model, sets, layers, args.batch_size, args.probe_effect_prompts)
        checkpoint()
    if "per_layer" not in skip:  # each block removes the DIM candidate of the stream it writes into
        with clock.stage("dim_per_layer_abliteration"), abliterate(model, result, EditConfig(), scope="per_layer"):
            ablation("dim_per_layer_abliteration")
    if "norm_preserving" not in skip:
        with clock.stage("dim_norm_preserving"), abliterate(model, result, EditConfig(mode="norm_preserving")):
            ablation("dim_norm_preserving")
    if args.search:
        with clock.stage("dim_search"):
            runs["dim_search"], _ = run_search(model, result, sets, gen, tokens, kl_base, args.search,
                                               harmless_refusal=False, batch_size=args.batch_size,
                                               verify_top=args.verify_top, folder=args.search_dir, warm_start=args.warm_start,
                                               kl_prompts=args.search_kl, position=args.search_position)
        checkpoint()
    checkpoint()


def merge_previous(name: str, runs: dict, extra: dict, seconds: dict) -> None:
    """Fill in the stages of an earlier run of the same DIM choice; this run's stages overwrite them."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    if previous["extra"].get("dim_chosen") != extra["dim_chosen"]:
        raise SystemExit(f"--merge: {path} was measured with DIM direction {previous['extra'].get('dim_chosen')}, "
                         f"this run chose {extra['dim_chosen']}; run without --merge")
    for target, stored in ((runs, previous["runs"]), (extra, previous["extra"]), (seconds, previous["timings_s"])):
        for key, value in stored.items():
            target.setdefault(key, value)
    extra["settings"]["merged_from"] = previous["date"]


def sae_stage(model, result, args, clock, ablation, extra, acts) -> None:
    """Load the SAE at the DIM layer from `--sae-dir`, rank its features on the training prompts, project the top
    rows out."""
    from featsteer.features import decoder_directions
    from featsteer.sae import load_sae

    hook = f"blocks.{result.selection.chosen.layer}.hook_resid_pre"
    folder = args.sae_dir.expanduser()
    if not (folder / hook / "cfg.json").is_file():
        raise SystemExit(f"--sae-dir {folder} has no SAE at {hook} (the DIM layer this run chose): train one there with "
                         f"python benchmarks/real_model_sae.py --layer {result.selection.chosen.layer}, or pass --skip sae")
    saes = {hook: load_sae(folder / hook, model, hook)}
    metrics_file = folder / hook / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    with clock.stage("sae_rank"):
        scores = score_features(saes, acts["harmful"], acts["harmless"])
        harmful_leaning = scores.select((scores.column("mean_difference") > 0).nonzero().flatten()).sort("composite")
    best = harmful_leaning.top(args.sae_top_k)
    extra["sae"] = {"hook": hook, "metrics": {k: metrics[k] for k in ("d_sae", "explained_variance", "l0", "dead_fraction",
                                                                       "ce_loss_recovered", "tokens_per_second", "train_tokens",
                                                                       "unique_tokens", "capture_seconds", "train_seconds") if k in metrics},
                    "top_features": best.rows()}
    sae = saes[hook]
    ids = [int(i) for i in best.feature_ids]
    top1 = decoder_directions(sae, ids[:1]).bases[0]
    topk = decoder_directions(sae, ids, subspace=True).bases[0]
    dim = result.chosen_basis[0] / result.chosen_basis[0].norm()
    extra["sae"]["top1_cosine_with_dim"] = float(top1[0] @ dim)
    extra["sae"]["dim_norm_in_topk_span"] = float((topk @ dim).norm())
    for name, basis in (("sae_top1_abliteration", top1), (f"sae_top{len(ids)}_abliteration", topk)):
        with clock.stage(name), apply_edit(model, basis):
            ablation(name)


def probe_sweep(model, sets, layers, batch_size, n_effect) -> dict:
    """Probe sweep + predict-control on the given layers (train: the 256/256 sets; test: the held-out 100/100)."""
    from featsteer.probe_report import probe_report

    report = probe_report(model, (sets["train_harmful"], sets["train_harmless"]), (sets["eval_harmful"], sets["eval_harmless"]),
                          layers=layers, n_effect=n_effect, batch_size=batch_size)
    return report.to_json()


def write(model, sets, runs, extra, seconds, name: str) -> None:
    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads(),
               "sets": {k: {"n": len(v), "source": v.source, "sha256": v.sha256} for k, v in sets.items()},
               "runs": runs, "extra": extra, "timings_s": seconds}
    render(payload, name, {f"{name}.json": json_text(payload, indent=1, default=str) + "\n"})


def render(payload: dict, name: str, files: dict[str, str] | None = None) -> None:
    """`{name}.md` from the JSON payload (`--render-only` re-renders a finished run). `files` (such as the JSON itself) are written with it, each whole."""
    runs, extra, seconds, sets = payload["runs"], payload["extra"], payload["timings_s"], payload["sets"]
    chosen = extra["dim_chosen"]
    how = "passed every filter" if chosen["kept"] else f"fallback, no candidate passed the filters; this one: {chosen['reason']}"
    lines = [f"# Every direction source on {payload['model']}", "",
             f"Measured {payload['date']} by `benchmarks/real_model.py` on CPU ({payload['threads']} threads), greedy decoding, "
             f"{sets['eval_harmful']['n']} held-out AdvBench and {sets['eval_harmless']['n']} held-out MT-Bench+IFBench prompts; "
             f"directions, probes and SAE features fitted on {sets['train_harmful']['n']} / {sets['train_harmless']['n']} others.", "",
             f"DIM direction chosen by the Arditi selection: `{chosen['hook']}` position {chosen['position']} ({how}).", "",
             "| run | refusal harmful | refusal harmless | KL harmless (first token) | KL answered | stage time (s) |", "|---|---|---|---|---|---|"]

    def rate(r: dict, kind: str) -> str:
        return f"{r[f'refused_{kind}']}/{r[f'n_{kind}']}" if f"refused_{kind}" in r else "not generated"

    for run, r in runs.items():
        kl = "0" if run == "base model" else fmt(r["kl_harmless"], ".4f")
        answered = "0" if run == "base model" else "-" if r.get("kl_harmless_answered") is None else f"{r['kl_harmless_answered']:.4f}"
        stage = seconds.get("base_eval", "") if run == "base model" else seconds.get(run, "")
        lines.append(f"| {run} | {rate(r, 'harmful')} | {rate(r, 'harmless')} | {kl} | {answered} | {stage} |")
    lines += ["", "Ablations are measured by harmful refusal and harmless first-token KL; the harmless set is decoded for the "
              "base model and the refusal-inducing run only (\"not generated\": one prefill of the 100 harmless prompts for "
              "the KL, no decoding). KL answered: the mean over the harmless prompts the base model answers (the ones it "
              "refuses change, rightly, when refusal is removed); \"-\": measured before this column existed."]
    table = extra.get("dim_selection", {}).get("table", {})
    # a finalist is kept or fails the KL filter, the induce filter or both ("kl too high, no induced refusal")
    finalists = [c for c in table.get("candidates", []) if set(c["reason"].split(", ")) <= {"kept", "kl too high", "no induced refusal"}]
    if finalists:
        lines += ["", f"Selection finalists ({payload['extra']['settings']['n_select']} validation prompts per set; refusal log-odds "
                  f"of harmful prompts {table['base_refusal_harmful']:.2f} unablated):", "",
                  "| candidate | refusal score ablated | KL harmless | refusal score induced | verdict |", "|---|---|---|---|---|"]
        lines += [f"| `{c['hook']}` pos {c['position']} | {fmt(c['refusal_ablated'], '.2f')} | {fmt(c['kl_harmless'], '.3f')} | {fmt(c['refusal_induced'], '.2f')} | {c['reason']} |"
                  for c in finalists]
    if "dim_search" in runs:
        info = runs["dim_search"]["search"]
        lines.append(f"\nSearch: {info['n_trials']} optuna trials, Pareto front of {info['pareto_size']}, chosen parameters {info['best_params']}.")
        lines += pareto_table(info)
    for source in ("linear", "whitened"):
        if f"{source}_cosine_with_dim" in extra:
            lines.append(f"\n{source} probe direction at the DIM layer: cosine with DIM {extra[f'{source}_cosine_with_dim']:.4f}.")
    if "sae" in extra:
        m = extra["sae"]["metrics"]
        lines += ["", f"SAE at `{extra['sae']['hook']}` (topk, d_sae {m.get('d_sae')}): explained variance {fmt(m.get('explained_variance'), '.3f')}, "
                  f"L0 {fmt(m.get('l0'), '.1f')}, dead {fmt(m.get('dead_fraction'), '.3f')}, CE loss recovered {fmt(m.get('ce_loss_recovered'), '.3f')}, "
                  f"{m.get('train_tokens')} training tokens ({m.get('unique_tokens')} unique) at {m.get('tokens_per_second', 0):.0f} tokens/s "
                  f"(training; capture {m.get('capture_seconds', 0):.0f}s). Top feature's decoder row vs DIM: cosine {extra['sae']['top1_cosine_with_dim']:.3f}; "
                  f"norm of DIM inside the top-k span: {extra['sae']['dim_norm_in_topk_span']:.3f}."]
    if "probe_sweep" in extra:
        lines += ["", "Probe sweep (last-token resid_pre; held-out accuracy / selectivity):", "",
                  "| hook | " + " | ".join(extra["probe_sweep"]["sweep"]) + " |", "|---" * (1 + len(extra["probe_sweep"]["sweep"])) + "|"]
        for i, hook in enumerate(extra["probe_sweep"]["hooks"]):
            cells = [f"{rows[i]['accuracy']:.3f} / {rows[i]['selectivity']:.3f}" for rows in extra["probe_sweep"]["sweep"].values()]
            lines.append(f"| {hook} | " + " | ".join(cells) + " |")
        lines += ["", "Predict vs control (first-token refusal-score drop and KL when each source is ablated at every residual write):", "",
                  "| layer | source | AUROC | refusal-score drop | KL harmless |", "|---|---|---|---|---|"]
        lines += [f"| {e['layer']} | {e['source']} | {e['auroc']:.3f} | {e['refusal_drop']:.3f} | {e['kl_harmless']:.4f} |" for e in extra["probe_sweep"]["effects"]]
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""]
    lines += [f"Note: {note}\n" for note in extra.get("notes", [])]  # written by hand into the JSON, e.g. about pauses
    write_files(RESULTS, {**(files or {}), f"{name}.md": "\n".join(lines)})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
