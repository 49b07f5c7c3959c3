"""The demo's index page renders the method table as HTML (cell for cell, separator row dropped)."""

from __future__ import annotations

from featsteer.demo import _markdown_table_html


def test_markdown_table_becomes_html_rows():
    table = "| method | refusal |\n|---|---|\n| none | 0.765 |\n| dim<x> | 0.624 |"
    page = _markdown_table_html(table)
    assert page.count("<tr>") == 3
    assert "<th>method</th><th>refusal</th>" in page
    assert "<td>dim&lt;x&gt;</td><td>0.624</td>" in page
    assert "---" not in page
    assert _markdown_table_html("") == ""
