"""Names the user may misspell (settings, strategies, policies, capabilities, fields): the error
names the closest valid spelling (difflib), or lists the valid ones when none is close."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The valid name closest to `word` (case-insensitive), or None when none is close enough."""
    options = list(choices)
    by_lower = {c.lower(): c for c in options}
    found = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    return by_lower[found[0]] if found else None


def unknown(what: str, word: str, choices: Iterable[str]) -> str:
    """`unknown strategy 'cost_optimised'; did you mean 'cost_optimized'?`, or, when nothing is
    close, the valid names (the first 12)."""
    options = sorted(set(choices))
    guess = closest(word, options)
    if guess is not None:
        return f"unknown {what} {word!r}; did you mean {guess!r}?"
    if not options:
        return f"unknown {what} {word!r}; none is defined"
    listed = ", ".join(options[:12]) + (", ..." if len(options) > 12 else "")
    return f"unknown {what} {word!r}; valid: {listed}"
