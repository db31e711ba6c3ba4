"""Views drawn from a store: :func:`render` reads what a view needs and hands arrays to it.

Every view here reads only the rows, keys and heads it draws. Heatmaps and model views of long
sequences are pooled while they are read, one row tile at a time (``q_len × k_len`` never sits in
memory); the overview uses the ``record="summary"`` reductions when the store has them.

Example:
    >>> st = attnhooks.open_store("run.zarr")  # doctest: +SKIP
    >>> render(st, "heatmap", module=3, head=5).savefig("l3h5.png")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from attnhooks.read.tiles import head_index
from attnhooks.viewer._common import ViewError, pool_blocks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from attnhooks.read.store import Store

__all__ = ["VIEWS", "pooled_attention", "render"]

FULL_LIMIT = 4096 * 4096  # cells of one head read whole; beyond, maps are pooled while read


@dataclass(frozen=True)
class Where:
    """Which call a view draws: a module (name, glob or self-attention layer index), step, sample, call."""

    store: Store
    module: str | int | None = None
    step: int | None = None
    sample: int = 0
    call: int = 0

    @cached_property
    def name(self) -> str:
        return self.store.resolve(self.module)

    def tokens(self) -> list[str] | None:
        ids, text = self.store.tokens(self.step, self.sample)
        return text if text is not None else ([str(i) for i in ids] or None)

    def reader(self, module: str | None = None) -> Any:
        return self.store.call_reader(module or self.name, self.step, self.sample, self.call)


def pooled_attention(
    store: Store,
    module: str,
    step: int | None = None,
    sample: int = 0,
    call: int = 0,
    *,
    heads: int | Sequence[int] | None = None,
    size: int = 512,
    how: str = "max",
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Attention of a whole call pooled to at most ``size × size`` cells, read one row tile at a time.

    Returns ``(pooled [h, P_q, P_k], visible [P_q, P_k] bool, (rows per cell, keys per cell))``:
    ``visible`` is False for cells no row of the block may attend (masked, NaN in ``pooled``).
    Memory: one tile of ``block rows × k_len`` per head, never ``q_len × k_len``.
    """
    pooled, visible, block, _ = _pool_tiles(store.call_reader(module, step, sample, call), heads, size, how, method)
    return pooled, visible, block


def _pool_tiles(
    reader: Any, heads: int | Sequence[int] | None, size: int, how: str, method: str
) -> tuple[np.ndarray, np.ndarray, tuple[int, int], np.ndarray]:
    """:func:`pooled_attention`, plus the attention each key receives ``[h, k_len]`` from the same reads."""
    index = np.arange(reader.layout.heads) if heads is None else np.atleast_1d(np.asarray(heads))
    block = (max(1, -(-reader.q_len // size)), max(1, -(-reader.k_len // size)))
    tile = block[0] * max(1, 256 // block[0])
    parts, seen, received = [], [], np.zeros((index.size, reader.k_len))
    for start in range(0, reader.q_len, tile):
        rows = slice(start, min(start + tile, reader.q_len))
        values = reader.read(index, rows, slice(0, reader.k_len), reader.method(method)).astype(np.float64)
        received += values.sum(axis=-2)
        allowed = reader.allowed(rows, slice(0, reader.k_len))
        values[:, ~allowed] = np.nan
        parts.append(pool_blocks(values, block, how))
        seen.append(pool_blocks(allowed[None].astype(np.float64), block, "max")[0] > 0)
    return np.concatenate(parts, axis=-2), np.concatenate(seen, axis=-2), block, received


# -- the views ------------------------------------------------------------------------------------
def _heatmap(
    where: Where, *, head: int = 0, rows: slice | None = None, cols: slice | None = None, method: str = "auto", **_: Any
) -> Figure:
    """One head: read exactly when the window is small enough, else pooled while read (whole calls only)."""
    from attnhooks.viewer.maps import heatmap

    reader = where.reader()
    r, c = range(reader.q_len)[rows or slice(None)], range(reader.k_len)[cols or slice(None)]
    rows, cols = slice(r.start, r.stop), slice(c.start, c.stop)
    title = f"{where.name} · head {head}"
    if len(r) * len(c) <= FULL_LIMIT:
        attn = where.store.attention(
            where.name, where.step, where.sample, where.call, heads=head, rows=rows, cols=cols, method=method
        )
        mask = reader.allowed(rows, cols)
        # an additive mask: its -inf entries are masked too
        dense = reader.dense(head_index(head, reader.layout.heads), rows, cols)
        if dense is not None:
            mask &= np.isfinite(dense[0])
        ax = heatmap(attn, tokens=where.tokens(), mask=mask, row_start=rows.start, col_start=cols.start, title=title)
        return _figure(ax)
    if (len(r), len(c)) != (reader.q_len, reader.k_len):
        raise ViewError(
            f"a window of {len(r)} x {len(c)} cells is too large to read whole: choose at most {FULL_LIMIT}"
        )
    pooled, visible, block = pooled_attention(
        where.store, where.name, where.step, where.sample, where.call, heads=head, size=256, method=method
    )
    return _figure(heatmap(pooled[0], mask=visible, title=title, cell=block))


def _model(where: Where, *, modules: str | Sequence[str] | None = None, method: str = "auto", **_: Any) -> Figure:
    from attnhooks.viewer.grids import model_view

    names = where.store.select(modules)
    layers = [
        pooled_attention(where.store, m, where.step, where.sample, where.call, size=64, method=method)[0] for m in names
    ]
    return model_view(layers, layer_names=names, tokens=where.tokens() if layers[0].shape[-1] <= 64 else None)


def _head(
    where: Where, *, heads: Sequence[int] | None = None, topk: int | None = None, method: str = "auto", **_: Any
) -> Figure:
    from attnhooks.viewer.head_view import head_view

    _square(where, [where.name])
    attn = where.store.attention(where.name, where.step, where.sample, where.call, method=method)
    tokens = where.tokens() or [str(i) for i in range(attn.shape[-1])]
    ax = head_view(attn, tokens, heads=list(heads) if heads else None, topk=topk, title=where.name)
    return _figure(ax)


def _qk(where: Where, *, head: int = 0, query: int = -1, method: str = "auto", **_: Any) -> Figure:
    from attnhooks.viewer.qk import qk_view

    st, name = where.store, where.name
    reader = where.reader()
    if not -reader.q_len <= query < reader.q_len:
        raise ViewError(
            f"query={query} is out of range: the call has {reader.q_len} query rows (valid: 0..{reader.q_len - 1}, "
            "or negative from the last)"
        )
    row = range(reader.q_len)[query]
    keys = slice(reader.k_offset, reader.k_offset + reader.k_stored)
    index, one = head_index(head, reader.layout.heads), slice(row, row + 1)
    q = reader.queries(index, one)[0, 0]  # one row of one head is read, no more
    k = reader.keys(index, keys)[0]  # its KV head's keys (GQA)
    visible = reader.allowed(one, keys)[0]
    dense = reader.dense(index, one, keys)  # an additive mask: T5's position bias
    bias = None if dense is None else dense[0, 0]
    if bias is not None:
        visible &= np.isfinite(bias)
    attn = st.attention(name, where.step, where.sample, where.call, heads=head, rows=row, cols=keys, method=method)
    tokens = where.tokens()
    return qk_view(
        q,
        k,
        query=reader.layout.info["q_offset"] + row,
        scale=reader.scale,
        mask=visible,
        softcap=reader.softcap or None,
        bias=None if bias is None else np.where(visible, bias, 0.0),
        attn=attn,
        tokens=tokens[keys] if tokens and len(tokens) >= keys.stop else None,
    )


def _rollout(
    where: Where, *, modules: str | Sequence[str] | None = None, query: int = 0, method: str = "auto", **_: Any
) -> Figure:
    from attnhooks.analysis import rollout
    from attnhooks.viewer.maps import rollout_view

    names = where.store.select(modules)
    layers = [
        where.store.attention(m, where.step, where.sample, where.call, method=method) for m in _square(where, names)
    ]
    return rollout_view(rollout(layers), tokens=where.tokens(), query=query, title=f"rollout over {len(names)} layers")


def _metrics(
    where: Where,
    *,
    modules: str | Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    method: str = "auto",
    **_: Any,
) -> Figure:
    from attnhooks.analysis import head_table
    from attnhooks.viewer.grids import metric_grids

    names = where.store.select(modules)
    table = head_table(where.store, where.step, where.sample, modules=names, call=where.call, method=method)
    return metric_grids(table, metrics=metrics)


def _overview(where: Where, *, head: int | None = None, method: str = "auto", **_: Any) -> Figure:
    """From the ``summary`` reductions when stored, else pooled (and summed) while reading row tiles."""
    from attnhooks.errors import NotInStoreError
    from attnhooks.viewer.maps import overview

    st, name, at = where.store, where.name, (where.step, where.sample, where.call)
    try:
        summary = st.summary(name, *at)
    except NotInStoreError:
        summary = {}
    if "pooled_max" in summary:
        maps = {key: summary.get(key) for key in ("pooled_max", "received", "band")}
        bins = tuple(int(b) for b in summary["pooled_bins"][:2])
    else:
        pooled, _visible, bins, received = _pool_tiles(where.reader(), None, 512, "max", method)  # masked cells: NaN
        maps = {"pooled_max": pooled, "received": received, "band": None}
    if head is not None:
        maps = {key: None if value is None else value[head] for key, value in maps.items()}
    return overview(
        maps["pooled_max"],
        received=maps["received"],
        band=maps["band"],
        bins=bins,
        q_start=where.reader().query_start(),
        title=name + (f" · head {head}" if head is not None else " · mean over heads"),
    )


def _compare(
    where: Where,
    *,
    against: Store | None = None,
    against_step: int | None = None,
    head: int = 0,
    method: str = "auto",
    **_: Any,
) -> Figure:
    from attnhooks.viewer.grids import compare_view

    other = Where(
        against or where.store,
        where.module,
        against_step if against_step is not None else where.step,
        where.sample,
        where.call,
    )
    a = where.store.attention(where.name, where.step, where.sample, where.call, heads=head, method=method)
    b = other.store.attention(other.name, other.step, other.sample, other.call, heads=head, method=method)
    return compare_view(
        a,
        b,
        tokens=where.tokens(),
        labels=(_label(where), _label(other)),
        mask=where.reader().allowed(slice(0, a.shape[0]), slice(0, a.shape[1])),
    )


def _divergence(
    where: Where,
    *,
    against: Store | None = None,
    against_step: int | None = None,
    modules: str | Sequence[str] | None = None,
    method: str = "auto",
    **_: Any,
) -> Figure:
    from attnhooks.viewer.grids import divergence_grid

    other = Where(
        against or where.store, None, against_step if against_step is not None else where.step, where.sample, where.call
    )
    names = where.store.select(modules)
    a = [where.store.attention(m, where.step, where.sample, where.call, method=method) for m in _square(where, names)]
    b = [other.store.attention(m, other.step, other.sample, other.call, method=method) for m in names]
    ax = divergence_grid(a, b, layer_names=names, title=f"JS divergence: {_label(where)} vs {_label(other)}")
    return _figure(ax)


def _patch(
    where: Where,
    *,
    modules: str | Sequence[str] | None = None,
    query: int = 0,
    prefix: int = 1,
    image: Any = None,
    use_rollout: bool = True,
    method: str = "auto",
    **_: Any,
) -> Figure:
    from attnhooks.analysis import rollout
    from attnhooks.viewer.image import image_overlay, patch_map

    names = where.store.select(modules) if use_rollout else [where.name]
    layers = [where.store.attention(m, where.step, where.sample, where.call, method=method) for m in names]
    source = rollout(layers) if use_rollout else layers[0]
    heat = patch_map(source, query=query, prefix=prefix)
    title = f"rollout over {len(names)} layers, row {query}" if use_rollout else f"{names[0]}, row {query}"
    return _figure(image_overlay(heat, image, title=title))


def _cross(
    where: Where,
    *,
    token: int | Sequence[int] = 1,
    modules: str | Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    image: Any = None,
    method: str = "auto",
    **_: Any,
) -> Figure:
    from attnhooks.viewer.image import cross_attention_map, image_overlay

    st = where.store
    names = st.select(modules, kind="cross")
    chosen = list(steps) if steps is not None else (st.steps if where.step is None else [where.step])
    layers = [
        st.attention(m, s, where.sample, c, method=method) for m in names for s in chosen for c in range(st.calls(m, s))
    ]
    if not layers:
        raise ViewError(f"no calls of {names} in steps {chosen}")
    heat = cross_attention_map(layers, token)
    tokens = where.tokens()
    picked = [token] if isinstance(token, int) else list(token)
    words = " ".join(tokens[t] for t in picked if tokens and t < len(tokens)) or str(picked)
    title = f"'{words}' over {len(names)} modules × {len(chosen)} steps"
    return _figure(image_overlay(heat, image, title=title))


VIEWS: dict[str, Callable[..., Figure]] = {
    "heatmap": _heatmap,
    "model": _model,
    "head": _head,
    "qk": _qk,
    "rollout": _rollout,
    "metrics": _metrics,
    "overview": _overview,
    "compare": _compare,
    "divergence": _divergence,
    "patch": _patch,
    "cross": _cross,
}


def render(
    store: Store,
    view: str,
    *,
    module: str | int | None = None,
    step: int | None = None,
    sample: int = 0,
    call: int = 0,
    **options: Any,
) -> Figure:
    """Draw ``view`` of a store and return the Figure (save it with ``fig.savefig(path)``).

    Args:
        store: an open :class:`~attnhooks.Store`.
        view: one of :data:`VIEWS`: ``heatmap`` (one head; ``head=``, ``rows=``/``cols=`` slices for
            a window), ``model`` (layer × head grid), ``head`` (BertViz-style lines; ``heads=``,
            ``topk=``), ``qk`` (one query's q, keys, q⊙k, scores and softmax; ``head=``,
            ``query=``), ``rollout``, ``metrics`` (head-metric grids), ``overview`` (long
            sequences: pooled map, attention received, diagonal band), ``compare`` / ``divergence``
            (``against=`` another store or ``against_step=``), ``patch`` (ViT patch attention;
            ``image=``) and ``cross`` (diffusion cross-attention of ``token=`` over the latent grid).
        module: a module name, a glob, or a self-attention layer index; default the first layer.
        step, sample, call: which call (``step`` None: the first stored step).
        options: the view's options above, and ``method`` (``"auto"``, ``"stored"``,
            ``"reconstructed"``).
    """
    if view not in VIEWS:
        raise ViewError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    return VIEWS[view](Where(store, module, step, sample, call), **options)


# -- small helpers --------------------------------------------------------------------------------
def _figure(ax: Any) -> Figure:
    fig: Figure = ax.get_figure(root=True)
    return fig


def _square(where: Where, names: Sequence[str]) -> Sequence[str]:
    """Refuse whole-matrix views of sequences too long to hold (rollout, divergence)."""
    for name in names:
        reader = where.reader(name)
        if reader.q_len * reader.k_len > FULL_LIMIT:
            raise ViewError(
                f"{name} has {reader.q_len} x {reader.k_len} attention: too large for this view; "
                "use 'overview' or 'heatmap'"
            )
    return names


def _label(where: Where) -> str:
    name = str(where.store.location).rstrip("/").split("/")[-1]
    return f"{name} step {where.step if where.step is not None else where.store.steps[0]}"
