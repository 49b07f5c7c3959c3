"""Fitting the condition of conditional steering (CAST, Lee et al. 2024) on labelled prompts.

`ConditionalSteer` acts on a sequence only when the cosine of its prompt's pooled activation at one hook with a
condition vector passes a threshold. This module finds the four: for each candidate hook and pooling (the mean over
the prompt's real tokens, as the paper pools, or its last token) it pools each training prompt exactly as the gate
pools while steering, takes the difference of the harmful and harmless means as the condition vector, and puts the
threshold where it best tells the two training sets apart (balanced accuracy: the mean of the share of harmful
prompts above it and the share of harmless ones at or below). The hook and pooling whose gate separates held-out
validation prompts best are chosen (on the training prompts when none are given; a model that memorised its
training prompts separates them perfectly at several hooks, which says nothing about new ones).

The gate reads the raw activations, so the threshold absorbs the part every prompt shares with the vector; a cosine
near the threshold is a prompt the gate is unsure of. `Gate.rate` reports how often it fires on other prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from featsteer.errors import FeatsteerError
from featsteer.files import json_text, write_files
from featsteer.interventions.operations import cosine_to
from featsteer.interventions.steering import POOLS, Ablate, ConditionalSteer, Intervention, pool_prompt
from featsteer.models import WRITE_KINDS, ModelAdapter

MIN_PROMPTS = 2
"""Fewest prompts per class a gate is fitted on."""


def prompt_means(model: ModelAdapter, prompts: Sequence[str], hooks: Sequence[str], *, pool: str = "mean", batch_size: int = 16,
                 system: str | None = None) -> dict[str, Tensor]:
    """Each chat-formatted prompt's activation pooled over its real tokens (`mean`) or taken at its last token (`last`),
    at each hook: `{hook: (n, d) float32}`.

    The pooling is the one `ConditionalSteer` applies on the prompt pass, on the prompt generation starts from
    (`ModelAdapter.format_prompts(for_generation=True)`), so scores computed from these rows are the scores the gate
    computes while generating.

    Raises:
        FeatsteerError: if there are no prompts or hooks, the pooling is unknown, or an activation is not finite.
    """
    if pool not in POOLS:
        raise FeatsteerError(f"unknown pool '{pool}': use one of {', '.join(POOLS)}")
    return _pooled(model, prompts, hooks, (pool,), batch_size, system)[pool]


def _pooled(model: ModelAdapter, prompts: Sequence[str], hooks: Sequence[str], pools: Sequence[str], batch_size: int,
            system: str | None) -> dict[str, dict[str, Tensor]]:
    """`prompt_means` for several (known) poolings from one forward pass per batch: `{pool: {hook: (n, d)}}`."""
    prompts, hooks = list(prompts), list(hooks)
    if not prompts:
        raise FeatsteerError("no prompts to pool activations over: pass at least one")
    if not hooks:
        raise FeatsteerError("no hook points to pool activations at: pass at least one hook name")
    last = max(hooks, key=lambda name: model.hook_site(name).order)
    out: dict[str, dict[str, Tensor]] = {pool: {} for pool in pools}

    def keep(x: Tensor, site, rows: list[int]) -> None:
        for pool, kept in out.items():
            pooled = pool_prompt(x, model.pass_attention_mask, pool).float().cpu()
            if site.name not in kept:
                kept[site.name] = pooled.new_empty((len(prompts), pooled.shape[-1]))
            kept[site.name][rows] = pooled

    # the gate pools the prompt generation starts from (for a harmony model, before the answer opening)
    for rows, batch in model.token_batches(prompts, batch_size, None, system, True, for_generation=True):
        with model.hooks([(name, lambda x, site, rows=rows: keep(x, site, rows)) for name in hooks]):
            model.run(batch, stop_at=last)
    for name, rows in ((name, rows) for kept in out.values() for name, rows in kept.items()):
        if not bool(torch.isfinite(rows).all()):
            raise FeatsteerError(f"the activations at {name} are not finite (NaN or inf) for some prompts: check the model's dtype "
                                 "(float16 overflows on some models; try --dtype float32)")
    return out


@dataclass(frozen=True)
class Gate:
    """A fitted CAST condition: fire when `cosine(pooled prompt activation at hook, vector) > threshold`."""

    hook: str
    pool: str
    vector: Tensor
    """Harmful minus harmless mean of the training prompts' pooled activations at `hook` (float32, unit length)."""
    threshold: float
    accuracy: float
    """Balanced accuracy on the prompts the choice was made on (validation prompts when given)."""
    candidates: list[dict[str, Any]] = field(default_factory=list)
    """Every candidate (hook, pool): its threshold and balanced accuracy on the training and validation prompts."""
    val_fires: dict[str, float] | None = None
    """The share of the validation harmful and harmless prompts it fired on when it was fitted (None without them)."""

    def scores(self, model: ModelAdapter, prompts: Sequence[str], *, batch_size: int = 16, system: str | None = None) -> Tensor:
        """The cosine the gate thresholds, one per prompt (read from the model as it is: call it unsteered)."""
        rows = prompt_means(model, prompts, [self.hook], pool=self.pool, batch_size=batch_size, system=system)[self.hook]
        return cosine_to(rows, self.vector)

    def rate(self, model: ModelAdapter, prompts: Sequence[str], *, batch_size: int = 16, system: str | None = None) -> float:
        """The share of `prompts` the gate fires on."""
        return float((self.scores(model, prompts, batch_size=batch_size, system=system) > self.threshold).double().mean())

    def steer(self, behaviour: Intervention, *, lookahead: bool = False) -> ConditionalSteer:
        """`behaviour` applied only to the sequences this gate fires on. With `lookahead` the gate decides in a pre-pass
        of the prompt up to its hook, so `behaviour` may also act before it (`ConditionalSteer.lookahead`)."""
        return ConditionalSteer(self.vector, self.hook, self.threshold, behaviour, pool=self.pool, lookahead=lookahead)

    def ablate(self, model: ModelAdapter, basis: Tensor, *, lookahead: bool = True, weighted: bool = False) -> ConditionalSteer:
        """Ablation of `basis` gated by this gate, for the prompts it fires on.

        With `lookahead` (the default) the gate decides in a pre-pass of each prompt up to its hook, and a prompt it fires
        on is ablated at every residual write from the embedding on: exactly the ungated ablation (which is abliteration
        as a hook), while the others run unedited. Without it the gate decides as the pass goes, so only what follows
        its decision can change: the stream at its hook (everything written before it) and every later write; layers
        before the gate keep reading the direction. A gate at layer 0 makes the two the same. `weighted` is `Ablate`'s
        (for the SVD method's ridge-weighted basis)."""
        layer = self.check(model)
        if lookahead:
            return self.steer(Ablate(basis, weighted=weighted), lookahead=True)
        return self.steer(Ablate(basis, where=[self.hook, *model.hook_names(WRITE_KINDS, range(layer, model.n_layers))], weighted=weighted))

    def to_dict(self) -> dict[str, Any]:
        """What a report records: where, how, the threshold and every candidate's accuracy (not the vector)."""
        return {"hook": self.hook, "pool": self.pool, "threshold": self.threshold, "balanced_accuracy": self.accuracy,
                "candidates": self.candidates}

    def save(self, path: str | Path) -> Path:
        """Write `gate.safetensors` (the vector) and `gate.json` (the rest) to a folder; the JSON is written last, whole."""
        # both rendered before either is written (a failed save leaves the previous gate whole), the JSON replaced last
        return write_files(path, {"gate.safetensors": safetensors_bytes({"vector": self.vector.detach().float().contiguous().cpu()}),
                                  "gate.json": json_text({**self.to_dict(), "val_fires": self.val_fires})})

    @classmethod
    def load(cls, path: str | Path) -> Gate:
        """Read a folder written by `save` (`featsteer directions --gate` writes one as `gate/`)."""
        folder = Path(path)
        if not (folder / "gate.json").is_file() or not (folder / "gate.safetensors").is_file():
            raise FeatsteerError(f"{folder} holds no gate (gate.json or gate.safetensors missing): fit one with `featsteer directions "
                                 "--gate`, which writes OUT/gate")
        try:
            meta = json.loads((folder / "gate.json").read_text())
            return cls(meta["hook"], meta["pool"], load_file(str(folder / "gate.safetensors"))["vector"], float(meta["threshold"]),
                       float(meta["balanced_accuracy"]), list(meta.get("candidates", [])), _fires(meta.get("val_fires")))
        except (ValueError, KeyError, TypeError) as error:
            raise FeatsteerError(f"{folder}/gate.json is not a gate that featsteer wrote ({type(error).__name__}: {error}): fit it again "
                                 "with `featsteer directions --gate`") from None

    def check(self, model: ModelAdapter) -> int:
        """The layer of the gate's hook on `model`; a one-line error when the hook or the vector's width does not fit it."""
        site = model.hook_site(self.hook)
        if self.vector.shape != (model.d_model,):
            raise FeatsteerError(f"the gate's vector has {self.vector.shape[-1]} dimensions but the model's stream has {model.d_model}: "
                                 "fit the gate on this model")
        return site.layer


def _fires(value: Any) -> dict[str, float] | None:
    """`val_fires` as `gate.json` holds it (None when the gate was fitted without validation prompts, or saved before
    featsteer recorded it)."""
    return None if value is None else {side: float(share) for side, share in dict(value).items()}


def gate_hooks(model: ModelAdapter, up_to: str) -> list[str]:
    """The candidate hooks of a gate for a direction read at `up_to`: every layer's input from the first to that hook's
    layer (`compare`'s conditional methods and `featsteer directions --gate` fit on these)."""
    return model.hook_names(("resid_pre",), range(model.hook_site(up_to).layer + 1))


def best_threshold(positive: Tensor, negative: Tensor) -> tuple[float, float]:
    """The threshold `t` maximising the balanced accuracy of `score > t` (positives above, negatives at or below), and
    that accuracy. Candidates are the midpoints between neighbouring distinct scores and one below the lowest; of
    equally good thresholds the lowest wins, so a tie fires rather than misses."""
    scores = torch.cat([positive, negative]).double()
    values = torch.unique(scores)
    cuts = torch.cat([values[:1] - 1.0, (values[1:] + values[:-1]) / 2])
    hits = (positive.double()[None, :] > cuts[:, None]).double().mean(1)
    rejects = (negative.double()[None, :] <= cuts[:, None]).double().mean(1)
    balanced = (hits + rejects) / 2
    index = int(torch.argmax(balanced))  # the first maximum: the lowest threshold
    return float(cuts[index]), float(balanced[index])


def fit_gate(model: ModelAdapter, harmful: Sequence[str], harmless: Sequence[str], hooks: Sequence[str], *,
             pools: Sequence[str] = POOLS, val: tuple[Sequence[str], Sequence[str]] | None = None, batch_size: int = 16,
             system: str | None = None) -> Gate:
    """Fit a CAST condition per candidate hook and pooling on labelled prompts, and choose one (see the module
    docstring); ties go to the earliest hook, then to the first pooling in `pools`.

    Args:
        model: the model, unsteered.
        harmful: training prompts the gate should fire on.
        harmless: training prompts it should leave alone.
        hooks: candidate hook names (a gate steers only hooks at or after its own).
        pools: poolings to try (`mean`, `last`).
        val: `(harmful, harmless)` prompts to choose the hook and pooling on; None chooses on the training prompts.
        batch_size: prompts per forward pass.
        system: optional system prompt.

    Raises:
        FeatsteerError: with fewer than `MIN_PROMPTS` prompts in a set, no hooks, an unknown pooling, or class means
            that coincide at every candidate.
    """
    harmful, harmless = list(harmful), list(harmless)
    sets = [("training", harmful, harmless)] + ([("validation", list(val[0]), list(val[1]))] if val is not None else [])
    for label, positive, negative in sets:
        if min(len(positive), len(negative)) < MIN_PROMPTS:
            raise FeatsteerError(f"a gate needs at least {MIN_PROMPTS} harmful and {MIN_PROMPTS} harmless {label} prompts, got "
                                 f"{len(positive)} and {len(negative)}")
    if not pools or any(p not in POOLS for p in pools):
        raise FeatsteerError(f"pools must be a non-empty choice of {', '.join(POOLS)}, got {list(pools)}")
    hooks = sorted(hooks, key=lambda h: model.hook_site(h).order)
    prompts = [p for _, positive, negative in sets for p in positive + negative]
    pooled = _pooled(model, prompts, hooks, pools, batch_size, system)
    n_train, n_val_harmful = len(harmful) + len(harmless), len(sets[1][1]) if val is not None else 0
    candidates, gates = [], []
    for pool in pools:
        for name in hooks:
            rows = pooled[pool][name]
            train = rows[:n_train].double()
            vector = train[: len(harmful)].mean(0) - train[len(harmful):].mean(0)
            if not float(vector.norm()) > 0.0:
                continue
            vector = (vector / vector.norm()).float()
            scores = cosine_to(rows, vector)
            threshold, train_accuracy = best_threshold(scores[: len(harmful)], scores[len(harmful): n_train])
            row = {"hook": name, "pool": pool, "threshold": threshold, "train_balanced_accuracy": train_accuracy}
            accuracy, fires = train_accuracy, None
            if val is not None:
                held = scores[n_train:].double() > threshold
                fires = {"harmful": float(held[:n_val_harmful].double().mean()), "harmless": float(held[n_val_harmful:].double().mean())}
                accuracy = (fires["harmful"] + 1.0 - fires["harmless"]) / 2
                row["val_balanced_accuracy"] = accuracy
            candidates.append(row)
            gates.append(Gate(name, pool, vector, threshold, accuracy, val_fires=fires))
    if not gates:
        raise FeatsteerError("the harmful and harmless prompts have the same mean activation at every candidate hook: no gate can tell them apart")
    order = {name: index for index, name in enumerate(hooks)}
    chosen = min(gates, key=lambda g: (-g.accuracy, order[g.hook], list(pools).index(g.pool)))
    return Gate(chosen.hook, chosen.pool, chosen.vector, chosen.threshold, chosen.accuracy, candidates, chosen.val_fires)
