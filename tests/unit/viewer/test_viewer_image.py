"""attnhooks.viewer.image: patch maps, DAAM maps and overlays put the heat where the attention is."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from attnhooks.analysis import rollout
from attnhooks.viewer._common import ViewError
from attnhooks.viewer.image import cross_attention_map, image_overlay, patch_map, patch_overlay, upsample


def cls_on_patch(row: int, col: int, *, grid: tuple[int, int] = (4, 4), heads: int = 2, prefix: int = 1) -> np.ndarray:
    """[heads, n, n] ViT attention: [CLS] puts all weight on patch (row, col); other rows uniform."""
    n = prefix + grid[0] * grid[1]
    attn = np.full((heads, n, n), 1.0 / n)
    attn[:, 0] = 0.0
    attn[:, 0, prefix + row * grid[1] + col] = 1.0
    return attn


def hot_cross_attention(side: int, rows: slice, cols: slice, *, token: int = 2, k_text: int = 5) -> np.ndarray:
    """[heads=2, side*side, k_text] cross-attention: ``token`` hot on the cells (rows, cols) only."""
    attn = np.full((2, side, side, k_text), 0.01)
    attn[:, rows, cols, token] = 1.0
    return attn.reshape(2, side * side, k_text)


def test_upsample_matches_torch_bilinear_and_keeps_constants():
    values = np.random.default_rng(0).random((4, 5))
    for shape in [(13, 17), (4, 5), (3, 2), (64, 64)]:
        reference = torch.nn.functional.interpolate(
            torch.tensor(values)[None, None], size=shape, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        assert np.allclose(upsample(values, shape), reference, atol=1e-12)
    assert np.allclose(upsample(np.full((3, 7), 0.25), (30, 11)), 0.25)
    hot = np.zeros((4, 4))
    hot[2, 3] = 1.0
    big = upsample(hot, (32, 32))
    assert np.unravel_index(np.argmax(big), big.shape) in {(r, c) for r in (19, 20) for c in (27, 28)}
    inner = np.zeros((4, 4))
    inner[1, 2] = 1.0
    odd = upsample(inner, (12, 12))  # x3: output pixel 3i + 1 sits on source centre i
    assert odd[4, 7] == 1.0 and np.count_nonzero(odd == 1.0) == 1


def test_patch_map_finds_the_patch_cls_attends():
    attn = cls_on_patch(2, 3)
    for heads in ("mean", "max", "sum", 1):
        heat = patch_map(attn, heads=heads)
        assert heat.shape == (4, 4)
        assert np.unravel_index(np.argmax(heat), heat.shape) == (2, 3)
        assert np.count_nonzero(heat) == 1
    assert np.unravel_index(np.argmax(patch_map(attn[0])), (4, 4)) == (2, 3)  # [n, n], one head
    wide = patch_map(cls_on_patch(1, 4, grid=(2, 6), prefix=5), grid=(2, 6), prefix=5)  # 4 register tokens
    assert np.unravel_index(np.argmax(wide), wide.shape) == (1, 4)
    other_row = cls_on_patch(0, 0)
    other_row[:, 3] = 0.0
    other_row[:, 3, 1 + 5] = 1.0  # row 3 attends patch (1, 1)
    assert np.unravel_index(np.argmax(patch_map(other_row, query=3)), (4, 4)) == (1, 1)


def test_patch_map_of_a_rollout_keeps_the_hot_patch():
    layers = np.stack([cls_on_patch(2, 3)] * 3)  # [layers=3, heads=2, 17, 17]
    heat = patch_map(rollout(layers, residual=0.0))
    assert np.unravel_index(np.argmax(heat), heat.shape) == (2, 3)


def test_cross_attention_map_sums_resolutions_at_the_same_place():
    low = hot_cross_attention(4, slice(1, 2), slice(2, 3))  # cell (1, 2) of 4x4 = rows 2..3, cols 4..5 of 8x8
    high = hot_cross_attention(8, slice(2, 4), slice(4, 6))
    heat = cross_attention_map([low, high], token=2)
    assert heat.shape == (8, 8) and np.isclose(heat.max(), 1.0)
    hot = heat >= 0.9
    assert hot[2:4, 4:6].all() and not hot[:, :3].any() and not hot[5:].any()
    assert np.unravel_index(np.argmax(heat), heat.shape) in {(r, c) for r in (2, 3) for c in (4, 5)}
    assert np.allclose(cross_attention_map(np.stack([high, high]), token=2), cross_attention_map([high], token=2))
    cold = cross_attention_map([low, high], token=0, normalize=False)
    assert np.allclose(cold, 2 * 2 * 0.01)  # two arrays x two heads (summed) x 0.01
    both = cross_attention_map([high], token=[0, 2], normalize=False)
    assert np.isclose(both.max(), 2 * (1.0 + 0.01))
    sized = cross_attention_map([torch.tensor(low)], token=2, shape=(16, 16))
    assert sized.shape == (16, 16) and sized[5, 9] == sized.max()


def test_cross_attention_map_non_square_latents_with_aspect():
    attn = np.zeros((1, 2 * 3, 4))  # [heads=1, q=2x3, k_text=4]
    attn[0, 5, 1] = 1.0  # the bottom-right cell
    heat = cross_attention_map([attn], token=1, aspect=1.5)
    assert heat.shape == (2, 3) and heat[1, 2] == 1.0


def render(ax) -> tuple[np.ndarray, object]:
    canvas = FigureCanvasAgg(ax.get_figure())
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(int), canvas


def pixel_at(ax, rgb: np.ndarray, x: float, y: float) -> np.ndarray:
    """The rendered colour at data point (x, y) (image pixel coordinates)."""
    px, py = ax.transData.transform((x, y))
    return rgb[rgb.shape[0] - round(py), round(px)]


def test_image_overlay_colours_the_hot_region_only():
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    heat = np.zeros((4, 4))
    heat[2, 3] = 1.0  # pixels 32..47 x 48..63
    ax = image_overlay(heat, image, colorbar=False, alpha=0.8)
    layer = ax.images[-1]
    assert layer.get_array().shape == (64, 64)
    assert np.unravel_index(np.argmax(layer.get_array()), (64, 64)) in {(r, c) for r in (39, 40) for c in (55, 56)}
    over, _ = render(ax)
    plain, _ = render(image_overlay(np.zeros((4, 4)), image, colorbar=False))
    hot = [pixel_at(ax, over, x, y) - pixel_at(ax, plain, x, y) for x, y in [(56, 40), (55, 39)]]
    cold = [pixel_at(ax, over, x, y) - pixel_at(ax, plain, x, y) for x, y in [(5, 5), (20, 50), (60, 5)]]
    assert all(np.abs(d).sum() > 60 for d in hot)
    assert all(np.abs(d).sum() == 0 for d in cold)  # fade: where the heat is 0 the image shows as it is


def test_image_overlay_without_an_image_and_with_torch_layouts():
    heat = np.arange(12.0).reshape(3, 4)
    ax = image_overlay(heat, title="heat")
    assert np.array_equal(ax.images[0].get_array(), heat) and ax.get_title() == "heat"
    rgb, _ = render(ax)
    assert (np.abs(rgb - 255).sum(-1) > 60).mean() > 0.05
    chw = torch.rand(3, 20, 30)  # torch [C, H, W]
    ax = image_overlay(np.ones((2, 3)), chw, colorbar=False)
    assert ax.images[0].get_array().shape == (20, 30, 3) and ax.images[1].get_array().shape == (20, 30)
    grey = image_overlay(np.ones((2, 2)), np.random.default_rng(0).random((10, 10)), colorbar=False)
    assert grey.images[0].get_cmap().name == "gray"


def test_patch_overlay_draws_the_patch_map_and_grid():
    image = np.full((32, 32, 3), 0.5)
    ax = patch_overlay(cls_on_patch(2, 3), image)
    smooth = ax.images[-1].get_array()
    assert np.unravel_index(np.argmax(smooth), smooth.shape) in {(r, c) for r in (19, 20) for c in (27, 28)}
    assert len(ax.lines) == 6  # 3 + 3 inner patch boundaries
    assert "[CLS]" in ax.get_title()


def test_image_views_reject_bad_input():
    bad = [
        (lambda: patch_map(cls_on_patch(0, 0), prefix=2), "15 patches do not fill a square"),
        (lambda: patch_map(cls_on_patch(0, 0), grid=(3, 5)), "do not fill"),
        (lambda: patch_map(np.ones((1, 2, 5, 5))), "expected \\[heads, q, k\\] or \\[q, k\\]"),
        (lambda: patch_map(cls_on_patch(0, 0), query=17), "query=17"),
        (lambda: patch_map(cls_on_patch(0, 0), heads=2), "heads=2 for 2 heads"),
        (lambda: patch_map(cls_on_patch(0, 0), heads="median"), "heads='median'"),
        (lambda: cross_attention_map([np.ones((2, 15, 4))], token=0), "15 query positions do not fill a square"),
        (lambda: cross_attention_map([np.ones((2, 16, 4))], token=4), "token \\[4\\] for 4 text keys"),
        (lambda: cross_attention_map([np.ones(16)], token=0), "expected \\[heads, q, k_text\\]"),
        (lambda: cross_attention_map([], token=0), "no arrays"),
        (lambda: upsample(np.ones(4), (2, 2)), "expected 2 dimensions"),
        (lambda: image_overlay(np.ones((2, 2)), np.ones((5, 5, 2))), "expected \\[H, W\\]"),
        (lambda: image_overlay(np.ones((2, 2)), np.full((5, 5, 3), 255.0)), "divide by 255"),
    ]
    for call, message in bad:
        with pytest.raises(ViewError, match=message):
            call()


def test_docstring_examples_run():
    module = importlib.import_module("attnhooks.viewer.image")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0
