"""`load_model(spec)`: one entry point from any model description to a `ModelAdapter`.

Accepted specs: `"organism"` (the embedded refusal organism), a local Hugging Face directory, a `.gguf`
file (converted once and cached as safetensors), a hub id (when online), or an already-built object (a
`transformers` causal LM, a TransformerLens `HookedTransformer` or `TransformerBridge`, or an adapter).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from featsteer.errors import FeatsteerError
from featsteer.models.adapter import ModelAdapter
from featsteer.models.families import family_for

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where converted models are cached: `$FEATSTEER_CACHE` or `~/.cache/featsteer`."""
    return Path(os.environ.get("FEATSTEER_CACHE", Path.home() / ".cache" / "featsteer"))


def load_model(spec, *, tokenizer=None, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ModelAdapter:
    """Load a model behind featsteer's adapter.

    Args:
        spec: `"organism"`, `"tiny:<family>"` (random, built from a config), a local HF directory, a
            `.gguf` path, a hub id, or a model object.
        tokenizer: tokenizer for a `transformers` model object (else loaded from its `name_or_path`).
        dtype: weight dtype for models loaded from disk or the hub.
        device: torch device for models loaded from disk or the hub.

    Raises:
        FeatsteerError: unknown spec, missing file, unsupported architecture, or hub unreachable.
    """
    if isinstance(spec, ModelAdapter):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        return _from_object(spec, tokenizer)
    text = str(spec)
    if text == "organism":
        from featsteer.organism import organism_path

        return _from_directory(organism_path(), dtype, device, name="organism")
    if text.startswith("tiny:"):
        return _tiny(text.removeprefix("tiny:"))
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FeatsteerError(f"GGUF file not found: {path}")
        return _from_directory(_converted_gguf(path), dtype, device, name=path.name)
    if path.is_dir():
        return _from_directory(path, dtype, device, name=text)
    if path.exists() or text.startswith((".", "/", "~")):
        raise FeatsteerError(f"model path '{text}' is not a model directory or .gguf file")
    return _from_hub(text, dtype, device)


def _from_object(model, tokenizer) -> ModelAdapter:
    kind = type(model).__name__
    if kind in ("HookedTransformer", "TransformerBridge") or hasattr(model, "hook_dict"):
        from featsteer.models.tl import TLModelAdapter

        return TLModelAdapter(model)
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        from featsteer.models.hf import HFModelAdapter

        if tokenizer is None:
            tokenizer = _tokenizer_for(getattr(model, "name_or_path", ""))
        return HFModelAdapter(model, tokenizer)
    raise FeatsteerError(
        f"cannot load a model from a {kind}: pass 'organism', a path, a hub id, a transformers causal LM, "
        "or a TransformerLens HookedTransformer/TransformerBridge"
    )


def _tiny(family: str) -> ModelAdapter:
    """A random tiny model built from a config (`tiny:llama`, `tiny:gpt2`, ...), for trying things offline."""
    from featsteer.models.hf import HFModelAdapter
    from featsteer.testing import FAMILY_NAMES, tiny_model

    if family not in FAMILY_NAMES:
        raise FeatsteerError(f"unknown tiny model 'tiny:{family}': use one of {', '.join('tiny:' + f for f in FAMILY_NAMES)}")
    model, tokenizer = tiny_model(family)
    return HFModelAdapter(model, tokenizer, name=f"tiny:{family}")


def _tokenizer_for(source) -> object:
    from transformers import AutoTokenizer

    if not source:
        raise FeatsteerError("this model object has no name_or_path: pass tokenizer=... to load_model")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - any loader failure becomes one clear line
        raise FeatsteerError(f"could not load a tokenizer for '{source}' ({type(error).__name__}): pass tokenizer=...") from None


def _check_architecture(config) -> None:
    family_for(config.model_type)
    if getattr(config, "is_encoder_decoder", False):
        raise FeatsteerError(f"'{config.model_type}' is an encoder-decoder model: featsteer needs a decoder-only causal LM")


def _from_directory(path: Path, dtype: torch.dtype, device: str, name: str) -> ModelAdapter:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from featsteer.models.hf import HFModelAdapter

    if not (path / "config.json").is_file():
        raise FeatsteerError(f"'{path}' has no config.json: it is not a Hugging Face model directory")
    _check_architecture(AutoConfig.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return HFModelAdapter(model, AutoTokenizer.from_pretrained(path), name=name)


def _from_hub(model_id: str, dtype: torch.dtype, device: str) -> ModelAdapter:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from featsteer.models.hf import HFModelAdapter

    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as error:  # noqa: BLE001
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise FeatsteerError(
            f"could not load model '{model_id}': it is not a local directory or .gguf file, and the Hugging Face "
            f"hub did not provide it ({reason}); check the name and your network, or pass a local path"
        ) from None
    _check_architecture(config)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).to(device)
    return HFModelAdapter(model, AutoTokenizer.from_pretrained(model_id), name=model_id)


def _converted_gguf(path: Path) -> Path:
    """Convert a GGUF file to a safetensors model directory once; later loads read the cache."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = default_cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors under %s (first load only)", path.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # noqa: BLE001
        raise FeatsteerError(f"could not read GGUF file {path} ({type(error).__name__}: {str(error)[:160]})") from None
    # transformers dequantizes GGUF tensors on load but still marks the model as quantized, which blocks
    # save_pretrained; the weights are plain tensors by now, so drop the marker before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
