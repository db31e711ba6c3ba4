"""Row entropy of attention, and how many keys each row could attend (its maximum entropy)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from attnhooks.analysis._common import AnalysisError, Array, as_float, check_attn, check_int, xlogx

__all__ = ["entropy", "valid_keys"]


def entropy(attn: Array, *, normalize: bool = False, n_keys: npt.ArrayLike | None = None) -> Array:
    """Entropy of each attention row, in nats (``0 · log 0 = 0``).

    Args:
        attn: ``[..., heads, q, k]`` attention probabilities (numpy or dask).
        normalize: divide by ``log(n_keys)``, the entropy of uniform attention over the keys the
            row could attend, so 1 means uniform and 0 means one key. Rows with ``n_keys <= 1``
            get 0.
        n_keys: int, or int array broadcastable to ``[..., heads, q]``: the number of keys each
            row could attend (see :func:`valid_keys`); default ``k``. For ``[batch, heads, q, k]``
            and ``valid_keys(..., key_valid=[batch, k])`` (shaped ``[batch, q]``), pass
            ``n_keys[:, None]``.

    Returns:
        ``[..., heads, q]`` float64, the same kind of array as ``attn``.

    Example:
        >>> import numpy as np
        >>> attn = np.array([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]])  # [heads=1, q=2, k=4]
        >>> entropy(attn).round(4)
        array([[1.3863, 0.    ]])
        >>> entropy(attn, normalize=True)
        array([[1., 0.]])
    """
    check_attn(attn)
    h = 0.0 - xlogx(as_float(attn)).sum(axis=-1, dtype=np.float64)
    if not normalize:
        return h
    n = np.asarray(attn.shape[-1] if n_keys is None else n_keys)
    if not np.issubdtype(n.dtype, np.integer):
        raise AnalysisError(f"n_keys must hold ints (key counts); got dtype {n.dtype}.")
    try:
        shape = np.broadcast_shapes(n.shape, h.shape)
    except ValueError:
        shape = None
    if shape != tuple(h.shape):
        raise AnalysisError(
            f"n_keys shaped {n.shape} does not broadcast to the rows {tuple(h.shape)} ([..., heads, q]); "
            "give one count per query row, e.g. valid_keys(q, k, ...), adding axes for heads (n_keys[:, None])."
        )
    log_n = np.log(np.maximum(n, 2).astype(np.float64))
    return np.where(n > 1, h / log_n, 0.0)


def valid_keys(
    q: int,
    k: int,
    *,
    causal: bool = False,
    q_start: int = 0,
    window: int | None = None,
    key_valid: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int64]:
    """Number of keys each query row may attend, counted without building a ``[q, k]`` mask.

    Query row ``r`` has position ``i = q_start + r``; keys have positions ``0 .. k-1``. Key ``j``
    counts when every given condition holds: ``j <= i`` (``causal``), ``i - j < window``
    (``window``; alone it does not hide later keys, combine it with ``causal`` for a sliding
    window), ``key_valid[..., j]`` (padding).

    Args:
        q: number of query rows.
        k: number of keys.
        causal: hide keys after the query's position.
        q_start: position of row 0 among the keys (``k - q`` for the last ``q`` rows of causal
            self-attention, as with a KV cache).
        window: sliding-window length (>= 1), or None.
        key_valid: bool ``[k]`` or ``[batch, k]``, False for padded keys.

    Returns:
        int64 ``[q]``, or ``[batch, q]`` when ``key_valid`` is ``[batch, k]``.

    Example:
        >>> valid_keys(4, 4, causal=True)
        array([1, 2, 3, 4])
        >>> valid_keys(2, 4, causal=True, q_start=2, window=2, key_valid=[True, True, True, False])
        array([2, 1])
    """
    q = check_int(q, "q", minimum=0)
    k = check_int(k, "k", minimum=0)
    q_start = check_int(q_start, "q_start")
    pos = q_start + np.arange(q, dtype=np.int64)
    stop = np.clip(pos + 1, 0, k) if causal else np.full(q, k, dtype=np.int64)
    start = np.zeros(q, dtype=np.int64)
    if window is not None:
        start = np.clip(pos - check_int(window, "window", minimum=1) + 1, 0, k)
    stop = np.maximum(stop, start)
    if key_valid is None:
        return stop - start
    valid = np.asarray(key_valid)
    if valid.dtype != np.bool_ or valid.ndim not in (1, 2) or valid.shape[-1] != k:
        raise AnalysisError(
            f"key_valid must be bool [k] or [batch, k] with k={k}; got {valid.dtype} shaped {valid.shape}."
        )
    counts = np.cumsum(valid, axis=-1, dtype=np.int64)
    before = np.concatenate([np.zeros((*valid.shape[:-1], 1), dtype=np.int64), counts], axis=-1)
    result: npt.NDArray[np.int64] = before[..., stop] - before[..., start]
    return result
