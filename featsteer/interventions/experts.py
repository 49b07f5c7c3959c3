"""Mixture-of-experts routing: which experts a behaviour uses, and steering by switching experts off or on.

SteerMoE (Fayyaz et al. 2025) finds the experts a behaviour leans on by how much more often the router picks them on
one set of prompts than on a contrasting set (the risk difference of the two selection rates), then changes the router's
choice at run time. featsteer reads the choice at `blocks.{l}.mlp.hook_routing`, the `(batch, pos, n_experts)` matrix of
routing weights the experts receive (zero where the router did not pick an expert), and can change it there or one step
earlier, at `blocks.{l}.mlp.hook_router_logits`, the router's scores before it chooses. Every supported MoE family
exposes both (Llama 4's experts read inputs the router's dense scores have already weighted; its routing hook is those
scores).

`ExpertSteer(at="router_logits")` is SteerMoE's own intervention: per token, a deactivated expert's logit is set just
below the token's lowest (the token's minimum minus 0.01) and an activated expert's just above its highest (maximum plus
0.01), and the router then chooses by its own rule. A deactivated expert is replaced by the next one in the router's
order, so each token keeps its number of experts, and the weights are the router's own (softmax over the changed
logits, renormalised or scaled as the family does). SteerMoE shifts log-softmax values; a softmax is unchanged by a
shift of all logits, so on softmax routers this is the same rule. On sigmoid routers (DeepSeek V3, GLM-4.5, dots.llm1)
it is the same rule applied to the raw logits, and a group-limited router still chooses the groups first. A router that
adds a per-expert correction bias to its choice can override the rule; the choice is checked at `hook_routing` and a
router that did not obey is an error.

`ExpertSteer(at="routing")` (the default) works on the weights, after the router has chosen:
- deactivating an expert gives it weight zero; with `renormalize` the token's other experts are scaled up so its total
  routing weight is unchanged. The token is served by one expert fewer, since the scores of experts the router did not
  pick never reach the experts.
- activating an expert gives it the token's largest weight, as a router score raised above all others would, and the
  token's lowest-weighted expert makes room so each token keeps its number of experts; then the weights are
  renormalised as above.
Deactivating without `renormalize` is exactly the model with that expert's output projection zeroed (a test checks it).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from featsteer.activations.capture import common_tail
from featsteer.activations.positions import Positions
from featsteer.errors import FeatsteerError
from featsteer.interventions.steering import Intervention
from featsteer.models import ModelAdapter, hook_name
from featsteer.models.adapter import EncodedPrompts


@dataclass(frozen=True)
class ExpertScore:
    """One expert of one MoE layer, with its selection rates on the two prompt sets."""

    layer: int
    expert: int
    harmful_rate: float
    """Fraction of the harmful prompts' tokens (at the chosen positions) routed to this expert."""
    harmless_rate: float
    risk_difference: float
    """`harmful_rate - harmless_rate`: positive for an expert the harmful prompts use more."""
    ci: tuple[float, float]
    """95% percentile bootstrap interval of the risk difference, resampling prompts (a prompt's tokens move together)."""
    harmful_weight: float
    """Mean routing weight the harmful tokens give it (zero where it was not picked)."""
    harmless_weight: float


@dataclass(frozen=True)
class ExpertRouting:
    """How often each expert of each MoE layer is picked on harmful and on harmless prompts (`expert_routing`)."""

    layers: tuple[int, ...]
    """The MoE layers, in order; row `i` of every matrix is layer `layers[i]`."""
    prompt_counts: tuple[Tensor, Tensor] = field(repr=False)
    """Per prompt of the harmful and of the harmless set, `(n_prompts, len(layers), n_experts)` tokens routed to each
    expert (the intervals resample these rows)."""
    prompt_tokens: tuple[Tensor, Tensor] = field(repr=False)
    """Per prompt of each set, the tokens read."""
    harmful_weights: Tensor
    """`(len(layers), n_experts)` summed routing weights on the harmful set."""
    harmless_weights: Tensor
    positions: str
    """Which prompt tokens were read (`activations.Positions` syntax)."""
    n_boot: int = 1000
    """Bootstrap resamples of the intervals (seeded: reports reproduce)."""

    @property
    def harmful_counts(self) -> Tensor:
        """`(len(layers), n_experts)` tokens of the harmful set routed to each expert."""
        return self.prompt_counts[0].sum(0)

    @property
    def harmless_counts(self) -> Tensor:
        return self.prompt_counts[1].sum(0)

    @property
    def n_tokens(self) -> tuple[int, int]:
        """Tokens read on the harmful and on the harmless set."""
        return int(self.prompt_tokens[0].sum()), int(self.prompt_tokens[1].sum())

    @property
    def n_experts(self) -> int:
        return int(self.prompt_counts[0].shape[2])

    @property
    def harmful_rate(self) -> Tensor:
        return self.harmful_counts / max(self.n_tokens[0], 1)

    @property
    def harmless_rate(self) -> Tensor:
        return self.harmless_counts / max(self.n_tokens[1], 1)

    @property
    def risk_difference(self) -> Tensor:
        """`(len(layers), n_experts)` harmful minus harmless selection rate."""
        return self.harmful_rate - self.harmless_rate

    @functools.cached_property
    def risk_difference_ci(self) -> tuple[Tensor, Tensor]:
        """`(low, high)`, each `(len(layers), n_experts)`: the 95% percentile bootstrap interval of the risk difference,
        resampling each set's prompts with replacement (tokens of one prompt are not independent draws). Prompts with no
        token read (`all:N` past their end) are left out: they add nothing to a rate, and a resample of them alone has none."""
        generator = torch.Generator().manual_seed(0)
        rates = []
        for counts, tokens in zip(self.prompt_counts, self.prompt_tokens, strict=True):
            counts, tokens = counts[tokens > 0], tokens[tokens > 0]
            n = tokens.shape[0]
            picks = torch.randint(n, (self.n_boot, n), generator=generator)
            weights = torch.zeros(self.n_boot, n, dtype=torch.float64).scatter_add_(1, picks, torch.ones(self.n_boot, n, dtype=torch.float64))
            rates.append((weights @ counts.flatten(1)) / (weights @ tokens)[:, None])
        difference = (rates[0] - rates[1]).view(self.n_boot, len(self.layers), self.n_experts)
        return torch.quantile(difference, 0.025, dim=0), torch.quantile(difference, 0.975, dim=0)

    def ranked(self, toward: str = "harmful") -> list[ExpertScore]:
        """Every expert, most `toward`-linked first (`harmful`: largest risk difference; `harmless`: most negative)."""
        if toward not in ("harmful", "harmless"):
            raise FeatsteerError(f"unknown side '{toward}': rank experts toward 'harmful' or 'harmless'")
        tokens = [max(n, 1) for n in self.n_tokens]
        harmful, harmless = self.harmful_rate.flatten().tolist(), self.harmless_rate.flatten().tolist()
        rd = self.risk_difference.flatten()
        low, high = (bound.flatten().tolist() for bound in self.risk_difference_ci)
        weights = [(w / n).flatten().tolist() for w, n in zip((self.harmful_weights, self.harmless_weights), tokens, strict=True)]
        order = torch.argsort(rd if toward == "harmful" else -rd, descending=True, stable=True).tolist()
        return [ExpertScore(self.layers[i // self.n_experts], i % self.n_experts, harmful[i], harmless[i], harmful[i] - harmless[i],
                            (low[i], high[i]), weights[0][i], weights[1][i]) for i in order]

    def leaning(self, toward: str = "harmful") -> list[ExpertScore]:
        """The experts routed more often on the `toward` prompts (a risk difference of that sign, not zero), most first."""
        return [score for score in self.ranked(toward) if (score.risk_difference > 0) == (toward == "harmful") and score.risk_difference != 0]

    def top(self, n: int, toward: str = "harmful") -> dict[int, list[int]]:
        """`{layer: [expert, ...]}` of the `n` most `toward`-linked experts with a risk difference of that sign."""
        chosen: dict[int, list[int]] = {}
        for score in self.leaning(toward)[:n]:
            chosen.setdefault(score.layer, []).append(score.expert)
        return chosen

    def to_dict(self, top_n: int = 20) -> dict:
        """JSON-ready summary: sizes, the full rate matrices and the `top_n` experts toward each side (those leaning that way,
        as `featsteer experts` prints them)."""
        return {
            "layers": list(self.layers), "n_experts": self.n_experts, "positions": self.positions,
            "n_tokens_harmful": self.n_tokens[0], "n_tokens_harmless": self.n_tokens[1],
            "harmful_rate": self.harmful_rate.tolist(), "harmless_rate": self.harmless_rate.tolist(),
            "top_harmful": [vars(s) for s in self.leaning("harmful")[:top_n]],
            "top_harmless": [vars(s) for s in self.leaning("harmless")[:top_n]],
        }


def expert_routing(model: ModelAdapter, harmful: Sequence[str], harmless: Sequence[str], positions: str = "all",
                   batch_size: int = 16, system: str | None = None) -> ExpertRouting:
    """Count, per MoE layer, how often the router picks each expert on the harmful and on the harmless prompts.

    Args:
        model: a mixture-of-experts model (`model.moe_layers` not empty).
        harmful, harmless: instructions, formatted through the chat template.
        positions: the prompt tokens to read: `all` (every token; `all:N` from token N), `last`, `post_instruction`
            (the template's tail after the instruction, as many tokens as every prompt of both sets has) or
            `instruction_end`.
        batch_size: prompts per forward pass.
        system: optional system prompt.

    Raises:
        FeatsteerError: on a dense model, an empty prompt set, or unknown positions.
    """
    if not model.moe_layers:
        raise FeatsteerError(f"{model.name} has no mixture-of-experts layers whose routing featsteer can read "
                             f"({model.family}); expert routing needs an MoE model such as Mixtral, Qwen3-MoE or GPT-OSS")
    if not harmful or not harmless:
        raise FeatsteerError("expert routing needs harmful and harmless prompts: one of the sets is empty")
    selector = Positions.parse(positions)
    if selector.mode == "mean_last":
        raise FeatsteerError("positions 'mean_last' averages tokens, and routing is counted per token: use last, all, "
                             "post_instruction or instruction_end")
    names = model.hook_names(("routing",))
    # each set tokenized once: its batches are padded from these ids, and the tail is read off them
    encoded = [model.encode_prompts(list(texts), system, True, None) for texts in (harmful, harmless)]
    # one tail for both sets: every prompt reads the same template tokens, whichever prompts share its batch
    tail = (common_tail(model, [*harmful, *harmless], system, True, [n for e in encoded for n in e.n_post_instruction])
            if selector.mode == "post_instruction" else None)
    sides = [_count(model, ids, names, selector, batch_size, tail) for ids in encoded]
    (hp, hw, ht), (lp, lw, lt) = sides
    for name, tokens in (("harmful", ht), ("harmless", lt)):
        if float(tokens.sum()) == 0:
            raise FeatsteerError(f"no token of the {name} prompts was read at positions '{selector}' (all:N past every prompt?): "
                                 "nothing to count")
    return ExpertRouting(tuple(model.moe_layers), (hp, lp), (ht, lt), hw, lw, str(selector))


def _count(model: ModelAdapter, encoded: EncodedPrompts, names: list[str], selector: Positions, batch_size: int,
           tail: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """`(per-prompt counts, summed weights, per-prompt tokens)` of one prompt set, in input-order batches padded from its
    one encoding (`ModelAdapter.encode_prompts`)."""
    n_prompts = len(encoded.input_ids)
    prompt_counts = torch.zeros(n_prompts, len(names), model.n_experts, dtype=torch.float64)
    weights = torch.zeros(len(names), model.n_experts, dtype=torch.float64)
    prompt_tokens = torch.zeros(n_prompts, dtype=torch.float64)
    row = {name: i for i, name in enumerate(names)}
    for start in range(0, n_prompts, batch_size):
        batch = model.pad_encoded(encoded, range(start, min(start + batch_size, n_prompts)))
        row_batch, row_token, _ = selector.plan(batch.attention_mask.cpu(), batch.n_post_instruction, tail)
        prompt_tokens.index_add_(0, start + row_batch, torch.ones(row_batch.numel(), dtype=torch.float64))

        def tally(x: Tensor, site, row_batch=row_batch, row_token=row_token, start=start) -> None:
            picked = selector.select(x, row_batch, row_token).detach().to("cpu", torch.float64)
            prompt_counts[:, row[site.name]].index_add_(0, start + row_batch, (picked != 0).double())
            weights[row[site.name]] += picked.sum(0)

        with model.hooks([(name, tally) for name in names]):
            model.run(batch, stop_at=names[-1])  # nothing past the last MoE layer is needed
    return prompt_counts, weights, prompt_tokens


@dataclass
class ExpertSteer(Intervention):
    """Switch experts off (`deactivate`) or on (`activate`) at chosen MoE layers, for every token (see the module
    docstring for what each does to the routing weights)."""

    deactivate: Mapping[int, Sequence[int]] = field(default_factory=dict)
    """`{layer: [expert, ...]}` the router may not use."""
    activate: Mapping[int, Sequence[int]] = field(default_factory=dict)
    """`{layer: [expert, ...]}` every token is routed to."""
    renormalize: bool = True
    """At `routing`: keep each token's total routing weight (the remaining experts are scaled up)."""
    at: str = "routing"
    """`routing`: change the weights after the router's choice; `router_logits`: change the router's logits before it
    chooses, SteerMoE's rule (see the module docstring)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "deactivate", _layer_map(self.deactivate, "deactivate"))
        object.__setattr__(self, "activate", _layer_map(self.activate, "activate"))
        if self.at not in EXPERT_STEER_SITES:
            raise FeatsteerError(f"unknown ExpertSteer site '{self.at}': use at='routing' (the weights after the router's choice) or "
                                 "at='router_logits' (the router's logits, SteerMoE)")
        if self.at == "router_logits" and not self.renormalize:
            raise FeatsteerError("renormalize=False applies to at='routing': at='router_logits' the router weighs its choice itself")
        both = {(layer, e) for layer, experts in self.deactivate.items() for e in experts}
        both &= {(layer, e) for layer, experts in self.activate.items() for e in experts}
        if both:
            raise FeatsteerError(f"experts {sorted(both)} are both activated and deactivated: give each (layer, expert) once")

    def hooks_for(self, model: ModelAdapter) -> list[tuple[str, object]]:
        layers = sorted(set(self.deactivate) | set(self.activate))
        if not layers:
            raise FeatsteerError("ExpertSteer needs deactivate={layer: [experts]} or activate={layer: [experts]}")
        if not model.moe_layers:
            raise FeatsteerError(f"{model.name} has no mixture-of-experts layers whose routing featsteer can read ({model.family}): "
                                 "ExpertSteer needs an MoE model such as Mixtral, Qwen3-MoE or GPT-OSS")
        for layer in layers:
            if layer not in model.moe_layers:
                raise FeatsteerError(f"layer {layer} of {model.name} routes no experts: its MoE layers are {model.moe_layers}")
            bad = [e for e in (*self.deactivate.get(layer, ()), *self.activate.get(layer, ())) if not 0 <= e < model.n_experts]
            if bad:
                raise FeatsteerError(f"expert(s) {bad} at layer {layer} do not exist: the model has experts 0-{model.n_experts - 1}")
        picked = model.experts_per_token
        for layer in layers if picked else ():
            on, off = len(set(self.activate.get(layer, ()))), len(set(self.deactivate.get(layer, ())))
            if on > picked:
                raise FeatsteerError(f"{on} experts activated at layer {layer}, but the router sends each token to {picked}: activate at most {picked}")
            if self.at == "router_logits" and off > model.n_experts - picked:
                raise FeatsteerError(f"{off} of {model.n_experts} experts deactivated at layer {layer}'s router logits, but it still picks {picked} "
                                     f"per token, so some would be used anyway: deactivate at most {model.n_experts - picked} there, or use at='routing'")
        make = _steer_logits if self.at == "router_logits" else functools.partial(_steer_routing, renormalize=self.renormalize)
        pairs = [(hook_name(layer, self.at), make(list(self.deactivate.get(layer, ())), list(self.activate.get(layer, ()))))
                 for layer in layers]
        if self.at == "router_logits":  # the router chooses by its own rule: check at its choice that it obeyed
            pairs += [(hook_name(layer, "routing"), _obeyed(layer, list(self.deactivate.get(layer, ())), list(self.activate.get(layer, ()))))
                      for layer in layers]
        return pairs


def _layer_map(value: Mapping, what: str) -> dict[int, list[int]]:
    """`{layer: [expert, ...]}` with integer keys (JSON, e.g. compare's results.json, keeps them as strings)."""
    out: dict[int, list[int]] = {}
    for layer, experts in dict(value).items():
        try:
            ids = [int(e) for e in experts] if isinstance(experts, (list, tuple, set, frozenset)) else None
            key = int(layer)
        except (TypeError, ValueError):
            ids = None
        if ids is None:
            raise FeatsteerError(f"ExpertSteer {what} needs {{layer: [expert, ...]}}; got {layer!r}: {experts!r}")
        out[key] = ids
    return out


EXPERT_STEER_SITES: tuple[str, ...] = ("routing", "router_logits")
"""Where `ExpertSteer` changes the routing: the weights after the router's choice, or the router's logits before it."""
STEER_MARGIN = 0.01
"""How far below the token's lowest logit a deactivated expert's is set, and above its highest an activated one's
(SteerMoE's value)."""


def _steer_logits(off: list[int], on: list[int]):
    def hook(x: Tensor, site) -> Tensor:
        w = x.clone()
        if off:
            w[..., off] = (x.min(-1, keepdim=True).values - STEER_MARGIN).expand(*x.shape[:-1], len(off))
        if on:
            w[..., on] = (x.max(-1, keepdim=True).values + STEER_MARGIN).expand(*x.shape[:-1], len(on))
        return w

    return hook


def _obeyed(layer: int, off: list[int], on: list[int]):
    """A `hook_routing` check behind the logits rule: a router that adds a per-expert correction bias to its choice
    (DeepSeek V3, GLM-4.5, dots.llm1, ERNIE 4.5) can still pick an expert whose logit went below the token's lowest, or
    pass over one raised above its highest; that is an error rather than a run that silently steered nothing. It reads only
    the sequences the logits rule steered: a gate (`ConditionalSteer`) passes it those rows (`checks_steered_rows`)."""

    def hook(x: Tensor, site) -> None:
        used = [e for e in off if bool((x[..., e] != 0).any())]
        skipped = [e for e in on if bool((x[..., e] == 0).any())]
        if used or skipped:
            what = f"still picks deactivated expert(s) {used}" if used else f"passes over activated expert(s) {skipped}"
            raise FeatsteerError(f"layer {layer}'s router {what} after the router-logits rule (a correction bias added to its "
                                 "choice outweighs the logit change): switch experts at the routing weights instead (at='routing', "
                                 "featsteer steer --experts-at routing)")

    hook.checks_steered_rows = True
    return hook


def _steer_routing(off: list[int], on: list[int], renormalize: bool):
    def hook(x: Tensor, site) -> Tensor:
        w = x.clone()
        total = w.sum(-1, keepdim=True)
        if on:
            k = (x != 0).sum(-1, keepdim=True)
            forced = torch.zeros(w.shape[-1], dtype=torch.bool, device=w.device)
            forced[on] = True
            w[..., on] = torch.maximum(w[..., on], w.max(-1, keepdim=True).values)
            # keep k experts per token: drop the lowest-weighted unforced ones
            spare = (w != 0).sum(-1, keepdim=True) - k
            ranked = torch.where(forced | (w == 0), torch.inf, w).argsort(-1)
            drop = torch.arange(w.shape[-1], device=w.device) < spare
            w = w.scatter(-1, ranked, torch.where(drop, 0.0, w.gather(-1, ranked)))
        if off:
            w[..., off] = 0
        if renormalize:
            kept = w.sum(-1, keepdim=True)
            w = torch.where(kept != 0, w * (total / torch.where(kept != 0, kept, 1)), w)
        return w

    return hook
