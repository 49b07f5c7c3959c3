"""What a refusal direction looks like, four ways a researcher reads it.

- `layer_cosines`: how the direction turns across layers (cosine between the rank-1 candidates of every layer at
  one position). A block of high cosines is one direction carried through those layers; a drop is where the model
  rewrites it.
- `class_projections`: where each class sits on the direction at every captured hook: the harmful and harmless mean
  projections and their gap in pooled standard deviations. Ablation moves every activation to 0 on the direction,
  ACE to the harmless mean, so these numbers say how far each edit moves each class.
- `logit_lens`: the tokens whose logits a step along the direction raises and lowers most when the unembedding reads
  it directly (`direct_logits`: through the final norm's gain, as the SAE feature report reads decoder rows), as
  Arditi et al. (2024) read the refusal direction. On a model whose
  direction really is "refusal", the promoted tokens open refusals ("I", "Sorry", "cannot").
- `head_attribution`: which attention heads write the direction, and how much more on harmful prompts.

`DirectionResult.geometry()` bundles them for the chosen direction; `featsteer directions` writes them to
`geometry.{md,json}` and `layer_cosines.png`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from featsteer.directions.directions import DirectionSet, unit
from featsteer.directions.sample_size import SampleSize, sample_size_table
from featsteer.errors import FeatsteerError

if TYPE_CHECKING:
    from featsteer.activations import ActivationSet
    from featsteer.directions.readers import DirectionReaders
    from featsteer.directions.repair import SelfRepair
    from featsteer.models import ModelAdapter

_UNEMBED_CHUNK = 16384
"""Vocabulary rows per matrix product in `direct_logits` (a float32 copy of a 150k x 896 unembedding is 540 MB)."""


def final_norm_gain(model: ModelAdapter) -> Tensor:
    """Per-dimension gain `(d_model,)` of the model's final norm (its weight; `1 + weight` for Gemma; ones without one).

    The norm is treated as a black box: for a zero-mean vector `v` of +-1 entries, RMSNorm and LayerNorm
    both give `gain * v (+ bias)`, so `(norm(v) - norm(-v)) / 2v` is the gain whatever the family.
    """
    _, norm = model.unembed()
    pattern = torch.tensor([1.0, -1.0]).repeat(model.d_model // 2 + 1)[: model.d_model]
    if model.d_model % 2:
        pattern[-3:] = torch.tensor([1.0, 1.0, -2.0])  # keep the mean at zero for an odd width
    rms = float(pattern.pow(2).mean().sqrt())
    probe = pattern.to(model.device, model.dtype)[None, None, :]
    with torch.inference_mode():
        difference = (norm(probe) - norm(-probe)).float().cpu()[0, 0]
    return difference * rms / (2 * pattern)


def final_norm_centres(model: ModelAdapter) -> bool:
    """True when the final norm removes its input's mean (a LayerNorm): it then maps a constant vector to what it
    maps zero to, where an RMSNorm maps it to its gain."""
    _, norm = model.unembed()
    probe = torch.stack([torch.ones(model.d_model), torch.zeros(model.d_model)]).to(model.device, model.dtype)[None]
    with torch.inference_mode():
        out = norm(probe).float()[0]
    return bool(torch.allclose(out[0], out[1], atol=1e-3))


def direct_logits(model: ModelAdapter, vectors: Tensor) -> Tensor:
    """What the unembedding reads from `(n, d_model)` vectors added to the last residual stream: `W_U (gain * v)`,
    with `v` centred first when the final norm is a LayerNorm. Float32 `(n, vocab)` on the CPU.

    This is the first-order effect at an activation of unit RMS; only the order and sign of the values carry over
    between models.
    """
    unembedding, _ = model.unembed()
    rows = vectors.detach().float().cpu()
    if final_norm_centres(model):
        rows = rows - rows.mean(-1, keepdim=True)
    rows = (rows * final_norm_gain(model)).to(unembedding.device, unembedding.dtype)
    with torch.inference_mode():
        chunks = [(rows @ unembedding[i : i + _UNEMBED_CHUNK].detach().T).float().cpu()
                  for i in range(0, unembedding.shape[0], _UNEMBED_CHUNK)]
    return torch.cat(chunks, dim=-1)


def token_text(tokenizer, token_id: int) -> str:
    """A token decoded on its own; its raw vocabulary entry when decoding gives only replacement characters
    (a fragment of a multi-byte character)."""
    text = tokenizer.decode([token_id])
    if text and set(text) == {"\ufffd"}:
        return str(tokenizer.convert_ids_to_tokens(token_id))
    return text


def layer_cosines(directions: DirectionSet, position: int = -1) -> tuple[list[str], Tensor]:
    """Cosine similarity between the rank-1 directions of every hook at `position`.

    Returns:
        `(hooks, matrix)`: the hooks in the set's order and their `(n, n)` float64 cosine matrix (1 on the diagonal;
        0 in the row and column of a zero direction, such as layer 0's when every prompt starts the same way).

    Raises:
        FeatsteerError: for a rank-k set or a position the set has no direction at.
    """
    if directions.rank != 1:
        raise FeatsteerError(f"layer cosines need rank-1 directions, got rank {directions.rank}")
    rows = [i for i, p in enumerate(directions.positions) if p == position]
    if not rows:
        raise FeatsteerError(f"no direction at position {position}: the set has positions {sorted(set(directions.positions))}")
    vectors = directions.bases[rows, 0].double()
    norms = vectors.norm(dim=-1, keepdim=True)
    units = torch.where(norms > 0, vectors / norms.clamp_min(1e-300), torch.zeros_like(vectors))
    matrix = units @ units.T
    matrix.fill_diagonal_(1.0)
    return [directions.hook_names[i] for i in rows], matrix


@dataclass(frozen=True)
class ClassProjection:
    """One hook's classes on a direction."""

    hook: str
    harmful_mean: float
    """Mean projection of the harmful activations on the unit direction."""
    harmless_mean: float
    gap_sd: float
    """`(harmful_mean - harmless_mean) / pooled sd` of the projections (0 when both are constant, as at a layer where
    every prompt's token is the same)."""


def class_projections(harmful: ActivationSet, harmless: ActivationSet, direction: Tensor, position: int = -1,
                      hooks: Sequence[str] | None = None) -> list[ClassProjection]:
    """Each hook's harmful and harmless mean projection on `direction` (made unit), at one position.

    Raises:
        FeatsteerError: when the direction's width does not match the activations'.
    """
    r = unit(direction.double())
    if r.shape[-1] != harmful.d_model:
        raise FeatsteerError(f"the direction has {r.shape[-1]} entries but the activations have d_model {harmful.d_model}")
    rows = []
    for hook in hooks or harmful.hook_names:
        a = harmful.at_position(hook, position).double() @ r
        b = harmless.at_position(hook, position).double() @ r
        pooled = ((a.var(unbiased=False) * len(a) + b.var(unbiased=False) * len(b)) / (len(a) + len(b))).sqrt()
        scale = 1.0 + float(a.abs().mean() + b.abs().mean())
        gap = float((a.mean() - b.mean()) / pooled) if pooled > 1e-9 * scale else 0.0  # constant: rounding, not a gap
        rows.append(ClassProjection(hook, float(a.mean()), float(b.mean()), gap))
    return rows


@dataclass(frozen=True)
class LogitLens:
    """The tokens a direction raises and lowers most when read by the unembedding."""

    promoted: list[tuple[str, float]]
    """`(token text, logit change)` for the `k` largest changes, largest first."""
    suppressed: list[tuple[str, float]]
    """The `k` most negative changes, most negative first."""

    def to_dict(self) -> dict:
        return {"promoted": [list(t) for t in self.promoted], "suppressed": [list(t) for t in self.suppressed]}

    def line(self, n: int = 6) -> str:
        """`promotes 'I', ' sorry', ...; suppresses 'Sure', ...` for the first `n` of each."""
        promoted = ", ".join(repr(t) for t, _ in self.promoted[:n])
        suppressed = ", ".join(repr(t) for t, _ in self.suppressed[:n])
        return f"promotes {promoted}; suppresses {suppressed}"


def logit_lens(model: ModelAdapter, direction: Tensor, k: int = 10) -> LogitLens:
    """Read `direction` (made unit) through the final norm's gain and the unembedding (`direct_logits`): the `k`
    tokens whose logits a step along it raises most and the `k` it lowers most.

    Raises:
        FeatsteerError: when the direction's width is not the model's `d_model`, or `k` is not positive.
    """
    if direction.dim() != 1 or direction.shape[0] != model.d_model:
        raise FeatsteerError(f"the direction has shape {tuple(direction.shape)} but the model's d_model is {model.d_model}")
    return logit_lenses(model, direction[None], k)[0]


def logit_lenses(model: ModelAdapter, directions: Tensor, k: int = 10) -> list[LogitLens]:
    """`logit_lens` of every row of `(n, d_model)` `directions`, with one pass over the unembedding for all of them."""
    if k < 1:
        raise FeatsteerError(f"k must be at least 1, got {k}")
    changes = direct_logits(model, torch.stack([unit(row.float()) for row in directions]))
    k = min(k, changes.shape[-1])
    top, bottom = torch.topk(changes, k), torch.topk(-changes, k)

    def scored(values: Tensor, ids: Tensor, sign: float) -> list[tuple[str, float]]:
        return [(token_text(model.tokenizer, int(i)), sign * float(v)) for v, i in zip(values, ids, strict=True)]

    return [LogitLens(scored(top.values[n], top.indices[n], 1.0), scored(bottom.values[n], bottom.indices[n], -1.0))
            for n in range(len(directions))]


@dataclass
class DirectionGeometry:
    """`layer_cosines`, `class_projections` and `logit_lens` of one chosen direction."""

    hook: str
    position: int
    hooks: list[str]
    cosines: Tensor
    """`(n, n)` cosines between every hook's direction at the chosen position (see `layer_cosines`)."""
    projections: list[ClassProjection]
    lens: LogitLens
    layer_lenses: dict[str, LogitLens | None] | None = None
    """The logit lens of every hook's own direction at the chosen position (None for a zero direction): where along
    the layers the direction starts to read as the tokens it ends up writing."""
    heads: HeadAttribution | None = None
    """What each attention head writes along the direction, per class (None for models whose heads do not add up)."""
    repair: SelfRepair | None = None
    """What the later layers write back when the direction is ablated at its own hook only (`directions.repair`)."""
    readers: DirectionReaders | None = None
    """Refusal and KL with the direction removed from what each group of readers sees (`directions.readers`)."""
    sample_sizes: list[SampleSize] | None = None
    """How precisely each hook's DIM direction at the chosen position is estimated from the training prompts
    (`directions.sample_size`)."""
    read_on: dict | None = None
    """Which prompts `repair` and `readers` were read on: `prompts` is `validation` (those the direction was selected
    on, so its refusal log-odds there are biased by the pick) or `held-out`, with each set's `harmful`/`harmless`
    source and sha256."""

    def read_on_text(self) -> str:
        """Where the self-repair and read-side ablation figures come from, in words ('' when neither was read)."""
        if self.read_on is None:
            return ""
        sources = f"{self.read_on['harmful']}, {self.read_on['harmless']}"
        if self.read_on["prompts"] == "held-out":
            return f"on held-out prompts ({sources})"
        return f"on the validation prompts the direction was selected on ({sources}), which the pick biases"

    def to_dict(self) -> dict:
        lenses = {hook: None if lens is None else lens.to_dict() for hook, lens in (self.layer_lenses or {}).items()}
        return {"hook": self.hook, "position": self.position, "hooks": self.hooks, "cosines": self.cosines.tolist(),
                "class_projections": [asdict(p) for p in self.projections], "logit_lens": self.lens.to_dict(),
                "layer_logit_lens": lenses, "heads": None if self.heads is None else self.heads.to_dict(),
                "self_repair": None if self.repair is None else self.repair.to_dict(),
                "readers": None if self.readers is None else self.readers.to_dict(),
                "sample_sizes": None if self.sample_sizes is None else [row.to_dict() for row in self.sample_sizes],
                "read_on": self.read_on}

    def markdown(self) -> str:
        """The three views as markdown tables."""
        chosen = self.hooks.index(self.hook) if self.hook in self.hooks else None
        lines = [f"# Geometry of the chosen direction ({self.hook}, position {self.position})", "",
                 "## Logit lens", "", f"Read through the final norm and the unembedding, the direction {self.lens.line(10)}.", "",
                 "## Where each class sits on it", "",
                 "On the chosen direction; the last two columns are about each layer's own direction.", "",
                 "| hook | harmful mean | harmless mean | gap (pooled sd) | cosine with the chosen direction | its logit lens promotes |",
                 "|---|---:|---:|---:|---:|---|"]
        lenses = self.layer_lenses or {}
        for p in self.projections:
            cosine = "-" if chosen is None or p.hook not in self.hooks else f"{float(self.cosines[chosen, self.hooks.index(p.hook)]):+.3f}"
            lens = lenses.get(p.hook)
            promoted = "-" if lens is None else ", ".join(repr(t) for t, _ in lens.promoted[:3]).replace("|", "\\|")
            lines.append(f"| {p.hook} | {p.harmful_mean:+.3f} | {p.harmless_mean:+.3f} | {p.gap_sd:.2f} | {cosine} | {promoted} |")
        if self.heads is not None:
            lines += ["", "## Heads that write it", "",
                      f"Each head's write at position {self.position} projected on the direction, averaged over "
                      f"{self.heads.n_prompts[0]} harmful and {self.heads.n_prompts[1]} harmless training prompts; the 10 "
                      "heads that write it most more on harmful prompts.", "", self.heads.markdown(10).rstrip("\n")]
        if self.repair is not None:
            lines += ["", "## Does the model write it back?", "",
                      "`repaired`: what the layers after the hook write on the direction beyond what they wrote unedited, as a "
                      "share of the gap the ablation removed (0: nothing written back; negative: they write less once it is "
                      "gone; n/a where that gap is under a tenth of the unedited one at the hook read). `kept`: each later layer's own DIM gap left by the one-hook ablation, as a share of its unedited "
                      "gap." + self._read_on_sentence(), "", self.repair.markdown()]
        if self.readers is not None:
            lines += ["", "## Which components read it?", "",
                      "`share`: the drop in refusal log-odds when the direction is removed from what these readers see, as a share "
                      "of the drop when it is removed from every residual write. `blocks` is every attention and MLP input; "
                      "`unembedding` is the final norm's output, the direct path to the logits." + self._read_on_sentence(), "",
                      self.readers.markdown()]
        if self.sample_sizes:
            chosen_row = next((row for row in self.sample_sizes if row.hook == self.hook), None)
            lines += ["", "## Enough prompts?", "",
                      "How far sampling noise turns each hook's DIM direction (position "
                      f"{self.position}) from the one infinitely many prompts from the same sources would give: `signal` is "
                      "the estimated length of the population's mean difference, `spread` how far one prompt strays from its "
                      "class mean (both classes), `expected cosine` the cosine of this direction with the population's, and "
                      "the last columns how many prompts per class reach a cosine in expectation. The split-half column "
                      "(the cosine between two disjoint halves' directions, and what the noise model predicts for it) checks "
                      "the model on this data. Sampling noise only: whether the prompts are the right ones is another matter.",
                      ""] + ([f"The chosen direction, {chosen_row.line()}.", ""] if chosen_row else []) + [
                      sample_size_table(self.sample_sizes, self.hook).rstrip("\n")]
        lines += ["", "## Cosines between the layers' directions", "", "| | " + " | ".join(str(_layer(h)) for h in self.hooks) + " |",
                  "|---|" + "---:|" * len(self.hooks)]
        for hook, row in zip(self.hooks, self.cosines.tolist(), strict=True):
            lines.append(f"| {_layer(hook)} | " + " | ".join(f"{v:+.2f}" for v in row) + " |")
        return "\n".join(lines) + "\n"

    def _read_on_sentence(self) -> str:
        """' Read on ... .' for the markdown sections, or '' without `read_on`."""
        text = self.read_on_text()
        return f" Read {text}." if text else ""

    def plot(self, path) -> None:
        """The cosine matrix as a heatmap PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.hooks)
        fig, ax = plt.subplots(figsize=(min(2 + 0.35 * n, 12), min(1.6 + 0.35 * n, 11)))
        image = ax.imshow(self.cosines.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        labels = [str(_layer(h)) for h in self.hooks]
        step = max(1, n // 16)
        ax.set_xticks(range(0, n, step), labels[::step])
        ax.set_yticks(range(0, n, step), labels[::step])
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(f"cosine between layers' directions (position {self.position})")
        fig.colorbar(image, ax=ax, shrink=0.8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _layer(hook: str) -> int | str:
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else hook


@dataclass
class HeadAttribution:
    """What every attention head writes along a direction, per class: `proj[l, h]` is the mean, over a class's prompts,
    of head `h` of layer `l`'s write at one position projected on the unit direction (the output projection's bias,
    which no head owns, left out)."""

    harmful: Tensor
    """`(n_layers, n_heads)` float64 mean projections on the harmful prompts (zero rows for layers without attention
    heads, LFM2's convolution layers)."""
    harmless: Tensor
    position: int
    n_prompts: tuple[int, int]

    @property
    def difference(self) -> Tensor:
        """`harmful - harmless`: how much more each head writes the direction on harmful prompts."""
        return self.harmful - self.harmless

    def top(self, k: int = 10) -> list[tuple[int, int, float, float]]:
        """`(layer, head, harmful mean, harmless mean)` of the `k` heads with the largest difference, largest first."""
        flat = self.difference.flatten()
        order = torch.argsort(flat, descending=True)[:k].tolist()
        n = self.difference.shape[1]
        return [(i // n, i % n, float(self.harmful.flatten()[i]), float(self.harmless.flatten()[i])) for i in order]

    def to_dict(self) -> dict:
        return {"position": self.position, "n_harmful": self.n_prompts[0], "n_harmless": self.n_prompts[1],
                "harmful": self.harmful.tolist(), "harmless": self.harmless.tolist()}

    def markdown(self, k: int = 10) -> str:
        lines = ["| layer | head | harmful mean | harmless mean | difference |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {layer} | {head} | {a:+.3f} | {b:+.3f} | {a - b:+.3f} |" for layer, head, a, b in self.top(k)]
        return "\n".join(lines) + "\n"


def head_attribution(model: ModelAdapter, harmful: Sequence[str], harmless: Sequence[str], direction: Tensor,
                     position: int = -1, batch_size: int = 16, system: str | None = None) -> HeadAttribution:
    """Each attention head's write along `direction` at `position` (counted from the end of the chat-formatted
    prompt, with `system` as its system prompt), averaged over each class: which heads write the refusal direction, and
    on which prompts.

    A head's write is its `blocks.{l}.attn.hook_z` slice times its columns of the output projection, so its projection
    on `r` is `z_h . (W_O^T r)_h`; the heads' projections plus the projection's bias add up to `hook_attn_out . r`.

    Raises:
        FeatsteerError: for a direction of the wrong width, a non-negative position, an empty prompt list, or a model
            whose attention output passes through a norm before the stream (Gemma 2/3), where heads do not add up.
    """
    if model.post_norms:
        raise FeatsteerError(f"{model.family} normalises the attention output before adding it to the stream, so its heads' "
                             "writes do not add up linearly: head attribution needs a model without post-attention norms")
    if position >= 0:
        raise FeatsteerError(f"position counts from the end of the prompt (-1 is the last token), got {position}")
    if direction.dim() != 1 or direction.shape[0] != model.d_model:
        raise FeatsteerError(f"the direction has shape {tuple(direction.shape)} but the model's d_model is {model.d_model}")
    if not harmful or not harmless:
        raise FeatsteerError("head attribution needs harmful and harmless prompts: one of the lists is empty")
    r = unit(direction.double())
    readers = {}  # layer -> W_O^T r, the (n_heads * d_head,) vector each head's z is read against
    for writer in model.residual_writers():
        if writer.kind == "attn_out":
            weight = writer.read()[0].double()
            readers[writer.layer] = weight.T @ r.to(weight.device)
    n_layers, n_heads = model.n_layers, model.n_heads
    means = []
    for prompts in ([str(p) for p in harmful], [str(p) for p in harmless]):
        total = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        seen: dict[int, Tensor] = {}

        def record(z: Tensor, site, seen: dict[int, Tensor] = seen) -> None:
            seen[site.layer] = z[:, position].double()  # (batch, n_heads, d_head)

        hooks = [(f"blocks.{layer}.attn.hook_z", record) for layer in model.attention_layers]
        for start in range(0, len(prompts), batch_size):
            batch = model.tokenize(prompts[start : start + batch_size], system=system)
            with model.hooks(hooks):
                model.run(batch, last_only=True)
            for layer, z in seen.items():
                u = readers[layer].to(z.device).view(n_heads, -1)
                total[layer] += (z * u).sum(-1).sum(0).cpu()
        means.append(total / len(prompts))
    return HeadAttribution(means[0], means[1], position, (len(harmful), len(harmless)))
