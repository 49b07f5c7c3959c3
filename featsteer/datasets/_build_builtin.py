"""Maintainer tool for the shipped prompt files: import drafted prompts, assign fixed splits, validate.

The shipped JSONL files are the source of truth and are committed. Splits are written into them once
so that they never change when prompts are added: this tool only assigns a split to rows that have
none, stratified by category (60/20/20 train/val/test) and ordered by a hash of the prompt text. Rows
are stored in hash order too, so categories interleave (the first ``n`` prompts of a set span many
topics) and running the tool twice gives byte-identical files. Nothing in the library imports this.

Usage (from the repository root)::

    python -m featsteer.datasets._build_builtin --append harmful drafts.txt   # add drafted prompts
    python -m featsteer.datasets._build_builtin                               # assign splits, rewrite
    python -m featsteer.datasets._build_builtin --check                       # validate only

A draft file holds ``## category`` header lines, each followed by one prompt per line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from featsteer.datasets.builtin import BUILTIN_KINDS, FIXED_SPLITS

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLIT_FRACTIONS: dict[str, float] = {"val": 0.2, "test": 0.2}
"""Target share per category of the held-out splits; ``train`` takes the rest."""

Row = dict[str, str]


def normalize_prompt(prompt: str) -> str:
    """Case- and whitespace-insensitive form used to detect duplicates."""
    return re.sub(r"\s+", " ", prompt).strip().casefold()


def read_rows(path: Path) -> list[Row]:
    """Read one JSONL data file (missing file: no rows)."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_rows(path: Path, rows: Iterable[Row]) -> None:
    """Write rows as JSONL with a fixed key order, UTF-8, one object per line."""
    lines = [
        json.dumps(
            {"prompt": row["prompt"], "category": row["category"], "split": row["split"]}, ensure_ascii=False
        )
        for row in rows
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def parse_draft(text: str) -> list[Row]:
    """Rows (without split) from a draft: ``## category`` headers, then one prompt per line."""
    rows: list[Row] = []
    category = None
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("##"):
            category = stripped.lstrip("#").strip()
        elif category is None:
            raise ValueError(f"draft line {line_number} comes before any '## category' header")
        else:
            rows.append({"prompt": stripped, "category": category})
    return rows


def _hash_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def assign_splits(rows: Sequence[Row]) -> list[Row]:
    """Give every row without a split one, keeping existing splits untouched.

    Per category, the targets are ``round(n * fraction)`` rows for val and test and the rest for
    train; unassigned rows, ordered by the SHA-256 of their text, first fill the test deficit, then
    val, then train.

    Args:
        rows: Rows with ``prompt`` and ``category``, and ``split`` where already decided.

    Returns:
        New row dicts in the same order, each with a ``split``.
    """
    result = [dict(row) for row in rows]
    by_category: dict[str, list[Row]] = defaultdict(list)
    for row in result:
        by_category[row["category"]].append(row)
    for members in by_category.values():
        total = len(members)
        have = Counter(row["split"] for row in members if row.get("split"))
        deficits = {
            name: max(0, round(total * share) - have[name]) for name, share in SPLIT_FRACTIONS.items()
        }
        pending = sorted(
            (row for row in members if not row.get("split")), key=lambda row: _hash_key(row["prompt"])
        )
        for row in pending:
            split = next((name for name in ("test", "val") if deficits[name] > 0), "train")
            if split != "train":
                deficits[split] -= 1
            row["split"] = split
    return result


def canonical_order(rows: Sequence[Row]) -> list[Row]:
    """Rows ordered by the SHA-256 of their text: categories interleave, so ``head(n)`` spans topics."""
    return sorted(rows, key=lambda row: _hash_key(row["prompt"]))


def find_problems(rows_by_kind: dict[str, Sequence[Row]]) -> list[str]:
    """Everything wrong with the data: bad fields, unknown splits, duplicates within or across files."""
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    for kind, rows in rows_by_kind.items():
        for index, row in enumerate(rows):
            where = f"{kind}.jsonl row {index}"
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                problems.append(f"{where}: empty or missing prompt")
                continue
            if row["prompt"] != row["prompt"].strip():
                problems.append(f"{where}: prompt has leading or trailing whitespace")
            if not row.get("category"):
                problems.append(f"{where}: missing category")
            if row.get("split") not in FIXED_SPLITS:
                problems.append(f"{where}: split {row.get('split')!r} is not one of {FIXED_SPLITS}")
            key = normalize_prompt(row["prompt"])
            if key in first_seen:
                problems.append(f"{where}: duplicates {first_seen[key]}: {row['prompt']!r}")
            else:
                first_seen[key] = where
    return problems


def summarize(rows_by_kind: dict[str, Sequence[Row]]) -> str:
    """One line per kind: total and per-split counts."""
    lines = []
    for kind, rows in rows_by_kind.items():
        counts = Counter(row.get("split") for row in rows)
        per_split = ", ".join(f"{split} {counts[split]}" for split in FIXED_SPLITS)
        lines.append(f"{kind}: {len(rows)} prompts ({per_split})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="validate only; write nothing")
    parser.add_argument("--append", nargs=2, metavar=("KIND", "DRAFT"), help="append drafted prompts to KIND")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder holding <kind>.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows_by_kind = {kind: read_rows(args.data_dir / f"{kind}.jsonl") for kind in BUILTIN_KINDS}
    if args.append:
        kind, draft = args.append
        if kind not in rows_by_kind:
            parser.error(f"unknown kind {kind!r}; choose one of {', '.join(BUILTIN_KINDS)}")
        rows_by_kind[kind] = [*rows_by_kind[kind], *parse_draft(Path(draft).read_text(encoding="utf-8"))]
    if not args.check:
        rows_by_kind = {kind: canonical_order(assign_splits(rows)) for kind, rows in rows_by_kind.items()}

    problems = find_problems(rows_by_kind)
    problems += [
        f"{kind}.jsonl is not in canonical order; run without --check to rewrite it"
        for kind, rows in rows_by_kind.items()
        if rows != canonical_order(rows)
    ]
    for problem in problems:
        logger.error(problem)
    if problems:
        logger.error("%d problem(s); nothing written", len(problems))
        return 1
    if not args.check:
        for kind, rows in rows_by_kind.items():
            write_rows(args.data_dir / f"{kind}.jsonl", rows)
    logger.info("%s", summarize(rows_by_kind))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
