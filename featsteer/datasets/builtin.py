"""Access to the prompt sets shipped inside the package.

Finding a refusal direction needs contrastive prompts (harmful vs. harmless) and measuring
over-refusal needs harmless prompts that merely *sound* alarming. Shipping our own small sets means
every command works offline and on a fresh clone, and the fixed train/val/test split written into
each file means a direction fitted on ``train`` is never scored on the prompts it was fitted on.

The files live in ``featsteer/datasets/data/<kind>.jsonl``, one object per line:
``{"prompt": ..., "category": ..., "split": "train" | "val" | "test"}``. They are read lazily, once
per process, and never written at runtime (``_build_builtin.py`` is the maintainer tool that edits them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from featsteer.errors import FeatsteerError

BUILTIN_KINDS: tuple[str, ...] = ("harmful", "harmless", "alarming")
"""Names of the shipped prompt sets, as used in ``builtin:<kind>``."""

FIXED_SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The splits each shipped row belongs to (exactly one each)."""

BUILTIN_SPLITS: tuple[str, ...] = (*FIXED_SPLITS, "all")
"""Split names a caller may ask for; ``all`` is the union of the fixed splits, in file order."""

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinRow:
    """One shipped prompt with its labels."""

    prompt: str
    """The prompt text, whitespace-stripped."""
    category: str
    """Topic label, e.g. ``cybercrime`` or ``cooking``."""
    split: str
    """One of ``train``, ``val``, ``test``."""


def builtin_source(kind: str, split: str = "all") -> str:
    """The canonical ``builtin:`` source string for a kind and split.

    Args:
        kind: One of :data:`BUILTIN_KINDS`.
        split: One of :data:`BUILTIN_SPLITS`.

    Returns:
        ``builtin:<kind>`` for ``split="all"``, else ``builtin:<kind>:<split>``.
    """
    return f"{BUILTIN_PREFIX}{kind}" if split == "all" else f"{BUILTIN_PREFIX}{kind}:{split}"


def parse_builtin_source(source: str) -> tuple[str, str]:
    """Split a ``builtin:KIND[:SPLIT]`` string into its kind and split, validating both.

    Args:
        source: A string starting with ``builtin:``.

    Returns:
        ``(kind, split)``; the split defaults to ``all``.

    Raises:
        FeatsteerError: If the string is malformed or names an unknown kind or split.
    """
    parts = source[len(BUILTIN_PREFIX) :].split(":")
    if len(parts) > 2:
        raise FeatsteerError(
            f"malformed built-in source {source!r}: expected builtin:KIND or builtin:KIND:SPLIT, "
            f"e.g. builtin:harmful:test"
        )
    kind = parts[0].strip()
    split = parts[1].strip() if len(parts) == 2 else "all"
    _check_kind_and_split(kind, split)
    return kind, split


def builtin_rows(kind: str, split: str = "all") -> tuple[BuiltinRow, ...]:
    """The shipped rows of one set, optionally restricted to one split, in file order.

    Args:
        kind: One of :data:`BUILTIN_KINDS`.
        split: One of :data:`BUILTIN_SPLITS`.

    Returns:
        The matching rows (never empty for a valid kind and split).

    Raises:
        FeatsteerError: If ``kind`` or ``split`` is unknown.
    """
    _check_kind_and_split(kind, split)
    rows = _read_rows(kind)
    if split == "all":
        return rows
    return tuple(row for row in rows if row.split == split)


def _check_kind_and_split(kind: str, split: str) -> None:
    if kind not in BUILTIN_KINDS:
        raise FeatsteerError(
            f"unknown built-in prompt set {kind!r}; choose one of {', '.join(BUILTIN_KINDS)} "
            f"(e.g. builtin:harmful)"
        )
    if split not in BUILTIN_SPLITS:
        raise FeatsteerError(
            f"unknown split {split!r} for built-in set {kind!r}; choose one of {', '.join(BUILTIN_SPLITS)}"
        )


@lru_cache(maxsize=len(BUILTIN_KINDS))
def _read_rows(kind: str) -> tuple[BuiltinRow, ...]:
    """Read and parse one shipped file (cached: the files never change at runtime)."""
    resource = resources.files("featsteer.datasets").joinpath("data").joinpath(f"{kind}.jsonl")
    rows = []
    with resource.open("r", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                rows.append(BuiltinRow(record["prompt"], record["category"], record["split"]))
    return tuple(rows)
