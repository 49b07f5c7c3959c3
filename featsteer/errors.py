"""One exception type for every user-facing error, so the CLI can print one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path


class FeatsteerError(ValueError):
    """A user-facing error: one line saying what was wrong and how to fix it."""


def read_json_file(path: str | Path, name: str, hint: str) -> object:
    """The JSON in a file a user named, or a one-line error: `{name}: no such file; {hint}` or `{name} is not JSON (...);
    {hint}`. `name` says which argument it was (`--paired-with run.json`), `hint` what to give instead."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FeatsteerError(f"{name}: no such file; {hint}")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeatsteerError(f"{name} is not JSON ({error}); {hint}") from None
