"""Attention maps: one head's ``[q, k]`` heatmap, the long-sequence overview, attention rollout.

Every map uses the shared attention scale (:func:`~._common.attention_norm`, a square-root power
law by default, and :func:`~._common.attention_cmap`): masked cells are NaN and drawn in
:data:`~._common.MASKED_COLOR`, never as 0. Past ``max_cells`` rows or keys a map is max-pooled
(a sharp head stays visible) and its axes give positions; the title says so.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from attnhooks.viewer._common import (
    ViewError,
    as_numpy,
    attention_cmap,
    attention_norm,
    label_tokens,
    new_axes,
    pool,
    pool_blocks,
)

__all__ = ["heatmap", "overview", "rollout_view"]

Float = npt.NDArray[np.float64]


def heatmap(
    attn: Any,
    *,
    tokens: Sequence[str] | None = None,
    key_tokens: Sequence[str] | None = None,
    mask: Any = None,
    row_start: int = 0,
    col_start: int = 0,
    ax: Axes | None = None,
    title: str | None = None,
    gamma: float = 0.5,
    vmax: float | None = None,
    max_cells: int = 256,
    colorbar: bool = True,
    cell: tuple[int, int] = (1, 1),
) -> Axes:
    """One head's attention as an image: queries as rows, keys as columns.

    Args:
        attn: ``[q, k]`` weights of one head (numpy, torch or dask); a window of a longer
            matrix is fine, see ``row_start`` / ``col_start``.
        tokens: strings of the whole sequence; row ``i`` is position ``row_start + i``. Shown
            as tick labels when at most 64 cells are on the axis, else ticks give positions.
        key_tokens: strings of the keys (default ``tokens``); column ``j`` is ``col_start + j``.
        mask: optional bool ``[q, k]``, True where the row may see the key; the others are
            drawn in ``MASKED_COLOR``.
        row_start, col_start: positions of the first row and key (ticks show true positions).
        ax: where to draw (default: a new figure).
        title: panel title; a note on pooling is added when the map is pooled.
        gamma: power of the colour scale (0.5: square root, small weights stay visible; 1: linear).
        vmax: top of the colour scale (default: the largest weight shown).
        max_cells: past this many rows or keys the map is max-pooled into blocks. The default is
            about the pixels of the default axes: a map with more cells than pixels loses
            rows and columns (a sink column, the diagonal) when drawn. Raise it with a bigger
            figure or dpi.
        colorbar: add a colour bar beside the axes.
        cell: ``(rows, keys)`` that each cell of ``attn`` already covers, when it was pooled
            before (e.g. while read from a store): ticks and the title then count positions.

    Returns:
        The Axes (one panel); ``ax.images[0].get_array()`` holds the (pooled, masked) cells.

    Example:
        >>> import numpy as np
        >>> ax = heatmap(np.eye(4), tokens=["a", "b", "c", "d"], mask=np.tri(4, dtype=bool))
        >>> bool(ax.images[0].get_array().mask[0, 3]), ax.get_xticklabels()[1].get_text()
        (True, 'b')
    """
    data = apply_mask(matrix(attn, "attn"), mask)
    starts = _nonnegative(row_start, "row_start"), _nonnegative(col_start, "col_start")
    fig, ax = new_axes(ax)
    norm = attention_norm(vmax, gamma=gamma, values=data)
    image = draw_map(
        ax, data, norm=norm, cmap=attention_cmap(), tokens=tokens, key_tokens=key_tokens, starts=starts,
        max_cells=max_cells, title=title, cell=cell,
    )  # fmt: skip
    if colorbar:
        fig.colorbar(image, ax=ax, label=scale_label(gamma))
    return ax


def overview(
    pooled: Any,
    *,
    received: Any = None,
    band: Any = None,
    bins: Any = (1, 1),
    q_start: int = 0,
    title: str | None = None,
    gamma: float = 0.5,
    max_cells: int = 256,
    log_received: bool = False,
) -> Figure:
    """The long-sequence overview: a pooled map, the attention each key receives, the diagonal band.

    Made for what ``Store.summary`` holds, and for a full matrix too (pooled here past
    ``max_cells``). Inputs with a heads axis are averaged over the heads (the title says so).

    Args:
        pooled: ``[P_q, P_k]`` or ``[heads, P_q, P_k]``: ``summary["pooled_max"]`` (or
            ``"pooled_mean"``), or a whole ``[q, k]`` matrix with ``bins=(1, 1)``.
        received: optional ``[k]`` or ``[heads, k]`` attention received per key (column sums),
            drawn under the map on the same key axis.
        band: optional ``[q, W]`` or ``[heads, q, W]``: ``band[i, w]`` is the weight row ``i``
            puts on key ``q_start + i - w`` (column 0: its own position, as
            :mod:`attnhooks.reduce` stores it). Drawn beside the map, rows by offset; cells whose
            key would be before position 0 are masked.
        bins: ``(rows per bin, keys per bin)``, or ``summary["pooled_bins"]`` (4 values).
        q_start: position of row 0 among the keys (``store.call_reader(module).query_start()``).
        title: figure title (a note on bins and heads is added).
        gamma: power of the colour scale, shared by the map and the band.
        max_cells: the map and the band's rows are max-pooled further past this many cells
            (about the pixels of the panel: more would drop rows when drawn).
        log_received: logarithmic y axis for ``received``.

    Returns:
        The Figure (one to three panels; the map is ``fig.axes[0]``, with axes in positions).

    Example:
        >>> import numpy as np
        >>> attn = np.eye(2000)
        >>> fig = overview(attn, received=attn.sum(0), max_cells=100)
        >>> fig.axes[0].images[0].get_array().shape
        (100, 100)
    """
    grid, heads = _head_mean(pooled, "pooled", "[P_q, P_k] or [heads, P_q, P_k]", 2)
    rb, cb = _bins(bins)
    grid, extra = pool(grid, max_cells, "max")
    rb, cb = rb * extra[0], cb * extra[1]
    start = _nonnegative(q_start, "q_start")
    lines = _head_mean(received, "received", "[k] or [heads, k]", 1)[0] if received is not None else None
    diag = _band(band, start, (grid.shape[0], rb), max_cells) if band is not None else None
    if lines is not None and -(-lines.size // cb) != grid.shape[1]:
        raise ViewError(
            f"received has {lines.size} keys but the map has {grid.shape[1]} columns of {cb} keys; "
            "pass bins=summary['pooled_bins'] with a pooled map"
        )
    fig, panels = _overview_axes(lines is not None, diag is not None)
    norm = attention_norm(gamma=gamma, values=grid if diag is None else np.concatenate([grid.ravel(), diag[0].ravel()]))
    extent = (0.0, grid.shape[1] * cb, start + grid.shape[0] * rb, float(start))
    image = show(panels["map"], grid, norm, attention_cmap(), aspect="auto", extent=extent)
    panels["map"].set(ylabel="query position", xlabel="" if lines is not None else "key position")
    fig.colorbar(image, ax=[panels["map"], *([panels["band"]] if "band" in panels else [])], label=scale_label(gamma))
    if lines is not None:
        _received_panel(panels["received"], lines, cb, log_received)
    if diag is not None:
        _band_panel(panels["band"], diag[0], diag[1], start, norm)
    notes = [f"{rb}×{cb} positions per cell" if (rb, cb) != (1, 1) else "", f"mean over {heads} heads" if heads else ""]
    fig.suptitle("\n".join(filter(None, [title or "attention overview", ", ".join(filter(None, notes))])))
    return fig


def rollout_view(
    rolled: Any,
    *,
    tokens: Sequence[str] | None = None,
    query: int = 0,
    title: str | None = None,
    gamma: float = 0.5,
    max_cells: int = 256,
) -> Figure:
    """Attention rollout: the ``[n, n]`` matrix, and beside it what one output token draws on.

    The matrix uses the attention scale (square root by default): the residual term makes
    rollout strongly diagonal, and a linear scale would leave the flow between tokens dark. The
    bar chart is linear, so its heights read as shares of the row.

    Args:
        rolled: ``[n, n]`` from :func:`attnhooks.analysis.rollout`.
        tokens: the ``n`` token strings (labels when ``n <= 64``).
        query: the row shown as bars (default 0, the ``[CLS]`` token; negative counts from the end).
        title: figure title.
        gamma: power of the matrix's colour scale.
        max_cells: the matrix is max-pooled past this many cells per axis (the bars never are).

    Returns:
        The Figure: ``fig.axes[0]`` the matrix (the row is outlined), ``fig.axes[1]`` the bars
        (one ``Rectangle`` per token in ``patches``; past 128 tokens one ``StepPatch``).

    Example:
        >>> import numpy as np
        >>> fig = rollout_view(np.full((3, 3), 1 / 3), tokens=["[CLS]", "hi", "[SEP]"])
        >>> [float(round(bar.get_height(), 2)) for bar in fig.axes[1].patches]
        [0.33, 0.33, 0.33]
    """
    data = matrix(rolled, "rolled")
    n = data.shape[0]
    if data.shape[1] != n:
        raise ViewError(f"rolled has shape {data.shape}; expected a square [n, n] rollout (analysis.rollout)")
    row = _row_index(query, n)
    fig = Figure(figsize=(12.0, 5.0), layout="constrained")
    map_ax, bar_ax = fig.subplots(1, 2, width_ratios=[1.0, 1.2])
    heatmap(data, tokens=tokens, ax=map_ax, gamma=gamma, max_cells=max_cells, title="rollout")
    block = max(1, -(-n // max_cells))
    pooled_cols = -(-n // block)
    map_ax.add_patch(Rectangle((-0.5, row // block - 0.5), pooled_cols, 1, fill=False, edgecolor="cyan", lw=1.5))
    if n <= 128:  # past that, bars would be thinner than a pixel
        bar_ax.bar(np.arange(n), data[row], width=0.8, color="tab:orange")
    else:
        bar_ax.stairs(data[row], np.arange(n + 1) - 0.5, fill=True, color="tab:orange")
    bar_ax.set_xlim(-0.5, n - 0.5)
    bar_ax.set_ylim(bottom=0.0)
    label_tokens(bar_ax, "x", tokens, n)
    name = f" {tokens[row]!r}" if tokens is not None and row < len(tokens) else ""
    bar_ax.set(title=f"what row {row}{name} draws on", ylabel="share of the row", xlabel="input token")
    if title:
        fig.suptitle(title)
    return fig


# -- shared with grids.py ---------------------------------------------------------------------------


def draw_map(
    ax: Axes,
    data: Float,
    *,
    norm: Normalize,
    cmap: Colormap,
    tokens: Sequence[str] | None,
    key_tokens: Sequence[str] | None = None,
    starts: tuple[int, int] = (0, 0),
    max_cells: int = 256,
    title: str | None = None,
    signed: bool = False,
    cell: tuple[int, int] = (1, 1),
) -> AxesImage:
    """Draw ``data [q, k]`` (NaN = masked) on ``ax``, pooled past ``max_cells``, ticks in positions.

    ``signed`` pools by the largest magnitude with its sign (differences) instead of the max.
    ``cell`` is the (rows, keys) each cell of ``data`` already covers, when the caller pooled it.
    """
    size = _nonnegative(max_cells, "max_cells") or 1
    cells, pooled = pool_signed(data, size) if signed else pool(data, size, "max")
    block = (pooled[0] * cell[0], pooled[1] * cell[1])
    image = show(ax, cells, norm, cmap, aspect=_aspect(cells.shape))
    label_tokens(ax, "y", tokens, cells.shape[0], start=starts[0], step=block[0])
    label_tokens(ax, "x", tokens if key_tokens is None else key_tokens, cells.shape[1], start=starts[1], step=block[1])
    ax.set(ylabel="query", xlabel="key")
    note = f"{'largest |value|' if signed else 'max'} over {block[0]}×{block[1]} blocks" if block != (1, 1) else ""
    ax.set_title("\n".join(filter(None, [title, note])))
    return image


def show(
    ax: Axes,
    cells: Float,
    norm: Normalize,
    cmap: Colormap,
    *,
    aspect: Literal["equal", "auto"] = "equal",
    extent: tuple[float, float, float, float] | None = None,
) -> AxesImage:
    """``ax.imshow`` of attention cells, each cell one flat colour (no smoothing across cells).

    Smoothing would blend a one-cell diagonal into the masked cells beside it; the price is that
    a map with more cells than pixels drops rows when drawn, which is why maps are pooled to
    about the pixels of their axes (``max_cells``) first.
    """
    return ax.imshow(cells, cmap=cmap, norm=norm, interpolation="nearest", aspect=aspect, extent=extent)


def pool_signed(data: Float, size: int) -> tuple[Float, tuple[int, int]]:
    """Pool to at most ``size`` cells per axis keeping each block's value of largest magnitude."""
    high, block = pool(data, size, "max")
    low = -pool(-data, size, "max")[0]
    return np.where(np.isnan(low) | (np.abs(high) >= np.abs(low)), high, low), block


def matrix(values: Any, name: str) -> Float:
    """``values`` as a float64 ``[q, k]`` matrix, or a ViewError that says how to get one."""
    out = as_numpy(values, name=name)
    if out.ndim != 2:
        hint = f"pick one head, e.g. {name}[0]" if out.ndim > 2 else f"give a 2D array, e.g. {name}[None]"
        raise ViewError(f"{name} has shape {out.shape}; expected one head [q, k]: {hint}")
    return out


def apply_mask(data: Float, mask: Any) -> Float:
    """``data`` with NaN where the bool ``mask`` (same shape, True = visible) is False."""
    if mask is None:
        return data
    visible = as_numpy(mask, name="mask") != 0
    if visible.shape != data.shape:
        raise ViewError(f"mask has shape {visible.shape} but the attention is {data.shape}; give a [q, k] bool mask")
    return np.where(visible, data, np.nan)


def scale_label(gamma: float) -> str:
    """The colour bar's label for a power scale."""
    return "attention weight" + ("" if gamma == 1 else f" (power {gamma:g} scale)")


# -- private -------------------------------------------------------------------------------------------


def _aspect(shape: tuple[int, ...]) -> Literal["equal", "auto"]:
    """Square cells unless the map is a thin strip (a window of a few rows over many keys)."""
    return "equal" if max(shape) <= 4 * min(shape) else "auto"


def _nonnegative(value: Any, name: str) -> int:
    try:
        number = operator.index(value)
    except TypeError as err:
        raise ViewError(f"{name}={value!r}: expected an int >= 0") from err
    if number < 0 or isinstance(value, bool):
        raise ViewError(f"{name}={value!r}: expected an int >= 0")
    return number


def _row_index(query: Any, n: int) -> int:
    try:
        row = operator.index(query)
    except TypeError as err:
        raise ViewError(f"query={query!r}: expected a row index (int)") from err
    if not -n <= row < n:
        raise ViewError(f"query={row} is outside the {n} rows; use 0..{n - 1} or a negative index")
    return row % n


def _head_mean(values: Any, name: str, layout: str, ndim: int) -> tuple[Float, int]:
    """``values`` with ``ndim`` axes, or averaged over a leading heads axis (and how many heads)."""
    out = as_numpy(values, name=name)
    if out.ndim == ndim:
        return out, 0
    if out.ndim == ndim + 1:
        return out.mean(axis=0), out.shape[0]
    raise ViewError(f"{name} has shape {out.shape}; expected {layout} (index a sample out first)")


def _bins(bins: Any) -> tuple[int, int]:
    values = np.asarray(as_numpy(bins, name="bins")).ravel()
    if values.size not in (2, 4) or np.any(values < 1) or np.any(values != values.round()):
        raise ViewError(f"bins={bins!r}: expected (rows per bin, keys per bin) or summary['pooled_bins'] of one sample")
    return int(values[0]), int(values[1])


def _band(band: Any, q_start: int, map_rows: tuple[int, int], max_cells: int) -> tuple[Float, int]:
    """The band ``[q, W]`` (head mean), keys before position 0 masked, rows max-pooled; its row block.

    ``map_rows`` is ``(rows of the map, positions per row)``: the band must cover the same queries.
    """
    values = _head_mean(band, "band", "[q, W] or [heads, q, W]", 2)[0]
    q_len, width = values.shape
    if -(-q_len // map_rows[1]) != map_rows[0]:
        raise ViewError(
            f"band has {q_len} rows but the map has {map_rows[0]} rows of {map_rows[1]} queries; "
            "pass bins=summary['pooled_bins'] with a pooled map"
        )
    before_start = q_start + np.arange(q_len)[:, None] - np.arange(width)[None, :] < 0
    values = np.where(before_start, np.nan, values)
    pooled, block = pool(values, (max(max_cells, 1), width), "max")
    return pooled, block[0]


def _overview_axes(received: bool, band: bool) -> tuple[Figure, dict[str, Axes]]:
    fig = Figure(figsize=(9.0 if band else 7.0, 7.5 if received else 6.0), layout="constrained")
    spec = fig.add_gridspec(
        2 if received else 1,
        2 if band else 1,
        height_ratios=[4.0, 1.2] if received else None,
        width_ratios=[4.0, 1.3] if band else None,
    )
    panels = {"map": fig.add_subplot(spec[0, 0])}
    if received:
        panels["received"] = fig.add_subplot(spec[1, 0], sharex=panels["map"])
        panels["map"].tick_params(labelbottom=False)
    if band:
        panels["band"] = fig.add_subplot(spec[0, 1], sharey=panels["map"])
    return fig, panels


def _received_panel(ax: Axes, received: Float, keys_per_bin: int, log: bool) -> None:
    """Attention received per key, max-pooled into the map's key bins (a sink spike stays visible)."""
    values = pool_blocks(received[None], (1, keys_per_bin), "max")[0]
    edges = np.minimum(np.arange(values.size + 1) * keys_per_bin, received.size)
    ax.stairs(values, edges, fill=not log, baseline=None if log else 0.0, color="tab:purple")
    note = f" (max per {keys_per_bin} keys)" if keys_per_bin > 1 else ""
    ax.set(xlabel="key position", ylabel="received" + note)
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0.0)


def _band_panel(ax: Axes, band: Float, block: int, q_start: int, norm: Normalize) -> None:
    extent = (-0.5, band.shape[1] - 0.5, q_start + band.shape[0] * block, float(q_start))
    show(ax, band, norm, attention_cmap(), aspect="auto", extent=extent)
    ax.set(xlabel="keys back (0 = itself)", title="diagonal band")
    ax.tick_params(labelleft=False)
