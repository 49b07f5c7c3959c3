"""Which words of the organism's training prompts lean to one class, and how much a corpus option evens them out.

Builds the training examples of a recipe (generated corpus plus the built-in train/val prompts, exactly as
`python -m featsteer.organism.train` would, without training), and prints the words whose class skew
(`featsteer.organism.corpus.word_class_skew`: 0.5 = no information, 1.0 = only in harmful prompts) is at
least `--high` or at most `1 - --high`. With `--words-out` it also writes both lists, one word per line: that is
how the word lists behind `featsteer/organism/lexicon_context/` were made (recipe v8, seed 0).

    python benchmarks/organism_word_skew.py                       # the default recipe
    python benchmarks/organism_word_skew.py --context-words 0.25       # with the context entries
    python benchmarks/organism_word_skew.py --compare WORDS.txt   # mean skew of listed words, without and with --context-words (default 0.25)
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featsteer.organism.corpus import word_class_skew  # noqa: E402
from featsteer.organism.train import TrainConfig, build_examples  # noqa: E402


def skew_of(context: float, seed: int, min_count: int) -> dict[str, tuple[float, int, int]]:
    base = TrainConfig()
    config = dataclasses.replace(base, corpus=dataclasses.replace(base.corpus, context_word_probability=context))
    examples, _ = build_examples(config, random.Random(seed))
    return word_class_skew([(e.prompt, e.label == "harmful") for e in examples], min_count=min_count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context-words", type=float, default=0.0, help="build the recipe with this context probability")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (the training seed)")
    parser.add_argument("--min-count", type=int, default=15, help="leave out words in fewer prompts")
    parser.add_argument("--high", type=float, default=0.75, help="list words with skew >= this or <= 1 - this")
    parser.add_argument("--words-out", type=Path, help="write <stem>_harmful.txt / <stem>_harmless.txt word lists")
    parser.add_argument("--compare", type=Path, nargs="*", help="word-list files: mean |skew - 0.5| without and with the context entries")
    args = parser.parse_args()
    if args.compare:
        without, with_context = skew_of(0.0, args.seed, 1), skew_of(args.context_words or 0.25, args.seed, 1)
        print("| word list | words | mean abs(skew - 0.5) without | with context entries | words past the threshold without / with |")
        print("|---|---|---|---|---|")
        for path in args.compare:
            words = [w for w in path.read_text().split() if w in without and w in with_context]
            a = sum(abs(without[w][0] - 0.5) for w in words) / max(1, len(words))
            b = sum(abs(with_context[w][0] - 0.5) for w in words) / max(1, len(words))
            past = [sum(abs(s[w][0] - 0.5) >= args.high - 0.5 for w in words) for s in (without, with_context)]
            print(f"| {path.name} | {len(words)} | {a:.3f} | {b:.3f} | {past[0]} / {past[1]} |")
        return
    skew = skew_of(args.context_words, args.seed, args.min_count)
    harmful = sorted((w for w, s in skew.items() if s[0] >= args.high), key=lambda w: -skew[w][0])
    harmless = sorted((w for w, s in skew.items() if s[0] <= 1 - args.high), key=lambda w: skew[w][0])
    print(f"{len(skew)} words in >= {args.min_count} prompts; {len(harmful)} lean harmful (>= {args.high}), "
          f"{len(harmless)} lean harmless (<= {1 - args.high:.2f})")
    for name, words in (("harmful", harmful), ("harmless", harmless)):
        print(f"leaning {name}: " + ", ".join(f"{w} {skew[w][0]:.2f}" for w in words[:60]))
        if args.words_out:
            out = args.words_out.with_name(f"{args.words_out.stem}_{name}.txt")
            out.write_text("".join(f"{w}\n" for w in words))
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
