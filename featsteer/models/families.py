"""Model families described as data.

Each supported Hugging Face architecture is one `FamilySpec` row: where its decoder layers, embeddings,
final norm, and the two modules whose outputs are added to the residual stream live. Everything else in
featsteer (hook points, weight edits, capture) reads these rows instead of branching on model names, so a
new family is one table entry plus a tiny-config test.
"""

from __future__ import annotations

from dataclasses import dataclass

from featsteer.errors import FeatsteerError


@dataclass(frozen=True)
class FamilySpec:
    """Where the residual-stream pieces of one architecture family live.

    All paths are dotted attribute paths; layer-relative paths start at one decoder layer.
    """

    name: str
    """Human-readable family name used in messages and provenance."""
    model_types: tuple[str, ...]
    """`config.model_type` values this row covers."""
    layers: str
    """Path from the causal-LM object to the `ModuleList` of decoder layers."""
    embed_tokens: str
    """Path to the token embedding module (its output is what enters the residual stream)."""
    final_norm: str
    """Path to the norm applied before the unembedding."""
    attn: str
    """Layer-relative path to the attention module (`a|b`: the first the layer has; LFM2's short-convolution layers hold
    `conv` where its attention layers hold `self_attn`)."""
    attn_out_proj: str
    """Layer-relative path to the attention output projection (writes into the residual stream)."""
    mlp: str
    """Layer-relative path to the MLP module."""
    mlp_out_proj: str
    """Layer-relative path to the MLP output projection (writes into the residual stream)."""
    attn_norm: str | None
    """Layer-relative path to the norm whose output the attention reads (`blocks.{l}.ln1.hook_normalized`); None when
    the attention reads the stream itself (OLMo 2, EXAONE 4 normalise only its output)."""
    mlp_norm: str | None
    """Layer-relative path to the norm whose output the MLP reads (`blocks.{l}.ln2.hook_normalized`); None as for
    `attn_norm`."""
    attn_out_site: str | None = None
    """Layer-relative module whose output is added to the residual after attention, when it is not the
    attention module itself (Gemma 2/3 apply `post_attention_layernorm` there)."""
    mlp_out_site: str | None = None
    """As `attn_out_site`, for the MLP branch (Gemma 2/3: `post_feedforward_layernorm`)."""
    pos_embed: str | None = None
    """Path to a learned absolute position embedding that is added to the residual (GPT-2)."""
    conv1d_projections: bool = False
    """True when projections are GPT-2 `Conv1D` modules, whose weight is stored as (d_in, d_out)."""
    embedding_scaled: bool = False
    """True when the embedding module multiplies its output by sqrt(d_model) (Gemma)."""
    norm_weight_offset: float = 0.0
    """Added to a norm's weight before it scales (Gemma's RMSNorm multiplies by `1 + weight`)."""
    layer_norm: bool = False
    """True when the norms are LayerNorms (centre, scale, shift) rather than RMSNorms (scale only)."""
    post_norms: bool = False
    """True when attention/MLP outputs pass through an extra norm before the residual add (Gemma 2/3, OLMo 2, GLM-4).
    Weight orthogonalisation cannot then be exactly equivalent to ablating the residual write."""
    parallel: bool | str = False
    """True when attention and MLP both read the block's input and their outputs are added to the stream together
    (GPT-J style: Cohere, Phi-2, GPT-NeoX/Pythia), so there is no `hook_resid_mid`; a string names the config flag that
    decides it per checkpoint (`use_parallel_residual`). When both branches read one shared norm, `ln1`/`ln2` hooks act
    on each branch's own input."""
    embedding_multiplier: str | None = None
    """Config attribute by which the model multiplies the token embedding after the embedding module (Granite's
    `embedding_multiplier`); `hook_embed` carries the product, what enters the stream."""
    residual_multiplier: str | None = None
    """Config attribute by which the attention and MLP outputs are multiplied before the residual add (Granite's
    `residual_multiplier`); `hook_attn_out` and `hook_mlp_out` carry the product, what is added to the stream."""
    experts: str | None = None
    """Layer-relative path to a mixture-of-experts layer's experts module, which holds every expert's output projection
    in one `down_proj` parameter `(n_experts, d_model, d_mlp)` (transformers 5 fuses them). A layer where the path does
    not resolve is a dense layer (Qwen-MoE's `mlp_only_layers`, DeepSeek's first layers) and uses `mlp_out_proj`."""
    experts_transposed: bool = False
    """True when the fused `down_proj` is stored `(n_experts, d_mlp, d_model)` and applied as `x @ W` (GPT-OSS); its
    bias, when there is one, is `down_proj_bias` `(n_experts, d_model)`."""
    mlp_beside: str | None = None
    """Layer-relative module that runs before `mlp` on the same input and whose output is added to the MLP's (Granite 4's
    routed experts beside its shared MLP): `hook_mlp_out` carries the sum. Layers without it (dense checkpoints) have
    the MLP alone."""
    experts_beside_mlp: bool = False
    """True when a mixture-of-experts layer keeps its dense MLP and adds the experts' output to it (Gemma 4's MoE
    checkpoints): the layer's writers are the MLP's projection and every expert's slice."""
    per_layer_out_proj: str | None = None
    """Layer-relative path to the output projection of a third branch, added after the MLP, that reads a per-layer input
    embedding (Gemma 4's PLE, `per_layer_projection`); layers without it have none (Gemma 4's larger checkpoints)."""
    per_layer_out_site: str | None = None
    """Layer-relative module whose output that branch adds to the stream (`blocks.{l}.hook_per_layer_out`)."""
    layer_scalar: str | None = None
    """Layer-relative buffer by which a layer multiplies the whole stream before it returns (Gemma 4's `layer_scalar`):
    `resid_post = layer_scalar * (resid_mid + mlp_out + per_layer_out)`. Scaling keeps a removed direction removed."""
    shared_experts: tuple[str, ...] = ()
    """Layer-relative paths to the output projections of experts every token passes through (Qwen2-MoE's
    `shared_expert`, DeepSeek's `shared_experts`), edited beside the routed ones."""

    @property
    def attn_site(self) -> str:
        """Module whose output is the attention contribution to the residual stream."""
        return self.attn_out_site or self.attn

    @property
    def mlp_site(self) -> str:
        """Module whose output is the MLP contribution to the residual stream."""
        return self.mlp_out_site or self.mlp


_LLAMA_LIKE = dict(
    layers="model.layers",
    embed_tokens="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    attn_out_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_out_proj="mlp.down_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
)
_MULTIMODAL = dict(layers="model.language_model.layers", embed_tokens="model.language_model.embed_tokens",
                   final_norm="model.language_model.norm")
"""Where the text decoder of an image-text model (`...ForConditionalGeneration`) keeps its layers; the rest is the
text family's own layout."""
_GEMMA2_LAYOUT = dict(
    attn_out_site="post_attention_layernorm",
    mlp_out_site="post_feedforward_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    embedding_scaled=True,
    norm_weight_offset=1.0,
    post_norms=True,
)
_ROUTED = dict(experts="mlp.experts")
_LLAMA_4 = {**_LLAMA_LIKE, "mlp": "feed_forward", "mlp_out_proj": "feed_forward.down_proj", "experts": "feed_forward.experts",
            "experts_transposed": True, "shared_experts": ("feed_forward.shared_expert.down_proj",)}
"""Llama 4: MoE layers interleaved with dense ones, experts stored `(n_experts, d_mlp, d_model)` as GPT-OSS's, a shared
expert; the image-text checkpoint's text model sits under `language_model`."""

_GATED_DELTANET = {**_LLAMA_LIKE, "attn": "self_attn|linear_attn", "attn_out_proj": "self_attn.o_proj|linear_attn.out_proj"}
"""Qwen3-Next and Qwen3.5: most layers mix tokens with a gated DeltaNet (linear attention, `linear_attn`), every few a
softmax attention layer (`self_attn`); both write through an output projection. Their RMSNorms scale by `1 + weight`
as Gemma's do."""
_TEXT_OR_IMAGE_TEXT = {key: f"{_LLAMA_LIKE[key]}|{value}" for key, value in _MULTIMODAL.items()}
"""Qwen3.5 checkpoints are image-text models that `AutoModelForCausalLM` loads as their text decoder alone (the paths of
`_LLAMA_LIKE`); a model built with `AutoModelForImageTextToText` keeps the decoder under `language_model` instead."""

_GEMMA_4 = {**_LLAMA_LIKE, **_GEMMA2_LAYOUT, "experts": "experts", "experts_beside_mlp": True, "per_layer_out_proj": "per_layer_projection",
            "per_layer_out_site": "post_per_layer_input_norm", "layer_scalar": "layer_scalar", "norm_weight_offset": 0.0}
"""Gemma 4: Gemma 2's post-norms with plain `weight` norms; the small checkpoints (E2B, E4B) add a per-layer input branch
after the MLP, the MoE checkpoint runs experts beside the dense MLP, and every layer ends by scaling the stream."""

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="llama",
        model_types=("llama", "mistral", "ministral", "smollm3", "arcee", "seed_oss", "ernie4_5",
                     "hunyuan_v1_dense"),
        **_LLAMA_LIKE,
    ),
    FamilySpec(name="qwen", model_types=("qwen2", "qwen3"), **_LLAMA_LIKE),
    FamilySpec(name="phi3", model_types=("phi3",), **_LLAMA_LIKE),
    FamilySpec(name="gemma", model_types=("gemma",), embedding_scaled=True, norm_weight_offset=1.0, **_LLAMA_LIKE),
    FamilySpec(name="gemma2", model_types=("gemma2", "gemma3_text"), **{**_LLAMA_LIKE, **_GEMMA2_LAYOUT}),
    FamilySpec(name="gemma3", model_types=("gemma3",), **{**_LLAMA_LIKE, **_GEMMA2_LAYOUT, **_MULTIMODAL}),
    FamilySpec(name="gemma4", model_types=("gemma4_text",), **_GEMMA_4),
    FamilySpec(name="gemma4", model_types=("gemma4",), **{**_GEMMA_4, **_MULTIMODAL}),
    FamilySpec(name="mistral3", model_types=("mistral3",), **{**_LLAMA_LIKE, **_MULTIMODAL}),
    FamilySpec(
        name="olmo2", model_types=("olmo2", "olmo3", "exaone4"),
        **{**_LLAMA_LIKE, "attn_norm": None, "mlp_norm": None, "attn_out_site": "post_attention_layernorm",
           "mlp_out_site": "post_feedforward_layernorm", "post_norms": True},
    ),
    FamilySpec(
        name="glm4", model_types=("glm4",),
        **{**_LLAMA_LIKE, "attn_out_site": "post_self_attn_layernorm", "mlp_out_site": "post_mlp_layernorm", "post_norms": True},
    ),
    FamilySpec(name="apertus", model_types=("apertus",),
               **{**_LLAMA_LIKE, "attn_norm": "attention_layernorm", "mlp_norm": "feedforward_layernorm"}),
    FamilySpec(name="starcoder2", model_types=("starcoder2",), layer_norm=True, **{**_LLAMA_LIKE, "mlp_out_proj": "mlp.c_proj"}),
    FamilySpec(name="moe", model_types=("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dots1", "glm4_moe",
                                        "ernie4_5_moe", "hunyuan_v1_moe"),
               shared_experts=("mlp.shared_expert.down_proj", "mlp.shared_experts.down_proj", "mlp.shared_mlp.down_proj"), **_LLAMA_LIKE, **_ROUTED),
    FamilySpec(name="qwen3_5", model_types=("qwen3_5", "qwen3_5_text"), norm_weight_offset=1.0, **{**_GATED_DELTANET, **_TEXT_OR_IMAGE_TEXT}),
    FamilySpec(name="qwen3_5_moe", model_types=("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"),
               shared_experts=("mlp.shared_expert.down_proj",), norm_weight_offset=1.0, **{**_GATED_DELTANET, **_TEXT_OR_IMAGE_TEXT}, **_ROUTED),
    FamilySpec(name="granite", model_types=("granite",), embedding_multiplier="embedding_multiplier",
               residual_multiplier="residual_multiplier", **_LLAMA_LIKE),
    FamilySpec(name="granitemoe", model_types=("granitemoe",), embedding_multiplier="embedding_multiplier",
               residual_multiplier="residual_multiplier", **{**_LLAMA_LIKE, "mlp": "block_sparse_moe", "experts": "block_sparse_moe.experts"}),
    FamilySpec(name="granitemoehybrid", model_types=("granitemoehybrid",), embedding_multiplier="embedding_multiplier",
               residual_multiplier="residual_multiplier",
               **{**_LLAMA_LIKE, "attn": "self_attn|mamba", "attn_out_proj": "self_attn.o_proj|mamba.out_proj", "mlp": "shared_mlp",
                  "mlp_out_proj": "shared_mlp.output_linear", "mlp_beside": "block_sparse_moe", "experts": "block_sparse_moe.experts",
                  "shared_experts": ("shared_mlp.output_linear",)}),
    FamilySpec(name="phimoe", model_types=("phimoe",), layer_norm=True, **_LLAMA_LIKE, **_ROUTED),
    FamilySpec(name="gpt_oss", model_types=("gpt_oss",), experts_transposed=True, **_LLAMA_LIKE, **_ROUTED),
    FamilySpec(name="llama4", model_types=("llama4_text",), **_LLAMA_4),
    FamilySpec(name="llama4", model_types=("llama4",), **{**_LLAMA_4, "layers": "language_model.model.layers",
                                                          "embed_tokens": "language_model.model.embed_tokens",
                                                          "final_norm": "language_model.model.norm"}),
    FamilySpec(name="lfm2", model_types=("lfm2",),
               **{**_LLAMA_LIKE, "final_norm": "model.embedding_norm", "attn": "self_attn|conv", "attn_out_proj": "self_attn.out_proj|conv.out_proj",
                  "mlp": "feed_forward", "mlp_out_proj": "feed_forward.w2", "attn_norm": "operator_norm", "mlp_norm": "ffn_norm"}),
    FamilySpec(name="cohere", model_types=("cohere", "cohere2"), layer_norm=True, parallel=True,
               **{**_LLAMA_LIKE, "mlp_norm": "input_layernorm"}),
    FamilySpec(name="phi", model_types=("phi",), layer_norm=True, parallel=True,
               **{**_LLAMA_LIKE, "final_norm": "model.final_layernorm", "attn_out_proj": "self_attn.dense", "mlp_out_proj": "mlp.fc2",
                  "mlp_norm": "input_layernorm"}),
    FamilySpec(name="stablelm", model_types=("stablelm",), layer_norm=True, parallel="use_parallel_residual", **_LLAMA_LIKE),
    FamilySpec(
        name="gpt_neox", model_types=("gpt_neox",), layers="gpt_neox.layers", embed_tokens="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm", attn="attention", attn_out_proj="attention.dense", mlp="mlp",
        mlp_out_proj="mlp.dense_4h_to_h", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", layer_norm=True,
        parallel="use_parallel_residual",
    ),
    FamilySpec(
        name="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        embed_tokens="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn",
        attn_out_proj="attn.c_proj",
        mlp="mlp",
        mlp_out_proj="mlp.c_proj",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        layer_norm=True,
        pos_embed="transformer.wpe",
        conv1d_projections=True,
    ),
)


def supported_model_types() -> list[str]:
    """All `config.model_type` values featsteer knows how to hook."""
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model_type: str) -> FamilySpec:
    """Look up the family row for a `config.model_type`.

    Raises:
        FeatsteerError: if the architecture is not supported; the message lists the supported ones.
    """
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise FeatsteerError(
        f"unsupported architecture '{model_type}': featsteer supports {', '.join(supported_model_types())}; "
        "wrap the model in TransformerLens (HookedTransformer/TransformerBridge) or add a FamilySpec row"
    )
