"""The README's own links: every `(#anchor)` names a heading that exists, as GitHub spells heading anchors, so the contents
list and the cross-references stay true as sections are renamed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[str]:
    """Markdown headings outside fenced code blocks."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"^#{1,6} (.+)$", line)):
            found.append(match.group(1))
    return found


def test_github_anchor_spelling():
    assert github_anchor("`featsteer info` - what featsteer sees in a model") == "featsteer-info---what-featsteer-sees-in-a-model"
    assert github_anchor("Qwen2.5-Coder-0.5B-Instruct (`benchmarks/real_model.py`)") == "qwen25-coder-05b-instruct-benchmarksreal_modelpy"


def test_every_internal_link_names_a_heading():
    text = README.read_text()
    anchors = {github_anchor(h) for h in headings(text)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 20, "the contents list links every command and benchmark section"
    assert sorted(set(links) - anchors) == []


def test_the_contents_list_every_command_and_benchmark_section():
    text = README.read_text()
    contents = text[text.index("**Contents**"): text.index("**The embedded organism**")]
    listed = set(re.findall(r"\]\(#([^)]+)\)", contents))
    sections = [github_anchor(h) for h in headings(text)[1:]]  # every heading under the title
    assert [a for a in sections if a not in listed] == [], "add these sections to the README's contents list"


def test_the_layout_names_every_benchmark_script():
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `benchmarks/` |"))
    scripts = sorted(path.name for path in (README.parent / "benchmarks").glob("*.py"))
    assert [name for name in scripts if f"`{name}`" not in row] == [], "name these scripts in the README's layout table"
