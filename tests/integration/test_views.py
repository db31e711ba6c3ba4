"""Views drawn from stores (attnhooks.viewer.stored.render): capture -> store -> figure, checked by content.

The model is built so that its attention is known: three heads per layer, a previous-token head,
a sink head (every row on key 0) and a self head, through ``F.scaled_dot_product_attention``
with a causal mask. A figure is right when its bright cells / thick lines are where those
patterns put them, for stores holding ``attn`` and stores holding only q, k and lse.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg

import attnhooks
from attnhooks.viewer import stored
from attnhooks.viewer.stored import pooled_attention, render

PREV, SINK, SELF = "prev", "sink", "self"


class Crafted(torch.nn.Module):
    """One causal attention call whose heads follow ``order`` (previous-token / sink / self)."""

    def __init__(self, order: tuple[str, ...]) -> None:
        super().__init__()
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        eye = torch.eye(n, n + 1)  # position one-hot, plus a spare dimension for the sink
        q = torch.stack([_queries(kind, eye, n) for kind in self.order])[None]
        k = eye.expand(len(self.order), n, n + 1).clone()
        k[:, 0, n] = 1.0
        v = torch.randn(1, len(self.order), n, 4)
        return F.scaled_dot_product_attention(q, k[None], v, is_causal=True, scale=1.0)


def _queries(kind: str, eye: torch.Tensor, n: int) -> torch.Tensor:
    if kind == PREV:
        return 30 * torch.roll(eye, 1, dims=0) if n > 1 else 30 * eye  # row i: e_{i-1} (row 0: e_{n-1}, masked)
    if kind == SINK:
        return 30 * torch.nn.functional.one_hot(torch.full((n,), n), n + 1).float()
    return 30 * eye


class Stack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([Crafted((PREV, SINK, SELF)), Crafted((SINK, SELF, PREV))])

    def forward(self, x: torch.Tensor) -> None:
        for layer in self.layers:
            layer(x)


def _store(tmp_path, n: int, record=("attn", "q", "k"), name="run.zarr"):
    torch.manual_seed(0)
    model = Stack()
    location = tmp_path / name
    with torch.no_grad(), attnhooks.capture(model, store=location, record=record, modules="layers.*"):
        model(torch.zeros(1, n, 1))
    return attnhooks.open_store(location)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("views"), 12)


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("views"), 12, record=("q", "k", "lse", "summary"))


def _pixels(fig) -> np.ndarray:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float)


def _not_blank(fig) -> None:
    assert _pixels(fig).std() > 10


@pytest.mark.parametrize("which", ["short", "rebuilt"])
def test_heatmap_puts_the_previous_token_head_below_the_diagonal(which, request):
    st = request.getfixturevalue(which)
    fig = render(st, "heatmap", module=0, head=0)
    image = fig.axes[0].images[0].get_array()
    rows = np.arange(1, 12)
    assert (np.argmax(image.filled(-1)[1:], axis=1) == rows - 1).all()
    assert image.mask[np.triu_indices(12, 1)].all()  # the causal mask is drawn as masked, not as 0
    assert not image.mask[np.tril_indices(12)].any()
    _not_blank(fig)


def test_long_heatmap_is_pooled_while_read_and_keeps_the_diagonal(tmp_path, monkeypatch):
    st = _store(tmp_path, 600, record=("q", "k", "lse"))
    monkeypatch.setattr(stored, "FULL_LIMIT", 100 * 100)  # force the pooled path on a small store
    pooled, visible, block = pooled_attention(st, st.modules[0], heads=2, size=100)
    assert block == (6, 6) and pooled.shape == (1, 100, 100)
    assert np.allclose(np.diagonal(pooled[0]), 1.0)  # the self head's weight 1 sits in the diagonal blocks
    assert not visible[0, 1] and visible[1, 0]  # blocks above the diagonal are masked
    fig = render(st, "heatmap", module=0, head=2)
    ax = fig.axes[0]
    assert "max over" in ax.get_title()
    image = ax.images[0].get_array()
    assert image.shape[0] <= 512
    assert (np.argmax(image.filled(-1), axis=1) == np.arange(image.shape[0])).all()
    assert max(float(t.get_text()) for t in ax.get_xticklabels() if t.get_text()) > 500  # ticks in positions


def test_model_view_shows_each_layers_patterns_on_one_scale(short):
    fig = render(short, "model")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 6  # 2 layers x 3 heads
    assert len({im.norm.vmax for im in images}) == 1
    sink_l1 = images[3].get_array()  # layer 1 head 0 is the sink head
    assert (np.argmax(np.ma.filled(sink_l1, -1), axis=1) == 0).all()
    self_l1 = images[4].get_array()
    assert (np.argmax(np.ma.filled(self_l1, -1), axis=1) == np.arange(12)).all()


def test_head_view_lines_follow_the_heads(short):
    fig = render(short, "head", module=0, topk=1)
    ax = fig.axes[0]
    prev, sink, self_ = ax.collections[:3]
    drops = {kind: _drops(c) for kind, c in ((PREV, prev), (SINK, sink), (SELF, self_))}
    spacing = np.abs(drops[SINK]).max() / 11  # the sink head's last row draws across 11 rows
    assert np.allclose(drops[SELF], 0)
    assert np.allclose(np.sort(np.abs(drops[PREV])), [0] + [spacing] * 11)  # row 0 can only see itself
    assert sorted(np.round(np.abs(drops[SINK]) / spacing).astype(int)) == list(range(12))


def _drops(collection) -> np.ndarray:
    """Vertical drop of each drawn edge (query y - key y), edges ordered by query y."""
    segments = sorted(collection.get_segments(), key=lambda s: -s[0][1])
    return np.array([s[0][1] - s[1][1] for s in segments])


@pytest.mark.parametrize("which", ["short", "rebuilt"])
def test_qk_view_recomputes_the_stored_row(which, request):
    st = request.getfixturevalue(which)
    fig = render(st, "qk", module=0, head=0, query=7)
    titles = " ".join(ax.get_title() for ax in fig.axes)
    diff = float(re.search(r"max \|p − attn\| = ([0-9.e+-]+)", titles).group(1))
    assert diff < 1e-6
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "query 7" in texts and "key 6" in texts  # the previous-token head's most attended key


def test_rollout_metrics_and_overview_render(short, rebuilt):
    fig = render(short, "rollout", query=-1)
    _not_blank(fig)
    bars = [p.get_height() for ax in fig.axes for c in ax.containers for p in c]
    assert len(bars) == 12 and abs(sum(bars) - 1) < 1e-6  # the last row's rollout over the 12 inputs
    fig = render(short, "metrics")
    titles = [ax.get_title() for ax in fig.axes]
    assert "previous" in titles and "sink" in titles
    previous = fig.axes[titles.index("previous")].images[0].get_array()
    assert previous[0, 0] > 0.85 and previous[1, 2] > 0.85  # layer 0 head 0, layer 1 head 2
    for st in (short, rebuilt):  # from the summary reductions, and pooled from tiles
        fig = render(st, "overview", module=1, head=0)
        assert "head 0" in fig.texts[0].get_text() if fig.texts else "head 0" in fig.get_suptitle()
        _not_blank(fig)


def test_compare_and_divergence(short, tmp_path):
    fig = render(short, "compare", module=0, head=0, against=short)
    difference = fig.axes[2].images[0].get_array()
    assert np.ma.filled(np.abs(difference), 0).max() == 0
    other = _store(tmp_path, 12, name="other.zarr")
    fig = render(short, "divergence", against=other)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (2, 3) and np.allclose(np.ma.filled(grid, 1), 0, atol=1e-9)


def test_patch_view_on_a_vit_store(tmp_path):
    from tests import models

    vit = models.vit()
    with torch.no_grad(), attnhooks.capture(vit, store=tmp_path / "vit.zarr"):
        vit(pixel_values=torch.randn(1, 3, 32, 32))
    st = attnhooks.open_store(tmp_path / "vit.zarr")
    image = np.random.default_rng(0).random((32, 32, 3))
    fig = render(st, "patch", image=image)
    assert "rollout over 2 layers" in fig.axes[0].get_title()
    _not_blank(fig)


def test_cross_view_on_a_unet_store(tmp_path):
    from tests import models

    unet = models.unet()
    with torch.no_grad(), attnhooks.capture(unet, store=tmp_path / "unet.zarr"):
        for t in (10, 500):
            unet(torch.randn(1, 4, 16, 16), t, encoder_hidden_states=torch.randn(1, 7, 32))
    st = attnhooks.open_store(tmp_path / "unet.zarr")
    assert st.select(kind="cross") != st.select(kind="self")
    fig = render(st, "cross", token=3)
    heat = fig.axes[0].images[-1].get_array()
    assert heat.shape == (16, 16) and np.isfinite(heat).all()
    _not_blank(fig)


def test_bad_requests_say_what_to_do(short):
    with pytest.raises(attnhooks.AttnHooksError, match="unknown view 'nope'"):
        render(short, "nope")
    with pytest.raises(LookupError, match="out of range"):
        render(short, "heatmap", module=5)
    with pytest.raises(LookupError, match="matches no module"):
        render(short, "heatmap", module="decoder.*")


def test_qk_view_adds_t5s_position_bias_and_stays_exact(tmp_path):
    from tests import models

    t5 = models.t5()
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad(), attnhooks.capture(t5, store=tmp_path / "t5.zarr"):
        t5(input_ids=ids, decoder_input_ids=ids[:, :5])
    st = attnhooks.open_store(tmp_path / "t5.zarr")
    module = "decoder.block.0.layer.0.SelfAttention"
    assert st.mask(module)["dense"] is not None  # the relative position bias (and the causal mask) as a dense mask
    fig = render(st, "qk", module=module, head=1, query=3)
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert float(re.search(r"max \|p − attn\| = ([0-9.e+-]+)", titles).group(1)) < 1e-6
