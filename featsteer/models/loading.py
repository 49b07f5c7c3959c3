"""`load_model(spec)`: one entry point from any model description to a `ModelAdapter`.

Accepted specs: `"organism"` (the embedded refusal organism), a local Hugging Face directory, a `.gguf`
file (converted once and cached as safetensors), a hub id (when online), or an already-built object (a
`transformers` causal LM, a TransformerLens `HookedTransformer` or `TransformerBridge`, or an adapter).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from featsteer.errors import FeatsteerError
from featsteer.files import process_alive
from featsteer.models.adapter import ModelAdapter
from featsteer.models.families import family_for

logger = logging.getLogger(__name__)

STALE_PARTIAL_SECONDS = 24 * 3600
"""How long a conversion's staging folder whose owner cannot be asked (written on another machine, or by a featsteer that
did not record its process) may go unchanged before a later conversion removes it as left by a killed one."""
_PARTIAL_RE = re.compile(r"^\.partial-(\d+)@(.+)-[^-]+$")


def hide_weight_loading_bar() -> None:
    """Hide transformers' per-tensor "Loading weights" bar (it would sit above every table and error line of a
    command), keeping the hub's download bars, which say something a user waits for."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    enable_progress_bars()


def default_cache_dir() -> Path:
    """Where converted models are cached: `$FEATSTEER_CACHE` or `~/.cache/featsteer`."""
    return Path(os.environ.get("FEATSTEER_CACHE", Path.home() / ".cache" / "featsteer"))


DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
"""Names `--dtype` accepts (plus `auto`: the dtype the checkpoint's config records)."""


def resolve_dtype(dtype) -> torch.dtype | str:
    """A `torch.dtype` from a dtype or its name (`float32`, `bf16`, ...); `"auto"` passes through.

    Raises:
        FeatsteerError: a name that is not a floating dtype featsteer can run in.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise FeatsteerError(f"dtype {dtype} is not a floating-point dtype: use float32, bfloat16 or float16")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in DTYPE_NAMES:
        raise FeatsteerError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[name]


def resolve_device(device) -> torch.device:
    """A `torch.device` that exists on this machine, from a device or its name (`cpu`, `cuda`, `cuda:1`, `mps`).

    Raises:
        FeatsteerError: an unknown device name, or an accelerator this machine or torch build does not have.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise FeatsteerError(f"unknown device '{device}': use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FeatsteerError(f"device '{device}' is not available: this torch build sees no CUDA GPU; use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise FeatsteerError(f"device '{device}' is not available: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif resolved.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise FeatsteerError(f"device '{device}' is not available: no Apple MPS backend here; use --device cpu")
    elif resolved.type != "cpu":
        raise FeatsteerError(f"unsupported device '{device}': use cpu, cuda, cuda:N or mps")
    return resolved


def load_model(spec, *, tokenizer=None, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               harmony_opening: str = "final") -> ModelAdapter:
    """Load a model behind featsteer's adapter.

    Args:
        spec: `"organism"`, `"tiny:<family>"` (random, built from a config), a local HF directory, a
            `.gguf` path, a hub id, or a model object.
        tokenizer: tokenizer for a `transformers` model object (else loaded from its `name_or_path`).
        dtype: weight dtype (or its name: `float32`, `bfloat16`, `float16`, `auto` for the checkpoint's own) for
            models featsteer builds or loads; a model object keeps its own. Directions, statistics and edits are
            computed in float32/float64 whatever the model's dtype.
        device: torch device (`cpu`, `cuda`, `cuda:N`, `mps`) for models featsteer builds or loads.
        harmony_opening: for a harmony model (GPT-OSS), "final" (default) ends the prompts first-token measures and capture
            read with `<|channel|>final<|message|>`, "none" leaves them at `<|start|>assistant`
            (`ModelAdapter.harmony_opening`); no effect on other models. An adapter passed in is returned as it is.

    Raises:
        FeatsteerError: unknown spec, missing file, unsupported architecture, hub unreachable, unknown dtype,
            a device this machine does not have, or a `harmony_opening` other than "final" or "none".
    """
    if isinstance(spec, ModelAdapter):
        return spec
    adapter = _load(spec, tokenizer, dtype, device)
    adapter.harmony_opening = harmony_opening
    adapter.answer_opening()  # a bad value is an error here, not at the first prompt
    log_harmony_prompts(adapter)
    return adapter


def log_harmony_prompts(adapter: ModelAdapter) -> None:
    """Log one info line for a harmony model (GPT-OSS) saying which prompt first-token measures and generation read."""
    if not adapter.is_harmony:
        return
    if adapter.answer_opening():
        logger.info("%s uses the harmony chat format (GPT-OSS): first-token measures and capture read prompts ending in "
                    "<|start|>assistant%s, where a direct answer starts; generation starts at <|start|>assistant and reasons "
                    "first (harmony_opening='none', CLI --harmony-opening none, reads <|start|>assistant everywhere)", adapter.name, adapter.answer_opening())
    else:
        logger.info("%s uses the harmony chat format (GPT-OSS) with harmony_opening='none': every prompt ends at "
                    "<|start|>assistant, where the model writes <|channel|> next, so first-token measures do not read the answer",
                    adapter.name)


def _load(spec, tokenizer, dtype: torch.dtype | str, device: str | torch.device) -> ModelAdapter:
    """`load_model` for everything but an adapter: the backend adapter for `spec`."""
    if not isinstance(spec, (str, os.PathLike)):
        return _from_object(spec, tokenizer)
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    text = str(spec)
    if text == "organism":
        from featsteer.organism import organism_path

        return _from_directory(organism_path(), dtype, device, name="organism")
    if text.startswith("tiny:"):
        return _tiny(text.removeprefix("tiny:"), dtype, device)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FeatsteerError(f"GGUF file not found: {path}")
        return _from_directory(_converted_gguf(path, dtype), dtype, device, name=path.name)
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
        from featsteer.models.hf import HFModelAdapter, check_not_bridged

        check_not_bridged(model)  # here, not in HFModelAdapter: the TL adapter reads a bridge's weights through one of those
        if tokenizer is None:
            tokenizer = _tokenizer_for(getattr(model, "name_or_path", ""))
        return HFModelAdapter(model, tokenizer)
    raise FeatsteerError(
        f"cannot load a model from a {kind}: pass 'organism', a path, a hub id, a transformers causal LM, "
        "or a TransformerLens HookedTransformer/TransformerBridge"
    )


def _tiny(family: str, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu") -> ModelAdapter:
    """A random tiny model built from a config (`tiny:llama`, `tiny:gpt2`, ...), for trying things offline."""
    from featsteer.models.hf import HFModelAdapter
    from featsteer.testing import FAMILY_NAMES, tiny_model

    if family not in FAMILY_NAMES:
        raise FeatsteerError(f"unknown tiny model 'tiny:{family}': use one of {', '.join('tiny:' + f for f in FAMILY_NAMES)}")
    model, tokenizer = tiny_model(family)
    model = model.to(device=device, dtype=None if dtype == "auto" else dtype)
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


def model_class(config):
    """The `transformers` auto class that builds a generating model for `config`: `AutoModelForCausalLM`, or
    `AutoModelForImageTextToText` for an image-text checkpoint (a config with a `vision_config`), whose text decoder
    featsteer hooks. `AutoModelForCausalLM` would build some of those (Qwen3.5, Llama 4) as their text decoder alone and
    others not at all (Mistral 3); loading the whole checkpoint keeps the vision tower in an exported edit."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    image_text = type(config) in AutoModelForImageTextToText._model_mapping
    if image_text and (getattr(config, "vision_config", None) is not None or type(config) not in AutoModelForCausalLM._model_mapping):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _from_directory(path: Path, dtype: torch.dtype | str, device: torch.device, name: str) -> ModelAdapter:
    from transformers import AutoConfig, AutoTokenizer

    from featsteer.models.hf import HFModelAdapter

    if not (path / "config.json").is_file():
        raise FeatsteerError(f"'{path}' has no config.json: it is not a Hugging Face model directory")
    with _unreadable(path, "its config.json"):
        config = AutoConfig.from_pretrained(path)
    _check_architecture(config)
    with _unreadable(path, "its tokenizer files (tokenizer.json or the like: save the tokenizer beside the weights)"):
        tokenizer = AutoTokenizer.from_pretrained(path)
    with _unreadable(path, "its weights (model.safetensors or the like: missing or cut off?)"):
        model = model_class(config).from_pretrained(path, dtype=dtype).to(device)
    return HFModelAdapter(model, tokenizer, name=name)


@contextlib.contextmanager
def _unreadable(path: Path, what: str) -> Iterator[None]:
    """Any failure of transformers while reading one part of a local model folder becomes one line naming the part."""
    try:
        yield
    except FeatsteerError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers raises many unrelated types for a broken folder
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise FeatsteerError(f"could not load the model in '{path}': {what} could not be read ({type(error).__name__}: {reason})") from None


def _check_hub_reachable(model_id: str) -> None:
    """One quick, retry-free request before transformers' own downloads, so a mistyped name or an unreachable hub
    fails in seconds instead of after a minute of retries. Skipped offline (HF_HUB_OFFLINE) and for cached models."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    try:
        if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            return
        HfApi().model_info(model_id, timeout=10.0)
    except (RepositoryNotFoundError, HFValidationError):
        raise FeatsteerError(
            f"could not load model '{model_id}': it is not a local directory or .gguf file, nor a model on the Hugging Face "
            "hub (or it is private: log in); check the name, or pass 'organism' for the embedded model"
        ) from None
    except Exception as error:  # noqa: BLE001 - network stack errors (httpx, OSError, timeouts) share no base class
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise FeatsteerError(
            f"could not load model '{model_id}': it is not a local directory or .gguf file, and the Hugging Face hub is "
            f"unreachable ({reason}); check the name and your network, or pass a local path"
        ) from None


def _from_hub(model_id: str, dtype: torch.dtype | str, device: torch.device) -> ModelAdapter:
    from transformers import AutoConfig, AutoTokenizer

    from featsteer.models.hf import HFModelAdapter

    _check_hub_reachable(model_id)
    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as error:  # noqa: BLE001
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise FeatsteerError(
            f"could not load model '{model_id}': it is not a local directory or .gguf file, and the Hugging Face "
            f"hub did not provide it ({reason}); check the name and your network, or pass a local path"
        ) from None
    _check_architecture(config)
    model = model_class(config).from_pretrained(model_id, dtype=dtype).to(device)
    return HFModelAdapter(model, AutoTokenizer.from_pretrained(model_id), name=model_id)


def _converted_gguf(path: Path, dtype: torch.dtype | str = torch.float32) -> Path:
    """Convert a GGUF file to a safetensors model directory once per dtype; later loads read the cache.

    The tensors are dequantized straight into `dtype` (float32 for `auto`), so a bfloat16 or float16 load never holds the
    model in float32, nor caches it so. A float32 conversion serves every dtype (loading casts it down, as a conversion
    into that dtype would), so it is reused rather than converting again.
    """
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    full = default_cache_dir() / "gguf" / f"{path.stem}-{key}"  # the float32 conversion
    dtype = torch.float32 if dtype == "auto" else dtype
    target = full if dtype == torch.float32 else full.with_name(f"{full.name}-{str(dtype).removeprefix('torch.')}")
    for cached in (target, full):
        if (cached / "config.json").is_file():
            return cached
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:  # the metadata alone, so an architecture featsteer does not support fails before anything is converted or cached
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # noqa: BLE001
        raise FeatsteerError(f"could not read GGUF file {path} ({type(error).__name__}: {str(error)[:160]})") from None
    _check_architecture(config)
    logger.info("converting %s to safetensors under %s (first load only)", path.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # noqa: BLE001
        raise FeatsteerError(f"could not read GGUF file {path} ({type(error).__name__}: {str(error)[:160]})") from None
    # transformers dequantizes GGUF tensors on load but still marks the model as quantized, which blocks
    # save_pretrained; the weights are plain tensors by now, so drop the marker before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target.parent)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".partial-{os.getpid()}@{socket.gethostname()}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError as error:
        # another process converting the same file renamed its complete conversion into place first: use that one
        if not (target / "config.json").is_file():
            raise FeatsteerError(f"could not write the conversion of {path.name} to {target} ({type(error).__name__}: {error.strerror or error}); "
                                 "check the space and permissions there, or set FEATSTEER_CACHE to another folder") from None
        logger.info("another process converted %s meanwhile; using its conversion", path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_stale_partials(folder: Path) -> None:
    """Remove the `.partial-*` staging folders that killed conversions left in `folder`: those whose process, recorded in
    the name as `.partial-PID@HOST-...`, is gone from this machine, and any other one unchanged for `STALE_PARTIAL_SECONDS`.
    A folder a live conversion is writing is kept: its process runs, or it changes."""
    host = socket.gethostname()
    for partial in folder.glob(".partial-*"):
        match = _PARTIAL_RE.match(partial.name)
        if match and match.group(2) == host and os.name != "nt":  # on Windows, os.kill(pid, 0) would end the process
            stale = not process_alive(int(match.group(1)))
        else:
            stale = time.time() - _last_change(partial) > STALE_PARTIAL_SECONDS
        if stale:
            logger.info("removing %s, left by a conversion that did not finish", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _last_change(folder: Path) -> float:
    """The latest modification time of `folder` and the files in it; now when one vanished while it was read (a writer at
    work, or the folder renamed into place)."""
    try:
        return max([folder.stat().st_mtime, *(entry.stat().st_mtime for entry in folder.rglob("*"))])
    except OSError:
        return time.time()
