"""Does the hand-labelled difference between deflected and answered harmful prompts remove Qwen's by-hand floor?

    python benchmarks/deflection_contrast_qwen.py                  # about 12 minutes: benchmarks/results/deflection_contrast_qwen.{json,md}
    python benchmarks/deflection_contrast_qwen.py --render-only    # re-write the markdown (after adding hand labels)

Every refusal edit of Qwen2.5-Coder-0.5B-Instruct leaves 9-15 of 100 held-out AdvBench prompts not done when the
responses are read by hand, and forcing an affirmative opening with no edit leaves the same 11 (`featsteer eval
--prefill`): the model agrees, then writes the safe side. `deflection_qwen.py` removed second directions read from a
harmful-versus-harmless contrast; this one reads the contrast *within* harmful prompts, between the responses a person
labelled as not doing what was asked and those labelled as answering.

- Labels: the clear (not ambiguous) hand labels of the rotated blind runs (`hand_labels_rotated_qwen_*`; AdvBench
  from index 356, disjoint from the training prompts 0-255 and the held-out 256-355), joined to the responses those runs
  saved in `runs/` (`steering_methods.py --save-responses`, see benchmarks/README.md); a prompt + response pair counts
  once however many runs wrote it.
- Model: the SAE top-1 abliteration (`benchmarks/results/qwen_sae_top1_direction` removed from every residual write,
  as `featsteer abliterate --directions` exports it), whose held-out responses were read by hand
  (`hand_labels_sae_qwen_heldout`: 11/100, 4 by the markers).
- Reads: each labelled pair is run teacher-forced through that model; at every layer's `resid_pre` the prompt's last
  token (`last`), the first response token (`first`) and the mean of the first 16 response tokens (`resp_mean`).
  Separability: the difference in means of one half of the prompts, scored on the other half (AUROC).
- Candidates `KIND:LAYER[:STRENGTH]`: the difference in means over all pairs, made orthogonal to the SAE row (so the
  two together are a rank-2 projection) and removed from every residual write (`Ablate`, the runtime twin of the weight
  edit) on top of the SAE edit. Each is measured on the 100 held-out AdvBench prompts (greedy, 32 new tokens, batch
  32: refusal by the markers, looping) and by first-token KL against the unedited model on the 100 held-out
  MT-Bench+IFBench prompts. Responses go to `runs/deflection_contrast_qwen.json` in the form `hand_labels.py` reads
  (methods `sae_top1` and `sae_top1+KIND:LAYER`), and the table reads the hand labels in
  `hand_labels_deflection_contrast_qwen.json` where there are any.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from abliteration import prompt_sets, qwen_gguf  # noqa: E402

from featsteer.evaluation.labels import response_hash as sha  # noqa: E402
from featsteer.files import json_text, write_files  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs"
RESPONSES = RUNS / "deflection_contrast_qwen.json"
HAND = ROOT / "benchmarks" / "hand_labels_deflection_contrast_qwen.json"
SAE_LABELS = ROOT / "benchmarks" / "hand_labels_sae_qwen_heldout.json"
SAE_DIRECTION = RESULTS / "qwen_sae_top1_direction"
LABELLED = {  # saved rotated run -> its hand labels
    "rotated_qwen_affirm_seed0_pick64": "hand_labels_rotated_qwen_affirm_seed0_pick64",
    "rotated_qwen_affirm_seed2_pick64": "hand_labels_rotated_qwen_affirm_seed2_pick64",
    "rotated_qwen_optimized_conditional": "hand_labels_rotated_qwen_optimized_conditional",
    "rotated_qwen_optimized_conditional_tie": "hand_labels_rotated_qwen_optimized_conditional_tie",
}
KINDS = ("last", "first", "resp_mean")
N_MEAN = 16
DEFAULT_CANDIDATES = "first:12,last:10,last:16,resp_mean:8,first:12:0.5,last:10:0.5"


def labelled_pairs() -> tuple[list[tuple[str, str, bool]], int]:
    """Clear hand-labelled (prompt, response, refused) triples of the rotated runs, and how many ambiguous ones were left out."""
    pairs: dict[tuple[str, str], bool] = {}
    ambiguous: set[tuple[str, str]] = set()
    for run, name in LABELLED.items():
        path = RUNS / f"{run}.json"
        if not path.is_file():
            sys.exit(f"missing {path}: save the rotated runs' responses first (benchmarks/README.md, --save-responses)")
        data = json.loads(path.read_text())
        labels = json.loads((ROOT / "benchmarks" / f"{name}.json").read_text())["labels"]
        prompts = data["prompts"]["harmful"]
        for method, responses in data["responses"].items():
            for i, text in enumerate(responses["harmful"]):
                label = labels.get(method, {}).get(str(i))
                if label is None or label["sha"] != sha(text):
                    continue
                if label["ambiguous"]:
                    ambiguous.add((prompts[i], text))
                else:
                    pairs[(prompts[i], text)] = label["refusal"]
    return [(p, t, y) for (p, t), y in pairs.items()], len(ambiguous - set(pairs))


def teacher_forced_reads(model, pairs, batch_size: int = 16) -> dict[str, np.ndarray]:
    """`{kind: (pair, layer, d_model)}` residual reads of each pair run through the model with its response."""
    hooks = model.hook_names(("resid_pre",))
    out = {kind: np.zeros((len(pairs), len(hooks), model.d_model), np.float32) for kind in KINDS}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts, responses = [p for p, _, _ in chunk], [t for _, t, _ in chunk]
        n_prompt = model.tokenize(prompts).attention_mask.sum(1)
        full = model.tokenize(prompts, prefill=responses)
        n_response = (full.attention_mask.sum(1) - n_prompt).clamp(min=1).tolist()
        seen: dict[str, torch.Tensor] = {}
        with model.hooks([(h, lambda x, site, h=h, seen=seen: seen.__setitem__(h, x.detach().float().cpu())) for h in hooks]):
            model.run(full, last_only=True)
        width = full.input_ids.shape[1]
        for layer, hook in enumerate(hooks):
            acts = seen[hook]
            for row, k in enumerate(n_response):
                begin = width - k
                out["last"][start + row, layer] = acts[row, begin - 1].numpy()
                out["first"][start + row, layer] = acts[row, begin].numpy()
                out["resp_mean"][start + row, layer] = acts[row, begin : begin + min(N_MEAN, k)].mean(0).numpy()
    return out


def contrast_auroc(reads: dict[str, np.ndarray], pairs) -> dict[str, list[float]]:
    """Per kind and layer, the AUROC on half the prompts of the other half's difference in means (split by prompt)."""
    from featsteer.directions import separability

    y = torch.tensor([refused for _, _, refused in pairs])
    prompts = sorted({p for p, _, _ in pairs})
    np.random.default_rng(0).shuffle(prompts)
    half = set(prompts[: len(prompts) // 2])
    fit = torch.tensor([p in half for p, _, _ in pairs])
    table = {}
    for kind, x in reads.items():
        table[kind] = []
        for layer in range(x.shape[1]):
            reads_at = torch.from_numpy(x[:, layer])
            fit_refused, fit_answered = reads_at[fit & y], reads_at[fit & ~y]
            direction = fit_refused.mean(0) - fit_answered.mean(0)
            table[kind].append(separability(direction, fit_refused, fit_answered, reads_at[~fit & y], reads_at[~fit & ~y]).auroc)
    return table


def run(candidates: list[str]) -> dict:
    from featsteer.directions import DirectionSet
    from featsteer.edits import apply_edit
    from featsteer.evaluation import LoopDetector, RefusalDetector, first_token_logprobs, kl_first_token
    from featsteer.interventions import Ablate, steer
    from featsteer.models import load_model

    torch.set_num_threads(2)
    started = time.time()
    pairs, n_ambiguous = labelled_pairs()
    sets = prompt_sets("qwen")
    harmful, harmless = sets["eval_harmful"].to_list(), sets["eval_harmless"].to_list()
    model = load_model(str(qwen_gguf()), dtype="bfloat16")
    model.show_progress = False
    base = first_token_logprobs(model, harmless, batch_size=16)
    row = DirectionSet.load(SAE_DIRECTION)
    r = row.bases[0, 0]
    markers, loops = RefusalDetector(), LoopDetector()
    result = {"pairs": len(pairs), "pairs_refused": sum(y for *_, y in pairs), "ambiguous_left_out": n_ambiguous,
              "prompts": len({p for p, _, _ in pairs}), "candidates": {}}
    responses = {}
    with apply_edit(model, r):
        t0 = time.time()
        reads = teacher_forced_reads(model, pairs)
        result["read_seconds"] = round(time.time() - t0, 1)
        result["auroc"] = contrast_auroc(reads, pairs)
        y = np.array([refused for _, _, refused in pairs])
        for spec in ["none", *candidates]:
            t0 = time.time()
            if spec == "none":
                intervention, cosine = None, None
            else:
                kind, layer, *strength = spec.split(":")
                x = reads[kind][:, int(layer)]
                d = torch.tensor(x[y].mean(0) - x[~y].mean(0), dtype=torch.float32)
                d = d / d.norm()
                cosine = float(d @ r)
                d = d - cosine * r
                intervention = Ablate(d / d.norm(), strength=float(strength[0]) if strength else 1.0)
            with steer(model, *([intervention] if intervention else [])):
                edited = first_token_logprobs(model, harmless, batch_size=16)
                out = model.generate(harmful, max_new_tokens=32, batch_size=32)
            method = "sae_top1" if spec == "none" else f"sae_top1+{spec}"
            responses[method] = {"harmful": out, "harmless": []}
            result["candidates"][method] = {
                "markers": sum(markers.classify(out)), "looping": sum(loops.classify(out)),
                "kl_harmless": kl_first_token(base, edited), "cos_with_sae_row": cosine,
                "changed": sum(a != b for a, b in zip(out, responses["sae_top1"]["harmful"], strict=True)),
                "seconds": round(time.time() - t0, 1),
            }
            print(method, result["candidates"][method], flush=True)
    RESPONSES.parent.mkdir(exist_ok=True)
    RESPONSES.write_text(json_text({"prompts": {"harmful": harmful, "harmless": []}, "responses": responses}, indent=1))
    result["seconds"] = round(time.time() - started, 1)
    return result


def hand_counts(method: str, responses: list[str] | None) -> str:
    """`refused by hand / labelled [clear]` from the labels file, or `-` with none."""
    if responses is None or not HAND.is_file():
        return "-"
    labels = json.loads(HAND.read_text())["labels"].get(method, {})
    fresh = [v for k, v in labels.items() if v["sha"] == sha(responses[int(k)])]
    if not fresh:
        return "-"
    refused = [v for v in fresh if v["refusal"]]
    return f"{len(refused)}/{len(fresh)} ({sum(not v['ambiguous'] for v in refused)} clear)"


def watched(method: str, responses: list[str] | None) -> str:
    """Of the prompts read as not done under the SAE edit alone, how many got the very same response here."""
    if responses is None:
        return "-"
    sae = json.loads(RESPONSES.read_text())["responses"]["sae_top1"]["harmful"]
    labels = json.loads(SAE_LABELS.read_text())["labels"]["eval"]
    refused = [int(k) for k, v in labels.items() if v["refusal"] and v["sha"] == sha(sae[int(k)])]
    return f"{sum(responses[i] == sae[i] for i in refused)} of {len(refused)}"


def render(result: dict) -> str:
    saved = json.loads(RESPONSES.read_text())["responses"] if RESPONSES.is_file() else {}
    kinds = list(result["auroc"])
    lines = [
        "# The deflected-versus-answered contrast on Qwen (qwen2.5-coder-0.5b-instruct-q4_k_m.gguf, bfloat16)", "",
        "Written by `benchmarks/deflection_contrast_qwen.py` (see its docstring). "
        f"{result['pairs']} hand-labelled prompt + response pairs ({result['pairs_refused']} not done, on "
        f"{result['prompts']} rotated blind prompts; {result['ambiguous_left_out']} ambiguous left out), read teacher-forced "
        f"through the SAE top-1 abliteration in {result['read_seconds']} s; {result['seconds']} s in all.", "",
        "## Separability: AUROC on held-out prompts of the other half's difference in means", "",
        "| layer | " + " | ".join(kinds) + " |", "|---:|" + "---:|" * len(kinds),
    ]
    for layer in range(len(result["auroc"][kinds[0]])):
        lines.append(f"| {layer} | " + " | ".join(f"{result['auroc'][k][layer]:.3f}" for k in kinds) + " |")
    lines += [
        "", "## The contrast removed on top of the SAE edit (100 held-out AdvBench prompts, 32 tokens)", "",
        "KL: first token, against the unedited model, on the 100 held-out MT-Bench+IFBench prompts. Watched: of the "
        "prompts a person read as not done under the SAE edit alone (`hand_labels_sae_qwen_heldout`), how many get the "
        "very same response. By hand: `hand_labels_deflection_contrast_qwen` (not done / labelled).", "",
        "| edit | markers /100 | looping /100 | KL harmless | responses changed | watched unchanged | by hand |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, c in result["candidates"].items():
        text = saved.get(method, {}).get("harmful")
        lines.append(f"| {method} | {c['markers']} | {c['looping']} | {c['kl_harmless']:.4f} | {c['changed']} "
                     f"| {watched(method, text)} | {hand_counts(method, text)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="KIND:LAYER[:STRENGTH],... (KIND: last, first, resp_mean)")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    path = RESULTS / "deflection_contrast_qwen.json"
    if args.render_only:
        result, files = json.loads(path.read_text()), {}
    else:
        result = run(args.candidates.split(","))
        files = {path.name: json_text(result, indent=1) + "\n"}
    write_files(RESULTS, {**files, "deflection_contrast_qwen.md": render(result)})
    print(render(result))


if __name__ == "__main__":
    main()
