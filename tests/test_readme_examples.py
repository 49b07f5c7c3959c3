"""The README's Python API examples run as a reader runs them: top to bottom in one session, each block seeing what the
blocks before it defined, and each block followed by a fenced "prints" block must print exactly that.

Blocks that need what CI does not have (the Qwen GGUF file, the 20-minute MoE organism, files an earlier CLI run wrote,
or the placeholder arrays of the probes sketch) are left out by name below; everything else runs on the organism."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_OUTSIDE = ("q4_k_m.gguf", "moe-organism", "eval.json", "saes-attn", "fit(X, y)")
"""Text in a block that marks it as needing a file or model CI does not have."""


def python_api_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line, code, expected output or None) for each ```python block of the Python API section."""
    start, end = text.index("## Python API"), text.index("## Benchmarks")
    section, blocks = text[start:end], []
    for match in re.finditer(r"```python\n(.*?)```", section, re.S):
        after = re.match(r"\n?([^`]{0,400}?)```\n(.*?)```", section[match.end():], re.S)
        expected = after.group(2) if after and after.group(1).strip().startswith("prints") else None
        blocks.append((text[: start + match.start()].count("\n") + 1, match.group(1), expected))
    return blocks


def test_the_block_reader_finds_the_examples_and_their_outputs():
    blocks = python_api_blocks(README.read_text())
    assert len(blocks) >= 20
    assert sum(expected is not None for _, _, expected in blocks) >= 10
    first_line, first_code, first_expected = blocks[0]
    assert "load_model(\"organism\")" in first_code and first_expected.startswith('["I\'m sorry')


@pytest.mark.slow
def test_python_api_examples_print_what_the_readme_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write cmp/, abliterated/ ... into the working directory
    namespace: dict = {}
    mismatches, ran = [], 0
    for line, code, expected in python_api_blocks(README.read_text()):
        if any(marker in code for marker in NEEDS_OUTSIDE):
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own examples
        ran += 1
        if expected is not None and printed.getvalue().strip() != expected.strip():
            mismatches.append(f"README.md:{line}\n--- printed\n{printed.getvalue().strip()}\n--- README\n{expected.strip()}")
    assert ran >= 15
    assert not mismatches, "\n\n".join(mismatches)
