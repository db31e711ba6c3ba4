"""Grids of heads: every layer × head at once, per-head metrics, and two runs compared.

``layers`` arguments are a ``[layers, heads, q, k]`` array or a sequence of ``[heads, q, k]``
arrays (layers may have different numbers of heads; missing cells stay empty / NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from attnhooks.analysis.similarity import js_divergence
from attnhooks.viewer._common import (
    DIVERGING_MASKED_COLOR,
    MASKED_COLOR,
    ViewError,
    as_numpy,
    attention_cmap,
    attention_norm,
    diverging_cmap,
    diverging_norm,
    label_tokens,
    new_axes,
    new_grid,
    pool,
)
from attnhooks.viewer.maps import apply_mask, draw_map, matrix, scale_label, show

if TYPE_CHECKING:
    from attnhooks.analysis.stored import HeadTable

__all__ = ["compare_view", "divergence_grid", "head_divergence", "metric_grid", "metric_grids", "model_view"]

Float = npt.NDArray[np.float64]
_ANNOTATE_CELLS = 256  # metric grids with at most this many cells (and <= 16 heads) get numbers


def model_view(
    layers: Any,
    *,
    tokens: Sequence[str] | None = None,
    layer_names: Sequence[str] | None = None,
    heads: Sequence[int] | None = None,
    gamma: float = 0.5,
    max_cells: int = 64,
    title: str | None = None,
) -> Figure:
    """Every layer × head as a small heatmap, on ONE colour scale with one colour bar.

    Args:
        layers: ``[layers, heads, q, k]`` or a sequence of ``[heads, q, k]`` (numpy, torch, dask).
        tokens: the sequence's strings; shown on the edge cells when ``q, k <= 16``.
        layer_names: one name per layer (row labels; default ``0, 1, ...``).
        heads: the head indices to show (default: all); columns are labelled with them.
        gamma: power of the shared colour scale.
        max_cells: each cell is max-pooled past this many rows or keys.
        title: figure title.

    Returns:
        The Figure; ``fig.axes`` holds the ``layers × heads`` grid row by row, then the colour bar.
        Every image shares one norm (the largest weight of all heads).

    Example:
        >>> import numpy as np
        >>> fig = model_view(np.full((2, 3, 4, 4), 0.25))
        >>> len([ax for ax in fig.axes if ax.images]), {ax.images[0].norm.vmax for ax in fig.axes if ax.images}
        (6, {0.25})
    """
    stack = _layers(layers, "layers")
    if heads is not None:
        stack = [_pick_heads(layer, heads, i) for i, layer in enumerate(stack)]
    columns = list(heads) if heads is not None else list(range(max(layer.shape[0] for layer in stack)))
    names, pattern = _layer_labels(layer_names, len(stack))
    norm = attention_norm(gamma=gamma, values=np.array([np.nanmax(layer) for layer in stack]))
    fig, axes = new_grid(len(stack), len(columns), cell=1.3)
    images, pooled = [], False
    for row, layer in enumerate(stack):
        for col, ax in enumerate(axes[row]):
            if col >= layer.shape[0]:
                ax.set_axis_off()
                continue
            cells, block = pool(layer[col], max(max_cells, 1), "max")
            pooled |= block != (1, 1)
            images.append(show(ax, cells, norm, attention_cmap()))
            _cell_ticks(ax, tokens, cells.shape, edges=(row == len(stack) - 1, col == 0))
        axes[row, 0].set_ylabel(names[row], rotation=0, ha="right", va="center")
    for col, head in enumerate(columns):
        axes[0, col].set_title(f"head {head}", fontsize=9)
    fig.colorbar(images[0], ax=axes.ravel().tolist(), shrink=0.8, label=scale_label(gamma))
    note = f"cells max-pooled to at most {max_cells}×{max_cells}" if pooled else ""
    fig.suptitle(
        "\n".join(filter(None, [title or "attention by layer and head", pattern and f"layers: {pattern}", note]))
    )
    return fig


def metric_grid(
    values: Any,
    *,
    layer_names: Sequence[str] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    cmap: str = "viridis",
    annotate: bool | None = None,
    diverging: bool = False,
    label: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Axes:
    """A ``[layers, heads]`` metric as a grid of coloured cells (NaN cells in ``MASKED_COLOR``).

    Args:
        values: ``[layers, heads]``, e.g. ``HeadTable.metrics["entropy"]``.
        layer_names: row labels (long dotted module names are shortened to what differs).
        title: panel title.
        ax: where to draw (default: a new figure).
        cmap: colour map name (``diverging`` alone switches to ``DIVERGING_CMAP``).
        annotate: write each value in its cell; default: when the grid has at most 256 cells
            and 16 heads.
        diverging: colour scale centred on 0 (for signed values).
        label: colour bar label.
        vmin, vmax: colour scale limits (default: the finite values' range).

    Returns:
        The Axes (one panel); ``ax.images[0].get_array()`` is ``values`` with NaN masked.

    Example:
        >>> import numpy as np
        >>> ax = metric_grid(np.array([[0.5, np.nan], [1.0, 2.0]]), layer_names=["a.0.attn", "a.1.attn"])
        >>> [t.get_text() for t in ax.texts], [t.get_text() for t in ax.get_yticklabels()]
        (['0.5', '1', '2'], ['0', '1'])
    """
    grid = as_numpy(values, name="values")
    if grid.ndim != 2:
        raise ViewError(f"values has shape {grid.shape}; expected [layers, heads] (one layer: values[None])")
    fig, ax = new_axes(ax, figsize=(max(4.0, 0.45 * grid.shape[1] + 2.5), max(3.0, 0.35 * grid.shape[0] + 1.5)))
    if diverging and cmap == "viridis":
        colours = diverging_cmap()
    else:
        colours = colormaps[cmap].with_extremes(bad=DIVERGING_MASKED_COLOR if diverging else MASKED_COLOR)
    norm = diverging_norm(grid, vmax) if diverging else _linear_norm(grid, vmin, vmax)
    image = ax.imshow(grid, cmap=colours, norm=norm, interpolation="nearest", aspect="auto")
    names, pattern = _layer_labels(layer_names, grid.shape[0])
    label_tokens(ax, "y", names, grid.shape[0])
    _head_ticks(ax, grid.shape[1])
    ax.set(xlabel="head", ylabel=f"layer ({pattern})" if pattern else "layer", title=title or "")
    if annotate if annotate is not None else grid.size <= _ANNOTATE_CELLS and grid.shape[1] <= 16:
        _annotate(ax, grid, lambda v: colours(norm(v)))
    fig.colorbar(image, ax=ax, label=label or "")
    return ax


def metric_grids(table: HeadTable, metrics: Sequence[str] | None = None, *, cols: int = 3) -> Figure:
    """One :func:`metric_grid` panel per metric of a :class:`~attnhooks.analysis.HeadTable`.

    Args:
        table: from :func:`attnhooks.analysis.head_table`; rows are its modules.
        metrics: names to draw (default: every metric of the table, in its order).
        cols: panels per row.

    Returns:
        The Figure; ``fig.axes`` starts with the panels in ``metrics`` order. Metrics with both
        signs get a diverging scale.
    """
    names = list(table.metrics) if metrics is None else list(metrics)
    unknown = [name for name in names if name not in table.metrics]
    if unknown or not names:
        raise ViewError(f"metrics {unknown or names} not in the table; it has {sorted(table.metrics)}")
    ncols = max(1, min(cols, len(names)))
    nrows = -(-len(names) // ncols)
    fig, axes = new_grid(nrows, ncols, cell=4.0)
    for ax, name in zip(axes.ravel(), names):
        values = table.metrics[name]
        signed = bool(np.nanmin(values) < 0 < np.nanmax(values)) if np.isfinite(values).any() else False
        metric_grid(values, layer_names=table.modules, title=name, ax=ax, diverging=signed)
    for ax in axes.ravel()[len(names) :]:
        ax.set_axis_off()
    return fig


def compare_view(
    a: Any,
    b: Any,
    *,
    tokens: Sequence[str] | None = None,
    labels: tuple[str, str] = ("A", "B"),
    mask: Any = None,
    gamma: float = 0.5,
    max_cells: int = 256,
    title: str | None = None,
) -> Figure:
    """Two ``[q, k]`` maps of one head on one shared scale, and their difference ``A − B``.

    Args:
        a, b: ``[q, k]`` weights of the same shape (e.g. one head on two inputs or checkpoints).
        tokens: the sequence's strings (labels when short).
        labels: names of ``a`` and ``b``.
        mask: optional bool ``[q, k]``, True where the key is visible (both maps and the difference).
        gamma: power of the shared attention scale.
        max_cells: past this many rows or keys the maps are max-pooled, the difference keeps
            each block's value of largest magnitude.
        title: figure title.

    Returns:
        The Figure: ``fig.axes[:3]`` are A, B and A − B (red: A attends more, blue: B does).

    Example:
        >>> import numpy as np
        >>> fig = compare_view(np.eye(3), np.eye(3))
        >>> float(abs(fig.axes[2].images[0].get_array()).max())
        0.0
    """
    first, second = matrix(a, "a"), matrix(b, "b")
    if first.shape != second.shape:
        raise ViewError(f"a has shape {first.shape} and b {second.shape}; compare maps of the same [q, k]")
    first, second = apply_mask(first, mask), apply_mask(second, mask)
    fig = Figure(figsize=(16.0, 5.0), layout="constrained")
    axes = fig.subplots(1, 3)
    norm = attention_norm(gamma=gamma, values=np.concatenate([first.ravel(), second.ravel()]))
    for ax, data, name in zip(axes[:2], (first, second), labels):
        image = draw_map(ax, data, norm=norm, cmap=attention_cmap(), tokens=tokens, max_cells=max_cells, title=name)
    fig.colorbar(image, ax=axes[:2].tolist(), label=scale_label(gamma), shrink=0.8)
    diff = first - second
    colours = diverging_cmap()
    image = draw_map(
        axes[2], diff, norm=diverging_norm(diff), cmap=colours, tokens=tokens, max_cells=max_cells,
        title=f"{labels[0]} − {labels[1]}", signed=True,
    )  # fmt: skip
    fig.colorbar(image, ax=axes[2], label="difference", shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def head_divergence(a: Any, b: Any) -> Float:
    """Per (layer, head): the mean over rows of the Jensen–Shannon divergence of A's and B's rows.

    Rows that are all 0 in both (padding queries) are left out; a head with no rows left, or
    missing in a layer with fewer heads, is NaN.

    Args:
        a, b: ``[layers, heads, q, k]`` or sequences of ``[heads, q, k]``, the same shapes.

    Returns:
        ``[layers, heads]`` float64 in nats, in ``[0, log 2]``.

    Example:
        >>> import numpy as np
        >>> diag, prev = np.eye(3), np.eye(3, k=-1) + np.eye(3, k=2)
        >>> head_divergence(np.stack([diag, diag])[None], np.stack([diag, prev])[None]).round(3)
        array([[0.   , 0.693]])
    """
    left, right = _layers(a, "a"), _layers(b, "b")
    if len(left) != len(right):
        raise ViewError(f"a has {len(left)} layers and b {len(right)}; compare the same layers")
    out = np.full((len(left), max(layer.shape[0] for layer in left)), np.nan)
    for index, (x, y) in enumerate(zip(left, right)):
        if x.shape != y.shape:
            raise ViewError(f"layer {index}: a is {x.shape} and b {y.shape}; expected the same [heads, q, k]")
        keep = (x != 0).any(axis=-1) | (y != 0).any(axis=-1)  # [heads, q]
        total = np.where(keep, js_divergence(x, y), 0.0).sum(axis=-1)
        counts = keep.sum(axis=-1)
        out[index, : x.shape[0]] = np.divide(total, counts, out=np.full(total.shape, np.nan), where=counts > 0)
    return out


def divergence_grid(
    a: Any,
    b: Any,
    *,
    layer_names: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """:func:`head_divergence` of ``a`` and ``b`` drawn with :func:`metric_grid` (scale 0 .. log 2).

    Args:
        a, b: ``[layers, heads, q, k]`` or sequences of ``[heads, q, k]``, the same shapes.
        layer_names: row labels.
        ax: where to draw (default: a new figure).
        title: panel title.

    Returns:
        The Axes (one panel); ``ax.images[0].get_array()`` holds the divergences.

    Example:
        >>> import numpy as np
        >>> ax = divergence_grid(np.full((1, 2, 2, 2), 0.5), np.full((1, 2, 2, 2), 0.5))
        >>> float(ax.images[0].get_array().max())
        0.0
    """
    values = head_divergence(a, b)
    return metric_grid(
        values, layer_names=layer_names, ax=ax, title=title or "Jensen–Shannon divergence per head",
        label="JS divergence (nats)", vmin=0.0, vmax=float(np.log(2)),
    )  # fmt: skip


# -- private -------------------------------------------------------------------------------------------


def _layers(layers: Any, name: str) -> list[Float]:
    """``[layers, heads, q, k]`` or a sequence of ``[heads, q, k]`` as a list of float64 arrays."""
    if hasattr(layers, "ndim"):
        stack = as_numpy(layers, name=name)
        if stack.ndim != 4:
            raise ViewError(
                f"{name} has shape {stack.shape}; expected [layers, heads, q, k] or a list of [heads, q, k] "
                f"(one layer: {name}[None])"
            )
        return list(stack)
    if not isinstance(layers, Sequence) or not layers:
        raise ViewError(f"{name} is {type(layers).__name__}; expected [layers, heads, q, k] or a list of [heads, q, k]")
    out = [as_numpy(layer, name=f"{name}[{i}]") for i, layer in enumerate(layers)]
    for i, layer in enumerate(out):
        if layer.ndim != 3:
            raise ViewError(f"{name}[{i}] has shape {layer.shape}; expected one layer [heads, q, k]")
    return out


def _pick_heads(layer: Float, heads: Sequence[int], index: int) -> Float:
    wrong = [h for h in heads if not -layer.shape[0] <= h < layer.shape[0]]
    if wrong:
        raise ViewError(f"heads {wrong} are not in layer {index}, which has {layer.shape[0]} heads")
    return layer[list(heads)]


def _layer_labels(names: Sequence[str] | None, n: int) -> tuple[list[str], str]:
    """Row labels and the pattern they were cut from: ``model.layers.*.attn`` -> ``0, 1, ...``."""
    if names is None:
        return [str(i) for i in range(n)], ""
    if len(names) != n:
        raise ViewError(f"{len(names)} layer_names for {n} layers; give one name per layer")
    parts = [str(name).split(".") for name in names]
    if n < 2 or len({len(p) for p in parts}) != 1:
        return [str(name) for name in names], ""
    differs = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if not differs:
        return [str(name) for name in names], ""
    first, last = differs[0], differs[-1] + 1
    labels = [".".join(p[first:last]) for p in parts]
    pattern = ".".join([*parts[0][:first], "*", *parts[0][last:]])
    return labels, pattern


def _cell_ticks(ax: Axes, tokens: Sequence[str] | None, shape: tuple[int, ...], edges: tuple[bool, bool]) -> None:
    """No ticks on grid cells, but tokens on the bottom row and left column when the map is tiny."""
    ax.set_xticks([])
    ax.set_yticks([])
    if tokens is None or max(shape) > 16 or max(shape) > len(tokens):
        return
    if edges[0]:
        label_tokens(ax, "x", tokens, shape[1], max_labels=16)
    if edges[1]:
        label_tokens(ax, "y", tokens, shape[0], max_labels=16)


def _head_ticks(ax: Axes, heads: int) -> None:
    ticks = np.arange(heads) if heads <= 32 else np.unique(np.linspace(0, heads - 1, 8).round().astype(int))
    ax.set_xticks(ticks, [str(t) for t in ticks])


def _linear_norm(grid: Float, vmin: float | None, vmax: float | None) -> Normalize:
    finite = grid[np.isfinite(grid)]
    low = vmin if vmin is not None else float(finite.min()) if finite.size else 0.0
    high = vmax if vmax is not None else float(finite.max()) if finite.size else 1.0
    return Normalize(low, high if high > low else low + 1.0)


def _annotate(ax: Axes, grid: Float, colour_of: Any) -> None:
    """Each finite value in its cell, dark on light cells and light on dark ones."""
    size = float(np.clip(80 / max(grid.shape), 5, 9))
    for (row, col), value in np.ndenumerate(grid):
        if np.isfinite(value):
            red, green, blue, _ = colour_of(value)
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=size, color=ink)
