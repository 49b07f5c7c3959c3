"""`ActivationSet`, the one type every later stage takes, and its on-disk form.

An activation set is a `(row, hook, d_model)` tensor plus, per row, the prompt it came from and its token
position, so one type serves last-token capture (one row per prompt), template-tail capture (a few rows
per prompt) and all-token capture for SAE training. On disk it is safetensors shards plus a JSON metadata
file written last, so a half-written directory is never mistaken for a complete one; sets larger than RAM
are streamed shard by shard and read back in batches with `ActivationReader`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from featsteer.activations.stats import RunningMoments
from featsteer.errors import FeatsteerError
from featsteer.files import clear_stale_staging, hidden_entries_note, output_staging, place_output

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
NOTHING_CAPTURED = "nothing was captured (0 rows): the position selector kept no token of any prompt (all:N past every prompt's length?)"


@dataclass(frozen=True)
class ActivationSet:
    """Activations of some prompts at some hook points and positions (see module docstring)."""

    activations: Tensor
    """`(row, hook, d_model)`; for a set captured at `blocks.{l}.attn.hook_z` the last axis is the heads side by side,
    `n_heads * d_head` wide (see `featsteer.activations.capture`)."""
    hook_names: tuple[str, ...]
    """Hook point of each slot along dimension 1."""
    prompt_index: Tensor
    """`(row,)` index into `prompts`."""
    position: Tensor
    """`(row,)` position label: offset from the prompt's end (-1 = last token), or the absolute token
    index for all-token capture."""
    prompts: tuple[str, ...]
    """The instructions, in input order."""
    positions: str = "last"
    """The position selector used (`last`, `mean_last:K`, `post_instruction`, `instruction_end`, `all`)."""
    model: str = ""
    """Name of the model the activations came from."""
    label: str | None = None
    """Optional tag such as `harmful` or `harmless`."""
    chat: bool = True
    """Whether the prompts were formatted with the chat template (False: raw text)."""
    system: str | None = None
    """The system prompt the chat template was given, if any."""
    stats: dict[str, RunningMoments] = field(default_factory=dict, compare=False, repr=False)
    """float64 running moments per hook (and per position for multi-row selectors)."""
    provenance: dict = field(default_factory=dict, compare=False, repr=False)
    """What else the rows depend on, as `capture` records it: `prompts_sha256` (`featsteer.datasets.prompt_set_hash` of
    `prompts`), `prompt_source` (a `PromptSet`'s source, else None), `model_family`, `model_dtype`, `tokenizer`, `template`
    (the prompt layout: the chat template with its system prompt rendered around the text `{instruction}`; None for raw
    text), `fallback_template` (True when the tokenizer had no chat template and featsteer's plain-text one was used),
    `stored_dtype` and `versions` (featsteer, torch, transformers). Empty for a set built by hand."""
    token_id: Tensor | None = field(default=None, compare=False, repr=False)
    """`(row,)` the id of the token each row was read at (for `mean_last`, the window's last token), from the one
    tokenization `capture` ran on; None where not known (a set read from disk or built by hand): it is not saved."""

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def d_model(self) -> int:
        """Row width: the residual width `d_model`, or `n_heads * d_head` for a set captured at hook_z."""
        return int(self.activations.shape[-1])

    def _slot(self, hook: str) -> int:
        try:
            return self.hook_names.index(hook)
        except ValueError:
            raise FeatsteerError(f"hook '{hook}' was not captured; this set has {', '.join(self.hook_names)}") from None

    def hook(self, hook: str) -> Tensor:
        """All rows at one hook: `(row, d_model)`."""
        return self.activations[:, self._slot(hook), :]

    def at_position(self, hook: str, position: int = -1) -> Tensor:
        """One vector per prompt at a position label: `(prompt, d_model)` in prompt order."""
        rows = (self.position == position).nonzero().squeeze(1)
        if rows.numel() == 0:
            raise FeatsteerError(f"position {position} was not captured; available: {sorted(set(self.position.tolist()))}")
        order = self.prompt_index[rows].argsort()
        return self.activations[rows[order], self._slot(hook), :]

    def per_prompt(self, hook: str) -> Tensor:
        """`(prompt, n_positions, d_model)` for selectors that keep the same positions for every prompt.

        Raises:
            FeatsteerError: when some prompts lack a position label others have (`all`, or `instruction_end` on prompts
                whose tails tokenize differently).
        """
        labels, counts = self.position.unique(return_counts=True)
        n_prompts = int(self.prompt_index.unique().numel())
        if bool((counts != n_prompts).any()):
            short = int(labels[(counts != n_prompts).nonzero()[0, 0]])
            held = int(counts[labels == short][0])
            raise FeatsteerError(f"per_prompt needs the same positions for every prompt, but position {short} is held by {held} of "
                                 f"{n_prompts} prompts (this set was captured with positions={self.positions}): read it with "
                                 "at_position(hook, position) or hook(hook)")
        return torch.stack([self.at_position(hook, int(p)) for p in labels], 1)

    def mean(self, hook: str, position: int | None = -1) -> Tensor:
        """float64 mean vector at one hook (and position label; None = over all rows)."""
        vectors = self.hook(hook) if position is None else self.at_position(hook, position)
        return vectors.double().mean(0)

    @property
    def position_labels(self) -> list[int]:
        """Distinct position labels present."""
        return sorted(set(self.position.tolist()))

    def save(self, path: str | Path) -> Path:
        """Write to a directory (one shard); the directory appears only once complete."""
        writer = ShardWriter(path, self.hook_names, self.d_model, self._metadata())
        writer.add(self.activations, self.prompt_index, self.position)
        return writer.close(self.prompts, self.stats)

    def _metadata(self) -> dict:
        return {"positions": self.positions, "model": self.model, "label": self.label, "chat": self.chat, "system": self.system,
                "provenance": self.provenance}

    @classmethod
    def load(cls, path: str | Path) -> ActivationSet:
        """Read a directory written by `save` or by streaming capture."""
        return ActivationReader(path).load()


class ShardWriter:
    """Write activation rows to safetensors shards in a staging directory, renamed into place on close."""

    def __init__(self, path: str | Path, hook_names: Sequence[str], d_model: int, metadata: dict, shard_rows: int = 65536):
        self.path = Path(path)
        if (self.path / METADATA_FILE).exists():
            raise FeatsteerError(f"activation directory {self.path} already exists: choose another path or delete it")
        _check_free(self.path)
        if shard_rows < 1:
            raise FeatsteerError(f"shard_rows must be at least 1, got {shard_rows}")
        self.staging = output_staging(self.path)
        self.hook_names, self.d_model, self.metadata, self.shard_rows = tuple(hook_names), d_model, metadata, shard_rows
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self._pending_rows = 0
        self.shards: list[dict] = []

    def add(self, activations: Tensor, prompt_index: Tensor, position: Tensor) -> None:
        """Queue rows; every full shard of `shard_rows` rows is written to disk."""
        self._pending.append((activations.contiguous(), prompt_index.long(), position.long()))
        self._pending_rows += activations.shape[0]
        if self._pending_rows >= self.shard_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        acts, index, pos = (torch.cat(parts) for parts in zip(*self._pending, strict=True))
        self._pending, self._pending_rows = [], 0
        start = 0
        while acts.shape[0] - start >= self.shard_rows or (final and start < acts.shape[0]):
            stop = min(start + self.shard_rows, acts.shape[0])
            name = f"shard-{len(self.shards):05d}.safetensors"
            shard = {"activations": acts[start:stop].clone(), "prompt_index": index[start:stop].clone(), "position": pos[start:stop].clone()}
            save_file(shard, str(self.staging / name))
            self.shards.append({"file": name, "rows": stop - start})
            start = stop
        if start < acts.shape[0]:
            self._pending, self._pending_rows = [(acts[start:], index[start:], pos[start:])], acts.shape[0] - start

    def close(self, prompts: Sequence[str], stats: dict[str, RunningMoments] | None = None) -> Path:
        """Flush, write metadata last, and move the directory into place (the staging folder is removed on an error)."""
        try:
            return self._close(prompts, stats)
        except BaseException:
            self.abort()
            raise

    def _close(self, prompts: Sequence[str], stats: dict[str, RunningMoments] | None) -> Path:
        self._flush(final=True)
        if not self.shards:
            raise FeatsteerError(NOTHING_CAPTURED)
        if stats:  # key/mean, and key/scatter when the capture tracked covariance
            tensors = {f"{key}/{part}": value for key, moments in stats.items() for part, value in moments.state().items()}
            save_file(tensors, str(self.staging / "stats.safetensors"))
        meta = {
            **self.metadata,
            "format_version": FORMAT_VERSION,
            "hook_names": list(self.hook_names),
            "d_model": self.d_model,
            "n_rows": sum(s["rows"] for s in self.shards),
            "shards": self.shards,
            "prompts": list(prompts),
            "stats_counts": {key: m.count for key, m in (stats or {}).items()},
        }
        (self.staging / METADATA_FILE).write_text(json.dumps(meta, indent=1))
        _check_free(self.path, self.staging)  # it may have been filled while the rows were captured
        place_output(self.staging, self.path, last=(METADATA_FILE,))  # an existing empty folder stays; metadata.json arrives last
        return self.path

    def abort(self) -> None:
        """Remove the staging directory (after an error)."""
        shutil.rmtree(self.staging, ignore_errors=True)


def _check_free(path: Path, staging: Path | None = None) -> None:
    """An activation directory is written into a new or empty folder only: never over a file or someone's files
    (`staging`, the writer's own staging folder inside `path`, does not count). Before the writer makes its staging
    folder, staging folders that killed runs left in `path`, when they are all it holds, are removed."""
    if path.exists() and not path.is_dir():
        raise FeatsteerError(f"{path} is an existing file: give a new folder path for the activations")
    if path.is_dir() and staging is None:
        clear_stale_staging(path)
    if path.is_dir() and any(staging is None or entry.name != staging.name for entry in path.iterdir()):
        note = hidden_entries_note(path) if staging is None else None
        raise FeatsteerError(f"{path} is a folder that is not empty: {note or 'give a new or empty folder for the activations'}")


class ActivationReader:
    """Read an activation directory lazily, shard by shard."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / METADATA_FILE
        if not meta_file.is_file():
            raise FeatsteerError(f"{self.path} is not a complete activation directory (no {METADATA_FILE})")
        self.metadata = json.loads(meta_file.read_text())
        version = self.metadata.get("format_version")
        if version != FORMAT_VERSION:  # written by every featsteer since the first; another layout would be misread
            raise FeatsteerError(f"{meta_file} says format_version {version!r}, but this featsteer reads activation format {FORMAT_VERSION}: "
                                 "read it with the featsteer version that wrote it, or capture the activations again")
        self.hook_names: tuple[str, ...] = tuple(self.metadata["hook_names"])
        self.d_model: int = int(self.metadata["d_model"])

    def __len__(self) -> int:
        return int(self.metadata["n_rows"])

    def _shards(self) -> Iterator[dict[str, Tensor]]:
        for shard in self.metadata["shards"]:
            yield load_file(str(self.path / shard["file"]))

    def iter_batches(self, batch_size: int, hook: str | None = None) -> Iterator[Tensor]:
        """Yield `(batch, hook, d_model)` tensors (or `(batch, d_model)` for one `hook`) in stored order."""
        if batch_size < 1:
            raise FeatsteerError(f"batch_size must be at least 1, got {batch_size}")
        if hook is not None and hook not in self.hook_names:
            raise FeatsteerError(f"{self.path} holds no activations at {hook}; it holds {', '.join(self.hook_names)}")
        slot = None if hook is None else self.hook_names.index(hook)
        carry: Tensor | None = None
        for shard in self._shards():
            acts = shard["activations"] if slot is None else shard["activations"][:, slot, :]
            if carry is not None:
                acts = torch.cat([carry, acts])
            whole = (acts.shape[0] // batch_size) * batch_size
            yield from acts[:whole].split(batch_size)
            carry = acts[whole:] if whole < acts.shape[0] else None
        if carry is not None and carry.shape[0]:
            yield carry

    def load(self) -> ActivationSet:
        """Load everything into one `ActivationSet`, rows ordered by prompt, then position (a streamed capture
        stores them in the order its length-sorted batches ran)."""
        parts = list(self._shards())
        prompt_index = torch.cat([p["prompt_index"] for p in parts])
        order = torch.sort(prompt_index, stable=True).indices
        stats: dict[str, RunningMoments] = {}
        stats_file = self.path / "stats.safetensors"
        if stats_file.exists():
            states: dict[str, dict[str, Tensor]] = {}
            for name, value in load_file(str(stats_file)).items():
                key, _, part = name.rpartition("/")
                states.setdefault(key, {})[part] = value
            stats = {key: RunningMoments.from_state(state, self.metadata["stats_counts"][key]) for key, state in states.items()}
        return ActivationSet(
            activations=torch.cat([p["activations"] for p in parts])[order],
            hook_names=self.hook_names,
            prompt_index=prompt_index[order],
            position=torch.cat([p["position"] for p in parts])[order],
            prompts=tuple(self.metadata["prompts"]),
            positions=self.metadata.get("positions", "last"),
            model=self.metadata.get("model", ""),
            label=self.metadata.get("label"),
            chat=self.metadata.get("chat", True),
            system=self.metadata.get("system"),
            stats=stats,
            provenance=self.metadata.get("provenance", {}),
        )
