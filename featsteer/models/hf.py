"""Hugging Face backend: TransformerLens hook names on a plain `transformers` causal LM.

Hook points are PyTorch forward hooks placed on the modules a `FamilySpec` row names:
`resid_pre` is a pre-hook on the decoder layer, `attn_out`/`mlp_out` hook the module whose output is added
to the residual stream, `resid_post` hooks the layer output, and `resid_mid` is derived exactly as
`resid_pre + attn_out` (reading it, or writing it back as a change of the attention contribution), so
it works for every sequential-residual family without touching model code. `ln1.hook_normalized` /
`ln2.hook_normalized` / `ln_final.hook_normalized` carry what TransformerLens puts there: the normalised vector
the attention, the MLP or the unembedding reads, before the norm's own weight (and bias) scale it (RMSNorm:
`x / rms(x)`; LayerNorm: `(x - mean) / std`). With the usual folded norms TransformerLens moves that weight into
the next matrices, so the same name carries the same values on both backends. A hook's change `dz` reaches the
module's output as `dz * weight`, so edits there act on exactly what the next module reads.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from featsteer.errors import FeatsteerError
from featsteer.models.adapter import (
    BiasWriter,
    HookFn,
    ModelAdapter,
    ResidualWriter,
    TokenBatch,
    generation_stop_ids,
)
from featsteer.models.families import FamilySpec, family_for
from featsteer.models.hookpoints import HookSite

logger = logging.getLogger(__name__)

_Hooks = list[tuple[HookSite, HookFn]]
NORM_SITES = ("ln1_normalized", "ln2_normalized")


def check_not_bridged(model: nn.Module) -> None:
    """Refuse a Hugging Face model a TransformerLens `TransformerBridge` was booted on (`boot_transformers(path,
    hf_model=model)`): the bridge puts its own components in place of the model's modules, after which the model still
    computes the same logits without a key-value cache but generates other tokens with one (a tiny Llama's greedy
    continuations change). featsteer never boots a bridge; the user keeps the original intact by booting on a copy.

    Raises:
        FeatsteerError: when any module of `model` is a bridge component (it wraps an `_original_component`).
    """
    if any(hasattr(module, "_original_component") for module in model.modules()):
        raise FeatsteerError("a TransformerBridge was booted on this Hugging Face model and replaced its modules, which breaks its key-value "
                             "cache (generation changes): load the bridge instead (load_model(bridge)), or boot it on a copy "
                             "(boot_transformers(path, hf_model=copy.deepcopy(model))) and load the original")


def _apply(fns: _Hooks, activation: Tensor) -> Tensor:
    for site, fn in fns:
        replaced = fn(activation, site)
        if replaced is not None:
            activation = replaced
    return activation


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value: Tensor):
    return (value, *output[1:]) if isinstance(output, tuple) else value


class HFModelAdapter(ModelAdapter):
    """`ModelAdapter` over a `transformers` `PreTrainedModel` (see module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        self.spec: FamilySpec = family_for(model.config.model_type)
        text_config = model.config.get_text_config()
        self._embed_scale = float(getattr(text_config, self.spec.embedding_multiplier)) if self.spec.embedding_multiplier else 1.0
        self._write_scale = float(getattr(text_config, self.spec.residual_multiplier)) if self.spec.residual_multiplier else 1.0
        parallel = self.spec.parallel
        self._parallel = bool(getattr(text_config, parallel, False)) if isinstance(parallel, str) else parallel
        self._layers: nn.ModuleList = self._module(self.spec.layers)
        # Llama 4's experts take inputs the router has already weighted: its routing is read at the router's output instead
        self._weighted_inputs = {layer for layer in range(len(self._layers))
                                 if self._experts(layer) is not None and not _routable(self._experts(layer)) and self._find_router(layer)}
        self._moe_layers = [layer for layer in range(len(self._layers)) if _routable(self._experts(layer)) or layer in self._weighted_inputs]
        # the pad token and padding side as given, before those set here for batched generation: an export saves the
        # tokenizer with these (an EOS pad token it never had would hide EOS from a later fine-tune's labels)
        self.tokenizer_as_given = {"pad_token": tokenizer.pad_token, "padding_side": tokenizer.padding_side}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self._attention_sites: dict[int, _AttentionSite] = {}

    # ---- properties ---------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers."""
        return self._layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def family(self) -> str:
        return self.spec.name

    def _declared_stop_ids(self) -> set[int]:
        return generation_stop_ids(self.model)

    @property
    def n_heads(self) -> int:
        config = getattr(self.model.config, "text_config", None) or self.model.config
        return int(getattr(config, "num_attention_heads", None) or config.n_head)

    @property
    def post_norms(self) -> bool:
        return self.spec.post_norms

    @property
    def input_norms(self) -> bool:
        return self.spec.attn_norm is not None and self.spec.mlp_norm is not None

    @property
    def parallel_block(self) -> bool:
        return self._parallel

    @property
    def moe_layers(self) -> list[int]:
        return list(self._moe_layers)

    @property
    def n_experts(self) -> int:
        return int(self._experts(self._moe_layers[0]).down_proj.shape[0]) if self._moe_layers else 0

    @property
    def experts_per_token(self) -> int:
        if not self._moe_layers:
            return 0
        config = self.model.config.get_text_config()
        for name in ("num_experts_per_tok", "experts_per_token", "moe_topk", "num_selected_experts", "moe_k"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 0

    def _experts(self, layer: int) -> nn.Module | None:
        """The fused experts module of `layer` (None in a dense layer or model)."""
        return self._optional_module(self.spec.experts, layer) if self.spec.experts else None

    def _find_router(self, layer: int) -> nn.Module | None:
        """The router of MoE layer `layer`: the experts' sibling named `gate` or `router` (every supported family's)."""
        experts = self._experts(layer)
        for parent in self.layers[layer].modules():
            if any(child is experts for child in parent.children()):
                for name in ("gate", "router"):
                    if isinstance(router := getattr(parent, name, None), nn.Module):
                        return router
        return None

    def _router(self, layer: int) -> nn.Module:
        if (router := self._find_router(layer)) is not None:
            return router
        raise FeatsteerError(f"blocks.{layer}.mlp.hook_router_logits: featsteer finds no router (a `gate` or `router` module beside the "
                             f"experts) in layer {layer} of this {self.spec.name} model; hook blocks.{layer}.mlp.hook_routing instead")

    @property
    def scaled_layers(self) -> bool:
        return self.spec.layer_scalar is not None

    @property
    def learned_positions(self) -> bool:
        return self.spec.pos_embed is not None

    @property
    def per_layer_inputs(self) -> bool:
        return self.spec.per_layer_out_site is not None and self._optional_module(self.spec.per_layer_out_site, 0) is not None

    def _module(self, path: str, layer: int | None = None) -> nn.Module:
        """The module at `path` (from the model, or from decoder layer `layer`); `a|b` takes the first alternative the
        layer has (LFM2's layers hold either `self_attn` or `conv`)."""
        root = self.model if layer is None else self.layers[layer]
        alternatives = path.split("|")
        for alternative in alternatives[:-1]:
            try:
                if (module := operator.attrgetter(alternative)(root)) is not None:  # Granite 4 keeps the mixer it lacks as None
                    return module
            except AttributeError:
                continue
        module = operator.attrgetter(alternatives[-1])(root)
        if module is None:
            raise AttributeError(f"{path} is None in this layer")
        return module

    @property
    def attention_layers(self) -> list[int]:
        return [layer for layer in range(self.n_layers) if self._is_attention(layer)]

    def _is_attention(self, layer: int) -> bool:
        """False for a layer whose token mixer is not softmax attention (the second `attn` alternative: an LFM2 convolution,
        a Qwen3.5 gated DeltaNet)."""
        first = self.spec.attn.split("|")[0]
        return "|" not in self.spec.attn or self._optional_module(first, layer) is not None

    def _token_mixer(self, layer: int) -> str | None:
        return type(self._module(self.spec.attn, layer)).__name__

    def _input_norm(self, kind: str, layer: int) -> nn.Module | None:
        """The norm whose output a branch reads (`kind`: `ln1_normalized` for the attention, `ln2_normalized` for the MLP),
        None when the branch reads the raw stream. In a parallel block without an MLP norm of its own (StableLM's parallel
        checkpoints) the MLP reads the attention's norm."""
        attn = kind == "ln1_normalized"
        path = self.spec.attn_norm if attn else self.spec.mlp_norm
        if path is None:
            return None
        module = self._optional_module(path, layer)
        if module is None and self._parallel and not attn:
            return self._input_norm("ln1_normalized", layer)
        return module if module is not None else self._module(path, layer)

    # ---- hooks --------------------------------------------------------------------------------------
    def _install_hooks(self, hooks: Sequence[tuple[HookSite, HookFn]]) -> Callable[[], None]:
        by_site: dict[tuple[int | None, str], _Hooks] = defaultdict(list)
        for site, fn in hooks:
            by_site[(site.layer, site.kind)].append((site, fn))
        handles = []
        try:
            for kind, path in (
                ("embed", self.spec.embed_tokens), ("pos_embed", self.spec.pos_embed), ("ln_final_normalized", self.spec.final_norm),
            ):
                if fns := by_site.get((None, kind)):
                    hook = _norm_hook(fns, self.spec) if kind == "ln_final_normalized" else _output_hook(fns, self._embed_scale if kind == "embed" else 1.0)
                    handles.append(self._module(path).register_forward_hook(hook, with_kwargs=kind == "ln_final_normalized"))
            for layer in sorted({layer for layer, _ in by_site if layer is not None}):
                handles.extend(self._install_layer(layer, by_site))
        except Exception:
            for handle in handles:
                handle.remove()
            raise

        def remove() -> None:
            for handle in handles:
                handle.remove()

        return remove

    def _install_layer(self, layer: int, by_site: dict[tuple[int | None, str], _Hooks]) -> list:
        pre, attn, mid = by_site.get((layer, "resid_pre"), []), by_site.get((layer, "attn_out"), []), by_site.get((layer, "resid_mid"), [])
        mlp, post = by_site.get((layer, "mlp_out"), []), by_site.get((layer, "resid_post"), [])
        per_layer = by_site.get((layer, "per_layer_out"), [])
        if mid and self._parallel:
            raise FeatsteerError(f"{mid[0][0].name} does not exist: {self.spec.name} runs attention and MLP in parallel on the block's "
                                 f"input and adds both at once; hook blocks.{layer}.hook_resid_pre or blocks.{layer}.hook_resid_post instead")
        handles = []
        block = self.layers[layer]
        if pre:
            handles.append(block.register_forward_pre_hook(_pre_hook(pre), with_kwargs=True))
        handles.extend(self._install_norms(layer, by_site))
        if z := by_site.get((layer, "attn_z")):
            if not self._is_attention(layer):  # hook_site refuses these names; hooks installed directly still get the message
                raise FeatsteerError(self._no_heads_message(z[0][0]))
            handles.append(self._module(self.spec.attn_out_proj, layer).register_forward_pre_hook(_heads_hook(z, self.n_heads)))
        if attn or mid:
            handles.append(self._join_attention(layer, attn, mid))
        if mlp and self.spec.mlp_beside and (beside := self._optional_module(self.spec.mlp_beside, layer)) is not None:
            partial: dict[str, Tensor] = {}  # Granite 4: the experts' output, added to the shared MLP's after it runs
            handles.append(beside.register_forward_hook(lambda module, args, output: partial.__setitem__("beside", _first(output))))
            handles.append(self._module(self.spec.mlp_site, layer).register_forward_hook(_sum_hook(mlp, partial, self._write_scale)))
        elif mlp:
            handles.append(self._module(self.spec.mlp_site, layer).register_forward_hook(_output_hook(mlp, self._write_scale, like_input=True)))
        logits, routing = by_site.get((layer, "router_logits")), by_site.get((layer, "routing"))
        if logits or routing:
            if layer not in self._moe_layers:  # hook_site refuses these names; hooks installed directly still get the message
                name = (logits or routing)[0][0].name
                raise FeatsteerError(f"{name} does not exist: layer {layer} routes no experts (MoE layers: {self._moe_layers})")
            shape: dict[str, tuple[int, int]] = {}
            handles.append(block.register_forward_pre_hook(_stash_shape(shape), with_kwargs=True))
        if logits:
            router = self._router(layer)
            mode: list[_RouterLogits] = []
            handles.append(router.register_forward_pre_hook(_enter_router(mode, logits, shape, self.n_experts)))
            # prepended and always called: modes leave torch's stack in the reverse order they entered, also after an error
            handles.append(router.register_forward_hook(_leave_router(mode, logits[0][0].name, router), prepend=True, always_call=True))
        if routing and layer in self._weighted_inputs:
            handles.append(self._router(layer).register_forward_hook(_router_scores_hook(routing, shape, self.n_experts)))
        elif routing:
            handles.append(self._experts(layer).register_forward_pre_hook(_routing_hook(routing, shape, self.n_experts), with_kwargs=True))
        if per_layer:
            handles.append(self._module(self.spec.per_layer_out_site, layer).register_forward_hook(_output_hook(per_layer)))
        if post:
            handles.append(block.register_forward_hook(_output_hook(post)))
        return handles

    def _join_attention(self, layer: int, attn: _Hooks, mid: _Hooks) -> SimpleNamespace:
        """Add `attn_out` and `resid_mid` hooks to layer `layer`'s `_AttentionSite`, which every installation shares (the
        first creates it and its PyTorch hooks); returns a handle whose `remove()` takes them out again (and the PyTorch
        hooks with the last)."""
        site = self._attention_sites.get(layer)
        if site is None:
            site = _AttentionSite(self._write_scale)
            # resid_mid's resid_pre is what the block's first module reads: after every resid_pre hook has changed it
            reader = self._input_norm("ln1_normalized", layer) or self._module(self.spec.attn, layer)
            site.handles = [reader.register_forward_pre_hook(_stash_input(site.state), with_kwargs=True),
                            self._module(self.spec.attn_site, layer).register_forward_hook(site)]
            self._attention_sites[layer] = site
        entry = (attn, mid)
        site.entries.append(entry)

        def remove() -> None:
            site.entries = [other for other in site.entries if other is not entry]
            if not site.entries and self._attention_sites.get(layer) is site:
                for handle in site.handles:
                    handle.remove()
                del self._attention_sites[layer]

        return SimpleNamespace(remove=remove)

    def _install_norms(self, layer: int, by_site: dict[tuple[int | None, str], _Hooks]) -> list:
        """`ln1`/`ln2` hooks: on the norm's output, or, when attention and MLP read one shared norm (Cohere, Phi-2), on each
        branch's input, so a change reaches only its own branch."""
        hooked = {kind: fns for kind in NORM_SITES if (fns := by_site.get((layer, kind)))}
        if not hooked:
            return []
        norms = {kind: self._input_norm(kind, layer) for kind in NORM_SITES}
        for kind, fns in hooked.items():
            if norms[kind] is None:
                branch, stream = ("attention", "hook_resid_pre") if kind == "ln1_normalized" else ("MLP", "hook_resid_mid")
                raise FeatsteerError(f"{fns[0][0].name} does not exist: {self.spec.name} has no norm before the {branch} (it reads "
                                     f"the residual stream itself); hook blocks.{layer}.{stream} instead")
        shared = norms["ln1_normalized"] is norms["ln2_normalized"]
        if not shared:
            return [norms[kind].register_forward_hook(_norm_hook(fns, self.spec), with_kwargs=True) for kind, fns in hooked.items()]
        norm, state = norms["ln1_normalized"], {}
        handles = [norm.register_forward_hook(_stash_normalized(state, self.spec), with_kwargs=True)]
        for kind, fns in hooked.items():
            branch = self._module(self.spec.attn if kind == "ln1_normalized" else self.spec.mlp, layer)
            handles.append(branch.register_forward_pre_hook(_branch_input_hook(fns, state, norm, self.spec), with_kwargs=True))
        return handles

    # ---- forward ------------------------------------------------------------------------------------
    @functools.cached_property
    def _trained_context(self) -> int | None:
        """The config's `max_position_embeddings` (the text model's for image-text checkpoints), read once: `_forward`
        asks on every decoding step."""
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        trained = getattr(config, "max_position_embeddings", None)
        return trained if isinstance(trained, int) else None

    def _check_trained_context(self, length: int) -> None:
        """Warn once when a sequence runs past the context a rotary model was trained on (`max_position_embeddings`):
        nothing stops the model there, but what it computes beyond is outside anything it learned."""
        trained = self._trained_context
        if trained is not None and length > trained and not getattr(self, "_warned_context", False):
            self._warned_context = True
            logger.warning("%s: a sequence of %d tokens runs past the %d positions the model was trained on; its activations and "
                           "outputs beyond them are unreliable (use shorter prompts or fewer new tokens)", self.name, length, trained)

    def _forward(self, batch: TokenBatch, cache: object | None, want_cache: bool, keep: int = 0) -> tuple[Tensor, object | None]:
        if cache is None and want_cache:
            from transformers import DynamicCache

            check_not_bridged(self.model)  # once per generated batch: a bridge booted on the model since it was loaded

            cache = DynamicCache(config=self.model.config)
        position_ids = batch.position_ids
        finished = getattr(batch, "finished", None)  # a decoding step's finished rows read on, but their outputs are dropped
        live = position_ids if finished is None else position_ids[~finished.to(position_ids.device)]
        if self.spec.pos_embed and live.numel():  # a learned position table has a last row; rotary ones do not
            positions = self._module(self.spec.pos_embed).num_embeddings
            if (length := int(live.max()) + 1) > positions:
                raise FeatsteerError(f"a sequence of {length} tokens is longer than the {positions} positions of {self.name}: use shorter "
                                     "prompts (or fewer new tokens)")
            # a finished row with the longest prompt may run past the table; it changes nothing where none does
            position_ids = position_ids.clamp(max=positions - 1)
        elif live.numel():
            self._check_trained_context(int(live.max()) + 1)
        cache_kwarg = _cache_keyword(type(self.model))
        remove = self._discard_attention_weights()
        try:
            output = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=position_ids,
                use_cache=want_cache,
                logits_to_keep=self._logits_to_keep(batch, keep) if keep else 0,
                **{cache_kwarg: cache},
            )
        finally:
            remove()
        return output.logits, (getattr(output, cache_kwarg) if want_cache else None)

    def _logits_to_keep(self, batch: TokenBatch, keep: int) -> int | Tensor:
        """`logits_to_keep` for the last `keep` positions. Gemma 4 runs its KV-sharing layers on the kept positions alone
        when it is an int, so hooks there would see only those; the same positions as an index tensor keep every one."""
        if getattr(self.model.config.get_text_config(), "num_kv_shared_layers", 0):
            width = batch.input_ids.shape[1]
            return torch.arange(max(width - keep, 0), width, device=batch.input_ids.device)
        return keep

    def _discard_attention_weights(self) -> Callable[[], None]:
        """For one forward pass, drop the attention probabilities each attention module returns; return
        a function that removes the hooks doing it.

        Eager attention returns its `(batch, heads, pos, pos)` probabilities beside its output, and every
        supported decoder layer keeps them (`hidden_states, _ = self.self_attn(...)`) until the layer
        returns, i.e. through the MLP, where a forward pass of short prompts peaks. featsteer never reads
        them. For GPT-2 small at 16 x 64 tokens that is 3.1 MB of a 73 MB peak; it grows with the square
        of the prompt length (805 MB for the same model at 16 x 1,024 tokens). SDPA and flash attention
        return None there already. Left alone when the model's config asks for attention outputs.
        """
        if getattr(self.model.config, "output_attentions", False):
            return lambda: None
        handles = [self._module(self.spec.attn, layer).register_forward_hook(_drop_attention_weights) for layer in range(self.n_layers)]

        def remove() -> None:
            for handle in handles:
                handle.remove()

        return remove

    # ---- weights ------------------------------------------------------------------------------------
    def residual_writers(self) -> list[ResidualWriter]:
        writers = [_embedding_writer("hook_embed", None, "embed", self._module(self.spec.embed_tokens), self.untie_embeddings)]
        if self.spec.pos_embed:
            writers.append(_embedding_writer("hook_pos_embed", None, "pos_embed", self._module(self.spec.pos_embed), None))
        conv1d = self.spec.conv1d_projections
        for layer in range(self.n_layers):
            writers.append(_projection_writer(f"blocks.{layer}.hook_attn_out", layer, "attn_out",
                                              self._module(self.spec.attn_out_proj, layer), conv1d))
            writers.extend(self._mlp_writers(layer))
            if self.spec.per_layer_out_proj and (module := self._optional_module(self.spec.per_layer_out_proj, layer)) is not None:
                writers.append(_projection_writer(f"blocks.{layer}.hook_per_layer_out", layer, "per_layer_out", module, False))
        return writers

    def _mlp_writers(self, layer: int) -> list[ResidualWriter]:
        """The MLP's writers of one layer: its output projection, or in a mixture-of-experts layer one writer per routed
        expert (`blocks.{l}.hook_mlp_out.expert{e}`) and one per shared expert (`...hook_mlp_out.shared{i}`). Every
        expert's output is added to the MLP's output with a per-token weight, so removing a direction from each expert's
        projection removes it from the MLP's write exactly, whatever the router picks."""
        name = f"blocks.{layer}.hook_mlp_out"
        experts = self._optional_module(self.spec.experts, layer) if self.spec.experts else None
        if experts is None:
            return [_projection_writer(name, layer, "mlp_out", self._module(self.spec.mlp_out_proj, layer), self.spec.conv1d_projections)]
        down = getattr(experts, "down_proj", None)
        if not isinstance(down, Tensor) or down.dim() != 3:
            raise FeatsteerError(f"the experts of layer {layer} hold no plain (n_experts, ...) down_proj weight (quantized, e.g. GPT-OSS's MXFP4 "
                                 "kernels?): load the model dequantized (transformers: quantization_config=Mxfp4Config(dequantize=True)) "
                                 "to edit its weights")
        bias = getattr(experts, "down_proj_bias", None)
        writers = [_expert_writer(f"{name}.expert{e}", layer, down, bias, e, self.spec.experts_transposed) for e in range(down.shape[0])]
        if self.spec.experts_beside_mlp:  # Gemma 4: the dense MLP's output and the experts' are added
            writers.insert(0, _projection_writer(f"{name}.dense", layer, "mlp_out", self._module(self.spec.mlp_out_proj, layer), False))
        shared = [module for path in self.spec.shared_experts if (module := self._optional_module(path, layer)) is not None]
        writers.extend(_projection_writer(f"{name}.shared{i}", layer, "mlp_out", module, False) for i, module in enumerate(shared))
        return writers

    def bias_writers(self) -> list[BiasWriter]:
        if self.spec.post_norms:
            return []
        writers = []
        for layer in range(self.n_layers):
            attn_out = self._optional_module(self.spec.attn_out_proj, layer)
            attention = self._optional_module(self.spec.attn, layer)
            value = _value_bias_writer(layer, attention, attn_out, self.n_heads, self._write_scale, self.spec.conv1d_projections)
            if value is not None:
                writers.append(value)
            dense = self._optional_module(self.spec.experts, layer) is None if self.spec.experts else True
            mlp_out = self._optional_module(self.spec.mlp_out_proj, layer) if dense else None  # an expert's bias is routed
            for kind, module in (("attn_out", attn_out), ("mlp_out", mlp_out)):
                if module is not None and isinstance(getattr(module, "bias", None), Tensor):
                    writers.append(_output_bias_writer(f"blocks.{layer}.hook_{kind}", layer, module.bias, self._write_scale))
        return writers

    BIAS_SWITCHES = (("mlp_bias", "mlp"), ("attention_bias", "attn"))
    """Config flags that give a family's MLP or attention projections biases, in the order `add_biases` tries them."""

    def bias_switch(self) -> str | None:
        found = self._bias_switch()
        return found[0] if found else None

    def add_biases(self) -> tuple[str, Callable[[], None]] | None:
        found = self._bias_switch()
        if found is None:
            return None
        flag, missing = found
        return flag, _create_biases(self.model.config.get_text_config(), flag, missing)

    def _bias_switch(self) -> tuple[str, list[nn.Linear]] | None:
        """The first of `BIAS_SWITCHES` the model has off, with the projections it would give biases; None when the model
        has biases already, or is a post-norm or mixture-of-experts family, or has no such switch."""
        if self.spec.post_norms or self.spec.experts or self.bias_writers():
            return None
        config = self.model.config.get_text_config()
        for flag, branch in self.BIAS_SWITCHES:
            if getattr(config, flag, None) is False and (missing := self._biases_switched_on(config, flag, getattr(self.spec, branch))):
                return flag, missing
        return None

    def _biases_switched_on(self, config, flag: str, branch: str) -> list[nn.Linear]:
        """The projections of every layer's `branch` that lack a bias which the same layer built with `flag` on has (found
        by building one layer on the meta device); empty when the layer cannot be built that way."""
        import copy

        switched = copy.deepcopy(config)
        setattr(switched, flag, True)
        try:
            with torch.device("meta"):
                built = type(self.layers[0])(switched, 0)
        except Exception:  # a layer class that does not take (config, layer_idx): no switch featsteer can flip
            return []
        owner = next((m for path in branch.split("|") if (m := _attr_path(built, path)) is not None), None)
        wanted = {name for name, module in (owner.named_modules() if owner is not None else ())
                  if isinstance(module, nn.Linear) and module.bias is not None}
        missing = []
        for layer in range(self.n_layers):
            module = self._optional_module(branch, layer)
            for name, child in (module.named_modules() if module is not None else ()):
                if name in wanted and isinstance(child, nn.Linear) and child.bias is None:
                    missing.append(child)
        return missing

    def _optional_module(self, path: str, layer: int) -> nn.Module | None:
        try:
            return self._module(path, layer)
        except AttributeError:
            return None

    def unembed(self) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        return self.model.get_output_embeddings().weight, self._module(self.spec.final_norm)

    def embedding_tie_undo(self) -> Callable[[], None] | None:
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
            return None
        configs = [c for c in (self.model.config, getattr(self.model.config, "text_config", None)) if c is not None and hasattr(c, "tie_word_embeddings")]
        flags = [(config, config.tie_word_embeddings) for config in configs]

        def retie() -> None:
            head.weight = embed.weight  # the embedding's own parameter, its values restored by then
            for config, flag in flags:
                config.tie_word_embeddings = flag

        return retie

    def untie_embeddings(self) -> None:
        """Give the output head its own copy of a tied embedding matrix.

        Editing the token embedding must not also edit the unembedding (Gemma, Qwen2.5-0.5B and others
        tie them); the copy keeps today's values, and the config is marked untied so exports keep both.
        """
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
            return
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        for config in (self.model.config, getattr(self.model.config, "text_config", None)):
            if config is not None and hasattr(config, "tie_word_embeddings"):
                config.tie_word_embeddings = False


def _output_hook(fns: _Hooks, scale: float = 1.0, like_input: bool = False):
    """Forward hook handing the hooks the module's output times `scale` (what the model adds to the stream after it,
    for Granite's multipliers) and putting a replacement back divided by it. With `like_input`, an output the module
    returns flattened to `(batch * pos, d_model)` (Llama 4's MoE layers) is handed over shaped like the module's
    `(batch, pos, d_model)` input and flattened again."""

    def hook(module, args, output):
        value = _first(output)
        flat = like_input and value.dim() == 2 and args and args[0].dim() == 3
        seen = value.view(args[0].shape) if flat else value
        seen = seen * scale if scale != 1.0 else seen
        new = _apply(fns, seen)
        if new is seen:
            return None
        new = new / scale if scale != 1.0 else new
        return _replace_first(output, new.reshape(value.shape) if flat else new)

    return hook


def _sum_hook(fns: _Hooks, partial: dict[str, Tensor], scale: float = 1.0):
    """Forward hook on the second of two modules whose outputs the layer adds (Granite 4's shared MLP after its experts):
    the hooks see the sum (times `scale`, as `_output_hook`), and a change of it is passed back as a change of this
    module's output."""

    def hook(module, args, output):
        value = _first(output)
        total = partial.pop("beside") + value
        seen = total * scale if scale != 1.0 else total
        new = _apply(fns, seen)
        if new is seen:
            return None
        return _replace_first(output, value + (new / scale if scale != 1.0 else new) - total)

    return hook


def _heads_hook(fns: _Hooks, n_heads: int):
    """Forward pre-hook on the attention output projection: its input, the heads' outputs side by side, is handed to
    the hooks as `(batch, pos, n_heads, d_head)` (TransformerLens's `hook_z`) and put back side by side."""

    def hook(module, args):
        flat = args[0]
        heads = flat.unflatten(-1, (n_heads, flat.shape[-1] // n_heads))
        new = _apply(fns, heads)
        return None if new is heads else (new.flatten(-2), *args[1:])

    return hook


def _norm_hook(fns: _Hooks, spec: FamilySpec):
    """Forward hook on a norm: hands the hooks the normalised input before the norm's weight (TransformerLens's
    `hook_normalized`) and passes a change `dz` on to the output as `dz * weight`."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        normalized = _normalize(module, x, spec)
        new = _apply(fns, normalized)
        return None if new is normalized else _through_norm(output, new, normalized, module, spec)

    return hook


def _stash_normalized(state: dict[str, Tensor], spec: FamilySpec):
    """Forward hook on a norm two branches share: keeps its normalised input for `_branch_input_hook`."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        state["normalized"] = _normalize(module, x, spec)

    return hook


def _branch_input_hook(fns: _Hooks, state: dict[str, Tensor], norm: nn.Module, spec: FamilySpec):
    """Forward pre-hook on one branch (attention or MLP) reading a shared norm: hands the hooks the normalised vector
    and passes a change `dz` on to this branch's input only, as `dz * weight`."""

    def hook(module, args, kwargs):
        normalized = state["normalized"]
        new = _apply(fns, normalized)
        if new is normalized:
            return None
        return _with_hidden(args, kwargs, _through_norm(_hidden(args, kwargs), new, normalized, norm, spec))

    return hook


def _normalize(module: nn.Module, x: Tensor, spec: FamilySpec) -> Tensor:
    """The norm's input centred (LayerNorm) and divided by its root mean square, in float32, as the norm computes it."""
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
    hidden = x.float()
    if spec.layer_norm:
        hidden = hidden - hidden.mean(-1, keepdim=True)
    return (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _hidden(args, kwargs) -> Tensor:
    """The hidden states a module is called with, positionally or as `hidden_states=`."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, value: Tensor):
    """A forward pre-hook's return value that calls the module with `value` as its hidden states."""
    return ((value, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": value})


def _through_norm(output: Tensor, new: Tensor, normalized: Tensor, norm: nn.Module, spec: FamilySpec) -> Tensor:
    """`output` (what a norm gave, or what it fed a branch) with the change `new - normalized` of its normalised input
    passed on as `dz * weight`."""
    scale = norm.weight.float() + spec.norm_weight_offset
    return (output.float() + (new.float() - normalized.float()) * scale).to(output.dtype)


def _pre_hook(fns: _Hooks):
    def hook(module, args, kwargs):
        hidden = _hidden(args, kwargs)
        new = _apply(fns, hidden)
        return None if new is hidden else _with_hidden(args, kwargs, new)

    return hook


def _stash_input(state: dict[str, Tensor]):
    """Forward pre-hook on the module that reads a block's input first (its attention norm, or the attention itself):
    keeps that input as `resid_pre` for `_AttentionSite`. Read there rather than in a pre-hook on the block, it includes
    the changes of every resid_pre hook, also of those installed after it (which run after it on the block)."""

    def hook(module, args, kwargs):
        state["resid_pre"] = _hidden(args, kwargs)

    return hook


class _AttentionSite:
    """The one forward hook on a layer's attention contribution that every installed `attn_out` and `resid_mid` hook
    shares. `attn_out` hooks see the contribution times `scale` (as `_output_hook`); `resid_mid` is `resid_pre` plus what
    every `attn_out` hook, of any installation, made of it, and its change is passed back as a change of the contribution.
    One hook per layer keeps that order: with a hook per installation, a `resid_mid` hook installed first ran before the
    `attn_out` hooks installed after it and read the stream without their change."""

    def __init__(self, scale: float):
        self.scale = scale
        self.entries: list[tuple[_Hooks, _Hooks]] = []
        """`(attn_out hooks, resid_mid hooks)` per installation, in installation order."""
        self.state: dict[str, Tensor] = {}
        self.handles: list = []

    def __call__(self, module, args, output):
        value = _first(output)
        seen = value * self.scale if self.scale != 1.0 else value
        new = seen
        for attn_fns, _ in self.entries:
            new = _apply(attn_fns, new)
        resid_pre = self.state.pop("resid_pre", None)
        if mids := [fns for _, fns in self.entries if fns]:
            resid_mid = resid_pre + new
            new_mid = resid_mid
            for mid_fns in mids:
                new_mid = _apply(mid_fns, new_mid)
            if new_mid is not resid_mid:
                new = new + (new_mid - resid_mid)
        if new is seen:
            return None
        return _replace_first(output, new / self.scale if self.scale != 1.0 else new)


def _routable(experts: nn.Module | None) -> bool:
    """Whether an experts module takes the router's choice as `(hidden, top_k_index, top_k_weights)`, as transformers 5's
    fused experts do (GPT-OSS's under other names); Llama 4's take inputs the router has already weighted."""
    return experts is not None and len(inspect.signature(experts.forward).parameters) >= 3


def _stash_shape(state: dict[str, tuple[int, int]]):
    """Pre-hook on a decoder layer: keep its input's `(batch, pos)`, which the experts see flattened."""

    def hook(module, args, kwargs):
        state["shape"] = tuple(_hidden(args, kwargs).shape[:2])

    return hook


def _routing_hook(fns: _Hooks, state: dict[str, tuple[int, int]], n_experts: int):
    """Pre-hook on a fused experts module: hand the hooks the router's choice as a `(batch, pos, n_experts)` weight matrix
    (`blocks.{l}.mlp.hook_routing`) and, when one returns a changed matrix, pass the experts its nonzero entries as
    `(top_k_index, top_k_weights)` (as many per token as the most a token now has; padding entries weigh zero)."""

    signature = {}

    def hook(module, args, kwargs):
        if not signature:  # read once: the experts' forward, e.g. (hidden_states, top_k_index, top_k_weights)
            signature["forward"] = inspect.signature(module.forward)
            signature["names"] = list(signature["forward"].parameters)[1:3]
        bound = signature["forward"].bind(*args, **kwargs)
        index_name, weight_name = signature["names"]
        index, weights = bound.arguments[index_name], bound.arguments[weight_name]
        tokens = index.shape[0]
        dense = torch.zeros(tokens, n_experts, dtype=weights.dtype, device=weights.device).scatter(1, index.long(), weights)
        batch, pos = state.get("shape", (1, tokens))
        seen = dense.view(batch, pos, n_experts) if batch * pos == tokens else dense.view(1, tokens, n_experts)
        new = _apply(fns, seen)
        if new is seen:
            return None
        flat = new.reshape(tokens, n_experts).to(weights.dtype)
        width = max(1, int((flat != 0).sum(-1).max()))
        picked = flat.abs().topk(width, dim=-1).indices
        bound.arguments[index_name] = picked.to(index.dtype)
        bound.arguments[weight_name] = flat.gather(1, picked)
        return bound.args, bound.kwargs

    return hook


class _RouterLogits(TorchFunctionMode):
    """Active while one router runs: the first linear output `n_experts` wide is the router's logits. It goes to the hooks
    as `(batch, pos, n_experts)`, and what they return replaces it, so the router's own code chooses from the change."""

    def __init__(self, fns: _Hooks, shape: tuple[int, int] | None, n_experts: int):
        super().__init__()
        self.fns, self.shape, self.n_experts, self.seen = fns, shape, n_experts, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.seen or func is not F.linear or not isinstance(out, Tensor) or out.shape[-1] != self.n_experts:
            return out
        self.seen = True
        tokens = out.numel() // self.n_experts
        batch, pos = self.shape if self.shape and self.shape[0] * self.shape[1] == tokens else (1, tokens)
        seen = out.view(batch, pos, self.n_experts)
        new = _apply(self.fns, seen)
        return out if new is seen else new.reshape(out.shape).to(out.dtype)


def _enter_router(mode: list[_RouterLogits], fns: _Hooks, state: dict[str, tuple[int, int]], n_experts: int):
    """Pre-hook on a router: switch on a `_RouterLogits` for this call."""

    def hook(module, args):
        mode.append(_RouterLogits(fns, state.get("shape"), n_experts))
        mode[-1].__enter__()

    return hook


def _leave_router(mode: list[_RouterLogits], name: str, router: nn.Module):
    """Forward hook (always called) on a router: switch its `_RouterLogits` off; a router that computed no logits featsteer
    could see gets a one-line error instead of hooks that silently never ran."""

    def hook(module, args, output):
        if not mode:
            return None
        active = mode.pop()
        active.__exit__(None, None, None)
        if output is not None and not active.seen:
            raise FeatsteerError(f"{name}: the router ({type(router).__name__}) computed no {active.n_experts}-wide linear output for "
                                 "featsteer to read as its logits; hook blocks.L.mlp.hook_routing (the choice it made) instead")
        return None

    return hook


def _router_scores_hook(fns: _Hooks, state: dict[str, tuple[int, int]], n_experts: int):
    """Forward hook on a router that returns `(scores, logits)` with `scores` one dense `(tokens, n_experts)` weight per
    expert (Llama 4, whose experts read their inputs multiplied by it): `blocks.{l}.mlp.hook_routing` is `scores`."""

    def hook(module, args, output):
        scores = output[0]
        tokens = scores.shape[0]
        batch, pos = state.get("shape", (1, tokens))
        seen = scores.view(batch, pos, n_experts) if batch * pos == tokens else scores.view(1, tokens, n_experts)
        new = _apply(fns, seen)
        return None if new is seen else (new.reshape(scores.shape).to(scores.dtype), *output[1:])

    return hook


def _drop_attention_weights(module, args, output):
    """Forward hook: `(attn_output, attn_weights, ...)` -> `(attn_output, None, ...)`."""
    if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], Tensor):
        return (output[0], None, *output[2:])
    return None


def _embedding_writer(name: str, layer: int | None, kind: str, module: nn.Embedding, before_write) -> ResidualWriter:
    def read() -> tuple[Tensor, Tensor | None]:
        return module.weight.detach().T, None

    def write(weight: Tensor, bias: Tensor | None) -> None:
        if before_write is not None:
            before_write()
        _replace(module.weight, weight.T)

    return ResidualWriter(name=name, layer=layer, kind=kind, read=read, write=write, replaces=True)


def _projection_writer(name: str, layer: int, kind: str, module: nn.Module, conv1d: bool) -> ResidualWriter:
    def read() -> tuple[Tensor, Tensor | None]:
        if not isinstance(getattr(module, "weight", None), Tensor):  # GPTQ/AWQ modules hold packed `qweight`s instead
            raise FeatsteerError(f"{name}: the {type(module).__name__} module holds no plain weight (a quantised checkpoint?): load the "
                                 "model unquantised or dequantized to edit its weights")
        weight = module.weight.detach()
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        return (weight.T if conv1d else weight), bias

    def write(weight: Tensor, bias: Tensor | None) -> None:
        _replace(module.weight, weight.T if conv1d else weight)
        if bias is not None and getattr(module, "bias", None) is not None:
            _replace(module.bias, bias)

    return ResidualWriter(name=name, layer=layer, kind=kind, read=read, write=write, replaces=True)


def _output_bias_writer(name: str, layer: int, bias: nn.Parameter, scale: float) -> BiasWriter:
    """An output projection's bias: it adds `scale * bias` to the stream at every position."""
    return BiasWriter(name, layer, lambda: scale * torch.eye(bias.shape[0], dtype=torch.float64), lambda: bias.detach(),
                      lambda value: _copy_into(bias, value))


def _value_bias_writer(layer: int, attention: nn.Module | None, out_proj: nn.Module | None, n_heads: int, scale: float,
                       conv1d: bool) -> BiasWriter | None:
    """The attention's value bias as a `BiasWriter`, when the layer has a separate biased `v_proj` feeding a softmax
    attention whose heads the output projection reads side by side; None otherwise (no such bias, fused projections,
    attention sinks, whose softmax rows do not sum to 1)."""
    v_proj = getattr(attention, "v_proj", None)
    if (conv1d or out_proj is None or not isinstance(v_proj, nn.Linear) or v_proj.bias is None or hasattr(attention, "sinks")
            or not isinstance(getattr(out_proj, "weight", None), Tensor) or out_proj.weight.shape[1] % n_heads):
        return None
    d_head = out_proj.weight.shape[1] // n_heads
    n_kv = v_proj.out_features // d_head
    if v_proj.out_features % d_head or n_kv < 1 or n_heads % n_kv:
        return None
    bias = v_proj.bias

    def reach() -> Tensor:
        # query head h reads key-value head h // (n_heads / n_kv), as transformers' repeat_kv lays them out
        heads = out_proj.weight.detach().double().unflatten(1, (n_kv, n_heads // n_kv, d_head))  # (d_model, kv, rep, d_head)
        return scale * heads.sum(2).flatten(1)

    return BiasWriter(f"blocks.{layer}.attn.b_V", layer, reach, lambda: bias.detach(), lambda value: _copy_into(bias, value))


def _attr_path(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return operator.attrgetter(path)(root)
    except AttributeError:
        return None


def _create_biases(config, flag: str, modules: list[nn.Linear]) -> Callable[[], None]:
    """Zero biases on `modules` and `config.flag` on; returns the undo."""
    for module in modules:
        module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device),
                                   requires_grad=module.weight.requires_grad)
    setattr(config, flag, True)

    def undo() -> None:
        for module in modules:
            module.bias = None
        setattr(config, flag, False)

    return undo


def _copy_into(param: nn.Parameter, value: Tensor) -> None:
    if value.shape != param.shape:
        raise FeatsteerError(f"a bias of shape {tuple(param.shape)} cannot take a tensor of shape {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value)


def _replace(param: nn.Parameter, value: Tensor) -> None:
    """Point `param` at `value`'s storage (in its stored layout) instead of copying into the old one.

    The old storage is left as it was, so what `read()` returned before stays valid as the original for a revert
    without a copy, and weights that transformers left memory-mapped from the checkpoint are not copied page by page
    on first write (which made an edit of Qwen2.5-0.5B spend 2.8 of its 5 s in `copy_`).
    """
    if value.shape != param.shape or value.dtype != param.dtype or value.device != param.device:
        raise FeatsteerError(f"a weight of shape {tuple(param.shape)} ({param.dtype}, {param.device}) cannot take a tensor of shape "
                             f"{tuple(value.shape)} ({value.dtype}, {value.device})")
    param.data = value if value.is_contiguous() else value.contiguous()


def _expert_writer(name: str, layer: int, down: nn.Parameter, bias: nn.Parameter | None, expert: int,
                   transposed: bool) -> ResidualWriter:
    """One routed expert's slice of a fused `down_proj` (and its bias row), read and written as `(d_model, d_mlp)`."""

    def read() -> tuple[Tensor, Tensor | None]:
        weight = down.detach()[expert]
        return (weight.T if transposed else weight), (bias.detach()[expert] if bias is not None else None)

    def write(weight: Tensor, new_bias: Tensor | None) -> None:
        with torch.no_grad():
            down[expert].copy_(weight.T if transposed else weight)
            if new_bias is not None and bias is not None:
                bias[expert].copy_(new_bias)

    return ResidualWriter(name=name, layer=layer, kind="mlp_out", read=read, write=write)


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """`cache` in newer transformers 5.x releases, `past_key_values` (now deprecated) before them."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
