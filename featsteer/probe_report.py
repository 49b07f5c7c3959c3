"""Where refusal is readable vs where it is used: probe sweeps next to steering effects.

For every layer, probes (difference in means, logistic regression, whitened, Mahalanobis) are trained on
harmful vs harmless activations and scored on held-out prompts next to a control task (selectivity): by default
labels that are a random function of each prompt's first word, which a probe reading phrasing rather than
content can learn (`CONTROLS`). The same layer's directions (DIM, linear probe, whitened probe) are then ablated from every
residual write and their steering effect is measured from first-token logits (drop of the refusal score on
harmful prompts, KL on harmless prompts). Disagreements - a layer that classifies well but does not steer,
or the reverse - are what the report is for.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from featsteer.activations import ActivationSet, Positions, capture
from featsteer.datasets import PromptSet
from featsteer.directions import find_directions, separability
from featsteer.directions.dim import mean_row_norm, means_coincide
from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, kl_first_token, refusal_score
from featsteer.files import json_text, write_files
from featsteer.interventions import Ablate, steer
from featsteer.models import LAYER_KINDS, NORM_KINDS, ModelAdapter, stream_point

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from sae_lens import SAE

PROBE_KINDS = ("diffmean", "linear", "whitened", "mahalanobis")
PROBE_FOLDS = 3
"""Cross-validation folds of the linear probe's C search and of the layer choice (on the training prompts)."""
MIN_TRAIN_PER_CLASS = 5
"""Training prompts per class the sweep needs: with 5, each of the layer choice's `PROBE_FOLDS` folds still trains on
`PROBE_FOLDS` per class, what the linear probe's own C search needs."""
SOURCES = ("dim", "linear", "whitened")
"""Direction sources always compared; `sae` (the top composite feature's decoder row) joins when SAEs are given."""


CONTROLS = ("first-words:N", "length:W", "permutation")
"""Control-task specs of `probe_report(control=...)` / `featsteer probe --control`: labels that are a seeded random function
of the instruction's first N words (lower-cased, punctuation at their ends dropped) or of its word count in buckets of W,
or the permutation null (labels permuted within each split, which no probe can learn)."""
DEFAULT_CONTROL = "first-words:1"
_WORD_EDGES = re.compile(r"^\W+|\W+$")


def first_words(prompt: str, n: int) -> str:
    """The first `n` words of a prompt, lower-cased, without punctuation at their ends: `"How do I..."` -> `"how do"`."""
    return " ".join(_WORD_EDGES.sub("", word) for word in prompt.lower().split()[:n])


def control_key(control: str | Callable[[str], Hashable]) -> tuple[str, Callable[[str], Hashable] | None]:
    """The name of a control task and its surface-key function (None for `permutation`), without any prompts.

    Args:
        control: a spec of `CONTROLS` (`first-words:2`, `length:5`, `permutation`) or a function from an instruction to
            its surface key (named `surface:<function name>`).

    Raises:
        FeatsteerError: on a spec that is not one of `CONTROLS`.
    """
    if callable(control):
        return f"surface:{getattr(control, '__name__', type(control).__name__)}", control
    if control == "permutation":
        return "permutation", None
    kind, _, width = str(control).partition(":")
    if kind not in ("first-words", "length") or not width.isdigit() or int(width) < 1:
        raise FeatsteerError(f"control {control!r}: give first-words:N (the instruction's first N words, e.g. first-words:1), "
                             "length:W (its word count in buckets of W words, e.g. length:5) or permutation")
    size = int(width)
    if kind == "first-words":
        return f"surface:{control}", lambda prompt: first_words(prompt, size)
    return f"surface:{control}", lambda prompt: len(prompt.split()) // size


def surface_control(control: str | Callable[[str], Hashable], train: tuple[PromptSet, PromptSet],
                    test: tuple[PromptSet, PromptSet]):
    """The control task `control` names (see `control_key`), keyed on the `(harmful, harmless)` prompts in the sweep's row order.

    Returns:
        A `probes.SurfaceControl`, or a `probes.PermutationControl` for `permutation`.

    Raises:
        FeatsteerError: on a spec that is not one of `CONTROLS`, or keys too coarse for two control classes.
    """
    from probes import PermutationControl, SurfaceControl

    name, key = control_key(control)
    if key is None:
        return PermutationControl()
    try:
        return SurfaceControl([key(p) for pair in train for p in pair], [key(p) for pair in test for p in pair], name=name)
    except ValueError as error:
        raise FeatsteerError(str(error)) from None


def _probe(kind: str):
    from probes import DiffMeanProbe, LinearProbe, MahalanobisProbe, WhitenedProbe

    return {"diffmean": DiffMeanProbe, "linear": lambda: LinearProbe(Cs=5, cv=PROBE_FOLDS), "whitened": WhitenedProbe,
            "mahalanobis": MahalanobisProbe}[kind]()


@dataclass(frozen=True)
class SourceEffect:
    """Classification and steering numbers for one direction source at one layer."""

    layer: int
    source: str
    auroc: float
    """Held-out AUROC of projecting on the direction."""
    refusal_drop: float
    """Mean refusal log-odds on harmful prompts, base minus ablated (higher = removes more refusal)."""
    kl_harmless: float
    """First-token KL(base || ablated) on harmless prompts."""


@dataclass
class ProbeReport:
    """Sweep rows per probe kind, per-layer direction cosines, and per-source effects."""

    sweep: dict[str, list]
    cosines: list[dict]
    effects: list[SourceEffect]
    hooks: list[str]
    sae_sources: dict[str, dict[str, str]] = field(default_factory=dict)
    """`{source: {swept hook: SAE hook}}`: which SAE's top feature each `sae...` source is at each swept hook."""
    layers: list[int] | None = None
    """The layers asked for (`probe_report(layers=...)`, `featsteer probe --layers`), in order; None for every layer."""
    control: str = "permutation"
    """The control task behind `control_accuracy` and `selectivity`: `surface:<key>` or `permutation`."""
    control_keys: dict | None = None
    """For a surface control: `{"n_keys": distinct keys, "seen_share": share of test prompts whose key is among the
    training prompts'}` (a probe that reads the key perfectly reaches about `seen_share + (1 - seen_share) / 2`)."""
    system: str | None = None
    """The system prompt every prompt was formatted with (None: none)."""

    def control_text(self) -> str:
        """One line naming the control task, e.g. `surface:first-words:1 (75 keys, 96% of test prompts' keys seen in training)`."""
        if self.control_keys is None:
            return f"{self.control} (labels permuted within each split: the permutation null)"
        return (f"{self.control} (labels a random function of the key; {self.control_keys['n_keys']} keys, "
                f"{self.control_keys['seen_share']:.0%} of test prompts' keys seen in training)")

    def best(self, kind: str = "linear"):
        """Sweep row of a probe kind with the highest cross-validated accuracy on the training prompts (ties: their
        cross-validated AUROC, then the earliest layer); its held-out accuracy was not used to choose it."""
        from probes import best_row

        return best_row(self.sweep[kind])

    def to_json(self) -> dict:
        """JSON-ready form."""
        return {"hooks": self.hooks, "sweep": {k: [asdict(r) for r in rows] for k, rows in self.sweep.items()},
                "cosines": self.cosines, "effects": [asdict(e) for e in self.effects], "sae_sources": self.sae_sources,
                "layers": self.layers, "control": self.control, "control_keys": self.control_keys, "system": self.system}


def probe_report(
    model: ModelAdapter,
    train: tuple[PromptSet, PromptSet],
    test: tuple[PromptSet, PromptSet],
    *,
    positions: str = "last",
    kind: str = "resid_pre",
    n_effect: int = 32,
    n_shuffles: int = 5,
    batch_size: int = 16,
    saes: Mapping[str, SAE] | None = None,
    layers: Sequence[int] | None = None,
    control: str | Callable[[str], Hashable] = DEFAULT_CONTROL,
    system: str | None = None,
) -> ProbeReport:
    """Run the probe sweep and the predict-control comparison (see module docstring).

    Args:
        model: the model.
        train: `(harmful, harmless)` prompts the probes and directions are fitted on.
        test: `(harmful, harmless)` held-out prompts for accuracy, AUROC and steering effects.
        positions: capture selector giving one vector per prompt: `last`, `instruction_end` or `mean_last:K`.
        kind: hook kind swept at every layer: a `d_model`-wide one (`resid_pre`, `resid_mid`, `resid_post`, `attn_out`,
            `mlp_out`, ...), since each layer's directions are ablated from the residual stream's writes.
        n_effect: held-out prompts per class for the steering effect.
        n_shuffles: control relabellings per probe and layer.
        batch_size: prompts per forward pass.
        saes: `{hook_name: SAE}`; each SAE's top composite feature (scored on the training prompts, its direction
            oriented towards harmful) is compared at the first swept hook whose stream holds it: source `sae` when
            the SAE reads the swept hook itself, `sae@<kind>` otherwise (an SAE on `blocks.{l}.hook_resid_post`,
            `hook_mlp_out`, `hook_attn_out` or `attn.hook_z` joins a `resid_pre` sweep at layer l+1; a hook_z
            feature is its decoder row written through the attention output projection). An SAE no swept hook
            follows within its layer (past the last swept layer, or in a layer `layers` leaves out) is skipped with
            a warning.
        layers: sweep only these layers (default: every layer; a large model's effects cost a forward pass
            per prompt, layer and source).
        control: the control task of selectivity (see `CONTROLS`): `first-words:N` (default N=1) or `length:W` give labels
            that are a seeded random function of that surface key, the same for training and test prompts, so a probe
            that reads phrasing scores on them; a function of the instruction is such a key too; `permutation` is the
            permutation null.
        system: the system prompt every prompt is formatted with, in the captures and the steering effects (None: none).
    """
    from probes import layer_sweep

    mode = Positions.parse(positions).mode
    if mode == "all":
        raise FeatsteerError("the probe report reads one vector per prompt, ending at its last token: --positions all gives every "
                             "token; use last, instruction_end or mean_last:K")
    if mode == "post_instruction":
        raise FeatsteerError("the probe report reads one vector per prompt: --positions post_instruction gives one per template token "
                             "after the instruction, and only the last would be read (the same as --positions last); use last, "
                             "instruction_end or mean_last:K")
    if n_effect < 1:
        raise FeatsteerError(f"--n-effect (n_effect) must be at least 1 held-out prompt per class, got {n_effect}")
    if n_shuffles < 1:
        raise FeatsteerError(f"n_shuffles must be at least 1 control relabelling per probe and layer, got {n_shuffles}")
    if kind not in LAYER_KINDS:
        raise FeatsteerError(f"the probe report ablates each layer's directions from the residual stream, so it sweeps a d_model-wide kind "
                             f"({', '.join(LAYER_KINDS)}); {kind} vectors are not residual-stream vectors")
    smallest = min(len(train[0]), len(train[1]))
    if smallest < MIN_TRAIN_PER_CLASS:
        raise FeatsteerError(f"the layer is chosen by {PROBE_FOLDS}-fold cross-validation of the probes, the linear one with its own "
                             f"{PROBE_FOLDS}-fold C search inside, so they need at least {MIN_TRAIN_PER_CLASS} training prompts per class; "
                             f"got {len(train[0])} harmful and {len(train[1])} harmless (give more prompts)")
    if layers is not None and (not layers or min(layers) < 0 or max(layers) >= model.n_layers):
        raise FeatsteerError(f"layers {list(layers)}: give at least one layer, each in 0..{model.n_layers - 1} ({model.name} has "
                             f"{model.n_layers} layers)")
    control_task = surface_control(control, train, test)  # a bad spec fails before the capture
    hooks = model.hook_names((kind,), None if layers is None else sorted(set(layers)))
    acts = {(split, label): capture(model, prompts, hooks, positions=positions, batch_size=batch_size, label=label, system=system)
            for split, pair in (("train", train), ("test", test)) for label, prompts in zip(("harmful", "harmless"), pair, strict=True)}
    if mode == "instruction_end":
        # one row per prompt, labelled by its own tail length (which may differ between prompts): read them all as one position
        acts = {key: dataclasses.replace(value, position=torch.full_like(value.position, -1)) for key, value in acts.items()}

    def xy(split: str, hook: str):
        a, b = acts[(split, "harmful")].at_position(hook), acts[(split, "harmless")].at_position(hook)
        return torch.cat([a, b]).double().numpy(), [1] * len(a) + [0] * len(b)

    # a hook where every prompt has the same activation (layer 0 at a shared template token) carries nothing
    carrying = [h for h in hooks if not _means_coincide_at(acts[("train", "harmful")], acts[("train", "harmless")], h)]
    constant, hooks = [h for h in hooks if h not in carrying], carrying
    if not hooks:
        raise FeatsteerError(f"no {kind} hook tells the two sets apart: their mean activations are identical at every layer "
                             "(the same prompts on both sides?)")
    splits = {hook: (*xy("train", hook), *xy("test", hook)) for hook in hooks}
    sweep = {probe_kind: layer_sweep(splits, lambda k=probe_kind: _probe(k), n_shuffles=n_shuffles, cv=PROBE_FOLDS,
                                     control=control_task) for probe_kind in PROBE_KINDS}
    directions = {source: find_directions(acts[("train", "harmful")], acts[("train", "harmless")], source) for source in SOURCES}
    sae_sources: dict[str, dict[str, str]] = {}
    if saes:
        found, sae_sources = _sae_directions(model, saes, hooks, acts, train, positions, batch_size, constant, system)
        directions.update(found)
    cosines = []
    for hook in hooks:
        row = {"hook": hook}
        sources = [source for source in directions if _has(directions[source], hook)]
        for i, a in enumerate(sources):
            for b in sources[i + 1 :]:
                row[f"{a}~{b}"] = float(directions[a].direction(hook) @ directions[b].direction(hook))
        cosines.append(row)
    effects = _effects(model, directions, acts, hooks, test, n_effect, batch_size, system)
    keys = getattr(control_task, "n_keys", None)
    control_keys = None if keys is None else {"n_keys": keys, "seen_share": control_task.seen_share}
    return ProbeReport(sweep, cosines, effects, hooks, sae_sources, None if layers is None else sorted(set(layers)),
                       control_task.name, control_keys, system)


def _means_coincide_at(harmful: ActivationSet, harmless: ActivationSet, hook: str) -> bool:
    """`means_coincide` of the two sets' last-position rows at `hook` (what the probes are fitted on), at the rows' size."""
    harmful_rows, harmless_rows = harmful.at_position(hook).double(), harmless.at_position(hook).double()
    return means_coincide(harmful_rows.mean(0), harmless_rows.mean(0), mean_row_norm(harmful_rows, harmless_rows))


def _has(directions, hook: str) -> bool:
    return hook in directions.hook_names


def _carrier(model: ModelAdapter, sae_hook: str, swept: Sequence[str]) -> str | None:
    """The swept hook whose activations first hold what an SAE at `sae_hook` reads or writes, within one layer's span."""
    if sae_hook in swept:
        return sae_hook
    site = model.hook_site(sae_hook)
    if site.layer is None:
        return None
    # the depth the selection's late-layer rule reads too: a parallel block's attention writes into the block's output,
    # and its MLP norm reads the block's input
    start = stream_point(site, model.n_layers, model.parallel_block)
    after = [(stream_point(model.hook_site(h), model.n_layers, model.parallel_block), h) for h in swept
             if model.hook_site(h).kind not in NORM_KINDS]
    after = sorted((p, h) for p, h in after if start <= p < start + 1)
    return after[0][1] if after else None


def _sae_directions(model: ModelAdapter, saes: Mapping[str, SAE], swept: Sequence[str], acts, train, positions: str, batch_size: int,
                    constant: Sequence[str] = (), system: str | None = None):
    """Each SAE's top composite feature as a direction at its carrier hook, grouped into sources. `constant` are the
    hooks left out of the sweep because every prompt has the same activation there (named apart in the warning).

    Returns:
        `({source: DirectionSet}, {source: {swept hook: SAE hook}})`.
    """
    from featsteer.directions import DirectionSet
    from featsteer.errors import FeatsteerError
    from featsteer.features import FeatureScores, score_features, score_prompts, top_feature_directions

    carriers = {hook: _carrier(model, hook, swept) for hook in saes}
    same = sorted(hook for hook, carrier in carriers.items() if carrier is None and hook in constant)
    skipped = sorted(hook for hook, carrier in carriers.items() if carrier is None and hook not in constant)
    if same:
        logger.warning("probe report: the SAE(s) at %s read a hook where every prompt has the same activation at the read "
                       "position (left out of the sweep); they are left out", ", ".join(same))
    if skipped:
        logger.warning("probe report: no swept hook follows the SAE(s) at %s within their layer; they are left out", ", ".join(skipped))
    placed = {hook: saes[hook] for hook, carrier in carriers.items() if carrier is not None}
    if not placed:
        raise FeatsteerError(f"none of the SAEs ({', '.join(saes)}) is read at or just before a swept hook ({swept[0]} ... {swept[-1]}): "
                             "sweep the layers the SAEs sit in")
    inside = {hook: sae for hook, sae in placed.items() if hook in acts[("train", "harmful")].hook_names}
    outside = {hook: sae for hook, sae in placed.items() if hook not in inside}
    parts = []
    if inside:
        parts.append(score_features(inside, acts[("train", "harmful")], acts[("train", "harmless")]))
    if outside:
        parts.append(score_prompts(model, outside, list(train[0]), list(train[1]), positions=positions, batch_size=batch_size,
                                   system=system))
    scores = parts[0] if len(parts) == 1 else FeatureScores.concat(parts)
    best = top_feature_directions(scores, placed, 1, subspace=True, model=model)
    sae_hooks = best.provenance.get("sae_hooks") or list(best.hook_names)
    harmful, harmless = acts[("train", "harmful")], acts[("train", "harmless")]
    grouped: dict[str, list[tuple[str, Tensor]]] = {}
    sources: dict[str, dict[str, str]] = {}
    # in layer order, not the ranking's (which put the best feature's SAE first): the notes and the printed line read down the layers
    # (an SAE read at the swept hook itself before those that join it there)
    for i in sorted(range(len(sae_hooks)), key=lambda i: (swept.index(carriers[sae_hooks[i]]), carriers[sae_hooks[i]] != sae_hooks[i], sae_hooks[i])):
        sae_hook = sae_hooks[i]
        carrier = carriers[sae_hook]
        basis = best.bases[i, 0]
        sign = torch.sign((harmful.mean(carrier) - harmless.mean(carrier)).float() @ basis)
        source = "sae" if carrier == sae_hook else f"sae@{model.hook_site(sae_hook).kind}"
        grouped.setdefault(source, []).append((carrier, basis * (sign if sign != 0 else 1.0)))
        sources.setdefault(source, {})[carrier] = sae_hook
    out = {}
    for source, entries in grouped.items():
        out[source] = DirectionSet(torch.stack([b for _, b in entries])[:, None, :], tuple(h for h, _ in entries), (-1,) * len(entries),
                                   f"{best.method}", {}, {"sae_hooks": sources[source]})
    return out, sources


def _effects(model, directions, acts, hooks, test, n_effect, batch_size, system=None) -> list[SourceEffect]:
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    harmful, harmless = list(test[0])[:n_effect], list(test[1])[:n_effect]
    base_refusal = refusal_score(first_token_logprobs(model, harmful, batch_size=batch_size, system=system), tokens).mean()
    base_harmless = first_token_logprobs(model, harmless, batch_size=batch_size, system=system)
    effects = []
    pairs = [(hook, source) for hook in hooks for source in directions if _has(directions[source], hook)]
    # two passes over the n_effect prompts per pair: most of a deep model's report, so it shows its progress (-v, a terminal)
    for hook, source in tqdm(pairs, desc="probe: effects", disable=not model.show_progress, leave=False):
        layer = model.hook_site(hook).layer
        direction = directions[source].direction(hook)
        score = separability(direction, acts[("train", "harmful")].at_position(hook), acts[("train", "harmless")].at_position(hook),
                             acts[("test", "harmful")].at_position(hook), acts[("test", "harmless")].at_position(hook))
        if float(direction.norm()) == 0:
            effects.append(SourceEffect(layer, source, score.auroc, 0.0, 0.0))
            continue
        with steer(model, Ablate(direction)):
            ablated = refusal_score(first_token_logprobs(model, harmful, batch_size=batch_size, system=system), tokens).mean()
            kl = kl_first_token(base_harmless, first_token_logprobs(model, harmless, batch_size=batch_size, system=system))
        effects.append(SourceEffect(layer, source, score.auroc, float(base_refusal - ablated), kl))
    return effects


def _plot(report: ProbeReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for color, (kind, rows) in zip(("C0", "C1", "C2", "C3"), report.sweep.items(), strict=False):
        layers = [int(r.key.split(".")[1]) for r in rows]
        left.plot(layers, [r.accuracy for r in rows], marker="o", color=color, label=f"{kind} accuracy")
        left.plot(layers, [r.selectivity for r in rows], linestyle="--", color=color, label=f"{kind} selectivity (dashed)")
    left.xaxis.get_major_locator().set_params(integer=True)
    right.xaxis.get_major_locator().set_params(integer=True)
    left.set_xlabel("layer")
    left.set_title("readable: held-out probe accuracy / selectivity")
    left.legend(fontsize=7)
    for source in dict.fromkeys(e.source for e in report.effects):
        rows = [e for e in report.effects if e.source == source]
        right.plot([e.layer for e in rows], [e.refusal_drop for e in rows], marker="o", label=f"{source}: refusal drop")
    right.set_xlabel("layer")
    right.set_title("used: refusal-score drop when ablated")
    right.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_probe_report(report: ProbeReport, out: str | Path, title: str = "featsteer probe report") -> Path:
    """Write `results.json`, `sweep.png`, `sweep.md` and a self-contained `report.html`."""
    from probes import sweep_table

    png = _plot(report)
    swept = "every layer" if report.layers is None else "layers " + ", ".join(map(str, report.layers)) + " (asked for)"
    tables = f"Swept: {swept}.\nControl task: {report.control_text()}.\n\n" + "\n\n".join(f"### {kind}\n\n{sweep_table(rows)}" for kind, rows in report.sweep.items())
    effect_rows = "".join(
        f"<tr><td>{e.layer}</td><td>{e.source}</td><td>{e.auroc:.3f}</td><td>{e.refusal_drop:.3f}</td><td>{e.kl_harmless:.4f}</td></tr>"
        for e in report.effects
    )
    cos_rows = "".join("<tr>" + "".join(f"<td>{v if isinstance(v, str) else f'{v:.3f}'}</td>" for v in row.values()) + "</tr>" for row in report.cosines)
    cos_head = "".join(f"<th>{html.escape(k)}</th>" for k in report.cosines[0]) if report.cosines else ""
    sae_note = "".join(
        f"<p>{html.escape(source)}: the top composite feature of the SAE at {html.escape(sae_hook)}, compared at {html.escape(swept)}"
        + (" (its decoder row written through the attention output projection)" if sae_hook.endswith("attn.hook_z") else "") + "</p>"
        for source, pairs in report.sae_sources.items() for swept, sae_hook in pairs.items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 7px;font-size:13px}}</style></head>
<body><h1>{html.escape(title)}</h1><img alt="sweep" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Predict vs control: classification AUROC next to steering effect (ablation at every residual write)</h2>
<table><tr><th>layer</th><th>source</th><th>held-out AUROC</th><th>refusal-score drop</th><th>first-token KL (harmless)</th></tr>{effect_rows}</table>
{sae_note}<h2>Cosine between direction sources per layer</h2><table><tr>{cos_head}</tr>{cos_rows}</table>
<h2>Probe sweeps</h2><pre>{html.escape(tables)}</pre></body></html>"""
    return write_files(out, {"sweep.png": png, "results.json": json_text(report.to_json()), "sweep.md": tables + "\n",
                             "report.html": page})  # every file rendered first: a failure leaves the folder as it was
