"""Expert routing on a mixture-of-experts refusal organism: SteerMoE-style expert deactivation against DIM abliteration.

    python benchmarks/moe_organism.py     # writes benchmarks/results/moe_organism.{json,md}

No mixture-of-experts model that refuses can be downloaded here, so this trains one: the organism's own recipe
(`python -m featsteer.organism.train`, same corpus, seed and losses) with a Mixtral MLP of 8 experts of width 112, two per
token (`--experts 8 --d-mlp 112`), into `~/.cache/featsteer/moe-organism` (about 20-30 minutes, once; reused after).

1. Base behaviour on the built-in test split (from the training report), and DIM per layer fitted on the built-in train
   split as `organism.py` measures it: held-out accuracy on the test split at the layer 3-fold CV on the train split
   chooses (`demo.best_layer`; the test split takes no part in the choice).
2. `expert_routing` on the built-in train+val prompts: how far the harmful and harmless selection rates of each expert
   differ.
3. Sweeps on the test split: the top-n harmful-linked experts switched off (harmful refusal, harmless first-token KL),
   and switched on for harmless prompts (induced refusal).
   Each at both sites: the routing weights after the router's choice, and the router's logits before it (SteerMoE's
   own rule: the router picks the next expert in a switched-off one's place).
4. `featsteer.compare.compare` with DIM abliteration, `expert_deactivation` and `expert_deactivation_logits` on the same
   held-out prompts, settings picked on 32 + 32 fresh `organism-corpus:` prompts as `make demo` picks them.
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

from organism import dim_layer_lines, dim_layers, highest_layer_text  # noqa: E402

from featsteer.compare import compare, jailbreak_rows  # noqa: E402
from featsteer.datasets import builtin_prompts, load_prompts  # noqa: E402
from featsteer.evaluation import first_token_logprobs  # noqa: E402
from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set, responses_nll  # noqa: E402
from featsteer.evaluation.refusal import RefusalDetector  # noqa: E402
from featsteer.files import json_text, write_files  # noqa: E402
from featsteer.interventions import ExpertSteer, expert_routing, steer  # noqa: E402
from featsteer.models import load_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path.home() / ".cache" / "featsteer" / "moe-organism"
TRAIN_ARGS = ["--experts", "8", "--d-mlp", "112"]
METHODS = ["none", "dim_abliteration", "dim_ablation_hook", "dim_per_layer_abliteration", "expert_deactivation", "expert_deactivation_logits",
           "dim_actadd_induce"]
SITES = ("routing", "router_logits")
"""Where the experts are switched: the routing weights after the router's choice, or its logits before it (SteerMoE)."""
COUNTS = (1, 2, 4, 8, 12, 16)
MAX_NLL_RISE = 0.5


def train_if_missing(out: Path) -> dict:
    if not (out / "config.json").is_file():
        report = out.with_name(out.name + "-report")
        subprocess.run([sys.executable, "-m", "featsteer.organism.train", "--out", str(out), "--report", str(report), *TRAIN_ARGS],
                       check=True, cwd=ROOT)
    report = out.with_name(out.name + "-report") / "metrics.json"
    return json.loads(report.read_text()) if report.is_file() else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=CACHE, help="the MoE organism's folder (trained there when missing)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    training = train_if_missing(args.model)
    model = load_model(str(args.model))
    train = {label: builtin_prompts(label, "train") + builtin_prompts(label, "val") for label in ("harmful", "harmless")}
    test = {label: builtin_prompts(label, "test") for label in ("harmful", "harmless", "alarming")}
    gen = GenerationConfig(max_new_tokens=32)
    dim_table, dim_chosen = dim_layers(model)

    clock = time.perf_counter()
    routing = expert_routing(model, train["harmful"].to_list(), train["harmless"].to_list())
    routing_seconds = time.perf_counter() - clock
    base = first_token_logprobs(model, test["harmless"].to_list())
    detector = RefusalDetector()
    plain = evaluate_set(model, test["harmless"].to_list(), "harmless", gen, detector)
    sweep = [{"experts": 0, "at": None, "deactivated": {}, "unanswered_harmful": None, "kl_harmless": 0.0,
              "base_nll_harmless": responses_nll(model, plain), "looping_harmless": plain.looping_rate.rate,
              "activated_refusal_harmless": plain.rate.rate}]
    per_token, n_experts = model.experts_per_token, model.n_experts
    for at in SITES:
        for n in COUNTS:
            chosen = routing.top(n)
            if at == "router_logits" and per_token and any(len(experts) > n_experts - per_token for experts in chosen.values()):
                # the router would still pick some of them (ExpertSteer refuses it, as compare's SteerMoE pick skips it)
                sweep.append({"experts": n, "at": at, "deactivated": {str(k): v for k, v in chosen.items()}, "skipped":
                              f"more than {n_experts - per_token} of a layer's {n_experts} experts, so its router would still pick some"})
                continue
            # switched on, at most the router's own count per layer: the most harmful-linked first (`top` lists them so)
            activated = {layer: experts[:per_token] if per_token else experts for layer, experts in chosen.items()}
            (unanswered, kl), = jailbreak_rows(model, {n: lambda chosen=chosen, at=at: steer(model, ExpertSteer(deactivate=chosen, at=at))},
                                               test["harmful"].to_list(), test["harmless"].to_list(), base, gen).values()
            with steer(model, ExpertSteer(deactivate=chosen, at=at)):
                answered = evaluate_set(model, test["harmless"].to_list(), "harmless", gen, detector)
            with steer(model, ExpertSteer(activate=activated, at=at)):
                induced = evaluate_set(model, test["harmless"].to_list(), "harmless", gen, detector).rate.rate
            sweep.append({"experts": n, "at": at, "deactivated": {str(k): v for k, v in chosen.items()}, "unanswered_harmful": unanswered,
                          "kl_harmless": kl, "base_nll_harmless": responses_nll(model, answered),
                          "looping_harmless": answered.looping_rate.rate, "activated_refusal_harmless": induced,
                          "activated": {str(k): v for k, v in activated.items()},
                          "example_harmless": answered.responses[:3]})
    val = {"val_harmful": load_prompts("organism-corpus:harmful:96"), "val_harmless": load_prompts("organism-corpus:harmless:96")}
    comparison = compare(model, train["harmful"], train["harmless"], methods=METHODS, eval_harmful=test["harmful"],
                         eval_harmless=test["harmless"], alarming=test["alarming"], generation=gen, max_nll_rise=None, **val)
    # the same picks weighed by the KL along the unedited model's own validation answers instead of the first token's
    by_response = compare(model, train["harmful"], train["harmless"], methods=["dim_abliteration", "expert_deactivation", "expert_deactivation_logits"],
                          eval_harmful=test["harmful"], eval_harmless=test["harmless"], alarming=test["alarming"], generation=gen,
                          pick_kl="response", max_nll_rise=None, **val)
    refusal = {name: {k: row[k] for k in ("k", "n", "rate")} for name, row in training.get("refusal", {}).items()}
    # (both without the coherence bound, to show what the picks do unguarded) and with it: a setting whose validation harmless answers cost the unedited model 0.5 nats per token
    # more than its own counts as answering nothing
    bounded = compare(model, train["harmful"], train["harmless"], methods=["dim_abliteration", "expert_deactivation", "expert_deactivation_logits"],
                      eval_harmful=test["harmful"], eval_harmless=test["harmless"], alarming=test["alarming"], generation=gen,
                      max_nll_rise=MAX_NLL_RISE, **val)
    payload = {"date": time.strftime("%Y-%m-%d"), "train_args": TRAIN_ARGS,
               "training": {k: training.get(k) for k in ("train_seconds", "n_parameters", "final_loss")},
               "base_refusal": refusal, "dim_layers": dim_table, "dim_chosen": dim_chosen,
               "routing": routing.to_dict(16),
               "routing_seconds": round(routing_seconds, 1), "sweep": sweep, "comparison": comparison.to_json(),
               "comparison_pick_response_kl": by_response.to_json(), "comparison_coherence_bound": bounded.to_json(),
               "seconds": round(time.perf_counter() - started, 1)}
    text = markdown(payload, routing, comparison, by_response, bounded)
    write_files(RESULTS, {"moe_organism.json": json_text(payload, indent=1, default=str) + "\n", "moe_organism.md": text})
    print(text)


def dim_lines(payload: dict) -> list[str]:
    """The DIM section: per-layer CV and held-out accuracy, and the held-out accuracy at the layer the CV chooses."""
    table, chosen = payload["dim_layers"], payload["dim_chosen"]
    return (["", "DIM direction (difference in means of last-token `resid_pre`, fitted on the built-in train split), accuracy / AUROC:", ""]
            + dim_layer_lines(table)
            + ["", f"DIM accuracy on the built-in test split at the layer chosen by 3-fold CV on the train split ({chosen}): "
               f"{table[chosen]['accuracy']:.3f}. {highest_layer_text(table)}"])


def markdown(payload: dict, routing, comparison, by_response, bounded) -> str:
    rd = routing.risk_difference
    lines = ["# Expert deactivation against DIM abliteration on an MoE refusal organism", "",
             f"Measured {payload['date']} by `benchmarks/moe_organism.py` ({payload['seconds']:.0f} s after training, CPU). The model is "
             f"the organism's recipe with a Mixtral MLP (`python -m featsteer.organism.train {' '.join(payload['train_args'])}`). "
             "Routing from the built-in train+val prompts (every prompt token); every number below on the built-in test split "
             "(85 harmful, 84 harmless, 38 alarming-but-harmless prompts), greedy decoding, 32 new tokens.", "",
             "## The model", "",
             f"{payload['training']['n_parameters']:,} parameters, trained in {payload['training']['train_seconds']:.0f} s (final loss "
             f"{payload['training']['final_loss']:.3f}). Refusal rates from its training report:", "",
             "| set | refused | rate |", "|---|---:|---:|"]
    lines += [f"| {name} | {row['k']}/{row['n']} | {row['rate']:.3f} |" for name, row in payload["base_refusal"].items()]
    lines += dim_lines(payload)
    lines += ["", "## Routing", "",
             f"{len(routing.layers)} MoE layers x {routing.n_experts} experts; {routing.n_tokens[0]} harmful and {routing.n_tokens[1]} "
             f"harmless tokens read in {payload['routing_seconds']:.0f} s. Largest risk difference per layer (harmful rate - harmless "
             "rate): " + ", ".join(f"layer {layer}: {float(rd[i].max()):+.3f} / {float(rd[i].min()):+.3f}" for i, layer in enumerate(routing.layers)) + ".", "",
             "| rank | layer | expert | harmful rate | harmless rate | risk difference | 95% CI (bootstrap over prompts) |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {i} | {s.layer} | {s.expert} | {s.harmful_rate:.3f} | {s.harmless_rate:.3f} | {s.risk_difference:+.3f} | "
              f"[{s.ci[0]:+.3f}, {s.ci[1]:+.3f}] |" for i, s in enumerate(routing.ranked("harmful")[:10], 1)]
    lines += ["", "## The top-n harmful-linked experts switched off (harmful prompts) or on (harmless prompts)", "",
              "Switched off: the share of harmful prompts left unanswered (refused or looping), the harmless prompts' first-token "
              "KL, and how likely the unedited model finds the harmless responses (base NLL, nats per token) with the share that "
              "loop. Switched on: the share of harmless prompts refused. Row 0 is the unedited model. Site `routing`: the "
              "weights after the router's choice (a switched-off expert's share goes to the token's other expert); "
              "`router_logits`: SteerMoE's rule, the expert's logit set below the token's lowest so the router picks the next "
              "expert in its place (and, switched on, just above the highest). Switched on, a layer gets at most as many of the "
              "top n as its router sends each token to (the most harmful-linked first); at the router logits a count that would "
              "switch off more experts than a layer can spare is skipped, since its router would still pick some of them.", "",
              "| site | experts | off: harmful unanswered | off: KL harmless (first token) | off: base NLL harmless | off: looping harmless | on: harmless refused |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in payload["sweep"]:
        if "skipped" in row:
            lines.append(f"| {row['at']} | {row['experts']} | skipped: {row['skipped']} | | | | |")
            continue
        unanswered = "-" if row["unanswered_harmful"] is None else f"{row['unanswered_harmful']:.3f}"
        nll = "-" if row["base_nll_harmless"] is None else f"{row['base_nll_harmless']:.3f}"
        lines.append(f"| {row['at'] or '-'} | {row['experts']} | {unanswered} | {row['kl_harmless']:.4f} | {nll} | "
                     f"{row['looping_harmless']:.3f} | {row['activated_refusal_harmless']:.3f} |")
    lines += ["", "Harmless responses with the experts switched off (first three test prompts):", ""]
    lines += [f"- {row['at']}, {row['experts']} experts: " + " / ".join(repr(text) for text in row["example_harmless"])
              for row in payload["sweep"][1:] if "skipped" not in row]
    lines += ["", "## Every method on the same prompts (picks by the validation first-token KL, the default)", "", comparison.table(), "",
              "## The same picks by the KL along the unedited model's validation answers (`pick_kl='response'`)", "", by_response.table(), "",
              f"## The same picks with a coherence bound (`max_nll_rise={MAX_NLL_RISE}`)", "",
              "A setting whose validation harmless answers the unedited model scores more than "
              f"{MAX_NLL_RISE} nats per token above its own answers counts as answering no harmful prompt.", "", bounded.table(), ""]
    for result in bounded.results:
        if result.method.startswith("expert_deactivation"):
            details = result.details
            lines += [f"{result.method.split(' ')[0]}: validation base NLL per setting: "
                      + ", ".join(f"{k}: {v:.3f}" for k, v in details.get("validation_base_nll", {}).items())
                      + f"; ruled out: {', '.join(details.get('incoherent', [])) or 'none'}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
