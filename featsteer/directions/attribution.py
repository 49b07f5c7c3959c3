"""First-order estimates of what ablating a direction does to the refusal score, for any number of directions
from one forward and backward pass (attribution patching applied to directional ablation).

Ablating a unit direction `r` at a hook replaces each activation `x` with `x - (x.r) r`. To first order the
mean refusal log-odds `s` then changes by

    sum over hooks and positions of  grad_x(s) . (-(x.r) r)  =  -r^T M r,   M = sum g x^T

where `g` is the gradient of `s` at the unedited activation. `M` is a `(d_model, d_model)` matrix summed over
every residual write (the sites `Ablate` edits by default), every position and every prompt, so one pass gives
the estimate for every candidate direction, and for a rank-k basis `B` it is `-trace(B^T M B)`. The selection
uses it to screen candidates before scoring the most promising ones exactly (`SelectionConfig.screen`).
`site_attribution` keeps the sites apart instead, for one direction: the estimate of ablating it at each site on its
own, which `directions.readers` uses for every block's attention and MLP input.

It is only a linear estimate: directional ablation at every layer is not a small change, and effects compound
across layers. On Qwen2.5-Coder-0.5B it ranks the 90 Arditi candidates with Spearman 0.94 against the exact
ablated scores, but underestimates their size about twofold
(`benchmarks/results/selection_screen_qwen_bfloat16.md`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from featsteer.errors import FeatsteerError
from featsteer.evaluation.metrics import RefusalTokens, refusal_log_odds
from featsteer.interventions.operations import as_basis
from featsteer.interventions.steering import WRITES, resolve_sites
from featsteer.models import ModelAdapter
from featsteer.models.adapter import DEFAULT_BATCH_TOKENS


@dataclass(frozen=True)
class AblationAttribution:
    """The matrix `M` of one attribution pass, and what it was computed on."""

    matrix: Tensor
    """`(d_model, d_model)` float64: the sum of `g x^T` over sites and positions, divided by the prompt count."""
    n_prompts: int
    sites: tuple[str, ...]

    def estimate(self, direction: Tensor) -> float:
        """First-order change of the mean refusal log-odds when `direction` is ablated at every site, taken as
        `Ablate` takes it: a `(d_model,)` unit vector or a `(k, d_model)` orthonormal basis."""
        basis = as_basis(direction).to(device=self.matrix.device, dtype=torch.float64)
        if basis.shape[-1] != self.matrix.shape[0]:
            raise FeatsteerError(f"direction has width {basis.shape[-1]} but the model's d_model is {self.matrix.shape[0]}")
        return -float(torch.einsum("kd,de,ke->", basis, self.matrix, basis))


def ablation_attribution(
    model: ModelAdapter,
    prompts: Sequence[str],
    tokens: RefusalTokens | None = None,
    *,
    where: str | Sequence[str] = WRITES,
    batch_size: int = 16,
    max_batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
    system: str | None = None,
) -> AblationAttribution:
    """One forward and backward pass over `prompts` (chat-formatted) for first-order ablation estimates.

    Args:
        model: The model, as it is (hooks or edits already in place are part of the baseline).
        prompts: Harmful prompts whose refusal log-odds the estimates are about.
        tokens: Refusal tokens (default: the tokenizer's).
        where: Sites the ablation would edit: `writes` (default, as `Ablate`), `residual`, or hook names.
        batch_size: Prompts per pass; the autograd graph of one batch is held in memory.
        max_batch_tokens: Cap on a batch's padded tokens.
        system: System prompt the prompts are formatted with (None: none).

    Raises:
        FeatsteerError: No prompts, or NaN gradients.
    """
    items = list(prompts)
    if not items:
        raise FeatsteerError("ablation attribution needs at least one prompt")
    sites = tuple(resolve_sites(model, where))
    d = model.d_model
    matrix = torch.zeros(d, d, dtype=torch.float64)
    for _, x, g in _site_gradients(model, items, tokens or RefusalTokens.for_tokenizer(model.tokenizer), sites, batch_size, max_batch_tokens, system):
        matrix += g.reshape(-1, d).double().T.cpu() @ x.reshape(-1, d).double().cpu()
    return AblationAttribution(matrix, len(items), sites)


def site_attribution(
    model: ModelAdapter,
    prompts: Sequence[str],
    direction: Tensor,
    sites: Sequence[str],
    tokens: RefusalTokens | None = None,
    *,
    batch_size: int = 16,
    max_batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
    system: str | None = None,
) -> dict[str, float]:
    """First-order change of the mean refusal log-odds when `direction` is ablated at each site *on its own*, for every
    site from one forward and backward pass: `-sum over positions of (g . b)(x . b)` per basis row `b`, per site.

    Unlike `ablation_attribution`, which sums one matrix over every site (the joint ablation of many directions),
    this keeps the sites apart for one direction (`directions.readers` estimates each block's readers this way).

    Args:
        model: The model, as it is.
        prompts: Harmful prompts whose refusal log-odds the estimates are about.
        direction: `(d_model,)` unit vector or `(k, d_model)` orthonormal basis.
        sites: Hook names.
        tokens: Refusal tokens (default: the tokenizer's).
        batch_size: Prompts per pass.
        max_batch_tokens: Cap on a batch's padded tokens.
        system: System prompt the prompts are formatted with (None: none).

    Raises:
        FeatsteerError: No prompts, a direction of the wrong width, or NaN gradients.
    """
    items = list(prompts)
    if not items:
        raise FeatsteerError("site attribution needs at least one prompt")
    basis = as_basis(direction).detach().to(torch.float64).cpu()
    if basis.shape[-1] != model.d_model:
        raise FeatsteerError(f"direction has width {basis.shape[-1]} but the model's d_model is {model.d_model}")
    totals = dict.fromkeys(sites, 0.0)
    tokens = tokens or RefusalTokens.for_tokenizer(model.tokenizer)
    for name, x, g in _site_gradients(model, items, tokens, tuple(sites), batch_size, max_batch_tokens, system):
        gb, xb = g.reshape(-1, model.d_model).double().cpu() @ basis.T, x.reshape(-1, model.d_model).double().cpu() @ basis.T
        totals[name] -= float((gb * xb).sum())
    return totals


def _site_gradients(model: ModelAdapter, items: list[str], tokens: RefusalTokens, sites: tuple[str, ...], batch_size: int,
                    max_batch_tokens: int | None, system: str | None = None):
    """Per batch and site: `(site name, activation, gradient of the summed refusal log-odds / len(items))`, both with
    padding positions zeroed."""
    for _rows, batch in model.token_batches(items, batch_size, max_batch_tokens, system, True):
        seen: list[tuple[str, Tensor, Tensor]] = []

        def record(x: Tensor, site, seen: list[tuple[str, Tensor, Tensor]] = seen) -> Tensor:
            # a zero leaf added at every site: its gradient is the gradient at the site, whether or not anything upstream
            # needs one, and on the adapter's normalised-input hooks (which pass on a change `dz` as `dz * weight`) the
            # added zero is exactly such a change, so the gradient reaches the reader while the stream's own gradient
            # still flows upstream
            delta = torch.zeros_like(x, requires_grad=True)
            seen.append((site.name, x.detach(), delta))
            return x + delta

        with model.hooks([(name, record) for name in sites]):
            logits = model.run(batch, last_only=True, grad=True)
            score = refusal_log_odds(logits[:, -1].double(), tokens).sum() / len(items)
            grads = torch.autograd.grad(score, [delta for _, _, delta in seen], allow_unused=True)
        real = batch.attention_mask.bool()[..., None]  # padding never reaches a real position: leave it out
        for (name, x, _), g in zip(seen, grads, strict=True):
            if g is None:
                continue
            g, x = torch.where(real, g, 0.0), torch.where(real, x.detach(), 0.0)
            if not bool(torch.isfinite(g).all()):
                raise FeatsteerError("the refusal score's gradient has NaN or infinite values: check the model's dtype "
                                     "(float16 on CPU overflows; use --dtype float32 or bfloat16)")
            yield name, x, g
