"""Which tokens of a forward pass are the prompt and which were generated, across the passes of one generation.

Hooks see one activation tensor per forward pass and nothing else; interventions that act only on the prompt (or
only on generated tokens) use a `PositionTracker` per hook to tell the prompt pass from the generation steps that
follow it, for backends that cache keys and values (one new token per step) and for those that re-read the
whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

TOKEN_POSITIONS: tuple[str, ...] = ("all", "prompt", "generated")
"""Which tokens an intervention changes: every one, the prompt's (in the prompt pass; nothing while decoding), or the
ones produced while generating. SAE feature edits and activation addition share it."""


@dataclass
class PositionTracker:
    """Tells prompt tokens from generated tokens across the forward passes of one generation.

    With `model` given, the model's own account is used (`ModelAdapter.generation_step`, set by `generate`): exact
    for every backend. Without it, the tracker infers it from the shapes it sees: a pass of one token per row after
    an earlier pass is a KV-cached generation step; a pass exactly one token longer than the previous one with the
    same batch is a generation step of a backend that re-reads the sequence; anything else starts a new prompt (a
    guess that a new batch of prompts one token longer than the last pass would fool).
    """

    prompt_length: int = 0
    """Length of the current prompt pass (padded), after `generated_mask`."""
    last_length: int = 0
    last_batch: int = -1
    model: Any = None
    """A `ModelAdapter` whose `generation_step` says which pass this is (None: infer from shapes)."""

    def selected(self, positions: str, batch: int, length: int, device: torch.device) -> Tensor | None:
        """`(batch, length)` bool: True at the tokens `positions` (one of `TOKEN_POSITIONS`) changes in this pass;
        None for `all`. Call it once per pass, as `generated_mask`."""
        if positions == "all":
            return None
        generated = self.generated_mask(batch, length, device)
        return generated if positions == "generated" else ~generated

    def generated_mask(self, batch: int, length: int, device: torch.device) -> Tensor:
        """`(batch, length)` bool: True at the generated tokens of this pass, False at the prompt's."""
        if self.model is not None:
            step = self.model.generation_step
            if not step:  # outside generation, or the prompt pass of one
                self.prompt_length = length
                return torch.zeros(batch, length, dtype=torch.bool, device=device)
            self.prompt_length = self.model.generation_prompt_length
            if length == 1:
                return torch.ones(batch, 1, dtype=torch.bool, device=device)
            return torch.arange(length, device=device)[None, :].expand(batch, length) >= self.prompt_length
        cached_step = length == 1 and self.last_batch == batch and self.last_length > 0
        reread_step = length == self.last_length + 1 and self.last_batch == batch and self.prompt_length > 0
        if cached_step:
            self.last_length += 1
            mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
        elif reread_step:
            self.last_length = length
            mask = torch.arange(length, device=device)[None, :].expand(batch, length) >= self.prompt_length
        else:
            self.prompt_length = self.last_length = length
            mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.last_batch = batch
        return mask
