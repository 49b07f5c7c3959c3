"""Configuration of an SAE training run, as frozen dataclasses that round-trip through JSON.

A run is fully described by one `TrainConfig` (what data, which SAE, how to optimise, where to write),
stored next to every trained SAE as `training_config.json`, so any SAE can be retrained exactly.
Validation happens here, before a model is loaded, so bad input fails in a second with one line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from featsteer.errors import FeatsteerError
from featsteer.models.hookpoints import HEAD_KINDS, LAYER_KINDS
from featsteer.models.loading import resolve_dtype
from sae_training.architectures import ARCHITECTURES, DEFAULT_K


def _check_positive(value: float | int | None, name: str) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise FeatsteerError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ArchitectureConfig:
    """Which sae_lens SAE to train and how wide and sparse it is."""

    architecture: str = "topk"
    """Registry key in `sae_training.architectures.ARCHITECTURES`: topk, batchtopk, standard or jumprelu."""
    d_sae: int | None = None
    """Number of features; exactly one of `d_sae` and `expansion` must be set."""
    expansion: float | None = None
    """Number of features as a multiple of the SAE's input width (`d_model`; `n_heads * d_head` at `attn_z`)."""
    k: float | None = None
    """Active features per token (topk) or on average per token (batchtopk); None: the architecture default."""
    sparsity_coefficient: float | None = None
    """L1 coefficient (standard) or L0 coefficient (jumprelu); None: the architecture default."""
    normalize_activations: bool = True
    """Rescale inputs to mean norm sqrt(d_in) while training (folded into the weights at the end)."""

    def __post_init__(self) -> None:
        spec = ARCHITECTURES.get(self.architecture)
        if spec is None:
            raise FeatsteerError(f"unknown SAE architecture '{self.architecture}': use one of {', '.join(ARCHITECTURES)}")
        if (self.d_sae is None) == (self.expansion is None):
            raise FeatsteerError("give exactly one of --d-sae N (number of features) or --expansion E (multiple of the input width: d_model, or n_heads x d_head at attn_z)")
        if self.d_sae is not None and (not isinstance(self.d_sae, int) or self.d_sae < 1):
            raise FeatsteerError(f"--d-sae must be a positive integer, got {self.d_sae!r}")
        _check_positive(self.expansion, "--expansion")
        _check_positive(self.sparsity_coefficient, "--sparsity")
        if self.k is not None and not spec.uses_k:
            raise FeatsteerError(f"--k applies to topk and batchtopk SAEs, not '{self.architecture}': use --sparsity instead")
        _check_positive(self.k, "--k")
        if self.architecture == "topk" and self.k is not None and float(self.k) != int(self.k):
            raise FeatsteerError(f"--k {self.k:g}: topk keeps a whole number of features per token; give an integer "
                                 "(batchtopk takes a fractional mean, e.g. --arch batchtopk --k 2.5)")
        if self.d_sae is not None:  # known before any model loads; with --expansion, train_saes checks once it has
            self.check_width(self.d_sae)

    def check_width(self, d_sae: int) -> None:
        """Fail unless the active features per token (`k`, or the default) are fewer than the features `d_sae`.

        Raises:
            FeatsteerError: naming --k and the width.
        """
        active = DEFAULT_K if self.k is None else self.k
        if ARCHITECTURES[self.architecture].uses_k and active >= d_sae:
            given = "" if self.k is not None else " (the default)"
            raise FeatsteerError(f"--k {active:g}{given} must be smaller than the number of features ({d_sae}): lower --k "
                                 "or widen the SAE (--d-sae, --expansion)")

    def width(self, d_in: int) -> int:
        """Number of features for an SAE reading `d_in`-wide rows."""
        return int(self.d_sae) if self.d_sae is not None else max(1, round(float(self.expansion) * d_in))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureConfig:
        """Inverse of `to_dict`."""
        return cls(**data)


@dataclass(frozen=True)
class DataConfig:
    """Where the training activations come from."""

    model: str
    """Model spec for `featsteer.models.load_model` (`organism`, `tiny:llama`, a path, a hub id)."""
    texts: tuple[str, ...]
    """Prompt sources for `featsteer.datasets.load_prompts` (`builtin:harmless`, a .txt/.jsonl file, ...); a single string
    is one source."""
    dtype: str = "float32"
    """Dtype the model runs in while capturing (`float32`, `bfloat16`, `float16`, `auto`); activations are stored
    and SAEs trained in float32 either way."""
    device: str = "cpu"
    """Device for the model and the SAE training (`cpu`, `cuda`, `cuda:N`, `mps`)."""
    hook_kind: str = "resid_post"
    """Hook kind to train at: one of `featsteer.models.LAYER_KINDS`, or `attn_z` (`blocks.{l}.attn.hook_z`, the attention
    heads side by side: the SAE reads flat `n_heads * d_head` rows and is saved with `reshape_activations="hook_z"`)."""
    layers: tuple[int, ...] | None = None
    """Layers to train; None means every layer."""
    tokens: int = 1_000_000
    """Training tokens per SAE."""
    cycle: bool = True
    """Reuse the text when it has fewer tokens than `tokens` (False: train on what there is)."""
    chat: bool = True
    """Format each text as a chat instruction, as the model sees prompts when used."""
    eval_prompts: int = 64
    """Texts held out (never trained on) for explained variance and CE loss recovered; at most a tenth of the texts
    (a warning says when that is fewer)."""
    capture_batch: int = 16
    """Prompts per forward pass while capturing."""
    chunk_megabytes: int = 256
    """One hook's activations per chunk on disk (chunks are shuffled as units, so they hold the same texts whichever
    layers are captured together; the shards written and read are at most this size for all hooks); bounds memory
    whatever `tokens` is. Not part of the activation-cache key: a reused capture keeps its own chunks, hence its own
    training order (`metrics.json` records its `capture_chunk_megabytes`)."""
    work_dir: str | None = None
    """Parent folder for the temporary activation store (None: the system temp folder)."""
    activation_cache: str | None = None
    """Keep the captured training activations in a subfolder of this folder and reuse them on a later run
    with the same model (weights, tokenizer, chat template), dtype, text, chat formatting, shared-prefix skipping and token
    budget (or a larger budget once the text ran out), layer by layer: any earlier capture of a layer serves it, whichever
    layers were captured with it (None: a temporary folder, deleted at the end). Runs may share it."""
    skip_shared_prefix: bool = True
    """Leave out the tokens every formatted text starts with (chat-template head, BOS): their activations
    are one repeated vector, and a first token is usually an attention sink."""
    max_norm_ratio: float | None = 10.0
    """Leave out tokens whose activation norm exceeds this many times the median (attention sinks and other
    massive activations) from training and evaluation; the saved SAE passes them through untouched when
    spliced. None keeps every token."""

    def __post_init__(self) -> None:
        # one source given alone is that source, not one per character
        object.__setattr__(self, "texts", (self.texts,) if isinstance(self.texts, str) else tuple(self.texts))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        if not self.texts:
            raise FeatsteerError("no training text: pass --text SOURCE (e.g. builtin:harmless or a .txt file)")
        resolve_dtype(self.dtype)  # an unknown dtype fails here, before any model is loaded
        if self.hook_kind not in LAYER_KINDS + HEAD_KINDS:
            raise FeatsteerError(f"unknown hook kind '{self.hook_kind}': use one of {', '.join(LAYER_KINDS + HEAD_KINDS)}")
        for value, name in ((self.tokens, "--tokens"), (self.eval_prompts, "eval_prompts"), (self.capture_batch, "capture_batch"),
                            (self.chunk_megabytes, "chunk_megabytes")):
            if not isinstance(value, int) or value < 1:
                raise FeatsteerError(f"{name} must be a positive integer, got {value!r}")
        if self.max_norm_ratio is not None and not (math.isfinite(self.max_norm_ratio) and self.max_norm_ratio > 1):
            raise FeatsteerError(f"--max-norm-ratio must be a number above 1 (a multiple of the median token norm), got {self.max_norm_ratio!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["texts"] = list(self.texts)
        data["layers"] = None if self.layers is None else list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        """Inverse of `to_dict`."""
        fields = dict(data)
        fields["texts"] = tuple(fields["texts"])
        fields["layers"] = None if fields.get("layers") is None else tuple(fields["layers"])
        return cls(**fields)


@dataclass(frozen=True)
class OptimConfig:
    """How sae_lens' `SAETrainer` optimises."""

    lr: float | None = None
    """Adam learning rate; None: EleutherAI sparsify's width rule `2e-4 / sqrt(d_sae / 16384)`."""
    batch_tokens: int = 4096
    """Activations per optimiser step."""
    warmup_fraction: float = 0.05
    """Fraction of steps with a linear learning-rate warm-up."""
    decay_fraction: float = 0.2
    """Fraction of final steps with a linear decay to zero."""
    seed: int = 0
    """Seed of every random generator (SAE initialisation, data order, held-out split)."""
    dead_feature_window: int | None = None
    """Steps without firing after which a feature counts as dead (feeds the top-k auxiliary loss);
    None: a tenth of the run, between 50 and 1000 steps."""

    def __post_init__(self) -> None:
        _check_positive(self.lr, "--lr")
        if not isinstance(self.batch_tokens, int) or self.batch_tokens < 1:
            raise FeatsteerError(f"--batch-tokens must be a positive integer, got {self.batch_tokens!r}")
        if not (0 <= self.warmup_fraction < 1 and 0 <= self.decay_fraction < 1 and self.warmup_fraction + self.decay_fraction < 1):
            raise FeatsteerError("warmup_fraction and decay_fraction must be in [0, 1) and sum to less than 1")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise FeatsteerError(f"--seed must be a non-negative integer, got {self.seed!r}")

    def learning_rate(self, d_sae: int) -> float:
        """The learning rate for an SAE with `d_sae` features (see `lr`)."""
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 16384)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimConfig:
        """Inverse of `to_dict`."""
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """One `featsteer-train-sae` run."""

    data: DataConfig
    """Model, text and hook points."""
    sae: ArchitectureConfig = field(default_factory=lambda: ArchitectureConfig(expansion=8.0))
    """SAE architecture and size."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation settings."""
    out: str = "saes"
    """Output folder; each SAE goes to `<out>/<hook_name>/`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"data": self.data.to_dict(), "sae": self.sae.to_dict(), "optim": self.optim.to_dict(), "out": self.out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`."""
        return cls(data=DataConfig.from_dict(data["data"]), sae=ArchitectureConfig.from_dict(data["sae"]),
                   optim=OptimConfig.from_dict(data["optim"]), out=str(data["out"]))
