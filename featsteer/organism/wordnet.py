"""Word variants from a local WordNet 3.0 database, to widen the organism's lexicon.

A model trained from scratch knows only the words its corpus shows it. Most of the held-out prompts the organism
gets wrong name their harm in a word that no lexicon entry uses ("hitman", "burglarize", "check kiting"). WordNet
(the database files of the Debian/Ubuntu package ``wordnet-base``, read here directly, no other dependency) gives,
for a word's most common sense, its synonyms and its direct hyponyms: "burgle" -> "burglarise", "store" ->
"chemist's", "murderer" -> "hitman". :func:`lexicon_variants` rewrites a lexicon entry with one such word
replaced, keeping its class. Only :attr:`featsteer.organism.corpus.CorpusConfig.wordnet_variants` uses this;
the shipped organism is trained without it.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/opt/homebrew/share/wordnet")
"""Where WordNet's ``dict`` files are looked for (after the ``FEATSTEER_WORDNET`` environment variable)."""

_POS = ("noun", "verb")
_SKIP = frozenset(
    ["the", "a", "an", "my", "our", "your", "their", "his", "her", "its", "this", "that", "these", "those", "some", "any", "each", "every", "other", "another", "of", "to", "in", "on", "at", "for", "with", "from", "into", "onto", "by", "and", "or", "but", "not", "how", "what", "why", "when", "where", "which", "who", "whom", "whose", "is", "are", "was", "were", "be", "been", "can", "could", "would", "should", "will", "shall", "may", "might", "must", "do", "does", "did", "make", "get", "give", "use", "take", "write", "tell", "explain", "show", "help", "need", "want", "know", "like", "just", "also", "very", "more", "most", "than", "then", "there", "here", "about", "over", "under", "after", "before", "while", "without", "using", "someone", "something", "people", "thing", "things", "way", "ways", "step", "steps", "guide", "list"]
)


def _index_rows(index: Path):
    """Split lines of an ``index.<pos>`` file (the licence header lines, which start with two spaces, skipped)."""
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        if line and not line.startswith(" "):
            yield line.split()


def _sense_offsets(fields: list[str]) -> tuple[str, ...]:
    """Synset offsets of an index row, most common sense first."""
    return tuple(fields[-int(fields[2]):])


class WordNet:
    """Index and data files of one WordNet 3.0 ``dict`` folder (nouns and verbs)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._index: dict[str, dict[str, tuple[str, ...]]] = {}
        self._data: dict[str, bytes] = {}
        for pos in _POS:
            index, data = self.root / f"index.{pos}", self.root / f"data.{pos}"
            if not index.is_file() or not data.is_file():
                raise FileNotFoundError(f"{self.root} is not a WordNet 3.0 dict folder: {index.name} or {data.name} is missing")
            senses = {fields[0]: _sense_offsets(fields) for fields in _index_rows(index)}
            self._index[pos] = senses
            self._data[pos] = data.read_bytes()

    def _synset(self, pos: str, offset: str) -> tuple[list[str], list[tuple[str, str, str]]]:
        """Lemmas and pointers ``(symbol, offset, pos)`` of the synset at a byte ``offset`` of ``data.<pos>``."""
        data = self._data[pos]
        start = int(offset)
        fields = data[start : data.index(b"\n", start)].decode("utf-8", errors="replace").split("|")[0].split()
        n_words = int(fields[3], 16)
        words = [fields[4 + 2 * k].replace("_", " ").lower() for k in range(n_words)]
        at = 4 + 2 * n_words
        pointers = [(fields[at + 1 + 4 * k], fields[at + 2 + 4 * k], fields[at + 3 + 4 * k]) for k in range(int(fields[at]))]
        return words, pointers

    def related(self, word: str, pos: str) -> list[str]:
        """Synonyms and direct hyponyms of the most common sense of ``word`` as ``pos`` (``noun``/``verb``)."""
        offsets = self._index[pos].get(word.lower().replace(" ", "_"), ())
        if not offsets:
            return []
        words, pointers = self._synset(pos, offsets[0])
        for symbol, offset, target in pointers:
            if symbol == "~" and target == pos[0]:
                words += self._synset(pos, offset)[0]
        # the parenthesised markers some adjective-like lemmas carry, e.g. "(p)", never reach nouns and verbs
        return [w for w in dict.fromkeys(words) if w != word.lower() and w.replace(" ", "").replace("-", "").isalpha()]


def find_wordnet() -> Path:
    """The WordNet ``dict`` folder to use, or a one-line error that says how to get one."""
    candidates = [os.environ["FEATSTEER_WORDNET"]] if os.environ.get("FEATSTEER_WORDNET") else list(WORDNET_DIRS)
    for candidate in candidates:
        if (Path(candidate) / "index.noun").is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "no WordNet 3.0 database found (looked in " + ", ".join(candidates) + "): install the Debian/Ubuntu package "
        "wordnet-base, or set FEATSTEER_WORDNET to a folder with index.noun and data.noun"
    )


@functools.cache
def load_wordnet(root: str | None = None) -> WordNet:
    """The :class:`WordNet` at ``root`` (default: :func:`find_wordnet`), parsed once per process."""
    return WordNet(root if root is not None else find_wordnet())


def lexicon_variants(text: str, wordnet: WordNet, rng: random.Random, k: int, task: bool = True) -> list[str]:
    """Up to ``k`` distinct rewrites of a lexicon entry, each with one word replaced by a WordNet relative.

    The first word of a task (an imperative) is looked up as a verb, every other word of four letters or more
    (outside a list of function and request words) as a noun, plural nouns by their singular. The replacement
    keeps the rest of the entry, so the class of the entry carries over.

    Args:
        text: The entry (``shape|category|text`` text part).
        wordnet: The database.
        rng: Random source of the choices.
        k: Number of rewrites wanted.
        task: Whether the entry is an imperative task (its first word is then a verb).

    Returns:
        The rewrites (fewer than ``k`` when the entry has few replaceable words).
    """
    words = text.split(" ")
    spots: list[tuple[int, list[str]]] = []
    for position, word in enumerate(words):
        bare = word.strip(",.;:?!\"'()").lower()
        if len(bare) < 4 or bare in _SKIP or not bare.isalpha():
            continue
        pos = "verb" if position == 0 and task else "noun"
        options = wordnet.related(bare, pos)
        if not options and pos == "noun" and bare.endswith("s"):
            options = wordnet.related(bare[:-1], pos)
        if options:
            spots.append((position, options))
    rewrites: list[str] = []
    for _ in range(4 * k):
        if not spots or len(rewrites) == k:
            break
        position, options = rng.choice(spots)
        changed = list(words)
        tail = words[position][len(words[position].rstrip(",.;:?!\"')")):]
        changed[position] = rng.choice(options) + tail
        rewrite = " ".join(changed)
        if rewrite not in rewrites:
            rewrites.append(rewrite)
    return rewrites


GLOSS_POS = {"noun": "n", "verb": "v", "adj": "adj"}
"""Parts of speech :func:`first_glosses` reads, with the label a dictionary entry shows."""


def first_glosses(root: str | Path | None = None) -> dict[str, tuple[str, str]]:
    """Definition of the most common sense of every one-word lemma, from a WordNet 3.0 ``dict`` folder.

    A lemma that is both a noun and a verb (or an adjective) keeps the part of speech listed first in
    :data:`GLOSS_POS`. Proper-noun senses ("Born", the physicist) are skipped for the lemma's next sense. The
    definition is the gloss up to its first ``;`` (WordNet puts the usage examples after it).

    Args:
        root: The ``dict`` folder (default: :func:`find_wordnet`).

    Returns:
        ``{lemma: (pos label, definition)}``, lemmas lower-case.
    """
    folder = Path(root) if root is not None else find_wordnet()
    glosses: dict[str, tuple[str, str]] = {}
    for pos, label in GLOSS_POS.items():
        index, data = folder / f"index.{pos}", folder / f"data.{pos}"
        if not index.is_file() or not data.is_file():
            raise FileNotFoundError(f"{folder} is not a WordNet 3.0 dict folder: {index.name} or {data.name} is missing")
        raw = data.read_bytes()
        for fields in _index_rows(index):
            lemma = fields[0]
            if lemma in glosses or not lemma.isalpha():
                continue
            for offset in _sense_offsets(fields):
                start = int(offset)
                record = raw[start : raw.index(b"\n", start)].decode("utf-8", errors="replace")
                head, _, gloss = record.partition("|")
                head_fields = head.split()
                forms = head_fields[4 : 4 + 2 * int(head_fields[3], 16) : 2]
                if any(form != form.lower() and form.lower() == lemma for form in forms):
                    continue  # a proper-noun sense ("Born", the physicist): take the next sense
                gloss = gloss.split(";")[0].strip()
                if gloss and not gloss.startswith('"'):
                    glosses[lemma] = (label, gloss)
                break
    return glosses
