"""Load sae_lens SAEs and check that they fit the model they will be attached to.

featsteer does not define an SAE class: an SAE is a `sae_lens.SAE`, stored in sae_lens' on-disk format
(`cfg.json` + `sae_weights.safetensors`) or published as a sae_lens release. This module is the one
entry point from "where the SAE lives" to a validated SAE object, so every later stage (encoding,
feature scoring, splicing) can assume the SAE's width matches the model and its `hook_name` is a hook
point the model has. sae_lens 6 keeps the hook name in `sae.cfg.metadata.hook_name`.

An SAE's input width `d_in` is the model's `d_model` at every hook point except `blocks.{l}.attn.hook_z`, where an
attention-output SAE reads the heads side by side: `d_in == n_heads * d_head` (see `featsteer.sae.heads`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from sae_lens import SAE, Transcoder

from featsteer.activations import hook_width
from featsteer.errors import FeatsteerError
from featsteer.models import ROUTING_KINDS, ModelAdapter
from featsteer.sae.heads import reshapes_heads

logger = logging.getLogger(__name__)

SAE_CONFIG_FILE = "cfg.json"
"""File that marks a directory as one sae_lens SAE (sae_lens' `SAE_CFG_FILENAME`)."""
SAE_WEIGHTS_FILE = "sae_weights.safetensors"
"""sae_lens' weight file name (`SAE_WEIGHTS_FILENAME`)."""
_TRAINING_NORMS = ("expected_average_only_in", "covariance_whitening")
"""sae_lens input normalisations that only its trainer applies (an inference SAE has them folded into its weights)."""


def sae_hook_name(sae: SAE) -> str | None:
    """The TransformerLens hook name an SAE reads and writes (`sae.cfg.metadata.hook_name`), if recorded."""
    return sae.cfg.metadata.hook_name


def validate_sae(sae: SAE, model: ModelAdapter, hook: str | None = None) -> str:
    """Check that an SAE fits a model and return the hook point it attaches to.

    Args:
        sae: a sae_lens SAE.
        model: the model it will read from.
        hook: attach here instead of the SAE's recorded `hook_name`.

    Returns:
        The validated hook name.

    Raises:
        FeatsteerError: if no hook is known, a weight is NaN or infinite, the hook does not exist on the model, the SAE's input width `d_in`
            differs from the hook's width (`d_model`; `n_heads * d_head` at `blocks.{l}.attn.hook_z`; `n_experts` at the routing
            hooks), an SAE
            that reshapes attention heads (`reshape_activations="hook_z"`) is attached anywhere but at hook_z, it is
            a transcoder (it writes elsewhere than it reads), or its input scaling was never folded into its weights
            (a sae_lens training checkpoint).
    """
    if isinstance(sae, Transcoder):
        raise FeatsteerError(f"this is a sae_lens {type(sae).__name__}: it reads {sae_hook_name(sae)} and writes "
                             f"{sae.cfg.metadata.get('hook_name_out') or 'elsewhere'}, but featsteer splices, scores and steers SAEs, "
                             "which write back where they read; transcoders are not supported")
    name = hook or sae_hook_name(sae)
    if not name:
        raise FeatsteerError("this SAE records no hook_name: pass hook=<hook name>, e.g. blocks.3.hook_resid_post")
    if sae.cfg.normalize_activations in _TRAINING_NORMS:
        raise FeatsteerError(
            f"the SAE at {name} was trained on rescaled inputs (normalize_activations='{sae.cfg.normalize_activations}') that "
            "sae_lens does not apply outside training, so it would read the raw activations: a training checkpoint? Use the "
            "SAE saved at the end of training, or fold the scaling in first (sae.fold_activation_norm_scaling_factor)"
        )
    check_finite_weights(sae, name)
    site = model.hook_site(name)
    d_in = int(sae.cfg.d_in)
    if site.kind == "attn_z":
        width = hook_width(model, name)
        if d_in != width:
            raise FeatsteerError(
                f"SAE width mismatch at {name}: the SAE reads d_in={d_in} but {model.name}'s attention heads side by side are "
                f"n_heads x d_head = {model.n_heads} x {width // model.n_heads} = {width} wide; use an SAE trained on this "
                "model's hook_z (featsteer-train-sae --hook attn_z)"
            )
    elif reshapes_heads(sae):
        raise FeatsteerError(f"the SAE reads attention heads side by side (reshape_activations='hook_z') but would attach at {name}: "
                             f"attach it at blocks.{site.layer if site.layer is not None else 'L'}.attn.hook_z")
    elif site.kind in ROUTING_KINDS and d_in != hook_width(model, name):
        raise FeatsteerError(f"SAE width mismatch at {name}: the SAE reads d_in={d_in} but {model.name}'s routing there is "
                             f"n_experts={model.n_experts} wide; use an SAE trained on this hook")
    elif site.kind not in ROUTING_KINDS and d_in != int(model.d_model):
        raise FeatsteerError(
            f"SAE width mismatch at {name}: the SAE reads d_in={d_in} but {model.name} has "
            f"d_model={model.d_model}; use an SAE trained on this model (featsteer-train-sae)"
        )
    trained_on = sae.cfg.metadata.model_name
    if trained_on and trained_on != model.name:
        logger.info("SAE at %s was trained on '%s'; attaching it to '%s'", name, trained_on, model.name)
    return name


def check_finite_weights(sae: SAE, where: str | None = None) -> None:
    """Raise if any weight of `sae` is NaN or infinite (it would encode every row to NaN features without an error).

    Raises:
        FeatsteerError: naming the first non-finite parameter and how many of its entries are bad.
    """
    for name, weight in sae.named_parameters():
        if weight.device.type == "meta":
            continue
        bad = int((~torch.isfinite(weight.detach())).sum())
        if bad:
            raise FeatsteerError(f"the SAE at {where or sae_hook_name(sae) or '(no hook)'} has {bad} NaN/inf entries in {name}: "
                                 "its features would be NaN; retrain it, or load a checkpoint saved before training diverged")


def load_sae(
    source: str | os.PathLike[str] | SAE,
    model: ModelAdapter | None = None,
    hook: str | None = None,
    *,
    device: str | None = None,
) -> SAE:
    """Load one sae_lens SAE from a directory or a sae_lens release, optionally validated against a model.

    Args:
        source: a directory in sae_lens format (holding `cfg.json`), a `release:sae_id` string naming a
            sae_lens pretrained release (e.g.
            `gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical`; needs network or the hub
            cache), or an already-loaded SAE.
        model: if given, the SAE is checked against it (width and hook) and, without `device`, moved to its device.
        hook: attach at this hook instead of the recorded one; it is stored in `cfg.metadata.hook_name`.
        device: torch device for the weights, also for an already-loaded SAE (default: the model's device; without
            a model, cpu for a loaded source and where it is for an SAE object).

    Returns:
        The SAE in eval mode.

    Raises:
        FeatsteerError: unknown source, unreadable directory, release unavailable (offline or unknown
            id), NaN or infinite weights, or an SAE that does not fit `model`.
    """
    target = device or (str(model.device) if model is not None else "cpu")
    _check_device(target)
    sae = source if isinstance(source, SAE) else _load_source(source, target)
    if model is not None:
        validate_sae(sae, model, hook)  # before the hook is written, so a bad hook leaves the SAE as it was
    else:
        check_finite_weights(sae, hook)
    if hook:
        sae.cfg.metadata.hook_name = hook
    if device is not None or model is not None:
        sae = sae.to(target)
    return sae.eval()


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise FeatsteerError(f"unknown device '{device}': pass cpu, cuda, cuda:N or mps") from None
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not torch.backends.mps.is_available()):
        raise FeatsteerError(f"device '{device}' is not available on this machine: pass device='cpu'")


def _load_source(source: str | os.PathLike[str], device: str) -> SAE:
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_directory(path, device)
    if path.exists():
        raise FeatsteerError(f"SAE source {text} is a file: pass the directory holding {SAE_CONFIG_FILE} and {SAE_WEIGHTS_FILE}")
    release, colon, sae_id = text.partition(":")
    if colon and release and sae_id and not text.startswith((".", "/", "~")):
        return _load_release(release, sae_id, device)
    raise FeatsteerError(
        f"SAE source '{text}' not found: pass a directory in sae_lens format (with {SAE_CONFIG_FILE}) or "
        "a sae_lens release as release:sae_id"
    )


_RAW_RELEASE_FILES = ("params.npz", "hyperparams.json")
"""Files of SAEs published outside sae_lens' format (Gemma Scope's `params.npz`, Llama Scope's `hyperparams.json`), which
sae_lens converts only when it loads them by release id."""


def _raw_release_hint(path: Path) -> str:
    """A hint for a folder downloaded from a published release in its original format, else ''."""
    found = [name for name in _RAW_RELEASE_FILES if (path / name).is_file()]
    if not found:
        return ""
    return (f" ({found[0]}: a release in its original format, e.g. Gemma Scope or Llama Scope, which sae_lens converts only "
            "when it loads it by release: pass release:sae_id, e.g. gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical, "
            "read from the hub cache when offline)")


def _load_directory(path: Path, device: str) -> SAE:
    if not (path / SAE_CONFIG_FILE).is_file():
        nested = any((p / SAE_CONFIG_FILE).is_file() for p in path.iterdir() if p.is_dir())
        hint = " (it holds SAE folders: use load_saes)" if nested else _raw_release_hint(path)
        raise FeatsteerError(f"{path} is not an sae_lens SAE directory: {SAE_CONFIG_FILE} is missing{hint}")
    try:
        return SAE.load_from_disk(path, device=device)
    except Exception as error:  # noqa: BLE001 - a cut-off weights file raises safetensors' own error type, a bad cfg.json others
        reason = " ".join(str(error).split())  # one line: torch's state_dict errors span several
        raise FeatsteerError(f"could not load the SAE in {path} ({type(error).__name__}: {reason[:240]}); re-save it with sae_lens") from None


def _load_release(release: str, sae_id: str, device: str) -> SAE:
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except ValueError as error:  # unknown release or id: sae_lens lists the valid ones
        raise FeatsteerError(f"sae_lens release '{release}:{sae_id}' is unknown: {str(error).splitlines()[0][:200]}") from None
    except Exception as error:  # noqa: BLE001 - hub/network failures of any kind become one clear line
        from huggingface_hub import is_offline_mode

        reason = "HF_HUB_OFFLINE is set" if is_offline_mode() else "you are probably offline"
        raise FeatsteerError(
            f"could not download SAE {release}:{sae_id} from the Hugging Face hub ({type(error).__name__}; {reason}): "
            "connect, or download it once and pass its local directory"
        ) from None


def load_saes(directory: str | os.PathLike[str], model: ModelAdapter | None = None) -> dict[str, SAE]:
    """Load every SAE stored in the `<hook_name>/` subfolders of a directory (as `featsteer-train-sae` writes them).

    Args:
        directory: folder whose subfolders are sae_lens SAE directories, or `"organism"` for the SAEs
            shipped with the embedded organism.
        model: if given, every SAE is validated against it.

    Returns:
        `{hook_name: SAE}` in forward-pass order when a model is given, else sorted by hook name.

    Raises:
        FeatsteerError: if the directory is missing or holds no SAE, two SAEs at one hook, or an SAE that does not fit
            `model`.
    """
    if os.fspath(directory) == "organism":
        from featsteer.organism import organism_sae_path

        directory = organism_sae_path()
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise FeatsteerError(f"SAE directory {root} does not exist: train SAEs with featsteer-train-sae --out {root}")
    # hidden folders are unfinished (featsteer-train-sae builds each SAE in `.<hook>.partial-*` and renames it when done)
    folders = sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / SAE_CONFIG_FILE).is_file())
    if not folders:
        if (root / SAE_WEIGHTS_FILE).is_file() or any((p / SAE_WEIGHTS_FILE).is_file() for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            raise FeatsteerError(f"{root} holds SAE weights ({SAE_WEIGHTS_FILE}) but no {SAE_CONFIG_FILE} beside them: "
                                 "the SAE was saved incompletely; re-save it with sae_lens or retrain it")
        if hint := _raw_release_hint(root):
            raise FeatsteerError(f"{root} holds no sae_lens SAE ({SAE_CONFIG_FILE}){hint}")
        raise FeatsteerError(f"{root} holds no SAE folders (<hook_name>/{SAE_CONFIG_FILE}): train with featsteer-train-sae --out {root}")
    saes, homes = {}, {}
    for folder in folders:
        # the hook as sae_lens reads it: a pre-6 cfg.json records it at the top level (hook_point), not in its metadata
        sae = load_sae(folder, device=None if model is None else str(model.device))
        sae = load_sae(sae, model, hook=None if sae_hook_name(sae) else folder.name)
        hook = sae_hook_name(sae) or folder.name
        if hook in saes:
            raise FeatsteerError(f"{homes[hook]} and {folder} both hold an SAE at {hook}, and SAEs are keyed by their hook: "
                                 "pass one of the two folders, or put them in folders of their own")
        saes[hook], homes[hook] = sae, folder
    if model is not None:
        return dict(sorted(saes.items(), key=lambda item: model.hook_site(item[0]).order))
    return saes


def load_sae_source(source: str | os.PathLike[str] | SAE | Mapping[str, SAE], model: ModelAdapter) -> dict[str, SAE]:
    """Resolve anything a user may name as "the SAEs" into validated `{hook_name: SAE}`.

    The one entry point behind every `--sae` option (`rank-features`, `compare`, `probe`) and the Python
    functions that accept SAEs.

    Args:
        source: `organism` (the SAEs shipped with the organism), a folder of `<hook_name>/` SAE folders
            (as `featsteer-train-sae` writes), one sae_lens SAE folder, a sae_lens `release:sae_id`, one
            loaded SAE, or a `{hook_name: sae}` mapping.
        model: the model the SAEs must fit.

    Returns:
        `{hook_name: SAE}`, each validated against `model` (width and hook).

    Raises:
        FeatsteerError: a missing or unreadable source, an empty mapping, or an SAE that does not fit.
    """
    if isinstance(source, (SAE, Mapping)):
        return validated_sae_map(source, model)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if text == "organism" or (path.is_dir() and not (path / SAE_CONFIG_FILE).is_file()):
        return load_saes(text, model)
    sae = load_sae(text, model)
    return {validate_sae(sae, model): sae}




def sae_map_of(saes: SAE | Mapping[str, SAE] | Sequence[SAE]) -> dict[str, SAE]:
    """`{hook_name: sae}` from one SAE, several (each keyed by its recorded `hook_name`) or a mapping.

    A mapping's key must agree with the hook the SAE records, when it records one: steering and splicing attach an
    SAE where it says it reads, so an SAE keyed elsewhere would be scored at one hook and steered at another.

    Raises:
        FeatsteerError: no SAEs, an SAE in a list that records no hook, or a key that disagrees with the record.
    """
    if isinstance(saes, SAE):
        saes = [saes]
    if isinstance(saes, Mapping):
        out = dict(saes)
        for key, sae in out.items():
            recorded = sae_hook_name(sae)
            if recorded and recorded != key:
                raise FeatsteerError(
                    f"the SAE keyed {key} records hook_name {recorded}: key it by {recorded}, or move it with "
                    f"load_sae(sae, model, hook={key!r}) if it really reads {key}"
                )
    else:
        out = {}
        for sae in saes:
            name = sae_hook_name(sae)
            if name is None:
                raise FeatsteerError("an SAE records no hook_name: pass a {hook_name: sae} mapping instead")
            if name in out:
                raise FeatsteerError(f"two SAEs record hook_name {name}: pass one SAE per hook")
            out[name] = sae
    if not out:
        raise FeatsteerError("no SAEs given: pass at least one sae_lens SAE or {hook_name: sae}")
    return out


def validated_sae_map(saes: SAE | Mapping[str, SAE] | Sequence[SAE], model: ModelAdapter) -> dict[str, SAE]:
    """`sae_map_of`, each SAE validated against `model` (width, hook) and moved to its device.

    An SAE keyed in a mapping but recording no hook gets the key written into `cfg.metadata.hook_name`, so every
    later consumer attaches it where it was keyed.
    """
    out = {}
    for hook, sae in sae_map_of(saes).items():
        validate_sae(sae, model, hook)
        if not sae_hook_name(sae):
            sae.cfg.metadata.hook_name = hook
        out[hook] = sae.to(model.device)
    return out
