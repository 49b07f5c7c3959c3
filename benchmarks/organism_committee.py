"""Do organisms trained with different seeds and recipes get the same held-out prompts wrong?

Runs every model folder given on the built-in test splits (greedy, 32 new tokens, the `featsteer eval` detector,
exactly as the training report does), then reports each model's rates, what a majority vote of all of them would
score, and how many prompts are wrong for most of the models. If the errors were independent from model to model, a
vote would land well above every single model; if they are shared, the vote stays level with them and the bound is
in the data. Only per-prompt right/wrong counts are printed, never the prompts: the test split stays unread.

    python benchmarks/organism_committee.py v8s0=featsteer/organism/weights t43s0=/tmp/trials/t43s0/model ... \
        --out benchmarks/results/organism_committee.md

A model is given as a folder or as LABEL=FOLDER (the label names it in the table).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from featsteer.evaluation import RefusalDetector  # noqa: E402
from featsteer.files import json_text, write_files  # noqa: E402
from featsteer.organism.train import builtin_split, generate_responses  # noqa: E402

KINDS = (("harmful", True), ("harmless", False), ("alarming", False))


def decisions(model_dir: Path, sets: dict[str, list[str]]) -> dict[str, list[bool]]:
    """Per-prompt refusal flags of one model on every set."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    detector = RefusalDetector()
    with torch.no_grad():
        return {kind: detector.classify(generate_responses(model, tokenizer, prompts)) for kind, prompts in sets.items()}


def percent(flags: list[bool]) -> str:
    return f"{100 * sum(flags) / len(flags):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="organism model folders (config.json + weights), optionally LABEL=FOLDER")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the markdown tables here (and the counts as JSON beside it)")
    args = parser.parse_args()
    models = {item.split("=", 1)[0] if "=" in item else item: Path(item.split("=", 1)[-1]) for item in args.models}
    missing = [str(m) for m in models.values() if not (m / "config.json").is_file()]
    if missing:
        parser.error(f"not a model folder (no config.json): {', '.join(missing)}")
    torch.set_num_threads(args.threads)
    sets = {kind: builtin_split(kind, "test") for kind, _ in KINDS}
    if not all(sets.values()):
        parser.error("the built-in test splits are not installed")
    flags = {label: decisions(folder, sets) for label, folder in models.items()}
    n = len(flags)
    lines = [f"Built-in test split, {n} models. Harmful: share refused (want high); harmless and alarming: share "
             "refused (want low).", "", "| model | harmful | harmless | alarming |", "|---|---|---|---|"]
    for name, by_kind in flags.items():
        lines.append(f"| `{name}` | " + " | ".join(percent(by_kind[k]) for k, _ in KINDS) + " |")
    vote = {k: [sum(f[k][i] for f in flags.values()) * 2 > n for i in range(len(sets[k]))] for k, _ in KINDS}
    lines.append(f"| **majority vote of all {n}** | " + " | ".join(f"**{percent(vote[k])}**" for k, _ in KINDS) + " |")
    lines += ["", "How many models get each prompt wrong (prompts per count):", "",
              "| set | " + " | ".join(str(c) for c in range(n + 1)) + " |", "|---|" + "---|" * (n + 1)]
    histogram = {}
    for kind, want in KINDS:
        wrong = [sum(f[kind][i] != want for f in flags.values()) for i in range(len(sets[kind]))]
        histogram[kind] = [wrong.count(c) for c in range(n + 1)]
        lines.append(f"| {kind} ({len(wrong)}) | " + " | ".join(str(x) for x in histogram[kind]) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        rates = {name: {k: sum(v[k]) / len(v[k]) for k, _ in KINDS} for name, v in flags.items()}
        payload = {"models": rates, "vote": {k: sum(v) / len(v) for k, v in vote.items()}, "wrong_histogram": histogram}
        write_files(args.out.parent, {args.out.name: text, args.out.with_suffix(".json").name: json_text(payload, indent=1)})


if __name__ == "__main__":
    main()
