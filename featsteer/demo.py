"""The main job on the embedded organism: behaviour, activations, per-layer DIM separability.

`featsteer demo` (and `make demo`) runs this end to end on a CPU in a couple of minutes and writes every
output under a run folder outside the package. Later stages (abliteration, SAE features, probes) extend it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from featsteer.activations import capture
from featsteer.datasets import builtin_prompts
from featsteer.directions import Separability, difference_in_means, separability
from featsteer.evaluation.behaviour import GenerationConfig, RefusalReport, evaluate_refusal
from featsteer.models import ModelAdapter, load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRow:
    """Per-layer DIM statistics."""

    hook: str
    layer: int
    mean_diff_norm: float
    separability: Separability


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured and where it wrote it."""

    run_dir: Path
    report: RefusalReport
    layers: list[LayerRow]
    seconds: float

    @property
    def best(self) -> LayerRow:
        """The layer whose DIM direction separates held-out prompts best."""
        return max(self.layers, key=lambda row: (row.separability.accuracy, row.separability.auroc))


def default_run_dir(root: str | Path = "runs") -> Path:
    """`runs/<timestamp>/` under the current directory."""
    return Path(root) / time.strftime("%Y%m%d-%H%M%S")


def layer_separability(model: ModelAdapter, n_train: int | None = None, positions: str = "last", kind: str = "resid_pre") -> tuple[list[LayerRow], object]:
    """DIM per layer on built-in train prompts, scored on the built-in test prompts."""
    hooks = model.hook_names((kind,))
    sets = {}
    for split in ("train", "test"):
        for label in ("harmful", "harmless"):
            prompts = builtin_prompts(label, split)
            prompts = prompts.head(min(len(prompts), n_train)) if split == "train" and n_train else prompts
            sets[(split, label)] = capture(model, prompts, hooks, positions=positions, label=label)
    directions = difference_in_means(sets[("train", "harmful")], sets[("train", "harmless")])
    rows = []
    for i, hook in enumerate(hooks):
        score = separability(
            directions.direction(hook),
            sets[("train", "harmful")].hook(hook), sets[("train", "harmless")].hook(hook),
            sets[("test", "harmful")].hook(hook), sets[("test", "harmless")].hook(hook),
        )
        rows.append(LayerRow(hook, i, directions.scores["mean_diff_norm"][i], score))
    return rows, directions


def run_demo(model_spec: str = "organism", run_dir: str | Path | None = None, n_eval: int = 64, max_new_tokens: int = 32) -> DemoResult:
    """Evaluate refusal, capture activations, and score DIM directions layer by layer.

    Args:
        model_spec: anything `load_model` accepts.
        run_dir: output folder (default `runs/<timestamp>/`).
        n_eval: prompts per set for the behaviour check (built-in test split).
        max_new_tokens: generation cap for the behaviour check.
    """
    start = time.perf_counter()
    out = Path(run_dir) if run_dir else default_run_dir()
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_spec)
    harmful, harmless = builtin_prompts("harmful", "test"), builtin_prompts("harmless", "test")
    report = evaluate_refusal(model, harmful.head(min(n_eval, len(harmful))), harmless.head(min(n_eval, len(harmless))),
                              GenerationConfig(max_new_tokens=max_new_tokens))
    (out / "eval.json").write_text(json.dumps(report.to_json(), indent=1))
    rows, directions = layer_separability(model)
    directions.save(out / "directions")
    (out / "dim_layers.json").write_text(json.dumps([{**asdict(r), "separability": asdict(r.separability)} for r in rows], indent=1))
    return DemoResult(out, report, rows, time.perf_counter() - start)
