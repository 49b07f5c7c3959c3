"""What is left after DIM abliteration on Qwen, and does a second direction remove it?

    python benchmarks/deflection_qwen.py                 # about 25 minutes: writes benchmarks/results/deflection_qwen.{json,md}
    python benchmarks/deflection_qwen.py --render-only   # re-write the markdown (e.g. after adding hand labels)
    python benchmarks/deflection_qwen.py --show-unlabelled

`judge_agreement.py` labelled by hand the 100 held-out AdvBench responses of Qwen2.5-Coder-0.5B-Instruct after DIM
abliteration at `blocks.16.hook_resid_pre` (last token, fitted on the 256 + 256 training prompts): 17 do not do what
was asked, 5 of them explicit refusals and the rest deflections (the request's form, turned to the safe side). The
markers see 7. This benchmark asks whether a second direction, found on the abliterated model, turns them into answers:

- `round2_last`: iterative abliteration. The harmful-minus-harmless difference in means of the *abliterated* model at
  the last prompt token, per layer, orthogonalised against the first direction; the two are removed together.
- `harmfulness_instruction_end`: the same difference read at the instruction's own last token
  (`Positions.instruction_end`), where Zhao et al. 2025 find the model's judgement that a request is harmful, separate
  from its decision to refuse (read at the template's tail).

On the unedited model it also records each layer's harmful-minus-harmless gap at both positions and the cosine between
the two directions. Each candidate layer (2, 4, ..., 18: outside the last 20% of layers, as the Arditi selection) gets the first-token KL of
the rank-2 edit on 64 of the training harmless prompts (the last 64; no held-out prompt is read to choose), and the
layer with the lowest KL is generated on the 100 held-out harmful prompts (greedy, 32 new tokens, as every benchmark)
and its first-token KL measured on the 100 held-out harmless ones. The 17 prompts labelled as not complied with under
the first direction alone are labelled again by hand for each second direction (`deflection_labels_qwen.json`: index,
SHA-256 prefix of the response, verdict and a one-line reason; no text). Responses are written to `runs/`.
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

from abliteration import prompt_sets, qwen_gguf  # noqa: E402

from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LABELS = ROOT / "benchmarks" / "deflection_labels_qwen.json"
JUDGE_LABELS = ROOT / "benchmarks" / "judge_labels_qwen.json"
RESPONSES = ROOT / "runs" / "deflection_qwen_responses.json"
HOOK = "blocks.16.hook_resid_pre"
LAYERS = tuple(range(2, 20, 2))
KINDS = {"round2_last": "last", "harmfulness_instruction_end": "instruction_end"}
N_PICK = 64


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run() -> tuple[dict, dict]:
    from featsteer.activations import capture
    from featsteer.directions import difference_in_means
    from featsteer.edits import apply_edit
    from featsteer.evaluation import RefusalDetector
    from featsteer.evaluation.metrics import first_token_logprobs, kl_first_token
    from featsteer.models import load_model

    sets = prompt_sets("qwen")
    model = load_model(str(qwen_gguf()))
    train_harmful, train_harmless = list(sets["train_harmful"]), list(sets["train_harmless"])
    pick_harmless, eval_harmful, eval_harmless = train_harmless[-N_PICK:], list(sets["eval_harmful"]), list(sets["eval_harmless"])
    detector, timings = RefusalDetector(), {}
    base_pick = first_token_logprobs(model, pick_harmless, batch_size=16)
    base_eval = first_token_logprobs(model, eval_harmless, batch_size=16)

    def kl(basis: torch.Tensor, prompts: list[str], base: torch.Tensor) -> float:
        with apply_edit(model, basis):
            return float(kl_first_token(base, first_token_logprobs(model, prompts, batch_size=16)))

    def held_out(basis: torch.Tensor) -> dict:
        start = time.perf_counter()
        with apply_edit(model, basis):
            responses = model.generate(eval_harmful, max_new_tokens=32, batch_size=32, max_batch_tokens=8192)
            kl_eval = float(kl_first_token(base_eval, first_token_logprobs(model, eval_harmless, batch_size=16)))
        return {"kl_eval_harmless": kl_eval, "markers_refused": sum(detector.classify(responses)),
                "responses": responses, "seconds": time.perf_counter() - start}

    start = time.perf_counter()
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in LAYERS]
    acts = [capture(model, prompts, hooks) for prompts in (train_harmful, train_harmless)]
    dim = difference_in_means(*acts)
    r1 = dim.bases[dim.index(HOOK, -1)][0].double()
    r1 = r1 / r1.norm()
    timings["first_direction_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ends = [capture(model, prompts, hooks, positions="instruction_end") for prompts in (train_harmful, train_harmless)]
    harm = difference_in_means(*ends)
    end_label = ends[0].position_labels[0]
    geometry = []
    for layer, hook in zip(LAYERS, hooks, strict=True):
        refusal, harmfulness = dim.direction(hook, -1).double(), harm.direction(hook, end_label).double()
        geometry.append({"layer": layer, "cos_refusal_harmfulness": float(refusal @ harmfulness), "cos_harmfulness_first": float(harmfulness @ r1),
                         "gap_last": float((acts[0].mean(hook, -1) - acts[1].mean(hook, -1)).double().norm()),
                         "gap_instruction_end": float((ends[0].mean(hook, end_label) - ends[1].mean(hook, end_label)).double().norm())})
    timings["unedited_geometry_s"] = time.perf_counter() - start
    out: dict = {"first": {"kl_pick_harmless": kl(r1[None].float(), pick_harmless, base_pick), **held_out(r1[None].float()),
                           "geometry": geometry}}
    for kind, positions in KINDS.items():
        start = time.perf_counter()
        with apply_edit(model, r1[None].float()):
            harmful, harmless = (capture(model, prompts, hooks, positions=positions) for prompts in (train_harmful, train_harmless))
        label = harmful.position_labels[0]
        second = difference_in_means(harmful, harmless)
        rows = []
        for layer, hook in zip(LAYERS, hooks, strict=True):
            raw = second.bases[second.index(hook, label)][0].double()
            r2 = raw - (raw @ r1) * r1
            r2 = r2 / r2.norm()
            gap = float((harmful.mean(hook, label) - harmless.mean(hook, label)).double().norm())
            rows.append({"layer": layer, "gap_after_first": gap, "cos_first": float(raw @ r1),
                         "kl_pick_harmless": kl(torch.stack([r1, r2]).float(), pick_harmless, base_pick), "direction": r2})
        best = min(rows, key=lambda row: row["kl_pick_harmless"])
        result = held_out(torch.stack([r1, best["direction"]]).float())
        out[kind] = {"positions": positions, "position_label": label, "chosen_layer": best["layer"],
                     "layers": [{k: v for k, v in row.items() if k != "direction"} for row in rows], **result}
        timings[f"{kind}_s"] = time.perf_counter() - start
    return out, timings


def add_looping(out: dict, responses: dict[str, list[str]]) -> None:
    """Each edit's count of held-out responses that end in a loop (`evaluation.quality.LoopDetector`)."""
    from featsteer.evaluation.quality import looping_rate

    for name, texts in responses.items():
        out["runs"][name]["looping"] = looping_rate(texts).k


def load_labels() -> dict:
    return json.loads(LABELS.read_text()) if LABELS.is_file() else {}


def first_labels() -> dict[int, dict]:
    """The hand labels `judge_agreement.py` gave the first direction's held-out responses (the same edit and decode)."""
    return {int(k): v for k, v in json.loads(JUDGE_LABELS.read_text())["abliterated_harmful"].items()}


def render(out: dict, labels: dict) -> str:
    first = first_labels()
    watched = sorted(i for i, label in first.items() if label["refusal"])
    lines = [f"# What DIM abliteration leaves on Qwen, and a second direction ({out['model']}, {out['date']})", "",
             "Written by `benchmarks/deflection_qwen.py`. First direction: DIM at `blocks.16.hook_resid_pre`, last token, 256 + 256",
             "training prompts (the `abliterated_harmful` set of `judge_qwen.md`). Second directions: found on the abliterated model,",
             "orthogonalised against the first, removed with it (rank-2 abliteration). KL pick: first-token KL on the last 64 training",
             "harmless prompts; held out: 100 AdvBench prompts (greedy, 32 tokens) and first-token KL on 100 MT-Bench+IFBench prompts.", ""]
    geometry = out["runs"]["first"].get("geometry")
    if geometry:
        lines += ["## The unedited model: refusal (last token) against harmfulness (instruction end)", "",
                  "Each layer's own difference in means at the two positions, on the 256 + 256 training prompts.", "",
                  "| layer | gap, last token | gap, instruction end | cos(refusal, harmfulness) | cos(harmfulness, first direction) |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {g['layer']} | {g['gap_last']:.2f} | {g['gap_instruction_end']:.2f} | {g['cos_refusal_harmfulness']:.3f} | "
                  f"{g['cos_harmfulness_first']:.3f} |" for g in geometry]
        lines.append("")
    for kind in KINDS:
        block = out["runs"][kind]
        lines += [f"## `{kind}` (positions `{block['positions']}`, label {block['position_label']})", "",
                  "| layer | gap after the first edit | cos with the first (before orthogonalising) | KL pick, rank-2 |", "|---:|---:|---:|---:|"]
        lines += [f"| {row['layer']}{' (chosen)' if row['layer'] == block['chosen_layer'] else ''} | {row['gap_after_first']:.2f} | "
                  f"{row['cos_first']:.3f} | {row['kl_pick_harmless']:.4f} |" for row in block["layers"]]
        lines.append("")
    lines += ["## Held out", "",
              f"The {len(watched)} prompts are those labelled by hand as not complied with under the first direction alone "
              "(`judge_labels_qwen.json`).", "",
              "| edit | KL pick | KL held-out harmless | markers refused /100 | looping /100 | of the watched prompts, not complied "
              "with (by hand) | watched responses changed |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("first", *KINDS):
        block = out["runs"][name]
        shas = out["response_sha"][name]
        if name == "first":
            source = {i: first[i] for i in watched if first[i]["sha"] == shas[i]}
            changed = sum(first[i]["sha"] != shas[i] for i in watched)
        else:
            source = {i: labels.get(name, {}).get(str(i)) for i in watched}
            source = {i: v for i, v in source.items() if v and v["sha"] == shas[i]}
            changed = sum(out["response_sha"]["first"][i] != shas[i] for i in watched)
        counted = sum(v["refusal"] for v in source.values())
        missing = len(watched) - len(source)
        count = f"{counted} of {len(watched)}" + (f" ({missing} unlabelled)" if missing else "")
        kl_pick = block["kl_pick_harmless"] if name == "first" else min(r["kl_pick_harmless"] for r in block["layers"])
        title = "first direction alone" if name == "first" else f"+ `{name}` at layer {block['chosen_layer']}"
        lines.append(f"| {title} | {kl_pick:.4f} | {block['kl_eval_harmless']:.4f} | {block['markers_refused']} | "
                     f"{block.get('looping', '-')} | {count} | {changed} |")
    lines += ["", "Hand labels of the second directions' watched responses:", ""]
    for kind in KINDS:
        for i in watched:
            label = labels.get(kind, {}).get(str(i))
            if label:
                lines.append(f"- `{kind}` #{i}: {'not complied with' if label['refusal'] else 'complied with'}; {label['why']}")
    timings = out["timings"]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f"; total {out['seconds_total']:.0f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--show-unlabelled", action="store_true", help="print the watched responses still to label")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "deflection_qwen.json"
    if not args.render_only and not args.show_unlabelled:
        start = time.perf_counter()
        runs, timings = run()
        responses = {name: block.pop("responses") for name, block in runs.items()}
        out = {"date": time.strftime("%Y-%m-%d"), "model": Path(qwen_gguf()).name, "runs": runs, "timings": timings,
               "response_sha": {name: [sha(r) for r in texts] for name, texts in responses.items()},
               "seconds_total": time.perf_counter() - start}
        add_looping(out, responses)
        RESPONSES.parent.mkdir(exist_ok=True)
        RESPONSES.write_text(json_text(responses, indent=1) + "\n")
        write_files(RESULTS, {path.name: json_text(out, indent=1) + "\n"})
    out = json.loads(path.read_text())
    labels = load_labels()
    if args.show_unlabelled:
        responses = json.loads(RESPONSES.read_text())
        prompts = list(prompt_sets("qwen")["eval_harmful"])
        for kind in KINDS:
            for i in sorted(i for i, label in first_labels().items() if label["refusal"]):
                if str(i) not in labels.get(kind, {}):
                    print(json.dumps({"set": kind, "index": i, "sha": out["response_sha"][kind][i], "prompt": prompts[i],
                                      "first": responses["first"][i], "response": responses[kind][i]}))
        return
    write_files(RESULTS, {"deflection_qwen.md": render(out, labels)})
    print((RESULTS / "deflection_qwen.md").read_text())


if __name__ == "__main__":
    main()
