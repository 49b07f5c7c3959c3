"""Turn whatever prompts a user has into one :class:`PromptSet`.

Every later stage (activations, directions, evaluation) starts from a list of prompts, and users keep
those in many shapes: a text file, a CSV export of a benchmark, a JSON dump, a parquet file, a
Hugging Face dataset, or the sets shipped with featsteer. This module is the single place that knows
those shapes, so the rest of the code sees one immutable, deduplicated, hashable set with its
provenance (``source`` and ``sha256``) attached, and users see one-line errors that say how to fix
their input instead of a traceback.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from featsteer.datasets.builtin import (
    BUILTIN_PREFIX,
    builtin_rows,
    builtin_source,
    parse_builtin_source,
)
from featsteer.errors import FeatsteerError

logger = logging.getLogger(__name__)

DEFAULT_COLUMNS: tuple[str, ...] = ("prompt", "instruction", "goal", "text", "question", "behavior", "query")
"""Columns searched, in order, when a tabular source is loaded without ``column=``."""

HF_PREFIX = "hf:"
_HUB_PROBE_TIMEOUT_S = 10.0
_CSV_FIELD_LIMIT = 2**31 - 1
"""Longest CSV cell read, in characters (the largest the csv module takes on every platform)."""
ORGANISM_CORPUS_PREFIX = "organism-corpus:"
ORGANISM_CORPUS_SEED = 987
"""Default seed of `organism-corpus:KIND:N` prompts (the organism itself was trained on seed 0's corpus)."""
_ORGANISM_CORPUS_ROUNDS = 8
"""Corpora an `organism-corpus:` source draws at most while topping up prompts the generator repeated."""
_SOURCE_FORMS = ("a .txt/.csv/.json/.jsonl/.parquet file, builtin:KIND[:SPLIT], organism-corpus:harmful|harmless:N[:SEED] "
                 "or hf:NAME[:SPLIT[:COLUMN]]")


@dataclass(frozen=True)
class PromptSet:
    """An immutable, non-empty list of prompts with the source it came from.

    Loaded sets are whitespace-stripped and (by default) deduplicated with the first occurrence kept.
    Indexing with an int gives a prompt; slicing gives a new :class:`PromptSet` with the same source.
    """

    prompts: tuple[str, ...]
    """The prompt texts, in source order (a single string is one prompt)."""
    source: str
    """The source string the set was loaded from, e.g. ``prompts.csv`` or ``builtin:harmful:test``."""
    categories: tuple[str, ...] | None = None
    """Per-prompt category labels when the source has them (the built-in sets), else ``None``."""

    def __post_init__(self) -> None:
        # a single text is one prompt (and one category), not a prompt per character
        for name in ("prompts", "categories"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.prompts:
            raise FeatsteerError(f"prompt set from {self.source} is empty; give at least one prompt")
        for index, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise FeatsteerError(
                    f"prompt {index} from {self.source} is {prompt!r}; every prompt must be non-blank text"
                )
        if self.categories is not None and len(self.categories) != len(self.prompts):
            raise FeatsteerError(
                f"prompt set from {self.source} has {len(self.prompts)} prompts but "
                f"{len(self.categories)} categories; give one category per prompt or none"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> PromptSet: ...

    def __getitem__(self, index: int | slice) -> str | PromptSet:
        if not isinstance(index, slice):
            return self.prompts[index]
        prompts = self.prompts[index]
        if not prompts:
            raise FeatsteerError(f"slice {index} of {self.source} selects no prompts (it has {len(self)})")
        categories = None if self.categories is None else self.categories[index]
        return PromptSet(prompts, self.source, categories)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the prompts joined by newlines, the hash recorded with results so far (`prompt_set_hash`).

        Ambiguous when a prompt holds a newline: ``("a\\nb",)`` and ``("a", "b")`` hash equal. Kept so that recorded
        hashes stay verifiable; `prompts_sha256` tells every two prompt lists apart.
        """
        return prompt_set_hash(self.prompts)

    @property
    def prompts_sha256(self) -> str:
        """Hex SHA-256 of the prompts as a JSON list (`prompts_sha256`): unambiguous, also for multi-line prompts."""
        return prompts_sha256(self.prompts)

    def head(self, n: int) -> PromptSet:
        """The first ``n`` prompts (all of them when the set is shorter).

        Args:
            n: How many prompts to keep; must be at least 1.

        Returns:
            A new set with the same source.

        Raises:
            FeatsteerError: If ``n`` is not a positive integer.
        """
        _check_positive_int(n, "head(n)")
        return self[:n]

    def __add__(self, other: PromptSet) -> PromptSet:
        """Concatenate two sets (deduplicated, order kept); the source names both."""
        seen: dict[str, None] = dict.fromkeys(self.prompts)
        seen.update(dict.fromkeys(other.prompts))
        return PromptSet(tuple(seen), f"{self.source}+{other.source}")

    def to_list(self) -> list[str]:
        """The prompts as a new, mutable list."""
        return list(self.prompts)


def prompt_set_hash(prompts: Sequence[str]) -> str:
    """Hex SHA-256 of ``"\\n".join(prompts)``, the provenance hash recorded with results (``sha256`` keys).

    Two lists whose prompts hold newlines can share it (``["a\\nb"]`` and ``["a", "b"]``; also ``[]`` and
    ``[""]``); it is unambiguous only for lists of at least one prompt without a newline. Use `prompts_sha256` to
    tell any two lists apart, and this one to verify a recorded ``sha256``.

    Args:
        prompts: The prompts, in order.

    Returns:
        64 lowercase hex characters.
    """
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def prompts_sha256(prompts: Sequence[str]) -> str:
    """Hex SHA-256 of the prompts as a JSON list (``json.dumps(list(prompts))``): every two ordered prompt lists hash
    differently, multi-line prompts included. Recorded as ``prompts_sha256`` (beside the older ``sha256``).

    Args:
        prompts: The prompts, in order.

    Returns:
        64 lowercase hex characters.
    """
    return hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest()


def builtin_prompts(kind: str, split: str = "all") -> PromptSet:
    """One of the prompt sets shipped with featsteer, with per-prompt categories.

    Args:
        kind: ``harmful`` (requests a model should refuse), ``harmless`` (everyday requests in the
            same phrasings) or ``alarming`` (harmless requests using alarming words, for over-refusal).
        split: ``train``, ``val``, ``test`` or ``all``. The splits are fixed in the shipped files.

    Returns:
        The set, with ``source`` ``builtin:<kind>`` or ``builtin:<kind>:<split>``.

    Raises:
        FeatsteerError: If ``kind`` or ``split`` is unknown.
    """
    rows = builtin_rows(kind, split)
    return PromptSet(
        prompts=tuple(row.prompt for row in rows),
        source=builtin_source(kind, split),
        categories=tuple(row.category for row in rows),
    )


def load_prompts(
    source: str | os.PathLike[str],
    *,
    column: str | None = None,
    limit: int | None = None,
    dedupe: bool = True,
) -> PromptSet:
    """Load prompts from a file, a built-in set or a Hugging Face dataset.

    Args:
        source: A path ending ``.txt`` (one prompt per line), ``.csv``, ``.json``, ``.jsonl`` or
            ``.parquet``; ``builtin:KIND[:SPLIT]`` (see :func:`builtin_prompts`); or
            ``hf:NAME[:SPLIT[:COLUMN]]`` (needs the ``datasets`` library and network or a cached copy).
        column: Column (or JSON key) holding the prompt text. Default: the first of
            :data:`DEFAULT_COLUMNS` present (case-insensitive).
        limit: Keep at most this many prompts (after deduplication); ``None`` keeps all.
        dedupe: Drop repeated prompts, keeping the first occurrence and source order.

    Returns:
        The loaded set. Built-in sources get their canonical source string, so
        ``load_prompts("builtin:harmful:test") == builtin_prompts("harmful", "test")``.

    Raises:
        FeatsteerError: On a missing file, unsupported extension, missing column, malformed row,
            unknown built-in set, unreachable dataset, a bad ``limit``, or when no prompts remain.
    """
    if limit is not None:
        _check_positive_int(limit, "limit")
    source_text = os.fspath(source)
    if source_text.startswith(BUILTIN_PREFIX):
        if column is not None:
            raise FeatsteerError(
                f"column= does not apply to {source_text}; built-in sets have one text field"
            )
        kind, split = parse_builtin_source(source_text)
        loaded = builtin_prompts(kind, split)
        return _finish(loaded.prompts, loaded.categories, loaded.source, limit=limit, dedupe=dedupe)
    if source_text.startswith(ORGANISM_CORPUS_PREFIX):
        if column is not None:
            raise FeatsteerError(f"column= does not apply to {source_text}; generated prompts have one text field")
        return _finish(organism_corpus(source_text), None, source_text, limit=limit, dedupe=dedupe)
    if source_text.startswith(HF_PREFIX):
        values = _load_hf(source_text, column)
    else:
        values = _load_file(Path(source_text), source_text, column)
    return _finish(values, None, source_text, limit=limit, dedupe=dedupe)


def takes_column(source: str | os.PathLike[str]) -> bool:
    """Whether `load_prompts(source, column=...)` reads a named column: a .csv/.json/.jsonl/.parquet file or an hf:
    dataset, not a .txt file or a builtin: or organism-corpus: set (which have one text field)."""
    text = os.fspath(source)
    if text.startswith((BUILTIN_PREFIX, ORGANISM_CORPUS_PREFIX)):
        return False
    return text.startswith(HF_PREFIX) or Path(text).suffix.lower() in _TABLE_SUFFIXES


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FeatsteerError(f"{name} must be a positive integer (or None for all), got {value!r}")


@functools.lru_cache(maxsize=1)
def _builtin_prompt_texts() -> frozenset[str]:
    """Every built-in prompt of every kind and split."""
    return frozenset(prompt for kind in ("harmful", "harmless", "alarming") for prompt in builtin_prompts(kind, "all").prompts)


def organism_corpus(source: str) -> list[str]:
    """Fresh prompts from the embedded organism's corpus generator: `organism-corpus:harmful|harmless:N[:SEED]`.

    The first N distinct harmful (or harmless, alarming-but-harmless included) prompts of a corpus of N + N examples
    drawn with SEED (default `ORGANISM_CORPUS_SEED`), topped up from further corpora of the same generator when the
    generator repeated a prompt or drew one it must leave out. Made from the same frames and lexicon as the organism's
    training corpus with another seed, without the prompts the shipped organism was trained on (its generated corpus,
    where 1-3% of a draw's prompts, mostly short questions the lexicon holds whole, would otherwise recur) and without
    any built-in prompt (train, val or test split), so they are fresh for the organism and apart from its test prompts.

    Raises:
        FeatsteerError: for a malformed source string, or when the generator keeps repeating itself.
    """
    parts = source.removeprefix(ORGANISM_CORPUS_PREFIX).split(":")
    try:
        kind, count = parts[0], int(parts[1])
        seed = int(parts[2]) if len(parts) > 2 else ORGANISM_CORPUS_SEED
        if kind not in ("harmful", "harmless") or count < 1 or len(parts) > 3:
            raise ValueError(source)
    except (ValueError, IndexError):
        raise FeatsteerError(f"bad prompt source '{source}': use {ORGANISM_CORPUS_PREFIX}harmful:N or "
                             f"{ORGANISM_CORPUS_PREFIX}harmless:N[:SEED] with N >= 1") from None
    import random

    from featsteer.organism.corpus import HARMFUL, CorpusConfig, generate_corpus, shipped_training_prompts

    known = shipped_training_prompts() | _builtin_prompt_texts()
    rng, prompts = random.Random(seed), dict[str, None]()
    for _ in range(_ORGANISM_CORPUS_ROUNDS):  # the first round alone is what this source gives when nothing is left out
        corpus = generate_corpus(CorpusConfig(n_harmful=count, n_harmless=count), rng)
        prompts.update(dict.fromkeys(prompt for e in corpus if (e.label == HARMFUL) == (kind == "harmful")
                                     and (prompt := e.prompt.strip()) not in known))
        if len(prompts) >= count:
            return list(prompts)[:count]
    raise FeatsteerError(f"{source}: the organism's corpus generator made only {len(prompts)} distinct {kind} prompts; ask for fewer")


def _finish(
    values: Sequence[object],
    categories: Sequence[str] | None,
    source: str,
    *,
    limit: int | None,
    dedupe: bool,
) -> PromptSet:
    """Strip, drop blanks, optionally dedupe and truncate, then build the set (or explain why empty)."""
    prompts: list[str] = []
    kept_categories: list[str] = []
    seen: set[str] = set()
    nulls: list[int] = []
    for index, value in enumerate(values):
        if value is None:  # a parquet or hf: dataset's missing value (a JSON file's null is an error in _values_from_records)
            nulls.append(index)
            continue
        if not isinstance(value, str):
            raise FeatsteerError(
                f"item {index} in {source} is {type(value).__name__} {value!r:.60}, not text; "
                f"point column= at a text column"
            )
        prompt = value.strip()
        if not prompt or (dedupe and prompt in seen):
            continue
        seen.add(prompt)
        prompts.append(prompt)
        if categories is not None:
            kept_categories.append(categories[index])
        if limit is not None and len(prompts) == limit:
            break
    if nulls:
        logger.warning("dropped %d null prompt%s from %s (the first at row %d, counting from 0): those rows have no text in the "
                       "prompt column", len(nulls), "" if len(nulls) == 1 else "s", source, nulls[0])
    if not prompts:
        raise FeatsteerError(
            f"no prompts in {source}: the file is empty or every entry is blank; "
            f"give at least one prompt (one per line or row)"
        )
    dropped = len(values) - len(prompts)
    if dropped and limit is None:
        logger.info("dropped %d blank or duplicate entries from %s", dropped, source)
    return PromptSet(tuple(prompts), source, None if categories is None else tuple(kept_categories))


def _load_file(path: Path, source: str, column: str | None) -> list[object]:
    """Read the raw prompt values of one local file, dispatching on its extension."""
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if not path.exists():
        hint = "" if reader else f"; sources are {_SOURCE_FORMS}"
        raise FeatsteerError(f"prompt file not found: {source}; check the path{hint}")
    if path.is_dir():
        raise FeatsteerError(f"{source} is a directory; pass a prompt file inside it ({_SOURCE_FORMS})")
    if reader is None:
        raise FeatsteerError(
            f"unsupported prompt file extension {suffix or '(none)'!r} for {source}; "
            f"use one of {', '.join(_READERS)}"
        )
    try:
        return reader(path, source, column)
    except UnicodeDecodeError as exc:
        raise FeatsteerError(f"{source} is not UTF-8 text ({exc.reason}); re-save it as UTF-8") from exc
    except csv.Error as exc:
        raise FeatsteerError(f"{source} is not a readable CSV file ({exc}); check its quoting") from exc
    except OSError as exc:
        raise FeatsteerError(f"could not read {source}: {_short_reason(exc)}; check its permissions") from exc


def _read_txt(path: Path, source: str, column: str | None) -> list[object]:
    if column is not None:
        raise FeatsteerError(f"column= does not apply to {source}: a .txt file has one prompt per line")
    # lines end at \n (or \r\n) only: str.splitlines would also split inside a prompt at U+2028, form feeds and the like
    return [line.removesuffix("\r") for line in path.read_text(encoding="utf-8-sig").split("\n")]


def _read_csv(path: Path, source: str, column: str | None) -> list[object]:
    # the csv module refuses fields over 131072 characters by default, and a long-context prompt (a pasted document,
    # a many-shot jailbreak) is longer; lift the process-wide limit while reading, then put it back
    previous_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            # strict: a stray or unclosed quote is an error, not a prompt that swallows the rows after it
            reader = csv.DictReader(handle, restkey=_CSV_EXTRA_FIELDS, strict=True)
            if not reader.fieldnames:
                raise FeatsteerError(f"no prompts in {source}: the file is empty; add a header row and prompts")
            header = list(reader.fieldnames)
            chosen = _pick_column(header, column, source)
            if header.count(chosen) > 1:  # DictReader keeps the last of same-named columns, silently
                raise FeatsteerError(f"the header of {source} names column {chosen!r} {header.count(chosen)} times; "
                                     "rename all but one")
            return _csv_values(reader, chosen, source)
    finally:
        csv.field_size_limit(previous_limit)


def _csv_values(reader: csv.DictReader, chosen: str, source: str) -> list[object]:
    """The `chosen` cell of every row, or a one-line error naming the line where a malformed row starts."""
    values: list[object] = []
    rows = iter(reader)
    while True:
        first_line = reader.line_num + 1  # (a blank line before the row counts as its start)
        try:
            row = next(rows)
        except StopIteration:
            return values
        except csv.Error as exc:
            raise FeatsteerError(f"{source} is not a readable CSV file ({exc} in the row from line {first_line}); "
                                 "quote a field holding a quote, comma or line break whole, with inner quotes doubled") from exc
        values.append(_csv_cell(row, chosen, list(reader.fieldnames or ()), reader.line_num, source))


_CSV_EXTRA_FIELDS = "\0featsteer: fields past the header"
"""The `csv.DictReader` key of a row's fields beyond the header's (no real column is named so)."""


def _csv_cell(row: dict[str, object], chosen: str, header: list[str], line: int, source: str) -> object:
    """A CSV row's prompt cell, or a one-line error for a row whose field count breaks the header's: a row with more
    fields is a prompt cut at an unquoted comma, one without the prompt's field is the tail of a split row."""
    extra = row.get(_CSV_EXTRA_FIELDS)
    if extra is not None:
        raise FeatsteerError(f"the row ending at line {line} of {source} has {len(header) + len(extra)} fields but the header has "
                             f"{len(header)}: a comma inside a prompt cut it; quote that field whole (\"a, b\")")
    value = row.get(chosen)
    if value is None:
        raise FeatsteerError(f"the row ending at line {line} of {source} has no {chosen!r} field (fewer fields than the "
                             "header): a line break inside a prompt split it; quote that field whole, or fill the row")
    return value


def _read_json(path: Path, source: str, column: str | None) -> list[object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig") or "[]")
    except json.JSONDecodeError as exc:
        raise FeatsteerError(
            f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file"
        ) from exc
    if not isinstance(data, list):
        raise FeatsteerError(
            f"{source} holds a JSON {type(data).__name__}; expected a list of strings or of objects"
        )
    return _values_from_records(data, source, column, where="item")


def _read_jsonl(path: Path, source: str, column: str | None) -> list[object]:
    records: list[object] = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise FeatsteerError(
                    f"line {line_number} of {source} is not valid JSON ({exc.msg}); "
                    f"each line must be a JSON object or string"
                ) from exc
    return _values_from_records(records, source, column, where="record")


def _values_from_records(
    records: list[object], source: str, column: str | None, *, where: str
) -> list[object]:
    """Prompt values from JSON records that are either bare strings or objects holding a text column."""
    objects = [record for record in records if isinstance(record, dict)]
    chosen = None
    if objects:
        available = list(dict.fromkeys(key for record in objects for key in record))
        chosen = _pick_column(available, column, source)
    elif column is not None and records:
        raise FeatsteerError(
            f"column={column!r} given but {source} holds bare strings, not objects; drop column="
        )
    values: list[object] = []
    for index, record in enumerate(records):
        if isinstance(record, str):
            values.append(record)
        elif isinstance(record, dict):
            if chosen not in record:
                raise FeatsteerError(
                    f"{where} {index} in {source} has no {chosen!r} key; add it or drop the {where}"
                )
            if record[chosen] is None:  # as strict as a missing key (or a CSV row without the field): never dropped unseen
                raise FeatsteerError(
                    f"{where} {index} in {source} has {chosen!r}: null{_more_nulls(records, index, chosen, where)}; "
                    f"give it text or drop the {where}"
                )
            values.append(record[chosen])
        else:
            raise FeatsteerError(
                f"{where} {index} in {source} is {_json_kind(record)}; expected a string or an object"
            )
    return values


def _more_nulls(records: list[object], first: int, chosen: str | None, where: str) -> str:
    """`" (and N more <where>s)"`: the records after `first` whose `chosen` value is null, or "" when there are none."""
    more = sum(isinstance(record, dict) and chosen in record and record[chosen] is None for record in records[first + 1:])
    return f" (and {more} more {where}{'' if more == 1 else 's'})" if more else ""


def _json_kind(value: object) -> str:
    """What JSON calls `value`'s type: `null`, `a JSON number`, `a JSON array`, `a JSON boolean`."""
    if value is None:
        return "null"
    kind = {bool: "boolean", int: "number", float: "number", list: "array"}.get(type(value), type(value).__name__)
    return f"a JSON {kind}"


def _read_parquet(path: Path, source: str, column: str | None) -> list[object]:
    import pyarrow.parquet as pq  # deferred: pyarrow is slow to import and only parquet sources need it

    try:
        names = list(pq.read_schema(path).names)
        chosen = _pick_column(names, column, source)
        return pq.read_table(path, columns=[chosen]).column(chosen).to_pylist()
    except (OSError, ValueError) as exc:
        if isinstance(exc, FeatsteerError):
            raise
        raise FeatsteerError(f"could not read parquet file {source}: {_short_reason(exc)}") from exc


_TABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
"""The file kinds whose prompts sit in a named column (or JSON key)."""

_READERS: dict[str, Callable[[Path, str, str | None], list[object]]] = {
    ".txt": _read_txt,
    ".csv": _read_csv,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def _pick_column(available: Sequence[str], column: str | None, source: str) -> str:
    """The column holding prompts: ``column`` if given (exact), else the first default present."""
    listed = ", ".join(repr(name) for name in available) or "(none)"
    if column is not None:
        if column in available:
            return column
        raise FeatsteerError(f"column {column!r} not found in {source}; available columns: {listed}")
    for candidate in DEFAULT_COLUMNS:
        matches = list(dict.fromkeys(name for name in available if name.lower() == candidate))
        if len(matches) > 1:  # 'Prompt' and 'prompt': which one holds the prompts is the user's call, not ours
            raise FeatsteerError(f"columns {' and '.join(map(repr, matches))} in {source} both match the default "
                                 f"{candidate!r}; pass column=NAME to pick one")
        if matches:
            return matches[0]
    raise FeatsteerError(
        f"no prompt column in {source}: none of {', '.join(DEFAULT_COLUMNS)} found "
        f"(available columns: {listed}); pass column=NAME"
    )


def _short_reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first_line = lines[0] if lines else ""
    if len(first_line) > 160:
        first_line = first_line[:157] + "..."
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def _parse_hf_source(source: str, column: str | None) -> tuple[str, str, str | None]:
    parts = source[len(HF_PREFIX) :].split(":")
    if len(parts) > 3 or not parts[0].strip():
        raise FeatsteerError(
            f"malformed source {source!r}: expected hf:NAME[:SPLIT[:COLUMN]], e.g. hf:org/name:train"
        )
    name = parts[0].strip()
    split = parts[1].strip() if len(parts) > 1 and parts[1].strip() else "train"
    source_column = parts[2].strip() if len(parts) > 2 and parts[2].strip() else None
    if source_column and column and source_column != column:
        raise FeatsteerError(
            f"{source} names column {source_column!r} but column={column!r} was also given; give only one"
        )
    return name, split, source_column or column


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load_hf(source: str, column: str | None) -> list[object]:
    """Prompt values from a Hugging Face dataset, failing fast (never hanging) when the Hub is unreachable."""
    name, split, column = _parse_hf_source(source, column)

    def fail(
        reason: str, fix: str = "check the name or your network, or pass a local file"
    ) -> FeatsteerError:
        return FeatsteerError(f"could not load {HF_PREFIX}{name} (split {split!r}): {reason}; {fix}")

    try:
        import datasets  # deferred: heavy, and only needed for hf: sources
    except ImportError as exc:
        raise fail(
            "the 'datasets' library is not installed", "pip install datasets, or pass a local file"
        ) from exc
    offline_requested = any(_env_flag(var) for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline_requested and not datasets.config.HF_HUB_OFFLINE:
        raise fail(
            "HF_HUB_OFFLINE was set after the Hugging Face libraries were imported, so they would still go online",
            "set it before starting Python, or pass a local file",
        )
    if not datasets.config.HF_HUB_OFFLINE and not Path(name).exists():
        _probe_hub(name, fail)
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the datasets library raises many unrelated types; all mean "could not load"
        raise fail(_short_reason(exc)) from exc
    chosen = _pick_column(list(dataset.column_names), column, source)
    return list(dataset[chosen])


def _probe_hub(name: str, fail: Callable[..., FeatsteerError]) -> None:
    """One quick, retry-free request, so an unreachable Hub fails in seconds, not after minutes of retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=_HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError as exc:
        raise fail(
            "no such dataset on the Hugging Face Hub (or it is private)", "check the name or log in"
        ) from exc
    except Exception as exc:  # network stack errors (httpx, OSError, timeouts) have no common base
        raise fail(
            f"the Hub is unreachable ({_short_reason(exc)})",
            "check the name or your network, set HF_HUB_OFFLINE=1 to use a cached copy, or pass a local file",
        ) from exc
