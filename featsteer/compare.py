"""Run every intervention method on the same prompts with the same metrics.

DIM abliteration is the baseline; every other method (other direction sources, runtime hooks, norm-
preserving edits, and - through `register_method` - probe and SAE methods) is applied to the same model,
evaluated on the same held-out prompts with the same greedy decoding and detector, and reverted before the
next one. Results are written as `results.json`, a refusal-vs-KL Pareto plot and a self-contained
`report.html`.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from featsteer.datasets import PromptSet
from featsteer.edits import EditConfig, apply_edit
from featsteer.evaluation.behaviour import GenerationConfig, evaluate_set
from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, kl_first_token, refusal_score
from featsteer.evaluation.refusal import RefusalDetector
from featsteer.interventions import Ablate, AddDirection, steer
from featsteer.models import ModelAdapter
from featsteer.pipeline import DirectionConfig, DirectionResult, find_refusal_direction, split

logger = logging.getLogger(__name__)


@dataclass
class CompareContext:
    """What methods may use: the model, the prompt splits, and directions found per method (cached)."""

    model: ModelAdapter
    harmful: PromptSet
    harmless: PromptSet
    direction_config: DirectionConfig
    _directions: dict[str, DirectionResult] = field(default_factory=dict)

    def directions(self, method: str, rank: int = 2) -> DirectionResult:
        """Find (once) and select the direction for a direction method on the training prompts."""
        key = f"{method}:{rank}" if method == "svd" else method
        if key not in self._directions:
            config = DirectionConfig(**{**asdict(self.direction_config), "method": method, "rank": rank})
            self._directions[key] = find_refusal_direction(self.model, self.harmful, self.harmless, config)
        return self._directions[key]


Method = Callable[[CompareContext], contextlib.AbstractContextManager]
"""A method returns a context manager under which the model is intervened on (hooks or an edit)."""

_METHODS: dict[str, tuple[Method, str]] = {}


def register_method(name: str, description: str) -> Callable[[Method], Method]:
    """Decorator adding a method to the comparison (later stages add probe and SAE methods this way)."""

    def wrap(fn: Method) -> Method:
        _METHODS[name] = (fn, description)
        return fn

    return wrap


def available_methods() -> dict[str, str]:
    """Registered method names and descriptions."""
    return {name: desc for name, (_, desc) in _METHODS.items()}


@contextlib.contextmanager
def _edit(ctx: CompareContext, method: str, config: EditConfig, rank: int = 2) -> Iterator[None]:
    result = ctx.directions(method, rank)
    with apply_edit(ctx.model, result.chosen_basis, config):
        yield


@register_method("none", "the unmodified model")
def _none(ctx: CompareContext):
    return contextlib.nullcontext()


@register_method("dim_abliteration", "DIM direction orthogonalised out of every residual writer (baseline)")
def _dim(ctx: CompareContext):
    return _edit(ctx, "dim", EditConfig())


@register_method("dim_ablation_hook", "DIM direction ablated from every residual write at run time")
def _dim_hook(ctx: CompareContext):
    return steer(ctx.model, Ablate(ctx.directions("dim").chosen_basis))


@register_method("dim_norm_preserving", "DIM abliteration keeping each write column's norm")
def _dim_np(ctx: CompareContext):
    return _edit(ctx, "dim", EditConfig(mode="norm_preserving"))


@register_method("projected_abliteration", "projected DIM (harmless-mean component removed) abliteration")
def _projected(ctx: CompareContext):
    return _edit(ctx, "projected", EditConfig())


@register_method("pca_abliteration", "paired-PCA direction abliteration")
def _pca(ctx: CompareContext):
    return _edit(ctx, "pca", EditConfig())


@register_method("svd2_abliteration", "rank-2 SVD subspace (ridge-weighted) abliteration")
def _svd(ctx: CompareContext):
    return _edit(ctx, "svd", EditConfig(), rank=2)


@register_method("linear_probe_abliteration", "logistic-regression probe direction abliteration")
def _linear(ctx: CompareContext):
    return _edit(ctx, "linear", EditConfig())


@register_method("whitened_probe_abliteration", "whitened (Ledoit-Wolf) probe direction abliteration")
def _whitened(ctx: CompareContext):
    return _edit(ctx, "whitened", EditConfig())


@register_method("dim_actadd_induce", "DIM mean difference added at its layer (induces refusal)")
def _induce(ctx: CompareContext):
    result = ctx.directions("dim")
    chosen = result.selection.chosen
    vector = result.candidates.bases[chosen.index, 0] * result.candidates.scores["mean_diff_norm"][chosen.index]
    return steer(ctx.model, AddDirection(vector, 1.0, where=chosen.hook))


@dataclass(frozen=True)
class MethodResult:
    """Metrics of one method on the evaluation prompts."""

    method: str
    description: str
    refusal_harmful: float
    refusal_harmless: float
    ci_harmful: tuple[float, float]
    ci_harmless: tuple[float, float]
    kl_harmless: float
    refusal_score_harmful: float
    refusal_score_harmless: float
    over_refusal: float | None
    seconds: float
    examples: list[dict]


def _measure(ctx: CompareContext, name: str, eval_sets: dict, base_logprobs, tokens, gen: GenerationConfig) -> MethodResult:
    fn, description = _METHODS[name]
    detector = RefusalDetector()
    start = time.perf_counter()
    manager = fn(ctx)  # may find directions first: not counted in the intervention's own time
    start_eval = time.perf_counter()
    with manager:
        harmful = evaluate_set(ctx.model, eval_sets["harmful"], "harmful", gen, detector)
        harmless = evaluate_set(ctx.model, eval_sets["harmless"], "harmless", gen, detector)
        over = evaluate_set(ctx.model, eval_sets["alarming"], "alarming", gen, detector).rate.rate if eval_sets.get("alarming") else None
        harmless_lp = first_token_logprobs(ctx.model, list(eval_sets["harmless"]), batch_size=gen.batch_size)
        harmful_lp = first_token_logprobs(ctx.model, list(eval_sets["harmful"]), batch_size=gen.batch_size)
    logger.info("%s: directions %.1fs, evaluation %.1fs", name, start_eval - start, time.perf_counter() - start_eval)
    return MethodResult(
        method=name, description=description,
        refusal_harmful=harmful.rate.rate, refusal_harmless=harmless.rate.rate,
        ci_harmful=(harmful.rate.low, harmful.rate.high), ci_harmless=(harmless.rate.low, harmless.rate.high),
        kl_harmless=kl_first_token(base_logprobs, harmless_lp),
        refusal_score_harmful=float(refusal_score(harmful_lp, tokens).mean()),
        refusal_score_harmless=float(refusal_score(harmless_lp, tokens).mean()),
        over_refusal=over, seconds=time.perf_counter() - start,
        examples=harmful.examples(2) + harmless.examples(2),
    )


@dataclass
class Comparison:
    """Every method's result plus the set-up they share."""

    results: list[MethodResult]
    setup: dict

    def table(self) -> str:
        """Markdown table of the headline metrics."""
        lines = ["| method | refusal harmful | refusal harmless | KL harmless | over-refusal | refusal score (harmful) |",
                 "|---|---|---|---|---|---|"]
        for r in self.results:
            over = "-" if r.over_refusal is None else f"{r.over_refusal:.3f}"
            lines.append(f"| {r.method} | {r.refusal_harmful:.3f} | {r.refusal_harmless:.3f} | {r.kl_harmless:.4f} | {over} | {r.refusal_score_harmful:.2f} |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """JSON-ready form."""
        return {"setup": self.setup, "results": [asdict(r) for r in self.results]}


def compare(
    model: ModelAdapter,
    harmful: PromptSet,
    harmless: PromptSet,
    *,
    methods: list[str] | None = None,
    eval_harmful: PromptSet | None = None,
    eval_harmless: PromptSet | None = None,
    alarming: PromptSet | None = None,
    direction_config: DirectionConfig | None = None,
    generation: GenerationConfig | None = None,
) -> Comparison:
    """Run `methods` (default: all registered) on the same held-out prompts.

    Without explicit evaluation sets, the last quarter of each prompt set is held out for evaluation and
    the rest is used to find and select directions.
    """
    if eval_harmful is None or eval_harmless is None:
        harmful, eval_harmful = split(harmful, 0.25)
        harmless, eval_harmless = split(harmless, 0.25)
    gen = generation or GenerationConfig()
    ctx = CompareContext(model, harmful, harmless, direction_config or DirectionConfig())
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    base_logprobs = first_token_logprobs(model, list(eval_harmless), batch_size=gen.batch_size)
    eval_sets = {"harmful": eval_harmful, "harmless": eval_harmless, "alarming": alarming}
    names = methods or list(_METHODS)
    unknown = [n for n in names if n not in _METHODS]
    if unknown:
        from featsteer.errors import FeatsteerError

        raise FeatsteerError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(_METHODS)}")
    results = [_measure(ctx, name, eval_sets, base_logprobs, tokens, gen) for name in names]
    setup = {
        "model": model.name, "n_train_harmful": len(harmful), "n_train_harmless": len(harmless),
        "n_eval_harmful": len(eval_harmful), "n_eval_harmless": len(eval_harmless),
        "eval_harmful_sha256": eval_harmful.sha256, "eval_harmless_sha256": eval_harmless.sha256,
        "generation": asdict(gen), "directions": asdict(ctx.direction_config),
        "chosen": {k: v.selection.to_dict()["chosen"] for k, v in ctx._directions.items()},
    }
    return Comparison(results, setup)


def pareto_png(comparison: Comparison) -> bytes:
    """Refusal rate on harmful prompts vs KL on harmless prompts, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in comparison.results:
        ax.scatter(r.kl_harmless, r.refusal_harmful, s=40)
        ax.annotate(r.method, (r.kl_harmless, r.refusal_harmful), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL(base || method), first token, harmless prompts (nats)")
    ax.set_ylabel("refusal rate on held-out harmful prompts")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_report(comparison: Comparison, out: str | Path) -> Path:
    """Write `results.json`, `pareto.png` and a self-contained `report.html` into `out`."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    png = pareto_png(comparison)
    (folder / "pareto.png").write_bytes(png)
    (folder / "results.json").write_text(json.dumps(comparison.to_json(), indent=1))
    (folder / "report.html").write_text(_html(comparison, png))
    return folder


def _html(comparison: Comparison, png: bytes) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(r.method)}</td><td>{html.escape(r.description)}</td><td>{r.refusal_harmful:.3f} "
        f"<small>[{r.ci_harmful[0]:.2f}, {r.ci_harmful[1]:.2f}]</small></td><td>{r.refusal_harmless:.3f}</td>"
        f"<td>{r.kl_harmless:.4f}</td><td>{'-' if r.over_refusal is None else f'{r.over_refusal:.3f}'}</td>"
        f"<td>{r.refusal_score_harmful:.2f}</td></tr>"
        for r in comparison.results
    )
    examples = "".join(
        f"<h3>{html.escape(r.method)}</h3><ul>"
        + "".join(f"<li><b>{html.escape(e['prompt'][:100])}</b><br>{html.escape(e['response'][:200])}</li>" for e in r.examples)
        + "</ul>"
        for r in comparison.results
    )
    setup = html.escape(json.dumps(comparison.setup, indent=1))
    image = base64.b64encode(png).decode()
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>featsteer compare</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px}}th{{background:#f3f3f3}}pre{{background:#f7f7f7;padding:8px;font-size:12px}}</style>
</head><body><h1>featsteer: method comparison on {html.escape(str(comparison.setup.get('model')))}</h1>
<p>Same held-out prompts, greedy decoding, same refusal detector for every method. KL is first-token KL(base || method) on harmless prompts.</p>
<table><tr><th>method</th><th>what</th><th>refusal (harmful) [95% CI]</th><th>refusal (harmless)</th><th>KL harmless</th><th>over-refusal</th><th>refusal score</th></tr>{rows}</table>
<h2>Refusal vs KL</h2><img alt="pareto plot" src="data:image/png;base64,{image}">
<h2>Examples</h2>{examples}<h2>Set-up</h2><pre>{setup}</pre></body></html>"""
