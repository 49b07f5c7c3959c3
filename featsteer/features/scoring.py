"""Which SAE features separate harmful from harmless prompts: per-feature statistics and a stable ranking.

Refusal is read from activations at a few template positions of harmful vs harmless prompts. Encoding
those activations with an SAE gives, per feature, two samples of activations; this module scores every
feature of every loaded layer on them at once (vectorised over features, float64):

- `mean_difference`: mean activation on harmful minus on harmless prompts;
- `composite`: `|mean_difference|` times the fraction of harmful activations above the harmless mean
  (large only for features that are both strong and consistent);
- `cohens_d`: mean difference over the pooled standard deviation;
- `auroc`: rank-based area under the ROC curve of the activation as a harmful-vs-harmless score
  (ties count one half, as in scikit-learn's `roc_auc_score`);
- `harmful_frequency` / `harmless_frequency`: how often the feature is active in each class.

Every row carries the feature's `decoder_norm`: how far one unit of its activation moves the SAE's reconstruction
(the decoder row's norm; 1 for sae_lens TopK SAEs that rescale activations by it, 0.1-0.2 for typical standard and
JumpReLU SAEs). Activations are in each feature's own units, so by default a feature with a large activation and a
tiny decoder row can outrank one that moves the stream more; `units="residual"` scores activation x decoder norm, the
length of what each feature writes into the activation the SAE reads (for hook_z SAEs that is head space, before the
output projection). An SAE that normalises each input row (sae_lens `layer_norm`, `constant_norm_rescale`) reads
activations and has decoder norms per unit of normalised input (`featsteer.sae.NORMALISED_UNIT`); what a feature writes
into a row is that times the row's own scale (`featsteer.sae.input_scales`), which residual units multiply in. Optionally the magnitude statistics are divided by each feature's scale (its maximum activation),
so features with large activations do not dominate the ranking. Rankings are deterministic: score
descending, ties broken by layer, then feature id.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import SAE
from scipy.stats import rankdata
from torch import Tensor

from featsteer.activations import ActivationSet, Positions, capture, hook_width
from featsteer.errors import FeatsteerError
from featsteer.files import json_text, write_files
from featsteer.models import ModelAdapter
from featsteer.sae.encoding import STATEFUL_NORMS, check_finite, encode_activations, input_scales
from featsteer.sae.heads import flat_rows
from featsteer.sae.loading import sae_map_of, validated_sae_map
from featsteer.sae.steering import first_trained_position, inside_domain, past_untrained_head

METRICS: tuple[str, ...] = (
    "composite", "mean_difference", "cohens_d", "auroc", "harmful_mean", "harmless_mean",
    "harmful_frequency", "harmless_frequency", "scale", "decoder_norm",
)
"""Per-feature columns of a `FeatureScores`."""

UNITS: tuple[str, ...] = ("activation", "residual")
"""What magnitude scores are measured in: each feature's activation, or activation x decoder norm (see module doc)."""
_LAYER_RE = re.compile(r"blocks\.(\d+)\.")
_AUROC_BLOCK = 2048
"""Features ranked at once when computing AUROC (bounds memory to rows x block float64)."""


def hook_layer(hook_name: str) -> int:
    """Layer index of a TransformerLens hook name (-1 for `hook_embed`/`hook_pos_embed`)."""
    match = _LAYER_RE.match(hook_name)
    return int(match.group(1)) if match else -1


@dataclass(frozen=True)
class FeatureScores:
    """Scores of SAE features, one row per (hook, position, feature), kept sorted by the caller's key."""

    hook_names: tuple[str, ...]
    """Hook of the SAE each row's feature belongs to."""
    feature_ids: Tensor
    """`(row,)` int64 feature index within its SAE."""
    metrics: dict[str, Tensor]
    """Metric name (see `METRICS`) -> `(row,)` float64 values."""
    positions: tuple[int | None, ...]
    """Position label each row was scored at (None: all captured rows pooled)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Prompt counts, positions, normalisation: whatever reproduces the scores."""

    def __len__(self) -> int:
        return len(self.hook_names)

    @property
    def layers(self) -> Tensor:
        """`(row,)` layer index of each row's hook."""
        return torch.tensor([hook_layer(name) for name in self.hook_names], dtype=torch.long)

    def column(self, by: str) -> Tensor:
        """A metric column; `abs_<metric>` gives its absolute value.

        Raises:
            FeatsteerError: for an unknown metric name.
        """
        name = by.removeprefix("abs_")
        if name not in self.metrics:
            raise FeatsteerError(f"unknown score '{by}': use one of {', '.join(METRICS)} (or abs_<name>)")
        values = self.metrics[name]
        return values.abs() if by.startswith("abs_") else values

    def order(self, by: str = "composite") -> Tensor:
        """Row order by `by` descending, ties by layer then feature id (NaN last)."""
        score = self.column(by).numpy().copy()
        score[np.isnan(score)] = -np.inf
        order = np.lexsort((self.feature_ids.numpy(), self.layers.numpy(), -score))
        return torch.from_numpy(order)

    def select(self, rows: Tensor | Sequence[int]) -> FeatureScores:
        """A new `FeatureScores` with the given rows, in the given order."""
        index = torch.as_tensor(rows, dtype=torch.long)
        picked = index.tolist()
        return FeatureScores(
            hook_names=tuple(self.hook_names[i] for i in picked),
            feature_ids=self.feature_ids[index],
            metrics={name: values[index] for name, values in self.metrics.items()},
            positions=tuple(self.positions[i] for i in picked),
            provenance=dict(self.provenance),
        )

    def sort(self, by: str = "composite") -> FeatureScores:
        """All rows ranked by `by` (see `order`)."""
        return self.select(self.order(by))

    def top(self, n: int = 20, by: str = "composite") -> FeatureScores:
        """The `n` best rows by `by` (descending; ties by layer, then feature id)."""
        if n < 1:
            raise FeatsteerError(f"top(n) needs n >= 1, got {n}")
        return self.select(self.order(by)[:n])

    def for_hook(self, hook_name: str) -> FeatureScores:
        """The rows of one hook (in current order)."""
        rows = [i for i, name in enumerate(self.hook_names) if name == hook_name]
        if not rows:
            raise FeatsteerError(f"no scores for {hook_name}; scored hooks: {', '.join(sorted(set(self.hook_names)))}")
        return self.select(rows)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per row: hook, layer, position, feature id and every metric (non-finite -> None)."""
        layers = self.layers.tolist()
        columns = {name: values.tolist() for name, values in self.metrics.items()}
        out = []
        for i, (hook, feature) in enumerate(zip(self.hook_names, self.feature_ids.tolist(), strict=True)):
            row: dict[str, Any] = {"hook_name": hook, "layer": layers[i], "position": self.positions[i], "feature_id": feature}
            row.update({name: (value[i] if math.isfinite(value[i]) else None) for name, value in columns.items()})
            out.append(row)
        return out

    def to_csv(self, path: str | Path) -> Path:
        """Write the rows as CSV (empty cells for missing values), complete or not at all (`write_files`): the text is
        rendered first, so a failure leaves any earlier file at `path` as it was."""
        out = Path(path)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["hook_name", "layer", "position", "feature_id", *self.metrics])
        writer.writeheader()
        writer.writerows(self.rows())
        write_files(out.parent, {out.name: text.getvalue()})
        return out

    def to_json(self, path: str | Path) -> Path:
        """Write `{"provenance": ..., "rows": [...]}` as JSON (non-finite values as null), complete or not at all."""
        out = Path(path)
        write_files(out.parent, {out.name: json_text({"provenance": self.provenance, "rows": self.rows()})})
        return out

    @classmethod
    def concat(cls, parts: Sequence[FeatureScores]) -> FeatureScores:
        """Stack several score tables (e.g. one per layer) into one, in the given order."""
        if not parts:
            raise FeatsteerError("nothing to concatenate: pass at least one FeatureScores")
        return cls(
            hook_names=tuple(name for part in parts for name in part.hook_names),
            feature_ids=torch.cat([part.feature_ids for part in parts]),
            metrics={name: torch.cat([part.metrics[name] for part in parts]) for name in parts[0].metrics},
            positions=tuple(p for part in parts for p in part.positions),
            provenance=dict(parts[0].provenance),
        )


def auroc(positive: Float[Tensor, "n_pos d"], negative: Float[Tensor, "n_neg d"]) -> Float[Tensor, " d"]:
    """Rank-based AUROC of every column as a score for `positive` over `negative` (ties count 1/2).

    Equals `sklearn.metrics.roc_auc_score(labels, column)` per column; computed with average ranks
    (Mann-Whitney U), in blocks of columns.
    """
    n_pos, n_neg = positive.shape[0], negative.shape[0]
    if n_pos == 0 or n_neg == 0:
        raise FeatsteerError(f"AUROC needs both classes: got {n_pos} harmful and {n_neg} harmless rows")
    values = torch.cat([positive, negative]).double().numpy()
    out = np.empty(values.shape[1], dtype=np.float64)
    for start in range(0, values.shape[1], _AUROC_BLOCK):
        ranks = rankdata(values[:, start : start + _AUROC_BLOCK], method="average", axis=0)
        out[start : start + _AUROC_BLOCK] = (ranks[:n_pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return torch.from_numpy(out)


def cohens_d(positive: Float[Tensor, "n_pos d"], negative: Float[Tensor, "n_neg d"]) -> Float[Tensor, " d"]:
    """Mean difference over the pooled standard deviation, per column (float64).

    Columns with zero pooled spread give 0 when the means agree and +-inf when they differ. A class of one row adds
    no spread (the other class's alone sets the pooled standard deviation).

    Raises:
        FeatsteerError: an empty class, or one row per class (no degrees of freedom for the spread).
    """
    pos, neg = positive.double(), negative.double()
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    if n_pos == 0 or n_neg == 0 or n_pos + n_neg < 3:
        raise FeatsteerError(f"Cohen's d needs a row of each class and 3 rows in all: got {n_pos} harmful and {n_neg} harmless rows")
    difference = pos.mean(0) - neg.mean(0)
    squares = ((pos - pos.mean(0)) ** 2).sum(0) + ((neg - neg.mean(0)) ** 2).sum(0)
    pooled_var = squares / (n_pos + n_neg - 2)
    pooled = pooled_var.clamp_min(0).sqrt()
    d = difference / pooled
    return torch.where(pooled > 0, d, torch.where(difference == 0, torch.zeros_like(d), torch.sign(difference) * math.inf))


def decoder_norms(sae: SAE, *, budget: int = 1 << 24) -> Float[Tensor, " d_sae"]:
    """How far one unit of each feature's activation moves the SAE's reconstruction, `||decode(e_f) - decode(0)||` in the
    units of the activation it reads (float64): the decoder row's norm, divided by it again for SAEs that rescale
    activations by it (sae_lens TopK's `rescale_acts_by_decoder_norm`). For SAEs that normalise each input row
    (`STATEFUL_NORMS`) there is no single answer: this is the move per unit of normalised input (see
    `featsteer.sae.NORMALISED_UNIT`), and a row moves by it times the row's own `featsteer.sae.input_scales`.

    `decode` is affine in the features, so the move is the norm of a row of its linear part, read off by
    vector-Jacobian products of `decode` at zero, `d_in` output directions at a time: no `d_sae x d_sae` identity is
    built (a 65k-feature SAE would need 17 GB for it), and `b_dec` never enters, so a bfloat16 SAE's norms are its
    decoder rows' and not their difference with `b_dec` rounded to bfloat16.

    Args:
        sae: a sae_lens SAE.
        budget: most entries of `(outputs, d_sae)` gradients held at once.
    """
    if sae.cfg.normalize_activations in STATEFUL_NORMS:
        rows = sae.W_dec.detach().double().cpu()
        norms = rows.norm(dim=-1)
        return torch.ones_like(norms) if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else norms
    if any(weight.is_inference() for weight in sae.parameters()):  # built under inference_mode: no autograd through it
        return _decoded_norms(sae, budget)
    d_sae, d_in = int(sae.cfg.d_sae), int(sae.cfg.d_in)
    step = max(1, min(d_in, budget // d_sae))
    with torch.inference_mode(False), torch.enable_grad(), flat_rows(sae):
        squares = torch.zeros(d_sae, dtype=torch.float64)
        origin = torch.zeros(1, d_sae, dtype=sae.dtype, device=sae.device, requires_grad=True)
        written = sae.decode(origin).reshape(d_in)
        for start in range(0, d_in, step):
            count = min(step, d_in - start)
            outputs = torch.zeros(count, d_in, dtype=written.dtype, device=written.device)
            outputs[torch.arange(count), torch.arange(start, start + count)] = 1.0
            (rows,) = torch.autograd.grad(written, origin, grad_outputs=outputs, is_grads_batched=True, retain_graph=True)
            squares += rows.reshape(count, d_sae).double().pow(2).sum(0).cpu()
    return squares.sqrt()


def _decoded_norms(sae: SAE, budget: int) -> Float[Tensor, " d_sae"]:
    """`||decode(e_f) - decode(0)||` by decoding unit rows a chunk at a time (each chunk built alone, never the whole
    identity), for SAEs autograd cannot run through; `b_dec` rounds into it at the SAE's precision."""
    d_sae = int(sae.cfg.d_sae)
    step = max(1, min(d_sae, budget // d_sae))
    out = torch.empty(d_sae, dtype=torch.float64)
    with torch.no_grad(), flat_rows(sae):
        origin = sae.decode(torch.zeros(1, d_sae, dtype=sae.dtype, device=sae.device)).double()
        for start in range(0, d_sae, step):
            count = min(step, d_sae - start)
            units = torch.zeros(count, d_sae, dtype=sae.dtype, device=sae.device)
            units[torch.arange(count), torch.arange(start, start + count)] = 1.0
            out[start : start + count] = (sae.decode(units).double() - origin).norm(dim=-1).cpu()
    return out


def score_feature_activations(
    harmful: Float[Tensor, "n_harmful d_sae"],
    harmless: Float[Tensor, "n_harmless d_sae"],
    hook_name: str,
    *,
    position: int | None = None,
    normalize: bool = False,
    scale: Float[Tensor, " d_sae"] | None = None,
    decoder_norm: Float[Tensor, " d_sae"] | None = None,
    units: str = "activation",
    input_scale: tuple[Float[Tensor, " n_harmful"], Float[Tensor, " n_harmless"]] | None = None,
) -> FeatureScores:
    """Score every feature of one SAE from its activations on harmful and harmless rows.

    Args:
        harmful: feature activations of harmful rows.
        harmless: feature activations of harmless rows.
        hook_name: the SAE's hook (stored with every row).
        position: position label the rows were taken at (provenance; None = pooled).
        normalize: divide magnitude statistics by each feature's scale.
        scale: per-feature scale to use, in activation units (default: max activation over both classes here).
        decoder_norm: each feature's `decoder_norms` (stored as a column; NaN when not given).
        units: `activation` or `residual` (magnitudes times `decoder_norm` and `input_scale`, which it then needs).
        input_scale: the harmful and the harmless rows' `featsteer.sae.input_scales` (needed for `residual` units): an
            SAE that normalises each input row writes per unit of normalised input, so residual units multiply each
            row's activations by its own scale too (all ones for an SAE that reads rows as they are; the feature
            activations alone cannot tell which kind of SAE they came from). A given `scale` goes into residual units
            by `decoder_norm` alone.

    Returns:
        Unsorted scores, one row per feature.

    Raises:
        FeatsteerError: unknown `units`, `residual` without `decoder_norm` or `input_scale`, mismatched widths (also of `scale` or
            `decoder_norm`), an `input_scale` not one value per row, fewer than 2 rows, or a NaN or infinite activation.
    """
    if units not in UNITS:
        raise FeatsteerError(f"unknown units '{units}': use one of {', '.join(UNITS)}")
    if units == "residual" and decoder_norm is None:
        raise FeatsteerError("units='residual' needs each feature's decoder_norm (featsteer.features.decoder_norms(sae))")
    if units == "residual" and input_scale is None:
        raise FeatsteerError("units='residual' needs each row's input_scale: pass input_scale=(input_scales(sae, harmful_rows), "
                             "input_scales(sae, harmless_rows)) (featsteer.sae.input_scales; all ones unless the SAE normalises "
                             "each input row, which makes its activations per unit of normalised input)")
    if harmful.shape[-1] != harmless.shape[-1]:
        raise FeatsteerError(f"harmful rows have {harmful.shape[-1]} features but harmless rows have {harmless.shape[-1]}: encode both with the same SAE")
    if harmful.shape[0] < 2 or harmless.shape[0] < 2:
        raise FeatsteerError(f"scoring needs at least 2 rows per class, got {harmful.shape[0]} harmful and {harmless.shape[0]} harmless")
    for label, values in (("harmful", harmful), ("harmless", harmless)):
        if not bool(torch.isfinite(values).all()):
            row = int((~torch.isfinite(values)).any(-1).nonzero()[0, 0])
            raise FeatsteerError(f"the {label} feature activations hold NaN or inf values (first at row {row}): encode finite activations")
    pos, neg = harmful.double(), harmless.double()
    norm = torch.full((harmful.shape[-1],), math.nan, dtype=torch.float64) if decoder_norm is None else decoder_norm.double().cpu()
    for name, values in (("decoder_norm", norm), ("scale", scale)):
        if values is not None and values.shape != (harmful.shape[-1],):
            raise FeatsteerError(f"{name} has shape {tuple(values.shape)} but the rows have {harmful.shape[-1]} features: pass one value per feature")
    if input_scale is not None and tuple(tuple(v.shape) for v in input_scale) != ((pos.shape[0],), (neg.shape[0],)):
        raise FeatsteerError(f"input_scale has shapes {[tuple(v.shape) for v in input_scale]} but there are {pos.shape[0]} harmful and "
                             f"{neg.shape[0]} harmless rows: pass one scale per row of each class (featsteer.sae.input_scales)")
    raw_pos, raw_neg = pos, neg  # Cohen's d, AUROC and frequencies are unit-free: read even for a zero decoder row
    if units == "residual":  # every magnitude in units of the activation the SAE reads; rank statistics do not change
        pos, neg = pos * norm, neg * norm
        # a row-normalising SAE writes per unit of normalised input: undo each row's scale (1 for other SAEs)
        pos, neg = pos * input_scale[0].double().cpu()[:, None], neg * input_scale[1].double().cpu()[:, None]
        scale = None if scale is None else scale.double().cpu() * norm
    harmful_mean, harmless_mean = pos.mean(0), neg.mean(0)
    feature_scale = torch.maximum(pos.max(0).values, neg.max(0).values) if scale is None else scale.double().cpu()
    divisor = torch.where(feature_scale > 0, feature_scale, torch.ones_like(feature_scale)) if normalize else torch.ones_like(feature_scale)
    difference = (harmful_mean - harmless_mean) / divisor
    consistency = (pos > harmless_mean).double().mean(0)
    metrics = {
        "composite": difference.abs() * consistency,
        "mean_difference": difference,
        "cohens_d": cohens_d(raw_pos, raw_neg),
        "auroc": auroc(raw_pos, raw_neg),
        "harmful_mean": harmful_mean / divisor,
        "harmless_mean": harmless_mean / divisor,
        "harmful_frequency": (raw_pos > 0).double().mean(0),
        "harmless_frequency": (raw_neg > 0).double().mean(0),
        "scale": feature_scale,
        "decoder_norm": norm,
    }
    d_sae = harmful.shape[-1]
    return FeatureScores(
        hook_names=(hook_name,) * d_sae,
        feature_ids=torch.arange(d_sae),
        metrics=metrics,
        positions=(position,) * d_sae,
        provenance={"n_harmful": int(harmful.shape[0]), "n_harmless": int(harmless.shape[0]), "normalized": normalize, "units": units},
    )




def _rows_at(acts: ActivationSet, hook: str, position: int | None) -> Tensor:
    return acts.hook(hook) if position is None else acts.at_position(hook, position)


def _trained_rows(sae: SAE, harmful: ActivationSet, harmless: ActivationSet, hook: str, position: int | None,
                  where: str) -> tuple[Tensor, Tensor, dict[str, int]]:
    """The harmful and harmless rows at `hook` (and `position`) the SAE was trained on, and how many of each were left
    out: in an all-token capture, the rows before its `first_trained_position` (the chat-template head every prompt
    shares, which a splice leaves unedited). Other selectors count from each prompt's end, after the head.

    Raises:
        FeatsteerError: for a `position` label inside the head, or when fewer than two rows of a class are left.
    """
    first_position = first_trained_position(sae)
    trained = past_untrained_head(sae, harmful), past_untrained_head(sae, harmless)
    if trained[0] is None or trained[1] is None:
        return _rows_at(harmful, hook, position), _rows_at(harmless, hook, position), {"harmful": 0, "harmless": 0}
    if position is not None and 0 <= position < first_position:
        raise FeatsteerError(f"{where}: token {position} is in the chat-template head the SAE was not trained on (featsteer_first_position "
                             f"{first_position}; a splice leaves it unedited): score positions >= {first_position}")
    if position is not None:
        return harmful.at_position(hook, position), harmless.at_position(hook, position), {"harmful": 0, "harmless": 0}
    kept = harmful.hook(hook)[trained[0]], harmless.hook(hook)[trained[1]]
    left_out = {"harmful": int((~trained[0]).sum()), "harmless": int((~trained[1]).sum())}
    if any(left_out.values()) and min(rows.shape[0] for rows in kept) < 2:
        raise FeatsteerError(f"{where}: only {kept[0].shape[0]} harmful and {kept[1].shape[0]} harmless rows come after the chat-template head "
                             f"the SAE was not trained on (featsteer_first_position {first_position}; a splice leaves it unedited, so it is not "
                             "scored): capture longer prompts or more of them")
    return kept[0], kept[1], left_out


def _domain_rows(sae: SAE, harmful: Tensor, harmless: Tensor, where: str) -> tuple[Tensor, Tensor, dict[str, int]]:
    """The harmful and harmless rows within the SAE's norm bound, and how many of each were left out.

    Raises:
        FeatsteerError: when fewer than two rows of a class are left.
    """
    inside = inside_domain(sae, harmful), inside_domain(sae, harmless)
    left_out = {"harmful": int((~inside[0]).sum()), "harmless": int((~inside[1]).sum())}
    kept = harmful[inside[0]], harmless[inside[1]]
    if any(left_out.values()) and min(rows.shape[0] for rows in kept) < 2:
        raise FeatsteerError(
            f"{where}: only {kept[0].shape[0]} harmful and {kept[1].shape[0]} harmless rows are within the SAE's norm bound "
            f"(featsteer_max_norm {float(sae.cfg.metadata.get('featsteer_max_norm')):.4g}; a splice passes the rows above it through "
            "unedited, so they are not scored): score at other positions, or with more prompts")
    return kept[0], kept[1], left_out


def score_features(
    saes: SAE | Mapping[str, SAE] | Sequence[SAE],
    harmful: ActivationSet,
    harmless: ActivationSet,
    *,
    positions: int | Sequence[int] | None = None,
    normalize: bool = False,
    scales: Mapping[str, Tensor] | None = None,
    by: str = "composite",
    units: str = "activation",
) -> FeatureScores:
    """Score every feature of every SAE on captured harmful vs harmless activations, ranked.

    Args:
        saes: one SAE, several (keyed by their `hook_name`), or a `{hook_name: sae}` mapping.
        harmful: activations of harmful prompts at the SAEs' hooks.
        harmless: activations of harmless prompts at the same hooks and positions.
        positions: position label(s) to score separately (e.g. -1 for the last token), or None to pool
            every captured row. Rows above an SAE's recorded norm bound (`featsteer.sae.outside_domain`), which every
            featsteer splice passes through unedited, are left out; `provenance["rows_outside_domain"]` counts them. So
            are, in an all-token capture, the rows before the SAE's `first_trained_position` (the chat-template head it was
            not trained on, which a splice leaves as it is); `provenance["rows_in_untrained_head"]` counts them.
        normalize: divide magnitude statistics by each feature's scale.
        scales: `{hook_name: (d_sae,)}` feature scales (e.g. max activations on training data); default
            is the max activation over the scored rows.
        by: ranking key (see `FeatureScores.column`).
        units: `activation` (each feature's own units) or `residual` (activation x `decoder_norms`: how far the
            feature moves the activation the SAE reads; for an SAE that normalises each input row, times each row's
            `featsteer.sae.input_scales` too).

    Returns:
        Scores of all features of all SAEs, ranked by `by`; `provenance["input_normalization"]` records each SAE's
        `normalize_activations`.

    Raises:
        FeatsteerError: when fewer than two rows of a class are within an SAE's norm bound or after its untrained head,
            a NaN or infinite activation, a position label inside that head, `scales` naming a hook no SAE reads, or the two sets captured
            from different models, with different position selectors or with different prompt formatting (chat, system prompt).
    """
    sae_map = sae_map_of(saes)
    unknown = sorted(set(scales or {}) - set(sae_map))
    if unknown:
        raise FeatsteerError(f"scales given for {', '.join(unknown)}, which no SAE reads: key them by the SAEs' hooks ({', '.join(sae_map)})")
    if Positions.parse(harmful.positions) != Positions.parse(harmless.positions):
        raise FeatsteerError(f"the harmful activations were captured at positions '{harmful.positions}' but the harmless ones at "
                             f"'{harmless.positions}': capture both with the same selector, so that the same tokens are compared")
    if harmful.model and harmless.model and harmful.model != harmless.model:
        raise FeatsteerError(f"the harmful activations come from {harmful.model} and the harmless from {harmless.model}: capture both from one model")
    if (harmful.chat, harmful.system) != (harmless.chat, harmless.system):
        raise FeatsteerError(f"the harmful prompts were formatted with chat={harmful.chat}, system={harmful.system!r} and the harmless with "
                             f"chat={harmless.chat}, system={harmless.system!r}: capture both alike, or the scores pick up the formatting")
    position_list = [positions] if positions is None or isinstance(positions, int) else list(positions)
    parts, outside, head = [], {}, {}
    for hook, sae in sae_map.items():
        check_finite(harmful, hook)
        check_finite(harmless, hook)
        norm = decoder_norms(sae)
        for position in position_list:
            where = hook if position is None else f"{hook}@{position}"
            harmful_rows, harmless_rows, in_head = _trained_rows(sae, harmful, harmless, hook, position, where)
            if any(in_head.values()):
                head[where] = in_head
            harmful_rows, harmless_rows, left_out = _domain_rows(sae, harmful_rows, harmless_rows, where)
            if any(left_out.values()):
                outside[where] = left_out
            scale = None if scales is None else scales.get(hook)
            parts.append(score_feature_activations(encode_activations(sae, harmful_rows), encode_activations(sae, harmless_rows), hook,
                                                   position=position, normalize=normalize, scale=scale, decoder_norm=norm, units=units,
                                                   input_scale=(input_scales(sae, harmful_rows), input_scales(sae, harmless_rows))))
    scores = FeatureScores.concat(parts)
    scores.provenance.update({"model": harmful.model, "positions": harmful.positions, "n_harmful_prompts": len(harmful),
                              "n_harmless_prompts": len(harmless), "hooks": list(sae_map), "rows_outside_domain": outside,
                              "rows_in_untrained_head": head, "input_normalization": {hook: str(sae.cfg.normalize_activations) for hook, sae in sae_map.items()}})
    return scores.sort(by)


def score_prompts(
    model: ModelAdapter,
    saes: SAE | Mapping[str, SAE] | Sequence[SAE],
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: str = "last",
    score_positions: int | Sequence[int] | None = None,
    normalize: bool = False,
    batch_size: int = 16,
    by: str = "composite",
    units: str = "activation",
    system: str | None = None,
) -> FeatureScores:
    """Capture harmful and harmless prompts at every SAE's hook (one pass each) and score all features.

    SAEs on `blocks.{l}.attn.hook_z` read the heads side by side (flat `n_heads * d_head` rows); when that width differs
    from `d_model`, their hooks are captured in a pass of their own.

    Args:
        model: the model the SAEs belong to (each SAE is validated against it).
        saes: SAEs (see `score_features`).
        harmful: harmful instructions (chat-formatted).
        harmless: harmless instructions.
        positions: capture selector (`last`, `mean_last:K`, `post_instruction`, `instruction_end`, `all`).
        score_positions: position label(s) to score separately; None pools the captured rows.
        normalize: divide magnitude statistics by each feature's scale.
        batch_size: prompts per forward pass.
        by: ranking key.
        units: `activation` or `residual` (see `score_features`).
        system: the system prompt the prompts are formatted with (None: none).
    """
    sae_map = validated_sae_map(saes, model)
    by_width: dict[int, list[str]] = {}
    for hook in sae_map:
        by_width.setdefault(hook_width(model, hook), []).append(hook)
    parts = []
    for hooks in by_width.values():
        harmful_acts, harmless_acts = (capture(model, list(prompts), hooks, positions=positions, batch_size=batch_size, label=label,
                                               progress=False, system=system)
                                       for prompts, label in ((harmful, "harmful"), (harmless, "harmless")))
        parts.append(score_features({hook: sae_map[hook] for hook in hooks}, harmful_acts, harmless_acts, positions=score_positions,
                                    normalize=normalize, by=by, units=units))
    return parts[0] if len(parts) == 1 else merge_sae_scores(parts, sae_map).sort(by)


PER_SAE_PROVENANCE = ("rows_outside_domain", "rows_in_untrained_head", "input_normalization")
"""`score_features` provenance entries keyed by SAE hook (or hook@position), merged by `merge_sae_scores`."""


def merge_sae_scores(parts: Sequence[FeatureScores], hooks: Iterable[str]) -> FeatureScores:
    """One unsorted table from `score_features` runs over groups of the same SAEs (one capture per activation width):
    the first run's provenance, with every SAE's `hooks` and the per-SAE entries (`PER_SAE_PROVENANCE`) of all runs."""
    scores = FeatureScores.concat(parts)
    scores.provenance["hooks"] = list(hooks)
    for key in PER_SAE_PROVENANCE:
        scores.provenance[key] = {where: value for part in parts for where, value in part.provenance[key].items()}
    return scores
