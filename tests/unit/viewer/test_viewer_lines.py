"""attnhooks.viewer head view and query-key view: the lines and bars say what the attention says."""

from __future__ import annotations

import doctest
import importlib
import io
import re

import dask.array as da
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.image import AxesImage

from attnhooks.viewer._common import ViewError
from attnhooks.viewer.head_view import head_edges, head_view, head_view_grid
from attnhooks.viewer.qk import qk_scores, qk_view

TOKENS = ["The", "cat", "sat", "on", "the", "mat", ".", "!"]


def previous_token(n: int, noise: float = 0.0) -> np.ndarray:
    """[n, n]: row i puts 1 - noise on key i - 1 (row 0 on itself), the rest spread evenly."""
    a = np.full((n, n), noise / n)
    a[np.arange(n), np.maximum(np.arange(n) - 1, 0)] += 1 - noise
    return a


def edges_of(lines: LineCollection) -> list[tuple[int, int]]:
    """(query row, key) of each segment, read back from the y coordinates (x: 0 query, 1 key)."""
    out = []
    for seg in lines.get_segments():
        assert seg[0, 0] == 0.0 and seg[1, 0] == 1.0
        out.append((round(seg[0, 1]), round(seg[1, 1])))
    return out


def pixels(fig) -> np.ndarray:
    fig.set_dpi(50)  # enough to tell drawn from blank, and quick
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())


def not_blank(fig) -> None:
    rgb = pixels(fig)[..., :3].astype(int)
    assert (np.abs(rgb - 255).sum(-1) > 60).mean() > 0.01  # more than 1% of the pixels are drawn


# ---------------------------------------------------------------- head view


def test_previous_token_head_draws_exactly_the_previous_token_edges():
    attn = previous_token(8, noise=0.05)[None]  # [heads=1, 8, 8]; noise weights 0.00625 < min_weight
    ax = head_view(attn, TOKENS)
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert edges_of(lines) == [(0, 0)] + [(i, i - 1) for i in range(1, 8)]
    assert [t.get_text() for t in ax.get_yticklabels()] == TOKENS
    assert "edges < 0.01 hidden" in ax.get_title()
    not_blank(ax.get_figure())


def test_width_and_opacity_grow_with_the_weight():
    attn = np.random.default_rng(0).dirichlet(np.ones(6), size=6)  # [6, 6], one head
    ax = head_view(attn, min_weight=0.0)
    lines = ax.collections[0]
    weights = np.array([attn[i, j] for i, j in edges_of(lines)])
    assert len(weights) == 36
    widths, alphas = np.asarray(lines.get_linewidths()), lines.get_colors()[:, 3]
    assert edges_of(lines)[int(np.argmax(widths))] == np.unravel_index(np.argmax(attn), attn.shape)
    assert (np.argsort(widths) == np.argsort(weights)).all()
    assert (np.argsort(alphas) == np.argsort(weights)).all()


def test_topk_keeps_each_rows_largest_edges():
    attn = np.random.default_rng(1).dirichlet(np.ones(7), size=(2, 7))  # [heads=2, 7, 7]
    ax = head_view(attn, topk=1, min_weight=0.0)
    for h, lines in enumerate(ax.collections):
        assert edges_of(lines) == [(i, int(np.argmax(attn[h, i]))) for i in range(7)]
    assert "top 1 per row" in ax.get_title()
    rows, keys, weights = head_edges(attn[0], topk=2)
    assert np.bincount(rows).tolist() == [2] * 7
    assert np.array_equal(weights, attn[0][rows, keys])
    for i in range(7):
        assert set(keys[rows == i]) == set(np.argsort(-attn[0, i])[:2])


def test_a_second_head_gets_its_own_colour_and_its_own_edges():
    attn = np.stack([previous_token(5), np.eye(5)])  # head 0: previous token; head 1: self
    ax = head_view(attn, TOKENS[:5])
    prev, self_ = ax.collections
    assert edges_of(self_) == [(i, i) for i in range(5)]
    assert edges_of(prev)[1:] == [(i, i - 1) for i in range(1, 5)]
    assert not np.allclose(prev.get_colors()[0, :3], self_.get_colors()[0, :3])
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["head 0", "head 1"]
    only_one = head_view(attn, heads=[1])
    assert len(only_one.collections) == 1 and edges_of(only_one.collections[0]) == [(i, i) for i in range(5)]


def test_row_window_sits_level_with_its_keys():
    attn = previous_token(8)[-3:][None]  # [heads=1, q=3 (positions 5..7), k=8]
    ax = head_view(attn, TOKENS)
    assert edges_of(ax.collections[0]) == [(5, 4), (6, 5), (7, 6)]
    assert [t.get_text() for t in ax.get_yticklabels()] == TOKENS[5:]


def test_cross_attention_uses_key_tokens():
    attn = np.zeros((1, 2, 4))  # [heads=1, q=2, k=4]
    attn[0, 0, 3] = attn[0, 1, 0] = 1.0
    ax = head_view(attn, ["x", "y"], key_tokens=["a", "b", "c", "d"])
    (first, second) = ax.collections[0].get_segments()
    assert first[0, 1] == 0.0 and first[1, 1] == 3.0  # x (top) -> d (bottom)
    assert second[0, 1] == 3.0 and second[1, 1] == 0.0  # y (spread to the bottom) -> a


def test_past_max_tokens_falls_back_to_the_mean_heatmap():
    attn = np.stack([previous_token(30), np.eye(30)])
    ax = head_view(attn, max_tokens=20)
    assert not [c for c in ax.collections if isinstance(c, LineCollection)]
    (image,) = [i for i in ax.images if isinstance(i, AxesImage)]
    assert np.allclose(image.get_array(), attn.mean(0))
    assert "max_tokens=20" in ax.get_title() and "heatmap" in ax.get_title()
    for lazy in (torch.tensor(attn).bfloat16(), da.from_array(attn, chunks=(1, 30, 30))):  # mean taken before numpy
        assert np.allclose(head_view(lazy, max_tokens=20).images[0].get_array(), attn.mean(0), atol=1e-2)
    big = head_view(np.random.default_rng(0).dirichlet(np.ones(1100), size=(1, 1100)))
    assert big.images[0].get_array().shape == (367, 367)  # max-pooled 3x3 to at most 512 cells
    assert "max-pooled" in big.get_title()


def test_grid_one_panel_per_layer_and_exports():
    layers = np.stack([np.stack([previous_token(5)] * 2), np.stack([np.eye(5)] * 2)])  # [2, 2, 5, 5]
    fig = head_view_grid(layers, TOKENS[:5], layer_ids=[1, 0], cols=2)
    first, second = fig.axes[:2]
    assert first.get_title().startswith("layer 1") and second.get_title().startswith("layer 0")
    assert edges_of(first.collections[0]) == [(i, i) for i in range(5)]
    assert first.get_legend() is not None and second.get_legend() is None
    for fmt in ("png", "svg"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=50)
        assert buffer.tell() > 1000


def test_head_view_rejects_bad_input():
    bad = [
        (lambda: head_view(np.ones((1, 2, 4, 4))), "expected \\[heads, q, k\\]"),
        (lambda: head_view(np.ones((2, 4, 4)), heads=2), "head indices in 0..1"),
        (lambda: head_view(np.ones((1, 4, 4)), ["a", "b"]), "tokens has 2 strings"),
        (lambda: head_view(np.ones((1, 2, 3)), key_tokens=["a"]), "key_tokens has 1 strings"),
        (lambda: head_view(np.ones((1, 4, 4)), topk=0), "topk=0"),
        (lambda: head_view_grid(np.ones((2, 1, 3, 3)), layer_ids=[2]), "layer indices in 0..1"),
    ]
    for call, message in bad:
        with pytest.raises(ViewError, match=message):
            call()


# ---------------------------------------------------------------- query-key view


def make_qk(n: int = 8, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k random; q parallel to k[3], the longest key, so key 3 has the largest score."""
    k = np.random.default_rng(seed).normal(size=(n, d))
    k[3] *= 1.2 * np.linalg.norm(k, axis=1).max() / np.linalg.norm(k[3])
    return 0.5 * k[3], k


def panel(fig, name: str):
    (ax,) = [ax for ax in fig.axes if ax.get_label() == name]
    return ax


def bar_widths(ax) -> np.ndarray:
    """The signed length of each bar of a scores / softmax panel (corner 1 is (value, y - 0.4))."""
    (bars,) = [c for c in ax.collections if c.get_label() == "bars"]
    return np.array([path.vertices[1, 0] for path in bars.get_paths()])


def test_qk_scores_match_numpy_and_torch():
    q, k = make_qk()
    mask = np.arange(8) != 5
    products, scores, probs = qk_scores(q, k, mask=mask)
    direct = k @ q / np.sqrt(16)
    assert np.allclose(products, k * q) and np.allclose(products.sum(-1) / 4, direct)
    assert np.allclose(scores[mask], direct[mask]) and scores[5] == -np.inf
    reference = torch.softmax(torch.tensor(direct).masked_fill(~torch.tensor(mask), float("-inf")), dim=-1)
    assert np.allclose(probs, reference.numpy(), atol=1e-15) and probs[5] == 0.0
    _, capped, capped_probs = qk_scores(q, k, softcap=2.0, scale=0.5, bias=np.arange(8.0))
    expected = 2.0 * np.tanh(k @ q * 0.5 / 2.0) + np.arange(8.0)
    assert np.allclose(capped, expected)
    assert np.allclose(capped_probs, torch.softmax(torch.tensor(expected), -1).numpy())
    as_torch = qk_scores(torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32))
    assert np.allclose(as_torch[2], qk_scores(q, k)[2], atol=1e-6)


def test_qk_view_bars_show_the_scores_and_the_softmax():
    q, k = make_qk()
    mask = np.arange(8) <= 6  # key 7 masked
    fig = qk_view(q, k, query=6, tokens=TOKENS, mask=mask)
    _, scores, probs = qk_scores(q, k, mask=mask)
    score_bars, prob_bars = bar_widths(panel(fig, "scores")), bar_widths(panel(fig, "probs"))
    assert int(np.argmax(score_bars)) == 3 and int(np.argmax(prob_bars)) == 3
    assert np.allclose(score_bars[:7], scores[:7]) and np.allclose(prob_bars, probs)
    assert prob_bars[7] == 0.0 and score_bars[7] == 0.0 and np.isclose(prob_bars.sum(), 1.0)
    for name in ("scores", "probs"):  # key 7 is a hatched band, rows 6.5..7.5
        (band,) = [p for p in panel(fig, name).patches if p.get_hatch()]
        ys = band.get_path().transformed(band.get_patch_transform()).vertices[:, 1]
        assert np.isclose(ys.min(), 6.5) and np.isclose(ys.max(), 7.5)
    products = panel(fig, "qk").images[0].get_array()
    assert products.mask[7].all() and not products.mask[:7].any()
    assert np.allclose(products[:7], (k * q)[:7])
    assert [t.get_text() for t in panel(fig, "k").get_yticklabels()] == TOKENS
    info = panel(fig, "info").texts[0].get_text()
    assert "key 3 'on'" in info and "visible keys 7 / 8" in info and "query 6 '.'" in info
    not_blank(fig)


def test_qk_view_checks_the_stored_row():
    q, k = make_qk()
    _, _, probs = qk_scores(q, k)
    exact = panel(qk_view(q, k, attn=probs), "probs")
    diff = float(re.search(r"max \|p − attn\| = (\S+)", exact.get_title()).group(1))
    assert diff < 1e-12
    (markers,) = [line for line in exact.lines if line.get_label() == "stored"]
    assert np.allclose(markers.get_xdata(), probs)
    off = probs.copy()
    off[2] += 0.01
    diff = float(re.search(r"= (\S+)", panel(qk_view(q, k, attn=off), "probs").get_title()).group(1))
    assert np.isclose(diff, 0.01, rtol=1e-2)


def test_qk_view_shows_a_subset_of_keys_and_long_sequences_as_images():
    q, k = make_qk(n=300, d=8)
    fig = qk_view(q, k, keys=4, tokens=[f"t{i}" for i in range(300)])
    labels = [t.get_text() for t in panel(fig, "k").get_yticklabels()]
    _, _, probs = qk_scores(q, k)
    top = np.sort(np.argsort(-probs)[:4])
    assert labels == [f"{i} t{i}" for i in top]
    assert np.allclose(bar_widths(panel(fig, "probs")), probs[top])
    assert "showing 4 of 300 keys" in panel(fig, "info").texts[0].get_text()
    long = qk_view(q, k)
    assert panel(long, "k").images[0].get_array().shape == (300, 8)
    assert len(panel(long, "k").get_yticklabels()) <= 8  # positions, not 300 tokens
    assert int(np.argmax(bar_widths(panel(long, "scores")))) == 3


def test_qk_view_rejects_bad_input():
    q, k = make_qk()
    bad = [
        ({"k": np.ones((4, 3))}, "q has 16 dimensions"),
        ({"mask": np.ones(8)}, "expected bool \\[8\\]"),
        ({"mask": np.zeros(8, dtype=bool)}, "hides every key"),
        ({"keys": [0, 8]}, "key indices in 0..7"),
        ({"attn": np.ones(7)}, "expected the stored row \\[8\\]"),
        ({"tokens": ["a"]}, "tokens has 1 strings"),
        ({"softcap": 0.0}, "softcap=0.0"),
        ({"bias": np.ones(3)}, "bias has shape"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ViewError, match=message):
            qk_view(q, **{"k": k, **kwargs})


def test_docstring_examples_run():
    for name in ("head_view", "qk"):
        module = importlib.import_module(f"attnhooks.viewer.{name}")
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0
