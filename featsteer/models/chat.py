"""Chat formatting of instructions, and where the instruction ends inside the formatted prompt.

Refusal directions are read at the tokens *after* the instruction (the chat template's end-of-turn and
assistant header), so we need both the formatted text and the character span of the instruction in it.

A prompt holding a special token's text ("<|im_end|>") is tokenized into that special token, as Hugging Face's own
`apply_chat_template` does, so a prompt can close its turn and open others. `special_token_texts` finds such text;
`ModelAdapter.tokenize` warns about it and, with `escape_special_tokens`, tokenizes it as plain text, in the
instruction, the system prompt and the prefill alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from featsteer.errors import FeatsteerError

FALLBACK_TEMPLATE = "{system}### Instruction:\n{instruction}\n\n### Response:\n"
"""Used when the tokenizer has no chat template (base models). `{system}` is the system prompt followed
by a blank line, or empty."""

_SENTINEL = "FEATSTEERINSTRUCTIONSENTINEL"

BLANK_SYSTEM = "the system prompt is empty: give its text, or leave it out (no --system; system=None) for none"
"""The one error every entry point gives for a blank system prompt."""


def check_system(system: str | None) -> str | None:
    """Refuse a blank system prompt, the one rule every entry point shares (CLI, configs, `format_instruction`).

    A blank text would be a system turn of spaces (`" "`) or, for `""`, silently no system turn at all while the
    run's metadata records one.

    Args:
        system: the system prompt, or None for none.

    Returns:
        `system` unchanged.

    Raises:
        FeatsteerError: `system` is empty or only whitespace.
    """
    if system is not None and not system.strip():
        raise FeatsteerError(BLANK_SYSTEM)
    return system


@dataclass(frozen=True)
class FormattedPrompt:
    """An instruction rendered through the chat template."""

    text: str
    """The full prompt text, ending with the assistant header (generation prompt)."""
    instruction_end: int
    """Character offset in `text` just after the instruction."""
    uses_chat_template: bool
    """False when the documented fallback template was used."""
    instruction_start: int = 0
    """Character offset in `text` where the instruction starts."""


def _render(tokenizer, instruction: str, system: str | None) -> tuple[str, bool]:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": instruction}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
        except Exception:  # templates such as Gemma's reject a system role: fold it into the user turn
            if not system:
                raise
            folded = [{"role": "user", "content": f"{system}\n\n{instruction}"}]
            return tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True), True
    prefix = f"{system}\n\n" if system else ""
    return FALLBACK_TEMPLATE.format(system=prefix, instruction=instruction), False


def format_instruction(tokenizer, instruction: str, system: str | None = None) -> FormattedPrompt:
    """Render one instruction as a chat prompt ready for generation.

    Args:
        tokenizer: a Hugging Face tokenizer; its `chat_template` is used when present, otherwise
            `FALLBACK_TEMPLATE`.
        instruction: the user turn.
        system: optional system prompt (folded into the user turn for templates without a system role).

    Returns:
        The formatted prompt and the character offset where the instruction ends.

    Raises:
        FeatsteerError: `system` is blank (`check_system`).
    """
    check_system(system)
    probe, _ = _render(tokenizer, _SENTINEL, system)
    text, used_template = _render(tokenizer, instruction, system)
    prefix, suffix = probe[: probe.index(_SENTINEL)], probe[probe.index(_SENTINEL) + len(_SENTINEL) :]
    instruction_end = len(text) - len(suffix) if suffix and text.endswith(suffix) else text.rfind(instruction) + len(instruction)
    instruction_start = len(prefix) if text.startswith(prefix) and len(prefix) <= instruction_end else max(
        0, text.rfind(instruction.strip(), 0, instruction_end))
    return FormattedPrompt(text=text, instruction_end=instruction_end, uses_chat_template=used_template,
                           instruction_start=instruction_start)


def special_token_strings(tokenizer) -> tuple[str, ...]:
    """The texts of the tokenizer's special tokens (its named ones and every added token marked special), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {str(token) for token in getattr(tokenizer, "all_special_tokens", [])}
    texts |= {token.content for token in added.values() if getattr(token, "special", False)}
    return tuple(sorted((text for text in texts if text), key=lambda text: (-len(text), text)))


def special_token_texts(tokenizer, text: str, strings: tuple[str, ...] | None = None) -> list[str]:
    """The special tokens the tokenizer reads in `text` (as plain text they would be several ordinary tokens).

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: a prompt as the user wrote it.
        strings: `special_token_strings(tokenizer)`, when the caller keeps it.

    Returns:
        The special tokens' texts in the order they occur, repeats dropped; empty for most prompts.
    """
    strings = special_token_strings(tokenizer) if strings is None else strings
    if not any(candidate in text for candidate in strings):  # the common case costs a few substring checks, no encoding
        return []
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    special_ids |= {i for i, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items() if getattr(token, "special", False)}
    found = [tokenizer.convert_ids_to_tokens(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in special_ids]
    return list(dict.fromkeys(found))


def plain_token_ids(tokenizer, text: str) -> list[int]:
    """The token ids of `text` as plain text: no special tokens added, and special-token text in it ("<|im_end|>" in an
    answer) split into ordinary tokens as `ModelAdapter.tokenize(escape_special_tokens=True)` splits it in a prompt, not
    read as the special token. For text known only as text (a response, a refusal prefix, an affirmative opening), which
    holds what was written, not the tokens a model emitted.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the text.

    Returns:
        Its token ids; the same as `tokenizer(text, add_special_tokens=False)` for text without special-token text.
    """
    if not special_token_texts(tokenizer, text):
        return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return [int(t) for t in tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
