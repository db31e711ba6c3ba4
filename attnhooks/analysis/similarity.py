"""How alike two heads attend: Jensen–Shannon divergence between their rows, in nats."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from attnhooks.analysis._common import AnalysisError, Array, as_float, check_attn, check_int, xlogx

__all__ = ["head_similarity", "js_divergence"]


def js_divergence(p: Array, q: Array) -> Array:
    """Jensen–Shannon divergence between matching rows of two attention arrays, in nats.

    ``JS(P, Q) = H(M) - (H(P) + H(Q)) / 2`` with ``M = (P + Q) / 2``: symmetric, 0 for equal
    rows, ``log 2`` (≈ 0.693) for rows with disjoint support. Elementwise work in the input's
    float dtype, sums in float64; tiny negative rounding results are clipped to 0.

    Args:
        p, q: ``[..., k]`` probability rows of the same shape (numpy or dask).

    Returns:
        ``[...]`` float64.

    Example:
        >>> import numpy as np
        >>> js_divergence(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([[0.0, 1.0], [0.5, 0.5]])).round(4)
        array([0.6931, 0.    ])
    """
    check_attn(p, ndim=1, name="p", layout="[..., k]")
    check_attn(q, ndim=1, name="q", layout="[..., k]")
    if tuple(p.shape) != tuple(q.shape):
        raise AnalysisError(f"p and q must have the same shape; got {tuple(p.shape)} and {tuple(q.shape)}.")
    p, q = as_float(p), as_float(q)
    mixed = xlogx(0.5 * (p + q)).sum(axis=-1, dtype=np.float64)
    own = xlogx(p).sum(axis=-1, dtype=np.float64) + xlogx(q).sum(axis=-1, dtype=np.float64)
    return np.maximum(0.5 * own - mixed, 0.0)


def head_similarity(a: Array, b: Array | None = None, *, max_block_bytes: int = 1 << 26) -> npt.NDArray[np.float64]:
    """Jensen–Shannon divergence (nats) between every pair of heads, averaged over query rows.

    Leading axes are flattened in C order, so ``[layers, heads, q, k]`` gives
    ``n = layers * heads`` heads, layer-major. The pairs are computed for blocks of rows at a
    time: no ``[n, n, q, k]`` array is built, and the input is read once (a dask array is
    computed one block of rows at a time), whatever its size.

    Args:
        a: ``[..., q, k]`` attention of ``n`` heads (numpy or dask).
        b: optional ``[..., q, k]`` attention of ``m`` other heads with the same ``q, k``
            (e.g. the same layer on another input); default: ``a`` against itself.
        max_block_bytes: memory for one block of float64 rows of all heads (the peak is a small
            multiple of it).

    Returns:
        ``[n, m]`` float64 in ``[0, log 2]``: 0 for heads that attend alike. Without ``b`` the
        matrix is symmetric with an exactly zero diagonal.

    Cost: ``n (n - 1) / 2`` pairs of ``q · k`` elementwise logs (144 heads at 512 × 512 in
    float32: about 15 s on one CPU core).

    Example:
        >>> import numpy as np
        >>> heads = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
        >>> head_similarity(heads).round(4)  # heads 0 and 2 agree; head 1 attends elsewhere
        array([[0.    , 0.6931, 0.    ],
               [0.6931, 0.    , 0.6931],
               [0.    , 0.6931, 0.    ]])
    """
    check_attn(a, ndim=3, name="a", layout="[..., q, k] with at least one head axis")
    q, k = a.shape[-2:]
    left = a.reshape(-1, q, k)
    right = left
    if b is not None:
        check_attn(b, ndim=3, name="b", layout="[..., q, k] with at least one head axis")
        if tuple(b.shape[-2:]) != (q, k):
            raise AnalysisError(f"a and b must have the same [q, k]; got {(q, k)} and {tuple(b.shape[-2:])}.")
        right = b.reshape(-1, q, k)
    n, m = left.shape[0], right.shape[0]
    rows = max(1, check_int(max_block_bytes, "max_block_bytes", minimum=1) // (8 * max(k, 1) * max(n, m)))
    total = np.zeros((n, m))
    for start in range(0, q, rows):
        _add_block(total, left[:, start : start + rows], None if b is None else right[:, start : start + rows])
    if b is None:
        total += total.T
    result: npt.NDArray[np.float64] = total / max(q, 1)
    return result


def _add_block(total: npt.NDArray[np.float64], left: Array, right: Array | None) -> None:
    """Add the JS divergences of one block of rows (``[n, r, k]``, ``[m, r, k]``), summed over rows.

    Without ``right`` only the pairs above the diagonal are filled (the caller mirrors them).
    The pairwise work stays in the input's float dtype (float32 halves the time); every sum is
    float64. ``m · log(m + tiny)`` stands for ``xlogx(m)``: exact at 0, off by ~``tiny`` elsewhere.
    """
    p = as_float(np.asarray(left))
    q = p if right is None else as_float(np.asarray(right)).astype(p.dtype)
    p_neg_h = xlogx(p).sum(axis=-1, dtype=np.float64)  # [n, r]: minus the row entropies
    q_neg_h = p_neg_h if right is None else xlogx(q).sum(axis=-1, dtype=np.float64)
    mixed, logs = np.empty_like(q), np.empty_like(q)
    tiny = np.finfo(p.dtype).tiny
    for i in range(p.shape[0]):
        first = i + 1 if right is None else 0
        m, log_m = mixed[: q.shape[0] - first], logs[: q.shape[0] - first]
        np.add(p[i], q[first:], out=m)
        m *= 0.5
        np.log(np.add(m, tiny, out=log_m), out=log_m)
        log_m *= m
        js = 0.5 * (p_neg_h[i] + q_neg_h[first:]) - log_m.sum(axis=-1, dtype=np.float64)  # [m', r]
        total[i, first:] += np.maximum(js, 0.0).sum(axis=-1)
