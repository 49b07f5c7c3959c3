"""Which SAE features carry refusal, and what each one is: the feature-ranking report.

A score table says *that* a feature separates harmful from harmless prompts; deciding whether it is a
refusal feature needs more: how its activations are distributed on the two sets, which tokens of which
prompts make it fire, what it writes (the tokens its decoder row promotes and suppresses through the
unembedding) and whether it points where the difference-in-means (DIM) direction of the same hook does.
`rank_features` computes all of that in one go (one capture pass per prompt set for every SAE hook, the
scores from `featsteer.features.score_features`, an all-token pass only for the few prompts shown), and
`write_feature_report` turns it into `report.html` (self-contained, plots embedded), `features.csv` (every
feature of every SAE, ranked) and `features.json`, each written atomically.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from featsteer.activations import ActivationSet, Positions, capture, hook_width
from featsteer.directions.dim import mean_row_norm, means_coincide
from featsteer.directions.directions import unit
from featsteer.directions.geometry import direct_logits, token_text
from featsteer.errors import FeatsteerError
from featsteer.features import (
    METRICS,
    UNITS,
    FeatureScores,
    hook_layer,
    merge_sae_scores,
    residual_writes,
    score_features,
)
from featsteer.files import json_text, write_files
from featsteer.models import ModelAdapter
from featsteer.sae import NORMALISED_UNIT, encode_activations, inside_domain, reads_heads, validated_sae_map
from featsteer.sae.steering import first_trained_position, spliced_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

KEY_ALIASES: dict[str, str] = {"differential": "mean_difference"}
"""Extra names accepted for ranking keys (`differential` is the mean activation difference)."""
REPORT_FILES: tuple[str, ...] = ("report.html", "features.csv", "features.json")
"""What `write_feature_report` writes."""
_HISTOGRAM_BINS = 30

_ClassValues = tuple[Tensor, Tensor]
"""A top feature's activations on one prompt set: per scored row, and per prompt (max over its rows)."""
_TopValues = dict[tuple[str, int], tuple[_ClassValues, _ClassValues]]
"""`(hook, feature) -> (harmful values, harmless values)`."""


@dataclass(frozen=True)
class TokenScore:
    """One vocabulary token and the logit a decoder row adds to it."""

    token_id: int
    token: str
    """The token decoded on its own."""
    logit: float
    """Logit contribution per unit of feature activation (for an SAE that normalises each input row, per unit of
    normalised input: see `FeatureDetail.input_normalization`)."""


@dataclass(frozen=True)
class PromptExample:
    """One prompt that activates a feature strongly, with the feature's activation on every token."""

    prompt: str
    label: str
    """`harmful` or `harmless`."""
    score: float
    """The feature's activation at the scored positions (max over them; for `mean_last:K`, on the window mean)."""
    tokens: tuple[str, ...]
    """The chat-formatted prompt's tokens, each decoded on its own."""
    activations: tuple[float, ...]
    """The feature's activation at each token."""
    scored: tuple[bool, ...]
    """Which tokens are at the scored positions (the `score` is the max over them)."""
    outside: tuple[bool, ...] = ()
    """Which tokens are above the SAE's norm bound (`featsteer.sae.outside_domain`): a splice passes them through
    unedited, so they are neither scored nor part of the report's shading scale."""
    head: tuple[bool, ...] = ()
    """Which tokens are in the chat-template head the SAE was not trained on (before its `featsteer_first_position`): a
    splice leaves them as they are, so they are neither scored nor part of the report's shading scale."""


@dataclass(frozen=True)
class FeatureDetail:
    """Everything the report shows about one top feature."""

    rank: int
    """1-based position in the ranking."""
    hook_name: str
    feature_id: int
    scores: dict[str, Any]
    """The feature's row of the score table (`FeatureScores.rows()`)."""
    harmful_activations: Float[Tensor, " n_harmful_rows"]
    """Activation on every scored harmful row."""
    harmless_activations: Float[Tensor, " n_harmless_rows"]
    """Activation on every scored harmless row."""
    examples: tuple[PromptExample, ...]
    """Top-activating prompts of both sets, strongest first (only prompts where the feature is active)."""
    promoted: tuple[TokenScore, ...]
    """Tokens whose logits the decoder row raises most, strongest first."""
    suppressed: tuple[TokenScore, ...]
    """Tokens whose logits the decoder row lowers most, strongest first."""
    dim_cosine: float
    """Cosine of the decoder row with the DIM direction of the same hook (NaN when either is zero)."""
    input_normalization: str = "none"
    """The SAE's `normalize_activations`. For `layer_norm` and `constant_norm_rescale` its activations, `decoder_norm`
    and token logits are per unit of normalised input (`featsteer.sae.NORMALISED_UNIT`): what the feature writes into
    a row is that times the row's own scale (`featsteer.sae.input_scales`)."""


@dataclass(frozen=True)
class FeatureRanking:
    """Scores of every feature, DIM cosines, and the detail of the top features."""

    scores: FeatureScores
    """Every feature of every SAE, ranked by `by`."""
    dim_cosines: dict[str, Tensor]
    """`{hook_name: (d_sae,)}` float64 cosine of each decoder row with the hook's DIM direction."""
    dim: dict[str, Tensor]
    """`{hook_name: unit vector}`: the DIM direction of each hook over the rows its SAE's features are scored on (captured
    rows pooled; see `scored_dim`), as wide as the hook's rows (`n_heads * d_head` at `attn.hook_z`)."""
    features: tuple[FeatureDetail, ...]
    """The top features, in ranking order."""
    by: str
    """Ranking key (a `FeatureScores.column` name)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Model, prompt sets, positions, SAEs, normalisation: whatever reproduces the ranking."""

    def rows(self) -> list[dict[str, Any]]:
        """Every feature in ranking order: rank, score-table row, `dim_cosine` (non-finite -> None), and what its magnitudes
        are measured in: `units` (see `magnitude_units`) and its SAE's `input_normalization` (None when not recorded)."""
        out = []
        cosines = {hook: values.tolist() for hook, values in self.dim_cosines.items()}
        units = magnitude_units(self.provenance.get("units", "activation"), bool(self.provenance.get("normalize")))
        normalization = self.scores.provenance.get("input_normalization") or {}
        for rank, row in enumerate(self.scores.rows(), start=1):
            cosine = cosines[row["hook_name"]][row["feature_id"]]
            out.append({"rank": rank, **row, "dim_cosine": cosine if math.isfinite(cosine) else None, "units": units,
                        "input_normalization": normalization.get(row["hook_name"])})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: provenance, the top features' details (histograms as counts), every row, and the tied ranks
        among the top features (`ties`: `[first rank, last rank, score]` each)."""
        return {"by": self.by, "provenance": self.provenance, "top": [_detail_dict(d) for d in self.features],
                "rows": self.rows(), "ties": [list(group) for group in self.ties()]}

    def ties(self) -> list[tuple[int, int, float]]:
        """`(first rank, last rank, score)` of each run of two or more ranks with the same `by` score that reaches the
        top features: their order among themselves is only the tie-break (layer, then feature id), not a finding."""
        values = self.scores.column(self.by).tolist()
        groups, start = [], 0
        for end in range(1, len(values) + 1):
            if end == len(values) or values[end] != values[start]:  # NaN equals nothing: never a tie here
                if end - start > 1 and start < len(self.features):
                    groups.append((start + 1, end, values[start]))
                start = end
        return groups

    def rank_label(self, rank: int) -> str:
        """`rank` as printed: `=3` when it shares its score with another rank (see `ties`), else `3`."""
        return f"={rank}" if any(first <= rank <= last for first, last, _ in self.ties()) else str(rank)

    def tie_note(self) -> str:
        """One sentence naming the tied ranks among the top features, or '' when none tie."""
        if not self.ties():
            return ""
        groups = "; ".join(f"ranks {first}-{last} tied at {score:.6g}" for first, last, score in self.ties())
        return f"Ties by {self.by} ({groups}) are ordered by layer, then feature id."


def magnitude_units(units: str, normalize: bool) -> str:
    """What a ranking's magnitude columns (`harmful_mean`, `harmless_mean`, `mean_difference`, `composite`, `scale`) are in:
    `activation` (each feature's activation; for an SAE that normalises each input row, of the normalised row) or `residual`
    (activation x decoder norm x the row's `featsteer.sae.input_scales`: units of the activation at the SAE's hook), with
    `/scale` appended when they were divided by each feature's `scale` (which itself stays in the named units)."""
    return f"{units}/scale" if normalize else units


def ranking_key(by: str) -> str:
    """Resolve a ranking key (`composite`, `differential`, `cohens_d`, `auroc`, ... or `abs_<name>`).

    Raises:
        FeatsteerError: for an unknown key.
    """
    prefix = "abs_" if by.startswith("abs_") else ""
    name = by.removeprefix("abs_")
    name = KEY_ALIASES.get(name, name)
    if name not in METRICS:
        names = ", ".join([*METRICS[:4], *KEY_ALIASES, *METRICS[4:]])
        raise FeatsteerError(f"unknown ranking metric '{by}': use one of {names} (or abs_<name>)")
    return prefix + name


def rank_features(
    model: ModelAdapter,
    saes: SAE | Mapping[str, SAE] | Sequence[SAE],
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: str = "last",
    top_n: int = 20,
    by: str = "composite",
    normalize: bool = False,
    units: str = "activation",
    n_examples: int = 5,
    n_tokens: int = 10,
    batch_size: int = 16,
    system: str | None = None,
) -> FeatureRanking:
    """Score every feature of every SAE on harmful vs harmless prompts and describe the top features.

    Args:
        model: the model the SAEs read from.
        saes: one SAE, several (attached at their recorded `hook_name`), or `{hook_name: sae}`.
        harmful: harmful instructions (chat-formatted for capture); a `PromptSet` or strings.
        harmless: harmless instructions.
        positions: capture selector (`last`, `mean_last:K`, `post_instruction`, `instruction_end`, `all`); the captured
            rows are pooled for scoring, histograms and the DIM direction (all three read the rows `spliced_rows` keeps).
        top_n: how many features get a detailed section.
        by: ranking key (see `ranking_key`).
        normalize: divide magnitude scores by each feature's max activation (see `score_features`).
        units: `activation` (each feature's own units) or `residual` (activation x decoder norm; see `score_features`).
        n_examples: top-activating prompts shown per feature.
        n_tokens: promoted and suppressed tokens listed per feature.
        batch_size: prompts per forward pass.
        system: optional system prompt for the chat template.

    Returns:
        The ranking (see `FeatureRanking`).

    Raises:
        FeatsteerError: unknown key, `top_n < 1`, an SAE that does not fit the model, or too few prompts.
    """
    key = ranking_key(by)
    if top_n < 1 or n_examples < 0 or n_tokens < 1:
        raise FeatsteerError(f"need top_n >= 1, n_examples >= 0 and n_tokens >= 1; got {top_n}, {n_examples}, {n_tokens}")
    if units not in UNITS:
        raise FeatsteerError(f"unknown units '{units}': use one of {', '.join(UNITS)}")
    sae_map = validated_sae_map(saes, model)
    groups = _width_groups(model, sae_map)
    acts: dict[str, dict[str, ActivationSet]] = {}
    for label, prompts in (("harmful", harmful), ("harmless", harmless)):
        acts[label] = {}
        for hooks in groups:
            captured = capture(model, [str(p) for p in prompts], hooks, positions=positions, batch_size=batch_size, system=system,
                               label=label, progress=False)
            acts[label].update(dict.fromkeys(hooks, captured))
    parts = [score_features({h: sae_map[h] for h in hooks}, acts["harmful"][hooks[0]], acts["harmless"][hooks[0]], normalize=normalize, by=key,
                            units=units)
             for hooks in groups]
    scores = parts[0] if len(parts) == 1 else merge_sae_scores(parts, sae_map).sort(key)
    dim = {hook: scored_dim(sae, acts["harmful"][hook], acts["harmless"][hook], hook) for hook, sae in sae_map.items()}
    dim_cosines = {hook: decoder_dim_cosines(sae, dim[hook]) for hook, sae in sae_map.items()}
    top = scores.top(min(top_n, len(scores)), key)
    values = _top_activations(sae_map, acts, top)
    examples = _examples(model, sae_map, acts, top, values, n_examples, batch_size, system)
    details = []
    for rank, (hook, feature, row) in enumerate(zip(top.hook_names, top.feature_ids.tolist(), top.rows(), strict=True), start=1):
        promoted, suppressed = promoted_tokens(model, sae_map[hook], feature, n_tokens)
        harmful_values, harmless_values = values[(hook, feature)]
        details.append(FeatureDetail(rank=rank, hook_name=hook, feature_id=feature, scores=row,
                                     harmful_activations=harmful_values[0], harmless_activations=harmless_values[0],
                                     examples=examples[(hook, feature)], promoted=promoted, suppressed=suppressed,
                                     dim_cosine=float(dim_cosines[hook][feature]),
                                     input_normalization=str(sae_map[hook].cfg.normalize_activations)))
    provenance = {**scores.provenance, "by": key, "top_n": len(details), "normalize": normalize, "units": units,
                  "d_sae": {hook: int(sae.cfg.d_sae) for hook, sae in sae_map.items()},
                  "harmful_source": getattr(harmful, "source", None), "harmless_source": getattr(harmless, "source", None),
                  "harmful_sha256": getattr(harmful, "sha256", None), "harmless_sha256": getattr(harmless, "sha256", None),
                  "system": system}
    return FeatureRanking(scores=scores, dim_cosines=dim_cosines, dim=dim, features=tuple(details), by=key, provenance=provenance)


def _width_groups(model: ModelAdapter, sae_map: Mapping[str, SAE]) -> list[list[str]]:
    """The SAE hooks grouped by row width (a capture holds one width: hook_z next to the stream on Gemma 2)."""
    groups: dict[int, list[str]] = {}
    for hook in sae_map:
        groups.setdefault(hook_width(model, hook), []).append(hook)
    return list(groups.values())





def scored_dim(sae: SAE, harmful: ActivationSet, harmless: ActivationSet, hook: str) -> Float[Tensor, " d_in"]:
    """The unit difference-in-means direction (harmful minus harmless, float64 means) of `hook` over the rows the SAE's
    features are scored on (`spliced_rows`: within its norm bound and, in an all-token capture, past the chat-template
    head it was not trained on), captured rows pooled; a zero vector when the two means coincide.

    Raises:
        FeatsteerError: when a class has no such row, or the means are not finite.
    """
    means, sizes = [], []
    for label, acts in (("harmful", harmful), ("harmless", harmless)):
        rows = acts.hook(hook)[spliced_rows(sae, acts, hook)]
        if rows.shape[0] == 0:
            raise FeatsteerError(f"{hook}: no {label} row is within the SAE's norm bound and past its untrained head, so it has no DIM "
                                 "direction: capture other positions or more prompts")
        means.append(rows.double().mean(0))
        sizes.append(mean_row_norm(rows))
    difference = means[0] - means[1]
    if not bool(torch.isfinite(difference).all()):
        raise FeatsteerError(f"the activations at {hook} hold NaN or inf values: recapture them")
    if means_coincide(means[0], means[1], max(sizes)):  # as difference_in_means: no direction
        return torch.zeros_like(difference).float()
    return unit(difference).float()


def decoder_dim_cosines(sae: SAE, direction: Float[Tensor, " d_model"]) -> Float[Tensor, " d_sae"]:
    """Cosine of every decoder row of `sae` with `direction` (float64; NaN where either is zero)."""
    rows = sae.W_dec.detach().double().cpu()
    vector = direction.detach().double().cpu()
    norms = rows.norm(dim=-1) * vector.norm()
    cosines = (rows @ vector) / torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, cosines, torch.full_like(cosines, math.nan))


def feature_logits(model: ModelAdapter, sae: SAE, feature_ids: int | Sequence[int]) -> Float[Tensor, "n vocab"]:
    """Direct logit effect of one unit of each feature's activation (`directions.direct_logits` of its `residual_writes`:
    `W_U (gain * W_dec[f])`, the row made unit for TopK SAEs that rescale by its norm; float32, cpu); a hook_z SAE's
    head-space rows are first pushed through the attention output projection. For an SAE that normalises each input
    row, per unit of normalised input (`featsteer.sae.NORMALISED_UNIT`; a row's own effect is that times its
    `featsteer.sae.input_scales`)."""
    ids = [feature_ids] if isinstance(feature_ids, int) else [int(i) for i in feature_ids]
    bad = [i for i in ids if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise FeatsteerError(f"feature id {bad[0]} is out of range: this SAE has d_sae={sae.cfg.d_sae} features")
    return direct_logits(model, residual_writes(model, sae, ids))


def promoted_tokens(model: ModelAdapter, sae: SAE, feature_id: int, n: int = 10) -> tuple[tuple[TokenScore, ...], tuple[TokenScore, ...]]:
    """The `n` tokens a feature's decoder row promotes most and the `n` it suppresses most (strongest first); none for a
    hook_z SAE on a model whose attention output is normalised before the stream (Gemma 2/3: no fixed residual write)."""
    if model.post_norms and reads_heads(sae):
        return (), ()
    logits = feature_logits(model, sae, feature_id)[0]
    k = min(n, logits.shape[0])
    top, bottom = torch.topk(logits, k), torch.topk(-logits, k)

    def scored(ids: Tensor) -> tuple[TokenScore, ...]:
        return tuple(TokenScore(int(i), token_text(model.tokenizer, int(i)), float(logits[i])) for i in ids.tolist())

    return scored(top.indices), scored(bottom.indices)


def _top_activations(sae_map: Mapping[str, SAE], acts: Mapping[str, Mapping[str, ActivationSet]], top: FeatureScores) -> _TopValues:
    """Activations of the top features on both prompt sets (one SAE encode per hook and set), at the rows the scores
    read (`spliced_rows`: within the SAE's norm bound, past its untrained head); a prompt with no such row has a maximum
    of -inf."""
    out: _TopValues = {}
    for hook in dict.fromkeys(top.hook_names):
        ids = [int(f) for h, f in zip(top.hook_names, top.feature_ids.tolist(), strict=True) if h == hook]
        per_label = []
        for label in ("harmful", "harmless"):
            captured = acts[label][hook]
            inside = spliced_rows(sae_map[hook], captured, hook)  # the rows the scores read
            columns = encode_activations(sae_map[hook], captured.hook(hook)[inside]).float()[:, ids]
            index = captured.prompt_index[inside][:, None].expand_as(columns)
            prompt_max = torch.full((len(captured), len(ids)), -math.inf).scatter_reduce(0, index, columns, "amax")
            per_label.append((columns, prompt_max))
        for j, feature in enumerate(ids):
            out[(hook, feature)] = tuple((rows[:, j].clone(), prompt_max[:, j].clone()) for rows, prompt_max in per_label)
    return out


def _examples(
    model: ModelAdapter,
    sae_map: Mapping[str, SAE],
    acts: Mapping[str, Mapping[str, ActivationSet]],
    top: FeatureScores,
    values: _TopValues,
    n_examples: int,
    batch_size: int,
    system: str | None,
) -> dict[tuple[str, int], tuple[PromptExample, ...]]:
    """Top-activating prompts of every top feature with per-token activations (one all-token capture)."""
    chosen: dict[tuple[str, int], list[tuple[float, str, int]]] = {}
    for hook, feature in zip(top.hook_names, top.feature_ids.tolist(), strict=True):
        candidates = [(float(value), label, index)
                      for label, (_, prompt_max) in zip(("harmful", "harmless"), values[(hook, feature)], strict=True)
                      for index, value in enumerate(prompt_max.tolist()) if value > 0]
        chosen[(hook, feature)] = sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))[:n_examples]
    needed = sorted({(label, index) for picks in chosen.values() for _, label, index in picks})
    if not needed:
        return {key: () for key in chosen}
    texts = [next(iter(acts[label].values())).prompts[index] for label, index in needed]
    hooks = sorted({hook for hook, _ in chosen}, key=lambda h: model.hook_site(h).order)
    encoded, inside, tokens_index, token_ids = {}, {}, None, None
    for group in _width_groups(model, {hook: sae_map[hook] for hook in hooks}):
        tokens_acts = capture(model, texts, group, positions="all", batch_size=batch_size, system=system, progress=False)
        encoded.update({hook: encode_activations(sae_map[hook], tokens_acts.hook(hook)).float() for hook in group})
        inside.update({hook: inside_domain(sae_map[hook], tokens_acts.hook(hook)) for hook in group})
        tokens_index, token_ids = tokens_acts.prompt_index, tokens_acts.token_id
    slot = {pair: i for i, pair in enumerate(needed)}
    token_text = [_token_strings(model, token_ids[tokens_index == i]) for i in range(len(texts))]
    out = {}
    for (hook, feature), picks in chosen.items():
        examples = []
        for score, label, index in picks:
            i = slot[(label, index)]
            per_token = encoded[hook][tokens_index == i, feature]  # the rows token_text[i] was read from
            first_position = first_trained_position(sae_map[hook])
            scored = _scored_tokens(acts[label][hook], index, len(token_text[i]), first_position)
            outside = tuple((~inside[hook][tokens_index == i]).tolist())
            head = tuple(t < first_position for t in range(len(token_text[i])))
            examples.append(PromptExample(texts[i], label, score, token_text[i], tuple(per_token.tolist()), scored, outside, head))
        out[(hook, feature)] = tuple(examples)
    return out


def _token_strings(model: ModelAdapter, ids: Tensor) -> tuple[str, ...]:
    """Each token of a prompt as text, from the ids the all-token capture read (in position order): the prompts are not
    tokenized a second time."""
    return tuple(token_text(model.tokenizer, token) for token in ids.tolist())


def _scored_tokens(acts: ActivationSet, prompt: int, n_tokens: int, first_position: int = 0) -> tuple[bool, ...]:
    """Mark the tokens a prompt's scored rows were read at (labels are offsets from the end, or indices for `all`:
    from `all:N`'s N and the SAE's `first_trained_position` on)."""
    selector = Positions.parse(acts.positions)
    if selector.mode == "all":
        return tuple(t >= max(selector.start, first_position) for t in range(n_tokens))
    if selector.mode == "mean_last":
        marked = set(range(max(n_tokens - selector.k, 0), n_tokens))
    else:
        marked = {n_tokens + int(p) for p in acts.position[acts.prompt_index == prompt].tolist()}
    return tuple(t in marked for t in range(n_tokens))


# ---- writing --------------------------------------------------------------------------------------


def write_feature_report(ranking: FeatureRanking, out_dir: str | Path, *, title: str | None = None) -> Path:
    """Write `report.html`, `features.csv` and `features.json` into `out_dir`.

    Every file is first written under a temporary name in `out_dir` and then renamed, so a reader never
    sees a half-written file: after an interruption each file is its complete previous version, or absent.

    Args:
        ranking: the output of `rank_features`.
        out_dir: folder to write into (created if missing).
        title: page title (default names the model).

    Returns:
        The folder.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    contents = {
        "features.csv": _csv_text(ranking.rows()),
        "features.json": json_text(ranking.to_dict()),  # a non-finite figure as null, not a failed write
        "report.html": _html_page(ranking, title or f"featsteer feature ranking: {ranking.provenance.get('model', '')}"),
    }
    write_files(folder, contents)
    return folder


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = ["rank", "hook_name", "layer", "position", "feature_id", *METRICS, "dim_cosine", "units", "input_normalization"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _histogram(detail: FeatureDetail) -> dict[str, list]:
    both = torch.cat([detail.harmful_activations, detail.harmless_activations]).double().numpy()
    low, high = float(both.min()), float(both.max())
    edges = np.linspace(low, high if high > low else low + 1.0, _HISTOGRAM_BINS + 1)
    counts = {label: np.histogram(values.double().numpy(), bins=edges)[0].tolist()
              for label, values in (("harmful", detail.harmful_activations), ("harmless", detail.harmless_activations))}
    return {"edges": edges.tolist(), **counts}


def _detail_dict(detail: FeatureDetail) -> dict[str, Any]:
    return {
        "rank": detail.rank, "hook_name": detail.hook_name, "feature_id": detail.feature_id,
        "input_normalization": detail.input_normalization, "scores": detail.scores,
        "dim_cosine": _finite(detail.dim_cosine), "histogram": _histogram(detail),
        "promoted": [dataclasses.asdict(t) for t in detail.promoted],
        "suppressed": [dataclasses.asdict(t) for t in detail.suppressed],
        "examples": [dataclasses.asdict(e) for e in detail.examples],
    }


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode()


def _histogram_png(detail: FeatureDetail) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    histogram = _histogram(detail)
    fig = Figure(figsize=(4.6, 2.6))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.19, top=0.96)
    for label, color in (("harmful", "#c0392b"), ("harmless", "#2471a3")):
        values = detail.harmful_activations if label == "harmful" else detail.harmless_activations
        active = float((values > 0).double().mean())
        ax.stairs(histogram[label], histogram["edges"], fill=True, alpha=0.45, color=color,
                  label=f"{label} (n={len(values)}, active {active:.0%})")
    ax.set_yscale("symlog", linthresh=1)
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # plain numbers: no mathtext to lay out
    ax.set_xlabel("feature activation")
    ax.set_ylabel("rows")
    ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def _overview_png(ranking: FeatureRanking) -> str:
    from matplotlib.figure import Figure

    scores = ranking.scores
    auroc, difference = scores.column("auroc").numpy(), scores.column("mean_difference").numpy()
    names = np.array(scores.hook_names)
    hooks = sorted(set(scores.hook_names), key=lambda h: (hook_layer(h), h))
    fig = Figure(figsize=(8, 4.2), layout="tight")
    ax = fig.subplots()
    for i, hook in enumerate(hooks):
        mask = names == hook
        ax.scatter(auroc[mask], difference[mask], s=6, alpha=0.5, color=f"C{i % 10}", label=hook)
    for detail in ranking.features[:10]:
        point = (detail.scores["auroc"], detail.scores["mean_difference"])
        if None not in point:
            ax.annotate(str(detail.rank), point, fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.axvline(0.5, color="#999", linewidth=0.7)
    ax.axhline(0.0, color="#999", linewidth=0.7)
    ax.set_xlabel("AUROC (harmful vs harmless)")
    ax.set_ylabel("mean activation difference")
    ax.set_title("every feature of every SAE (numbers: top-ranked features)", fontsize=10)
    ax.legend(fontsize=7, markerscale=2, frameon=False)
    return _png(fig)


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("composite", "composite"), ("mean_difference", "mean diff"), ("cohens_d", "Cohen's d"), ("auroc", "AUROC"),
    ("harmful_mean", "harmful mean"), ("harmless_mean", "harmless mean"), ("harmful_frequency", "harmful freq"),
    ("harmless_frequency", "harmless freq"), ("decoder_norm", "decoder norm"),
)

_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}th.key{background:#ffe9c7}section{border-top:2px solid #ddd;margin-top:2em}
.row{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}.muted{color:#777;font-size:13px}
.toks{font-family:ui-monospace,monospace;font-size:13px;margin:.2em 0 .8em;line-height:1.9;overflow-wrap:anywhere}
.toks span{white-space:pre-wrap;border-radius:2px;padding:1px 0}.toks span.scored{border-bottom:2px solid #333}
.toks span.outside{color:#999;text-decoration:line-through}.toks span.head{color:#999}.lbl{font-size:11px;padding:1px 5px;border-radius:3px;color:#fff}
.harmful{background:#c0392b}.harmless{background:#2471a3}code{background:#f5f5f5;padding:0 3px}"""


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _summary_table(ranking: FeatureRanking) -> str:
    key = ranking.by.removeprefix("abs_")
    head = "".join(("<th class=\"key\">" if name == key else "<th>") + f"{html.escape(label)}</th>" for name, label in _COLUMNS)
    rows = []
    for d in ranking.features:
        cells = "".join(f"<td>{_number(d.scores[name])}</td>" for name, _ in _COLUMNS)
        rows.append(f'<tr><td>{ranking.rank_label(d.rank)}</td><td class="l"><a href="#f{d.rank}">{html.escape(d.hook_name)}</a></td>'
                    f"<td>{d.feature_id}</td>{cells}<td>{_number(d.dim_cosine)}</td></tr>")
    ties = ranking.tie_note()
    return (f'<table><tr><th>rank</th><th class="l">hook</th><th>feature</th>{head}<th>DIM cos</th></tr>'
            + "".join(rows) + "</table>" + (f'<p class="muted">{html.escape(ties)}</p>' if ties else ""))


def outside_domain_note(outside: Mapping[str, Mapping[str, int]]) -> str:
    """One sentence naming the rows scoring left out per SAE (above its norm bound); empty when none were."""
    if not outside:
        return ""
    counts = "; ".join(f"{where}: {c['harmful']} harmful, {c['harmless']} harmless" for where, c in outside.items())
    return f" Rows above an SAE's norm bound, which every splice passes through unedited, are not scored ({counts})."


def untrained_head_note(head: Mapping[str, Mapping[str, int]]) -> str:
    """One sentence naming the rows of the chat-template head each SAE was not trained on that scoring left out (an
    all-token capture's tokens before its `featsteer_first_position`); empty when none were."""
    if not head:
        return ""
    counts = "; ".join(f"{where}: {c['harmful']} harmful, {c['harmless']} harmless" for where, c in head.items())
    return f" Rows of the chat-template head an SAE was not trained on, which every splice leaves unedited, are not scored ({counts})."


def normalization_note(provenance: Mapping[str, Any]) -> str:
    """One sentence per kind of per-row input normalisation among the ranked SAEs (`provenance["input_normalization"]`):
    what their activations, decoder norms and token logits are measured in; empty when no SAE normalises its rows."""
    by_kind: dict[str, list[str]] = {}
    for hook, norm in (provenance.get("input_normalization") or {}).items():
        if norm in NORMALISED_UNIT:
            by_kind.setdefault(norm, []).append(hook)
    residual = provenance.get("units") == "residual"
    return "".join(f" The SAE(s) at {', '.join(hooks)} normalise each input row ({norm}): their activations, decoder norms and "
                   f"token logits are {NORMALISED_UNIT[norm]}, and a row moves by that times its own scale"
                   f"{' (which the residual-unit scores include)' if residual else ''}."
                   for norm, hooks in by_kind.items())


def _unshaded(example: PromptExample) -> list[str | None]:
    """Per token, why it is left out of the shading (`outside`: above the SAE's norm bound; `head`: in the chat-template
    head it was not trained on; a splice edits neither), or None for a shaded token."""
    count = len(example.activations)
    outside, head = example.outside or (False,) * count, example.head or (False,) * count
    return ["outside" if out else "head" if in_head else None for out, in_head in zip(outside, head, strict=True)]


def _shaded_values(example: PromptExample) -> list[float]:
    """The example's per-token activations a splice can edit (what the shading is scaled by)."""
    return [value for value, why in zip(example.activations, _unshaded(example), strict=True) if why is None]


_UNSHADED_TITLES = {"outside": "above the SAE's norm bound", "head": "in the chat-template head the SAE was not trained on"}


def _highlight(example: PromptExample, scale: float) -> str:
    spans = []
    for token, value, scored, why in zip(example.tokens, example.activations, example.scored, _unshaded(example), strict=True):
        shown = html.escape(token.replace("\n", "\u21b5"))
        if why is not None:  # no shading: a splice never edits this token
            spans.append(f'<span class="{why}" title="{value:.3f}, {_UNSHADED_TITLES[why]}: not edited, not scored">{shown}</span>')
            continue
        alpha = min(max(value / scale, 0.0), 1.0) if scale > 0 else 0.0
        marked = ' class="scored"' if scored else ""
        spans.append(f'<span{marked} style="background:rgba(255,140,0,{alpha:.2f})" title="{value:.3f}">{shown}</span>')
    return (f'<div><span class="lbl {example.label}">{example.label}</span> <span class="muted">scored activation '
            f'{example.score:.3f}</span><div class="toks">{"".join(spans)}</div></div>')


def _token_table(title: str, tokens: Sequence[TokenScore], normalization: str = "none") -> str:
    rows = "".join(f'<tr><td class="l"><code>{html.escape(repr(t.token))}</code></td><td>{t.logit:+.3f}</td></tr>' for t in tokens)
    unit = "logit per unit of normalised input" if normalization in NORMALISED_UNIT else "logit"
    return f'<div><b>{title}</b><table><tr><th class="l">token</th><th>{unit}</th></tr>{rows}</table></div>'


def _feature_section(detail: FeatureDetail) -> str:
    scores = " · ".join(f"{label} {_number(detail.scores[name])}" for name, label in _COLUMNS)
    scale = max((max(_shaded_values(e), default=0.0) for e in detail.examples), default=0.0)
    examples = "".join(_highlight(e, scale) for e in detail.examples) or '<p class="muted">not active on any prompt</p>'
    norm = detail.input_normalization
    return f"""<section><h2 id="f{detail.rank}">#{detail.rank} · {html.escape(detail.hook_name)} · feature {detail.feature_id}</h2>
<p class="muted">{scores}</p><p>cosine of the decoder row with the DIM direction of this hook: <b>{_number(detail.dim_cosine)}</b></p>
<div class="row"><img alt="activation histogram of feature {detail.feature_id}" src="data:image/png;base64,{_histogram_png(detail)}">
{_token_table("promoted tokens", detail.promoted, norm)}{_token_table("suppressed tokens", detail.suppressed, norm)}</div>
<h3>Top-activating prompts</h3><p class="muted">Shading: activation per token, relative to the strongest token shown
(hover for the value); underlined: the positions that were scored; struck through: tokens above the SAE's norm bound,
which a splice passes through unedited and the scores leave out; grey: the chat-template head the SAE was not trained on,
which a splice leaves as it is and the scores leave out.</p>{examples}</section>"""


def _html_page(ranking: FeatureRanking, title: str) -> str:
    p = ranking.provenance
    widths = ", ".join(f"{html.escape(h)} ({w} features)" for h, w in p.get("d_sae", {}).items())
    setup = (f"{p.get('n_harmful_prompts')} harmful and {p.get('n_harmless_prompts')} harmless prompts, positions "
             f"<code>{html.escape(str(p.get('positions')))}</code> (rows pooled), ranked by <code>{html.escape(ranking.by)}</code>"
             f"{', magnitudes normalised by feature scale' if p.get('normalize') else ''}"
             f"{', magnitudes in residual units (activation x decoder norm)' if p.get('units') == 'residual' else ''}. SAEs: {widths}."
             + html.escape(outside_domain_note(p.get("rows_outside_domain") or {}) + untrained_head_note(p.get("rows_in_untrained_head") or {})
                           + normalization_note(p), quote=False))
    sections = "".join(_feature_section(d) for d in ranking.features)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><h1>{html.escape(title)}</h1><p>{setup}</p>
<p class="muted">composite = |mean difference| x fraction of harmful rows above the harmless mean. Promoted/suppressed tokens:
what one unit of activation writes (the decoder row) times the final norm's gain, read through the unembedding. DIM cos: cosine of the decoder row with the
difference-in-means direction (harmful minus harmless) of the same hook. Every feature is in <code>features.csv</code>.</p>
<img alt="overview of all features" src="data:image/png;base64,{_overview_png(ranking)}">
<h2>Top {len(ranking.features)} features</h2>{_summary_table(ranking)}{sections}</body></html>"""
