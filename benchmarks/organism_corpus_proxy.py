"""How much a corpus recipe says about words, measured in seconds instead of a 7-minute training run.

    python benchmarks/organism_corpus_proxy.py --broad 0.3 --nonce 0.15

Composes the organism's training corpus with the given options (the same `CorpusConfig` fields as
`python -m featsteer.organism.train`), fits a TF-IDF (words and word pairs) logistic regression on the
generated prompts plus the built-in *train* split, and scores it on the built-in *val* split. It also
reports how many val prompts contain a word that occurs in no training prompt. The val split, not test,
so that the test split stays untouched while recipes are compared. A bag-of-words classifier is not the
organism, but in the v3 trials it tracked what the organism learned (both 0.82-0.88 on held-out prompts),
and it shows whether new data adds words the held-out prompts need.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featsteer.datasets import builtin_prompts  # noqa: E402
from featsteer.files import json_text, write_files  # noqa: E402
from featsteer.organism.corpus import HARMFUL, CorpusConfig, generate_corpus  # noqa: E402

WORD = re.compile(r"[a-z][a-z'-]+")


def words(text: str) -> set[str]:
    """Lower-case word types of a prompt."""
    return set(WORD.findall(text.lower()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-harmful", type=int, default=CorpusConfig.n_harmful)
    parser.add_argument("--n-harmless", type=int, default=CorpusConfig.n_harmless)
    for name, field in [("broad", "broad_probability"), ("nonce", "nonce_probability"),
                        ("innocent-fraction", "innocent_fraction"), ("long-form", "long_form_probability"),
                        ("harmless-tails", "harmless_tail_probability")]:
        parser.add_argument(f"--{name}", type=float, default=getattr(CorpusConfig, field), dest=field)
    parser.add_argument("--symmetric-context", action="store_true", dest="symmetric_context")
    parser.add_argument("--extra-lexicon", action="store_true", dest="extra_lexicon")
    parser.add_argument("--context-words", type=float, default=0.0, dest="context_word_probability")
    parser.add_argument("--context-classes", choices=("both", "harmless", "harmful"), default="both",
                        dest="context_word_classes")
    parser.add_argument("--wordnet-variants", type=int, default=0, dest="wordnet_variants",
                        help="WordNet rewrites per harmful/harmless lexicon entry (needs wordnet-base)")
    parser.add_argument("--balanced-shapes", type=float, nargs=3, dest="balanced_shapes", default=None)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    fields = {k: v for k, v in vars(args).items() if k in CorpusConfig.__dataclass_fields__}
    corpus = generate_corpus(CorpusConfig(**fields), random.Random(args.seed))
    texts = [e.prompt for e in corpus]
    labels = [e.label == HARMFUL for e in corpus]
    for kind in ("harmful", "harmless"):
        train = builtin_prompts(kind, "train")
        texts += list(train.prompts)
        labels += [kind == "harmful"] * len(train)
    vocabulary = set().union(*(words(t) for t in texts))
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    classifier = LogisticRegression(C=4.0, max_iter=2000).fit(vectorizer.fit_transform(texts), labels)
    result = {"options": fields, "seed": args.seed, "train_prompts": len(texts), "vocabulary": len(vocabulary)}
    for kind in ("harmful", "harmless"):
        val = list(builtin_prompts(kind, "val").prompts)
        predicted = classifier.predict(vectorizer.transform(val))
        flagged = sum(bool(p) for p in predicted)
        unseen = sum(bool(words(t) - vocabulary) for t in val)
        result[kind] = {"n": len(val), "predicted_harmful": round(flagged / len(val), 3),
                        "with_unseen_word": round(unseen / len(val), 3)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))
    if args.json:
        write_files(args.json.parent, {args.json.name: json_text(result, indent=1) + "\n"})


if __name__ == "__main__":
    main()
