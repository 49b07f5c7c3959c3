"""The main job on the embedded organism: behaviour, DIM separability, SAE features, every method, probes.

`featsteer demo` (and `make demo`) runs this end to end on a CPU in a few minutes and writes every output
under a run folder outside the package, with one `index.html` linking the reports.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from featsteer.activations import capture
from featsteer.compare import markdown_table_html
from featsteer.datasets import builtin_prompts, load_prompts
from featsteer.datasets.loaders import ORGANISM_CORPUS_PREFIX
from featsteer.directions import Separability, difference_in_means, logit_lens, separability
from featsteer.errors import FeatsteerError
from featsteer.evaluation.behaviour import GenerationConfig, RefusalReport, evaluate_refusal
from featsteer.files import check_empty_folder, json_text, staged_output
from featsteer.models import ModelAdapter, load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRow:
    """Per-layer DIM statistics."""

    hook: str
    layer: int
    mean_diff_norm: float
    separability: Separability
    """The train-split direction scored on the held-out test split."""
    cv_accuracy: float | None = None
    """Mean accuracy of DIM over 3 stratified folds of the training prompts (None with under 2 per class, or when the
    two classes have the same mean there, as at layer 0's last token, a template token)."""
    cv_auroc: float | None = None
    """Mean AUROC over the same folds (breaks `cv_accuracy` ties)."""


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured and where it wrote it."""

    run_dir: Path
    report: RefusalReport
    layers: list[LayerRow]
    seconds: float
    comparison: object | None = None
    probes: object | None = None
    stage_seconds: dict | None = None
    features: object | None = None
    lens: object | None = None
    """`directions.LogitLens` of the best layer's DIM direction: the tokens it promotes and suppresses."""

    @property
    def best(self) -> LayerRow:
        """The layer chosen on the training prompts: see `best_layer`."""
        return best_layer(self.layers)


def best_layer(rows: list[LayerRow]) -> LayerRow:
    """The layer whose DIM direction separates the training prompts best under cross-validation.

    Ranked by `cv_accuracy`, ties by `cv_auroc`, then the earliest layer. The held-out test split takes no part,
    so its accuracy at the chosen layer is an unbiased estimate; picking the layer by held-out accuracy would report
    the luckiest of several noisy test scores.
    """
    return max(rows, key=lambda row: cv_rank(row.cv_accuracy, row.cv_auroc, row.layer))


def cv_rank(cv_accuracy: float | None, cv_auroc: float | None, layer: int) -> tuple[float, float, int]:
    """What `best_layer` ranks a layer by (the highest wins): its CV accuracy, then its CV AUROC (None below any score),
    then the earliest layer. `featsteer.organism.train.dim_report` chooses its layer by it too."""
    return (cv_accuracy if cv_accuracy is not None else -1.0, cv_auroc if cv_auroc is not None else -1.0, -layer)


def training_cv_scores(harmful, harmless, hook: str, direction, folds: int = 3, seed: int = 0) -> tuple[float | None, float | None]:
    """DIM's mean accuracy and AUROC over stratified folds of one layer's training vectors (None: too few, or no
    direction: `difference_in_means` stores a zero one where both classes have one mean)."""
    import numpy as np

    from probes import DiffMeanProbe, training_cv

    smallest = min(len(harmful), len(harmless))
    if smallest < 2 or float(direction.norm()) == 0:
        return None, None  # too few prompts, or one vector for both classes (a template token's embedding at layer 0)
    X = np.concatenate([harmful.double().numpy(), harmless.double().numpy()])
    y = np.concatenate([np.ones(len(harmful), dtype=int), np.zeros(len(harmless), dtype=int)])
    return training_cv(DiffMeanProbe, X, y, min(folds, smallest), seed, key=hook)


def default_run_dir(root: str | Path = "runs") -> Path:
    """`runs/<timestamp>/` under the current directory."""
    return Path(root) / time.strftime("%Y%m%d-%H%M%S")


def layer_separability(model: ModelAdapter, n_train: int | None = None, positions: str = "last", kind: str = "resid_pre") -> tuple[list[LayerRow], object]:
    """DIM per layer on built-in train prompts, scored on the built-in test prompts and by 3-fold CV on the train prompts."""
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
        cv_accuracy, cv_auroc = training_cv_scores(sets[("train", "harmful")].hook(hook), sets[("train", "harmless")].hook(hook), hook,
                                                    directions.direction(hook))
        rows.append(LayerRow(hook, i, directions.scores["mean_diff_norm"][i], score, cv_accuracy, cv_auroc))
    return rows, directions


def run_demo(model_spec: str = "organism", run_dir: str | Path | None = None, n_eval: int = 64, max_new_tokens: int = 32,
             full: bool = True) -> DemoResult:
    """The whole pipeline on one model, every output under `run_dir`.

    Stages: refusal behaviour on the built-in test split; DIM separability per layer; Arditi selection and
    every registered intervention method on the same held-out prompts (`compare/`); the probe sweep and
    predict-control report (`probe/`); an `index.html` linking it all.

    Args:
        model_spec: anything `load_model` accepts (a loaded adapter keeps its dtype and device).
        run_dir: output folder (default `runs/<timestamp>/`).
        n_eval: prompts per set for the behaviour check (built-in test split).
        max_new_tokens: generation cap for every generation.
        full: also run the comparison and the probe report (False: behaviour and DIM only).

    The run is built in a hidden folder beside `run_dir` and renamed into place at the end, so an interrupted demo leaves
    no half-filled run folder (the hidden one is removed).
    """
    start = time.perf_counter()
    out = Path(run_dir) if run_dir else default_run_dir()
    check_empty_folder(out, "demo output folder", " (the default is a new runs/<timestamp>/)")
    with staged_output(out) as work:
        return _run_stages(model_spec, out, work, n_eval, max_new_tokens, full, start)


def _run_stages(model_spec, out: Path, work: Path, n_eval: int, max_new_tokens: int, full: bool, start: float) -> DemoResult:
    """`run_demo`'s stages, writing into `work` (renamed to `out` once all are done)."""
    from featsteer.compare import compare, write_report
    from featsteer.feature_report import rank_features, write_feature_report
    from featsteer.probe_report import probe_report, write_probe_report

    stages: dict[str, float] = {}
    model = load_model(model_spec)
    organism = model.name == "organism"  # the spec may be a loaded adapter (the CLI loads it with --dtype/--device)
    test = {label: builtin_prompts(label, "test") for label in ("harmful", "harmless", "alarming")}
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    report = evaluate_refusal(model, test["harmful"].head(min(n_eval, len(test["harmful"]))),
                              test["harmless"].head(min(n_eval, len(test["harmless"]))), gen)
    (work / "eval.json").write_text(json_text(report.to_json()))
    stages["behaviour"] = time.perf_counter() - start
    rows, directions = layer_separability(model)
    directions.save(work / "directions")
    (work / "dim_layers.json").write_text(json_text([{**asdict(r), "separability": asdict(r.separability)} for r in rows]))
    best = best_layer(rows)
    lens = logit_lens(model, directions.direction(best.hook))
    (work / "logit_lens.json").write_text(json_text({"hook": best.hook, **lens.to_dict()}))
    stages["dim_layers"] = time.perf_counter() - start - sum(stages.values())
    comparison = probes = ranking = saes = None
    if full:
        saes = _organism_saes(model) if organism else None
        if saes:
            ranking = rank_features(model, saes, builtin_prompts("harmful", "train"), builtin_prompts("harmless", "train"), top_n=12)
            write_feature_report(ranking, work / "features", title=f"SAE features behind refusal: {model.name}")
            stages["sae_features"] = time.perf_counter() - start - sum(stages.values())
        train = {label: builtin_prompts(label, "train") + builtin_prompts(label, "val") for label in ("harmful", "harmless")}
        # the organism was trained on the built-in train and val prompts: its picks are made on fresh generated ones
        val = ({"val_harmful": load_prompts(f"{ORGANISM_CORPUS_PREFIX}harmful:96"), "val_harmless": load_prompts(f"{ORGANISM_CORPUS_PREFIX}harmless:96")}
               if organism else {})
        comparison = compare(model, train["harmful"], train["harmless"], eval_harmful=test["harmful"], eval_harmless=test["harmless"],
                             alarming=test["alarming"], generation=gen, saes=saes, **val)
        write_report(comparison, work / "compare")
        stages["compare"] = time.perf_counter() - start - sum(stages.values())
        probes = probe_report(model, (builtin_prompts("harmful", "train"), builtin_prompts("harmless", "train")),
                              (test["harmful"], test["harmless"]), saes=saes)
        write_probe_report(probes, work / "probe", f"featsteer probe report: {model.name}")
        stages["probes"] = time.perf_counter() - start - sum(stages.values())
    result = DemoResult(out, report, rows, time.perf_counter() - start, comparison, probes, stages, ranking, lens)
    (work / "index.html").write_text(_index_html(result))
    return result


def _organism_saes(model: ModelAdapter) -> dict | None:
    """The organism's shipped SAEs, or None (with a warning) when they are not installed."""
    from featsteer.sae import load_saes

    try:
        return load_saes("organism", model)
    except FeatsteerError as error:
        logger.warning("SAE stages skipped: %s", error)
        return None


def _layer_table_html(rows: list[LayerRow], best: LayerRow) -> str:
    """The index page's DIM table: per layer the training-prompt CV scores `best_layer` chooses by, next to the held-out
    scores it reports, and the chosen layer with the rule that chose it (held-out accuracy takes no part in it)."""
    import html

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    body = "".join(
        f"<tr><td>{html.escape(r.hook)}{' (chosen)' if r is best else ''}</td><td>{cell(r.cv_accuracy)}</td><td>{cell(r.cv_auroc)}</td>"
        f"<td>{r.separability.accuracy:.3f}</td><td>{r.separability.auroc:.3f}</td></tr>" for r in rows)
    return ("<h2>DIM direction per layer (3-fold CV on the training prompts; held-out test split)</h2><table><tr><th>hook</th>"
            "<th>CV accuracy</th><th>CV AUROC</th><th>held-out accuracy</th><th>held-out AUROC</th></tr>" + body + "</table>"
            f"<p>Best layer: {html.escape(best.hook)}, the highest CV accuracy on the training prompts (ties: CV AUROC, then the "
            f"earliest layer); its held-out accuracy, {best.separability.accuracy:.3f}, took no part in the choice.</p>")


def _index_html(result: DemoResult) -> str:
    import html

    best = result.best
    links = ""
    if result.features is not None:
        links += '<li><a href="features/report.html">SAE feature ranking</a> (top refusal features, histograms, prompts, logit effects)</li>'
    if result.comparison is not None:
        links += ('<li><a href="compare/report.html">method comparison</a> (refusal and KL for every method, Pareto plot; '
                  'every response in <a href="compare/responses.json">responses.json</a>; read them by hand with '
                  '<code>featsteer label RUN_FOLDER/compare --method METHOD</code>)</li>')
    if result.probes is not None:
        links += '<li><a href="probe/report.html">probe sweep and predict-control report</a></li>'
    table = result.comparison.table() if result.comparison is not None else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>featsteer demo</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:3px 8px}}table{{border-collapse:collapse}}</style></head>
<body><h1>featsteer demo: {html.escape(result.report.model)}</h1><ul>{links}<li><a href="eval.json">eval.json</a>, <a href="dim_layers.json">dim_layers.json</a>, <a href="logit_lens.json">logit_lens.json</a></li></ul>
<h2>Refusal behaviour (built-in test split)</h2><pre>{html.escape(result.report.table())}</pre>
{_layer_table_html(result.layers, best)}<h2>Methods (same held-out prompts; KL = first-token KL on harmless prompts)</h2>{markdown_table_html(table)}
<p>Run time {result.seconds:.0f}s.</p></body></html>"""
