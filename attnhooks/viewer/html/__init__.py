"""Interactive views in one self-contained HTML file, also shown inline in notebooks.

The head view (BertViz-style lines, one colour per head; hover a token to isolate its lines and read
its weights; layer and head selectors), the model view (the layer x head grid; click a cell to open
that head) and the query-key view (q, every k, q⊙k, the scores and the softmax of one query,
recomputed in the page from the stored q and k, beside the stored row). All JavaScript and data are
inside the file: it makes no network request of any kind and opens from disk in any modern browser.
Attention travels as float32 (the stored values; see :mod:`attnhooks.viewer.html.data` for the
packing), float16 past 32 MiB of float32 or when asked.

Example:
    >>> import numpy as np
    >>> from attnhooks.viewer.html import html_view
    >>> attn = np.full((2, 3, 4, 4), 0.25, dtype=np.float32)   # [layers, heads, q, k]
    >>> view = html_view(attn, tokens=["a", "b", "c", "d"])
    >>> view.save("/tmp/attnhooks-doctest.html").suffix
    '.html'

In Jupyter, VS Code or Colab, a view is displayed inline (``_repr_html_``: the page in an iframe,
no CDN needed).
"""

from __future__ import annotations

import html as _html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnhooks.errors import ViewError
from attnhooks.viewer.html.data import FORMAT, LayerData, ViewData, from_arrays, from_store
from attnhooks.viewer.html.page import page

if TYPE_CHECKING:
    from attnhooks.read.store import Store

__all__ = ["FORMAT", "VIEWS", "HtmlView", "LayerData", "ViewData", "html_view", "store_html"]

VIEWS = ("head", "model", "qk")


class HtmlView:
    """One page of interactive views: :attr:`html` (the document), :meth:`save`, and inline display
    in notebooks (:meth:`_repr_html_`)."""

    def __init__(self, data: ViewData) -> None:
        for v in data.views:
            if v not in VIEWS:
                raise ViewError(f"view {v!r} is not one of {VIEWS}")
        if not data.layers:
            raise ViewError("no module to show: select at least one module")
        self.data = data
        self.html = page(data.payload(), title=data.title)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the page to ``path`` (``.html``); returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.html, encoding="utf-8")
        return out

    @property
    def nbytes(self) -> int:
        """Size of the document in bytes (UTF-8)."""
        return len(self.html.encode("utf-8"))

    def _repr_html_(self) -> str:
        """The page inside an ``<iframe srcdoc>``: its script runs apart from the notebook's, with
        nothing loaded from a CDN (Jupyter, VS Code and Colab run it as it is)."""
        rows = max(max(layer.attn.shape[-2:]) for layer in self.data.layers)
        height = min(900, 200 + 16 * rows)
        return (
            f'<iframe srcdoc="{_html.escape(self.html, quote=True)}" title="{_html.escape(self.data.title)}" '
            f'style="width:100%;height:{height}px;border:0" loading="eager"></iframe>'
        )

    def __repr__(self) -> str:
        return f"<attnhooks HtmlView {self.data.title!r}: {len(self.data.layers)} module(s), {self.nbytes} bytes>"


def html_view(
    attention: Any,
    tokens: Sequence[str] | None = None,
    *,
    q: Any = None,
    k: Any = None,
    scale: float | None = None,
    mask: Any = None,
    names: Sequence[str] | None = None,
    views: Sequence[str] = VIEWS,
    title: str = "attnhooks",
    precision: str = "auto",
) -> HtmlView:
    """Interactive views of arrays.

    Args:
        attention: ``[layers, heads, q_len, k_len]`` probabilities (numpy or torch), a list of
            ``[heads, q_len, k_len]`` (or BertViz's ``[1, heads, n, n]``), or one ``[heads, q_len, k_len]``.
        tokens: ``k_len`` token strings (default: positions).
        q, k: ``[layers, heads, q_len, D]`` and ``[layers, kv_heads, k_len, D]`` (or lists) for the
            query-key view; ``scale`` default ``1/sqrt(D)``; ``mask`` ``[q_len, k_len]`` bool (True:
            visible) shared by every layer.
        names: one name per layer.
        views: which views the page offers, the first one opened (``"head"``, ``"model"``, ``"qk"``).
        title: the page's title.
        precision: ``"auto"``, ``"float32"`` or ``"float16"`` (half the size, values to ±0.05%).
    """
    layers = from_arrays(attention, tokens, q=q, k=k, scale=scale, mask=mask, names=names)
    n = layers[0].attn.shape[-1]
    words = list(tokens) if tokens is not None else [str(i) for i in range(n)]
    return HtmlView(ViewData(layers, words, title=title, precision=precision, views=tuple(views)))


def store_html(
    store: Store,
    modules: str | Sequence[str] | None = None,
    step: int | None = None,
    sample: int = 0,
    call: int = 0,
    *,
    views: Sequence[str] = VIEWS,
    method: str = "auto",
    precision: str = "auto",
    title: str | None = None,
    max_tokens: int = 2048,
) -> HtmlView:
    """Interactive views of one step of a store (what ``attnhooks html`` writes).

    Args:
        store: an open :class:`~attnhooks.read.store.Store`.
        modules: names or globs; default the self-attention modules (all modules when none is).
        step, sample, call: which call (``step`` None: the first stored step).
        views: as for :func:`html_view`; q and k go into the file only when ``"qk"`` is among them
            and the store holds them.
        method: ``"auto"``, ``"stored"`` or ``"reconstructed"`` (as :meth:`Store.attention`).
        precision: as for :func:`html_view`.
        max_tokens: longer calls are refused (use ``attnhooks serve``, which reads tiles).

    Example:
        >>> st = attnhooks.open_store("run.zarr")  # doctest: +SKIP
        >>> store_html(st, views=("model", "head")).save("run.html")  # doctest: +SKIP
    """
    if isinstance(modules, int):
        modules = [store.resolve(modules)]
    layers, tokens = from_store(
        store, modules, step, sample, call, method=method, qk="qk" in views, max_tokens=max_tokens
    )
    if not layers:
        raise ViewError(f"{store.location}: no module matches {modules!r}; its modules are {store.modules}")
    shown = step if step is not None else store.steps[0]
    label = title or f"{Path(str(store.location)).name} · step {shown} · sample {sample}"
    return HtmlView(ViewData(layers, tokens, title=label, precision=precision, views=tuple(views)))
