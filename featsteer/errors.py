"""One exception type for every user-facing error, so the CLI can print one line and exit 2."""


class FeatsteerError(ValueError):
    """A user-facing error: one line saying what was wrong and how to fix it."""
