"""Query-key view: how one query row's attention arises from ``q`` and ``k`` (BertViz's neuron view).

BertViz's neuron view needs its own patched copies of BERT and GPT-2. This one needs only the
vectors: attnhooks stores the post-RoPE ``q`` and ``k`` that the kernel saw, so any captured model
works, and the stored attention row can be drawn over the recomputed softmax to check the capture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from attnhooks.viewer._common import (
    MASKED_COLOR,
    MAX_TOKEN_LABELS,
    ViewError,
    as_numpy,
    diverging_cmap,
    diverging_norm,
    label_fontsize,
    short_label,
)

__all__ = ["qk_scores", "qk_view"]

MAX_BARS = 1024  # past this many keys, bars become a filled step curve
PANELS = ("q", "k", "qk", "scores", "probs")  # the Axes labels (ax.get_label()) of qk_view's panels

Float = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]


def qk_scores(
    q: Any,
    k: Any,
    *,
    scale: float | None = None,
    mask: Any = None,
    softcap: float | None = None,
    bias: Any = None,
) -> tuple[Float, Float, Float]:
    """The products, scores and softmax of one query against every key, in float64.

    ``scores = softcap · tanh(q·k · scale / softcap) + bias`` (the softcap only when given, as
    in Gemma 2), ``-inf`` for masked keys, and ``probs = softmax(scores)`` over the visible keys.

    Args:
        q: ``[D]`` the query vector of one head at one position (post-RoPE, as captured).
        k: ``[n, D]`` every key of that head's KV head.
        scale: multiplies ``q·k``; default ``1 / sqrt(D)``.
        mask: ``[n]`` bool, True where the key is visible; None: all visible.
        softcap: logit soft-capping constant (> 0), or None.
        bias: ``[n]`` additive score bias (ALiBi, T5 relative positions), or None.

    Returns:
        ``products [n, D]`` (``k * q``, masked keys included), ``scores [n]``, ``probs [n]``
        (0 on masked keys, sums to 1).

    Example:
        >>> products, scores, probs = qk_scores([1.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], scale=1.0)
        >>> scores.tolist(), probs.round(4).tolist()
        ([1.0, 0.0], [0.7311, 0.2689])
    """
    qv = as_numpy(q, name="q", ndim=1)
    kv = as_numpy(k, name="k", ndim=2)
    n, d = kv.shape
    if qv.shape[0] != d:
        raise ViewError(f"q has {qv.shape[0]} dimensions but k is {kv.shape}: pass k as [n, D] of the same head")
    visible = _visible(mask, n)
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    products = kv * qv
    scores = products.sum(axis=-1) * float(scale)
    if softcap is not None:
        if not softcap > 0:
            raise ViewError(f"softcap={softcap}: use a positive constant (Gemma 2 uses 50.0), or None")
        scores = softcap * np.tanh(scores / softcap)
    if bias is not None:
        extra = as_numpy(bias, name="bias", ndim=1)
        if extra.shape != (n,):
            raise ViewError(f"bias has shape {extra.shape}; expected [{n}], one additive score per key")
        scores = scores + extra
    scores = np.where(visible, scores, -np.inf)
    weights = np.where(visible, np.exp(scores - scores[visible].max()), 0.0)
    return products, scores, weights / weights.sum()


def qk_view(
    q: Any,
    k: Any,
    *,
    query: int | None = None,
    scale: float | None = None,
    tokens: Sequence[str] | None = None,
    mask: Any = None,
    softcap: float | None = None,
    bias: Any = None,
    attn: Any = None,
    keys: int | Sequence[int] | None = None,
    fig: Figure | None = None,
) -> Figure:
    """Draw ``q``, ``k``, ``q ⊙ k``, the scores and the softmax of one query row; returns the Figure.

    Panels (their Axes labels, ``ax.get_label()``): ``"q"`` the query as a ``1 × D`` strip,
    ``"k"`` the keys ``n × D``, ``"qk"`` the products ``k * q`` (``n × D``, diverging colours,
    summing a row gives the raw score), ``"scores"`` and ``"probs"`` horizontal bars per key
    (masked keys are hatched bands, not bars). The panels share the key axis. With ``attn``, the
    stored row is drawn as circles over the softmax and ``max |p − attn|`` is in that panel's
    title: ~1e-7 for an exact float32 capture. Past 64 shown keys rows are labelled by position;
    past 512 the bars become a filled step curve.

    Args:
        q: ``[D]`` the query vector (post-RoPE, as captured) of row ``query``.
        k: ``[n, D]`` every key of the head's KV head.
        query: the query's position, for the title (and its token); None leaves it out.
        scale: multiplies ``q·k``; default ``1 / sqrt(D)``.
        tokens: the ``n`` keys' tokens; None labels positions.
        mask: ``[n]`` bool, True where the key is visible (causal: ``arange(n) <= query``); None: all.
        softcap: logit soft-capping constant (Gemma 2), or None.
        bias: ``[n]`` additive score bias (ALiBi, T5 relative positions), or None.
        attn: ``[n]`` the stored attention row, to check against the recomputed softmax.
        keys: which keys to show, in order (a list of indices), or an int ``m`` for the ``m``
            most attended keys in position order; None shows all. The softmax is always over
            every visible key.
        fig: an empty Figure to draw in; None makes one.

    Returns:
        The Figure.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> k = rng.normal(size=(6, 8))  # [n=6, D=8]
        >>> fig = qk_view(k[3] * 3, k, query=5)
        >>> [ax.get_label() for ax in fig.axes][:5]
        ['q', 'k', 'qk', 'scores', 'probs']
    """
    products, scores, probs = qk_scores(q, k, scale=scale, mask=mask, softcap=softcap, bias=bias)
    n, d = products.shape
    if tokens is not None and len(tokens) != n:
        raise ViewError(f"tokens has {len(tokens)} strings for {n} keys: pass one per key, or None")
    shown = _shown(keys, probs)
    visible = np.isfinite(scores)
    fig, axes = _layout(fig, len(shown), d)
    image = _draw_vectors(axes, as_numpy(q, name="q"), as_numpy(k, name="k")[shown], products[shown], visible[shown])
    fig.colorbar(image, cax=axes["bar"], orientation="horizontal").ax.tick_params(labelsize=7)
    _bars(axes["scores"], np.where(visible, scores, 0.0)[shown], visible[shown], ("#b2182b", "#2166ac"))
    _bars(axes["probs"], probs[shown], visible[shown], ("#3b528b", "#3b528b"))
    axes["probs"].set_xlim(0, max(1e-12, float(probs.max())) * 1.05)
    softcapped = f", softcap {softcap:g}" if softcap else ""
    effective = 1.0 / np.sqrt(d) if scale is None else scale
    axes["scores"].set_title(f"q·k × {effective:.3g}{softcapped}", fontsize=9)
    axes["probs"].set_title("softmax", fontsize=9)
    if attn is not None:
        _check_row(axes["probs"], attn, probs, shown)
    _label_keys(axes["k"], shown, tokens)
    _summary(axes["info"], query, tokens, probs, shown, visible, n)
    return fig


def _visible(mask: Any, n: int) -> Bool:
    """``mask`` as ``[n]`` bool (True = visible), all True for None; at least one key visible."""
    if mask is None:
        return np.ones(n, dtype=bool)
    if hasattr(mask, "detach"):  # torch, without importing it
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.dtype != np.bool_ or m.shape != (n,):
        raise ViewError(
            f"mask has dtype {m.dtype} and shape {m.shape}; expected bool [{n}] (True = visible): "
            "for an additive mask pass mask == 0"
        )
    if not m.any():
        raise ViewError("mask hides every key: a softmax needs at least one visible key")
    return m


def _shown(keys: int | Sequence[int] | None, probs: Float) -> npt.NDArray[np.intp]:
    """The key indices to show: all, the ``keys`` most attended (in position order), or ``keys``."""
    n = len(probs)
    if keys is None:
        return np.arange(n)
    if isinstance(keys, (int, np.integer)):
        if keys < 1:
            raise ViewError(f"keys={keys}: use a positive number of top keys, a list of indices, or None")
        return np.sort(np.argsort(-probs, kind="stable")[: int(keys)])
    shown = np.asarray(keys, dtype=np.intp).reshape(-1)
    if shown.size == 0 or shown.min() < 0 or shown.max() >= n:
        raise ViewError(f"keys={list(keys)}: use key indices in 0..{n - 1}")
    return shown


def _layout(fig: Figure | None, m: int, d: int) -> tuple[Figure, dict[str, Axes]]:
    """The panels: q over k, then q⊙k, scores and softmax, sharing the key axis; info top right."""
    body = float(np.clip(0.25 * m, 1.8, 9.5))  # inches: a quarter inch per key, up to 38 keys
    if fig is None:
        fig = Figure(figsize=(11.0, body + 1.9), layout="constrained")
    grid = fig.add_gridspec(2, 4, height_ratios=[0.3, body], width_ratios=[3, 3, 2, 2])
    axes: dict[str, Axes] = {"q": fig.add_subplot(grid[0, 0], label="q")}
    axes["k"] = fig.add_subplot(grid[1, 0], sharex=axes["q"], label="k")
    axes["qk"] = fig.add_subplot(grid[1, 1], sharey=axes["k"], label="qk")
    axes["scores"] = fig.add_subplot(grid[1, 2], sharey=axes["k"], label="scores")
    axes["probs"] = fig.add_subplot(grid[1, 3], sharey=axes["k"], label="probs")
    axes["bar"] = fig.add_subplot(grid[0, 1], label="colorbar")
    axes["info"] = fig.add_subplot(grid[0, 2:], label="info")
    axes["info"].set_axis_off()
    axes["k"].set_ylim(m - 0.5, -0.5)
    return fig, axes


def _draw_vectors(axes: dict[str, Axes], q: Float, k: Float, products: Float, visible: Bool) -> AxesImage:
    """q as a strip, k and q⊙k as images (masked keys' products in the masked colour)."""
    cmap = diverging_cmap()
    axes["q"].imshow(q[None, :], cmap=cmap, norm=diverging_norm(q), aspect="auto", interpolation="nearest")
    axes["q"].set_yticks([0], ["q"])
    axes["q"].tick_params(labelbottom=False)
    axes["k"].imshow(k, cmap=cmap, norm=diverging_norm(k), aspect="auto", interpolation="nearest")
    shown = np.where(visible[:, None], products, np.nan)
    image = axes["qk"].imshow(
        np.ma.masked_invalid(shown), cmap=cmap, norm=diverging_norm(products), aspect="auto", interpolation="nearest"
    )
    axes["qk"].tick_params(labelleft=False)
    axes["qk"].set_title("q ⊙ k", fontsize=9)
    for name in ("k", "qk"):
        axes[name].set_xlabel("dimension")
    axes["k"].set_title("k", fontsize=9)
    return image


def _bars(ax: Axes, values: Float, visible: Bool, colors: tuple[str, str]) -> None:
    """Bars per key (positive, negative colours; a filled step curve past MAX_BARS); masked keys hatched.

    The bars are one :class:`~matplotlib.collections.PolyCollection` labelled ``"bars"`` (a
    ``barh`` adds one patch per key and takes seconds for a few hundred keys); bar ``i`` is the
    rectangle from 0 to ``values[i]`` over rows ``i ± 0.4``.
    """
    y = np.arange(len(values), dtype=np.float64)
    values = np.where(visible, values, 0.0)
    if len(values) <= MAX_BARS:
        zero = np.zeros_like(values)
        corners = [(zero, y - 0.4), (values, y - 0.4), (values, y + 0.4), (zero, y + 0.4)]
        boxes = np.stack([np.stack(c, axis=-1) for c in corners], axis=1)  # [keys, 4 corners, xy]
        bars = PolyCollection(list(boxes), facecolors=np.where(values >= 0, colors[0], colors[1]).tolist(), lw=0)
        bars.set_label("bars")
        ax.add_collection(bars)
        ax.update_datalim([(float(values.min(initial=0.0)), 0.0), (float(values.max(initial=0.0)), 0.0)])
        ax.autoscale_view(scaley=False)
    else:
        ax.fill_betweenx(y, 0.0, values, step="mid", color=colors[0], linewidth=0, label="bars")
    for start, stop in _runs(~visible):
        ax.axhspan(start - 0.5, stop - 0.5, facecolor=MASKED_COLOR, edgecolor="white", hatch="///", lw=0, zorder=0)
    ax.axvline(0.0, color="0.4", lw=0.6)
    ax.tick_params(labelleft=False)


def _runs(flags: Bool) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of True in ``flags``."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _check_row(ax: Axes, attn: Any, probs: Float, shown: npt.NDArray[np.intp]) -> None:
    """Circles at the stored row's weights; ``max |p − attn|`` over every key in the title."""
    stored = np.nan_to_num(as_numpy(attn, name="attn", ndim=1), nan=0.0)
    if stored.shape != probs.shape:
        raise ViewError(f"attn has shape {stored.shape}; expected the stored row [{len(probs)}] of this query")
    diff = float(np.abs(stored - probs).max())
    ax.plot(stored[shown], np.arange(len(shown)), ls="none", marker="o", mfc="none", mec="black", ms=5, label="stored")
    ax.set_title(f"softmax (bars), stored (○)\nmax |p − attn| = {diff:.2e}", fontsize=9)


def _label_keys(ax: Axes, shown: npt.NDArray[np.intp], tokens: Sequence[str] | None) -> None:
    """Token (or position) per key up to MAX_TOKEN_LABELS shown keys; about 8 positions past that."""
    m = len(shown)
    subset = not np.array_equal(shown, np.arange(m))
    if m <= MAX_TOKEN_LABELS:
        names = [str(i) if tokens is None else short_label(tokens[i]) for i in shown]
        labels = [f"{i} {t}" if subset and tokens is not None else t for i, t in zip(shown, names)]
        ax.set_yticks(np.arange(m), labels, fontsize=label_fontsize(m))
    else:
        ticks = np.unique(np.linspace(0, m - 1, num=8).round().astype(int))
        ax.set_yticks(ticks, [str(shown[t]) for t in ticks])
    ax.set_ylabel("key")


def _summary(
    ax: Axes,
    query: int | None,
    tokens: Sequence[str] | None,
    probs: Float,
    shown: npt.NDArray[np.intp],
    visible: Bool,
    n: int,
) -> None:
    """A few lines of text: the query, the most attended key, how much of the row is shown."""
    top = int(np.argmax(probs))
    name = f" {tokens[top]!r}" if tokens is not None else ""
    lines = (
        []
        if query is None
        else [f"query {query}" + (f" {tokens[query]!r}" if tokens is not None and 0 <= query < n else "")]
    )
    lines.append(f"visible keys {int(visible.sum())} / {n}")
    lines.append(f"most attended: key {top}{name}, p = {probs[top]:.3f}")
    if len(shown) < n:
        lines.append(f"showing {len(shown)} of {n} keys: Σp = {probs[shown].sum():.3f}")
    lines.append("colours: blue < 0 < red; hatched: masked")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8, transform=ax.transAxes)
