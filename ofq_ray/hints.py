"""The "did you mean" hint of every one-line error (stdlib only, so any layer can use it)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(value: object, allowed: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest allowed value, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
