"""Models behind one adapter: load any supported model and address its activations by TransformerLens name."""

from featsteer.models.adapter import (
    BiasWriter,
    Generation,
    HookFn,
    ModelAdapter,
    ResidualWriter,
    StopForward,
    TokenBatch,
)
from featsteer.models.chat import (
    BLANK_SYSTEM,
    FALLBACK_TEMPLATE,
    FormattedPrompt,
    check_system,
    format_instruction,
)
from featsteer.models.families import FAMILIES, FamilySpec, family_for, supported_model_types
from featsteer.models.fingerprint import weights_fingerprint
from featsteer.models.hookpoints import (
    HEAD_KINDS,
    LAYER_KINDS,
    NORM_KINDS,
    RESIDUAL_KINDS,
    ROUTING_KINDS,
    WRITE_KINDS,
    HookSite,
    hook_name,
    parse_hook_name,
    stream_point,
)
from featsteer.models.loading import default_cache_dir, load_model

__all__ = [
    "BLANK_SYSTEM",
    "BiasWriter",
    "FALLBACK_TEMPLATE",
    "FAMILIES",
    "HEAD_KINDS",
    "LAYER_KINDS",
    "NORM_KINDS",
    "RESIDUAL_KINDS",
    "ROUTING_KINDS",
    "WRITE_KINDS",
    "FamilySpec",
    "FormattedPrompt",
    "Generation",
    "HookFn",
    "HookSite",
    "ModelAdapter",
    "ResidualWriter",
    "StopForward",
    "TokenBatch",
    "check_system",
    "default_cache_dir",
    "family_for",
    "format_instruction",
    "hook_name",
    "load_model",
    "parse_hook_name",
    "stream_point",
    "supported_model_types",
    "weights_fingerprint",
]
