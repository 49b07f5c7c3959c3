"""Tiny random models of every supported family, built from configs (no hub access).

Shared by the test suite, the benchmarks and users' own tests: a byte-level tokenizer with a small chat
template, one config per supported `config.model_type` with a handful of layers so every test runs in milliseconds, and the
same weights as a TransformerLens `HookedTransformer` for equivalence checks.
"""

from __future__ import annotations

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|system|>", "<|assistant|>", "<|end|>"]


def byte_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (any text encodes) with role markers and an optional chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIALS[:4])}
    vocab.update({c: i + 4 for i, c in enumerate(alphabet)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )
    tokenizer.padding_side = "left"
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


HARMONY_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
"""GPT-OSS's turn layout without its system-message boilerplate: the response starts after `<|start|>assistant`."""
HARMONY_SPECIALS = ["<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|return|>", "<|call|>"]
"""Harmony's control tokens beside `<|end|>` (already in `SPECIALS`)."""


def harmony_tokenizer() -> PreTrainedTokenizerFast:
    """`byte_tokenizer()` with GPT-OSS's harmony control tokens and a harmony chat template, for tests of reasoning
    models that write an analysis message before their final answer (no hub access)."""
    tokenizer = byte_tokenizer(chat=False)
    tokenizer.add_special_tokens({"additional_special_tokens": HARMONY_SPECIALS}, replace_extra_special_tokens=False)
    tokenizer.chat_template = HARMONY_TEMPLATE
    return tokenizer


def _configs(vocab: int) -> dict:
    """Config builders by `model_type`; each is called only for the model asked for."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common = dict(**ids, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    plain_rope = {"rope_type": "default", "rope_theta": 10000.0}  # not the checkpoints' long-context scaling
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=48)
    llama4_text = dict(**common, head_dim=16, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=96,
                       interleave_moe_layer_step=2, attention_chunk_size=8, rope_parameters=plain_rope)
    hybrid_layers = ["linear_attention", "full_attention", "linear_attention"]  # gated DeltaNet, attention, DeltaNet
    linear_attn = dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                       linear_conv_kernel_dim=3, layer_types=hybrid_layers)
    qwen3_5_moe = dict(**common, **moe, **linear_attn, num_experts=4, shared_expert_intermediate_size=32)
    tiny_vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    gemma4 = dict(**common, head_dim=16, global_head_dim=32, sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                                                                       "full_attention"])
    gemma4_ple = dict(**gemma4, vocab_size_per_layer_input=vocab, hidden_size_per_layer_input=8, num_kv_shared_layers=1)
    gemma4_moe = dict(**gemma4, hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=4, top_k_experts=2,
                      moe_intermediate_size=48)
    tiny_qwen_vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=14)
    return {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common),
        "ministral": lambda: tf.MinistralConfig(**common, head_dim=16),
        "smollm3": lambda: tf.SmolLM3Config(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=16),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8),
        "gemma3": lambda: tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8),
                                          vision_config=tf.SiglipVisionConfig(**tiny_vision), mm_tokens_per_image=1, **ids),
        "gemma4_text": lambda: tf.Gemma4TextConfig(**gemma4_ple),  # E2B/E4B layout: per-layer inputs, KV sharing
        "gemma4": lambda: tf.Gemma4Config(text_config=gemma4_moe, vision_config=tf.Gemma4VisionConfig(  # 26B-A4B layout: MoE
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
            patch_size=4, position_embedding_size=64), audio_config=None, **ids),
        "mistral3": lambda: tf.Mistral3Config(text_config=tf.MistralConfig(**common),
                                              vision_config=tf.PixtralVisionConfig(**tiny_vision, head_dim=8), **ids),
        "phi3": lambda: tf.Phi3Config(**common),
        "olmo2": lambda: tf.Olmo2Config(**common),
        "exaone4": lambda: tf.Exaone4Config(**common),
        "glm4": lambda: tf.Glm4Config(**common, head_dim=16),
        "apertus": lambda: tf.ApertusConfig(**common, rope_parameters=plain_rope),
        "starcoder2": lambda: tf.Starcoder2Config(**common),
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**common, **moe, num_experts=4, shared_expert_intermediate_size=96, mlp_only_layers=[0]),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, **moe, num_experts=4, head_dim=16),
        "olmoe": lambda: tf.OlmoeConfig(**common, num_experts=4, num_experts_per_tok=2),
        "deepseek_v3": lambda: tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, **moe, n_routed_experts=4,
                                                   n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                                   kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                   v_head_dim=16),
        "granite": lambda: tf.GraniteConfig(**common, embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.2,
                                            logits_scaling=2.0),
        "granitemoe": lambda: tf.GraniteMoeConfig(**common, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
                                                  residual_multiplier=0.4, logits_scaling=2.0),
        "olmo3": lambda: tf.Olmo3Config(**common, sliding_window=8),
        "arcee": lambda: tf.ArceeConfig(**common),
        "seed_oss": lambda: tf.SeedOssConfig(**common, head_dim=16),
        "ernie4_5": lambda: tf.Ernie4_5Config(**common, head_dim=16),
        "hunyuan_v1_dense": lambda: tf.HunYuanDenseV1Config(**common, head_dim=16),
        "dots1": lambda: tf.Dots1Config(**common, **moe, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                                        n_group=1, topk_group=1),
        "phimoe": lambda: tf.PhimoeConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "gpt_oss": lambda: tf.GptOssConfig(**{**common, "intermediate_size": 96}, num_local_experts=4, num_experts_per_tok=2,
                                           head_dim=16, rope_parameters=plain_rope),
        "llama4_text": lambda: tf.Llama4TextConfig(**llama4_text),
        "llama4": lambda: tf.Llama4Config(text_config=tf.Llama4TextConfig(**llama4_text), vision_config=tf.Llama4VisionConfig(
            **tiny_vision, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16), **ids),
        "lfm2": lambda: tf.Lfm2Config(**common, layer_types=["full_attention", "conv", "full_attention"], block_auto_adjust_ff_dim=False,
                                      conv_bias=True),
        "qwen3_5_text": lambda: tf.Qwen3_5TextConfig(**common, **linear_attn),
        "qwen3_5": lambda: tf.Qwen3_5Config(text_config=dict(**common, **linear_attn), vision_config=tiny_qwen_vision, **ids),
        "qwen3_5_moe_text": lambda: tf.Qwen3_5MoeTextConfig(**qwen3_5_moe),
        "qwen3_5_moe": lambda: tf.Qwen3_5MoeConfig(text_config=qwen3_5_moe, vision_config=tiny_qwen_vision, **ids),
        "qwen3_next": lambda: tf.Qwen3NextConfig(**{**qwen3_5_moe, "layer_types": None}, full_attention_interval=2),
        "glm4_moe": lambda: tf.Glm4MoeConfig(**common, **moe, head_dim=16, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                                             n_group=1, topk_group=1),
        "ernie4_5_moe": lambda: tf.Ernie4_5_MoeConfig(**common, **moe, moe_num_experts=4, moe_num_shared_experts=1, moe_layer_start_index=1),
        "hunyuan_v1_moe": lambda: tf.HunYuanMoEV1Config(**common, head_dim=16, num_experts=4, moe_topk=2),
        "deepseek_v2": lambda: tf.DeepseekV2Config(**{**common, "num_key_value_heads": 4}, **moe, n_routed_experts=4, n_shared_experts=1,
                                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                                   qk_nope_head_dim=8, v_head_dim=16),
        "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(**common, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0,
                                                              residual_multiplier=0.4, logits_scaling=2.0, shared_intermediate_size=96,
                                                              layer_types=["linear_attention", "attention", "linear_attention"],
                                                              mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1,
                                                              mamba_d_conv=3),
        "cohere": lambda: tf.CohereConfig(**common),
        "cohere2": lambda: tf.Cohere2Config(**common, sliding_window=8),
        "phi": lambda: tf.PhiConfig(**common),
        "stablelm": lambda: tf.StableLmConfig(**common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"}),
        "gpt2": lambda: tf.GPT2Config(**ids, vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=256),
    }


FAMILY_NAMES = tuple(_configs(300).keys())


def random_direction(d_model: int, seed: int = 0) -> torch.Tensor:
    """A seeded random unit vector of width `d_model` (a direction that means nothing to the model)."""
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(d_model, generator=generator)
    return vector / vector.norm()


def tiny_model(family: str, seed: int = 0, harmony: bool = False, **overrides):
    """A random-initialised causal LM of `family` with `byte_tokenizer()` (`harmony_tokenizer()` with `harmony`); returns
    `(model, tokenizer)`. `overrides` set config attributes before the model is built
    (`tiny_model("granitemoehybrid", num_local_experts=0)`: a dense Granite 4)."""
    from featsteer.models.loading import model_class

    tokenizer = harmony_tokenizer() if harmony else byte_tokenizer()
    config = _configs(len(tokenizer))[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = model_class(config).from_config(config, attn_implementation="eager").eval()
    _randomise_norms(model, seed)
    return model, tokenizer


def _randomise_norms(model, seed: int) -> None:
    """Give norm weights random values so tests notice a hook placed before or after a norm, fused experts' output
    biases (GPT-OSS initialises them to zero) so tests notice an edit that skips them, and Gemma 4's per-layer stream
    scalars (ones at initialisation) so tests notice a hook placed before or after the scaling."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("down_proj_bias"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.mul_(0.5 + torch.rand(buffer.shape, generator=generator))


def saved_tokenizer(tokenizer, directory) -> PreTrainedTokenizerFast:
    """Save and reload a tokenizer so `name_or_path` is set (TransformerLens needs it)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(directory)
    reloaded = AutoTokenizer.from_pretrained(directory)
    reloaded.padding_side = "left"
    return reloaded


def hooked_gpt2(model, tokenizer):
    """The same weights as a TransformerLens `HookedTransformer` (no weight processing)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    config = model.config
    cfg = HookedTransformerConfig(
        n_layers=config.n_layer, d_model=config.n_embd, n_heads=config.n_head, d_head=config.n_embd // config.n_head,
        d_mlp=4 * config.n_embd, d_vocab=config.vocab_size, n_ctx=config.n_positions, act_fn="gelu_new",
        normalization_type="LN", eps=config.layer_norm_epsilon, original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, dtype=next(model.parameters()).dtype,
    )
    hooked = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="left")
    hooked.load_state_dict(convert_gpt2_weights(model, cfg), strict=False)
    return hooked.eval()


GGUF_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
"""A Llama decoder layer's weights by their llama.cpp names."""


def tiny_gguf(path, architecture: str = "llama") -> None:
    """Write the tiny Llama (`tiny_model("llama")`) and its byte tokenizer as a GGUF file at `path`, matrices in float16,
    for tests of GGUF loading. Queries and keys are stored in Hugging Face's order, so the loaded model's attention differs
    from the tiny Llama's (llama.cpp permutes them): the file is a model of its own, not a copy. `architecture` labels the
    file as another llama.cpp architecture (its metadata keys follow the label), for tests of one featsteer does not
    support."""
    import gguf
    import numpy as np

    model, tokenizer = tiny_model("llama")
    config, weights = model.config, model.state_dict()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token in tokens])  # 3: control, 1: normal
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    named = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    named.update({f"blk.{layer}.{short}": f"model.layers.{layer}.{long}" for layer in range(config.num_hidden_layers)
                  for long, short in GGUF_LAYER_TENSORS.items()})
    for name, source in named.items():
        tensor = weights[f"{source}.weight"].detach().float().numpy()
        writer.add_tensor(f"{name}.weight", tensor.astype(np.float16 if tensor.ndim > 1 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
