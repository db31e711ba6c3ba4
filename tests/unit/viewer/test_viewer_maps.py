"""Maps and grids draw constructed attention patterns where the patterns put them."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm, to_rgb
from matplotlib.figure import Figure

from attnhooks.analysis import HeadTable, rollout
from attnhooks.attention.kernels import attention_probs
from attnhooks.attention.masks import MaskSpec
from attnhooks.reduce.summary import SummaryOptions, summarize_call
from attnhooks.viewer._common import MASKED_COLOR, ViewError
from attnhooks.viewer.grids import (
    compare_view,
    divergence_grid,
    head_divergence,
    metric_grid,
    metric_grids,
    model_view,
)
from attnhooks.viewer.maps import heatmap, overview, rollout_view

MASKED_RGB = np.array(to_rgb(MASKED_COLOR)) * 255


def render(fig: Figure, dpi: float = 60) -> np.ndarray:
    """The figure's RGB pixels (rows from the top), checked not to be blank."""
    fig.set_dpi(dpi)  # 60: enough pixels per cell of small maps, and quick
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(float)
    assert pixels.std() > 10, "the figure is blank"
    return pixels


def colour_at(pixels: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """The rendered RGB (0..255) at data point ``(x, y)`` of ``ax`` (after ``render``)."""
    px, py = ax.transData.transform((x, y))
    return pixels[int(pixels.shape[0] - py), int(px)]  # pixel row r spans y in (height - r - 1, height - r)


def image(ax) -> np.ma.MaskedArray:
    return np.ma.asarray(ax.images[0].get_array())


def diagonal(n: int) -> np.ndarray:
    return np.eye(n)


def previous_token(n: int) -> np.ndarray:
    out = np.eye(n, k=-1)
    out[0, 0] = 1.0  # the first token has no previous one: it attends itself
    return out


def tick_numbers(labels) -> list[int]:
    return [int(t.get_text()) for t in labels if t.get_text()]


# -- heatmap -----------------------------------------------------------------------------------------


def test_heatmap_puts_a_diagonal_head_on_the_diagonal_with_token_labels():
    tokens = [f"t{i}" for i in range(10)]
    attn = 0.9 * diagonal(10) + 0.01
    ax = heatmap(attn, tokens=tokens, title="diag")
    cells = image(ax)
    assert cells.shape == (10, 10) and not np.ma.is_masked(cells)
    assert (cells.argmax(axis=1) == np.arange(10)).all()
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    assert ax.get_title() == "diag"
    assert len(ax.figure.axes) == 2  # the map and its colour bar
    pixels = render(ax.figure)
    bright, dark = colour_at(pixels, ax, 4, 4), colour_at(pixels, ax, 1, 7)
    assert bright.sum() > 500 and dark.sum() < 150
    # a weight of 0.01 is visible on the square-root scale: 0.1 of the colour range, not 0.01
    assert ax.images[0].norm(0.01) == pytest.approx(math.sqrt(0.01 / 0.91), rel=1e-6)
    fig = Figure()
    ax = fig.add_subplot()
    assert heatmap(torch.eye(4), ax=ax, colorbar=False) is ax
    assert len(fig.axes) == 1 and (image(ax).argmax(axis=1) == np.arange(4)).all()


def test_a_causal_mask_is_drawn_in_the_masked_colour_not_as_zero():
    n = 8
    mask = np.tri(n, dtype=bool)
    attn = np.where(mask, 1.0, 0.0) / mask.sum(axis=1, keepdims=True)
    ax = heatmap(attn, mask=mask)
    cells = image(ax)
    assert (cells.mask == ~mask).all()
    pixels = render(ax.figure)
    assert np.abs(colour_at(pixels, ax, 6, 1) - MASKED_RGB).max() <= 3  # above the diagonal
    visible = colour_at(pixels, ax, 1, 6)
    assert np.abs(visible - MASKED_RGB).max() > 30  # below: a real weight
    assert ax.images[0].cmap.get_bad() == pytest.approx((*to_rgb(MASKED_COLOR), 1.0))


def test_a_long_diagonal_is_max_pooled_and_ticks_give_positions():
    n = 2000
    attn = 0.02 * diagonal(n)  # a faint head: max pooling keeps it, mean pooling would not
    attn[:, 101] = 0.01  # and a faint sink column one key wide
    ax = heatmap(attn, tokens=[str(i) for i in range(n)], mask=np.tri(n, dtype=bool))
    cells = image(ax)
    assert cells.shape == (250, 250)
    assert "max over 8×8 blocks" in ax.get_title()
    assert np.allclose(np.diag(cells)[13:], 0.02) and np.allclose(cells[13:, 12], 0.01)
    assert cells.mask[0, 1] and not cells.mask[1, 0]  # fully masked blocks stay masked
    ys, xs = tick_numbers(ax.get_yticklabels()), tick_numbers(ax.get_xticklabels())
    assert ys[0] == 0 and 1900 <= ys[-1] < 2000 and 1900 <= xs[-1] < 2000
    pixels = render(ax.figure, dpi=100)  # the default figure: every cell keeps its pixels
    for row in range(20, 250, 10):
        line = [colour_at(pixels, ax, col, row).sum() for col in range(250)]
        assert line[row] > 400 and line[12] > 150  # the diagonal and the sink column, in every row
        assert max(line[14:row]) < 30 and np.abs(colour_at(pixels, ax, row + 2, row) - MASKED_RGB).max() <= 3


def test_a_window_of_rows_keeps_true_positions():
    n = 3000
    rows = slice(1000, 1010)
    window = diagonal(n)[rows, 990:1020]
    ax = heatmap(window, row_start=1000, col_start=990, tokens=[f"w{i}" for i in range(n)])
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"w{i}" for i in range(1000, 1010)]
    assert ax.get_xticklabels()[10].get_text() == "w1000"
    assert (image(ax).argmax(axis=1) == np.arange(10) + 10).all()
    ax = heatmap(diagonal(n)[1000:1100], row_start=1000)  # 100 rows: positions, not tokens
    assert all(1000 <= y < 1100 for y in tick_numbers(ax.get_yticklabels()))


# -- overview ------------------------------------------------------------------------------------


def self_attending_summary(n: int = 300, heads: int = 2) -> dict[str, np.ndarray]:
    """A real ``summarize_call`` of a causal head where every token attends itself, plus key 0."""
    q = torch.eye(n).expand(1, heads, n, n) * 8.0
    k = q.clone()
    k[..., 0, :] = 8.0  # key 0 matches every query as well as the query's own key: a sink
    mask = MaskSpec(causal=True)
    _, lse = attention_probs(q, k, 1.0, mask)
    opt = SummaryOptions(band=16, pooled=32, block=64)
    out = summarize_call(q, k, lse, scale=1.0, mask=mask, options=opt)
    return {name: value[0].numpy() for name, value in out.items()}


def test_overview_of_a_real_summary_shows_diagonal_sink_and_band():
    s = self_attending_summary()
    rb, cb, pq, pk = (int(x) for x in s["pooled_bins"])
    fig = overview(s["pooled_max"], bins=s["pooled_bins"], received=s["received"], band=s["band"], title="run")
    map_ax, received_ax, band_ax = fig.axes[:3]
    cells = image(map_ax)
    assert cells.shape == (pq, pk) == (30, 30)
    assert (cells.argmax(axis=1) == 0).all()  # the sink column is the brightest in every row
    assert (np.diag(cells) > 0.4).all() and cells[0, 20] == 0  # the diagonal bins; nothing above
    assert map_ax.images[0].get_extent() == [0, pk * cb, pq * rb, 0]
    assert "2 heads" in fig.get_suptitle() and "10×10 positions per cell" in fig.get_suptitle()
    steps = received_ax.patches[0].get_data()
    assert steps.values.argmax() == 0 and steps.edges[-1] == 300  # the sink receives most
    band = image(band_ax)  # 300 rows max-pooled by 2 under the default max_cells=256
    assert band.shape == (150, 16) and band.mask[0, 2] and not band.mask[1, 2]  # keys before 0 masked
    assert np.allclose(band[:, 0], s["band"].mean(axis=0)[:, 0].reshape(150, 2).max(axis=1))  # the row itself
    assert (band[2:, 0] > 0.4).all() and (band[10:, 1:] < 1e-6).all()  # past key 0 (the sink), only the row itself
    render(fig)


def test_overview_of_a_full_matrix_pools_it_and_keeps_positions():
    n = 2000
    attn = diagonal(n)
    fig = overview(attn, received=attn.sum(axis=0), max_cells=100)
    cells = image(fig.axes[0])
    assert cells.shape == (100, 100) and (cells.argmax(axis=1) == np.arange(100)).all()
    assert fig.axes[0].images[0].get_extent() == [0, n, n, 0]
    assert max(fig.axes[0].get_yticks()) >= 1500  # ticks in positions
    assert fig.axes[1].get_xlim()[1] == pytest.approx(n)
    assert "20×20 positions per cell" in fig.get_suptitle() and "heads" not in fig.get_suptitle()


# -- rollout -------------------------------------------------------------------------------------


def test_rollout_view_bars_peak_where_the_rollout_row_peaks():
    n = 6
    tokens = ["[CLS]", "the", "cat", "sat", "down", "[SEP]"]
    layer = np.full((n, n), 0.02)
    layer[:, 3] = 0.9  # every token attends "sat"
    layer /= layer.sum(axis=1, keepdims=True)
    rolled = rollout(np.stack([layer[None], layer[None]]))
    fig = rollout_view(rolled, tokens=tokens)
    map_ax, bar_ax = fig.axes[:2]  # then the colour bar
    heights = [bar.get_height() for bar in bar_ax.patches if bar.get_width() == pytest.approx(0.8)]
    assert np.allclose(heights, rolled[0]) and int(np.argmax(heights)) == 3
    assert [t.get_text() for t in bar_ax.get_xticklabels()] == tokens
    assert "[CLS]" in bar_ax.get_title()
    assert np.allclose(image(map_ax), rolled)
    last = rollout_view(rolled, tokens=tokens, query=-1).axes[1]
    assert "row 5" in last.get_title()
    render(fig)
    rolled = np.full((600, 600), 1 / 600)
    rolled[10] = 0.0
    rolled[10, 77] = 1.0
    bar_ax = rollout_view(rolled, query=10).axes[1]
    assert bar_ax.patches[0].get_data().values.argmax() == 77


# -- model view ------------------------------------------------------------------------------------


def test_model_view_shows_a_sink_head_on_one_shared_scale():
    layers = np.tile(0.5 * diagonal(8), (3, 4, 1, 1))
    layers[1, 2] = 0.0
    layers[1, 2, :, 0] = 1.0  # layer 1 head 2: every row attends token 0
    names = [f"model.layers.{i}.self_attn" for i in range(3)]
    fig = model_view(layers, tokens=list("abcdefgh"), layer_names=names)
    grid = [ax for ax in fig.axes if ax.images]
    assert len(grid) == 12 and len(fig.axes) == 13  # one colour bar for all
    sink = image(grid[1 * 4 + 2])
    assert (sink[:, 0] == 1).all() and (sink[:, 1:] == 0).all()
    assert all((image(ax).argmax(axis=1) == np.arange(8)).all() for i, ax in enumerate(grid) if i != 6)
    assert {ax.images[0].norm.vmax for ax in grid} == {1.0}
    assert len({id(ax.images[0].norm) for ax in grid}) == 1
    assert [grid[4 * r].get_ylabel() for r in range(3)] == ["0", "1", "2"]
    assert [grid[c].get_title() for c in range(4)] == [f"head {c}" for c in range(4)]
    assert "model.layers.*.self_attn" in fig.get_suptitle()
    pixels = render(fig)
    diagonal_cell = grid[1 * 4 + 1]
    assert colour_at(pixels, grid[6], 0, 5).sum() > 500 and colour_at(pixels, grid[6], 5, 5).sum() < 100
    assert colour_at(pixels, diagonal_cell, 5, 5).sum() > colour_at(pixels, diagonal_cell, 0, 5).sum() + 300


def test_model_view_pads_layers_with_fewer_heads_and_pools_long_cells():
    layers = [np.tile(diagonal(200), (2, 1, 1)), np.tile(diagonal(200), (3, 1, 1))]
    fig = model_view(layers, max_cells=50)
    assert sum(1 for ax in fig.axes if ax.images) == 5
    assert not fig.axes[2].axison and not fig.axes[2].images  # layer 0 has no head 2
    assert image(fig.axes[0]).shape == (50, 50) and "pooled" in fig.get_suptitle()
    chosen = model_view(np.tile(diagonal(4), (2, 3, 1, 1)), heads=[2])
    assert sum(1 for ax in chosen.axes if ax.images) == 2 and chosen.axes[0].get_title() == "head 2"


# -- metric grids ----------------------------------------------------------------------------------


def test_metric_grid_masks_nan_and_writes_the_values():
    values = np.arange(12, dtype=float).reshape(3, 4) / 10
    values[1, 2] = np.nan
    ax = metric_grid(values, layer_names=["m.0.attn", "m.1.attn", "m.2.attn"], title="entropy", label="nats")
    cells = image(ax)
    assert cells.mask[1, 2] and cells.mask.sum() == 1 and np.allclose(cells.compressed(), values[np.isfinite(values)])
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert len(texts) == 11 and (1, 2) not in texts and texts[(2, 3)] == "1.1"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"] and "m.*.attn" in ax.get_ylabel()
    pixels = render(ax.figure)
    assert np.abs(colour_at(pixels, ax, 2.3, 1.3) - MASKED_RGB).max() <= 3
    assert not metric_grid(values, annotate=False).texts
    ax = metric_grid(np.array([[-2.0, 1.0], [0.0, 0.5]]), diverging=True)
    norm = ax.images[0].norm
    assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == 0 and norm.vmin == -2 and norm.vmax == 2
    red, _, blue = ax.images[0].cmap(norm(1.0))[:3]
    assert red > blue
    with pytest.raises(ViewError, match=r"\[layers, heads\]"):
        metric_grid(np.ones(4))


def test_metric_grids_draw_one_panel_per_metric_of_a_head_table():
    table = HeadTable(
        ["model.layers.0.attn", "model.layers.1.attn"],
        {"entropy": np.array([[0.1, 0.9], [0.5, 0.2]]), "distance": np.array([[-1.0, 2.0], [0.0, 1.0]])},
    )
    fig = metric_grids(table)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["entropy", "distance"]
    assert np.allclose(image(panels[0]), table.metrics["entropy"])
    assert isinstance(panels[1].images[0].norm, TwoSlopeNorm)  # both signs: diverging
    assert [ax.get_title() for ax in metric_grids(table, ["distance"]).axes if ax.images] == ["distance"]
    with pytest.raises(ViewError, match="it has \\['distance', 'entropy'\\]"):
        metric_grids(table, ["sink"])


# -- comparing -------------------------------------------------------------------------------------


def test_compare_view_of_identical_maps_has_a_zero_difference():
    attn = np.random.default_rng(0).dirichlet(np.ones(6), size=6)
    fig = compare_view(attn, attn.copy(), labels=("run", "again"))
    a_ax, b_ax, diff_ax = (ax for ax in fig.axes if ax.images)
    assert (image(diff_ax) == 0).all()
    assert a_ax.images[0].norm is b_ax.images[0].norm
    assert diff_ax.get_title() == "run − again"


def test_compare_view_diagonal_against_previous_token_is_red_and_blue():
    n = 10
    fig = compare_view(diagonal(n), previous_token(n), tokens=[str(i) for i in range(n)])
    diff_ax = [ax for ax in fig.axes if ax.images][2]
    cells = image(diff_ax)
    i = np.arange(1, n)
    assert (cells[i, i] == 1).all() and (cells[i, i - 1] == -1).all() and cells[0, 0] == 0
    pixels = render(fig)
    red, blue = colour_at(pixels, diff_ax, 5, 5), colour_at(pixels, diff_ax, 4, 5)
    assert red[0] > red[2] + 50 and blue[2] > blue[0] + 50
    assert np.abs(colour_at(pixels, diff_ax, 8, 2) - 247).max() < 15  # 0 is white-ish
    n = 1000
    fig = compare_view(diagonal(n), previous_token(n), max_cells=500)
    cells = image([ax for ax in fig.axes if ax.images][2])
    assert cells.shape == (500, 500)
    i = np.arange(1, 500)
    assert (cells[i, i] == 1).all() and (cells[i, i - 1] == -1).all()


def test_head_divergence_is_zero_where_equal_and_largest_where_the_pattern_differs():
    n = 8
    a = np.tile(diagonal(n), (2, 3, 1, 1))
    b = a.copy()
    b[1, 2] = previous_token(n)  # layer 1 head 2 looks one token back
    b[0, 1] = 0.5 * diagonal(n) + 0.5 * previous_token(n)  # layer 0 head 1 half way
    values = head_divergence(a, b)
    assert values.shape == (2, 3) and values.dtype == np.float64
    assert np.unravel_index(values.argmax(), values.shape) == (1, 2)
    assert values[1, 2] == pytest.approx(np.log(2) * (n - 1) / n)  # row 0 is the same in both
    assert 0 < values[0, 1] < values[1, 2]
    assert (np.delete(values.ravel(), [1, 5]) == 0).all()
    ax = divergence_grid(a, b, layer_names=["x.0", "x.1"])
    assert np.allclose(image(ax), values) and ax.images[0].norm.vmax == pytest.approx(np.log(2))


def test_head_divergence_skips_rows_empty_in_both_and_pads_missing_heads():
    a = np.zeros((1, 1, 3, 3))
    a[0, 0, :2] = diagonal(3)[:2]  # row 2 is padding in both
    b = a.copy()
    b[0, 0, 1] = [1.0, 0.0, 0.0]
    assert head_divergence(a, b)[0, 0] == pytest.approx(np.log(2) / 2)  # rows 0 and 1 only
    layers = [np.ones((1, 2, 2)) / 2, np.ones((2, 2, 2)) / 2]
    uneven = head_divergence(layers, [layer.copy() for layer in layers])
    assert uneven[0, 0] == 0 and np.isnan(uneven[0, 1]) and (uneven[1] == 0).all()
    with pytest.raises(ViewError, match="layer 0"):
        head_divergence(np.ones((1, 2, 3, 3)), np.ones((1, 2, 3, 4)))
    with pytest.raises(ViewError, match="1 layers and b 2"):
        head_divergence(np.ones((1, 2, 3, 3)), np.ones((2, 2, 3, 3)))


# -- errors and examples ---------------------------------------------------------------------------


def test_bad_input_raises_a_view_error_that_names_the_fix():
    with pytest.raises(ViewError, match=r"pick one head, e.g. attn\[0\]"):
        heatmap(np.ones((2, 3, 3)))
    with pytest.raises(ViewError, match="mask has shape"):
        heatmap(np.ones((3, 3)), mask=np.ones((3, 4), dtype=bool))
    with pytest.raises(ViewError, match="row_start"):
        heatmap(np.ones((3, 3)), row_start=-1)
    with pytest.raises(ViewError, match="empty"):
        heatmap(np.ones((0, 3)))
    s = self_attending_summary(n=40, heads=1)
    with pytest.raises(ViewError, match="pooled_bins"):
        overview(s["pooled_max"], received=s["received"])  # bins forgotten
    with pytest.raises(ViewError, match="pooled_bins"):
        overview(s["pooled_max"], band=s["band"])
    with pytest.raises(ViewError, match=r"expected \[P_q, P_k\] or \[heads, P_q, P_k\]"):
        overview(np.ones((1, 2, 3, 3)))
    with pytest.raises(ViewError, match="bins"):
        overview(np.ones((3, 3)), bins=(0, 1))
    with pytest.raises(ViewError, match="square"):
        rollout_view(np.ones((3, 4)))
    with pytest.raises(ViewError, match="outside the 3 rows"):
        rollout_view(np.eye(3), query=3)
    with pytest.raises(ViewError, match=r"layers, heads, q, k"):
        model_view(np.ones((3, 4, 4)))
    with pytest.raises(ViewError, match=r"layers\[1\] has shape"):
        model_view([np.ones((2, 4, 4)), np.ones((4, 4))])
    with pytest.raises(ViewError, match="heads \\[5\\]"):
        model_view(np.ones((1, 2, 4, 4)), heads=[5])
    with pytest.raises(ViewError, match="layer_names"):
        model_view(np.ones((2, 2, 4, 4)), layer_names=["only one"])
    with pytest.raises(ViewError, match=r"a has shape \(3, 3\) and b \(3, 4\)"):
        compare_view(np.eye(3), np.ones((3, 4)))


def test_docstring_examples_run():
    for module in ("attnhooks.viewer.maps", "attnhooks.viewer.grids"):
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted and not result.failed, module
