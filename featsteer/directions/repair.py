"""Does the model write a removed direction back? Self-repair after ablating at one layer.

Abliteration removes a direction from every residual write, because removing it once is not enough: later layers
read what is left and may write the direction again (the "Hydra effect", McGrath et al. 2023, which OBLITERATUS calls
self-repair). `self_repair` measures how much. It ablates the direction at one hook only (every position, the
prompt and the generated tokens alike) and reads, at every later layer, how far apart the harmful and harmless
prompts still are:

- on the ablated direction itself (`gap_on_r`): zero just after the ablation, so whatever is there later was
  written by the layers in between. Unedited, those layers add `gap_later - removed` to the `removed` gap that
  was at the hook; if they wrote the same with the direction gone, the gap later would be `gap_later - removed`.
  `repaired` is what they write beyond that, as a share of `removed`: 1 puts the whole removed gap back, 0 is no
  repair, and a negative share means they write less of it once it is gone (they had been amplifying it). It is None
  ("n/a") when `removed` is under `MIN_REMOVED_SHARE` of the unedited gap at the later hook: the share then divides a
  difference of two large gaps by a small one and reads their noise many times over;
- on that layer's own difference-in-means direction (`gap_on_own`), which is where the later layers read refusal.

Both gaps are also given unedited and with the direction ablated at every residual write, and the harmful prompts'
first-token refusal log-odds (`featsteer.evaluation.refusal_score`) under all three. A single-hook ablation whose
later gaps come back near their unedited size, and whose refusal score barely moves, is a model that repairs itself;
one whose gaps stay near the every-write figures is not.

The per-layer directions and gaps are read on the prompts given, last token; the directions are fitted on the same
prompts they are read on, so the unedited gaps are somewhat optimistic, but every condition is read against the same
directions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from featsteer.directions.directions import unit
from featsteer.errors import FeatsteerError

if TYPE_CHECKING:
    from featsteer.models import ModelAdapter

CONDITIONS = ("unedited", "at_hook", "every_write")
"""The three runs: no edit, the direction ablated at one hook, the direction ablated at every residual write."""

MIN_REMOVED_SHARE = 0.1
"""`RepairRow.repaired` is reported only where the removed gap is at least this share of the unedited gap at the later
hook: below it the ratio amplifies that gap's noise more than tenfold."""


@dataclass(frozen=True)
class RepairRow:
    """One later hook: harmful minus harmless mean projection, per condition."""

    hook: str
    own_cosine: float
    """Cosine of this hook's own DIM direction with the ablated one."""
    gap_on_r: dict[str, float]
    """`{condition: harmful mean - harmless mean}` of the projections on the ablated direction."""
    gap_on_own: dict[str, float]
    """The same on this hook's own DIM direction (fitted on the unedited activations)."""
    removed: float
    """The unedited gap on the ablated direction at the ablation hook: what the one-hook ablation took away."""

    @property
    def repaired(self) -> float | None:
        """What the layers in between write back on `r` beyond their unedited writing, as a share of `removed`; None
        when that share is not meaningful (`repaired_note` says why): nothing removed, or a removed gap under
        `MIN_REMOVED_SHARE` of the unedited gap here."""
        if self.repaired_note is not None:
            return None
        without_repair = self.gap_on_r["unedited"] - self.removed
        return (self.gap_on_r["at_hook"] - without_repair) / self.removed

    @property
    def repaired_note(self) -> str | None:
        """Why `repaired` is None, or None when it is a number."""
        if abs(self.removed) <= 1e-9:
            return "the ablation removed no gap at its hook"
        if abs(self.removed) < MIN_REMOVED_SHARE * abs(self.gap_on_r["unedited"]):
            return (f"the removed gap {self.removed:.2f} is under {MIN_REMOVED_SHARE:.0%} of the unedited gap "
                    f"{self.gap_on_r['unedited']:.2f} here")
        return None

    def repaired_text(self) -> str:
        """`repaired` to two places with its sign, or `n/a (<why>)`."""
        return f"n/a ({self.repaired_note})" if self.repaired is None else f"{self.repaired:+.2f}"

    @property
    def kept(self) -> float:
        """`gap_on_own` with the one-hook ablation as a share of the unedited gap (NaN when that is ~0)."""
        base = self.gap_on_own["unedited"]
        return self.gap_on_own["at_hook"] / base if abs(base) > 1e-9 else math.nan


@dataclass(frozen=True)
class SelfRepair:
    """What ablating a direction at one hook leaves at every later hook, next to ablating it everywhere."""

    at: str
    """The hook the direction was ablated at, alone."""
    rows: tuple[RepairRow, ...]
    refusal: dict[str, float]
    """`{condition: mean first-token refusal log-odds on the harmful prompts}`."""
    n_harmful: int
    n_harmless: int

    def to_dict(self) -> dict:
        """JSON-ready form (each row with its `kept` share)."""
        return {"at": self.at, "refusal": self.refusal, "n_harmful": self.n_harmful, "n_harmless": self.n_harmless,
                "rows": [{**asdict(row), "kept": row.kept, "repaired": row.repaired, "repaired_note": row.repaired_note}
                         for row in self.rows]}

    def markdown(self) -> str:
        """A table per later hook, then the refusal scores."""
        removed = self.rows[0].removed if self.rows else math.nan
        lines = [f"Ablated at `{self.at}` only (removing a gap of {removed:.2f} on r there), against no edit and against every "
                 f"residual write ({self.n_harmful} harmful / {self.n_harmless} harmless prompts, last token):", "",
                 "| hook | cosine own vs r | gap on r: unedited / at hook / every write | repaired | gap on own: unedited / at hook / every write | kept |",
                 "|---|---:|---|---:|---|---:|"]
        for row in self.rows:
            on_r = " / ".join(_two_places(row.gap_on_r[c]) for c in CONDITIONS)
            own = " / ".join(_two_places(row.gap_on_own[c]) for c in CONDITIONS)
            kept = "-" if math.isnan(row.kept) else f"{row.kept:.2f}"
            repaired = "n/a" if row.repaired is None else f"{row.repaired:+.2f}"
            lines.append(f"| {row.hook} | {row.own_cosine:.3f} | {on_r} | {repaired} | {own} | {kept} |")
        if any(row.repaired is None for row in self.rows):
            lines += ["", f"`repaired` is n/a where the removed gap is under {MIN_REMOVED_SHARE:.0%} of the unedited gap on r at "
                      "that hook (or zero): the share would divide their noise by a small number."]
        scores = ", ".join(f"{c.replace('_', ' ')} {self.refusal[c]:+.2f}" for c in CONDITIONS)
        lines += ["", f"Refusal log-odds on the harmful prompts' first token: {scores}."]
        return "\n".join(lines)


def _two_places(value: float) -> str:
    """`value` to two decimals, a float-noise -0.003 as 0.00 rather than -0.00."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def self_repair(model: ModelAdapter, direction: Tensor, harmful: Sequence[str], harmless: Sequence[str], *, at: str,
                batch_size: int = 16, system: str | None = None) -> SelfRepair:
    """Ablate `direction` at the hook `at` alone and measure what the later layers write back (module docstring).

    Args:
        model: the model.
        direction: `(d_model,)` direction (made unit), e.g. the chosen DIM direction.
        harmful: harmful prompts (chat-formatted as everywhere else).
        harmless: harmless prompts.
        at: a residual-stream hook, e.g. the chosen direction's `blocks.L.hook_resid_pre`; the gaps are read at every
            later layer's `resid_pre` and after the last layer (`resid_post`).
        batch_size: prompts per forward pass.
        system: the system prompt the prompts are formatted with (None: none).

    Raises:
        FeatsteerError: a direction of the wrong width, a hook that is not on the residual stream or has no later
            layer, or fewer than 2 prompts in a set.
    """
    from featsteer.activations import capture
    from featsteer.directions.dim import difference_in_means
    from featsteer.evaluation.metrics import RefusalTokens, first_token_logprobs, refusal_score
    from featsteer.interventions import Ablate, steer

    if direction.ndim != 1 or direction.shape[0] != model.d_model:
        raise FeatsteerError(f"self_repair needs one direction of d_model={model.d_model} entries, got shape {tuple(direction.shape)}")
    if len(harmful) < 2 or len(harmless) < 2:
        raise FeatsteerError(f"self_repair needs at least 2 prompts per set, got {len(harmful)} harmful and {len(harmless)} harmless")
    site = model.hook_site(at)
    if site.kind not in ("resid_pre", "resid_mid", "resid_post") or site.layer is None:
        raise FeatsteerError(f"{at} is not on the residual stream: ablate at a blocks.L.hook_resid_pre/_mid/_post hook")
    first = site.layer + 1
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(first, model.n_layers)] + [f"blocks.{model.n_layers - 1}.hook_resid_post"]
    if site.kind == "resid_post" and site.layer == model.n_layers - 1:
        raise FeatsteerError(f"{at} is after the last layer: nothing follows it to repair anything")
    r = unit(direction.detach().double().cpu())
    # ablate the unit vector (a shorter one removed only part of the component); a unit input as given, bit for bit
    ablated = direction.float() if abs(float(direction.detach().double().norm()) - 1.0) <= 1e-6 else r.float()
    tokens = RefusalTokens.for_tokenizer(model.tokenizer)
    conditions = {"unedited": None, "at_hook": Ablate(ablated, where=[at]), "every_write": Ablate(ablated)}
    acts, refusal = {}, {}
    for name, intervention in conditions.items():
        with steer(model, intervention) if intervention is not None else contextlib.nullcontext():
            acts[name] = [capture(model, list(prompts), [at, *hooks], positions="last", batch_size=batch_size, label=label, progress=False,
                                  system=system)
                          for label, prompts in (("harmful", harmful), ("harmless", harmless))]
            refusal[name] = float(refusal_score(first_token_logprobs(model, list(harmful), batch_size=batch_size, system=system), tokens).mean())
    own = difference_in_means(*acts["unedited"], hooks)
    removed = float(acts["unedited"][0].at_position(at, -1).double().mean(0) @ r - acts["unedited"][1].at_position(at, -1).double().mean(0) @ r)
    rows = []
    for hook in hooks:
        own_r = unit(own.direction(hook, -1).double().cpu())

        def gap(name: str, vector: Tensor, hook=hook) -> float:
            a, b = (s.at_position(hook, -1).double() @ vector for s in acts[name])
            return float(a.mean() - b.mean())

        rows.append(RepairRow(hook, float(own_r @ r), {c: gap(c, r) for c in conditions}, {c: gap(c, own_r) for c in conditions}, removed))
    return SelfRepair(at, tuple(rows), refusal, len(harmful), len(harmless))

