"""What every view shares: figures without pyplot, the colour scales, token labels, pooling.

Figures are :class:`matplotlib.figure.Figure` objects made without ``pyplot``: nothing is kept in
a global figure manager, nothing needs a display, and ``fig.savefig("x.png")`` works on any backend
(a Figure is also shown inline by Jupyter when it is the cell's value).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize, PowerNorm, TwoSlopeNorm
from matplotlib.figure import Figure

from attnhooks.errors import ViewError

__all__ = [
    "ATTENTION_CMAP",
    "DIVERGING_CMAP",
    "DIVERGING_MASKED_COLOR",
    "MASKED_COLOR",
    "ViewError",
    "as_numpy",
    "attention_cmap",
    "attention_norm",
    "diverging_cmap",
    "diverging_norm",
    "label_fontsize",
    "label_tokens",
    "new_axes",
    "new_grid",
    "pool",
    "pool_blocks",
    "short_label",
]

ATTENTION_CMAP = "magma"  # perceptually uniform, dark = 0, so small weights stay distinguishable
DIVERGING_CMAP = "RdBu_r"  # blue = negative, white = 0, red = positive
MASKED_COLOR = "#bfd3e6"  # light steel blue: outside the colour map, so "masked" never reads as "0"
DIVERGING_MASKED_COLOR = "#8c8c8c"  # mid grey: outside RdBu_r (whose middle is near-white, its ends blue/red)
MAX_TOKEN_LABELS = 64  # past this many tokens an axis shows positions instead of strings


def as_numpy(values: Any, *, name: str = "values", ndim: int | None = None) -> npt.NDArray[np.float64]:
    """``values`` (numpy, torch, dask, lists) as a float64 numpy array, checked for ``ndim``."""
    if hasattr(values, "detach"):  # torch, without importing it
        values = values.detach().float().cpu().numpy()
    if hasattr(values, "compute") and not isinstance(values, np.ndarray):  # dask / xarray
        values = values.compute()
    out = np.asarray(values, dtype=np.float64)
    if ndim is not None and out.ndim != ndim:
        raise ViewError(f"{name} has shape {out.shape}; expected {ndim} dimensions")
    if out.size == 0:
        raise ViewError(f"{name} is empty (shape {out.shape}): select at least one row and one key")
    return out


def new_axes(ax: Axes | None, figsize: tuple[float, float] = (6.0, 5.0)) -> tuple[Figure, Axes]:
    """``ax`` and its figure, or a new figure with one axes when ``ax`` is None."""
    if ax is not None:
        fig = ax.get_figure()
        assert isinstance(fig, Figure)  # an Axes always belongs to a Figure; SubFigure has .figure
        return fig, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def new_grid(
    rows: int, cols: int, *, cell: float = 1.6, extra: tuple[float, float] = (1.2, 0.8)
) -> tuple[Figure, np.ndarray]:
    """A new figure with a ``rows x cols`` grid of axes (a 2D numpy array of Axes), ``cell`` inches each."""
    fig = Figure(figsize=(cols * cell + extra[0], rows * cell + extra[1]), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def attention_cmap() -> Colormap:
    """The attention colour map, with masked cells (NaN or masked arrays) in :data:`MASKED_COLOR`."""
    return colormaps[ATTENTION_CMAP].with_extremes(bad=MASKED_COLOR)


def diverging_cmap() -> Colormap:
    """The diverging colour map (differences, q⊙k), masked cells in :data:`DIVERGING_MASKED_COLOR`
    (the attention map's light blue would read as a small negative value here)."""
    return colormaps[DIVERGING_CMAP].with_extremes(bad=DIVERGING_MASKED_COLOR)


def attention_norm(vmax: float | None = None, *, gamma: float = 0.5, values: Any = None) -> Normalize:
    """A power-law norm from 0 to ``vmax`` (default: the largest finite value of ``values``, or 1).

    ``gamma=0.5`` is a square-root scale: a weight of 0.01 lands at a tenth of the colour range
    instead of a hundredth, so the diffuse heads of long sequences stay visible. ``gamma=1`` is linear.
    """
    if vmax is None:
        finite = np.asarray(values, dtype=np.float64) if values is not None else np.ones(1)
        finite = finite[np.isfinite(finite)]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return PowerNorm(gamma, vmin=0.0, vmax=vmax)


def diverging_norm(values: Any, vmax: float | None = None) -> Normalize:
    """A norm centred on 0 and symmetric: ``[-vmax, vmax]``, ``vmax`` the largest ``|value|``."""
    if vmax is None:
        finite = np.abs(np.asarray(values, dtype=np.float64))
        finite = finite[np.isfinite(finite)]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return TwoSlopeNorm(0.0, vmin=-vmax, vmax=vmax)


def label_tokens(
    ax: Axes,
    axis: str,
    tokens: Sequence[str] | None,
    n: int,
    *,
    start: int = 0,
    step: int = 1,
    max_labels: int = MAX_TOKEN_LABELS,
) -> None:
    """Tick labels for ``n`` cells of ``axis`` ("x" or "y") that begin at position ``start``.

    With ``tokens`` (the whole sequence's strings) and at most ``max_labels`` cells, each cell gets
    its token; otherwise about 8 ticks give positions. ``step`` is the number of positions per cell
    (pooled maps), in which case positions label the cells' first position.
    """
    setter = ax.set_xticks if axis == "x" else ax.set_yticks
    if tokens is not None and step == 1 and n <= max_labels and start + n <= len(tokens):
        labels = [short_label(t) for t in tokens[start : start + n]]
        setter(np.arange(n), labels, rotation=90 if axis == "x" else 0, fontsize=label_fontsize(n))
        return
    ticks = np.unique(np.linspace(0, n - 1, num=min(n, 8)).round().astype(int))
    setter(ticks, [str(start + int(t) * step) for t in ticks])


def pool(
    values: npt.ArrayLike, size: int | tuple[int, int], how: str = "max"
) -> tuple[npt.NDArray[np.float64], tuple[int, int]]:
    """Pool the last two axes of ``values`` into blocks so that at most ``size`` cells remain per axis.

    Returns the pooled array and the block shape ``(rows per cell, keys per cell)``. NaN cells
    (masked) are ignored; a block of NaN only stays NaN. ``how`` is ``"max"`` (a sharp head stays
    visible in a long sequence) or ``"mean"`` (the block's share of the attention, per row).
    """
    a = np.asarray(values, dtype=np.float64)
    limits = (size, size) if isinstance(size, int) else size
    block = (max(1, -(-a.shape[-2] // int(limits[0]))), max(1, -(-a.shape[-1] // int(limits[1]))))
    return pool_blocks(a, block, how), block


def pool_blocks(values: npt.ArrayLike, block: tuple[int, int], how: str = "max") -> npt.NDArray[np.float64]:
    """Pool the last two axes of ``values`` over ``block = (rows, keys)`` cells (the last ones may be
    partial), ignoring NaN; see :func:`pool`."""
    a = np.asarray(values, dtype=np.float64)
    reducers: dict[str, Callable[..., Any]] = {"max": np.nanmax, "mean": np.nanmean}
    reducer = reducers.get(how)
    if reducer is None:
        raise ViewError(f"pool(how={how!r}): use 'max' or 'mean'")
    if tuple(block) == (1, 1):
        return a
    rows, cols = -(-a.shape[-2] // block[0]), -(-a.shape[-1] // block[1])
    padded = np.full((*a.shape[:-2], rows * block[0], cols * block[1]), np.nan)
    padded[..., : a.shape[-2], : a.shape[-1]] = a
    blocks = padded.reshape(*a.shape[:-2], rows, block[0], cols, block[1])
    with warnings.catch_warnings():  # a fully masked block is NaN on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        out: npt.NDArray[np.float64] = reducer(blocks, axis=(-3, -1))
    return out


def short_label(token: str, width: int = 12) -> str:
    token = str(token).replace("\n", "\\n")
    return token if len(token) <= width else token[: width - 1] + "…"


def label_fontsize(n: int) -> float:
    return float(np.clip(240 / max(n, 1), 5, 10))
