"""What the analysis modules share: the array type, the error they raise, argument checks.

Nothing here imports torch, a storage backend or a plotting library.
"""

from __future__ import annotations

import operator
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from attnhooks.errors import AnalysisError

__all__ = ["AnalysisError", "Array", "as_float", "check_attn", "check_int", "key_offsets", "xlogx"]

Array: TypeAlias = Any
"""An attention array: a ``numpy.ndarray``, or any array that numpy functions dispatch to through
``__array_function__`` (``dask.array.Array``). Per-row functions return the same kind they got."""


def check_attn(attn: Array, *, ndim: int = 2, name: str = "attn", layout: str = "[..., heads, q, k]") -> None:
    """Refuse what is not an array with at least (or, for a negative ``ndim``, exactly) |ndim| axes."""
    shape = getattr(attn, "shape", None)
    if shape is None or not hasattr(attn, "dtype"):
        raise AnalysisError(
            f"{name} must be an array shaped {layout}; got {type(attn).__name__}. "
            "Pass a numpy or dask array (torch: tensor.numpy())."
        )
    wrong = len(shape) != -ndim if ndim < 0 else len(shape) < ndim
    if wrong:
        need = f"exactly {-ndim}" if ndim < 0 else f"at least {ndim}"
        raise AnalysisError(f"{name} must be shaped {layout} ({need} axes); got shape {tuple(shape)}.")
    try:
        dtype = np.dtype(attn.dtype)
    except TypeError as err:
        raise AnalysisError(
            f"{name} must be a numpy or dask array; got {type(attn).__module__}.{type(attn).__name__} with dtype "
            f"{attn.dtype}. For a torch tensor pass tensor.float().numpy()."
        ) from err
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise AnalysisError(f"{name} must hold probabilities (a float dtype); got dtype {dtype}.")


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int, refusing bools, floats and values below ``minimum``."""
    if isinstance(value, bool):
        raise AnalysisError(f"{name} must be an int; got the bool {value!r}.")
    try:
        number = operator.index(value)
    except TypeError as err:
        raise AnalysisError(f"{name} must be an int; got {value!r} ({type(value).__name__}).") from err
    if minimum is not None and number < minimum:
        raise AnalysisError(f"{name} must be >= {minimum}; got {number}.")
    return number


def as_float(attn: Array) -> Array:
    """``attn`` itself when float32/float64, else converted to float32 (float16 logs are too coarse)."""
    if attn.dtype in (np.float32, np.float64):
        return attn
    return attn.astype(np.float32)


def xlogx(x: Array) -> Array:
    """Elementwise ``x * log(x)`` with ``0 * log(0) = 0``; same kind and dtype as ``x``."""
    return x * np.log(np.where(x > 0, x, 1))


def key_offsets(q: int, k: int, q_start: int) -> npt.NDArray[np.int64]:
    """``[q, k]`` int64: ``j - i`` for key position ``j`` and query position ``i = q_start + r``."""
    return np.arange(k, dtype=np.int64)[None, :] - (q_start + np.arange(q, dtype=np.int64))[:, None]
