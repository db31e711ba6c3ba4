"""The tensor reads of a store, one call at a time: :class:`TensorReads`.

:class:`~attnhooks.read.store.Store` inherits these methods; this module keeps them apart from
opening, rank sets and the catalogue. Each method reads the rank given by ``rank=`` (default: the
store's own) and finds the call through that rank's :class:`~attnhooks.read.catalog.Catalog`.
Numpy only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from attnhooks.backends.base import Backend
from attnhooks.errors import NotInStoreError
from attnhooks.read.catalog import Catalog
from attnhooks.read.tiles import CallReader, HeadSelection, head_index, span, widen_bits
from attnhooks.schema import ROWWISE

__all__ = ["ReaderCache", "TensorReads"]

ReaderKey = tuple[str, int, int, int]  # module, step position, sample, call


class ReaderCache:
    """The call readers opened last (each caches its rowkeys and key padding), safe across threads.

    Args:
        size: how many readers to keep; the least recently used goes first.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._lock = threading.Lock()  # dask may read from several threads
        self._readers: OrderedDict[ReaderKey, CallReader] = OrderedDict()

    def __len__(self) -> int:
        return len(self._readers)

    def get(self, key: ReaderKey, open_reader: Callable[[], CallReader]) -> CallReader:
        """The reader kept under ``key``, else a new one from ``open_reader()`` (called unlocked)."""
        with self._lock:
            reader = self._readers.get(key)
            if reader is not None:
                self._readers.move_to_end(key)
                return reader
        reader = open_reader()
        with self._lock:
            self._readers[key] = reader
            while len(self._readers) > self.size:
                self._readers.popitem(last=False)
        return reader

    def clear(self) -> None:
        with self._lock:
            self._readers.clear()


class TensorReads:
    """Attention tiles, q, k, lse, masks, summaries and tokens of single calls.

    A base class: the class that inherits it sets :attr:`backend`, :attr:`data` and :attr:`catalog`
    (one rank's) and says in :meth:`_at` which object reads a given rank.
    """

    backend: Backend
    data: Backend  # the backend with checked reads of the tensors (attnhooks.read.integrity)
    catalog: Catalog

    def __init__(self) -> None:
        self._readers = ReaderCache()

    def _at(self, rank: int | None) -> TensorReads:
        """The reads of ``rank`` (None: this object's own rank)."""
        raise NotImplementedError

    def attention(
        self,
        module: str,
        step: int | None = None,
        sample: int = 0,
        call: int = 0,
        *,
        heads: HeadSelection = None,
        rows: slice | int | None = None,
        cols: slice | int | None = None,
        method: str = "auto",
        rank: int | None = None,
    ) -> np.ndarray:
        """Exact probabilities ``[heads, rows, cols]`` (float32) of one call and sample.

        Reads the stored ``attn`` when there is one, otherwise rebuilds the tile from q, k and lse
        (see :mod:`attnhooks.read.tiles`): only the rows of q, the keys of k and the mask entries the
        tile covers are read, so a window of a long sequence never costs ``q_len × k_len``.
        Rows of a KV-cache stream are zero beyond the keys that existed when they were computed,
        exactly as in the model's full causal matrix.

        Args:
            module, step, sample, call: which call (``step`` None: the first stored step).
            heads: an int (drops the axis), a slice or a list of head indices; default all.
            rows: query rows (int drops the axis, slices must be contiguous); default all.
            cols: keys, as ``rows``.
            method: ``"auto"`` (stored when available), ``"stored"`` or ``"reconstructed"``.
            rank: which rank of a store written under ``torch.distributed`` (default: the lowest).

        Example:
            >>> st.attention("model.layers.0.self_attn", step=0, heads=3, rows=slice(-256, None))  # doctest: +SKIP
        """
        reader = self.call_reader(module, step, sample, call, rank=rank)
        index = head_index(heads, reader.layout.heads)
        row_span, col_span = span(rows, reader.q_len, "rows"), span(cols, reader.k_len, "cols")
        out = reader.read(index, row_span, col_span, method)
        squeeze = tuple(axis for axis, sel in enumerate((heads, rows, cols)) if isinstance(sel, (int, np.integer)))
        return out.squeeze(squeeze) if squeeze else out

    def row_tiles(
        self,
        module: str,
        step: int | None = None,
        sample: int = 0,
        call: int = 0,
        *,
        heads: HeadSelection = None,
        tile: int = 512,
        method: str = "auto",
        rank: int | None = None,
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(rows, probabilities [heads, len(rows), k_len])`` over all query rows, ``tile``
        rows at a time: analysis of a long sequence holds one tile, never the whole matrix."""
        reader = self.call_reader(module, step, sample, call, rank=rank)
        index = head_index(heads, reader.layout.heads)
        reader.method(method)  # refuses at once what cannot be read
        for start in range(0, reader.q_len, max(1, tile)):
            rows = slice(start, min(start + tile, reader.q_len))
            yield rows, reader.read(index, rows, slice(0, reader.k_len), method)

    def summary(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> dict[str, np.ndarray]:
        """The call's ``record="summary"`` reductions (see :mod:`attnhooks.reduce`), one sample:
        ``entropy``, ``sink`` ``[heads, q_len]``; ``topk_index`` / ``topk_weight`` ``[heads, q_len, K]``;
        ``band`` ``[heads, q_len, W]``; ``received`` ``[heads, k_len]``; ``pooled_max`` /
        ``pooled_mean`` ``[heads, P_q, P_k]`` and ``pooled_bins`` (rows per bin, keys per bin, P_q, P_k)."""
        st = self._at(rank)
        lay = st.catalog.layout(module, step, sample, call)
        if "summary" not in lay.leaves:
            raise NotInStoreError(f"{module!r} has no summary in this store: capture with record=('summary', ...)")
        out: dict[str, np.ndarray] = {}
        lead = (lay.position, call, sample)
        for name in st.backend.children(f"{lay.base}/summary"):
            path = f"{lay.base}/summary/{name}"
            if name in ROWWISE:
                out[name] = st.data.read(path, (*lead, slice(None), slice(0, lay.info["q_len"])))
            elif name == "received":
                out[name] = st.data.read(path, (*lead, slice(None), slice(0, lay.info["k_len"])))
            elif name == "pooled_bins":
                out[name] = st.data.read(path, lead)
        if "pooled_bins" in out:
            pq, pk = (int(x) for x in out["pooled_bins"][2:])
            for name in ("pooled_max", "pooled_mean"):
                path = f"{lay.base}/summary/{name}"
                out[name] = st.data.read(path, (*lead, slice(None), slice(0, pq), slice(0, pk)))
        return out

    def call_reader(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> CallReader:
        """The :class:`~attnhooks.tiles.CallReader` of one call: masks, key counts, tiles."""
        st = self._at(rank)
        key = (module, st.catalog.position(step), sample, call)
        return st._readers.get(key, lambda: CallReader(st.data, st.catalog.layout(module, step, sample, call)))

    def q(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> np.ndarray:
        """Queries ``[heads, q_len, head_dim]`` as the kernel received them."""
        return self._at(rank)._rows_of(module, step, call, sample, "q", "q_len")

    def k(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> np.ndarray:
        """Keys ``[kv_heads, k_stored, head_dim]`` (positions from ``info()["k_offset"]``)."""
        return self._at(rank)._rows_of(module, step, call, sample, "k", "k_stored")

    def lse(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> np.ndarray:
        """Row log-sum-exp of the scores ``[heads, q_len]`` (float32)."""
        return self._at(rank)._rows_of(module, step, call, sample, "lse", "q_len")

    def mask(
        self, module: str, step: int | None = None, sample: int = 0, call: int = 0, *, rank: int | None = None
    ) -> dict[str, Any]:
        """The call's mask: ``causal``, ``offset`` (row i sees keys ``j <= i + offset``),
        ``window`` (None or int), ``key_valid`` (bool ``[k_len]`` or None), ``dense`` (additive
        float32 ``[heads|1, q_len, k_len]`` or None)."""
        st = self._at(rank)
        lay = st.catalog.layout(module, step, sample, call)
        pos, meta = lay.position, lay.info
        key_valid = None
        if meta["has_key_valid"]:
            key_valid = st.backend.read(lay.base + "/mask/key_valid", (pos, call, sample, slice(0, meta["k_len"])))
        dense = None
        if meta["dense_batch"]:
            b = sample if meta["dense_batch"] > 1 else 0
            sel = (pos, call, b, slice(0, meta["dense_heads"]), slice(0, meta["q_len"]), slice(0, meta["k_len"]))
            dense = st.backend.read(lay.base + "/mask/dense", sel)
        return {
            "causal": bool(meta["causal"]),
            "offset": meta["mask_offset"],
            "window": None if meta["window"] < 0 else meta["window"],
            "key_valid": key_valid,
            "dense": dense,
        }

    def tokens(
        self, step: int | None = None, sample: int = 0, *, rank: int | None = None
    ) -> tuple[list[int], list[str] | None]:
        """Token ids (and strings, when stored) of one sample of ``step``; ``([], None)`` when none."""
        st = self._at(rank)
        pos = st.catalog.position(step)
        be = st.backend
        if not be.contains("tokens/ids") or be.shape("tokens/ids")[0] <= pos:
            return [], None
        if not 0 <= sample < be.shape("tokens/ids")[1]:
            raise NotInStoreError(f"sample={sample} is out of range: step {st.catalog.steps[pos]} stored fewer samples")
        ids = be.read("tokens/ids", (pos, sample))
        n = int((ids >= 0).sum())
        text = None
        if be.contains("tokens/text") and be.shape("tokens/text")[0] > pos:
            text = [str(t) for t in be.read("tokens/text", (pos, sample, slice(0, n)))]
        return [int(i) for i in ids[:n]], text

    def _rows_of(self, module: str, step: int | None, call: int, sample: int, leaf: str, length: str) -> np.ndarray:
        """One sample's ``leaf`` (q, k or lse) of a call, its sequence axis cut to ``info()[length]``."""
        lay = self.catalog.layout(module, step, sample, call, leaf=leaf)
        sel = (lay.position, call, sample, slice(None), slice(0, lay.info[length]))
        out = self.data.read(f"{lay.base}/{leaf}", sel)
        return widen_bits(out) if leaf != "lse" and lay.bits else out
