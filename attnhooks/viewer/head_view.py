"""Head view: a line from each query token to each key it attends, one colour per head (as BertViz).

Queries' tokens stand in a left column, keys' tokens in a right column; the line from query ``i``
to key ``j`` of head ``h`` has an opacity and a width that grow with ``attn[h, i, j]``. Unlike
BertViz the figure is a plain matplotlib Figure: it saves to PNG, PDF or SVG and needs no browser.
Past ``max_tokens`` lines stop being readable, so the view falls back to a heatmap.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from attnhooks.viewer._common import (
    ViewError,
    as_numpy,
    attention_cmap,
    attention_norm,
    label_fontsize,
    label_tokens,
    new_axes,
    new_grid,
    pool,
    short_label,
)

__all__ = ["head_colors", "head_edges", "head_view", "head_view_grid"]

MAX_WIDTH = 3.5  # points: the width of a line of weight 1
MAX_CELLS = 512  # the fallback heatmap is max-pooled to at most this many cells per axis

Float = npt.NDArray[np.float64]
Int = npt.NDArray[np.intp]


def head_view(
    attn: Any,
    tokens: Sequence[str] | None = None,
    *,
    heads: int | Sequence[int] | None = None,
    topk: int | None = None,
    min_weight: float = 0.01,
    max_tokens: int = 100,
    key_tokens: Sequence[str] | None = None,
    legend: bool = True,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Lines from query tokens (left) to key tokens (right), one colour per head; returns the Axes.

    Each drawn line is an edge ``(head, i, j)``; its opacity is ``sqrt(w)`` and its width
    ``MAX_WIDTH * w`` points for ``w = attn[h, i, j]`` (raw weights, so heads compare). Edges with
    ``w < min_weight`` are not drawn, and the title says so. Each head is one
    :class:`~matplotlib.collections.LineCollection` in ``ax.collections``, in ``heads`` order.

    Self-attention rows may be a window of the sequence: with ``q < k`` rows, row ``r`` is
    position ``k - q + r`` (the last ``q`` positions, as with a KV cache) and sits level with that
    key. Cross-attention (``key_tokens`` given) spreads each column over the same height.

    Past ``max_tokens`` queries or keys the lines are unreadable: the view draws instead a
    heatmap of the selected heads' mean (max-pooled to 512 cells per axis) and says so in the title.

    Args:
        attn: ``[heads, q, k]`` attention of one layer, or ``[q, k]`` for one head (numpy, torch,
            dask). NaN (masked) cells count as 0.
        tokens: the queries' tokens: ``q`` strings, or the whole sequence (``k`` strings) for
            self-attention. None labels positions.
        heads: a head index or a list of them; None draws every head.
        topk: keep only each row's ``topk`` largest edges per head (None keeps all).
        min_weight: edges lighter than this are not drawn (0 draws every nonzero edge).
        max_tokens: past this many queries or keys, draw the fallback heatmap.
        key_tokens: the keys' ``k`` tokens for cross-attention (default: ``tokens``).
        legend: draw a legend with one entry per head.
        ax: axes to draw in; None makes a new figure.
        title: the title's first line; the second says which edges are hidden.

    Returns:
        The Axes drawn in.

    Example:
        >>> import numpy as np
        >>> attn = np.eye(4, k=-1)[None]  # [heads=1, q=4, k=4]: previous-token head
        >>> attn[0, 0, 0] = 1.0
        >>> ax = head_view(attn, ["a", "b", "c", "d"])
        >>> [s[:, 1].tolist() for s in ax.collections[0].get_segments()][1]  # query b -> key a
        [1.0, 0.0]
    """
    lazy = _heads_first(attn)
    chosen = _select_heads(heads, lazy.shape[0])
    q, k = (int(s) for s in lazy.shape[-2:])
    rows, cols = _labels(tokens, key_tokens, q, k)
    if max(q, k) > max_tokens:
        return _fallback(lazy, chosen, rows, cols, max_tokens, ax, title)
    a = as_numpy(lazy, name="attn")
    if topk is not None and topk < 1:
        raise ViewError(f"head_view(topk={topk}): use a positive number of edges per row, or None for all")
    yq, yk = _rows_y(q, k, cross=key_tokens is not None)
    _, ax = new_axes(ax, figsize=(4.8, float(np.clip(0.2 * max(q, k) + 1.5, 3.0, 22.0))))
    colors = head_colors(len(chosen))
    for color, h in zip(colors, chosen):
        i, j, w = head_edges(a[h], topk=topk, min_weight=min_weight)
        segments = np.stack([np.stack([np.zeros_like(w), yq[i]], -1), np.stack([np.ones_like(w), yk[j]], -1)], 1)
        rgba = np.tile(color, (len(w), 1))
        rgba[:, 3] = np.sqrt(np.clip(w, 0.0, 1.0))
        lines = LineCollection(list(segments), colors=rgba, linewidths=MAX_WIDTH * w, capstyle="round")
        lines.set_label(f"head {h}")
        ax.add_collection(lines)
    _frame(ax, yq, yk, rows, cols)
    if legend:
        handles = [Line2D([], [], color=c, lw=2.5, label=f"head {h}") for c, h in zip(colors, chosen)]
        ax.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncols=min(len(chosen), 4),
            fontsize=8,
            frameon=False,
        )
    hidden = f"edges < {min_weight:g} hidden" + (f", top {topk} per row" if topk else "")
    ax.set_title(f"{title or 'heads ' + _ranges(chosen)}\n{hidden}", fontsize=10)
    return ax


def head_view_grid(
    layers: Any,
    tokens: Sequence[str] | None = None,
    *,
    layer_ids: Sequence[int] | None = None,
    cols: int = 4,
    **kwargs: Any,
) -> Figure:
    """One :func:`head_view` panel per layer, in a grid; returns the Figure.

    Args:
        layers: ``[layers, heads, q, k]`` attention of one sample, or a sequence of ``[heads, q, k]``.
        tokens: as in :func:`head_view`.
        layer_ids: which layers to draw (default: all), in panel order.
        cols: panels per row.
        **kwargs: passed to :func:`head_view` (``heads``, ``topk``, ``min_weight``, ...).

    Returns:
        The Figure; panel ``n`` is titled ``layer <layer_ids[n]>`` and only the first has a legend.

    Example:
        >>> import numpy as np
        >>> fig = head_view_grid(np.full((2, 3, 4, 4), 0.25))  # [layers=2, heads=3, q=4, k=4]
        >>> [ax.get_title().splitlines()[0] for ax in fig.axes]
        ['layer 0', 'layer 1']
    """
    count = len(layers)
    ids = list(range(count)) if layer_ids is None else [int(i) for i in layer_ids]
    if not ids or min(ids) < 0 or max(ids) >= count:
        raise ViewError(f"head_view_grid(layer_ids={layer_ids}): use layer indices in 0..{count - 1}")
    ncols = max(1, min(cols, len(ids)))
    nrows = -(-len(ids) // ncols)
    n = max(np.shape(layers[ids[0]])[-2:])
    height = float(np.clip(0.2 * min(n, kwargs.get("max_tokens", 100)) + 1.5, 3.0, 22.0))
    fig, axes = new_grid(nrows, ncols, cell=3.6, extra=(1.2, nrows * (height - 3.6) + 0.8))
    for panel, (ax, layer) in enumerate(zip(axes.flat, ids)):
        head_view(layers[layer], tokens, ax=ax, title=f"layer {layer}", legend=panel == 0, **kwargs)
    for ax in axes.flat[len(ids) :]:
        ax.set_axis_off()
    return fig


def head_edges(attn: Any, *, topk: int | None = None, min_weight: float = 0.0) -> tuple[Int, Int, Float]:
    """The edges of one head that :func:`head_view` draws: ``(rows, keys, weights)``, 1-D each.

    Args:
        attn: ``[q, k]`` attention of one head; NaN counts as 0.
        topk: keep only each row's ``topk`` largest weights (ties: the earliest keys).
        min_weight: drop weights below this; zero weights are never edges.

    Returns:
        Query rows, key indices and float64 weights, in row-major order.

    Example:
        >>> head_edges([[0.7, 0.3], [0.1, 0.9]], topk=1)
        (array([0, 1]), array([0, 1]), array([0.7, 0.9]))
    """
    a = np.nan_to_num(as_numpy(attn, name="attn", ndim=2), nan=0.0)
    keep = (a >= min_weight) & (a > 0)
    if topk is not None and topk < a.shape[1]:
        order = np.argsort(-a, axis=1, kind="stable")[:, :topk]
        top = np.zeros_like(keep)
        np.put_along_axis(top, order, True, axis=1)
        keep &= top
    i, j = np.nonzero(keep)
    return i.astype(np.intp), j.astype(np.intp), a[i, j]


def head_colors(n: int) -> Float:
    """``n`` distinct RGBA colours for heads: tab10 up to 10 heads, tab20 up to 20, then turbo."""
    if n > 20:
        return np.asarray(colormaps["turbo"](np.linspace(0.05, 0.95, n)), dtype=np.float64)
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return np.asarray(cmap(np.arange(n)), dtype=np.float64)


def _heads_first(attn: Any) -> Any:
    """``attn`` as ``[heads, q, k]``, still numpy, torch or dask (the fallback reads only its mean)."""
    a = attn if hasattr(attn, "shape") and hasattr(attn, "ndim") else np.asarray(attn, dtype=np.float64)
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise ViewError(
            f"head_view: attn has shape {a.shape}; expected [heads, q, k] (one layer) or [q, k] (one head): "
            "pick a layer (attn[layer]) or use head_view_grid for [layers, heads, q, k]"
        )
    return a


def _select_heads(heads: int | Sequence[int] | None, count: int) -> list[int]:
    if heads is None:
        chosen = list(range(count))
    elif isinstance(heads, (int, np.integer)):
        chosen = [int(heads)]
    else:
        chosen = [int(h) for h in heads]
    if not chosen or min(chosen) < 0 or max(chosen) >= count:
        raise ViewError(f"heads={heads} for attn with {count} heads: use head indices in 0..{count - 1}, or None")
    return chosen


def _labels(
    tokens: Sequence[str] | None, key_tokens: Sequence[str] | None, q: int, k: int
) -> tuple[tuple[Sequence[str] | None, int], Sequence[str] | None]:
    """``((row tokens, first row's index into them), key tokens)``, checked against ``q`` and ``k``."""
    if key_tokens is not None:
        if len(key_tokens) != k:
            raise ViewError(f"key_tokens has {len(key_tokens)} strings for {k} keys: pass one per key")
        if tokens is not None and len(tokens) != q:
            raise ViewError(f"tokens has {len(tokens)} strings for {q} query rows: pass one per row")
        return (tokens, 0), key_tokens
    if tokens is None:
        return (None, max(k - q, 0)), None
    if len(tokens) != k:
        raise ViewError(
            f"tokens has {len(tokens)} strings but the keys are {k} positions: pass the whole sequence's "
            "tokens for self-attention, or key_tokens for cross-attention"
        )
    if q > k:
        raise ViewError(f"self-attention with {q} rows > {k} keys: pass key_tokens for cross-attention")
    return (tokens, k - q), tokens


def _rows_y(q: int, k: int, *, cross: bool) -> tuple[Float, Float]:
    """Vertical positions of the query rows and of the keys (0 at the top)."""
    if not cross:
        return np.arange(q, dtype=np.float64) + max(k - q, 0), np.arange(k, dtype=np.float64)
    span = max(q, k) - 1
    return np.linspace(0, span, q), np.linspace(0, span, k)


def _frame(ax: Axes, yq: Float, yk: Float, rows: tuple[Sequence[str] | None, int], cols: Sequence[str] | None) -> None:
    """Token columns as tick labels (left: queries, right: keys), no spines, row 0 at the top."""
    row_tokens, start = rows
    left = [str(start + r) if row_tokens is None else short_label(row_tokens[start + r]) for r in range(len(yq))]
    right = [str(j) if cols is None else short_label(cols[j]) for j in range(len(yk))]
    size = label_fontsize(max(len(yq), len(yk)))
    ax.set_yticks(yq, left, fontsize=size)
    keys = ax.secondary_yaxis("right")
    keys.set_yticks(yk, right, fontsize=size)
    keys.tick_params(length=0)
    keys.spines["right"].set_visible(False)
    ax.set_xticks([0, 1], ["query", "key"])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(max(yq.max(), yk.max()) + 0.5, -0.5)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _fallback(
    attn: Any,
    chosen: list[int],
    rows: tuple[Sequence[str] | None, int],
    cols: Sequence[str] | None,
    max_tokens: int,
    ax: Axes | None,
    title: str | None,
) -> Axes:
    """A heatmap of the selected heads' mean, max-pooled to ``MAX_CELLS`` cells per axis.

    The mean is taken before converting to numpy, so a dask ``attn`` is read once, one ``[q, k]`` at a time.
    """
    with warnings.catch_warnings():  # a cell masked in every head stays NaN on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        selected = attn[chosen]
        if hasattr(selected, "detach"):  # torch: its own nanmean (numpy cannot read bfloat16)
            mean = as_numpy(selected.detach().float().nanmean(0), name="attn")
        else:
            mean = as_numpy(np.nanmean(selected, axis=0), name="attn")
    pooled, block = pool(mean, MAX_CELLS, "max")
    fig, ax = new_axes(ax)
    image = ax.imshow(
        np.ma.masked_invalid(pooled),
        cmap=attention_cmap(),
        norm=attention_norm(values=pooled),
        aspect="auto",
        interpolation="nearest",
    )
    row_tokens, start = rows
    label_tokens(ax, "y", row_tokens, pooled.shape[0], start=start, step=block[0])
    label_tokens(ax, "x", cols, pooled.shape[1], step=block[1])
    fig.colorbar(image, ax=ax, shrink=0.8)
    pooled_note = f", max-pooled {block[0]}×{block[1]}" if block != (1, 1) else ""
    note = f"{mean.shape[0]}×{mean.shape[1]} > max_tokens={max_tokens}: heatmap of the mean{pooled_note}"
    ax.set_title(f"{title or 'heads ' + _ranges(chosen)}\n{note}", fontsize=10)
    return ax


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
