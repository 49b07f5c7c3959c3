"""Applying weight edits to a model: all-or-nothing, exactly revertible, exportable.

`apply_edit` edits one residual writer at a time and, if anything fails, restores the writers already
edited, so a model is never left half-edited. The returned `EditHandle` keeps the
original tensors of each touched writer: `revert()` restores them bit for bit, and `export()` writes a
Hugging Face model directory with a `featsteer.json` that records how it was made.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from featsteer.edits.kernel import LayerKernel
from featsteer.edits.weights import (
    amplify_weight,
    norm_preserving_orthogonalize,
    orthogonalize_bias,
    orthogonalize_weight,
)
from featsteer.errors import FeatsteerError
from featsteer.files import check_empty_folder, json_text, share_files, staged_output
from featsteer.interventions.operations import as_basis, orthonormal_basis
from featsteer.models import ModelAdapter, ResidualWriter, TokenBatch

EDIT_MODES = ("orthogonalize", "norm_preserving", "amplify", "induce")


@dataclass(frozen=True)
class EditConfig:
    """How to edit the residual writers."""

    mode: str = "orthogonalize"
    """`orthogonalize` (abliteration), `norm_preserving` (abliteration keeping column norms), `amplify`
    (reverse abliteration, W + a r r^T W) or `induce` (amplify plus a constant shift along r on every
    token embedding, which makes harmless prompts look harmful)."""
    attn_kernel: LayerKernel | None = None
    """Per-layer strength for attention writers (None: strength 1 at every layer)."""
    mlp_kernel: LayerKernel | None = None
    """Per-layer strength for MLP writers (None: strength 1 at every layer)."""
    embedding_strength: float = 1.0
    """Strength for the token (and position) embedding; 0 leaves embeddings untouched."""
    alpha: float = 1.0
    """Amplification for `amplify`/`induce` (multiplies the kernel strength)."""
    shift: float = 0.0
    """For `induce`: amount of the direction added to every token's embedding as the stream reads it (`hook_embed`): on a
    model that scales its embeddings (Gemma, Granite) the weight moves by `shift` divided by that scale."""

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise FeatsteerError(f"unknown edit mode '{self.mode}': use one of {', '.join(EDIT_MODES)}")
        numbers = {"embedding_strength": self.embedding_strength, "alpha": self.alpha, "shift": self.shift}
        bad = {name: value for name, value in numbers.items() if not math.isfinite(float(value))}
        if bad:  # a NaN or inf strength writes NaN into every weight it reaches
            raise FeatsteerError(f"EditConfig {', '.join(f'{k}={v}' for k, v in bad.items())}: give finite numbers")
        if self.shift and self.mode != "induce":
            raise FeatsteerError(f"shift={self.shift} applies to mode='induce' only: mode='{self.mode}' would ignore it")
        if self.alpha != 1.0 and self.mode not in ("amplify", "induce"):
            raise FeatsteerError(f"alpha={self.alpha} applies to mode='amplify' or 'induce' only: mode='{self.mode}' would ignore it "
                                 "(the kernels set an abliteration's strength)")

    def strength(self, writer: ResidualWriter) -> float:
        """Strength for one writer."""
        if writer.layer is None:
            return self.embedding_strength
        kernel = self.attn_kernel if writer.kind == "attn_out" else self.mlp_kernel
        return 1.0 if kernel is None else kernel.strength(writer.layer)

    @classmethod
    def reflection(cls, n_layers: int, strength: float = 2.0) -> EditConfig:
        """Every writer and the embedding edited at `strength` (`W - s r r^T W`): 2 reflects the direction's component of
        every write (its sign flipped, OBLITERATUS's "inverted" mode) instead of removing it."""
        kernel = LayerKernel.uniform(n_layers, strength)
        return cls(attn_kernel=kernel, mlp_kernel=kernel, embedding_strength=strength)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"mode": self.mode, "attn_kernel": self.attn_kernel.to_dict() if self.attn_kernel else None,
                "mlp_kernel": self.mlp_kernel.to_dict() if self.mlp_kernel else None,
                "embedding_strength": self.embedding_strength, "alpha": self.alpha, "shift": self.shift}


def edited_tensors(writer: ResidualWriter, basis: Tensor, config: EditConfig, strength: float,
                   columns: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """New `(weight, bias)` for one writer under `config` (pure; nothing is written). With `columns`, only those input
    columns of the weight are edited (some attention heads' share of an output projection) and the bias, which no head
    owns, is left as it is (None)."""
    weight, bias = writer.read()
    if columns is not None:
        part = _ColumnView(writer.name, writer.layer, writer.kind, weight[:, columns])
        new_part, _ = edited_tensors(part, basis, config, strength)
        new_weight = weight.clone()
        new_weight[:, columns] = new_part.to(weight.dtype)
        return new_weight, None
    if config.mode == "orthogonalize":
        new_weight = orthogonalize_weight(weight, basis, strength)
        return new_weight, None if bias is None else orthogonalize_bias(bias, basis, strength)
    if config.mode == "norm_preserving":
        new_weight = norm_preserving_orthogonalize(weight, basis, strength)
        return new_weight, None if bias is None else orthogonalize_bias(bias, basis, strength)
    new_weight = amplify_weight(weight, basis, config.alpha * strength)
    new_bias = None if bias is None else orthogonalize_bias(bias, basis, -config.alpha * strength)
    if config.mode == "induce" and writer.kind == "embed":
        new_weight = new_weight + config.shift * basis[0].to(new_weight.dtype)[:, None]
    return new_weight, new_bias


@dataclass(frozen=True)
class _ColumnView:
    """A slice of a writer's weight, edited as if it were a writer without a bias."""

    name: str
    layer: int | None
    kind: str
    weight: Tensor

    def read(self) -> tuple[Tensor, None]:
        return self.weight, None


@dataclass(eq=False)  # handles are compared by identity (the stack of edits in place)
class EditHandle:
    """An applied edit: revert it exactly, or export the edited model."""

    model: ModelAdapter
    originals: dict[str, tuple[Tensor, Tensor | None]]
    record: dict = field(default_factory=dict)
    reverted: bool = False
    bias_originals: dict[str, Tensor] = field(default_factory=dict)
    """The original values of the biases a bias addition changed (`edits.add_through_biases`), by `BiasWriter` name."""
    undo: list = field(default_factory=list)
    """Run last on revert, newest first: what else the edit changed (biases it created and the config switch for them)."""
    empty: str | None = None
    """Why the edit changed no weight, when it changed none (every strength 0: a sweep's zero point); `export` refuses
    such a handle, which would write the unedited model under an edit's record."""
    vectors: dict[str, Tensor] = field(default_factory=dict)
    """The vectors the edit was made of (`direction`: the basis projected out or amplified; `by_layer.L`: a block's own;
    `vector`: what an addition added), which `export` saves as `featsteer_directions.safetensors`."""

    def __post_init__(self) -> None:
        _live_edits(self.model).append(self)

    def revert(self) -> None:
        """Restore every touched writer and bias to its original tensors (bit-identical).

        Edits revert newest first: an edit applied after this one and still in place would otherwise be half undone
        (its originals hold this edit's weights).

        Raises:
            FeatsteerError: another edit applied after this one is still in place.
        """
        if self.reverted:
            return
        live = _live_edits(self.model)
        later = live[live.index(self) + 1 :] if self in live else []
        if later:
            raise FeatsteerError(f"{len(later)} edit(s) applied after this one are still in place: revert them first (newest first)")
        writers = {w.name: w for w in self.model.residual_writers()} if self.originals else {}  # (listing them can be what failed)
        for name, (weight, bias) in self.originals.items():
            writers[name].write(weight, bias)
        if self.bias_originals:
            biases = {w.name: w for w in self.model.bias_writers()}
            for name, value in self.bias_originals.items():
                biases[name].write(value)
        for step in reversed(self.undo):
            step()
        self.reverted = True
        if self in live:
            live.remove(self)

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc) -> None:
        if not self.reverted:
            self.revert()

    def export(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the edited model as a Hugging Face directory plus `featsteer.json`.

        The directory appears only when complete; it loads with `load_model(path)` and with plain transformers
        (`AutoModelForCausalLM.from_pretrained(path)`, or the class transformers builds the architecture with, e.g.
        `AutoModelForImageTextToText` for Mistral 3). The edit's vectors go to `featsteer_directions.safetensors`.
        """
        hf_model = getattr(self.model, "model", None)
        if getattr(self.model, "is_bridge", False):  # saving it raised safetensors' shared-tensors error, thousands of characters long
            raise FeatsteerError("an edit of a TransformerBridge cannot be exported: the bridge has wrapped its Hugging Face model's modules, "
                                 "so it does not save as a plain checkpoint; load the checkpoint with load_model(path) to edit and export it")
        if self.reverted or not hasattr(hf_model, "save_pretrained") or not hasattr(hf_model, "config"):
            raise FeatsteerError("only an applied (not reverted) edit of a Hugging Face model can be exported")
        if self.empty:
            raise FeatsteerError(f"{self.empty}: exporting it would write the unedited model under an edit's record; widen a "
                                 "kernel or raise a strength")
        live = _live_edits(self.model)
        if self in live and live[-1] is not self:
            raise FeatsteerError("an edit applied after this one is still in place, so the weights are not this edit's alone: "
                                 "export the newest edit's handle (it records the ones below it) or revert the later edit first")
        earlier = [handle.record for handle in live if handle is not self]
        target = Path(path)
        check_empty_folder(target, "export folder")
        with staged_output(target) as staging:
            hf_model.save_pretrained(staging)
            with _tokenizer_as_given(self.model):
                self.model.tokenizer.save_pretrained(staging)
            stacked = {"applied_on_top_of": earlier} if earlier else {}
            saved = {}
            if self.vectors:  # the edit's own vectors, so the export can be reproduced or steered with at run time
                from safetensors.torch import save_file

                save_file({name: v.detach().to("cpu", torch.float32).contiguous() for name, v in self.vectors.items()},
                          str(staging / DIRECTIONS_FILE))
                saved = {"directions_file": DIRECTIONS_FILE}
            (staging / "featsteer.json").write_text(json_text({**self.record, **(extra or {}), **stacked, **saved,
                                                               "versions": _versions()}))
            share_files(staging)
        return target


DIRECTIONS_FILE = "featsteer_directions.safetensors"
"""Where `EditHandle.export` saves the vectors the edit was made of."""


@contextlib.contextmanager
def _tokenizer_as_given(model: ModelAdapter) -> Iterator[None]:
    """The model's tokenizer with the pad token and padding side it came with (`HFModelAdapter.tokenizer_as_given`),
    put back to the adapter's (left padding, EOS as pad when there was none) when the block ends: an export ships the
    tokenizer as it was given, not as featsteer reads batches with it."""
    tokenizer, given = model.tokenizer, getattr(model, "tokenizer_as_given", None) or {}
    current = {name: getattr(tokenizer, name) for name in given}
    try:
        for name, value in given.items():
            setattr(tokenizer, name, value)
        yield
    finally:
        for name, value in current.items():
            setattr(tokenizer, name, value)


def _live_edits(model: ModelAdapter) -> list[EditHandle]:
    """The model's edits still in place, oldest first (kept on the adapter itself)."""
    live = getattr(model, "_featsteer_live_edits", None)
    if live is None:
        live = []
        model._featsteer_live_edits = live
    return live


def _checked_basis(direction: Tensor, model: ModelAdapter, what: str = "direction", weighted: bool = False) -> Tensor:
    basis = as_basis(direction).detach().to("cpu", torch.float64)
    if basis.shape[-1] != model.d_model:
        raise FeatsteerError(f"{what} has width {basis.shape[-1]} but the model's d_model is {model.d_model}")
    return orthonormal_basis(basis, f"the {what}", weighted=weighted)


def apply_edit(model: ModelAdapter, direction: Tensor, config: EditConfig | None = None, record: dict | None = None,
               by_layer: Mapping[int, Tensor] | None = None, heads: Mapping[int, Sequence[int]] | None = None,
               weighted: bool = False) -> EditHandle:
    """Edit every residual writer of `model` against `direction` (a unit vector or orthonormal basis).

    Args:
        model: the model to edit in place.
        direction: `(d_model,)` or `(k, d_model)`.
        config: mode and per-layer strengths.
        record: provenance to keep with the handle (exported into `featsteer.json`).
        by_layer: per-layer directions: the attention and MLP writers of block `l` are edited against
            `by_layer[l]` instead of `direction` (heretic's "per layer" scope, where each block removes the
            refusal direction of the residual stream it writes into). Blocks missing from it, and the
            embedding, use `direction`.
        heads: `{layer: [head, ...]}`: edit only these attention heads' columns of their layer's attention output
            projection (each head's `d_head` inputs), and nothing else: no other head, MLP, embedding or bias. The
            edited model is the unedited one with the direction removed from those heads' writes alone (a test checks
            it against the heads' `hook_z` values). Strengths still come from `config.attn_kernel`.
        weighted: accept orthogonal rows shorter than 1 (in `direction` and `by_layer`) as a damped projector, the SVD
            method's ridge-weighted basis (`directions.weighted_basis`); otherwise every row must be unit (within 1e-2),
            so a raw vector is refused rather than partly removed.

    Returns:
        A handle that reverts the edit exactly.
    """
    config = config or EditConfig()
    basis = _checked_basis(direction, model, weighted=weighted)
    layer_bases = {int(layer): _checked_basis(d, model, f"by_layer[{layer}]", weighted) for layer, d in (by_layer or {}).items()}
    outside = sorted(layer for layer in layer_bases if not 0 <= layer < model.n_layers)
    if outside:
        raise FeatsteerError(f"by_layer names layers {outside} but the model has layers 0-{model.n_layers - 1}")
    columns = _head_columns(model, heads) if heads is not None else None
    handle = EditHandle(model, {}, {"edit": config.to_dict(), "rank": int(basis.shape[0]), **(record or {})})
    handle.vectors = {"direction": basis, **{f"by_layer.{layer}": b for layer, b in sorted(layer_bases.items())}}
    if layer_bases:
        handle.record["per_layer_directions"] = sorted(layer_bases)
    # One writer at a time: its original is kept for revert, its new tensors are computed and written, and nothing else
    # is held, so the edit needs memory for one copy of the touched weights (not two, as computing every new tensor
    # before the first write would): the new weights, the originals being the old storage the model no longer points
    # at. Whatever stops the edit once the handle is on the model's stack of edits, an error or Ctrl-C, reverts the
    # writers already edited and takes the handle off the stack: no half-edited model, and no edit that never happened
    # recorded under a later export's `applied_on_top_of`.
    try:
        if config.mode == "induce" and config.shift:  # the shift is what enters the stream: undo the model's embedding scale
            config = replace(config, shift=config.shift / _embedding_scale(model))
        retie = model.embedding_tie_undo()  # an embedding edit unties a shared output head; revert shares it again
        if retie is not None:
            handle.undo.append(retie)
        if columns is not None:
            handle.record["heads"] = {str(layer): ids for layer, ids in model.head_ids(heads).items()}
        for writer in model.residual_writers():
            if columns is not None and (writer.kind != "attn_out" or writer.layer not in columns):
                continue
            strength = config.strength(writer)
            if strength == 0 and not (config.mode == "induce" and writer.kind == "embed"):
                continue
            weight, bias = writer.read()
            check_plain_weight(writer.name, weight)
            own = layer_bases.get(writer.layer, basis) if writer.layer is not None else basis
            # a writer that replaces its parameter's storage never modifies what read() returned: that is the original
            original = (weight, bias) if writer.replaces else (weight.clone(), None if bias is None else bias.clone())
            new_weight, new_bias = edited_tensors(writer, own, config, strength, None if columns is None else columns[writer.layer])
            handle.originals[writer.name] = original
            writer.write(new_weight, new_bias)
        if not handle.originals:  # fine for a sweep's zero point; export refuses it (it would be the unedited model)
            handle.empty = (f"the edit changes no weight: every writer's strength is 0 (kernels that reach none of layers "
                            f"0-{model.n_layers - 1}{', for the heads named' if columns is not None else ''}, and "
                            "embedding_strength 0)")
    except BaseException:
        handle.revert()
        raise
    handle.record["writers"] = list(handle.originals)
    return handle


PLAIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Weight dtypes an edit can compute on and write back; anything else is a quantised format whose values mean nothing
without its scales (FP8 blocks, bitsandbytes' packed int8/uint8)."""


def check_plain_weight(name: str, weight: Tensor) -> None:
    """Raise a one-line error when a writer's weight is not plain floating point (an FP8 or bitsandbytes checkpoint): an
    edit of the stored values, cast back, would not remove the direction and says nothing."""
    if weight.dtype not in PLAIN_DTYPES:
        raise FeatsteerError(f"{name} holds {str(weight.dtype).removeprefix('torch.')} weights (a quantised checkpoint?): an edit needs "
                             "plain float16/bfloat16/float32 weights; load the model dequantized to edit it")


def _embedding_scale(model: ModelAdapter) -> float:
    """How much the stream at `hook_embed` moves per unit change of a token-embedding column (Gemma multiplies by
    sqrt(d_model), Granite by its embedding multiplier, most models by 1), read from the token whose column is longest."""
    writer = next((w for w in model.residual_writers() if w.kind == "embed"), None)
    if writer is None:
        raise FeatsteerError(f"{model.name} exposes no token embedding for the induce shift: use --reverse without --shift")
    weight = writer.read()[0].detach()
    token = int(weight.double().norm(dim=0).argmax())
    seen: list[Tensor] = []
    ids = torch.tensor([[token]], dtype=torch.long, device=model.device)
    with model.hooks([("hook_embed", lambda x, site: seen.append(x.detach()[0, -1].to("cpu", torch.float64)))]):
        model.run(TokenBatch(ids, torch.ones_like(ids)), stop_at="hook_embed")
    column = weight[:, token].to("cpu", torch.float64)
    return float(seen[0] @ column / (column @ column))


def _head_columns(model: ModelAdapter, heads: Mapping[int, Sequence[int]]) -> dict[int, Tensor]:
    """`{layer: input columns}` of the attention output projection that `heads` own, checked against the model."""
    checked = model.head_ids(heads)
    widths = {writer.layer: writer.read()[0].shape[1] for writer in model.residual_writers() if writer.kind == "attn_out" and writer.layer in checked}
    columns = {}
    for layer, ids in checked.items():
        width = widths.get(layer)
        if width is None or width % model.n_heads:
            raise FeatsteerError(f"layer {layer}'s attention output projection does not split into {model.n_heads} heads' columns "
                                 f"(width {width}): edit the whole writer instead")
        d_head = width // model.n_heads
        columns[layer] = torch.cat([torch.arange(h * d_head, (h + 1) * d_head) for h in ids])
    return columns


def _versions() -> dict:
    import transformers

    import featsteer

    return {"featsteer": getattr(featsteer, "__version__", "0.1.0"), "torch": torch.__version__, "transformers": transformers.__version__}
