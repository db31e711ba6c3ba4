"""Module names: the glob rules shared by capture (``modules=``) and the store reader (torch-free)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["glob_regex", "match_names"]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Module-name glob: ``*`` and ``?`` stay within one dotted segment, ``**`` spans segments.

    ``"model.layers.*.self_attn"`` matches every layer's attention, ``"blocks.*"`` the direct
    children of ``blocks``, ``"**.attn1"`` every ``attn1`` at any depth.
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def match_names(names: Sequence[str], patterns: str | Iterable[str]) -> list[str]:
    """The names that equal or match (:func:`glob_regex`) any of ``patterns``, in the order of ``names``."""
    regexes = [glob_regex(p) for p in ([patterns] if isinstance(patterns, str) else patterns)]
    return [n for n in names if any(r.fullmatch(n) for r in regexes)]
