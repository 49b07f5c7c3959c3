"""Train one sae_lens SAE per layer on featsteer-captured activations, evaluate it, and save it.

The pipeline is: load the model and text, hold out evaluation texts, capture training tokens for every
layer still to do in one pass (streamed to a temporary folder), then per layer build a sae_lens training
SAE, fit it with sae_lens' `SAETrainer` (offline, no wandb), save it in sae_lens format to a hidden
`<out>/.<hook_name>.partial-*` folder, reload it with `featsteer.sae.load_sae`, write `metrics.json` last, and rename
the folder to `<out>/<hook_name>/`. So `<out>/<hook_name>/` exists only finished, and a layer that has it is never
retrained. The hidden folder records its writer (`featsteer.files.output_staging`): a later run removes one that a run
killed outright left, once that process is provably gone.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import SAE, LoggingConfig, SAETrainer, TrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training import activation_scaler as activation_scaler_module
from sae_lens.training import sae_trainer as sae_trainer_module
from safetensors.torch import save_file

from featsteer.activations import ActivationSet, Positions, capture, hook_width
from featsteer.errors import FeatsteerError
from featsteer.files import STAGING_MARKER, json_text, output_staging, remove_stale_named_staging
from featsteer.models import ModelAdapter, load_model
from featsteer.sae import load_sae, reconstruction_stats, splice_loss
from sae_training.architectures import build_training_sae
from sae_training.config import TrainConfig
from sae_training.data import (
    ActivationBatches,
    CapturedTokens,
    cached_captures,
    capture_tokens,
    iter_rows,
    load_texts,
    norm_limit,
    shared_prefix_length,
    split_texts,
    within_norm,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
"""Written last into each `<out>/<hook_name>/`: its presence marks a finished layer."""
CONFIG_FILE = "training_config.json"
"""The `TrainConfig` of the run, next to each SAE."""
DEAD_FEATURE_TOKENS = 100_000
"""Training tokens a feature must stay silent on to count as dead in `metrics.json`."""
DEAD_FRACTION_ROWS = "training_tokens"
"""`metrics.json`'s `dead_fraction_measured_on`: the dead fraction is measured on the first `dead_fraction_tokens` captured
training rows within the norm bound, the rows training batches are drawn from (the capture stops at the budget)."""
DEAD_WARNING = 0.2
"""Dead-feature fraction above which training ends with a warning that the SAE is likely undertrained."""


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (sae_lens initialises weights from torch's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_hooks(model: ModelAdapter, config: TrainConfig) -> list[str]:
    """Hook names to train, validated against the model.

    Raises:
        FeatsteerError: if a requested layer does not exist.
    """
    layers = range(model.n_layers) if config.data.layers is None else config.data.layers
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad:
        raise FeatsteerError(f"layer {bad[0]} does not exist: {model.name} has layers 0..{model.n_layers - 1} (or use --layers all)")
    return model.hook_names((config.data.hook_kind,), sorted(set(layers)))


@dataclass(frozen=True)
class TrainingRun:
    """What every layer of one run shares: the model, the captured tokens and the held-out set."""

    model: ModelAdapter
    """The model being read."""
    config: TrainConfig
    """The run's configuration."""
    captures: dict[str, CapturedTokens]
    """Per hook: the training activations on disk that hold its rows (one capture for every hook, unless some were
    found in the activation cache)."""
    held_out: ActivationSet
    """All-token activations of the held-out texts, for explained variance and L0."""
    held_out_texts: list[str]
    """Texts never trained on."""
    responses: tuple[list[str], list[str]] | None
    """`(prompts, responses)`: the clean model's greedy responses to held-out prompts, scored for CE
    (None for raw text, where every token is scored)."""
    train_tokens: int
    """Training tokens per SAE."""
    progress: bool
    """Show progress bars."""
    first_position: int
    """Index of the first token captured in every text (past the shared prefix)."""
    max_norms: dict[str, float | None]
    """Per hook: tokens above this activation norm are left out of training and evaluation."""


def train_saes(config: TrainConfig, *, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train (or skip, when finished) an SAE for every requested layer.

    Args:
        config: the run.
        progress: show progress bars.

    Returns:
        `{hook_name: metrics}` for every requested layer, finished earlier or now, in layer order.

    Raises:
        FeatsteerError: bad layers, unreadable or empty text, or an SAE that does not fit the model.
    """
    model = load_model(config.data.model, dtype=config.data.dtype, device=config.data.device)
    model.show_progress = progress
    hooks = resolve_hooks(model, config)
    out = Path(config.out)
    if out.is_dir():  # the disk a run killed outright held with a half-saved SAE, of any hook, requested now or not
        remove_stale_named_staging(out)
    done = {hook: json.loads((out / hook / METRICS_FILE).read_text()) for hook in hooks if (out / hook / METRICS_FILE).is_file()}
    for hook in done:
        logger.info("%s is already trained (%s exists): skipping", hook, out / hook / METRICS_FILE)
        _warn_if_settings_differ(out / hook / CONFIG_FILE, config)
    todo = [hook for hook in hooks if hook not in done]
    if not todo:
        return done
    for hook in todo:  # a width too narrow for --k fails now, not after the capture
        config.sae.check_width(config.sae.width(hook_width(model, hook)))
    train_texts, held_out_texts = split_texts(load_texts(config.data.texts), config.data.eval_prompts, config.optim.seed)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _capture_and_train(model, config, hooks, todo, done, train_texts, held_out_texts, progress)
    except BaseException:
        if created and not any(out.iterdir()):  # a run that failed before any layer finished leaves no empty --out behind
            out.rmdir()
        raise


def _capture_and_train(model: ModelAdapter, config: TrainConfig, hooks: list[str], todo: list[str], done: dict[str, dict[str, Any]],
                       train_texts: list[str], held_out_texts: list[str], progress: bool) -> dict[str, dict[str, Any]]:
    """Capture the training and held-out activations of the hooks in `todo` and train an SAE on each."""
    start = shared_prefix_length(model, chat=config.data.chat) if config.data.skip_shared_prefix else 0
    positions = Positions.all_tokens(start)
    with tempfile.TemporaryDirectory(prefix="featsteer-sae-", dir=config.data.work_dir) as scratch:
        options = {"tokens": config.data.tokens, "chat": config.data.chat, "batch_size": config.data.capture_batch,
                   "chunk_bytes": config.data.chunk_megabytes << 20, "start": start, "progress": progress}
        if config.data.activation_cache:
            captures = cached_captures(model, train_texts, todo, Path(config.data.activation_cache).expanduser(), **options)
        else:
            captures = dict.fromkeys(todo, capture_tokens(model, train_texts, todo, Path(scratch), **options))
        train_tokens = _training_tokens(config, captures[todo[0]])  # every capture holds the same texts' rows
        held_out = capture(model, held_out_texts, todo, positions=positions, chat=config.data.chat, batch_size=config.data.capture_batch, progress=False)
        responses = _reference_responses(model, held_out_texts) if config.data.chat else None
        max_norms = {hook: norm_limit(captures[hook].chunks, hook, config.data.max_norm_ratio) for hook in todo}
        run = TrainingRun(model, config, captures, held_out, held_out_texts, responses, train_tokens, progress, start, max_norms)
        for hook in todo:
            done[hook] = train_layer(run, hook)
    return {hook: done[hook] for hook in hooks}


def _warn_if_settings_differ(saved_config: Path, config: TrainConfig) -> None:
    """A finished layer is kept even when asked for different settings; say so."""
    if not saved_config.is_file():
        return
    saved = json.loads(saved_config.read_text())
    wanted = config.to_dict()
    differing = [section for section in ("sae", "optim") if saved.get(section) != wanted[section]]
    saved_data = saved.get("data", {})
    # what the SAE is trained on; where and how fast it was captured (device, scratch folders, batch sizes) does not count
    differing += [key for key in ("model", "texts", "dtype", "hook_kind", "tokens", "cycle", "chat", "eval_prompts", "skip_shared_prefix",
                                  "max_norm_ratio") if _listed(saved_data.get(key)) != _listed(wanted["data"].get(key))]
    if differing:
        logger.warning("%s was trained with other %s settings and is kept: delete it to retrain", saved_config.parent, "/".join(differing))


def _listed(value: Any) -> Any:
    """JSON keeps tuples as lists; compare them as lists."""
    return list(value) if isinstance(value, tuple) else value


def _reference_responses(model: ModelAdapter, prompts: list[str], max_new_tokens: int = 32) -> tuple[list[str], list[str]] | None:
    """The clean model's greedy responses (non-empty ones only), or None when it answers nothing."""
    responses = model.generate(prompts, max_new_tokens=max_new_tokens)
    kept = [(prompt, response) for prompt, response in zip(prompts, responses, strict=True) if response.strip()]
    if not kept:
        logger.warning("the model gave only empty responses to the held-out prompts: CE is scored on the prompt tokens")
        return None
    return [prompt for prompt, _ in kept], [response for _, response in kept]


def _training_tokens(config: TrainConfig, captured: CapturedTokens) -> int:
    requested = config.data.tokens
    if not captured.exhausted:
        return requested
    if config.data.cycle:
        logger.warning("the text gives %d tokens (%d texts) but --tokens is %d: cycling over it about %.1f times",
                       captured.n_tokens, captured.n_texts, requested, requested / max(captured.n_tokens, 1))
        return requested
    logger.warning("the text is exhausted after %d tokens (%d texts): training on %d tokens instead of %d",
                   captured.n_tokens, captured.n_texts, captured.n_tokens, requested)
    return captured.n_tokens


def _trainer_config(config: TrainConfig, train_tokens: int, d_sae: int, device: str) -> SAETrainerConfig:
    optim = config.optim
    batch = min(optim.batch_tokens, train_tokens)
    steps = max(train_tokens // batch, 1)
    window = optim.dead_feature_window or min(1000, max(50, steps // 10))
    lr = optim.learning_rate(d_sae)
    return SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr / 10,
        lr_warm_up_steps=int(steps * optim.warmup_fraction), lr_decay_steps=int(steps * optim.decay_fraction),
        device=device, dead_feature_window=window, feature_sampling_window=max(steps, 1),
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=min(100, steps),
    )


def _build_sae(run: TrainingRun, hook: str, n_steps: int) -> TrainingSAE:
    """A fresh training SAE for `hook`; at hook_z it reads the heads side by side and is saved as sae_lens' hook_z SAEs are."""
    arch = run.config.sae
    metadata = SAEMetadata(hook_name=hook, model_name=run.model.name, featsteer_hook_kind=run.config.data.hook_kind,
                           featsteer_chat=run.config.data.chat, featsteer_first_position=run.first_position,
                           featsteer_max_norm=run.max_norms[hook])
    d_in = hook_width(run.model, hook)
    reshape = "hook_z" if run.model.hook_site(hook).kind == "attn_z" else "none"
    return build_training_sae(arch.architecture, d_in, arch.width(d_in), metadata, k=arch.k,
                              sparsity_coefficient=arch.sparsity_coefficient, normalize_activations=arch.normalize_activations,
                              n_steps=n_steps, reshape_activations=reshape)


def train_layer(run: TrainingRun, hook: str) -> dict[str, Any]:
    """Train, save, reload and evaluate the SAE of one hook; returns its metrics (also written to disk)."""
    config = run.config
    seed_everything(config.optim.seed + run.model.hook_site(hook).order[0])
    d_in = hook_width(run.model, hook)
    trainer_config = _trainer_config(config, run.train_tokens, config.sae.width(d_in), str(run.model.device))
    sae = _build_sae(run, hook, trainer_config.total_training_steps)
    batches = ActivationBatches(run.captures[hook].chunks, hook, trainer_config.train_batch_size_samples, seed=config.optim.seed,
                                d_model=d_in, max_norm=run.max_norms[hook])
    logger.info("training %s SAE (d_sae=%d) at %s on %d tokens", config.sae.architecture, sae.cfg.d_sae, hook, trainer_config.total_training_samples)
    trainer = SAETrainer(cfg=trainer_config, sae=sae, data_provider=batches)
    start = time.perf_counter()
    with _sae_lens_progress(run.progress):
        trained = trainer.fit()
    seconds = time.perf_counter() - start
    final = Path(config.out) / hook
    # built in a hidden sibling and renamed into place when metrics.json is written: an interrupted run never leaves a
    # loadable but unfinished <out>/<hook>/ (load_saes skips hidden folders); the sibling records this process, so the next
    # run removes one a run killed outright left, once that process is provably gone
    folder = output_staging(final, beside=True)
    try:
        metrics = _save_and_evaluate(run, trained, trainer, trainer_config, folder, hook, seconds)
        if final.exists():  # an unfinished folder from an older, interrupted run
            shutil.rmtree(final)
        (folder / STAGING_MARKER).unlink()
        folder.rename(final)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if metrics["dead_fraction"] > DEAD_WARNING:
        logger.warning("%s: %.0f%% of the SAE's features are dead after %d optimiser steps of %d tokens; it is likely undertrained "
                       "(on Qwen2.5-0.5B, 292 steps left 48%% dead and 1,953 steps 1%%): raise --tokens or lower --batch-tokens",
                       hook, 100 * metrics["dead_fraction"], trainer_config.total_training_steps, trainer_config.train_batch_size_samples)
    return metrics


def _save_and_evaluate(run: TrainingRun, trained: TrainingSAE, trainer: SAETrainer, trainer_config: Any, folder: Path, hook: str,
                       seconds: float) -> dict[str, Any]:
    """Save the SAE into `folder`, score it held out, and write `metrics.json` there (last)."""
    config, captured = run.config, run.captures[hook]
    _save(trained, trainer, folder, config)
    inference_sae = load_sae(folder, run.model)
    metrics = evaluate_layer(run, inference_sae, hook)
    metrics.update({
        "architecture": config.sae.architecture, "k": getattr(trained.cfg, "k", None), "train_tokens": trainer.n_training_samples,
        "unique_tokens": captured.n_tokens, "text_exhausted": captured.exhausted,
        "epochs": trainer.n_training_samples / max(captured.n_tokens, 1), "train_seconds": seconds,
        "tokens_per_second": trainer.n_training_samples / max(seconds, 1e-9), "capture_seconds": captured.seconds,
        **capture_chunking(captured),
        "seed": config.optim.seed, "lr": trainer_config.lr, "batch_tokens": trainer_config.train_batch_size_samples,
    })
    # json_text: an undefined figure (explained variance of rows without variance, CE recovered when zeroing the hook costs
    # nothing) is null, not the bare NaN json.dumps writes, which is not JSON (jq and JavaScript's JSON.parse refuse it)
    (folder / METRICS_FILE).write_text(json_text(metrics))
    return metrics


def capture_chunking(captured: CapturedTokens) -> dict[str, Any]:
    """What set the training order besides the seed: the chunks of the capture trained on (shuffled as units), which a
    capture reused from the activation cache cut with its own chunk size and budget, not the reusing run's. None for a
    cached capture made before they were recorded."""
    chunk_bytes = captured.chunk_bytes
    megabytes = None if chunk_bytes is None else (chunk_bytes >> 20 if chunk_bytes % (1 << 20) == 0 else chunk_bytes / (1 << 20))
    return {"capture_chunk_megabytes": megabytes, "capture_chunks": len(captured.chunks), "capture_token_budget": captured.budget}


@contextlib.contextmanager
def _sae_lens_progress(enabled: bool) -> Iterator[None]:
    """Silence sae_lens' own progress bars when `enabled` is False (it offers no switch; restored on exit)."""
    modules = (sae_trainer_module, activation_scaler_module)
    originals = [module.tqdm for module in modules]
    try:
        if not enabled:
            for module, original in zip(modules, originals, strict=True):
                module.tqdm = functools.partial(original, disable=True)
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.tqdm = original


def _save(sae: TrainingSAE, trainer: SAETrainer, folder: Path, config: TrainConfig) -> None:
    """Write the inference SAE in sae_lens format, its feature sparsity, and our run config."""
    (folder / METRICS_FILE).unlink(missing_ok=True)
    sae.save_inference_model(folder)
    save_file({"sparsity": trainer.log_feature_sparsity}, str(folder / "sparsity.safetensors"))
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))


def evaluate_layer(run: TrainingRun, sae: SAE, hook: str) -> dict[str, Any]:
    """Held-out explained variance and L0, dead features on the captured training tokens (at most `DEAD_FEATURE_TOKENS`),
    and CE loss recovered."""
    max_norm = run.max_norms[hook]
    held_out_rows = run.held_out.hook(hook)
    kept = within_norm(held_out_rows, max_norm)
    held_out = reconstruction_stats(sae, kept.split(4096))
    on_training = reconstruction_stats(sae, iter_rows(run.captures[hook].chunks, hook, max_norm=max_norm), max_tokens=DEAD_FEATURE_TOKENS)
    if run.responses is None:
        loss = splice_loss(run.model, sae, run.held_out_texts, chat=run.config.data.chat)
    else:
        loss = splice_loss(run.model, sae, run.responses[0], responses=run.responses[1])
    return {
        "hook_name": hook, "d_model": run.model.d_model, "d_in": int(sae.cfg.d_in), "d_sae": int(sae.cfg.d_sae),
        "explained_variance": held_out.explained_variance, "l0": held_out.l0, "mse": held_out.mse,
        "eval_tokens": held_out.n_tokens, "eval_texts": len(run.held_out_texts),
        "train_explained_variance": on_training.explained_variance, "dead_fraction": on_training.dead_fraction,
        "dead_fraction_tokens": on_training.n_tokens, "dead_fraction_measured_on": DEAD_FRACTION_ROWS, "first_position": run.first_position, "max_norm": max_norm,
        "excluded_fraction": 1 - kept.shape[0] / max(held_out_rows.shape[0], 1), **loss.to_dict(),
    }
