"""Capture activations for a list of prompts: batched, left-padded, early-stopped, checked.

Hooks keep only the selected positions of each activation as it is produced, the forward pass ends
right after the deepest requested hook (no later layers, no unembedding), prompts are processed in
length order to minimise padding, and every batch is checked for NaN/inf before it is kept.

Every captured row is one flat vector per token. For the residual stream and its writes that is `d_model` wide;
the per-head hook `blocks.{l}.attn.hook_z` `(batch, pos, n_heads, d_head)` is stored with its heads side by side,
`n_heads * d_head` wide in head-major order, which is what sae_lens' hook_z SAEs read (`reshape_activations="hook_z"`
flattens the same way). `hook_width` says how wide a hook's rows are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from featsteer.activations.heap import fragmentation_limited, trim
from featsteer.activations.positions import Positions
from featsteer.activations.stats import RunningMoments
from featsteer.activations.store import NOTHING_CAPTURED, ActivationReader, ActivationSet, ShardWriter
from featsteer.datasets.loaders import prompt_set_hash
from featsteer.errors import FeatsteerError
from featsteer.models import ROUTING_KINDS, ModelAdapter, load_model, weights_fingerprint
from featsteer.models.adapter import DEFAULT_BATCH_TOKENS, TokenBatch
from featsteer.models.chat import check_system

logger = logging.getLogger(__name__)


def _attention_projection(model: ModelAdapter, layer: int) -> Tensor:
    """Layer `layer`'s attention output projection weight `(d_model, n_heads * d_head)` as the model holds it."""
    for writer in model.residual_writers():
        if writer.kind == "attn_out" and writer.layer == layer:
            return writer.read()[0]
    raise FeatsteerError(f"{model.name} exposes no attention output projection at layer {layer}")


def output_projection(model: ModelAdapter, layer: int) -> Tensor:
    """Layer `layer`'s attention output projection `(d_model, n_heads * d_head)`, float64 on the CPU; its columns are in
    hook_z's head-major order, so `W @ z.flatten(-2)` is the attention output without its bias.

    Raises:
        FeatsteerError: when the model exposes no attention output projection at `layer`.
    """
    return _attention_projection(model, layer).detach().double().cpu()


def attention_width(model: ModelAdapter, layer: int) -> int:
    """`n_heads * d_head` of one layer: the input width of its attention output projection (what `hook_z` flattens to).

    Raises:
        FeatsteerError: when the model exposes no attention output projection for `layer`.
    """
    return int(_attention_projection(model, layer).shape[1])


def hook_width(model: ModelAdapter, hook: str) -> int:
    """Width of one captured row at `hook`: `d_model`, `n_heads * d_head` at `blocks.{l}.attn.hook_z` (heads side by side), or
    `n_experts` at `blocks.{l}.mlp.hook_router_logits` and `blocks.{l}.mlp.hook_routing`.

    Raises:
        FeatsteerError: for a hook name the model does not have.
    """
    site = model.hook_site(hook)
    if site.kind in ROUTING_KINDS:
        return int(model.n_experts)
    return attention_width(model, site.layer) if site.kind == "attn_z" else int(model.d_model)


def capture(
    model,
    prompts: Sequence[str],
    hooks: Sequence[str] | str,
    *,
    positions: Positions | str = "last",
    batch_size: int = 16,
    max_batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
    system: str | None = None,
    chat: bool = True,
    stream_to: str | Path | None = None,
    shard_rows: int = 65536,
    dtype: torch.dtype = torch.float32,
    covariance: bool = False,
    label: str | None = None,
    progress: bool | None = None,
    load_back: bool = True,
) -> ActivationSet | ActivationReader:
    """Capture activations at `hooks` for `prompts`.

    Args:
        model: a `ModelAdapter` or anything `load_model` accepts.
        prompts: instructions (a `PromptSet` or list of strings).
        hooks: TransformerLens hook names, e.g. `["blocks.6.hook_resid_pre"]`. `blocks.{l}.attn.hook_z` is stored
            flattened, `n_heads * d_head` wide (see module docstring); hooks of different widths (hook_z next to
            `d_model`-wide hooks on a model whose `n_heads * d_head != d_model`) need separate calls.
        positions: a `Positions` selector or its string form (`last`, `mean_last:K`, `post_instruction`, `instruction_end`, `all`).
        batch_size: prompts per forward pass.
        max_batch_tokens: cap on a batch's padded tokens (rows x longest prompt; None: no cap). Prompts are
            batched in length order, so one 2,000-token prompt pads only the few rows beside it.
        system: optional system prompt for the chat template (not with `chat=False`).
        chat: format prompts with the chat template (False: raw text, e.g. for SAE training corpora).
        stream_to: if given, write shards to this new (or empty) directory as they fill, for sets larger than RAM.
        load_back: with `stream_to`, return the set read back from disk (True), or an `ActivationReader` over it
            (False: nothing is loaded, for sets that do not fit in memory).
        shard_rows: rows per shard when streaming.
        dtype: dtype of the stored activations (statistics are always float64).
        covariance: also accumulate float64 covariances per hook (d_model^2 memory each).
        label: tag stored with the set (e.g. `harmful`).
        progress: show a progress bar (None: as the model's `show_progress` says).

    Returns:
        The `ActivationSet` (rows ordered by prompt, then position). When streaming, the set loaded back
        from disk, or with `load_back=False` an `ActivationReader` over the directory.

    Raises:
        FeatsteerError: empty prompt list or a prompt that is not a string, a `dtype` that is not a floating torch dtype, a blank
            system prompt, a system prompt without the chat template, unknown hook, hooks of different
            widths, NaN/inf activations, or activations beyond `dtype`'s range (float16's 65504), naming hook and prompt.
    """
    check_system(system)
    if system is not None and not chat:  # the raw texts would be read without it, and the metadata would claim it
        raise FeatsteerError("a system prompt goes into the chat template, which chat=False leaves out: pass system=None or chat=True")
    _check_dtype(dtype)
    adapter: ModelAdapter = load_model(model)
    progress = adapter.show_progress if progress is None else progress
    source, prompts = getattr(prompts, "source", None), _checked_prompts(prompts)
    hook_list = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hook_list:
        raise FeatsteerError("no hook points given: pass e.g. blocks.0.hook_resid_pre")
    sites = sorted({adapter.hook_site(h) for h in hook_list}, key=lambda s: s.order)
    width = _common_width(adapter, sites)
    selector = positions if isinstance(positions, Positions) else Positions.parse(positions)
    hook_names = tuple(site.name for site in sites)
    stats: dict[str, RunningMoments] = {}
    # post_instruction reads the prompts' shortest tail before the first batch: without a budget too, the plan's one
    # encoding holds it, and the batches are padded from it
    batches = adapter.token_batches(prompts, batch_size, max_batch_tokens, system, chat, encode_all=selector.mode == "post_instruction")
    tail = common_tail(adapter, prompts, system, chat, batches.n_post_instruction) if selector.mode == "post_instruction" else None
    provenance = _provenance(adapter, prompts, source, system, chat, dtype)
    meta = {**_meta(selector, adapter, label, chat, system), "provenance": provenance}
    writer = ShardWriter(stream_to, hook_names, width, meta, shard_rows) if stream_to else None
    collector = _Collector(len(prompts), len(hook_names), width, dtype, one_row_per_prompt=selector.mode in ("last", "mean_last"))
    with fragmentation_limited():  # see featsteer.activations.heap: large temporaries are unmapped when freed
        try:
            for batch_ids, batch in tqdm(batches, desc="capture", unit="batch", disable=not progress or len(batches) < 4, leave=False):
                acts, row_prompt, row_pos, row_token_id = _capture_batch(adapter, batch, sites, selector, tail)
                row_prompt = torch.tensor(batch_ids, dtype=torch.long)[row_prompt]
                _check_finite(acts, hook_names, row_prompt, prompts)
                _update_stats(stats, acts, hook_names, row_pos, selector, covariance)
                acts = _stored(acts, dtype, hook_names, row_prompt, prompts)
                if writer:
                    writer.add(acts, row_prompt, row_pos)
                else:
                    collector.add(acts, row_prompt, row_pos, row_token_id)
                del acts
                trim()  # the batch's freed forward-pass memory goes back to the OS, not into the next peak
        except BaseException:
            if writer:
                writer.abort()
            raise
    if writer:
        writer.close(prompts, stats)
        reader = ActivationReader(stream_to)
        return reader.load() if load_back else reader
    acts, row_prompt, row_pos, row_token_id = collector.finish()
    return ActivationSet(
        activations=acts,
        hook_names=hook_names,
        prompt_index=row_prompt,
        position=row_pos,
        prompts=tuple(prompts),
        positions=str(selector),
        model=adapter.name,
        label=label,
        chat=chat,
        system=system,
        stats=stats,
        provenance=provenance,
        token_id=row_token_id,
    )


def _checked_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts as a list of strings; an error for an empty list or a value that is not text (a missing cell read from a
    table as None or NaN was captured as the text 'None' or 'nan', with nothing to say so)."""
    texts = list(prompts)
    if not texts:
        raise FeatsteerError("no prompts to capture: the prompt list is empty")
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise FeatsteerError(f"prompt #{bad} is {texts[bad]!r} ({type(texts[bad]).__name__}), not text: drop or fill missing "
                             "entries (featsteer.datasets.load_prompts does) and pass strings")
    return texts


def _check_dtype(dtype: object) -> None:
    """The stored dtype is a floating torch dtype: an integer or bool dtype truncated every activation (to 0 or True) without
    an error, and a string failed deep inside torch."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FeatsteerError(f"dtype={dtype!r} cannot hold activations: pass a floating torch dtype such as torch.float32, "
                             "torch.bfloat16 or torch.float16")


def _common_width(adapter: ModelAdapter, sites) -> int:
    """The one row width of every requested hook; a clear error when they differ."""
    widths = {site.name: hook_width(adapter, site.name) for site in sites}
    first, width = next(iter(widths.items()))
    other = next((name for name, value in widths.items() if value != width), None)
    if other is not None:
        raise FeatsteerError(f"{first} rows are {width} wide but {other} rows are {widths[other]}: one capture stores rows of "
                             "one width (hook_z holds n_heads x d_head values per token, the stream d_model); capture them in separate calls")
    return width


def common_tail(adapter: ModelAdapter, prompts: list[str], system: str | None, chat: bool,
                known: Sequence[int] | None = None) -> int:
    """The number of tokens after the instruction that every prompt has. Where a prompt's last characters merge with the
    template's first into one token (a trailing space or newline before a plain-text template), it has one fewer.
    `known`: each prompt's count already tokenized (`TokenBatches.n_post_instruction`), so the prompts are not tokenized
    again."""
    if known is not None:
        return min(known)
    return min(int(adapter.tokenize([text], system=system, chat=chat).n_post_instruction[0]) for text in prompts)


def _capture_batch(adapter: ModelAdapter, batch: TokenBatch, sites, selector: Positions,
                   tail: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One batch's kept rows: `(activations (row, hook, width), row's batch index, position label, token id)`."""
    row_batch, row_token, row_pos = selector.plan(batch.attention_mask.cpu(), batch.n_post_instruction, tail)
    row_token_id = batch.input_ids.cpu()[row_batch, row_token]
    kept: dict[str, Tensor] = {}

    def keep(activation: Tensor, site) -> None:
        rows = activation.flatten(-2) if site.kind == "attn_z" else activation  # heads side by side
        kept[site.name] = selector.select(rows, row_batch, row_token).detach().to("cpu")

    with adapter.hooks([(site.name, keep) for site in sites]):
        adapter.run(batch, stop_at=sites[-1].name)
    return torch.stack([kept[site.name] for site in sites], 1), row_batch, row_pos, row_token_id


def _check_finite(acts: Tensor, hook_names: tuple[str, ...], row_prompt: Tensor, prompts: list[str]) -> None:
    finite = torch.isfinite(acts).all(-1)
    if bool(finite.all()):
        return
    row, slot = (~finite).nonzero()[0].tolist()
    index = int(row_prompt[row])
    raise FeatsteerError(
        f"non-finite activations (NaN/inf) at {hook_names[slot]} for prompt #{index} "
        f"({prompts[index][:60]!r}): check the model's dtype (try float32) and weights"
    )


def _stored(acts: Tensor, dtype: torch.dtype, hook_names: tuple[str, ...], row_prompt: Tensor, prompts: list[str]) -> Tensor:
    """`acts` in the stored dtype; a clear error where a value is beyond its range (float16 stops at 65504), which the
    conversion would otherwise keep as inf."""
    stored = acts.to(dtype)
    if not stored.is_floating_point() or bool(torch.isfinite(stored).all()):
        return stored
    row, slot = (~torch.isfinite(stored).all(-1)).nonzero()[0].tolist()
    index = int(row_prompt[row])
    peak, name, largest = float(acts[row, slot].abs().max()), str(dtype).removeprefix("torch."), torch.finfo(dtype).max
    raise FeatsteerError(
        f"activations at {hook_names[slot]} for prompt #{index} ({prompts[index][:60]!r}) reach {peak:.6g}, beyond {name}'s "
        f"range (largest {largest:.6g}): capture with dtype=torch.float32 or torch.bfloat16"
    )


def _update_stats(stats, acts: Tensor, hook_names, row_pos: Tensor, selector: Positions, covariance: bool) -> None:
    per_position = selector.mode in ("post_instruction", "instruction_end")
    for slot, name in enumerate(hook_names):
        groups = [(f"{name}@{p}", row_pos == p) for p in row_pos.unique().tolist()] if per_position else [(name, None)]
        for key, mask in groups:
            vectors = acts[:, slot, :] if mask is None else acts[mask, slot, :]
            if key not in stats:
                stats[key] = RunningMoments(d=acts.shape[-1], track_covariance=covariance)
            stats[key].update(vectors)


class _Collector:
    """Gathers rows in prompt order. One-row-per-prompt selectors write into a preallocated tensor, so
    peak memory stays near the size of the result; multi-row selectors concatenate and sort once."""

    def __init__(self, n_prompts: int, n_hooks: int, d_model: int, dtype: torch.dtype, one_row_per_prompt: bool):
        self.fixed = torch.empty(n_prompts, n_hooks, d_model, dtype=dtype) if one_row_per_prompt else None
        self.position = torch.full((n_prompts,), -1, dtype=torch.long)
        self.token_id = torch.zeros(n_prompts, dtype=torch.long)
        self.chunks: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def add(self, acts: Tensor, row_prompt: Tensor, row_pos: Tensor, token_id: Tensor) -> None:
        if self.fixed is not None:
            self.fixed[row_prompt] = acts
            self.token_id[row_prompt] = token_id
        else:
            self.chunks.append((acts, row_prompt, row_pos, token_id))

    def finish(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.fixed is not None:
            return self.fixed, torch.arange(self.fixed.shape[0]), self.position, self.token_id
        acts, row_prompt, row_pos, token_id = (torch.cat(parts) for parts in zip(*self.chunks, strict=True))
        self.chunks.clear()
        if row_pos.numel() == 0:  # as a streamed capture says it (ShardWriter.close)
            raise FeatsteerError(NOTHING_CAPTURED)
        span = int(row_pos.abs().max()) + 1
        order = torch.argsort(row_prompt * (2 * span + 1) + row_pos + span)
        return acts[order], row_prompt[order], row_pos[order], token_id[order]


def _meta(selector: Positions, adapter: ModelAdapter, label: str | None, chat: bool, system: str | None) -> dict:
    return {"positions": str(selector), "model": adapter.name, "label": label, "chat": chat, "system": system}


def _provenance(adapter: ModelAdapter, prompts: list[str], source: str | None, system: str | None, chat: bool,
                dtype: torch.dtype) -> dict:
    """What the rows depend on beyond the model's name and the selector: the prompts' hash and source, the model's family,
    dtype and a fingerprint of its weights (`models.weights_fingerprint`: 64 values per parameter, about 2 ms on
    Qwen2.5-0.5B), the tokenizer, the prompt layout (the chat template rendered around `{instruction}`, with the system
    prompt), the stored dtype and the library versions (see `ActivationSet.provenance`)."""
    import transformers

    import featsteer

    tokenizer = adapter.tokenizer
    layout = adapter.format_prompts(["{instruction}"], system)[0] if chat else None
    return {
        "prompts_sha256": prompt_set_hash(prompts),
        "prompt_source": source,
        "model_family": adapter.family,
        "model_dtype": str(adapter.dtype).removeprefix("torch."),
        "weights_fingerprint": weights_fingerprint(adapter),
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "template": None if layout is None else layout.text,
        "fallback_template": None if layout is None else not layout.uses_chat_template,
        "stored_dtype": str(dtype).removeprefix("torch."),
        "versions": {"featsteer": featsteer.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
