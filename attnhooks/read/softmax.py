"""Softmax from scores and their row log-sum-exp, exactly as a kernel's output was (numpy).

``p[h, i, j] = exp(s[h, i, j] - lse[h, i])``. When a call's ``lse`` was not stored it is computed
from whole rows of scores that come one key block at a time (an online log-sum-exp), so a long row
is never held at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["logsumexp_blocks", "probabilities"]

_SUBNORMAL = np.float32(-87.0)  # exp of anything below is a float32 subnormal (or 0): numpy's slow path


def logsumexp_blocks(blocks: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Row log-sum-exp ``[h, r]`` float32 of scores given as key blocks ``[h, r, c]``.

    Args:
        blocks: the scores of consecutive key blocks (``-inf`` where a key may not be attended).
        shape: ``(h, r)``, the result's shape (also when there is no block).

    Returns:
        ``-inf`` for rows that see no key.

    Example:
        >>> s = np.log(np.array([[[1.0, 3.0]]], dtype=np.float32))
        >>> float(logsumexp_blocks([s[..., :1], s[..., 1:]], (1, 1))[0, 0]) == float(np.float32(np.log(4.0)))
        True
    """
    top = np.full(shape, -np.inf)
    total = np.zeros_like(top)
    for block in blocks:
        s = block.astype(np.float64)
        new_top = np.maximum(top, s.max(axis=-1))
        safe = np.where(np.isfinite(new_top), new_top, 0.0)
        total = total * np.exp(np.where(np.isfinite(top), top - safe, -np.inf)) + np.exp(s - safe[..., None]).sum(-1)
        top = new_top
    with np.errstate(divide="ignore"):
        return (np.log(total) + np.where(np.isfinite(top), top, 0.0)).astype(np.float32)


def probabilities(scores: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """``exp(scores - lse)`` float32 ``[h, r, c]``, computed in place in ``scores``.

    Args:
        scores: masked scores ``[h, r, c]`` float32 (``-inf`` where a key may not be attended).
        lse: the rows' log-sum-exp ``[h, r]``; not finite for rows that see no key (those give 0).

    Example:
        >>> probabilities(np.log(np.array([[[1.0, 3.0]]], dtype=np.float32)), np.log(np.array([[4.0]])))
        array([[[0.25, 0.75]]], dtype=float32)
    """
    p = scores
    with np.errstate(invalid="ignore"):
        p -= lse[:, :, None]
        # exp is ~12x slower where its result is subnormal (log p in -104..-87): those become 0
        np.copyto(p, np.float32(-np.inf), where=p < _SUBNORMAL)
        np.exp(p, out=p)
    p[~np.isfinite(lse)] = 0.0  # rows with no visible key
    np.nan_to_num(p, copy=False, nan=0.0)
    return p
