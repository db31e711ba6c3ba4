"""Head detection scores, as in TransformerLens' ``head_detector``, on stored attention arrays.

A detection pattern is a ``[q, k]`` array saying where a head of some kind should attend: the
previous token, an earlier copy of the current token (duplicate-token head), or the token after
an earlier copy of the current token (induction head). A head's score says how much of its
attention falls on the pattern.

How the scores compare with TransformerLens (``transformer_lens.head_detector.detect_head``):

* The patterns are the same: previous token ``j = i - 1``; duplicate ``j < i`` with
  ``tok[j] == tok[i]``; induction ``1 <= j <= i`` with ``tok[j - 1] == tok[i]``. Here they also
  work on a window of rows (``q_start``) and on rows that are not square.
* ``exclude_bos`` drops key position 0, ``exclude_current_token`` drops key ``j == i``, from the
  attention and the pattern alike, as there. The input is never modified (TransformerLens zeroes
  those entries in the cached pattern itself).
* ``method="mul"`` is ``sum(attn · pattern) / sum(attn)`` over the rows scored, after the
  exclusions, as there. **Deliberate difference:** by default only rows that have at least one
  pattern key are scored (``all_rows=False``): a row with nothing to find (row 0 for the previous
  token, a first occurrence for duplicate/induction) says nothing about the head, so a pure
  previous-token head scores exactly 1 and a perfect induction head on a repeated sequence
  scores 1. ``all_rows=True`` scores every row, which reproduces TransformerLens' number.
* ``method="abs"`` is ``1 - mean over scored rows of sum_j |attn - pattern|`` (excluded entries
  count 0), in ``[-1, 1]``; TransformerLens uses every row and rounds to 3 decimals, we do not
  round. TransformerLens requires a lower-triangular pattern; we take any ``[q, k]`` pattern, and
  weights other than 0/1 with ``"mul"`` (no warning).
* Scores come per head for every leading axis (``[..., heads]``); TransformerLens averages a list
  of prompts. Average the batch axis yourself.
* A head with no attention on the scored rows scores NaN (0/0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from attnhooks.analysis._common import AnalysisError, Array, as_float, check_attn, check_int, key_offsets

__all__ = [
    "duplicate_token_pattern",
    "duplicate_token_score",
    "induction_pattern",
    "induction_score",
    "pattern_score",
    "previous_token_pattern",
    "previous_token_score",
]

Method = Literal["mul", "abs"]
Tokens = Sequence[int] | Sequence[str] | npt.NDArray[np.generic]


def previous_token_pattern(q: int, k: int, *, q_start: int = 0) -> npt.NDArray[np.bool_]:
    """``[q, k]`` bool, True at key ``j = i - 1`` for query position ``i = q_start + r``.

    Example:
        >>> previous_token_pattern(3, 3).astype(int)
        array([[0, 0, 0],
               [1, 0, 0],
               [0, 1, 0]])
    """
    offsets = key_offsets(check_int(q, "q", minimum=0), check_int(k, "k", minimum=0), check_int(q_start, "q_start"))
    pattern: npt.NDArray[np.bool_] = offsets == -1
    return pattern


def duplicate_token_pattern(tokens: Tokens, *, q: int | None = None, q_start: int = 0) -> npt.NDArray[np.bool_]:
    """``[q, k]`` bool, True at earlier keys ``j < i`` holding the query's own token.

    Args:
        tokens: ``[k]`` ids or strings of the keys; query row ``r`` holds ``tokens[q_start + r]``.
        q: number of query rows (default ``k - q_start``: the rest of the sequence).
        q_start: position of row 0 among the keys.

    Example:
        >>> duplicate_token_pattern([7, 8, 7, 8]).astype(int)
        array([[0, 0, 0, 0],
               [0, 0, 0, 0],
               [1, 0, 0, 0],
               [0, 1, 0, 0]])
    """
    ids, rows, offsets = _token_grid(tokens, q, q_start)
    pattern: npt.NDArray[np.bool_] = (rows[:, None] == ids[None, :]) & (offsets < 0)
    return pattern


def induction_pattern(tokens: Tokens, *, q: int | None = None, q_start: int = 0) -> npt.NDArray[np.bool_]:
    """``[q, k]`` bool, True at keys ``1 <= j <= i`` whose previous token is the query's token.

    An induction head at ``... A B ... A`` attends from the second ``A`` to ``B``, the token
    that followed ``A`` last time. Arguments as in :func:`duplicate_token_pattern`.

    Example:
        >>> induction_pattern([7, 8, 7, 8]).astype(int)
        array([[0, 0, 0, 0],
               [0, 0, 0, 0],
               [0, 1, 0, 0],
               [0, 0, 1, 0]])
    """
    ids, rows, offsets = _token_grid(tokens, q, q_start)
    before = np.concatenate([[-1], ids[:-1]])  # token before each key; -1 matches nothing
    pattern: npt.NDArray[np.bool_] = (rows[:, None] == before[None, :]) & (offsets <= 0)
    return pattern


def pattern_score(
    attn: Array,
    pattern: npt.ArrayLike,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    method: Method = "mul",
    all_rows: bool = False,
    q_start: int = 0,
) -> Array:
    """How well each head's attention matches a detection pattern (see the module notes).

    Args:
        attn: ``[..., heads, q, k]`` attention probabilities (numpy or dask).
        pattern: ``[q, k]`` where the head should attend: 0/1 (bool) for ``"mul"``, any target
            weights for ``"abs"``.
        exclude_bos: leave key position 0 out of the comparison.
        exclude_current_token: leave key ``j == q_start + r`` out of the comparison.
        method: ``"mul"``: share of the attention that falls on the pattern, in ``[0, 1]``;
            ``"abs"``: 1 minus the mean L1 distance between rows, in ``[-1, 1]``.
        all_rows: score every row, as TransformerLens does, instead of only the rows where the
            pattern (after exclusions) has a key.
        q_start: position of row 0 among the keys (for ``exclude_current_token``).

    Returns:
        ``[..., heads]`` float64; NaN where nothing was scored.

    Example:
        >>> import numpy as np
        >>> previous = np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        >>> pattern_score(previous, previous_token_pattern(3, 3))
        array([1.])
        >>> pattern_score(previous, previous_token_pattern(3, 3), all_rows=True).round(4)
        array([0.6667])
    """
    check_attn(attn)
    q, k = attn.shape[-2:]
    target = np.asarray(pattern)
    if target.shape != (q, k):
        raise AnalysisError(f"pattern must be [q, k] = {(q, k)} like attn's last two axes; got {target.shape}.")
    if method not in ("mul", "abs"):
        raise AnalysisError(f"method must be 'mul' or 'abs'; got {method!r}.")
    keep = np.ones((q, k), dtype=bool)
    if exclude_bos:
        keep[:, 0] = False
    if exclude_current_token:
        keep &= key_offsets(q, k, check_int(q_start, "q_start")) != 0
    p = as_float(attn)
    target = np.where(keep, target, 0).astype(p.dtype)
    rows = np.ones(q, dtype=bool) if all_rows else (target != 0).any(axis=-1)
    if method == "mul":
        hit = (p * target).sum(axis=(-2, -1), dtype=np.float64)
        total = (p * (keep & rows[:, None])).sum(axis=(-2, -1), dtype=np.float64)
        return hit / np.where(total > 0, total, np.nan)
    l1 = (np.abs(p - target) * keep).sum(axis=-1, dtype=np.float64)
    n_rows = int(rows.sum())
    return 1.0 - (l1 * rows).sum(axis=-1) / (n_rows if n_rows else np.nan)


def previous_token_score(
    attn: Array,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    method: Method = "mul",
    all_rows: bool = False,
    q_start: int = 0,
) -> Array:
    """:func:`pattern_score` against :func:`previous_token_pattern`: ``[..., heads]`` float64.

    Example:
        >>> import numpy as np
        >>> previous = np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        >>> previous_token_score(previous)
        array([1.])
    """
    check_attn(attn)
    pattern = previous_token_pattern(*attn.shape[-2:], q_start=q_start)
    return pattern_score(
        attn,
        pattern,
        exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token,
        method=method,
        all_rows=all_rows,
        q_start=q_start,
    )


def duplicate_token_score(
    attn: Array,
    tokens: Tokens,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    method: Method = "mul",
    all_rows: bool = False,
    q_start: int = 0,
) -> Array:
    """:func:`pattern_score` against :func:`duplicate_token_pattern` of ``tokens`` (``[k]``).

    Example:
        >>> import numpy as np
        >>> attn = np.array([[[1, 0, 0, 0], [0.5, 0.5, 0, 0], [1, 0, 0, 0], [0, 0.5, 0.5, 0]]])
        >>> duplicate_token_score(attn, ["a", "b", "a", "b"])  # rows 2, 3: (1 + 0.5) / 2
        array([0.75])
    """
    check_attn(attn)
    q, k = attn.shape[-2:]
    pattern = duplicate_token_pattern(_keys_tokens(tokens, k), q=q, q_start=q_start)
    return pattern_score(
        attn,
        pattern,
        exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token,
        method=method,
        all_rows=all_rows,
        q_start=q_start,
    )


def induction_score(
    attn: Array,
    tokens: Tokens,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    method: Method = "mul",
    all_rows: bool = False,
    q_start: int = 0,
) -> Array:
    """:func:`pattern_score` against :func:`induction_pattern` of ``tokens`` (``[k]``).

    Example:
        >>> import numpy as np
        >>> attn = np.array([[[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]])
        >>> induction_score(attn, [5, 6, 5, 6])
        array([1.])
    """
    check_attn(attn)
    q, k = attn.shape[-2:]
    pattern = induction_pattern(_keys_tokens(tokens, k), q=q, q_start=q_start)
    return pattern_score(
        attn,
        pattern,
        exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token,
        method=method,
        all_rows=all_rows,
        q_start=q_start,
    )


def _keys_tokens(tokens: Tokens, k: int) -> Tokens:
    if len(tokens) != k:
        raise AnalysisError(f"tokens must give one token per key (k={k}); got {len(tokens)} tokens.")
    return tokens


def _token_grid(
    tokens: Tokens, q: int | None, q_start: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Tokens as small ints ``[k]``, the query rows' tokens ``[q]`` and the offsets ``j - i``."""
    values = np.asarray(tokens)
    if values.ndim != 1:
        raise AnalysisError(f"tokens must be one sequence [k]; got shape {values.shape}.")
    ids = np.unique(values, return_inverse=True)[1].astype(np.int64).reshape(-1)
    k = ids.shape[0]
    q_start = check_int(q_start, "q_start", minimum=0)
    q = k - q_start if q is None else check_int(q, "q", minimum=0)
    if q_start + q > k:
        raise AnalysisError(
            f"rows q_start={q_start} .. {q_start + q - 1} fall past the {k} tokens; the query rows must be "
            "positions among the keys (self-attention), so q_start + q <= k."
        )
    return ids, ids[q_start : q_start + q], key_offsets(q, k, q_start)
