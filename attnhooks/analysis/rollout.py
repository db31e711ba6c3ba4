"""Attention rollout (Abnar & Zuidema, 2020): how much each token draws on each input token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from attnhooks.analysis._common import AnalysisError, Array, check_attn, check_int

__all__ = ["rollout"]

HeadFusion = Literal["mean", "max", "min"]
_FUSE: dict[str, Callable[..., Any]] = {"mean": np.mean, "max": np.max, "min": np.min}


def rollout(
    layers: Array | Sequence[Array],
    *,
    head_fusion: HeadFusion = "mean",
    residual: float = 0.5,
    start: int = 0,
) -> npt.NDArray[np.float64]:
    """Attention rollout: the product of the layers' head-fused, residual-mixed attention.

    For each layer ``l``: fuse the heads (``A = mean/max/min over heads``), add the residual
    stream ``Â_l = residual · I + (1 − residual) · A``, and re-normalise each row of ``Â_l`` to
    sum 1 (a row that sums to 0 stays 0). The result is ``Â_{L-1} · … · Â_start``: row ``i``
    says how much output token ``i`` of the last layer draws on each input token.

    Args:
        layers: ``[layers, heads, n, n]`` self-attention of one sample (numpy or dask), or a
            sequence of ``[heads, n, n]`` arrays in layer order. Each layer is read once.
        head_fusion: how to combine the heads of a layer: ``"mean"``, ``"max"`` or ``"min"``.
        residual: weight of the identity, in ``[0, 1]`` (0.5 in the paper; 0 is plain
            attention flow through the products of attention matrices).
        start: first layer in the product (``0 <= start <= layers``; ``start == layers`` gives
            the identity).

    Returns:
        ``[n, n]`` float64; each row sums to 1 when every layer's rows do.

    Example:
        >>> import numpy as np
        >>> uniform = np.full((2, 1, 3, 3), 1 / 3)  # [layers=2, heads=1, n=3, n=3]
        >>> rollout(uniform, residual=0.0).round(4)
        array([[0.3333, 0.3333, 0.3333],
               [0.3333, 0.3333, 0.3333],
               [0.3333, 0.3333, 0.3333]])
    """
    if head_fusion not in _FUSE:
        raise AnalysisError(f"head_fusion must be one of {sorted(_FUSE)}; got {head_fusion!r}.")
    if not 0.0 <= residual <= 1.0:
        raise AnalysisError(f"residual must be in [0, 1]; got {residual!r}.")
    if hasattr(layers, "ndim"):
        check_attn(layers, ndim=-4, name="layers", layout="[layers, heads, n, n]")
    stack = [layers[i] for i in range(len(layers))]
    start = check_int(start, "start", minimum=0)
    if start > len(stack):
        raise AnalysisError(f"start must be at most the number of layers ({len(stack)}); got {start}.")
    if not stack:
        raise AnalysisError("layers is empty; give at least one [heads, n, n] layer.")
    n = _check_layer(stack[0], 0).shape[-1]
    result = np.eye(n)
    for index in range(start, len(stack)):
        layer = _check_layer(stack[index], index)
        if layer.shape[-1] != n:
            raise AnalysisError(f"layer {index} is [heads, {layer.shape[-1]}, {layer.shape[-1]}]; layer 0 has n={n}.")
        fused = _FUSE[head_fusion](np.asarray(layer, dtype=np.float64), axis=0)
        mixed = residual * np.eye(n) + (1.0 - residual) * fused
        sums = mixed.sum(axis=-1, keepdims=True)
        mixed = np.divide(mixed, sums, out=np.zeros_like(mixed), where=sums > 0)
        result = mixed @ result
    return result


def _check_layer(layer: Array, index: int) -> Array:
    check_attn(layer, ndim=-3, name=f"layer {index}", layout="[heads, n, n]")
    if layer.shape[-1] != layer.shape[-2]:
        raise AnalysisError(f"layer {index} must be square self-attention [heads, n, n]; got {tuple(layer.shape)}.")
    return layer
