"""The benchmark scripts' command lines: `--help` describes a script and does nothing else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_every_benchmark_script_parses_its_arguments() -> None:
    """A script without an argument parser takes `--help` (or any typo) as nothing and runs in full."""
    unparsed = [path.name for path in sorted(BENCHMARKS.glob("*.py")) if "ArgumentParser(" not in path.read_text()]
    assert not unparsed


def test_organism_benchmark_help_writes_no_results(tmp_path) -> None:
    """`benchmarks/organism.py --help` ran the whole benchmark and overwrote results/organism.{json,md} (without
    ../shared/data, with the AdvBench rows dropped). The copy writes under `tmp_path`, never into the repository."""
    (tmp_path / "benchmarks").mkdir()
    script = shutil.copy(BENCHMARKS / "organism.py", tmp_path / "benchmarks" / "organism.py")
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: organism.py")
    assert not (tmp_path / "benchmarks" / "results").exists()


@pytest.mark.parametrize("command", [
    ["deflection_qwen.py"], ["sample_size.py", "--target", "qwen"], ["batch_noise.py"], ["precision.py"],
    ["refusal_margin.py"], ["organism_trials.py", "--model", "organism", "--out", "trials.json"],
])
def test_a_missing_shared_data_folder_or_input_is_one_line(command, tmp_path) -> None:
    """Without ../shared/data the real-model scripts ended in a FeatsteerError traceback from the prompt loader (batch_noise
    and precision in a CalledProcessError traceback from their worker), refusal_margin in a FileNotFoundError. The
    scripts run from a copy whose ../shared does not exist, with a model cache that does not exist: no model loads."""
    copy = tmp_path / "repo" / "benchmarks"
    copy.mkdir(parents=True)
    for path in BENCHMARKS.glob("*.py"):
        shutil.copy(path, copy / path.name)
    environment = {**os.environ, "FEATSTEER_MODEL_CACHE": str(tmp_path / "no-models"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, copy / command[0], *command[1:]], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=environment)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("missing "), done.stderr[-2000:]


def test_benchmark_results_are_written_whole() -> None:
    """The scripts wrote results/*.json and *.md with plain `write_text`, so a run stopped (or a render failing) half way
    left a file cut off in the middle or a new JSON beside an old markdown. They go through `featsteer.files.write_files`;
    the plain writes left are a run's own caches and inputs, never a results file."""
    import ast

    plain = set()
    for path in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("write_text", "write_bytes"):
                plain.add((path.name, ast.unparse(node.func.value)))
    assert plain == {
        ("batch_noise.py", "work / f'{name}.json'"), ("precision.py", "work / f'{dtype}.json'"),  # per-run caches
        ("deflection_contrast_qwen.py", "RESPONSES"), ("deflection_qwen.py", "RESPONSES"),  # responses under runs/
        ("judge_agreement.py", "RESPONSES"), ("steering_methods.py", "Path(args.save_responses)"),
        ("organism.py", "harmless"), ("organism_word_skew.py", "out"), ("real_model_sae.py", "path"),  # input prompt lists
    }
