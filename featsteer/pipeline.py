"""End-to-end recipes the CLI and benchmarks share: find directions, select one, abliterate.

Each recipe is a plain function over library types, so `featsteer directions`, `featsteer abliterate`,
the comparison harness and the benchmarks all run the same code on the same splits.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from featsteer.activations import Positions, capture
from featsteer.datasets import PromptSet
from featsteer.directions import DirectionSet, find_directions, rotation_plane, weighted_basis
from featsteer.directions.methods import METHODS
from featsteer.directions.optimize import OptimizeConfig
from featsteer.edits import EditConfig, EditHandle, apply_edit
from featsteer.errors import FeatsteerError
from featsteer.models import ModelAdapter, check_system

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DirectionConfig:
    """How candidate directions are found and selected."""

    method: str = "dim"
    """`dim`, `projected`, `pca` or `svd`."""
    rank: int = 2
    """Subspace size for `svd`."""
    positions: str = "post_instruction"
    """Token positions candidates are read at (`last`, `post_instruction`, `instruction_end`, `mean_last:K`)."""
    kind: str = "resid_pre"
    """Hook kind candidates are read at."""
    val_fraction: float = 0.25
    """Share of each prompt set held out for selection."""
    n_select: int = 32
    """Validation prompts per set used to score candidates."""
    kl_threshold: float = 0.1
    """KL filter of the selection (nats)."""
    top_k: int | None = 8
    """Candidates that get the KL/induce checks after the ablation scores (None: all)."""
    screen: int | None = None
    """Ablate only this many candidates exactly, those a first-order estimate ranks best (None: all; see
    `SelectionConfig.screen`)."""
    batch_size: int = 16
    """Prompts per forward pass."""
    filter_train: bool = False
    """Before computing candidates, keep only the train prompts the unedited model treats as their label says,
    by the first-token refusal score (harmful: log-odds > 0, harmless: <= 0), as Arditi et al. 2024 do, so the
    direction contrasts refusal with compliance rather than harmful topics with harmless ones. Costs one prefill
    of the train sets. On Qwen2.5-Coder-0.5B it keeps 75 of 192 harmful prompts; the same search parameters then
    lower the harmful refusal log-odds by about 0.6 at equal KL, and the search reaches 3/100 held-out refusals at
    KL 0.046 instead of 14/100 at 0.055 (`benchmarks/results/real_model_qwen_filtered.md`)."""
    layers: tuple[int, ...] | None = None
    """Read candidates at these layers only (`featsteer directions --layers`; None: every layer). The selection's
    late-layer rule (`SelectionConfig.skip_last_fraction`) counts the model's layers, not these, so a late layer named
    here is still skipped."""
    keep_every_layer: bool = False
    """With `layers`: still capture and compute candidates at every layer, and let only the selection (the ablated pass
    over the validation prompts per candidate, most of the time) keep to `layers` (`abliterate --layers`,
    `compare --layers`). The per-layer scope, the search, LEACE and the angular plane read every layer's candidate, and
    one capture pass reads them all. False (`directions --layers`): capture and compute at `layers` only."""
    system: str | None = None
    """The system prompt every prompt is formatted with: by the train filter, the capture, the selection's passes and what
    later reads the result (`DirectionResult.system`: head ranking, geometry, the trained direction, a search), as an
    evaluation with `GenerationConfig(system=...)` formats them (`featsteer directions --system`). None: no system prompt;
    a blank text is refused."""

    def __post_init__(self) -> None:
        from featsteer.directions.selection import SelectionConfig

        check_system(self.system)
        SelectionConfig(kl_threshold=self.kl_threshold, top_k=self.top_k, screen=self.screen)  # checked before anything slow runs
        if Positions.parse(self.positions).mode == "all":
            raise FeatsteerError(f"--positions {self.positions} keeps every token at its index from the start, which differs between "
                                 "prompts: read directions at last, mean_last:K, post_instruction or instruction_end")
        if self.n_select < 1:
            raise FeatsteerError(f"--n-select must be at least 1 (validation prompts per set), got {self.n_select}")
        if self.method not in METHODS:  # found only after the training prompts were captured
            raise FeatsteerError(f"unknown direction method '{self.method}': use one of {', '.join(METHODS)}")
        if self.method == "svd" and self.rank < 1:
            raise FeatsteerError(f"--rank must be at least 1 (the size of the SVD subspace), got {self.rank}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise FeatsteerError(f"layers must name at least one layer, each >= 0 (None: every layer), got {self.layers}")


@dataclass
class DirectionResult:
    """Candidates, the selection over them, and the chosen basis."""

    candidates: DirectionSet
    selection: object
    train: tuple[PromptSet, PromptSet]
    """The prompts the candidates were computed from (after `DirectionConfig.filter_train`, when on)."""
    val: tuple[PromptSet, PromptSet]
    timings: dict = field(default_factory=dict)
    activations: tuple | None = field(default=None, repr=False)
    """With `find_refusal_direction(..., keep_activations=True)`: the `(harmful, harmless)` `ActivationSet`s of the
    training prompts at every `config.kind` hook, which another method's `find_refusal_direction(..., reuse=...)` or
    a LEACE fit can use instead of capturing them again."""
    capture_key: tuple | None = None
    """What `activations` depend on (hook kind, positions, train filter, split and the input prompts' hashes)."""

    @property
    def system(self) -> str | None:
        """The system prompt the candidates were found and selected with (`DirectionConfig.system`, kept in their
        provenance), which every later pass over this result's prompts formats them with too."""
        return self.candidates.provenance.get("system")

    @property
    def chosen_basis(self):
        """The selected `(k, d_model)` basis (ridge-weighted for `svd`)."""
        return weighted_basis(self.candidates, self.selection.chosen.index)

    @property
    def chosen(self) -> DirectionSet:
        """The selected direction as a one-entry `DirectionSet`.

        With the training activations kept (`keep_activations=True`) and a rank-1 direction, its provenance also
        holds what the affine and angular interventions need: `ace` (each captured hook's harmful and harmless mean
        projected on the direction, see `affine_references`) and `rotation_axis` (the second axis of
        `directions.rotation_plane`, when the layers' directions differ)."""
        i = self.selection.chosen.index
        c = self.candidates
        provenance = {**c.provenance, "selection": self.selection.to_dict()["chosen"]}
        if self.activations is not None and c.rank == 1:
            harmless, harmful = self.affine_references()
            provenance["ace"] = {"harmless": harmless, "harmful": harmful}
            with contextlib.suppress(FeatsteerError):  # every layer's direction parallel: no plane to turn in
                provenance["rotation_axis"] = rotation_plane(c, i)[1].tolist()
        return DirectionSet(c.bases[i : i + 1], (c.hook_names[i],), (c.positions[i],), c.method,
                            {k: [v[i]] for k, v in c.scores.items()}, provenance)

    def affine_references(self) -> tuple[dict[str, float], dict[str, float]]:
        """`(harmless, harmful)`: hook name -> that class's mean training activation, at the chosen position,
        projected on the chosen unit direction, for every captured hook (what `interventions.AffineEdit` reads).

        Raises:
            FeatsteerError: without kept activations or for a rank-k direction.
        """
        if self.activations is None or self.candidates.rank != 1:
            raise FeatsteerError("affine references need a rank-1 direction found with keep_activations=True")
        harmful_acts, harmless_acts = self.activations
        index = self.selection.chosen.index
        r = self.candidates.bases[index, 0].double()
        position = self.candidates.positions[index]
        hooks = harmless_acts.hook_names
        return ({hook: float(harmless_acts.mean(hook, position) @ r) for hook in hooks},
                {hook: float(harmful_acts.mean(hook, position) @ r) for hook in hooks})

    def mean_difference_length(self, model: ModelAdapter) -> float:
        """Length of the harmful-minus-harmless mean at the chosen hook and position (what `dim_actadd_induce` and
        `abliterate --induce-bias` add, times their scale): from the candidates' `mean_diff_norm` score when they have
        one (DIM), else `mean_difference`."""
        lengths = self.candidates.scores.get("mean_diff_norm")
        if lengths is not None:
            return float(lengths[self.selection.chosen.index])
        return float(self.mean_difference(model).norm())

    def mean_difference(self, model: ModelAdapter, *, fresh: bool = False, batch_size: int = 16) -> torch.Tensor:
        """Harmful-minus-harmless mean of the training prompts at the chosen hook and position (float64): from the kept
        activations when there are any and `fresh` is False, else from a capture of the training prompts at the positions
        the direction was found at, through `model` as it is now (edits and hooks included)."""
        hook, position = self.selection.chosen.hook, self.candidates.positions[self.selection.chosen.index]
        if self.activations is not None and not fresh:
            harmful, harmless = self.activations
            return harmful.mean(hook, position) - harmless.mean(hook, position)
        selector = self.capture_key[2] if self.capture_key is not None else DirectionConfig().positions  # (model, kind, positions, ...)
        means = [capture(model, prompts, [hook], positions=selector, batch_size=batch_size, label=label, system=self.system).mean(hook, position)
                 for prompts, label in zip(self.train, ("harmful", "harmless"), strict=True)]
        return means[0] - means[1]

    def writing_heads(self, model: ModelAdapter, n_prompts: int = 128, batch_size: int = 16) -> list[tuple[int, int, float]]:
        """`(layer, head, difference)` of every attention head that writes the chosen direction more on the harmful than
        on the harmless training prompts (the first `n_prompts` of each), most first: `directions.head_attribution` at
        the chosen position. What `heads_of` turns into `apply_edit(heads=...)` / `abliterate(heads=...)`.

        Raises:
            FeatsteerError: for a rank-k direction, or a model whose attention output is normalised before the stream.
        """
        from featsteer.directions.geometry import head_attribution

        if self.candidates.rank != 1:
            raise FeatsteerError("head attribution needs a rank-1 direction")
        index = self.selection.chosen.index
        r, position = self.candidates.bases[index, 0], self.candidates.positions[index]
        harmful, harmless = (list(prompts.head(min(n_prompts, len(prompts)))) for prompts in self.train)
        heads = head_attribution(model, harmful, harmless, r, position, batch_size=batch_size, system=self.system)
        return [(layer, head, a - b) for layer, head, a, b in heads.top(model.n_layers * model.n_heads) if a - b > 0]

    def geometry(self, model: ModelAdapter, k: int = 10, head_prompts: int | None = 128, repair_prompts: int | None = 64,
                 reader_prompts: int | None = 64, reader_layers: bool | str = True,
                 held_out: tuple[PromptSet, PromptSet] | None = None):
        """The chosen direction's `directions.DirectionGeometry`: the cosines between every layer's candidate at the
        chosen position, each captured hook's class means on the direction, its logit lens (top `k` tokens), and
        the top three tokens of every layer's own direction. With `head_prompts` (the first N training prompts of
        each class; None skips it), also which attention heads write the direction (`head_attribution`), except on
        models whose attention output is normalised before the stream. With `repair_prompts` (the first N validation
        prompts of each class; None skips it), also what the later layers write back when the direction is ablated at
        its own hook only (`directions.repair.self_repair`). With `reader_prompts` (the first N validation prompts of each
        class; None skips it), also which readers of the stream refusal goes through: the direction removed from each
        block's attention and MLP input and from the unembedding's (`directions.readers.direction_readers`), each block's
        two readers on their own too unless `reader_layers` is False (then 6 conditions instead of `2 + 2 * n_layers`);
        `reader_layers="estimate"` gives those per-block rows as first-order estimates from one gradient pass instead.
        The sample-size rows (`sample_sizes`) are None with fewer than 4 training prompts in a class.
        With `held_out` (`(harmful, harmless)` prompts), the self-repair and the read-side ablation read its first N
        prompts instead of the validation prompts: the direction was selected on those, so its refusal log-odds there
        are biased by the pick (on the organism +4.06 unedited there against +3.23 on held-out prompts).
        `read_on` on the result says which prompts they were.

        Raises:
            FeatsteerError: without kept activations or for a rank-k direction.
        """
        from featsteer.directions.geometry import (
            DirectionGeometry,
            LogitLens,
            class_projections,
            head_attribution,
            layer_cosines,
            logit_lenses,
        )

        if self.activations is None or self.candidates.rank != 1:
            raise FeatsteerError("direction geometry needs a rank-1 direction found with keep_activations=True")
        index = self.selection.chosen.index
        r, position = self.candidates.bases[index, 0], self.candidates.positions[index]
        hooks, cosines = layer_cosines(self.candidates, position)
        own = {hook: self.candidates.direction(hook, position) for hook in hooks}
        read = [hook for hook in hooks if float(own[hook].norm()) > 0]  # a zero direction has no tokens
        *per_layer, chosen_lens = logit_lenses(model, torch.stack([own[hook] for hook in read] + [r]), max(k, 3))
        lenses = dict.fromkeys(hooks)
        lenses.update({hook: LogitLens(lens.promoted[:3], lens.suppressed[:3]) for hook, lens in zip(read, per_layer, strict=True)})
        chosen_lens = LogitLens(chosen_lens.promoted[:k], chosen_lens.suppressed[:k])
        heads = None
        if head_prompts and not model.post_norms:
            harmful, harmless = (list(prompts.head(min(head_prompts, len(prompts)))) for prompts in self.train)
            heads = head_attribution(model, harmful, harmless, r, position, system=self.system)
        hook = self.candidates.hook_names[index]
        prompts = held_out if held_out is not None else self.val
        repair, readers = self._read_side(model, r, hook, prompts, repair_prompts, reader_prompts, reader_layers)
        read_on = None
        if prompts is not None and (repair is not None or readers is not None):
            n = max(count for count, figure in ((repair_prompts, repair), (reader_prompts, readers)) if figure is not None)
            read = [p.head(min(n, len(p))) for p in prompts]  # the prompts actually read, so the hashes name them
            read_on = {"prompts": "validation" if held_out is None else "held-out", "harmful": prompts[0].source,
                       "harmless": prompts[1].source, "n_harmful": len(read[0]), "n_harmless": len(read[1]),
                       "harmful_sha256": read[0].sha256, "harmless_sha256": read[1].sha256}
        from featsteer.directions.sample_size import MIN_PROMPTS

        enough = min(len(activations) for activations in self.activations) >= MIN_PROMPTS  # else no sample-size estimate
        return DirectionGeometry(hook, position, hooks, cosines, class_projections(*self.activations, r, position), chosen_lens,
                                 lenses, heads, repair, readers, self.sample_sizes() if enough else None, read_on)

    def _read_side(self, model: ModelAdapter, r: torch.Tensor, hook: str, prompts: tuple[PromptSet, PromptSet] | None,
                   repair_prompts: int | None, reader_prompts: int | None, reader_layers: bool | str) -> tuple:
        """`geometry`'s `(self_repair, direction_readers)` of `r` at `hook` on the first N of `prompts` (each None when
        skipped: no prompts, N None, or a hook self-repair does not apply to)."""
        if prompts is None:
            return None, None
        repair = readers = None
        if repair_prompts and model.hook_site(hook).kind in ("resid_pre", "resid_mid"):
            from featsteer.directions.repair import self_repair

            harmful, harmless = (list(p.head(min(repair_prompts, len(p)))) for p in prompts)
            if min(len(harmful), len(harmless)) >= 2:
                repair = self_repair(model, r, harmful, harmless, at=hook, system=self.system)
        if reader_prompts:
            from featsteer.directions.readers import direction_readers

            harmful, harmless = (list(p.head(min(reader_prompts, len(p)))) for p in prompts)
            readers = direction_readers(model, r, harmful, harmless, per_layer=reader_layers, system=self.system)
        return repair, readers

    def sample_sizes(self, draws: int = 32, seed: int = 0, hooks: Sequence[str] | None = None) -> list:
        """How precisely every captured hook's DIM direction at the chosen position is estimated from the training
        prompts, and how many prompts per class a cosine of 0.9 / 0.95 / 0.99 with the many-prompt direction needs
        (`directions.sample_size`, with a split-half check over `draws` random splits); `hooks` keeps only those.

        Raises:
            FeatsteerError: without kept activations, or with fewer than 4 training prompts per class.
        """
        from featsteer.directions.sample_size import sample_size

        if self.activations is None:
            raise FeatsteerError("the sample-size estimate needs the training activations: find the direction with keep_activations=True")
        harmful, harmless = self.activations
        position = self.candidates.positions[self.selection.chosen.index]
        return [sample_size(harmful.at_position(hook, position), harmless.at_position(hook, position), hook=hook, position=position,
                            draws=draws, seed=seed) for hook in (hooks or harmful.hook_names)]


def split(prompts: PromptSet, val_fraction: float) -> tuple[PromptSet, PromptSet]:
    """Deterministic train/val split: the last `val_fraction` of the set is validation."""
    n_val = max(1, int(round(len(prompts) * val_fraction)))
    if len(prompts) - n_val < 2:
        raise FeatsteerError(f"{prompts.source} has only {len(prompts)} prompts: need at least {n_val + 2} to split")
    return prompts[: len(prompts) - n_val], prompts[len(prompts) - n_val :]


def find_refusal_direction(model: ModelAdapter, harmful: PromptSet, harmless: PromptSet, config: DirectionConfig | None = None,
                           val: tuple[PromptSet, PromptSet] | None = None, *, keep_activations: bool = False,
                           reuse: DirectionResult | None = None) -> DirectionResult:
    """Capture train activations at every layer (or `config.layers`), compute candidates, select one on validation prompts.

    Args:
        model: the model.
        harmful: harmful prompts; without `val`, the last `config.val_fraction` of them is held out for selection.
        harmless: harmless prompts, split the same way.
        config: how candidates are found and selected.
        val: explicit `(harmful, harmless)` validation prompts for the selection (and for a later search's
            proxy); then `harmful`/`harmless` are used whole for the directions. Use it when the split would
            hand the selection prompts the model was trained on: their KL is too optimistic (on the
            organism, first-token KL of one ablation is 0.04 on its training prompts and 0.12 on unseen ones).
        keep_activations: keep the captured training activations on the result (`result.activations`).
        reuse: an earlier result on the same prompts, hook kind, positions, split and train filter, found with
            `keep_activations=True`: its training prompts and activations are used instead of filtering and
            capturing again (what `compare` does for its several direction methods). Only the method, rank and
            selection settings may differ.

    Raises:
        FeatsteerError: too few prompts, or a `reuse` result that was found on other prompts or settings.
    """
    from featsteer.directions.selection import SelectionConfig, select_direction

    config = config or DirectionConfig()
    if val is None:
        harmful_train, harmful_val = split(harmful, config.val_fraction)
        harmless_train, harmless_val = split(harmless, config.val_fraction)
    else:
        (harmful_train, harmless_train), (harmful_val, harmless_val) = (harmful, harmless), val
        for name, prompts in (("harmful", harmful_train), ("harmless", harmless_train), ("harmful validation", harmful_val),
                              ("harmless validation", harmless_val)):
            if len(prompts) < 2:
                raise FeatsteerError(f"the {name} prompt set has {len(prompts)} prompts: need at least 2")
    _check_labels_apart((harmful_train, harmful_val), (harmless_train, harmless_val), val_given=val is not None)
    if config.method == "svd" and config.rank > min(len(harmful_train), model.d_model):  # before the capture, not after it
        raise FeatsteerError(f"--rank {config.rank} is more than the SVD of {len(harmful_train)} harmful training prompts in "
                             f"{model.d_model} dimensions can give ({min(len(harmful_train), model.d_model)}): lower --rank or add prompts")
    key = (model.name, config.kind, config.positions, config.filter_train, None if val is not None else config.val_fraction,
           harmful.sha256, harmless.sha256, config.layers, config.keep_every_layer, config.system)
    listed = training_layers(model, config)  # a layer list the model or the selection cannot use fails before any forward pass
    start = time.perf_counter()
    if reuse is not None:
        if reuse.activations is None:
            raise FeatsteerError("reuse= needs a result found with keep_activations=True (it holds no activations)")
        if reuse.capture_key != key:
            raise FeatsteerError("reuse= was found on other prompts or settings (hook kind, positions, split, train filter, "
                                 "layers or system prompt); only the method, rank and selection settings may differ")
        (harmful_train, harmless_train), (harmful_acts, harmless_acts) = reuse.train, reuse.activations
        kept = reuse.candidates.provenance.get("train_filter", {})
        filtered = time.perf_counter()
    else:
        (harmful_train, harmless_train), (harmful_acts, harmless_acts), kept, filtered = capture_training(
            model, harmful_train, harmless_train, config)
    captured = time.perf_counter()
    candidates = find_directions(harmful_acts, harmless_acts, config.method, config.rank)
    candidates.provenance.update({"harmful": harmful.source, "harmful_sha256": harmful_train.sha256,
                                  "harmless": harmless.source, "harmless_sha256": harmless_train.sha256,
                                  "n_harmful_train": len(harmful_train), "n_harmless_train": len(harmless_train),
                                  **({"system": config.system} if config.system is not None else {}),  # absent: none
                                  **({"train_filter": kept} if kept else {}),
                                  **({"layers": list(config.layers)} if config.layers is not None else {})})
    found = time.perf_counter()
    selection = select_direction(
        model, candidates, harmful_val.head(min(config.n_select, len(harmful_val))), harmless_val.head(min(config.n_select, len(harmless_val))),
        SelectionConfig(kl_threshold=config.kl_threshold, batch_size=config.batch_size, top_k=config.top_k,
                        screen=config.screen, layers=None if listed is None else tuple(listed), system=config.system),
        base=None if reuse is None else getattr(reuse.selection, "base", None),  # the unedited figures, when on the same prompts
    )
    timings = {**({"filter_s": filtered - start} if kept and reuse is None else {}), "capture_s": captured - filtered,
               "directions_s": found - captured, "selection_s": time.perf_counter() - found, **({"reused_capture": True} if reuse else {})}
    return DirectionResult(candidates, selection, (harmful_train, harmless_train), (harmful_val, harmless_val), timings,
                           (harmful_acts, harmless_acts) if keep_activations else None, key)


def _check_labels_apart(harmful: tuple[PromptSet, PromptSet], harmless: tuple[PromptSet, PromptSet], *, val_given: bool) -> None:
    """Refuse a prompt that is both harmful and harmless (the same file passed twice, or sets that share rows): DIM and
    the other contrasts read it on both sides, so the direction shrinks toward zero and the selection scores it both
    ways. Warn when explicit validation prompts are also training prompts: the selection is then not held out on them.

    Args:
        harmful: the harmful `(train, validation)` prompts.
        harmless: the harmless `(train, validation)` prompts.
        val_given: whether the validation prompts were given (a split of one set never shares a prompt with its rest).

    Raises:
        FeatsteerError: naming how many prompts both sets hold and one of them.
    """
    harmless_prompts = {*harmless[0], *harmless[1]}
    shared = [prompt for prompt in dict.fromkeys([*harmful[0], *harmful[1]]) if prompt in harmless_prompts]
    if shared:
        raise FeatsteerError(f"{len(shared)} prompt{'s are' if len(shared) > 1 else ' is'} in both the harmful and the harmless "
                             f"prompts (e.g. {shared[0][:60]!r}): a prompt is one or the other; remove it from one set")
    if not val_given:
        return
    for name, (train, validation) in (("harmful", harmful), ("harmless", harmless)):
        train_prompts = set(train)
        reused = sum(prompt in train_prompts for prompt in validation)
        if reused:
            logger.warning("%d of the %d %s validation prompts (%s) are also training prompts (%s), so the selection is not held "
                           "out on them: give validation prompts the training set does not hold (e.g. builtin:KIND:val beside "
                           "builtin:KIND:train)", reused, len(validation), name, validation.source, train.source)


def warn_reused_held_out(held: tuple[PromptSet, PromptSet], seen: Sequence[tuple[PromptSet, PromptSet]], reading: str,
                         called: str = "held-out") -> dict[str, int]:
    """Warn when prompts given as held out are also prompts the direction was found or selected on.

    Args:
        held: the held-out `(harmful, harmless)` prompts.
        seen: `(harmful, harmless)` pairs the direction was fitted or selected on (training, validation).
        reading: what reads the held-out prompts, for the warning ("the before/after check").
        called: what the warning calls them ("evaluation" in `compare`).

    Returns:
        `{"harmful": n, "harmless": n}`, the held-out prompts also found in `seen`.
    """
    counts = {}
    for i, kind in enumerate(("harmful", "harmless")):
        used = {prompt for pair in seen for prompt in pair[i]}
        counts[kind] = sum(prompt in used for prompt in held[i])
        if counts[kind]:
            logger.warning("%d of the %d %s %s prompts (%s) are also training or validation prompts, so %s is not held "
                           "out on them: give prompts the direction was not found or selected on (e.g. builtin:KIND:test)",
                           counts[kind], len(held[i]), kind, called, held[i].source, reading)
    return counts


def training_layers(model: ModelAdapter, config: DirectionConfig) -> list[int] | None:
    """`config.layers` in order (None: every layer), checked against the model and the selection's late-layer rule.

    Raises:
        FeatsteerError: for a layer the model does not have, or layers that are all in the last
            `SelectionConfig.skip_last_fraction` of the model's layers, which the selection skips.
    """
    from featsteer.directions.selection import SelectionConfig, is_late_layer, late_layer_start

    if config.layers is None:
        return None
    layers = sorted(set(config.layers))
    if layers[-1] >= model.n_layers:
        raise FeatsteerError(f"layers {layers} name layer {layers[-1]} but {model.name} has {model.n_layers} layers (0..{model.n_layers - 1})")
    skip = SelectionConfig().skip_last_fraction
    max_layer = late_layer_start(model.n_layers, skip)
    if all(is_late_layer(model, hook, skip) for hook in model.hook_names((config.kind,), layers)):
        raise FeatsteerError(f"layers {layers} are all in the last {skip:.0%} of {model.name}'s {model.n_layers} layers, which the "
                             f"selection skips (directions there mostly encode the next token): include a layer below {max_layer}")
    return layers


def capture_training(model: ModelAdapter, harmful_train: PromptSet, harmless_train: PromptSet, config: DirectionConfig) -> tuple:
    """The training half of `find_refusal_direction`: the train filter (when `config.filter_train`), then one capture
    of each set at every `config.kind` hook and `config.positions`.

    Returns:
        `((harmful_train, harmless_train), (harmful_acts, harmless_acts), filter_counts, time_after_filter)`.
    """
    kept: dict = {}
    if config.filter_train:
        total = len(harmful_train)
        harmful_train, harmless_train, kept = filter_by_refusal(model, harmful_train, harmless_train, config.batch_size, config.system)
        if config.method == "svd" and config.rank > min(len(harmful_train), model.d_model):  # checked again before the capture
            raise FeatsteerError(f"--rank {config.rank} is more than the SVD of the {len(harmful_train)} harmful training prompts the "
                                 f"train filter kept (of {total}) can give: lower --rank, add prompts or drop --filter-train")
    filtered = time.perf_counter()
    hooks = model.hook_names((config.kind,), None if config.keep_every_layer else training_layers(model, config))
    acts = tuple(capture(model, prompts, hooks, positions=config.positions, batch_size=config.batch_size, label=label, system=config.system)
                 for prompts, label in ((harmful_train, "harmful"), (harmless_train, "harmless")))
    return (harmful_train, harmless_train), acts, kept, filtered


def filter_by_refusal(model: ModelAdapter, harmful: PromptSet, harmless: PromptSet,
                      batch_size: int = 16, system: str | None = None) -> tuple[PromptSet, PromptSet, dict]:
    """The harmful prompts the model refuses and the harmless ones it does not, by the first-token refusal score, the
    prompts formatted with `system` (None: no system prompt).

    Returns:
        `(harmful_kept, harmless_kept, counts)`; `counts` records kept and total per set for provenance.

    Raises:
        FeatsteerError: when fewer than 2 prompts of a set survive (the model refuses too few harmful, or too
            many harmless, prompts for a direction that contrasts the two behaviours).
    """
    from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, refusal_score

    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    out, counts = [], {}
    for name, prompts, refused in (("harmful", harmful, True), ("harmless", harmless, False)):
        scores = refusal_score(first_token_logprobs(model, prompts.to_list(), batch_size=batch_size, system=system), tokens)
        keep = (scores > 0) if refused else (scores <= 0)
        index = [i for i, k in enumerate(keep.tolist()) if k]
        if len(index) < 2:
            behaviour = "refuses" if refused else "answers"
            raise FeatsteerError(f"the unedited model {behaviour} only {len(index)} of {len(prompts)} {name} train prompts "
                                 f"(first-token refusal score): the train filter needs at least 2; add prompts or turn filter_train off")
        categories = None if prompts.categories is None else tuple(prompts.categories[i] for i in index)
        out.append(PromptSet(tuple(prompts.prompts[i] for i in index), f"{prompts.source} (refusal-filtered)", categories))
        counts[name] = {"kept": len(index), "total": len(prompts)}
        logger.info("train filter: kept %d of %d %s prompts", len(index), len(prompts), name)
    return out[0], out[1], counts


@dataclass(frozen=True)
class IteratedBasis:
    """The directions of iterative refinement (`iterated_basis`), first the selected one."""

    basis: torch.Tensor
    """`(passes, d_model)` orthonormal rows, in the order they were found."""
    gaps: tuple[float, ...]
    """Length of the harmful-minus-harmless mean difference at the chosen hook and position before each pass's
    direction was taken: the unedited model's, then what is left once the earlier directions are edited out."""
    hook: str
    position: int

    def to_dict(self) -> dict:
        return {"passes": int(self.basis.shape[0]), "gaps": list(self.gaps), "hook": self.hook, "position": self.position}


def iterated_basis(model: ModelAdapter, result: DirectionResult, passes: int, edit: EditConfig | None = None,
                   batch_size: int = 16) -> IteratedBasis:
    """Iterative refinement of a rank-1 direction: with the directions so far edited out of the weights (`apply_edit`
    with `edit`), the training prompts are captured again at the chosen hook and position, and what is left of the
    harmful-minus-harmless mean difference (made orthogonal to the directions so far) is the next direction. A rank-k
    `apply_edit` of the returned basis removes them all at once. Stops early when the difference left is zero (a
    model whose harm signal was one direction). The model is left unedited.

    Raises:
        FeatsteerError: for a rank-k result, fewer than 1 pass, or an `edit` that amplifies instead of removing.
    """
    if edit is not None and edit.mode in ("amplify", "induce"):  # the next direction would be what is left once the earlier are amplified
        raise FeatsteerError(f"iterative refinement takes each next direction with the earlier ones edited out, and mode "
                             f"'{edit.mode}' amplifies them: refine with passes=1 here, or with an orthogonalize/norm_preserving edit")
    if result.candidates.rank != 1:
        raise FeatsteerError("iterative refinement starts from a rank-1 direction: use a dim, projected, pca or probe method")
    if passes < 1:
        raise FeatsteerError(f"passes must be at least 1, got {passes}")
    chosen = result.selection.chosen
    hook, position = chosen.hook, result.candidates.positions[chosen.index]
    rows = [result.chosen_basis[0].double()]
    rows[0] = rows[0] / rows[0].norm()
    gaps = [float(result.mean_difference(model, batch_size=batch_size).norm())]
    for _ in range(passes - 1):
        basis = torch.stack(rows)
        with apply_edit(model, basis.float(), edit or EditConfig()):
            left = result.mean_difference(model, fresh=True, batch_size=batch_size)
        for _ in range(2):  # twice: one Gram-Schmidt sweep leaves rounding along the earlier rows
            left = left - basis.T @ (basis @ left)
        gaps.append(float(left.norm()))
        if gaps[-1] <= 1e-6 * max(gaps[0], 1e-12):
            logger.info("iterative refinement: nothing left of the mean difference after %d passes", len(rows))
            break
        rows.append(left / left.norm())
    return IteratedBasis(torch.stack(rows).float(), tuple(gaps), hook, int(position))


def heads_of(ranked: Sequence[tuple[int, int, float]] | Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """`{layer: [head, ...]}` of `(layer, head, ...)` rows, in their order (`DirectionResult.writing_heads()[:n]`)."""
    heads: dict[int, list[int]] = {}
    for layer, head, *_ in ranked:
        heads.setdefault(int(layer), []).append(int(head))
    return heads


def direction_record(result: DirectionResult) -> dict:
    """What an export's `featsteer.json` says of the direction an edit started from: method, the chosen hook and position,
    the candidates' provenance (prompt-set hashes, model) and the selection's row for it."""
    chosen = result.selection.chosen
    return {
        "method": result.candidates.method,
        "direction_hook": chosen.hook,
        "direction_position": chosen.position,
        "provenance": result.candidates.provenance,
        "selection": result.selection.to_dict()["chosen"],
    }


def abliterate(model: ModelAdapter, result: DirectionResult, edit: EditConfig | None = None, scope: str = "global",
               heads: Mapping[int, Sequence[int]] | None = None, passes: int = 1,
               optimize: OptimizeConfig | None = None) -> EditHandle:
    """Apply the selected direction as a weight edit; the handle reverts or exports it.

    Args:
        model: the model to edit.
        result: candidates and selection from `find_refusal_direction`.
        edit: mode and per-layer strengths.
        scope: `global` (every writer removes the selected direction) or `per_layer` (the writers of block `l`
            remove the candidate of the stream they write into, `resid_pre` `l + 1` or `resid_post` `l`, at the selected
            position, the embedding the selected direction; rank-1 methods, resid_pre/resid_post candidates only).
        heads: edit only these attention heads' output columns (`{layer: [head, ...]}`, e.g.
            `heads_of(result.writing_heads(model)[:8])`), nothing else; global scope only.
        passes: more than 1: iterative refinement (`iterated_basis`), the selected direction and up to `passes - 1`
            more, each the mean difference left once the earlier ones are edited out, removed together; global scope,
            every writer, rank-1 methods only.
        optimize: train the selected direction first (`directions.optimize.optimize_direction`, refusal direction
            optimisation) and edit with the trained one; global scope, every writer, rank-1 methods only.
    """
    chosen = result.selection.chosen
    record = {**direction_record(result), "scope": scope}
    by_layer = None
    if scope == "per_layer":
        # imported here because featsteer.search imports this module
        from featsteer.search import check_per_layer_kind, layer_directions, per_layer_directions

        kind = model.hook_site(chosen.hook).kind
        check_per_layer_kind(kind)
        by_layer = per_layer_directions(layer_directions(result.candidates, chosen.position, kind), model.n_layers, kind)
    elif scope != "global":
        raise FeatsteerError(f"unknown abliteration scope '{scope}': use global or per_layer")
    if heads is not None and by_layer is not None:
        raise FeatsteerError("heads= edits single heads against the chosen direction: it takes scope='global'")
    basis, weighted = result.chosen_basis, True  # the SVD method's ridge-weighted basis; the refined and trained ones are unit
    if passes != 1:
        if by_layer is not None or heads is not None:
            raise FeatsteerError("passes= refines the direction of a global edit of every writer: drop scope='per_layer' and heads=")
        found = iterated_basis(model, result, passes, edit)
        basis, record["iteration"], weighted = found.basis, found.to_dict(), False
    if optimize is not None:
        from featsteer.directions.optimize import optimize_direction

        if by_layer is not None or heads is not None or passes != 1:
            raise FeatsteerError("optimize= trains the direction of a global edit of every writer: drop scope='per_layer', heads= and passes=")
        if edit is not None and edit.mode in ("amplify", "induce"):
            raise FeatsteerError(f"optimize= trains a direction to be removed, and mode '{edit.mode}' amplifies it: drop optimize=, or "
                                 "use an orthogonalize/norm_preserving edit")
        trained = optimize_direction(model, result, optimize)
        basis, record["optimization"], weighted = trained.direction[None], trained.to_dict(), False
    return apply_edit(model, basis, edit or EditConfig(), record=record, by_layer=by_layer, heads=heads, weighted=weighted)
