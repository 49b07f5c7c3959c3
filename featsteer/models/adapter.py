"""The one model interface every featsteer stage talks to.

A `ModelAdapter` hides whether the weights live in a Hugging Face causal LM or a TransformerLens model.
It exposes: the tokenizer and chat formatting, `n_layers`/`d_model`, hook points by TransformerLens name,
a forward pass that can stop early, batched greedy generation with left padding, and the weights that
write into the residual stream. Backends implement a handful of abstract methods; everything that only
needs those (tokenising, generation loop, hook context managers) lives here once.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch
from torch import Tensor

from featsteer.errors import FeatsteerError
from featsteer.models.chat import (
    FormattedPrompt,
    check_system,
    format_instruction,
    special_token_strings,
    special_token_texts,
)
from featsteer.models.harmony import (
    ANSWER_OPENING,
    CONTROL_TOKENS,
    END,
    HARMONY_OPENINGS,
    MIN_REASONING_TOKENS,
    TURN_ENDS,
    harmony_text,
    is_harmony_vocab,
    parse_harmony,
)
from featsteer.models.hookpoints import (
    HEAD_KINDS,
    LAYER_KINDS,
    ROUTING_KINDS,
    HookSite,
    hook_name,
    parse_hook_name,
)

logger = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 8192
"""Default cap on a batch's padded prompt tokens (rows x longest prompt) for capture, logits and generation:
short prompts still fill `batch_size` rows, a long one shares its batch with few others."""

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|eot|>", "<|eom|>", "<end_of_turn>", "<|end|>",
                      "<|endoftext|>")
"""Tokens that end a response wherever a vocabulary has them (ChatML, Llama 3 and 4, Gemma, Phi-3), also when neither the
tokenizer's EOS nor the model's generation settings name them (a TransformerLens model has no generation settings)."""

MESSAGE_ENDS = {"<|end|>": "<|return|>"}
"""An end-of-turn token that ends only one message of a turn where the vocabulary also has the token it maps to: GPT-OSS's
harmony format closes its analysis message with `<|end|>`, then writes the answer in a final message that `<|return|>`
ends, so stopping at `<|end|>` there kept the reasoning as the response and dropped the answer."""

_Cached = TypeVar("_Cached")

HookFn = Callable[[Tensor, HookSite], "Tensor | None"]
"""A hook function: gets the activation `(batch, pos, d_model)` and its site; returns a replacement or
None to leave it unchanged (the TransformerLens convention)."""


class StopForward(Exception):
    """Raised inside a hook to end the forward pass once the deepest needed activation is seen."""


@dataclass
class TokenBatch:
    """A left-padded batch of prompts."""

    input_ids: Tensor
    """(batch, pos) token ids, left-padded."""
    attention_mask: Tensor
    """(batch, pos) 1 for real tokens, 0 for padding."""
    n_post_instruction: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """(batch,) number of tokens after the end of the instruction (the template's tail, and a prefill after it)."""
    n_prefill: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """(batch,) how many of those tokens are the prefill's (`tokenize(prefill=...)`: the start of the response, after the
    template's tail); empty without a prefill."""

    @property
    def position_ids(self) -> Tensor:
        """Positions counted from each row's first real token, as an unpadded forward would see them."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class Generation:
    """Greedy responses (`ModelAdapter.generate_with_tokens`), in the order of the instructions."""

    texts: list[str]
    """Each response decoded without special tokens and stripped."""
    token_ids: list[tuple[int, ...]]
    """Each response's generated token ids, ending with the end-of-turn token when the model wrote one."""
    first_logits: Tensor | None
    """`(n, vocab)` float32 logits of the first response token (None unless asked for)."""
    reasoning_only: tuple[bool, ...] = ()
    """Per response, for a harmony model (GPT-OSS): True when no final-channel message came within `max_new_tokens`, so
    the text is its reasoning with the control tokens removed (`featsteer.models.harmony.parse_harmony`); all False for
    other models."""


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts tokenized one by one, before padding (`ModelAdapter.encode_prompts`)."""

    input_ids: list[list[int]]
    """Each prompt's token ids."""
    n_post_instruction: list[int]
    """Each prompt's tokens after the end of its instruction (see `TokenBatch.n_post_instruction`)."""
    n_prefill: list[int] | None
    """Each prompt's prefill tokens; None without a prefill."""


@dataclass(frozen=True)
class _VocabTokens:
    """What generation reads from a tokenizer's vocabulary (`ModelAdapter._vocab_tokens`)."""

    harmony: bool
    """True for a harmony vocabulary (GPT-OSS, `is_harmony_vocab`)."""
    end_of_turn: frozenset[int]
    """The ids of the end-of-turn tokens the vocabulary has (see `ModelAdapter.stop_token_ids`)."""
    control: tuple[tuple[int, str], ...] | None
    """A harmony vocabulary's control tokens as `(id, token)` pairs; None for every other vocabulary."""

    @classmethod
    def read(cls, vocab: Mapping[str, int]) -> _VocabTokens:
        """Pick the tokens out of a `get_vocab()` dict."""
        harmony = is_harmony_vocab(vocab)
        ends = {int(vocab[token]) for token in END_OF_TURN_TOKENS if token in vocab and MESSAGE_ENDS.get(token) not in vocab}
        if harmony:  # a harmony turn ends at <|return|> (answered) or <|call|> (a tool call)
            ends.update(int(vocab[token]) for token in TURN_ENDS if token in vocab)
        control = tuple((int(vocab[token]), token) for token in CONTROL_TOKENS if token in vocab) if harmony else None
        return cls(harmony, frozenset(ends), control)


@dataclass(frozen=True)
class ResidualWriter:
    """A weight that writes into the residual stream, in one known orientation.

    `read()` returns `(weight, bias)` with `weight` shaped `(d_model, d_in)` (rows index the residual
    dimension, as in `nn.Linear`) for projections, or `(d_model, vocab)` for the token embedding; `bias`
    is `(d_model,)` or None. `write(weight, bias)` stores tensors in the same orientation back into the
    model (in place, under `torch.no_grad`).
    """

    name: str
    """Hook-style name of what it writes: `hook_embed`, `blocks.{l}.hook_attn_out`, `blocks.{l}.hook_mlp_out`."""
    layer: int | None
    kind: str
    """`embed`, `pos_embed`, `attn_out` or `mlp_out`."""
    read: Callable[[], tuple[Tensor, Tensor | None]]
    write: Callable[[Tensor, Tensor | None], None]
    replaces: bool = False
    """True when `write` points the model's parameter at the given tensors instead of copying into its storage: the
    tensors `read()` returned before a write are then never modified and serve as the originals for a revert (no copy
    is kept). False (copy semantics) for slices of a fused tensor and TransformerLens parameters."""


@dataclass(frozen=True)
class BiasWriter:
    """A bias that adds the same vector to the residual stream at every position: adding `delta` to it adds
    `reach @ delta` to the stream after block `layer`'s branch that holds it.

    An output projection's bias reaches the whole stream (`reach` is the identity, times a residual multiplier where the
    family has one). An attention value bias reaches it through the output projection: every query's attention weights
    sum to 1, so a value bias shared by all positions comes out of the attention unchanged and then through `W_O`
    (`reach` sums the output projection's columns of the query heads that read that key-value head).
    """

    name: str
    """`blocks.{l}.hook_attn_out` or `blocks.{l}.hook_mlp_out` (an output projection's bias) or `blocks.{l}.attn.b_V`."""
    layer: int
    reach: Callable[[], Tensor]
    """`() -> (d_model, width)` float64 map from the bias to what it adds to the stream (read from the current weights)."""
    read: Callable[[], Tensor]
    write: Callable[[Tensor], None]
    """Store a tensor of the bias's shape and dtype (in place, under `torch.no_grad`)."""

    @property
    def full(self) -> bool:
        """True for an output projection's bias, which reaches every direction of the stream."""
        return not self.name.endswith(".b_V")

    @property
    def hook(self) -> str:
        """The hook whose value a change of this bias shifts (a value bias: its layer's attention output)."""
        return self.name if self.full else f"blocks.{self.layer}.hook_attn_out"


class ModelAdapter(ABC):
    """Backend-independent model interface (see module docstring)."""

    tokenizer: object
    name: str
    generation_step: int | None = None
    """While `generate` runs: 0 during the prompt pass, k during the k-th decoding pass after it; None outside
    generation (every `run`/`logits` pass is a prompt pass). Hooks that act only on the prompt or only on generated
    tokens read it (see `featsteer.interventions.positions`)."""
    generation_prompt_length: int = 0
    """Padded prompt length of the batch being generated (valid while `generation_step` is not None)."""
    escape_special_tokens: bool = False
    """Tokenize the text of a special token inside an instruction, the system prompt or a prefill ("<|im_end|>") as plain
    text, not as that token. Off (the default), it becomes the token, as `apply_chat_template` makes it, and a prompt can
    end its turn and start others; `tokenize` then logs a warning, once per text, naming it. The template's own special
    tokens are never escaped."""
    harmony_opening: str = "final"
    """For a harmony model (GPT-OSS): "final" ends the prompts that first-token measures and capture read with
    `<|channel|>final<|message|>` (`answer_opening`), where a direct answer's first token comes next, while generation
    starts at the template's `<|start|>assistant` and reasons first; "none" reads every prompt at `<|start|>assistant`,
    where the model always writes `<|channel|>` next (the raw behaviour). No effect on other models."""
    show_progress: bool = True
    """Whether `generate`, `capture`, the direction selection and the direction optimiser show progress bars (set False
    for quiet scripts and notebooks; `capture` and `select_direction` take an explicit `progress=` too)."""
    pass_attention_mask: Tensor | None = None
    """During a forward pass of `run` or `generate`: the `(batch, pos)` attention mask of the sequence so far (1 at
    real tokens, 0 at left padding); None outside one. Hooks that pool over positions read it to skip padding."""
    pass_post_instruction: Tensor | None = None
    """During a forward pass of `run`, `run_continued` or `generate`: each prompt's number of tokens after its instruction
    (`TokenBatch.n_post_instruction`, empty for a batch not made by `tokenize`); None outside one. Hooks that act at the
    chat template's tokens read it to find them in each prompt (`interventions.Erase`)."""
    pass_prefill: Tensor | None = None
    """During the same passes: each prompt's number of prefill tokens at its end (`TokenBatch.n_prefill`, empty without a
    prefill); None outside one. `Erase` reads it to act at the template's tail before the prefill."""
    _prepasses: tuple[Callable[[TokenBatch], None], ...] = ()
    _in_prepass: bool = False

    # ---- backend contract -------------------------------------------------------------------------
    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Number of decoder layers."""

    @property
    @abstractmethod
    def d_model(self) -> int:
        """Width of the residual stream."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the weights."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights."""

    @property
    @abstractmethod
    def family(self) -> str:
        """Architecture family name (provenance)."""

    @property
    @abstractmethod
    def n_heads(self) -> int:
        """Attention heads per layer (the second axis of `blocks.{l}.attn.hook_z`)."""

    @property
    def post_norms(self) -> bool:
        """True when attention and MLP outputs pass through a norm before they are added to the stream (Gemma 2/3),
        so a head's write is not a linear function of its `hook_z`."""
        return False

    @property
    def attention_layers(self) -> list[int]:
        """The layers whose token mixer is attention, so `blocks.{l}.attn.hook_z` exists (all but LFM2's convolutions)."""
        return list(range(self.n_layers))

    def head_ids(self, heads: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
        """`{layer: [head, ...]}` checked against this model and normalised (sorted, each head once): what the per-head
        edits and interventions (`edits.apply_edit(heads=)`, `interventions.HeadAblate`) take.

        Raises:
            FeatsteerError: when it names no head, a layer without attention heads, or a head the layer does not have.
        """
        if not heads or not any(heads.values()):
            raise FeatsteerError("heads= names no attention head: give {layer: [head, ...]} (see directions.head_attribution)")
        checked = {}
        for layer, ids in sorted(heads.items()):
            if layer not in self.attention_layers:
                raise FeatsteerError(f"layer {layer} has no attention heads to edit: the model's attention layers are {self.attention_layers}")
            unique = sorted({int(h) for h in ids})
            bad = [h for h in unique if not 0 <= h < self.n_heads]
            if bad:
                raise FeatsteerError(f"head(s) {bad} at layer {layer} do not exist: the model has heads 0-{self.n_heads - 1}")
            checked[int(layer)] = unique
        return checked

    @property
    def parallel_block(self) -> bool:
        """True when attention and MLP both read the block's input and write to the stream together (Cohere, Phi-2,
        Pythia), so there is no `blocks.{l}.hook_resid_mid`."""
        return False

    @property
    def per_layer_inputs(self) -> bool:
        """True when each block adds a third write after its MLP, from a per-layer input embedding (Gemma 4's PLE), so
        `blocks.{l}.hook_per_layer_out` exists."""
        return False

    @property
    def learned_positions(self) -> bool:
        """True when a learned position embedding is added to the stream beside the token embedding (GPT-2), so
        `hook_pos_embed` exists."""
        return False

    @property
    def moe_layers(self) -> list[int]:
        """The mixture-of-experts layers whose routing featsteer can read and change (`blocks.{l}.mlp.hook_router_logits`,
        `blocks.{l}.mlp.hook_routing`)."""
        return []

    @property
    def n_experts(self) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        return 0

    @property
    def experts_per_token(self) -> int:
        """How many routed experts the router picks per token (0 for a dense model, or when the config does not say)."""
        return 0

    @property
    def scaled_layers(self) -> bool:
        """True when each block multiplies the whole stream by a scalar of its own before it returns (Gemma 4), so
        `hook_resid_post` is that multiple of `resid_mid + mlp_out (+ per_layer_out)`."""
        return False

    @property
    def input_norms(self) -> bool:
        """True when each block's attention and MLP read a normalised copy of the stream, so `blocks.{l}.ln1.hook_normalized`
        and `blocks.{l}.ln2.hook_normalized` exist (False for OLMo 2 and EXAONE 4, which normalise only the outputs)."""
        return True

    @abstractmethod
    def _install_hooks(self, hooks: Sequence[tuple[HookSite, HookFn]]) -> Callable[[], None]:
        """Attach hooks; return a function that removes every one of them."""

    @abstractmethod
    def _forward(self, batch: TokenBatch, cache: object | None, want_cache: bool, keep: int = 0) -> tuple[Tensor, object | None]:
        """Run the model on `batch` (the new tokens only when `cache` is given); return `(logits, cache)`.

        Backends without a KV cache return `None` as the cache and are then fed the whole sequence.
        With `keep` > 0, backends may return logits for the final `keep` positions only (`(batch, keep, vocab)`),
        which saves the unembedding of every other token (gigabytes for large vocabularies); callers read the last
        `keep` columns either way. 0 asks for every position."""

    @abstractmethod
    def residual_writers(self) -> list[ResidualWriter]:
        """Every weight that writes into the residual stream (embedding, attention and MLP outputs)."""

    def bias_writers(self) -> list[BiasWriter]:
        """The biases that add a constant vector to the residual stream (see `BiasWriter`), in layer order; none by
        default. Post-norm families have none: a norm after the branch rescales whatever the bias writes."""
        return []

    def embedding_tie_undo(self) -> Callable[[], None] | None:
        """When the output head shares the token embedding's matrix, a function that shares it again (an edit of the
        embedding unties them first, see `HFModelAdapter.untie_embeddings`); None when they are not tied (the default)."""
        return None

    def bias_switch(self) -> str | None:
        """The config switch `add_biases` would turn on, without turning it on; None when there is none (the default)."""
        return None

    def add_biases(self) -> tuple[str, Callable[[], None]] | None:
        """For a model without such biases whose config has a switch that gives its branches biases (Llama's `mlp_bias`,
        Qwen3's and Gemma's `attention_bias`): turn it on and give every layer the zero biases the switched-on model
        has, so the output is unchanged, `bias_writers()` then lists them and an export loads with the switch on.
        Returns the switch's name and the undo (the biases removed, the switch off), or None when there is no such switch
        (the default)."""
        return None

    @abstractmethod
    def unembed(self) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Return `(W_U (vocab, d_model), final_norm)` for reading residual vectors as logits."""

    # ---- shared behaviour --------------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> set[int]:
        """Token ids that end a generated response: the tokenizer's EOS, every id the model's generation settings list as
        one (`generation_config.eos_token_id`: Llama 3's `<|end_of_text|>` and `<|eom_id|>` beside its `<|eot_id|>` EOS,
        GLM-4's `<|user|>`), and the known end-of-turn tokens (`END_OF_TURN_TOKENS`) the vocabulary has, but for one that ends
        only a message there (`MESSAGE_ENDS`: GPT-OSS's `<|end|>`); a harmony vocabulary's `<|return|>` and `<|call|>` end it.
        The EOS and the generation settings are read on every call, the vocabulary's tokens once per tokenizer state
        (`_vocab_tokens`)."""
        ids = set(self._declared_stop_ids())
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.add(int(eos))
        return ids | self._vocab_tokens().end_of_turn

    def harmony_control_ids(self) -> dict[int, str] | None:
        """For a tokenizer of the harmony format (GPT-OSS): its control tokens by id, which `generate_with_tokens` keeps
        when decoding to find the final channel's message; None for every other tokenizer."""
        control = self._vocab_tokens().control
        return None if control is None else dict(control)

    @property
    def is_harmony(self) -> bool:
        """True for a tokenizer of the harmony format (GPT-OSS), worked out once per tokenizer state (every tokenized batch
        asks)."""
        return self._vocab_tokens().harmony

    def _tokenizer_state(self) -> tuple[object, int, int]:
        """What the caches of tokenizer-derived values are keyed on: the tokenizer object, its size (tokens added grow it)
        and its count of added tokens (an existing token made special grows that alone). Cheap: no vocabulary is built."""
        added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        return self.tokenizer, len(self.tokenizer), len(added)

    def _cached_for_tokenizer(self, name: str, compute: Callable[[], _Cached], extra: tuple = ()) -> _Cached:
        """`compute()`, kept under `name` until the tokenizer is replaced or tokens are added to it (`_tokenizer_state`), or
        until `extra` (whatever else the value depends on, compared with `==`) changes."""
        state = (*self._tokenizer_state(), *extra)
        known = self.__dict__.get(name)
        if known is not None and known[0][0] is state[0] and known[0][1:] == state[1:]:
            return known[1]
        value = compute()
        self.__dict__[name] = (state, value)
        return value

    def _vocab_tokens(self) -> _VocabTokens:
        """The vocabulary's end-of-turn and harmony tokens, read with one `get_vocab()` (which builds the whole vocabulary
        dict, about 80 ms for Qwen's 151k tokens) per tokenizer state: generation asks at every batch."""
        return self._cached_for_tokenizer("_vocab_tokens_for", lambda: _VocabTokens.read(self.tokenizer.get_vocab()))

    def answer_opening(self) -> str:
        """The text appended to a chat-formatted prompt so that it ends where the answer starts: `<|channel|>final<|message|>`
        for a harmony model with `harmony_opening` "final", empty otherwise (every other model's generation prompt already
        ends there).

        Raises:
            FeatsteerError: `harmony_opening` is not "final" or "none".
        """
        if self.harmony_opening not in HARMONY_OPENINGS:
            raise FeatsteerError(f"harmony_opening must be 'final' or 'none', got {self.harmony_opening!r} "
                                 "(CLI: --harmony-opening final|none)")
        return ANSWER_OPENING if self.harmony_opening == "final" and self.is_harmony else ""

    def direct_answer_prefill(self, n: int) -> list[str] | None:
        """Prefills that make generation answer directly, for a pick or a target with a short budget of its own: on a
        harmony model (GPT-OSS) `n` empty texts, so generation starts where a prefill goes, after `answer_opening()`, and
        the tokens it writes are the answer, not reasoning that a short budget cuts before the answer (with
        `harmony_opening` "none" that place is the generation prompt itself, the raw behaviour); a budget so given is not
        warned about (`generate_with_tokens`). None for every other model: its generation is unchanged.

        Args:
            n: How many prompts will be generated for.

        Returns:
            The prefills to pass as `prefill=` to generation and to the measures that read its tokens, or None.
        """
        return [""] * n if self.is_harmony else None

    def _declared_stop_ids(self) -> set[int]:
        """The end-of-sequence ids the model's own generation settings declare; none by default (backends without them)."""
        return set()

    def hook_site(self, name: str) -> HookSite:
        """Validate a hook name for this model."""
        site = parse_hook_name(name, self.n_layers)
        if site.kind in ROUTING_KINDS and site.layer not in self.moe_layers:
            where = f"its MoE layers are {self.moe_layers}" if self.moe_layers else "it has no mixture-of-experts layers whose routing featsteer can read"
            raise FeatsteerError(f"{name} does not exist: layer {site.layer} of this {self.family} model routes no experts ({where})")
        if site.kind == "per_layer_out" and not self.per_layer_inputs:
            raise FeatsteerError(f"{name} does not exist: this {self.family} model has no per-layer input embeddings (Gemma 4's E2B/E4B "
                                 f"have them); its layers write through blocks.{site.layer}.hook_attn_out and hook_mlp_out")
        if site.kind == "pos_embed" and not self.learned_positions:
            raise FeatsteerError(f"{name} does not exist: this {self.family} model adds no learned position embedding to the stream "
                                 "(GPT-2 does); hook_embed is its token embedding, what enters the stream")
        if site.kind in HEAD_KINDS and site.layer not in self.attention_layers:
            raise FeatsteerError(self._no_heads_message(site))
        return site

    def _no_heads_message(self, site: HookSite) -> str:
        """The error for a per-head hook at a layer whose token mixer has no softmax attention heads (an LFM2 convolution)."""
        mixer = self._token_mixer(site.layer)
        how = f"with {mixer}, not" if mixer else "without"
        return (f"{site.name} does not exist: layer {site.layer} of this {self.family} model mixes tokens {how} softmax attention heads; "
                f"hook blocks.{site.layer}.hook_attn_out (its output) instead, or a layer in {self.attention_layers}")

    def _token_mixer(self, layer: int) -> str | None:
        """The class name of layer `layer`'s token mixer, for error messages; None when the backend does not know it."""
        return None

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The per-layer hook kinds this model has: every one but `resid_mid` in a parallel block (`parallel_block`), the
        `ln1`/`ln2` inputs where the branches read the stream itself (`input_norms`), and `per_layer_out` where there is
        no per-layer input (`per_layer_inputs`); `router_logits` and `routing` only on a mixture-of-experts model (`moe_layers`)."""
        missing = {"resid_mid"} if self.parallel_block else set()
        if not self.input_norms:
            missing |= {"ln1_normalized", "ln2_normalized"}
        if not self.per_layer_inputs:
            missing.add("per_layer_out")
        routing = ROUTING_KINDS if self.moe_layers else ()
        return tuple(kind for kind in LAYER_KINDS + HEAD_KINDS + routing if kind not in missing)

    def hook_names(self, kinds: Sequence[str] = ("resid_pre",), layers: Sequence[int] | None = None) -> list[str]:
        """List hook names for the given kinds and layers (all layers by default), leaving out kinds this model does not
        have (`layer_kinds`), so `("resid_pre", "resid_mid", "resid_post")` is every residual point of any model.
        `router_logits` and `routing` are listed at the MoE layers only (`moe_layers`), `attn_z` at the layers with attention
        heads only (`attention_layers`: not at LFM2's convolutions).

        Raises:
            FeatsteerError: when none of `kinds` exists on this model (the ln1/ln2 inputs of OLMo 2, `resid_mid` of a
                parallel block), rather than returning no names for the caller to hook nothing at.
        """
        layer_ids = range(self.n_layers) if layers is None else layers
        known, have = LAYER_KINDS + HEAD_KINDS + ROUTING_KINDS, self.layer_kinds
        kept = [kind for kind in kinds if kind in have or kind not in known]
        if kinds and not kept:
            if set(kinds) <= {"ln1_normalized", "ln2_normalized"} and self.input_norms:  # a TransformerLens Phi-2 bridge names no ln2
                raise FeatsteerError(f"{self.family} has no {', '.join(kinds)} hook point (its attention and MLP read one shared norm): "
                                     f"its hook kinds are {', '.join(self.layer_kinds)}")
            if set(kinds) <= {"ln1_normalized", "ln2_normalized"}:
                raise FeatsteerError(f"{self.family} has no norms before its attention and MLP (they read the stream itself): there is "
                                     "no blocks.L.ln1/ln2.hook_normalized; use hook_resid_pre / hook_resid_mid")
            if set(kinds) <= set(ROUTING_KINDS):
                raise FeatsteerError(f"{self.family} has no mixture-of-experts layers whose routing featsteer can read, so no "
                                     f"blocks.L.mlp.hook_{kinds[0]}")
            if set(kinds) <= {"per_layer_out"}:
                raise FeatsteerError(f"{self.family} has no per-layer input embeddings, so no blocks.L.hook_per_layer_out: its layers write "
                                     "through hook_attn_out and hook_mlp_out")
            raise FeatsteerError(f"{self.family} has no {', '.join(kinds)} hook points (attention and MLP run in parallel on the block's "
                                 "input): use hook_resid_pre or hook_resid_post")
        at = {kind: set(self.moe_layers) for kind in ROUTING_KINDS} | {kind: set(self.attention_layers) for kind in HEAD_KINDS}
        return [hook_name(layer, kind) for layer in layer_ids for kind in kept if kind not in at or layer in at[kind]]

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[ModelAdapter]:
        """Attach hooks for the duration of a `with` block; they are removed on exit, also after an error.

        Args:
            fwd_hooks: `(hook_name, fn)` pairs; `fn(activation, site)` returns a replacement or None.
        """
        sites = [(self.hook_site(name), fn) for name, fn in fwd_hooks]
        remove = self._install_hooks(sites)
        try:
            yield self
        finally:
            remove()

    @contextlib.contextmanager
    def prepasses(self, fns: Sequence[Callable[[TokenBatch], None]]) -> Iterator[ModelAdapter]:
        """Call each `fn(batch)` before every prompt pass (`run`, `run_continued`'s prompts, the prefill of `generate`)
        for the duration of a `with` block; removed on exit, also after an error.

        A pre-pass may run the model itself (`run(batch, stop_at=...)`), e.g. to take a per-sequence decision that hooks
        at earlier layers then act on (`ConditionalSteer(lookahead=True)`); passes it starts call no pre-pass, and it
        sees the pass as a prompt pass (`generation_step` None)."""
        before = self._prepasses
        self._prepasses = (*before, *fns)
        try:
            yield self
        finally:
            self._prepasses = before

    @property
    def in_prepass(self) -> bool:
        """True while a pre-pass (`prepasses`) runs the model."""
        return self._in_prepass

    def _prepass(self, batch: TokenBatch) -> None:
        """Run the installed pre-passes on a prompt batch (not from inside one), leaving the pass state as it was."""
        if not self._prepasses or self._in_prepass:
            return
        state = (self.generation_step, self.generation_prompt_length, self.pass_attention_mask, self.pass_post_instruction,
                 self.pass_prefill)
        self._in_prepass, self.generation_step = True, None
        try:
            for fn in self._prepasses:
                fn(batch)
        finally:
            self._in_prepass = False
            (self.generation_step, self.generation_prompt_length, self.pass_attention_mask, self.pass_post_instruction,
             self.pass_prefill) = state

    def format_prompts(self, instructions: Sequence[str], system: str | None = None, *,
                       for_generation: bool | Sequence[bool] = False) -> list[FormattedPrompt]:
        """Render instructions through the chat template (see `featsteer.models.chat`), each ending where the answer's
        first token comes next: the one place the prompts every first-token measure and capture read are made.

        For a harmony model (GPT-OSS) that is after `answer_opening()` (`<|channel|>final<|message|>`), appended to the
        template's generation prompt; every other model's prompt is the template's text unchanged.

        Args:
            instructions: raw user instructions.
            system: optional system prompt.
            for_generation: True (or one flag per instruction) for the prompt generation starts from, the template's own
                generation prompt (a harmony model then reasons before it answers); what generated token ids are read
                after.

        Returns:
            One formatted prompt per instruction.
        """
        flags = [for_generation] * len(instructions) if isinstance(for_generation, bool) else list(for_generation)
        if len(flags) != len(instructions):  # checked on every model, so a caller's mistake shows before a harmony model
            raise FeatsteerError(f"got {len(flags)} for_generation flags for {len(instructions)} prompts: give one per prompt")
        formatted = [format_instruction(self.tokenizer, text, system) for text in instructions]
        opening = self.answer_opening()
        if not opening:
            return formatted
        # a template whose generation prompt already holds the opening (a "no reasoning" variant) gets it once
        return [prompt if generation or not prompt.uses_chat_template or prompt.text.endswith(opening)
                else replace(prompt, text=prompt.text + opening) for prompt, generation in zip(formatted, flags, strict=True)]

    def special_text(self, instructions: Sequence[str]) -> list[tuple[int, list[str]]]:
        """The instructions whose text the tokenizer reads as special tokens: `(index, [token text, ...])` for each.

        Args:
            instructions: raw user instructions.

        Returns:
            One pair per such instruction, in order; empty for ordinary prompts.
        """
        strings = self._special_strings()
        found = [(i, special_token_texts(self.tokenizer, text, strings)) for i, text in enumerate(instructions)]
        return [(i, texts) for i, texts in found if texts]

    def _special_strings(self) -> tuple[str, ...]:
        """The tokenizer's special-token strings (`special_token_strings`), worked out once per tokenizer state."""
        return self._cached_for_tokenizer("_special_strings_for", lambda: special_token_strings(self.tokenizer))

    def _special_in(self, text: str) -> list[str]:
        """`special_token_texts` of one text, with the tokenizer's special-token strings kept (`_special_strings`)."""
        return special_token_texts(self.tokenizer, text, self._special_strings())

    def _warn_special_text(self, instructions: Sequence[str], system: str | None = None, prefill: Sequence[str] | None = None,
                           label: str | None = None) -> None:
        """Log one warning for the texts holding special-token text (instructions, the system prompt, prefills) that no
        earlier call warned about; `label` names the prompt set the indices count in ("harmful prompt 2")."""
        warned = self.__dict__.setdefault("_special_warned", set())
        where = f"{label} prompt" if label else "prompt"
        found: dict[object, tuple[str, list[str]]] = {}  # what a text is remembered by: (how it is named, its special tokens)
        if system is not None and (texts := self._special_in(system)):
            found[("system", system)] = (f"the system prompt {_excerpt(system)}", texts)
        for i, texts in self.special_text(instructions):
            found.setdefault(instructions[i], (f"{where} {i} {_excerpt(instructions[i])}", texts))
        for i, start in enumerate(prefill or ()):
            if ("prefill", start) not in found and (texts := self._special_in(start)):
                found[("prefill", start)] = (f"the prefill {_excerpt(start)} of {where} {i}", texts)
        fresh = [(name, texts) for key, (name, texts) in found.items() if key not in warned]
        if not fresh:
            return
        warned.update(found)
        named = "; ".join(f"{name}: {', '.join(map(repr, texts))}" for name, texts in fresh[:5])
        more = f" (and {len(fresh) - 5} more)" if len(fresh) > 5 else ""
        logger.warning("%d text(s) hold what the tokenizer reads as special tokens, which can end a turn and start others "
                       "(%s%s); to keep it plain text, set escape_special_tokens=True (CLI: --escape-special)",
                       len(fresh), named, more)

    def tokenize(self, instructions: Sequence[str], *, system: str | None = None, chat: bool = True,
                 prefill: Sequence[str] | None = None, escape_special_tokens: bool | None = None,
                 for_generation: bool | Sequence[bool] = False) -> TokenBatch:
        """Format (optionally) and tokenize a batch of instructions with left padding.

        Without the chat template's own special tokens (raw text, the plain-text fallback template) the tokenizer adds its
        special tokens, except any it appends after the text (an EOS): each row ends where the model goes on.

        Args:
            instructions: raw user instructions (or raw text when `chat=False`).
            system: optional system prompt (not with `chat=False`).
            chat: apply the chat template; False tokenizes the texts as they are.
            prefill: text per instruction put after the formatted prompt, as the start of the response the model
                goes on from (a prefilling attack: "Sure, here is"); it counts as post-instruction tokens.
            escape_special_tokens: tokenize special-token text inside an instruction, the system prompt or a prefill as
                plain text (None: the adapter's `escape_special_tokens`). Only rows where such text is found are tokenized
                differently: each text that holds it, and the template's text around it, on their own.
            for_generation: True (or one flag per instruction) for the prompt generation starts from (`format_prompts`);
                with a prefill a harmony prompt always ends at `answer_opening()`, since the prefill is the answer's start.
        """
        encoded = self.encode_prompts(instructions, system, chat, prefill, escape_special_tokens, for_generation=for_generation)
        return self.pad_encoded(encoded, range(len(instructions)))

    def encode_prompts(self, instructions: Sequence[str], system: str | None, chat: bool, prefill: Sequence[str] | None,
                       escape_special_tokens: bool | None = None, warn: bool = True,
                       for_generation: bool | Sequence[bool] = False) -> EncodedPrompts:
        """`tokenize` without the padding: each prompt's ids on their own, so a batch plan that needs their lengths and the
        batches it plans come from one encoding (`pad_encoded`), and code that batches the same prompts many times (the
        direction optimiser's mini-batches, expert routing counts) tokenizes them once. The arguments are `tokenize`'s;
        `warn=False` leaves out the special-text warning (the plan gave it, naming the prompt set)."""
        if not instructions:
            raise FeatsteerError("no prompts to tokenize: pass at least one instruction")
        check_system(system)  # also without the chat template, where a blank one would otherwise pass unseen
        if system is not None and not chat:  # the texts are tokenized as they are: the system prompt went nowhere
            raise FeatsteerError("a system prompt goes into the chat template, which chat=False leaves out: pass system=None or chat=True")
        _check_prefill(prefill, instructions)
        escape = self.escape_special_tokens if escape_special_tokens is None else escape_special_tokens
        if chat:
            formatted = self.format_prompts(instructions, system, for_generation=False if prefill is not None else for_generation)
            texts = [f.text for f in formatted]
            spans = [(f.instruction_start, f.instruction_end) for f in formatted]
            add_special = not formatted[0].uses_chat_template
        else:
            texts, spans, add_special = list(instructions), [(0, len(t)) for t in instructions], True
        if warn and not escape:
            self._warn_special_text(instructions, system if chat else None, prefill)
        plain = self._plain_spans(instructions, texts, spans, system if chat else None, prefill) if escape else [[]] * len(texts)
        template_ends = [len(text) for text in texts]
        if prefill is not None:
            texts = [text + start for text, start in zip(texts, prefill, strict=True)]
        rows, n_post, n_prefill = [], [], []
        appended = self._appended_special_tokens() if add_special else 0
        for text, (_, end), template_end, plain_spans in zip(texts, spans, template_ends, plain, strict=True):
            encoding = self._encode(text, add_special, appended, plain_spans)
            if not encoding["input_ids"]:  # a row of padding alone: its "last token" would be a pad token's activation
                raise FeatsteerError(f"the text {text!r} tokenizes to no tokens (without the chat template, on a tokenizer that "
                                     "adds no BOS token): leave out empty texts, or apply the chat template")
            rows.append(encoding["input_ids"])
            if "offset_mapping" not in encoding:
                raise FeatsteerError(f"the tokenizer ({type(self.tokenizer).__name__}) gives no character offsets, which featsteer needs "
                                     "to find where each instruction ends: load the model's fast tokenizer (its tokenizer.json)")
            n_post.append(sum(1 for start, _ in encoding["offset_mapping"] if start >= end))
            # a token the template's tail and the prefill share (merged across the join) counts as the template's
            n_prefill.append(sum(1 for start, _ in encoding["offset_mapping"] if start >= template_end))
        return EncodedPrompts(rows, n_post, None if prefill is None else n_prefill)

    def pad_encoded(self, encoded: EncodedPrompts, indices: Iterable[int]) -> TokenBatch:
        """The left-padded batch of the prompts at `indices` of `encoded` (`encode_prompts`), in that order: the rows
        `tokenize` gives for those prompts."""
        indices = list(indices)
        batch = self._pad_left([encoded.input_ids[i] for i in indices], [encoded.n_post_instruction[i] for i in indices])
        if encoded.n_prefill is not None:
            batch.n_prefill = torch.tensor([encoded.n_prefill[i] for i in indices], dtype=torch.long)
        return batch

    def _plain_spans(self, instructions: Sequence[str], texts: Sequence[str], spans: Sequence[tuple[int, int]], system: str | None,
                     prefill: Sequence[str] | None) -> list[list[tuple[int, int]]]:
        """Per row, in order, the character spans to tokenize as plain text: the system prompt, the instruction and the
        prefill (which starts where the formatted text ends), each where it holds special-token text.

        Raises:
            FeatsteerError: the system prompt holds special-token text and the chat template does not keep its text.
        """
        system_held = system is not None and bool(self._special_in(system))
        out = []
        for i, (text, (start, end)) in enumerate(zip(texts, spans, strict=True)):
            row = []
            if system_held:
                row.append(_system_span(text, system, start))
            if self._special_in(instructions[i]):
                row.append((start, end))
            if prefill is not None and self._special_in(prefill[i]):
                row.append((len(text), len(text) + len(prefill[i])))
            out.append(row)
        return out

    def _encode(self, text: str, add_special: bool, appended: int, plain_spans: Sequence[tuple[int, int]]) -> dict:
        """`input_ids` and `offset_mapping` of one text, without the `appended` special tokens at its end; with
        `plain_spans` (in order, apart), each span (special-token text as plain text) and the text between them encoded
        apart."""
        keys = ("input_ids", "offset_mapping")
        if not plain_spans:
            encoding = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
            # a prompt ends where the model goes on: an end-of-sequence token after it is no part of it
            return {key: encoding[key][:-appended] if appended else encoding[key] for key in keys if key in encoding}
        pieces, position = [], 0
        for left, right in plain_spans:
            pieces += [(position, left, False), (left, right, True)]
            position = right
        pieces.append((position, len(text), False))
        out: dict = {"input_ids": [], "offset_mapping": []}
        for k, (left, right, plain) in enumerate(pieces):
            if left == right and not (k == 0 and add_special):
                continue
            encoding = self.tokenizer(text[left:right], add_special_tokens=add_special and k == 0, return_offsets_mapping=True,
                                      split_special_tokens=plain)
            if "offset_mapping" not in encoding:
                return {"input_ids": encoding["input_ids"]}  # the caller names the missing offsets
            ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
            if k == 0 and add_special and appended:
                ids, offsets = ids[:-appended], offsets[:-appended]
            out["input_ids"] += list(ids)
            out["offset_mapping"] += [(a + left, b + left) for a, b in offsets]
        return out

    def _appended_special_tokens(self) -> int:
        """How many special tokens the tokenizer puts after a text when it adds them (an EOS for Llama tokenizers with
        `add_eos_token=True`), found by encoding one probe text with and without them; 0 for most tokenizers. Worked out
        once per tokenizer state and special-token rule (`_special_token_rule`: every tokenized batch asks), so setting a
        Llama tokenizer's `add_eos_token` after a first call is seen."""
        return self._cached_for_tokenizer("_appended_for", self._count_appended_special_tokens, self._special_token_rule())

    def _special_token_rule(self) -> tuple:
        """What decides where the tokenizer puts its special tokens: the fast tokenizer's post-processor, serialized (a
        Llama tokenizer rebuilds it when `add_bos_token`/`add_eos_token` is set; the object read back is new every time,
        so its content is compared), and the `add_bos_token`/`add_eos_token` flags a Python tokenizer reads when encoding.
        Cheap: about a microsecond."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        processor = getattr(backend, "post_processor", None)
        serialized = None if processor is None else processor.__getstate__()
        return serialized, getattr(self.tokenizer, "add_bos_token", None), getattr(self.tokenizer, "add_eos_token", None)

    def _count_appended_special_tokens(self) -> int:
        """The probe behind `_appended_special_tokens`: the tokens after the text "a" that encoding it with special tokens
        adds."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        marked = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        lead = next((i for i in range(len(marked) - len(plain) + 1) if marked[i : i + len(plain)] == plain), None)
        return 0 if lead is None else len(marked) - lead - len(plain)

    def _pad_left(self, rows: list[list[int]], n_post: list[int]) -> TokenBatch:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row) :] = 1
        return TokenBatch(input_ids.to(self.device), mask.to(self.device), torch.tensor(n_post, dtype=torch.long))

    def run(self, batch: TokenBatch, *, stop_at: str | None = None, last_only: bool = False, grad: bool = False) -> Tensor | None:
        """One forward pass under `inference_mode` (or with autograd on, for gradients through hooks).

        Args:
            batch: left-padded tokens.
            stop_at: a hook name; the pass ends right after that hook fires (no logits are returned).
            last_only: return logits of the last position only, `(batch, 1, vocab)`.
            grad: record the autograd graph, so gradients of the logits with respect to hooked activations
                can be taken (`torch.autograd.grad`); costs the memory of the graph.

        Returns:
            Logits `(batch, pos, vocab)`, or None when `stop_at` ended the pass.
        """
        stop_site = self.hook_site(stop_at) if stop_at else None
        self._prepass(batch)
        remove = self._install_hooks([(stop_site, _raise_stop)]) if stop_site else (lambda: None)
        self.pass_attention_mask, self.pass_post_instruction, self.pass_prefill = batch.attention_mask, batch.n_post_instruction, batch.n_prefill
        try:
            with torch.enable_grad() if grad else torch.inference_mode():
                logits, _ = self._forward(batch, None, False, 1 if last_only else 0)
            return logits[:, -1:] if last_only else logits
        except StopForward:
            return None
        finally:
            remove()
            self.pass_attention_mask = self.pass_post_instruction = self.pass_prefill = None

    def run_continued(self, batch: TokenBatch, continuations: Sequence[Sequence[int]], *, grad: bool = False,
                      last_only: bool = False) -> Tensor:
        """Logits of left-padded prompts each followed by given continuation tokens, in one forward pass.

        The prompts keep their left padding up to a common width `P`; each row's continuation follows at column `P`
        and shorter continuations are padded on the right (masked out). Hooks see the pass as a generation step
        (`generation_step` 1, `generation_prompt_length` `P`), so interventions that act only on the prompt or only
        on generated tokens treat the continuation as generated, as they would while decoding it.

        Args:
            batch: left-padded prompts (from `tokenize`).
            continuations: per row, the token ids that follow the prompt (may be empty).
            grad: record the autograd graph (as `run(grad=True)`), so a loss on these logits can be differentiated
                with respect to tensors the installed hooks use (`directions.optimize`).
            last_only: compute the logits of the last column only, `(batch, 1, vocab)`: each row's next token when every
                continuation has the same length (greedy decoding without a cache).

        Returns:
            Logits `(batch, 1 + longest continuation, vocab)` of the columns from the prompts' last token on: column `j`
            predicts continuation token `j` (column 0 the first). The prompt tokens' own logits are never computed: for a
            long prompt and a large vocabulary they are gigabytes, and with `grad` their graph as much again.
        """
        if len(continuations) != batch.input_ids.shape[0]:
            raise FeatsteerError(f"got {len(continuations)} continuations for {batch.input_ids.shape[0]} prompts: give one per prompt")
        self._prepass(batch)  # on the prompts alone, as the prefill of a generation would be
        width = batch.input_ids.shape[1]
        extra = max((len(c) for c in continuations), default=0)
        input_ids = torch.cat([batch.input_ids, batch.input_ids.new_zeros((len(continuations), extra))], 1)
        mask = torch.cat([batch.attention_mask, batch.attention_mask.new_zeros((len(continuations), extra))], 1)
        for row, tokens in enumerate(continuations):
            if tokens:
                input_ids[row, width : width + len(tokens)] = torch.tensor([int(t) for t in tokens], dtype=torch.long)
                mask[row, width : width + len(tokens)] = 1
        full = TokenBatch(input_ids, mask)
        self.generation_step, self.generation_prompt_length, self.pass_attention_mask = 1, width, mask
        self.pass_post_instruction, self.pass_prefill = batch.n_post_instruction, batch.n_prefill
        try:
            with torch.enable_grad() if grad else torch.inference_mode():
                logits, _ = self._forward(full, None, False, 1 if last_only else extra + 1)
            return logits[:, -1:] if last_only else logits[:, -(extra + 1):]
        finally:
            self.generation_step = self.pass_attention_mask = self.pass_post_instruction = self.pass_prefill = None

    def logits(
        self, instructions: Sequence[str], *, system: str | None = None, batch_size: int = 16,
        max_batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
    ) -> Tensor:
        """Next-token logits `(n, vocab)` at the end of each chat-formatted instruction (float32): the answer's first token
        (for a harmony model after `answer_opening()`, see `format_prompts`).

        Instructions are batched in length order (so a long prompt pads only its neighbours), and the rows
        come back in input order. `max_batch_tokens` caps a batch's padded tokens (see `generate`).
        """
        out: Tensor | None = None
        for rows, batch in self.token_batches(instructions, batch_size, max_batch_tokens, system, True):
            logits = self.run(batch, last_only=True)[:, -1, :].float()
            if out is None:
                out = logits.new_empty((len(instructions), logits.shape[-1]))
            out[rows] = logits
        if out is None:
            raise FeatsteerError("no instructions given: pass at least one prompt")
        return out

    def generate(
        self,
        instructions: Sequence[str],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        max_batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
        system: str | None = None,
        chat: bool = True,
        prefill: Sequence[str] | None = None,
    ) -> list[str]:
        """Batched greedy generation with left padding; returns the decoded responses.

        Prompts are batched in length order and rows come back in input order. Rows stop at an end-of-turn
        token; the batch stops when every row has finished. `max_batch_tokens` caps a batch's padded prompt
        tokens (rows x longest prompt), so a large `batch_size` speeds up decoding, where a CPU's matrix
        products are bound by reading the weights, without making the prefill of long prompts pad badly.
        `prefill` (one text per instruction) starts each response with that text; the returned responses are
        what the model wrote after it.
        """
        return self.generate_with_first_logits(
            instructions, max_new_tokens=max_new_tokens, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
            system=system, chat=chat, keep_logits=False, prefill=prefill,
        )[0]

    def generate_with_first_logits(
        self,
        instructions: Sequence[str],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        max_batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
        system: str | None = None,
        chat: bool = True,
        keep_logits: bool = True,
        prefill: Sequence[str] | None = None,
    ) -> tuple[list[str], Tensor | None]:
        """`generate`, also returning the `(n, vocab)` float32 logits of the first response token.

        Those logits are what `logits` computes, read from the generation's own prefill, so evaluating
        refusal and first-token KL on the same prompts costs one prefill instead of two.
        """
        generation = self.generate_with_tokens(
            instructions, max_new_tokens=max_new_tokens, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
            system=system, chat=chat, keep_logits=keep_logits, prefill=prefill,
        )
        return generation.texts, generation.first_logits

    def generate_with_tokens(
        self,
        instructions: Sequence[str],
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        max_batch_tokens: int | None = DEFAULT_BATCH_TOKENS,
        system: str | None = None,
        chat: bool = True,
        keep_logits: bool = True,
        prefill: Sequence[str] | None = None,
        label: str | None = None,
    ) -> Generation:
        """`generate_with_first_logits`, also keeping the token ids each response was generated as.

        The ids are what the model wrote (after a prefill), ending with the end-of-turn token when it wrote one before
        `max_new_tokens`: the decoded, stripped text can tokenize into other tokens, so metrics that teacher-force a
        response (its NLL, the KL along it) read these. `label` names the prompt set in a warning about special-token
        text ("harmful prompt 2").

        For a harmony tokenizer (GPT-OSS, `harmony_control_ids`) generation starts at the template's `<|start|>assistant`
        (`format_prompts(for_generation=True)`; after `answer_opening()` with a prefill), the ids hold the whole turn,
        reasoning included, and the text is only its final channel's message; a response with no final message within
        `max_new_tokens` keeps its reasoning as the text, is flagged in `Generation.reasoning_only` and counted in a logged
        warning. The first-token logits are then read at the answer's start (`logits`), one more prompt pass per batch.
        After a prefill (an empty one answers directly, `direct_answer_prefill`) the ids continue the final message the
        answer opening began: its `<|end|>` ends the row, and a budget below `MIN_REASONING_TOKENS` is not warned about.
        """
        from tqdm.auto import tqdm

        if max_new_tokens < 1:
            raise FeatsteerError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        responses: list[str] = [""] * len(instructions)
        token_ids: list[tuple[int, ...]] = [()] * len(instructions)
        first: Tensor | None = None
        _check_prefill(prefill, instructions)  # before token_batches indexes it
        batches = self.token_batches(instructions, batch_size, max_batch_tokens, system, chat, prefill, label, for_generation=True)
        stop_set, control = self.stop_token_ids, self.harmony_control_ids()
        if control is not None and prefill is None:
            self._warn_short_reasoning_budget(max_new_tokens)
        score_apart = keep_logits and chat and prefill is None and bool(self.answer_opening())
        # a prefill goes after the answer opening: what is written after it is the final message's text
        opened = self.answer_opening() if chat and prefill is not None else ""
        reasoning_only = [False] * len(instructions)
        for rows, batch in tqdm(batches, desc="generate", unit="batch", disable=not self.show_progress or len(batches) < 3, leave=False):
            tokens, logits = self._greedy(batch, max_new_tokens, keep_stop=True, opened=opened)
            if score_apart:  # the generation prompt stops before the answer opening: read the answer's first token there
                scored = self.tokenize([instructions[i] for i in rows], system=system)
                logits = self.run(scored, last_only=True)[:, -1, :].float().cpu()
            for i, row in zip(rows, tokens, strict=True):
                token_ids[i] = tuple(row)
                if control is None:
                    text_ids = row[:-1] if row and row[-1] in stop_set else row
                    responses[i] = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
                else:
                    reply = parse_harmony(opened + harmony_text(self.tokenizer, row, control))
                    responses[i], reasoning_only[i] = reply.answer, reply.reasoning_only
            if keep_logits:
                if first is None:
                    first = logits.new_empty((len(instructions), logits.shape[-1]))
                first[rows] = logits
        if any(reasoning_only):
            logger.warning("%d of %d %sresponses reached no final answer within max_new_tokens=%d, so their text is the model's "
                           "reasoning (its analysis channel): raise max_new_tokens", sum(reasoning_only), len(instructions),
                           f"{label} " if label else "", max_new_tokens)
        return Generation(responses, token_ids, first, tuple(reasoning_only))

    def _warn_short_reasoning_budget(self, max_new_tokens: int) -> None:
        """Warn once per adapter that a harmony model given fewer than `MIN_REASONING_TOKENS` new tokens mostly stops
        inside its reasoning, before its final answer. Only generation at a budget the caller chose gets here (the CLI
        commands that generate so all take `--max-new-tokens`): the picks and targets with budgets of their own answer
        directly (`direct_answer_prefill`)."""
        if max_new_tokens >= MIN_REASONING_TOKENS or self.__dict__.get("_short_budget_warned"):
            return
        self._short_budget_warned = True
        logger.warning("max_new_tokens=%d is short for a harmony model (GPT-OSS), which reasons before it answers: most "
                       "responses will have no final answer; use --max-new-tokens %d or more (max_new_tokens= in Python)", max_new_tokens, MIN_REASONING_TOKENS)

    def plan_batches(
        self, instructions: Sequence[str], batch_size: int, max_batch_tokens: int | None = None,
        system: str | None = None, chat: bool = True, prefill: Sequence[str] | None = None, label: str | None = None,
        for_generation: bool | Sequence[bool] = False,
    ) -> list[list[int]]:
        """Group prompt indices into forward batches, longest prompts first.

        Every batch has at most `batch_size` rows; with `max_batch_tokens` it also holds at most that many
        padded tokens (a prompt longer than the budget gets a batch of its own). `capture`, `logits` and
        `generate` batch this way (through `token_batches`), so a few very long prompts do not pad a whole batch to their
        length. Special-token text in the prompts, the system prompt or the prefills is warned about here, with the index
        in `instructions` and `label` (the prompt set's name) when given. `for_generation` (one flag, or one per
        instruction) picks the prompts measured as `tokenize` does.

        Returns:
            Lists of indices into `instructions`, in the order the batches are run.
        """
        return self._plan(instructions, batch_size, max_batch_tokens, system, chat, prefill, label, for_generation)[0]

    def token_batches(
        self, instructions: Sequence[str], batch_size: int, max_batch_tokens: int | None = None,
        system: str | None = None, chat: bool = True, prefill: Sequence[str] | None = None, label: str | None = None,
        for_generation: bool | Sequence[bool] = False,
        encode_all: bool = False,
    ) -> TokenBatches:
        """`plan_batches` with each batch tokenized as `tokenize` would: iterating gives `(indices, batch)` in the order the
        batches run, `len()` counts them.

        A plan with `max_batch_tokens` tokenizes every prompt to learn its length; its batches are padded from those ids
        rather than tokenized again. Without a budget each batch is tokenized when the iteration reaches it, unless
        `encode_all` asks for every prompt's ids up front (for a caller that reads `TokenBatches.n_post_instruction`
        before the first batch).
        """
        plan, encoded = self._plan(instructions, batch_size, max_batch_tokens, system, chat, prefill, label, for_generation)
        if encoded is None and encode_all:  # the plan warned
            encoded = self.encode_prompts(instructions, system, chat, prefill, warn=False, for_generation=for_generation)
        return TokenBatches(self, instructions, plan, encoded, system, chat, prefill, for_generation)

    def _plan(
        self, instructions: Sequence[str], batch_size: int, max_batch_tokens: int | None, system: str | None, chat: bool,
        prefill: Sequence[str] | None, label: str | None, for_generation: bool | Sequence[bool] = False,
    ) -> tuple[list[list[int]], EncodedPrompts | None]:
        """`plan_batches`, also returning the prompts' encoding when the plan needed their token lengths (None otherwise)."""
        if batch_size < 1:
            raise FeatsteerError(f"batch_size must be at least 1, got {batch_size}")
        if not self.escape_special_tokens:
            self._warn_special_text(instructions, system if chat else None, prefill, label)  # indices of the whole list
        if max_batch_tokens is None:
            return _length_batches(instructions, batch_size), None
        if max_batch_tokens < 1:
            raise FeatsteerError(f"max_batch_tokens must be at least 1 (or None for no cap), got {max_batch_tokens}")
        encoded = self.encode_prompts(instructions, system, chat, prefill, warn=False, for_generation=for_generation)
        lengths = [len(ids) for ids in encoded.input_ids]
        return token_budget_batches(lengths, batch_size, max_batch_tokens), encoded

    def _greedy(self, batch: TokenBatch, max_new_tokens: int, keep_stop: bool = False,
                opened: str = "") -> tuple[list[list[int]], Tensor]:
        """Greedy tokens per row (cut at the stop token, kept with `keep_stop`) and the float32 logits of the first step.
        `opened`: the harmony header the prompts end with (`answer_opening()` before a prefill), so that an `<|end|>`
        closing the message it opens ends the row."""
        stop_ids = torch.tensor(sorted(self.stop_token_ids), device=self.device)
        control = self.harmony_control_ids()
        finished = torch.zeros(batch.input_ids.shape[0], dtype=torch.bool, device=self.device)
        input_ids, mask = batch.input_ids, batch.attention_mask
        generated: list[Tensor] = []
        first_logits: Tensor | None = None
        step, cache = batch, None
        self._prepass(batch)
        self.generation_prompt_length, self.pass_post_instruction = batch.input_ids.shape[1], batch.n_post_instruction
        self.pass_prefill = batch.n_prefill
        try:
            with torch.inference_mode():
                for index in range(max_new_tokens):
                    self.generation_step, self.pass_attention_mask = index, step.attention_mask
                    logits, cache = self._forward(step, cache, True, 1)
                    if first_logits is None:
                        first_logits = logits[:, -1, :].float().cpu()
                    chosen = logits[:, -1, :].argmax(-1)
                    # argmax picks a NaN or +inf where there is one, so the picked logits show them at no extra cost
                    # (an -inf logit, a token masked out, is allowed)
                    _check_finite_logits(logits[:, -1, :].gather(-1, chosen[:, None])[:, 0], finished, index, self.dtype)
                    next_token = chosen.masked_fill(finished, -1)
                    generated.append(next_token)
                    finished |= torch.isin(next_token, stop_ids)
                    if control is not None:
                        finished |= self._closed_final_message(generated, next_token, control, opened)
                    if bool(finished.all()):
                        break
                    # a finished row reads on, unmasked, and its outputs are dropped: masking it out would round the other
                    # rows differently (SDPA's masked kernel once an unpadded batch has a finished row; an MoE model
                    # groups the tokens its experts see otherwise), so each row's results would depend on its neighbours
                    fed = next_token.clamp(min=0)[:, None]
                    input_ids = torch.cat([input_ids, fed], 1)
                    mask = torch.cat([mask, torch.ones_like(fed)], 1)
                    # backends with a KV cache take only the new token; the others re-read the sequence
                    step = _CachedStep(fed, mask, finished.clone()) if cache is not None else TokenBatch(input_ids, mask)
        finally:
            self.generation_step = self.pass_attention_mask = self.pass_post_instruction = self.pass_prefill = None
        stop_set = set(stop_ids.tolist())
        return [_cut_at_stop(row, stop_set, keep_stop) for row in torch.stack(generated, 1).tolist()], first_logits

    def _closed_final_message(self, generated: list[Tensor], next_token: Tensor, control: Mapping[int, str],
                              opened: str = "") -> Tensor:
        """`(batch,)` True for the rows whose `<|end|>` just closed a final-channel message of a harmony turn: the answer is
        complete, though a model may go on with another message instead of `<|return|>`. `opened`: the header the prompt
        ended with, whose message the first generated tokens continue."""
        end = next(token for token, text in control.items() if text == END)
        closed = torch.zeros_like(next_token, dtype=torch.bool)
        rows = (next_token == end).nonzero()[:, 0].tolist()
        if rows:
            written = torch.stack(generated, 1)[rows].tolist()
            for row, ids in zip(rows, written, strict=True):
                closed[row] = parse_harmony(opened + harmony_text(self.tokenizer, ids, control)).final_closed
        return closed


class TokenBatches:
    """The batches of a plan (`ModelAdapter.token_batches`): `len()` of them, and iterating gives `(indices, batch)`, each
    batch padded from the plan's encoding or, when the plan needed none, tokenized as it is reached."""

    def __init__(self, model: ModelAdapter, instructions: Sequence[str], plan: list[list[int]], encoded: EncodedPrompts | None,
                 system: str | None, chat: bool, prefill: Sequence[str] | None, for_generation: bool | Sequence[bool] = False):
        self.plan = plan
        """Lists of indices into the instructions, in the order the batches are run (`ModelAdapter.plan_batches`)."""
        self._model, self._instructions, self._encoded = model, instructions, encoded
        self._system, self._chat, self._prefill = system, chat, prefill
        self._for_generation = for_generation

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def n_post_instruction(self) -> list[int] | None:
        """Each instruction's tokens after its instruction (`TokenBatch.n_post_instruction`), in input order, when the plan
        tokenized them for their lengths; None when it did not."""
        return None if self._encoded is None else list(self._encoded.n_post_instruction)

    def __iter__(self) -> Iterator[tuple[list[int], TokenBatch]]:
        for rows in self.plan:
            if self._encoded is not None:
                yield rows, self._model.pad_encoded(self._encoded, rows)
            else:
                prefill = None if self._prefill is None else [self._prefill[i] for i in rows]
                flags = self._for_generation if isinstance(self._for_generation, bool) else [self._for_generation[i] for i in rows]
                yield rows, self._model.tokenize([self._instructions[i] for i in rows], system=self._system, chat=self._chat,
                                                 prefill=prefill, for_generation=flags)


class _CachedStep(TokenBatch):
    """One new token per row, with the attention mask of the whole sequence so far, and which rows have finished (they
    read on, but their outputs are dropped)."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, finished: Tensor | None = None):
        super().__init__(input_ids, attention_mask)
        self.finished = finished

    @property
    def position_ids(self) -> Tensor:
        return (self.attention_mask.long().sum(-1, keepdim=True) - 1).clamp(min=0)


def _length_batches(instructions: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of `instructions` in batches of similar length (longest first), to keep left padding small."""
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]), reverse=True)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def token_budget_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Length-ordered batches (longest first) of at most `batch_size` rows and `max_batch_tokens` padded
    tokens (rows x longest row); a prompt longer than the budget gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        # longest first: the batch's first row sets its padded length
        if current is not None and len(current) < batch_size and (len(current) + 1) * lengths[current[0]] <= max_batch_tokens:
            current.append(i)
        else:
            batches.append([i])
    return batches


def _system_span(text: str, system: str, before: int) -> tuple[int, int]:
    """Where the system prompt's text sits in a formatted prompt, before character `before` (the instruction's start).

    Raises:
        FeatsteerError: the chat template changed the text, so its special-token text cannot be escaped.
    """
    for candidate in (system, system.strip()):
        at = text.rfind(candidate, 0, before)
        if at >= 0:
            return at, at + len(candidate)
    raise FeatsteerError(f"the chat template does not keep the system prompt {_excerpt(system)} as written, so its special-token "
                         "text cannot be tokenized as plain text: remove that text from the system prompt, or run without "
                         "escape_special_tokens (--escape-special)")


def _excerpt(text: str, width: int = 40) -> str:
    """The start of a prompt, quoted, to name it in a message beside its index."""
    return repr(text if len(text) <= width else text[:width] + "...")


def _cut_at_stop(row: list[int], stop_ids: set[int], keep_stop: bool = False) -> list[int]:
    """The row's tokens up to its first stop token (included with `keep_stop`); -1 marks steps after the row finished."""
    out = []
    for token in row:
        if token < 0:
            break
        if token in stop_ids:
            if keep_stop:
                out.append(token)
            break
        out.append(token)
    return out


def _raise_stop(activation: Tensor, site: HookSite) -> None:
    raise StopForward(site.name)


def _check_finite_logits(picked: Tensor, finished: Tensor, step: int, dtype: torch.dtype) -> None:
    """Greedy decoding of NaN logits yields arbitrary tokens (often an empty response, which reads as a refusal),
    so a generation whose unfinished rows picked a NaN or infinite logit stops with an error instead."""
    bad = ~torch.isfinite(picked) & ~finished
    if bool(bad.any()):
        raise FeatsteerError(
            f"the next-token logits are not finite (NaN or inf) for {int(bad.sum())} of {len(bad)} prompts at generation "
            f"step {step}: an intervention or edit with a very large or non-finite value, or a model that overflows in "
            f"{str(dtype).removeprefix('torch.')}; use smaller values, or load the model in float32"
        )


def _check_prefill(prefill: Sequence[str] | None, instructions: Sequence[str]) -> None:
    """A prefill, when given, has one text per instruction."""
    if prefill is not None and len(prefill) != len(instructions):
        raise FeatsteerError(f"prefill has {len(prefill)} texts for {len(instructions)} instructions: give one per instruction")


def generation_stop_ids(model: object) -> set[int]:
    """The ids a Hugging Face model's `generation_config.eos_token_id` lists (an int, a list of them, or None), which
    `model.generate` stops at: many chat models end a turn with a token other than their tokenizer's EOS."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if declared is None:
        return set()
    return {int(token) for token in ([declared] if isinstance(declared, int) else declared)}
