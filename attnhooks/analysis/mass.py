"""Where each attention row puts its mass: distance, sinks, fixed offsets, token classes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import overload

import numpy as np
import numpy.typing as npt

from attnhooks.analysis._common import AnalysisError, Array, as_float, check_attn, check_int, key_offsets

__all__ = [
    "attention_distance",
    "next_mass",
    "offset_mass",
    "previous_mass",
    "self_mass",
    "sink_mass",
    "token_class_mass",
]


def attention_distance(attn: Array, *, q_start: int = 0) -> Array:
    """Mean distance ``|i - j|`` from each query to the keys it attends, weighted by attention.

    Args:
        attn: ``[..., heads, q, k]`` attention probabilities (numpy or dask).
        q_start: position of row 0 among the keys (query row ``r`` is at ``q_start + r``).

    Returns:
        ``[..., heads, q]`` float64: ``sum_j attn[..., r, j] * |q_start + r - j|`` (rows sum to 1,
        so this is the mean; an all-zero row gives 0).

    Example:
        >>> import numpy as np
        >>> previous = np.array([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        >>> attention_distance(previous)
        array([[0., 1., 1.]])
    """
    check_attn(attn)
    q, k = attn.shape[-2:]
    distance = np.abs(key_offsets(q, k, check_int(q_start, "q_start"))).astype(np.float32)
    return (as_float(attn) * distance).sum(axis=-1, dtype=np.float64)


def sink_mass(attn: Array, first: int = 1) -> Array:
    """Mass each row puts on the first ``first`` keys (attention sinks: BOS, ``[CLS]``).

    Args:
        attn: ``[..., heads, q, k]`` attention probabilities (numpy or dask).
        first: how many leading keys count as sinks (positions ``0 .. first-1``).

    Returns:
        ``[..., heads, q]`` float64.

    Example:
        >>> import numpy as np
        >>> sink_mass(np.array([[[0.5, 0.25, 0.25], [0.9, 0.1, 0.0]]]), first=1)
        array([[0.5, 0.9]])
    """
    check_attn(attn)
    first = check_int(first, "first", minimum=0)
    return attn[..., :first].sum(axis=-1, dtype=np.float64)


def offset_mass(attn: Array, offset: int, *, q_start: int = 0) -> Array:
    """Mass each row puts on the key at a fixed offset from the query: key ``i + offset``.

    Reads one diagonal of each head (no ``[q, k]`` temporary).

    Args:
        attn: ``[..., heads, q, k]`` attention probabilities (numpy or dask).
        offset: 0 for the query's own position, -1 for the previous token, +1 for the next.
        q_start: position of row 0 among the keys (query row ``r`` is at ``q_start + r``).

    Returns:
        ``[..., heads, q]`` float64; 0 in rows where key ``i + offset`` is outside ``0 .. k-1``.

    Example:
        >>> import numpy as np
        >>> attn = np.array([[[1.0, 0.0, 0.0], [0.75, 0.25, 0.0], [0.0, 0.5, 0.5]]])
        >>> offset_mass(attn, -1)
        array([[0.  , 0.75, 0.5 ]])
    """
    check_attn(attn)
    q, k = attn.shape[-2:]
    diagonal = check_int(q_start, "q_start") + check_int(offset, "offset")
    first, stop = max(0, -diagonal), min(q, k - diagonal)
    if stop <= first:
        return attn[..., :0].sum(axis=-1, dtype=np.float64)
    values = np.diagonal(attn, offset=diagonal, axis1=-2, axis2=-1).astype(np.float64)
    padding = ((0, 0),) * (values.ndim - 1) + ((first, q - stop),)
    return np.pad(values, padding)


def self_mass(attn: Array, *, q_start: int = 0) -> Array:
    """Mass each row puts on its own position: :func:`offset_mass` with offset 0.

    Example:
        >>> import numpy as np
        >>> self_mass(np.array([[[1.0, 0.0], [0.5, 0.5]]]))
        array([[1. , 0.5]])
    """
    return offset_mass(attn, 0, q_start=q_start)


def previous_mass(attn: Array, *, q_start: int = 0) -> Array:
    """Mass each row puts on the previous position: :func:`offset_mass` with offset -1.

    Example:
        >>> import numpy as np
        >>> previous_mass(np.array([[[1.0, 0.0], [1.0, 0.0]]]))
        array([[0., 1.]])
    """
    return offset_mass(attn, -1, q_start=q_start)


def next_mass(attn: Array, *, q_start: int = 0) -> Array:
    """Mass each row puts on the next position: :func:`offset_mass` with offset +1.

    Example:
        >>> import numpy as np
        >>> next_mass(np.array([[[0.0, 1.0], [1.0, 0.0]]]))
        array([[1., 0.]])
    """
    return offset_mass(attn, 1, q_start=q_start)


@overload
def token_class_mass(attn: Array, classes: Mapping[str, npt.ArrayLike]) -> dict[str, Array]: ...


@overload
def token_class_mass(attn: Array, classes: npt.ArrayLike) -> Array: ...


def token_class_mass(attn: Array, classes: npt.ArrayLike | Mapping[str, npt.ArrayLike]) -> Array:
    """Mass each row puts on a class of keys (special tokens, punctuation, a word's pieces).

    Args:
        attn: ``[..., heads, q, k]`` attention probabilities (numpy or dask).
        classes: bool ``[k]`` marking the keys of the class (e.g. :func:`special_tokens`), or a
            mapping name → bool ``[k]``.

    Returns:
        ``[..., heads, q]`` float64, or a dict name → that array when ``classes`` is a mapping.

    Example:
        >>> import numpy as np
        >>> attn = np.array([[[0.5, 0.3, 0.2]]])
        >>> token_class_mass(attn, np.array([True, False, True]))
        array([[0.7]])
        >>> token_class_mass(attn, {"first": [True, False, False]})["first"]
        array([[0.5]])
    """
    check_attn(attn)
    if isinstance(classes, Mapping):
        return {str(name): _class_mass(attn, mask, f"classes[{name!r}]") for name, mask in classes.items()}
    return _class_mass(attn, classes, "classes")


def _class_mass(attn: Array, mask: npt.ArrayLike, name: str) -> Array:
    keys = np.asarray(mask)
    k = attn.shape[-1]
    if keys.dtype != np.bool_ or keys.shape != (k,):
        raise AnalysisError(
            f"{name} must be a bool array [k] with k={k} (one flag per key); got {keys.dtype} shaped {keys.shape}. "
            "Build one with special_tokens(tokens) or punctuation(tokens)."
        )
    return attn[..., np.flatnonzero(keys)].sum(axis=-1, dtype=np.float64)
