"""How good an SAE is: reconstruction, sparsity, dead features, and the loss when it replaces the activation.

The same numbers are wanted for SAEs we train (`featsteer-train-sae` writes them to `metrics.json`) and
for SAEs we load (a sae_lens release on a new model), so they live in the library. Sums are accumulated
in float64 over streamed batches, so the statistics of millions of tokens never sit in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import response_cross_entropy
from featsteer.models import HookFn, HookSite, ModelAdapter
from featsteer.sae.heads import flat_rows
from featsteer.sae.loading import validate_sae
from featsteer.sae.steering import (
    first_trained_position,
    outside_domain,
    splice_activation,
    token_positions,
    untrained_head,
)


@dataclass
class ReconstructionStats:
    """Streaming reconstruction and sparsity statistics of one SAE (float64 sums)."""

    d_sae: int
    """Number of features."""
    n_tokens: int = 0
    """Rows seen."""
    squared_error: float = 0.0
    """Sum over rows of `||x - decode(encode(x))||^2`."""
    squared_norm: float = 0.0
    """Sum over rows of `||x||^2`."""
    active_sum: float = 0.0
    """Sum over rows of the number of active features (L0)."""
    input_sum: Tensor | None = None
    """`(d_in,)` float64 sum of the inputs."""
    fire_count: Tensor = field(init=False)
    """`(d_sae,)` int64: rows on which each feature was active."""
    max_activation: Tensor = field(init=False)
    """`(d_sae,)` float64: largest activation of each feature."""

    def __post_init__(self) -> None:
        self.fire_count = torch.zeros(self.d_sae, dtype=torch.long)
        self.max_activation = torch.zeros(self.d_sae, dtype=torch.float64)

    def update(self, x: Float[Tensor, "rows d_in"], features: Float[Tensor, "rows d_sae"], reconstruction: Float[Tensor, "rows d_in"]) -> None:
        """Fold one batch in."""
        if x.shape[0] == 0:
            return
        x64, features64 = x.detach().cpu().double(), features.detach().cpu().double()
        self.n_tokens += x64.shape[0]
        self.squared_error += float((x64 - reconstruction.detach().cpu().double()).pow(2).sum())
        self.squared_norm += float(x64.pow(2).sum())
        batch_sum = x64.sum(0)
        self.input_sum = batch_sum if self.input_sum is None else self.input_sum + batch_sum
        active = features64 != 0
        self.active_sum += float(active.sum())
        self.fire_count += active.sum(0)
        self.max_activation = torch.maximum(self.max_activation, features64.max(0).values)

    @property
    def explained_variance(self) -> float:
        """`1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2` over all rows seen."""
        if self.n_tokens == 0 or self.input_sum is None:
            raise FeatsteerError("no activations were seen: explained variance needs at least one row")
        total = self.squared_norm - float(self.input_sum.pow(2).sum()) / self.n_tokens
        return 1.0 - self.squared_error / total if total > 0 else float("nan")

    @property
    def mse(self) -> float:
        """Mean squared reconstruction error per row (summed over `d_in`)."""
        return self.squared_error / max(self.n_tokens, 1)

    @property
    def l0(self) -> float:
        """Mean number of active features per row."""
        return self.active_sum / max(self.n_tokens, 1)

    @property
    def dead_fraction(self) -> float:
        """Fraction of features that never fired on the rows seen."""
        return float((self.fire_count == 0).double().mean())

    def to_dict(self) -> dict[str, float | int]:
        """Scalar summary for reports."""
        return {"explained_variance": self.explained_variance, "mse": self.mse, "l0": self.l0,
                "dead_fraction": self.dead_fraction, "n_tokens": self.n_tokens}


def reconstruction_stats(sae: SAE, batches: Iterable[Float[Tensor, "rows d_in"]], *, max_tokens: int | None = None) -> ReconstructionStats:
    """Explained variance, L0, dead features and feature maxima of an SAE over streamed activation batches.

    Args:
        sae: a sae_lens SAE.
        batches: `(rows, d_in)` activation batches at the SAE's hook (flat: hook_z rows hold the heads side by side).
        max_tokens: stop after this many rows (None: all).
    """
    stats = ReconstructionStats(d_sae=int(sae.cfg.d_sae))
    with torch.no_grad(), flat_rows(sae):
        for batch in batches:
            if max_tokens is not None and stats.n_tokens >= max_tokens:
                break
            if max_tokens is not None:
                batch = batch[: max_tokens - stats.n_tokens]
            x = batch.to(sae.device, sae.dtype)
            features = sae.encode(x).to_dense()
            stats.update(x, features, sae.decode(features))
    return stats


@dataclass(frozen=True)
class SpliceLoss:
    """Cross-entropy with the activation clean, replaced by the SAE, and zero-ablated."""

    clean: float
    """Mean NLL (nats per token) of the unmodified model."""
    spliced: float
    """Mean NLL with the activation replaced by the SAE reconstruction."""
    zero_ablated: float
    """Mean NLL with the activation set to zero."""
    n_tokens: int
    """Predicted tokens scored."""
    scored: str = "text"
    """`responses` (teacher-forced response tokens after chat prompts) or `text` (every next token)."""
    first_position: int = 0
    """Tokens of each text before this index were left as they are (the shared prefix the SAE was not trained on)."""

    @property
    def recovered(self) -> float:
        """`(CE_zero - CE_spliced) / (CE_zero - CE_clean)`: 1 = the SAE loses nothing, 0 = as bad as zeroing."""
        gap = self.zero_ablated - self.clean
        return (self.zero_ablated - self.spliced) / gap if abs(gap) > 1e-12 else float("nan")

    def to_dict(self) -> dict[str, float | int | str]:
        """JSON-ready form."""
        return {"ce_clean": self.clean, "ce_spliced": self.spliced, "ce_zero_ablated": self.zero_ablated,
                "ce_loss_recovered": self.recovered, "ce_tokens": self.n_tokens, "ce_scored": self.scored,
                "ce_first_position": self.first_position}


def next_token_loss(model: ModelAdapter, texts: Sequence[str], *, chat: bool = True, batch_size: int = 8,
                    first_position: int = 0) -> tuple[float, int]:
    """Mean next-token NLL over every real token of `texts` (read under the caller's hooks), predicted from the tokens
    at index `first_position` of each text on.

    Returns:
        `(mean NLL in nats, number of predicted tokens)`.
    """
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = model.tokenize(list(texts[start : start + batch_size]), chat=chat)
            logits = model.run(batch)
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -log_probs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
            keep = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool() & (token_positions(batch.attention_mask)[:, :-1] >= first_position)
            total += float(nll[keep].double().sum())
            count += int(keep.sum())
    if count == 0:
        raise FeatsteerError(f"no next-token predictions to score: the texts are one token long, or no longer than {first_position} "
                             "tokens (the prefix the SAE was not trained on)" if first_position else
                             "no next-token predictions to score: the texts are one token long")
    if not math.isfinite(total):
        raise FeatsteerError("non-finite loss while scoring the SAE splice: check the model dtype and the SAE weights")
    return total / count, count


def _untrained_tokens(model: ModelAdapter, sae: SAE, rows: Tensor, first_position: int) -> Tensor | None:
    """`(batch, pos)` bool: the tokens the SAE was not trained on (before `first_position`, or above its norm bound);
    None when there are none."""
    outside = outside_domain(sae, rows)
    before = untrained_head(model, sae, rows.shape[0], rows.shape[1], rows.device) if first_position > 0 else None
    if before is not None:
        outside = before if outside is None else outside | before
    return outside


def splice_loss(
    model: ModelAdapter,
    sae: SAE,
    texts: Sequence[str],
    *,
    responses: Sequence[str] | None = None,
    chat: bool = True,
    batch_size: int = 8,
) -> SpliceLoss:
    """Cross-entropy loss recovered when `sae` replaces the activation at its hook, at the tokens it was trained on:
    tokens before its `first_trained_position` (the chat-template head `featsteer-train-sae` leaves out) and tokens above
    its recorded norm bound (see `outside_domain`) are left as they are by the splice and by the zero-ablation baseline
    alike, and without `responses` only the predictions made from the trained tokens are scored.

    Chat models are not trained to predict their prompts, so with `responses` the loss is the
    teacher-forced NLL of those responses after the chat-formatted `texts` (e.g. the clean model's own
    greedy responses); without, it is the next-token NLL of every token of `texts`.

    Args:
        model: the model the SAE was trained on.
        sae: a sae_lens SAE (validated against `model`).
        texts: held-out instructions (chat-formatted when `chat`) or raw texts.
        responses: one non-empty response per text, or None.
        chat: apply the chat template (ignored with `responses`, which always use it).
        batch_size: texts per forward pass.
    """
    first_position = first_trained_position(sae)

    def measure() -> tuple[float, int]:
        if responses is None:
            return next_token_loss(model, texts, chat=chat, batch_size=batch_size, first_position=first_position)
        result = response_cross_entropy(model, texts, responses, batch_size=batch_size)
        return result.mean_nll, result.n_tokens

    def replace_trained_tokens(zero: bool) -> HookFn:
        def hook(activation: Tensor, site: HookSite) -> Tensor:
            rows = activation.flatten(-2) if site.kind == "attn_z" else activation
            replaced = torch.zeros_like(activation) if zero else splice_activation(sae, activation, error_term=False)
            untrained = _untrained_tokens(model, sae, rows, first_position)
            if untrained is None:
                return replaced
            return torch.where(untrained.reshape(*untrained.shape, *[1] * (activation.dim() - 2)), activation, replaced)
        return hook

    name = validate_sae(sae, model)
    clean, n_tokens = measure()
    with model.hooks([(name, replace_trained_tokens(zero=False))]):
        spliced, _ = measure()
    with model.hooks([(name, replace_trained_tokens(zero=True))]):
        zero, _ = measure()
    return SpliceLoss(clean=clean, spliced=spliced, zero_ablated=zero, n_tokens=n_tokens,
                      scored="text" if responses is None else "responses", first_position=first_position)
