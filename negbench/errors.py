"""The one exception type that reaches the user as a one-line message (exit code 2)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""


def suggest(name: str, known: Iterable[str]) -> str:
    """A ' (did you mean: a, b?)' hint for a misspelt name, or ''."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
