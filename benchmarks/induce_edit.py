"""Does the permanent induce edit make a model refuse harmless prompts? `abliterate --reverse/--induce` against the
runtime activation addition of the same direction, on the same held-out harmless prompts.

    python benchmarks/induce_edit.py --target organism     # about 2 minutes
    python benchmarks/induce_edit.py --target qwen         # about 25 minutes

The directions issue asks for a reverse-abliteration weight edit (`W + a r r^T W`, `EditConfig(mode="amplify")`) and an
induce-refusal variant (`mode="induce"`: the same plus `shift * r` added to every token embedding). Both export as
plain weights. This measures them over a grid of amplifications `a` and shifts (in units of the median token-embedding
row norm, so that 1 moves every token by one typical embedding's length), next to the runtime addition of the DIM
mean difference at the chosen hook (`dim_actadd_induce` at 0.5x, 1x and 2x), which is what the issue's induce target
was measured with, and `abliterate --induce-bias` (`edits.add_through_biases`: the same addition written into biases,
here Qwen2's attention value biases spread over the blocks before the direction's layer, and for the organism, a Llama,
the MLP output bias of the block before it, which `mlp_bias` switches on) at a grid of scales and at the scale `featsteer compare`'s `dim_bias_induce` picks on validation prompts, and `abliterate --induce-template`
(`edits.add_at_tokens`: the same vector added to the embedding row of the chat template's own token, `<|assistant|>` or
Qwen's `assistant`, so only the prompt's end carries it) likewise, its scale as `dim_template_induce` picks it. Each row: harmless prompts refused (the `featsteer eval` detector), how many of those responses end
in a loop (`LoopDetector`), the refusals that do not loop, and the first-token KL from the unedited model.

Prompts as `abliteration.py`'s: Qwen directions from the first 256 AdvBench vs MT-Bench+IFBench prompts (16
validation prompts per class, screened selection, bfloat16), 100 held-out harmless prompts; the organism's from the
built-in train+val splits with fresh generated validation prompts, the 84 built-in harmless test prompts. Greedy, 32
new tokens, `--batch-size` prompts a generation batch (default 64 on Qwen, 16 on the organism) for the rows and the
validation picks alike: in bfloat16 a batch's padding can change a greedy response, so a pick generated at another batch
size than the rows it picked would be read under other arithmetic. Results: `benchmarks/results/induce_edit_<target>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import load_target, prompt_sets  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=["qwen", "organism"], default="organism")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alphas", default="1,2,4,8", help="comma list of amplifications for the shift-free rows")
    parser.add_argument("--shifts", default="0.25,0.5,1,2", help="comma list of embedding shifts (x the median embedding norm), at alpha 1")
    parser.add_argument("--scales", default="0.25,0.5,1,2", help="comma list of activation-addition scales (x the DIM mean difference)")
    parser.add_argument("--bias-scales", default="0.5,0.75,1,1.5",
                        help="comma list of `abliterate --induce-bias` scales (x the DIM mean difference, written into biases)")
    parser.add_argument("--template-scales", default="0.25,0.5,1,2",
                        help="comma list of `abliterate --induce-template` scales (x the DIM mean difference, at the template's own token)")
    parser.add_argument("--n-pick", type=int, default=64, help="validation harmless prompts the picked --induce-bias/--induce-template scales read")
    parser.add_argument("--batch-size", type=int,
                        help="prompts per generation batch, for the rows and the validation picks alike (default: 64 on qwen, 16 on the organism)")
    parser.add_argument("--bias-decays", default="2",
                        help="comma list of --bias-decay values for the --induce-bias rows (the pick uses the first)")
    parser.add_argument("--results-name", help="results file stem (default: induce_edit_<target>)")
    parser.add_argument("--render-only", action="store_true", help="re-write the markdown from the results JSON")
    args = parser.parse_args()
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    path = RESULTS / (args.results_name or f"induce_edit_{args.target}")
    if args.render_only:
        write_files(RESULTS, {path.with_suffix(".md").name: render(json.loads(path.with_suffix(".json").read_text()))})
        return
    torch.set_num_threads(args.threads)
    out = run(args)
    write_files(RESULTS, {path.with_suffix(".json").name: json_text(out, indent=1) + "\n", path.with_suffix(".md").name: render(out)})
    print(render(out))


def run(args: argparse.Namespace) -> dict:
    from featsteer.edits import EditConfig, apply_edit
    from featsteer.interventions import AddDirection, steer
    from featsteer.pipeline import find_refusal_direction

    started = time.perf_counter()
    gen = generation_config(args)
    sets = prompt_sets(args.target)
    model, config, val = load_target(args.target)
    result = find_refusal_direction(model, sets["train_harmful"], sets["train_harmless"], config, val=val, keep_activations=True)
    chosen = result.selection.chosen
    direction = result.chosen_basis[0].float()
    mean_difference = float(result.mean_difference(model).norm())
    embed_norm = _median_embedding_norm(model)
    harmless = sets["eval_harmless"]
    base = _harmless_row(model, harmless, gen, None)
    rows = [{"run": "unedited", "kind": "none", **base.pop("row")}]
    settings = ([("amplify", a, 0.0) for a in _floats(args.alphas)]
                + [("induce", 1.0, s) for s in _floats(args.shifts)])
    for mode, alpha, shift in settings:
        edit = EditConfig(mode=mode, alpha=alpha, shift=shift * embed_norm)
        with apply_edit(model, direction, edit):
            row = _harmless_row(model, harmless, gen, base["logprobs"])["row"]
        label = f"--reverse --alpha {alpha:g}" if mode == "amplify" else f"--induce --alpha {alpha:g} --shift {shift * embed_norm:.3g}"
        rows.append({"run": label, "kind": "weight edit", "mode": mode, "alpha": alpha, "shift_units": shift, **row})
        print(rows[-1]["run"], {k: rows[-1][k] for k in ("refused", "looping", "clean_refusals", "kl")}, flush=True)
    bias = _bias_rows(args, model, result, direction, mean_difference, harmless, gen, base["logprobs"]) if args.bias_scales else {"rows": []}
    rows.extend(bias.pop("rows"))
    template = (_template_rows(args, model, result, direction, mean_difference, harmless, gen, base["logprobs"])
                if args.template_scales else {"rows": []})
    rows.extend(template.pop("rows"))
    for scale in _floats(args.scales):
        with steer(model, AddDirection(direction, scale * mean_difference, where=chosen.hook)):
            row = _harmless_row(model, harmless, gen, base["logprobs"])["row"]
        rows.append({"run": f"activation addition {scale:g}x at {chosen.hook}", "kind": "runtime", "scale": scale, **row})
        print(rows[-1]["run"], {k: rows[-1][k] for k in ("refused", "looping", "clean_refusals", "kl")}, flush=True)
    return {"target": args.target, "model": model.name, "date": time.strftime("%Y-%m-%d"), "command": shlex.join(sys.argv[1:]),
            "threads": args.threads, "batch_size": gen.batch_size, "direction": {"hook": chosen.hook, "position": chosen.position},
            "mean_difference_norm": mean_difference, "median_embedding_norm": embed_norm, "n_harmless": len(harmless),
            "harmless_source": harmless.source, "bias_addition": bias, "template_addition": template, "rows": rows, "seconds_total": round(time.perf_counter() - started, 1)}


def _bias_rows(args, model, result, direction, mean_difference, harmless, gen, base_logprobs) -> dict:
    """`abliterate --induce-bias` at each of `--bias-scales`, and at the scale `featsteer compare`'s `dim_bias_induce` picks
    on `--n-pick` validation harmless prompts (never the evaluation ones): `{"rows": [...], ...}`, or why there are none."""
    from featsteer.edits import add_through_biases
    from featsteer.errors import FeatsteerError

    hook = result.selection.chosen.hook
    decays = _floats(args.bias_decays)

    def add(scale: float, decay: float = decays[0]):
        return add_through_biases(model, direction.double() * (scale * mean_difference), hook, decay=decay)

    try:
        with add(1.0) as handle:
            writers, edit = handle.record["bias_writers"], handle.record["edit"]
    except FeatsteerError as error:
        print(f"no bias rows: {error}", flush=True)
        return {"rows": [], "skipped": str(error)}
    out = {"writers": writers, "switched_on": edit.get("switched_on"), "exact_at_hook": edit["exact_at_hook"]}
    return {**out, **_picked_rows(args, model, result, add, _floats(args.bias_scales), decays, "--induce-bias", "weight edit (biases)",
                                  harmless, gen, base_logprobs)}


def _template_rows(args, model, result, direction, mean_difference, harmless, gen, base_logprobs) -> dict:
    """`abliterate --induce-template` (the same addition at the chat template's own tokens' embedding rows) at each of
    `--template-scales` and at the scale `dim_template_induce` picks on `--n-pick` validation harmless prompts."""
    from featsteer.edits import add_at_tokens, template_tokens
    from featsteer.errors import FeatsteerError

    try:
        tokens = template_tokens(model, list(result.train[1]))
    except FeatsteerError as error:
        print(f"no template rows: {error}", flush=True)
        return {"rows": [], "skipped": str(error)}

    def add(scale: float, variant: float = 0.0):
        return add_at_tokens(model, direction.double() * (scale * mean_difference), tokens)

    names = [model.tokenizer.convert_ids_to_tokens(t) for t in tokens]
    return {"tokens": names, **_picked_rows(args, model, result, add, _floats(args.template_scales), [0.0], "--induce-template",
                                            "weight edit (template token)", harmless, gen, base_logprobs)}


def _picked_rows(args, model, result, add, scales, variants, flag, kind, harmless, gen, base_logprobs) -> dict:
    """The scale `pick_induce_scale` picks for `add(scale, variants[0])` on `--n-pick` validation harmless prompts, then a row
    for every scale (those given and the picked one) and variant (`--bias-decay` values)."""
    from featsteer.compare import pick_induce_scale

    started = time.perf_counter()
    val_harmless = result.val[1].head(min(args.n_pick, len(result.val[1])))
    picked, rates = pick_induce_scale(model, add, val_harmless, batch_size=gen.batch_size)
    out = {"picked_scale": picked, "val_coherent_refusal": {str(k): v for k, v in rates.items()},
           "n_pick": len(val_harmless), "pick_seconds": round(time.perf_counter() - started, 1), "rows": []}
    print(f"{flag} scale picked on {len(val_harmless)} validation prompts: {picked:g} ({rates})", flush=True)
    for variant in variants:
        for scale in sorted({*scales, picked}):
            with add(scale, variant):
                row = _harmless_row(model, harmless, gen, base_logprobs)["row"]
            label = (f"{flag} --scale {scale:g}" + (f" --bias-decay {variant:g}" if len(variants) > 1 else "")
                     + (" (picked on validation)" if scale == picked and variant == variants[0] else ""))
            out["rows"].append({"run": label, "kind": kind, "scale": scale, "decay": variant,
                                "picked": scale == picked and variant == variants[0], **row})
            print(out["rows"][-1]["run"], {k: row[k] for k in ("refused", "looping", "clean_refusals", "kl")}, flush=True)
    return out


def generation_config(args: argparse.Namespace):
    """Greedy, 32 new tokens, `--batch-size` prompts a batch (64 on Qwen, 16 on the organism when not given): the one
    `GenerationConfig` both the rows and the validation picks generate with."""
    from featsteer.evaluation.behaviour import GenerationConfig

    batch_size = args.batch_size if args.batch_size is not None else (64 if args.target == "qwen" else GenerationConfig.batch_size)
    return GenerationConfig(max_new_tokens=32, batch_size=batch_size)


def _harmless_row(model, harmless, gen, base_logprobs) -> dict:
    """Refusals, loops and first-token KL of the model as it is now on the harmless prompts."""
    from featsteer.evaluation import RefusalDetector
    from featsteer.evaluation.behaviour import evaluate_set
    from featsteer.evaluation.metrics import kl_first_token
    from featsteer.evaluation.quality import LoopDetector

    result = evaluate_set(model, harmless, "harmless", gen, RefusalDetector(), keep_logprobs=True)
    looping = result.looping or tuple(LoopDetector().classify(result.responses))
    clean = [i for i, (r, loop) in enumerate(zip(result.refused, looping, strict=True)) if r and not loop]
    row = {"refused": sum(result.refused), "looping": sum(looping), "clean_refusals": len(clean), "n": len(result.refused),
           "empty": sum(1 for text in result.responses if not text.strip()),
           "kl": 0.0 if base_logprobs is None else kl_first_token(base_logprobs, result.first_logprobs),
           "examples": [result.responses[i][:120] for i in (clean[:1] or [0])] + [result.responses[1][:120]]}
    return {"row": row, "logprobs": result.first_logprobs}


def _median_embedding_norm(model) -> float:
    embed = next(w for w in model.residual_writers() if w.kind == "embed")
    weight, _ = embed.read()  # (d_model, vocab)
    return float(weight.float().norm(dim=0).median())


def _floats(spec: str) -> list[float]:
    return [float(x) for x in spec.split(",") if x.strip()]


def batch_text(out: dict) -> str:
    """The generation batch size of the rows and the picks; a run from before `--batch-size` (no `batch_size` in its JSON)
    generated the rows 64 prompts a batch on Qwen (16 on the organism) and the picks always 16."""
    if "batch_size" in out:
        return f"{out['batch_size']} prompts a generation batch for the rows and the validation picks alike"
    if out["target"] != "qwen":
        return "16 prompts a generation batch for the rows and the validation picks alike"
    return ("**old protocol**: the rows generated 64 prompts a batch but the validation picks of `--induce-bias`/`--induce-template` "
            "16, and in bfloat16 the batch changes greedy responses, so a picked scale was read under other arithmetic than its "
            "rows; these figures stand until a re-run, where `--batch-size` sets both")


def render(out: dict) -> str:
    lines = [f"# Permanent induce edits against activation addition ({out['target']}, {out['model']})", "",
             f"Measured by `python benchmarks/induce_edit.py {out['command']}` on {out['date']} ({out['threads']} threads, "
             f"{out['seconds_total']:.0f} s). Direction: DIM at `{out['direction']['hook']}` position {out['direction']['position']} "
             f"(mean difference length {out['mean_difference_norm']:.2f}; median token-embedding norm "
             f"{out['median_embedding_norm']:.3g}). {out['n_harmless']} held-out harmless prompts ({out['harmless_source']}), greedy, "
             f"32 new tokens, {batch_text(out)}. Refused: the `featsteer eval` detector; looping: `LoopDetector`; clean: refused and not looping; "
             "empty: responses with no text (the model ends its turn at once; the detector counts them as refusals, and so as clean "
             "ones); KL: first-token KL(unedited || edited).", "",
             "| run | kind | refused | looping | clean refusals | empty | KL | a response |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in out["rows"]:
        example = row["examples"][0].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['run']} | {row['kind']} | {row['refused']}/{row['n']} | {row['looping']} | {row['clean_refusals']} "
                     f"| {row.get('empty', '-')} | {row['kl']:.3f} | {example[:90]!r} |")
    bias = out.get("bias_addition")
    if bias and bias.get("skipped"):
        lines += ["", f"No `--induce-bias` rows: {bias['skipped']}"]
    elif bias:
        names = list(bias["writers"])
        rates = ", ".join(f"{k}: {v:.2f}" for k, v in bias["val_coherent_refusal"].items())
        where = f"the bias of {names[0]}" if len(names) == 1 else f"{len(names)} biases ({names[0]} to {names[-1]})"
        if bias.get("switched_on"):
            where += f", which `{bias['switched_on']}` switches on"
        if bias.get("exact_at_hook"):
            where += "; that equals the runtime addition at the hook"
        lines += ["", f"`--induce-bias` writes into {where}. The scale `featsteer compare`'s "
                  f"`dim_bias_induce` picks on {bias['n_pick']} validation harmless prompts (the smallest within 0.05 of the best "
                  f"coherent refusal rate, 32 new tokens; {bias['pick_seconds']:.0f} s): **{bias['picked_scale']:g}** (rates by scale: {rates})."]
    template = out.get("template_addition")
    if template and template.get("skipped"):
        lines += ["", f"No `--induce-template` rows: {template['skipped']}"]
    elif template and template.get("tokens"):
        rates = ", ".join(f"{k}: {v:.2f}" for k, v in template["val_coherent_refusal"].items())
        lines += ["", f"`--induce-template` adds the same vector to the embedding row of {', '.join(template['tokens'])} (the chat "
                  f"template's own token), so it acts at the prompt's end only. The scale `dim_template_induce` picks the same way on "
                  f"{template['n_pick']} validation harmless prompts ({template['pick_seconds']:.0f} s): **{template['picked_scale']:g}** "
                  f"(rates by scale: {rates})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
