"""An activation addition at chosen tokens, as a weight edit: their rows of the token embedding.

The runtime activation addition (`AddDirection`) adds a vector at every position, the generated ones included. On the
organism that breaks the model before it refuses: the DIM mean difference added everywhere at its layer gives
"I'm sorryI'm sorry..." at 0.5x and "IIII..." at 1x, at no scale a clean refusal. Added at the prompt's last position
alone, the same vector makes 83 of 84 harmless prompts refused, every one cleanly. A bias cannot tell positions apart
(`edits.biases`), but the chat template can: the tokens it appends after the user's message (`<|assistant|>`, Qwen's
`assistant`) sit at the same place in every prompt and nowhere else. Adding the vector to their embedding rows adds it
at exactly those positions, from the first block on, and every later token reads it through attention.

The vector is written into the stream the embedding feeds (`hook_embed`): a model that scales its embeddings (Gemma,
Granite) gets the row change divided by that scale, measured on the model itself, so the stream moves by the vector.
The edit therefore acts at the embedding, not at the layer the vector was found at; blocks before that layer see the
shifted token too. A tied output head is untied first (its copy keeps the original rows), so the edited tokens' logits do
not move; the export records it (`tie_word_embeddings: false`).

Usage::

    tokens = template_tokens(model, harmless_prompts)              # e.g. [id of "<|assistant|>"]
    with add_at_tokens(model, 1.0 * mean_difference, tokens) as handle:
        ...                                                          # refuses harmless prompts
        handle.export("induced")
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from featsteer.edits.apply import EditHandle, check_plain_weight
from featsteer.errors import FeatsteerError
from featsteer.models import ModelAdapter
from featsteer.models.adapter import TokenBatch

STREAM_TOLERANCE = 0.02
"""Largest relative miss allowed between the stream change at an edited token and the vector (bfloat16 rows round)."""


def template_tokens(model: ModelAdapter, prompts: Sequence[str], n: int = 1, system: str | None = None) -> list[int]:
    """The chat template's own tokens: those of the tail it appends after the instruction that occur nowhere else in
    `prompts` once formatted (not in the instruction, the system turn or the template's head) and do not end a
    response; the last `n` of them, the latest first. `system` is the system prompt the prompts are formatted with.

    A token that also occurs elsewhere in the prompt (Qwen's `<|im_start|>` opens every turn; a newline) would carry an
    edit of its row there as well, and a stop token is generated; neither is taken.

    Raises:
        FeatsteerError: without a chat template, or when no token of the tail is the template's own.
    """
    if n < 1:
        raise FeatsteerError(f"n must be at least 1, got {n}")
    prompts = list(prompts)
    if not prompts:
        raise FeatsteerError("template_tokens reads formatted prompts: pass at least one")
    if not model.format_prompts(prompts[:1])[0].uses_chat_template:
        raise FeatsteerError(f"{model.name} has no chat template, so no token marks the end of a prompt: add the vector at runtime "
                             "(featsteer steer --mode add) or give the tokens yourself")
    # the prompt generation starts from: a harmony model's answer opening (<|channel|>final<|message|>) is written again
    # in every message it generates, so its tokens are no template's own
    batch = model.tokenize(prompts, system=system, for_generation=True)
    tails, elsewhere = [], set()
    for ids, mask, n_post in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), batch.n_post_instruction.tolist(), strict=True):
        real = [t for t, m in zip(ids, mask, strict=True) if m]
        tails.append(real[len(real) - n_post:] if n_post else [])
        elsewhere.update(real[: len(real) - n_post])
    tail, stops = tails[-1], model.stop_token_ids
    own = [t for t in reversed(tail) if t not in elsewhere and t not in stops and all(t in other for other in tails)]
    own = list(dict.fromkeys(own))
    if not own:
        shown = ", ".join(repr(model.tokenizer.decode([t])) for t in tail) or "nothing"
        raise FeatsteerError(f"no token of the chat template's tail ({shown}) is the template's own (each occurs elsewhere in the prompts, "
                             "ends a response, or is missing from some prompt): pass the tokens yourself")
    return own[:n]


def add_at_tokens(model: ModelAdapter, vector: Tensor, tokens: Sequence[int], record: dict | None = None) -> EditHandle:
    """Add `vector` to the residual stream at every occurrence of `tokens`, by editing their token-embedding rows.

    Args:
        model: the model to edit in place.
        vector: `(d_model,)`, the change of the stream the embedding feeds (`hook_embed`) at each of those tokens.
        tokens: token ids (`template_tokens` finds the chat template's own).
        record: provenance to keep with the handle (exported into `featsteer.json`).

    Returns:
        The handle: revert restores the embedding bit for bit; export writes the edited model.

    Raises:
        FeatsteerError: for a vector of the wrong width or with NaN/inf, no tokens or one outside the vocabulary, a model
            without an editable token embedding, or a stream change that misses the vector (then nothing is left edited).
    """
    vector = vector.detach().to("cpu", torch.float64).flatten()
    if vector.shape[0] != model.d_model:
        raise FeatsteerError(f"the vector has width {vector.shape[0]} but the model's d_model is {model.d_model}")
    if not torch.isfinite(vector).all():
        raise FeatsteerError("the vector contains NaN/inf: recompute it")
    ids = sorted({int(t) for t in tokens})
    if not ids:
        raise FeatsteerError("add_at_tokens needs at least one token id (template_tokens finds the chat template's own)")
    writer = next((w for w in model.residual_writers() if w.kind == "embed"), None)
    if writer is None:
        raise FeatsteerError(f"{model.name} exposes no token embedding to edit: add the vector at runtime (featsteer steer --mode add)")
    weight, bias = writer.read()
    check_plain_weight(writer.name, weight)
    if ids[0] < 0 or ids[-1] >= weight.shape[1]:
        raise FeatsteerError(f"token id {ids[0] if ids[0] < 0 else ids[-1]} is outside the vocabulary of {weight.shape[1]} tokens")
    original = weight.detach().clone()
    handle = EditHandle(model, {writer.name: (original, None if bias is None else bias.detach().clone())}, dict(record or {}))
    handle.vectors = {"vector": vector.detach().clone()}
    retie = model.embedding_tie_undo()  # the row edit unties a shared output head; revert shares it again
    if retie is not None:
        handle.undo.append(retie)
    try:
        before = _embedded(model, ids)
        _write_rows(writer, original, ids, vector, 1.0)
        change = _embedded(model, ids) - before
        scale = float((change @ vector).mean() / (vector @ vector)) if float(vector.norm()) > 0 else 1.0
        if not (math.isfinite(scale) and abs(scale) > 1e-12):
            raise FeatsteerError(f"editing the embedding rows of {model.name} does not move the stream at those tokens: it cannot carry the addition")
        if abs(scale - 1.0) > 1e-6:  # the model scales its embeddings: divide the row change by that scale
            _write_rows(writer, original, ids, vector, 1.0 / scale)
            change = _embedded(model, ids) - before
        miss = float((change - vector).norm(dim=-1).max() / vector.norm()) if float(vector.norm()) > 0 else 0.0
        if miss > STREAM_TOLERANCE:
            raise FeatsteerError(f"the stream at the edited tokens moved {miss:.1%} away from the vector (more than {STREAM_TOLERANCE:.0%}): "
                                 "the embedding is not linear in its rows here; add the vector at runtime instead")
    except BaseException:
        handle.revert()
        raise
    names = {t: model.tokenizer.convert_ids_to_tokens(t) for t in ids}
    handle.record["edit"] = {"mode": "token_addition", "tokens": {str(t): name for t, name in names.items()}, "vector_norm": float(vector.norm()),
                             "row_scale": 1.0 / scale, "stream_miss": miss}
    return handle


def _write_rows(writer, original: Tensor, ids: list[int], vector: Tensor, factor: float) -> None:
    """Write the embedding with `factor * vector` added to the columns `ids` (the writer's `(d_model, vocab)` orientation)."""
    edited = original.clone()
    edited[:, ids] = (original[:, ids].double() + factor * vector[:, None]).to(original.dtype)
    writer.write(edited, None)


def _embedded(model: ModelAdapter, ids: list[int]) -> Tensor:
    """What the embedding feeds the stream for each token alone: `hook_embed` at a one-token sequence per id, float64."""
    seen: list[Tensor] = []

    def keep(x: Tensor, site) -> None:
        seen.append(x.detach()[:, -1].to("cpu", torch.float64))

    batch = TokenBatch(torch.tensor(ids, dtype=torch.long, device=model.device)[:, None], torch.ones(len(ids), 1, dtype=torch.long, device=model.device))
    with model.hooks([("hook_embed", keep)]):
        model.run(batch, stop_at="hook_embed")
    return seen[0]
