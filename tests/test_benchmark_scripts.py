"""The benchmark scripts' command lines: `--help` describes a script and does nothing else."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
