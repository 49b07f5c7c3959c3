"""GPT-OSS's harmony response format: which part of a generated turn is the answer.

A harmony model writes its turn as messages, `<|channel|>analysis<|message|>reasoning<|end|>` and then
`<|start|>assistant<|channel|>final<|message|>answer<|return|>`. Decoded without special tokens the two run together
("analysisThe user asks...assistantfinalI can't help"), so refusal markers in the reasoning counted as a refusal of the
answer. This module finds a harmony vocabulary, decodes a response keeping only the format's control tokens, and
splits it into messages so every stage scores the final channel's message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END, RETURN, CALL = "<|end|>", "<|return|>", "<|call|>"

REQUIRED_TOKENS = (START, CHANNEL, MESSAGE, END, RETURN)
"""A vocabulary with all of these is a harmony one (GPT-OSS's o200k_harmony)."""
CONTROL_TOKENS = (*REQUIRED_TOKENS, CONSTRAIN, CALL)
"""The tokens that structure a harmony turn; none is part of a message's text."""
TURN_ENDS = (RETURN, CALL)
"""Tokens that end the model's turn: its answer is done, or it asks for a tool."""
MESSAGE_CLOSERS = (END, *TURN_ENDS)
"""Tokens that close the message being written."""
FINAL_CHANNEL = "final"
"""The channel of the message meant for the user."""
ANSWER_OPENING = CHANNEL + FINAL_CHANNEL + MESSAGE
"""What a harmony model writes after the generation prompt's `<|start|>assistant` when it answers directly: the header of
a final-channel message. First-token measures read the prompt with it appended, where the answer's first token comes
next (`ModelAdapter.answer_opening`)."""
HARMONY_OPENINGS = ("final", "none")
"""Values of `ModelAdapter.harmony_opening` (CLI `--harmony-opening`): append `ANSWER_OPENING` to the prompts first-token
measures read, or leave every prompt at the generation prompt."""
MIN_REASONING_TOKENS = 256
"""Below this many new tokens a harmony model mostly runs out while still reasoning, before its final message."""

_SPLIT = re.compile("(" + "|".join(re.escape(token) for token in CONTROL_TOKENS) + ")")


class _Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class HarmonyReply:
    """One generated turn split into its harmony messages (`parse_harmony`)."""

    answer: str
    """The final channel's message (all of them, joined by newlines, should there be several); without one, the text of
    every message with the control tokens and headers removed (the reasoning, when the budget ran out in it); for text
    with no message at all, that text."""
    reasoning: str
    """The analysis channel's messages, joined by newlines (empty without them)."""
    reasoning_only: bool
    """True when the text has harmony messages but none on the final channel: `answer` is then reasoning (or a tool call),
    typically because `max_new_tokens` ran out before the model got to its answer."""
    final_closed: bool
    """True when a final-channel message was closed (`<|end|>`, `<|return|>` or `<|call|>`): the answer is complete."""


def is_harmony_vocab(vocab: Mapping[str, int]) -> bool:
    """True when a tokenizer's vocabulary has every token of the harmony format (`REQUIRED_TOKENS`)."""
    return all(token in vocab for token in REQUIRED_TOKENS)


def parse_harmony(text: str) -> HarmonyReply:
    """Split a generated harmony turn into messages and pick out the answer.

    The text is what the model wrote after the chat template's `<|start|>assistant`, decoded so the control tokens are
    kept (`harmony_text`): each message is a header (`<|channel|>` and the channel name, maybe a recipient and a
    `<|constrain|>` type; after `<|start|>`, the role first), `<|message|>`, its text, then `<|end|>`, `<|return|>` or
    `<|call|>`; the last one may be cut by the token budget. Text before the first header (a prefill's continuation)
    is a message of no channel.

    Args:
        text: One generated response with the harmony control tokens in it.

    Returns:
        The answer, the reasoning, and whether the answer is reasoning only and whether it is complete.
    """
    messages = _messages(text)
    final = [message for message in messages if message.channel == FINAL_CHANNEL]
    reasoning = "\n".join(message.text for message in messages if message.channel == "analysis" and message.text)
    if final:
        answer = "\n".join(message.text for message in final if message.text)
        return HarmonyReply(answer, reasoning, False, any(message.closed for message in final))
    everything = "\n".join(message.text for message in messages if message.text)
    structured = CHANNEL in text or MESSAGE in text
    return HarmonyReply(everything, reasoning, structured, False)


@dataclass
class _Message:
    channel: str | None
    """None for text before any header."""
    pieces: list[str]
    closed: bool = False

    @property
    def text(self) -> str:
        return "".join(self.pieces).strip()


def _messages(text: str) -> list[_Message]:
    """The messages of a harmony turn in order, each with its channel (empty when its header names none)."""
    messages = [_Message(None, [])]
    header: list[str] = []
    in_header = named = False
    for piece in _SPLIT.split(text):
        if piece in (START, CHANNEL):
            in_header, named, header = True, piece == CHANNEL, []
        elif piece == MESSAGE:
            if in_header:
                words = "".join(header).split()
                messages.append(_Message(words[0] if named and words else "", []))
            in_header = False
        elif piece in MESSAGE_CLOSERS:
            if not in_header:
                messages[-1].closed = True
            in_header, named, header = True, False, []
        elif piece == CONSTRAIN:
            header.append(" ")
        elif in_header:
            header.append(piece)
        else:
            messages[-1].pieces.append(piece)
    return [message for message in messages if message.channel is not None or message.text]


def harmony_text(tokenizer: _Decoder, token_ids: Sequence[int], control_ids: Mapping[int, str]) -> str:
    """Decode generated ids keeping the harmony control tokens (`control_ids`: id to token) and dropping every other
    special token, as a decode with `skip_special_tokens=True` drops them; each run between control tokens is decoded
    on its own."""
    parts: list[str] = []
    run: list[int] = []
    for token in token_ids:
        if token in control_ids:
            parts += [tokenizer.decode(run, skip_special_tokens=True), control_ids[token]]
            run = []
        else:
            run.append(token)
    parts.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(parts)
