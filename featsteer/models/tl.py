"""TransformerLens backend: `HookedTransformer` and `TransformerBridge` behind the same adapter.

TransformerLens already names its hook points the way featsteer does, so hooks attach directly to its
`HookPoint` modules (as plain PyTorch hooks, removed individually so a user's own TL hooks survive).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from types import SimpleNamespace

import torch
from torch import Tensor

from featsteer.errors import FeatsteerError
from featsteer.models.adapter import (
    BiasWriter,
    HookFn,
    ModelAdapter,
    ResidualWriter,
    TokenBatch,
    generation_stop_ids,
)
from featsteer.models.hookpoints import NORM_KINDS, HookSite, hook_name, parse_hook_name

BRIDGE_STAND_INS = {"attn_out": ("conv.hook_out",), "per_layer_out": ("post_per_layer_input_norm.hook_out",)}
"""Bridge hook points (relative to `blocks.L.`) that carry a featsteer hook kind the bridge does not name: an LFM2 bridge
names no `blocks.L.hook_attn_out` at its short-convolution layers, whose output is `blocks.L.conv.hook_out`; a Gemma 4
bridge names no `hook_per_layer_out`, the normed per-layer-input write `blocks.L.post_per_layer_input_norm.hook_out`."""


class TLModelAdapter(ModelAdapter):
    """`ModelAdapter` over a TransformerLens `HookedTransformer` or `TransformerBridge`."""

    def __init__(self, model, name: str | None = None):
        if getattr(model, "tokenizer", None) is None:
            raise FeatsteerError("the TransformerLens model has no tokenizer: pass tokenizer=... when building it")
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name = name or getattr(model.cfg, "model_name", None) or type(model).__name__
        self.is_bridge = not hasattr(model, "blocks") or type(model).__name__ == "TransformerBridge"
        self._family_adapter = self._known_family() if self.is_bridge else None
        self._family_norms = self._norms_through_family()
        self._probed: tuple[frozenset[str], frozenset[str]] | None = None
        if self.is_bridge:
            self._probe()  # fail at load time, in one line, when TransformerLens cannot run the bridge (see _probe)

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_heads(self) -> int:
        return int(self.model.cfg.n_heads)

    def _known_family(self) -> ModelAdapter | None:
        """A bridge's Hugging Face model behind its featsteer family adapter, which knows the family's particulars (post-norms,
        learned positions) that the bridge's config does not say: a Gemma 2 bridge's config has no post-norm flag and every
        bridge lists a `hook_pos_embed`, which never fires in a model without learned positions. None for a family featsteer
        does not support."""
        try:
            return self._bridged()
        except FeatsteerError:
            return None

    def _norms_through_family(self) -> frozenset[str]:
        """The `ln1`/`ln2.hook_normalized` points hooked through the bridge's family adapter, on the Hugging Face norms under
        the bridge, so their values and edits are the Hugging Face adapter's: where the bridge names none (a Gemma 4 bridge
        names its norms' `hook_out`, the output after the norm's weight, not `hook_normalized`), and where attention and
        MLP read one norm (a Phi-2 or Cohere bridge's `ln1.hook_normalized` is that norm's output, so an edit there reached
        the MLP too). None on a bridge running processed weights (`enable_compatibility_mode()`), whose norms no longer
        scale by the weights the Hugging Face hooks pass a change on with."""
        family = self._family_adapter
        if family is None or not family.input_norms or getattr(self.model, "_weights_processed", False):
            return frozenset()
        names = set()
        for layer in range(self.n_layers):
            norms = {kind: family._input_norm(kind, layer) for kind in NORM_KINDS}
            shared = norms["ln1_normalized"] is norms["ln2_normalized"]
            names |= {hook_name(layer, kind) for kind, norm in norms.items()
                      if norm is not None and (shared or hook_name(layer, kind) not in self.model.hook_dict)}
        return frozenset(names)

    @property
    def attention_layers(self) -> list[int]:
        if self._family_adapter is not None:
            return self._family_adapter.attention_layers
        return super().attention_layers

    @property
    def per_layer_inputs(self) -> bool:
        return self._family_adapter.per_layer_inputs if self._family_adapter is not None else False

    @property
    def scaled_layers(self) -> bool:
        return self._family_adapter.scaled_layers if self._family_adapter is not None else False

    @property
    def post_norms(self) -> bool:
        if self._family_adapter is not None:
            return self._family_adapter.post_norms
        return bool(getattr(self.model.cfg, "use_normalization_before_and_after", False))

    @property
    def parallel_block(self) -> bool:
        return bool(getattr(self.model.cfg, "parallel_attn_mlp", False))

    @property
    def input_norms(self) -> bool:
        """From the family for a bridge: an OLMo 2 bridge names its post-norms `ln1`/`ln2`, so its `ln1.hook_normalized` is the
        normalised attention output, not what the attention reads. A HookedTransformer built with `normalization_type=None`
        has no norm hook points at all."""
        if self._family_adapter is not None:
            return self._family_adapter.input_norms
        return hook_name(0, "ln1_normalized") in self.model.hook_dict

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """As for any model, less a kind none of whose hook points runs: one TransformerLens does not name (a Phi-2 or Cohere
        bridge's attention and MLP read one norm, `ln1`, and it names no `ln2`; an attention-only HookedTransformer has no
        `resid_mid`) or names but never calls (see `_silent_hook_points`)."""
        running = self._probe()[1]
        return tuple(kind for kind in super().layer_kinds if kind in running)

    def _silent_hook_points(self) -> frozenset[str]:
        """featsteer's hook points the model lists but its forward pass never calls: a Granite bridge's `hook_attn_out` and
        `hook_mlp_out` (Granite scales the branch outputs outside the bridged modules), an attention-only HookedTransformer's
        `hook_mlp_out`. A steering hook there did nothing, and a capture failed with a KeyError."""
        return self._probe()[0]

    def _probe(self) -> tuple[frozenset[str], frozenset[str]]:
        """The silent hook points and the per-layer kinds with a hook point that runs, found once with a one-token pass."""
        if self._probed is None:
            points = self._hook_points()
            sites = {name: site for name in points if (site := _featsteer_site(name, self.n_layers)) is not None}
            fired: set[str] = set()
            handles = [points[name].register_forward_hook(lambda module, args, output, name=name: fired.add(name)) for name in sites
                       if name not in self._family_norms]
            through_family = [(parse_hook_name(name, self.n_layers), lambda x, site: fired.add(site.name)) for name in self._family_norms]
            sites |= {site.name: site for site, _ in through_family}
            if through_family:
                handles.append(SimpleNamespace(remove=self._family_adapter._install_hooks(through_family)))
            token = next((t for t in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id) if t is not None), 0)
            try:
                with torch.no_grad():
                    ones = torch.ones((1, 1), dtype=torch.long, device=self.device)
                    self._forward(TokenBatch(ones * token, ones), None, False)
            except FeatsteerError:
                raise
            except Exception as error:  # TransformerLens 3.9 cannot run some bridges (a Qwen3.5 gated DeltaNet, a Granite 4 hybrid)
                if not self.is_bridge:
                    raise
                detail = (str(error).splitlines() or [""])[0]
                raise FeatsteerError(f"this TransformerBridge ({self.family}) fails a one-token forward pass inside TransformerLens "
                                     f"({type(error).__name__}: {detail}): TransformerLens cannot run this model as bridged; load the "
                                     "Hugging Face model itself with load_model(path) instead") from None
            finally:
                for handle in handles:
                    handle.remove()
            running = frozenset(sites[name].kind for name in fired if sites[name].layer is not None)
            self._probed = (frozenset(sites) - fired, running)
        return self._probed

    def _hook_points(self) -> dict:
        """The model's hook points by name, with a stand-in (`BRIDGE_STAND_INS`) under each featsteer name a layer lacks:
        the same writes the Hugging Face adapter hooks and edits for the same model, so `Ablate(writes)` reaches them all."""
        points = dict(self.model.hook_dict)
        for layer in range(self.n_layers):
            for kind, stand_ins in BRIDGE_STAND_INS.items():
                found = [points[f"blocks.{layer}.{where}"] for where in stand_ins if f"blocks.{layer}.{where}" in points]
                if hook_name(layer, kind) not in points and found:
                    points[hook_name(layer, kind)] = found[0]
        return points

    def hook_names(self, kinds: Sequence[str] = ("resid_pre",), layers: Sequence[int] | None = None) -> list[str]:
        """As for any model; on a bridge a kind it lists but never calls is an error rather than left out, since the model
        computes it (leaving Granite's branch outputs out of `Ablate(writes)` would ablate part of what the edit removes).
        An attention-only HookedTransformer's `mlp_out` is left out: there is no MLP."""
        named = {site.kind for name in self._silent_hook_points() if (site := _featsteer_site(name, self.n_layers)).layer is not None}
        if self.is_bridge and (silent := [kind for kind in kinds if kind in named - self._probe()[1]]):
            raise FeatsteerError(self._never_called(f"hook kind {', '.join(silent)}"))
        if self.is_bridge and self.input_norms and kinds and set(kinds) <= set(NORM_KINDS) and not set(kinds) & set(self.layer_kinds):
            raise FeatsteerError(self._unnamed_norm(f"no {', '.join(kinds)} hook point"))
        return super().hook_names(kinds, layers)

    def _unnamed_norm(self, what: str) -> str:
        """The error for a norm point of a bridge whose family has input norms, which neither the bridge names nor featsteer
        reaches through the Hugging Face norms (they run processed weights)."""
        processed = " and runs processed weights (enable_compatibility_mode())" if getattr(self.model, "_weights_processed", False) else ""
        return (f"this TransformerBridge ({self.family}) names {what}{processed}: its hook kinds are {', '.join(self.layer_kinds)}; boot it "
                "without compatibility mode, or load the Hugging Face model itself (load_model(path)) to hook its norms")

    def _never_called(self, what: str) -> str:
        advice = "; load the Hugging Face model itself (load_model(path)) to hook it" if self.is_bridge else ""
        return (f"{what} never runs on this TransformerLens model ({self.family}): it is listed as a hook point but the forward pass "
                f"does not call it, so a hook there would do nothing{advice}")

    def hook_site(self, name: str) -> HookSite:
        if name == "hook_pos_embed" and self._shortformer:  # it exists and fires, though outside the stream
            return parse_hook_name(name, self.n_layers)
        site = super().hook_site(name)
        if name in self._silent_hook_points():
            raise FeatsteerError(self._never_called(name))
        if site.kind in NORM_KINDS and site.kind not in self.layer_kinds and self.is_bridge and self.input_norms:
            raise FeatsteerError(f"{name} does not exist: " + self._unnamed_norm("no such hook point"))
        if site.kind in NORM_KINDS and site.kind not in self.layer_kinds:
            raise FeatsteerError(f"{name} does not exist: this {self.family} model has no such norm before its "
                                 f"{'attention' if site.kind == 'ln1_normalized' else 'MLP'}; its hook kinds are {', '.join(self.layer_kinds)}")
        return site

    @property
    def learned_positions(self) -> bool:
        if self._family_adapter is not None:
            return self._family_adapter.learned_positions
        return "hook_pos_embed" in self.model.hook_dict and not self._shortformer

    @property
    def _shortformer(self) -> bool:
        """A HookedTransformer with shortformer positions adds its position embedding to each attention's queries and keys,
        not to the stream: `hook_pos_embed` fires, but it is no residual write, so weight edits and `Ablate` leave it be."""
        return not self.is_bridge and getattr(self.model.cfg, "positional_embedding_type", None) == "shortformer"

    def _declared_stop_ids(self) -> set[int]:
        """A bridge's Hugging Face model's generation settings (a HookedTransformer has none)."""
        return generation_stop_ids(getattr(self.model, "original_model", None)) if self.is_bridge else set()

    @property
    def family(self) -> str:
        """`transformer_lens:` and the Hugging Face architecture the model was converted from; for a HookedTransformer built
        from a config, which records none, its class (`transformer_lens:HookedTransformer`)."""
        cfg = self.model.cfg
        arch = getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None) or type(self.model).__name__
        return f"transformer_lens:{arch}"

    @property
    def _embed_scale(self) -> float:
        """What the model multiplies the embedding by after a bridge's `hook_embed` (Granite's `embedding_multiplier`, applied by
        the Hugging Face forward outside the bridged embedding): `hook_embed` carries the product, as on the Hugging Face
        adapter and in `blocks.0.hook_resid_pre`. 1 for a HookedTransformer and for families that scale inside the module."""
        return self._family_adapter._embed_scale if self._family_adapter is not None else 1.0

    def _install_hooks(self, hooks: Sequence[tuple[HookSite, HookFn]]) -> Callable[[], None]:
        handles, points = [], self._hook_points()
        through_family = [(site, fn) for site, fn in hooks if site.name in self._family_norms]
        if through_family:
            handles.append(SimpleNamespace(remove=self._family_adapter._install_hooks(through_family)))
        try:
            for site, fn in hooks:
                if site.name in self._family_norms:
                    continue
                point = points.get(site.name)
                if point is None:
                    raise FeatsteerError(f"hook '{site.name}' does not exist on this TransformerLens model")
                handles.append(point.register_forward_hook(_tl_hook(site, fn, self.n_heads, self._embed_scale)))
        except Exception:
            for handle in handles:
                handle.remove()
            raise

        def remove() -> None:
            for handle in handles:
                handle.remove()

        return remove

    def _forward(self, batch: TokenBatch, cache: object | None, want_cache: bool, keep: int = 0) -> tuple[Tensor, object | None]:
        self._check_context(batch)
        kwargs = {"attention_mask": batch.attention_mask, "return_type": "logits"}
        if self.is_bridge:
            kwargs["position_ids"] = batch.position_ids
        return self.model(batch.input_ids, **kwargs), None

    def _check_context(self, batch: TokenBatch) -> None:
        """A HookedTransformer's causal mask, position table and rotary angles have `n_ctx` rows, and so has a bridge's learned
        position table: a longer sequence failed with an IndexError from deep inside the forward pass."""
        if self.is_bridge and not self.learned_positions:  # the Hugging Face model computes its rotary angles for any length
            return
        length = int(batch.position_ids.max()) + 1 if self.is_bridge else batch.input_ids.shape[1]
        if length > (n_ctx := int(self.model.cfg.n_ctx)):
            raise FeatsteerError(f"a sequence of {length} tokens is longer than the {n_ctx} positions (n_ctx) of {self.name}: use shorter "
                                 "prompts (or fewer new tokens)")

    def _bridged(self):
        """The bridge's Hugging Face model behind an adapter, for its weights."""
        from featsteer.models.hf import HFModelAdapter

        return HFModelAdapter(self.model.original_model, self.tokenizer)

    def _refuse_processed(self, writers: list) -> list:
        """The writers as they are, or, when the bridge runs processed copies of the weights (`enable_compatibility_mode()`
        folds the norms and centres the writing weights into new tensors, which a write to the Hugging Face model would
        not reach), with writes that raise instead of doing nothing. Reading stays possible (shapes, widths)."""
        if not getattr(self.model, "_weights_processed", False):
            return writers

        def refuse(*_) -> None:
            raise FeatsteerError("this TransformerBridge runs processed copies of its weights (enable_compatibility_mode() folded and "
                                 "centred them), so a weight edit would not reach its forward pass: boot it without compatibility mode "
                                 "(or with enable_compatibility_mode(no_processing=True)), or load the Hugging Face model itself")

        return [replace(writer, write=refuse) for writer in writers]

    def residual_writers(self) -> list[ResidualWriter]:
        if self.is_bridge:
            return self._refuse_processed(self._bridged().residual_writers())
        writers = [_param_writer("hook_embed", None, "embed", self.model.embed, "W_E", None)]
        if self.learned_positions and hasattr(self.model.pos_embed, "W_pos"):
            writers.append(_param_writer("hook_pos_embed", None, "pos_embed", self.model.pos_embed, "W_pos", None))
        for layer, block in enumerate(self.model.blocks):
            writers.append(_param_writer(f"blocks.{layer}.hook_attn_out", layer, "attn_out", block.attn, "W_O", "b_O"))
            if getattr(block, "mlp", None) is None:  # an attention-only model
                continue
            experts = getattr(block.mlp, "experts", None)
            if experts is None:
                writers.append(_param_writer(f"blocks.{layer}.hook_mlp_out", layer, "mlp_out", block.mlp, "W_out", "b_out"))
            else:  # a mixture-of-experts layer adds its experts' outputs with per-token weights: edit each one
                writers.extend(_linear_writer(f"blocks.{layer}.hook_mlp_out.expert{e}", layer, expert.W_out) for e, expert in enumerate(experts))
        return writers

    def bias_writers(self) -> list[BiasWriter]:
        if self.is_bridge:
            return self._refuse_processed(self._bridged().bias_writers())
        if self.post_norms:
            return []
        writers = []
        for layer, block in enumerate(self.model.blocks):
            for kind, module, attr in (("attn_out", block.attn, "b_O"), ("mlp_out", getattr(block, "mlp", None), "b_out")):
                bias = getattr(module, attr, None)
                if isinstance(bias, Tensor) and bias.dim() == 1:
                    writers.append(_bias_writer(f"blocks.{layer}.hook_{kind}", layer, bias))
        return writers

    def unembed(self) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        if self.is_bridge:
            return self._bridged().unembed()
        norm = getattr(self.model, "ln_final", None)  # a HookedTransformer built with normalization_type=None has none
        return self.model.W_U.T, torch.nn.Identity() if norm is None else norm


def _featsteer_site(name: str, n_layers: int) -> HookSite | None:
    """The featsteer hook site a TransformerLens hook name is, or None for TransformerLens' other hook points."""
    try:
        return parse_hook_name(name, n_layers)
    except FeatsteerError:
        return None


def _tl_hook(site: HookSite, fn: HookFn, n_heads: int, embed_scale: float = 1.0):
    if site.kind == "embed" and embed_scale != 1.0:
        return _scaled_hook(site, fn, embed_scale)
    if site.kind != "attn_z":
        return lambda module, args, output: fn(output, site)

    def heads_hook(module, args, output):  # a TransformerBridge carries hook_z with the heads side by side
        if output.dim() == 4:
            return fn(output, site)
        heads = output.unflatten(-1, (n_heads, output.shape[-1] // n_heads))
        new = fn(heads, site)
        return None if new is None else new.flatten(-2)

    return heads_hook


def _scaled_hook(site: HookSite, fn: HookFn, scale: float):
    """A hook handing `fn` the output times `scale` (what enters the stream after the module) and handing a replacement
    back divided by it, so the model's own multiplication turns it into what `fn` returned."""

    def hook(module, args, output):
        seen = output * scale
        new = fn(seen, site)
        return None if new is None or new is seen else new / scale

    return hook


def _bias_writer(name: str, layer: int, bias: torch.nn.Parameter) -> BiasWriter:
    """A TransformerLens block's output bias (`b_O`, `b_out`): it adds itself to the stream at every position."""

    def write(value: Tensor) -> None:
        with torch.no_grad():
            bias.copy_(value)

    return BiasWriter(name, layer, lambda: torch.eye(bias.shape[0], dtype=torch.float64), lambda: bias.detach(), write)


def _param_writer(name: str, layer: int | None, kind: str, module, weight_attr: str, bias_attr: str | None) -> ResidualWriter:
    """TL stores writers as (..., d_model); we expose (d_model, d_in) and reshape back on write."""

    def read() -> tuple[Tensor, Tensor | None]:
        weight = getattr(module, weight_attr).detach()
        bias = getattr(module, bias_attr).detach() if bias_attr and hasattr(module, bias_attr) else None
        return weight.reshape(-1, weight.shape[-1]).T, bias

    def write(weight: Tensor, bias: Tensor | None) -> None:
        param = getattr(module, weight_attr)
        with torch.no_grad():
            param.copy_(weight.T.reshape(param.shape))
            if bias is not None and bias_attr and hasattr(module, bias_attr):
                getattr(module, bias_attr).copy_(bias)

    return ResidualWriter(name=name, layer=layer, kind=kind, read=read, write=write)


def _linear_writer(name: str, layer: int, linear: torch.nn.Linear) -> ResidualWriter:
    """An `nn.Linear` writing into the stream (a TransformerLens MoE expert's `W_out`), already `(d_model, d_in)`."""

    def read() -> tuple[Tensor, Tensor | None]:
        return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()

    def write(weight: Tensor, bias: Tensor | None) -> None:
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None and linear.bias is not None:
                linear.bias.copy_(bias)

    return ResidualWriter(name=name, layer=layer, kind="mlp_out", read=read, write=write)
