"""Benchmark scripts refuse option combinations they would silently ignore, before loading any model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--search-kl", "answered"], "--search-kl answered needs --search N"),
    (["--search-kl", "response", "--search", "0"], "--search-kl response needs --search N"),
    (["--target", "qwen", "--val", "real"], "--val real chooses the organism's selection prompts"),
])
def test_abliteration_refuses_ignored_options(monkeypatch, capsys, argv, message):
    abliteration = load_script("abliteration")

    def no_model(*args, **kwargs):
        raise AssertionError("the options were not checked before the model was loaded")

    monkeypatch.setattr(abliteration, "load_model", no_model)
    monkeypatch.setattr(sys, "argv", ["abliteration.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        abliteration.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("script, argv", [
    ("real_model", ["--search", "0", "--search-kl", "answered"]),
    ("real_model_sae", ["--search-kl", "answered"]),
])
def test_real_model_benchmarks_refuse_a_search_kl_without_a_search(monkeypatch, capsys, script, argv):
    sys.path.insert(0, str(BENCHMARKS))  # they import their sibling abliteration.py
    try:
        module = load_script(script)
    finally:
        sys.path.remove(str(BENCHMARKS))
    def no_model(*args, **kwargs):
        raise AssertionError("the options were not checked before the model was loaded")

    monkeypatch.setattr(module, "load_model", no_model)
    monkeypatch.setattr(module, "qwen_gguf", no_model)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    assert "--search-kl answered needs --search N" in capsys.readouterr().err
