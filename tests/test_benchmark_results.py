"""The committed benchmark results are JSON that strict parsers read: no bare NaN or Infinity (Python's `json.dumps`
writes them; `JSON.parse`, jq and other readers reject them), and the scripts write through `json_text`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from featsteer.files import json_text

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS_JSON = sorted((BENCHMARKS / "results").glob("**/*.json"))


def strict_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def test_there_are_results_to_check():
    assert len(RESULTS_JSON) > 50


@pytest.mark.parametrize("path", RESULTS_JSON, ids=lambda path: str(path.relative_to(BENCHMARKS / "results")))
def test_results_json_parses_strictly(path):
    json.loads(path.read_text(encoding="utf-8"), parse_constant=strict_constant)


def test_json_text_writes_null_for_nan_and_passes_default():
    text = json_text({"path": Path("runs/x"), "values": [float("nan"), float("inf"), 0.5]}, indent=None, default=str)
    assert text == '{"path": "runs/x", "values": [null, null, 0.5]}'
    json.loads(text, parse_constant=strict_constant)


def test_fmt_writes_none_as_nan():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from abliteration import fmt
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert fmt(None, ".3f") == fmt(math.nan, ".3f") == "nan"
    assert fmt(None) == str(math.nan)
    assert fmt(0.25, ".3f") == "0.250"
    assert fmt(0.1) == str(0.1)
