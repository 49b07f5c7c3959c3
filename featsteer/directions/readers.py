"""Which components read a direction? Read-side ablation of the refusal direction.

Abliteration removes a direction where it is *written* (every residual write), so no later component can see it.
`direction_readers` asks the converse question: which *readers* of the residual stream does refusal go through? It
removes the direction from what one group of readers sees and leaves the stream itself alone:

- each block's attention input (`blocks.L.ln1.hook_normalized`) and MLP input (`blocks.L.ln2.hook_normalized`),
- the unembedding's input (`ln_final.hook_normalized`), which is the direct path from the stream to the logits.

The direction is removed from the normalised vector before the norm's gain, which is what that reader sees of the
stream direction (for RMSNorm exactly: the norm only rescales; for LayerNorm up to the centring). Each condition is
scored by the harmful prompts' first-token refusal log-odds (`featsteer.evaluation.refusal_score`) and the
harmless prompts' first-token KL from the unedited model, next to the same for ablating at every residual write.
`share` is the condition's drop in refusal log-odds as a share of the every-write drop: about 1 means that
reader alone carries the refusal; about 0 means refusal does not need it.

A direction that survives every block reader but not the unembedding's is read as tokens directly (its logit lens
shows the refusal openers); one that survives the unembedding but not the blocks is read and turned into refusal by
later computation. Both can be partly true: the groups need not add up, since later components read what earlier
ones wrote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from featsteer.errors import FeatsteerError

if TYPE_CHECKING:
    from featsteer.models import ModelAdapter

UNEMBEDDING = "ln_final.hook_normalized"


@dataclass(frozen=True)
class ReaderRow:
    """One condition: the direction removed from what `readers` see."""

    readers: str
    """A label: `every residual write`, `every reader`, `attention`, `MLP`, `blocks`, `unembedding`, or
    `blocks.L attention` / `blocks.L MLP`."""
    hooks: tuple[str, ...]
    refusal: float | None
    """Mean first-token refusal log-odds on the harmful prompts (None for a row that was only estimated)."""
    kl_harmless: float | None
    """Mean first-token KL(unedited || condition) on the harmless prompts (None for a row that was only estimated)."""
    estimate: float | None = None
    """First-order estimate of the change in refusal log-odds (`directions.attribution.site_attribution`, summed over the
    row's hooks; None for the every-write row or without `estimate`)."""


@dataclass(frozen=True)
class DirectionReaders:
    """Read-side ablation of one direction: one row per reader group, the unedited refusal score alongside."""

    rows: tuple[ReaderRow, ...]
    unedited: float
    """Mean first-token refusal log-odds of the unedited model on the harmful prompts."""
    n_harmful: int
    n_harmless: int

    def row(self, readers: str) -> ReaderRow:
        """The row with this label."""
        for row in self.rows:
            if row.readers == readers:
                return row
        raise FeatsteerError(f"no reader row '{readers}': have {', '.join(r.readers for r in self.rows)}")

    def share(self, row: ReaderRow) -> float:
        """`row`'s drop in refusal log-odds as a share of the every-write drop (NaN when that drop is ~0 or the row was
        only estimated)."""
        return self._of_full(None if row.refusal is None else self.unedited - row.refusal)

    def estimated_share(self, row: ReaderRow) -> float:
        """`row`'s first-order estimated drop as a share of the exact every-write drop (NaN without an estimate)."""
        return self._of_full(None if row.estimate is None else -row.estimate)

    def _of_full(self, drop: float | None) -> float:
        full = self.unedited - self.row("every residual write").refusal
        return drop / full if drop is not None and abs(full) > 1e-9 else math.nan

    def to_dict(self) -> dict:
        """JSON-ready form, each row with its `share`."""
        return {"unedited": self.unedited, "n_harmful": self.n_harmful, "n_harmless": self.n_harmless,
                "rows": [{**asdict(row), "share": _finite(self.share(row)), "estimated_share": _finite(self.estimated_share(row))}
                         for row in self.rows]}

    def markdown(self, per_layer: bool = True) -> str:
        """The groups, then (with `per_layer`) each block's two readers."""
        estimated = any(row.estimate is not None for row in self.rows)
        lines = [f"Refusal log-odds on {self.n_harmful} harmful prompts' first token (unedited {self.unedited:+.2f}) and first-token KL "
                 f"on {self.n_harmless} harmless prompts, with the direction removed from what each group of readers sees "
                 "(the stream itself untouched), against removing it from every residual write"
                 + (" (`estimated share`: the first-order estimate from one gradient pass; `-` where a row was not run exactly)"
                    if estimated else "") + ":", "",
                 "| readers | refusal log-odds | share of the every-write drop |" + (" estimated share |" if estimated else "")
                 + " KL harmless |", "|---|---:|---:|" + ("---:|" if estimated else "") + "---:|"]
        for row in self.rows:
            if per_layer or not row.readers.startswith("blocks."):
                cells = ["-" if row.refusal is None else f"{row.refusal:+.2f}", _cell(self.share(row))]
                if estimated:
                    cells.append(_cell(self.estimated_share(row)))
                cells.append("-" if row.kl_harmless is None else f"{row.kl_harmless:.4f}")
                lines.append(f"| {row.readers} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: the share of the every-write drop each main group carries."""
        parts = [f"{name} {self.share(self.row(name)):.2f}" for name in ("blocks", "unembedding", "every reader")]
        return (f"read-side ablation, share of the every-write refusal drop ({self.unedited:+.2f} -> "
                f"{self.row('every residual write').refusal:+.2f}): " + ", ".join(parts))


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def reader_groups(model: ModelAdapter, per_layer: bool = True) -> dict[str, list[str] | None]:
    """`{label: hook names}` of the conditions `direction_readers` runs (None: every residual write).

    Raises:
        FeatsteerError: for a model whose attention and MLP read the stream itself (OLMo 2, EXAONE 4): there is no
            normalised input to remove the direction from.
    """
    attention, mlp = model.hook_names(("ln1_normalized",)), model.hook_names(("ln2_normalized",))
    groups: dict[str, list[str] | None] = {
        "every residual write": None, "every reader": attention + mlp + [UNEMBEDDING], "blocks": attention + mlp,
        "attention": attention, "MLP": mlp, "unembedding": [UNEMBEDDING]}
    if per_layer:
        for layer in range(model.n_layers):
            groups[f"blocks.{layer} attention"] = [attention[layer]]
            groups[f"blocks.{layer} MLP"] = [mlp[layer]]
    return groups


def direction_readers(model: ModelAdapter, direction: Tensor, harmful: Sequence[str], harmless: Sequence[str], *,
                      per_layer: bool | str = True, estimate: bool = False, batch_size: int = 16,
                      system: str | None = None) -> DirectionReaders:
    """Remove `direction` from what each group of readers sees and score refusal and KL (module docstring).

    Forward passes: `2 + 2 * n_layers` conditions with `per_layer` (6 without), each one pass over the harmful and one
    over the harmless prompts. With `estimate`, one more forward and backward pass over the harmful prompts gives every
    row a first-order estimate of its change in refusal log-odds (each reader's `-(g . r)(x . r)` summed over positions);
    `per_layer="estimate"` runs the per-block rows only as that estimate, which keeps the cost at 6 conditions plus one
    gradient pass however deep the model is.

    Args:
        model: the model.
        direction: `(d_model,)` direction (made unit), e.g. the chosen DIM direction, or a `(k, d_model)` basis whose span is
            removed (orthonormalised here), e.g. an SVD subspace or the top SAE decoder rows.
        harmful: harmful prompts (chat-formatted as everywhere else); refusal is read on them.
        harmless: harmless prompts; the KL is read on them.
        per_layer: also each block's attention and MLP input on its own (`"estimate"`: estimated only, implies `estimate`).
        estimate: add the first-order estimates.
        batch_size: prompts per forward pass.
        system: the system prompt the prompts are formatted with (None: none).

    Raises:
        FeatsteerError: a direction of the wrong width, zero or with dependent rows, or an empty prompt set.
    """
    from featsteer.evaluation.metrics import (
        RefusalTokens,
        first_token_logprobs,
        kl_first_token,
        refusal_score,
    )
    from featsteer.interventions import WRITES, Ablate, resolve_sites, steer

    if direction.ndim not in (1, 2) or direction.shape[-1] != model.d_model or direction.numel() == 0:
        raise FeatsteerError(f"direction_readers needs a direction of d_model={model.d_model} entries or a (k, {model.d_model}) basis, "
                             f"got shape {tuple(direction.shape)}")
    rows64 = direction.detach().double().cpu().reshape(-1, model.d_model)
    if int(torch.linalg.matrix_rank(rows64)) < rows64.shape[0]:
        raise FeatsteerError("direction_readers got a zero direction or linearly dependent basis rows: nothing well defined to remove")
    if not harmful or not harmless:
        raise FeatsteerError(f"direction_readers needs harmful and harmless prompts, got {len(harmful)} and {len(harmless)}")
    harmful, harmless = list(harmful), list(harmless)
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    r = torch.linalg.qr(rows64.T).Q.T.float()  # orthonormal rows spanning the same subspace (a unit vector for one direction)

    def read() -> tuple[float, Tensor]:
        score = float(refusal_score(first_token_logprobs(model, harmful, batch_size=batch_size, system=system), tokens).mean())
        return score, first_token_logprobs(model, harmless, batch_size=batch_size, system=system)

    if per_layer not in (True, False, "estimate"):
        raise FeatsteerError(f"per_layer must be True, False or 'estimate', got {per_layer!r}")
    estimate = estimate or per_layer == "estimate"
    groups = reader_groups(model, per_layer=bool(per_layer))
    estimates = {}
    if estimate:
        from featsteer.directions.attribution import site_attribution

        estimates = site_attribution(model, harmful, r, groups["every reader"], tokens, batch_size=batch_size, system=system)
    unedited, base = read()
    rows = []
    for label, hooks in groups.items():
        where = resolve_sites(model, WRITES) if hooks is None else hooks
        guess = sum(estimates[h] for h in hooks) if estimate and hooks is not None else None
        if per_layer == "estimate" and label.startswith("blocks."):
            rows.append(ReaderRow(label, tuple(where), None, None, guess))
            continue
        with steer(model, Ablate(r, where=where)):
            score, logprobs = read()
        rows.append(ReaderRow(label, tuple(where), score, kl_first_token(base, logprobs), guess))
    return DirectionReaders(tuple(rows), unedited, len(harmful), len(harmless))
