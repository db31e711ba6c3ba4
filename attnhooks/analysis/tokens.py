"""Key classes from token strings: special tokens and punctuation, as bool masks over the keys."""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from attnhooks.analysis._common import AnalysisError

__all__ = ["SPECIAL_TOKENS", "punctuation", "special_tokens"]

SPECIAL_TOKENS = frozenset(
    {
        "[CLS]",
        "[SEP]",
        "[PAD]",
        "[MASK]",
        "[UNK]",
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
        "<bos>",
        "<eos>",
        "<|endoftext|>",
        "<|begin_of_text|>",
    }
)
"""Token strings :func:`special_tokens` always recognises (besides any ``<|...|>``)."""

_CONTROL = re.compile(r"<\|.*\|>", re.DOTALL)
_WORD_MARKERS = "Ġ▁"  # byte-level BPE (GPT-2) and SentencePiece word starts; WordPiece uses "##"


def special_tokens(tokens: Iterable[str], extra: Iterable[str] = ()) -> npt.NDArray[np.bool_]:
    """Flag the special tokens of a sequence: BOS/EOS/CLS/SEP/PAD/MASK/UNK and any ``<|...|>``.

    Matching is exact (case and spacing included) against :data:`SPECIAL_TOKENS`, ``extra`` and
    the pattern ``<|...|>`` (``<|im_start|>``, ``<|eot_id|>``, ...).

    Args:
        tokens: ``[k]`` token strings (``tokenizer.convert_ids_to_tokens(ids)``).
        extra: further token strings to treat as special.

    Returns:
        bool ``[k]``.

    Example:
        >>> special_tokens(["[CLS]", "hello", "[SEP]", "<|im_start|>", "<s>"])
        array([ True, False,  True,  True,  True])
    """
    names = SPECIAL_TOKENS | frozenset(extra)
    return np.array([t in names or _CONTROL.fullmatch(t) is not None for t in _strings(tokens)], dtype=bool)


def punctuation(tokens: Iterable[str]) -> npt.NDArray[np.bool_]:
    """Flag tokens made only of punctuation, after removing the word-piece markers.

    The markers are a leading ``##`` (WordPiece) and leading ``Ġ`` / ``▁`` (byte-level BPE,
    SentencePiece). A token that is nothing but a marker (``"Ġ"``, a lone space) is not
    punctuation; a token that is nothing but ``"##"`` is. A character is punctuation when its
    Unicode category is P* or it is in :data:`string.punctuation` (which adds ``$+<=>^`|~``).

    Args:
        tokens: ``[k]`` token strings.

    Returns:
        bool ``[k]``.

    Example:
        >>> punctuation([",", "Ġ.", "##!", "▁...", "Ġ", "hello", "[SEP]", "«"])
        array([ True,  True,  True,  True, False, False, False,  True])
    """
    return np.array([_is_punctuation(t) for t in _strings(tokens)], dtype=bool)


def _strings(tokens: Iterable[str]) -> list[str]:
    items = list(tokens)
    wrong = [t for t in items if not isinstance(t, str)]
    if wrong:
        raise AnalysisError(
            f"tokens must be strings; got {type(wrong[0]).__name__} {wrong[0]!r}. "
            "Turn ids into strings first, e.g. tokenizer.convert_ids_to_tokens(ids)."
        )
    return [str(t) for t in items]


def _is_punctuation(token: str) -> bool:
    bare = (token[2:] if token.startswith("##") else token).lstrip(_WORD_MARKERS) or token
    return all(unicodedata.category(c).startswith("P") or c in string.punctuation for c in bare) and bool(bare)
