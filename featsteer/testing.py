"""Tiny random models of every supported family, built from configs (no hub access).

Shared by the test suite, the benchmarks and users' own tests: a byte-level tokenizer with a small chat
template, one config per family with a handful of layers so every test runs in milliseconds, and the
same weights as a TransformerLens `HookedTransformer` for equivalence checks.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

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


def _configs(vocab: int) -> dict:
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common = dict(**ids, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return {
        "llama": LlamaConfig(**common),
        "mistral": MistralConfig(**common),
        "qwen2": Qwen2Config(**common),
        "qwen3": Qwen3Config(**common, head_dim=16),
        "gemma": GemmaConfig(**common, head_dim=16),
        "gemma2": Gemma2Config(**common, head_dim=16),
        "gemma3_text": Gemma3TextConfig(**common, head_dim=16, sliding_window=8),
        "phi3": Phi3Config(**common),
        "gpt2": GPT2Config(**ids, vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=256),
    }


FAMILY_NAMES = tuple(_configs(300).keys())


def random_direction(d_model: int, seed: int = 0) -> torch.Tensor:
    """A seeded random unit vector of width `d_model` (a direction that means nothing to the model)."""
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(d_model, generator=generator)
    return vector / vector.norm()


def tiny_model(family: str, seed: int = 0):
    """A random-initialised causal LM of `family` with `byte_tokenizer()`; returns `(model, tokenizer)`."""
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = _configs(len(tokenizer))[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    _randomise_norms(model, seed)
    return model, tokenizer


def _randomise_norms(model, seed: int) -> None:
    """Give norm weights random values so tests notice a hook placed before or after a norm."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


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
