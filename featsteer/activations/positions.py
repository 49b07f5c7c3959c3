"""Which token positions of a prompt to keep.

Refusal is usually read at the last prompt token or at the chat template's tail after the instruction;
SAE training wants every token. A `Positions` object turns one hook's `(batch, pos, d_model)` activation
into the rows to keep, so the full sequence is never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from featsteer.errors import FeatsteerError


@dataclass(frozen=True)
class Positions:
    """A position selector.

    Use the constructors: `Positions.last()`, `Positions.mean_last(k)`, `Positions.post_instruction()`,
    `Positions.instruction_end()`, `Positions.all_tokens(start)`, or parse a CLI string with
    `Positions.parse("last" | "mean_last:4" | "post_instruction" | "instruction_end" | "all" | "all:N")`.
    """

    mode: str
    """`last`, `mean_last`, `post_instruction`, `instruction_end` or `all`."""
    k: int = 1
    """Window for `mean_last`."""
    start: int = 0
    """For `all`: the first token index kept (e.g. past a chat-template prefix that every prompt shares)."""

    @classmethod
    def last(cls) -> Positions:
        """The final prompt token."""
        return cls("last")

    @classmethod
    def mean_last(cls, k: int) -> Positions:
        """The mean over the last `k` prompt tokens (one row per prompt)."""
        if k < 1:
            raise FeatsteerError(f"mean_last needs k >= 1, got {k}")
        return cls("mean_last", k)

    @classmethod
    def post_instruction(cls) -> Positions:
        """Every token after the instruction (the template's end-of-turn and assistant header)."""
        return cls("post_instruction")

    @classmethod
    def instruction_end(cls) -> Positions:
        """The instruction's own last token, just before the template's tail (one row per prompt).

        Zhao et al. 2025 ("LLMs Encode Harmfulness and Refusal Separately") read whether a request is harmful here,
        and whether the model will refuse at the post-instruction tokens. The row's position label is its offset
        from the end of the prompt, `-(tail tokens + 1)`: -6 for Qwen2.5's `<|im_end|>\\n<|im_start|>assistant\\n`.
        """
        return cls("instruction_end")

    @classmethod
    def all_tokens(cls, start: int = 0) -> Positions:
        """Every real (non-padding) token from index `start` on, one row each."""
        if start < 0:
            raise FeatsteerError(f"all:N needs N >= 0, got {start}")
        return cls("all", start=start)

    @classmethod
    def parse(cls, text: str) -> Positions:
        """Parse `last`, `mean_last:K`, `post_instruction`, `instruction_end`, `all` or `all:N` (tokens from index N on)."""
        name, colon, arg = text.partition(":")
        if name in ("mean_last", "all") and arg:
            try:
                number = int(arg)
            except ValueError:
                raise FeatsteerError(f"bad position '{text}': the number after ':' must be an integer") from None
            return cls.mean_last(number) if name == "mean_last" else cls.all_tokens(number)
        if name == "mean_last":
            return cls.mean_last(1)
        if name in ("last", "post_instruction", "instruction_end") and colon:
            raise FeatsteerError(f"bad position '{text}': {name} takes no ':' argument (mean_last:K and all:N do)")
        if name in ("last", "post_instruction", "instruction_end", "all"):
            return cls(name)
        raise FeatsteerError(f"unknown position '{text}': use last, mean_last:K, post_instruction, instruction_end, all or all:N")

    def __str__(self) -> str:
        if self.mode == "mean_last":
            return f"mean_last:{self.k}"
        return f"all:{self.start}" if self.mode == "all" and self.start else self.mode

    def plan(self, attention_mask: Tensor, n_post_instruction: Tensor, tail: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Decide the rows to keep for one left-padded batch.

        Args:
            attention_mask: `(batch, pos)` 1 at real tokens, 0 at left padding.
            n_post_instruction: `(batch,)` each prompt's number of tokens after its instruction.
            tail: for `post_instruction`, how many of those tokens to keep per prompt: the fewest any prompt of the whole
                prompt set has, so a prompt keeps the same rows whichever prompts share its batch (None: this batch's fewest).

        Returns:
            `(row_batch, row_token, row_position)`: for each kept row, its batch index, its column in the
            padded sequence, and its position label (offset from the end of the prompt, -1 = last token,
            or the absolute token index for `all`). For `mean_last` the column is the last token and the
            hook averages the window itself. `instruction_end` takes each prompt's own tail length, so a prompt whose
            tail tokenizes differently gets its own label.
        """
        width = attention_mask.shape[1]
        lengths = attention_mask.sum(1).long().cpu()
        batch = torch.arange(attention_mask.shape[0])
        if self.mode == "mean_last" and len(lengths) and int(lengths.min()) < self.k:
            # checked per prompt: against the padded width, a short prompt beside a long one would average padding
            raise FeatsteerError(f"mean_last:{self.k} is longer than a prompt ({int(lengths.min())} tokens): use a K of at most "
                                 "the shortest prompt's length")
        if self.mode in ("last", "mean_last"):
            return batch, torch.full_like(batch, width - 1), torch.full_like(batch, -1)
        if self.mode == "post_instruction":
            n_post = tail if tail is not None else int(n_post_instruction.min()) if n_post_instruction.numel() else 0
            if n_post < 1:
                raise FeatsteerError("post_instruction positions need a chat template with tokens after the instruction")
            offsets = torch.arange(-n_post, 0)
            return batch.repeat_interleave(n_post), (width + offsets).repeat(len(batch)), offsets.repeat(len(batch))
        if self.mode == "instruction_end":
            tails = n_post_instruction.long().cpu()
            lengths_ok = len(tails) == len(batch) and bool((tails >= 1).all()) and bool((tails < lengths).all())
            if not lengths_ok:
                raise FeatsteerError("instruction_end needs a chat template with tokens after the instruction "
                                     "(and an instruction of at least one token)")
            offsets = -(tails + 1)
            return batch, width + offsets, offsets
        rows = [(b, width - int(length) + t, t) for b, length in enumerate(lengths.tolist()) for t in range(self.start, length)]
        as_tensor = torch.tensor(rows, dtype=torch.long).reshape(-1, 3)
        return as_tensor[:, 0], as_tensor[:, 1], as_tensor[:, 2]

    def select(self, activation: Tensor, row_batch: Tensor, row_token: Tensor) -> Tensor:
        """Pick the planned rows out of a `(batch, pos, d_model)` activation, giving `(rows, d_model)`."""
        if self.mode == "mean_last":  # `plan` checked that every prompt has `k` tokens
            # in float32 at least: a bfloat16 model's mean came out rounded to bfloat16, though stored in float32
            window = activation[:, -self.k :, :]
            return window.to(torch.promote_types(window.dtype, torch.float32)).mean(1)
        return activation[row_batch.to(activation.device), row_token.to(activation.device)]
