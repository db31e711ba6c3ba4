"""Exact tiles of one stored call's attention: read from ``attn``, or rebuilt from q, k and lse.

Every probability of a call is ``p[h, i, j] = exp(s[h, i, j] - lse[h, i])`` with the scores
``s = cap(q_i · k_j · scale) + mask[i, j]`` (``cap`` the call's soft-capping, if any). With q, k,
the row log-sum-exp and the stored mask, any tile of rows × keys is rebuilt from exactly the rows of
q, the keys of k and the mask entries it covers: a window of a 16k-token head never allocates
16k × 16k. When lse was not stored it is computed from the whole rows, block by block.

Numpy only (the reader needs no torch). Shapes: ``q [heads, rows, head_dim]``,
``k [kv_heads, keys, head_dim]``; query head ``h`` reads key head ``h // (heads // kv_heads)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnhooks.backends.base import Backend
from attnhooks.errors import NotInStoreError, ReadOptionError, SelectionError
from attnhooks.lineage import key_slots
from attnhooks.read.softmax import logsumexp_blocks, probabilities
from attnhooks.read.visibility import Visibility

__all__ = ["CallLayout", "CallReader", "HeadSelection", "head_index", "span", "widen_bits"]

HeadSelection = int | slice | Sequence[int] | np.ndarray | None
METHODS = ("auto", "stored", "reconstructed")
_KEY_BLOCK = 4096  # keys per block when computing lse from whole rows


def span(value: slice | int | None, size: int, what: str) -> slice:
    """A contiguous, in-range ``slice(start, stop)`` of ``[0, size)`` (ints are one element)."""
    if value is None:
        return slice(0, size)
    if isinstance(value, (int, np.integer)):
        index = int(value) + size if value < 0 else int(value)
        if not 0 <= index < size:
            raise SelectionError(f"{what}={value} is out of range for {size} {what}")
        return slice(index, index + 1)
    if not isinstance(value, slice):
        raise SelectionError(
            f"{what}={value!r}: use an int, a contiguous slice such as slice(0, {min(size, 8)}), or None for all "
            f"{size} {what} (valid: 0..{size - 1})"
        )
    start, stop, step = value.indices(size)
    if step != 1:
        raise SelectionError(f"{what}={value}: only contiguous ranges (step 1) are supported")
    if stop < start:
        raise SelectionError(f"{what}={value} runs backwards: give slice(start, stop) with start <= stop in 0..{size}")
    return slice(start, stop)


def head_index(heads: HeadSelection, n_heads: int) -> np.ndarray:
    """The selected heads as an int array (in the order given)."""
    if heads is None:
        return np.arange(n_heads)
    if isinstance(heads, slice):
        return np.arange(n_heads)[heads]
    try:
        index = np.atleast_1d(np.asarray(heads, dtype=np.int64))
    except (TypeError, ValueError):
        raise SelectionError(
            f"heads={heads!r}: use None for all {n_heads} heads, an int, a slice or a list of ints in 0..{n_heads - 1}"
        ) from None
    if index.ndim != 1:
        raise SelectionError(f"heads={heads!r}: give a flat list of head indices in 0..{n_heads - 1}")
    index = np.where(index < 0, index + n_heads, index)
    if index.size and (index.min() < 0 or index.max() >= n_heads):
        raise SelectionError(f"heads={heads} is out of range: the call has {n_heads} heads (valid: 0..{n_heads - 1})")
    return index


@dataclass(frozen=True)
class CallLayout:
    """The ``info`` / ``scalars`` row of one call, and where its arrays live."""

    base: str
    position: int
    call: int
    sample: int
    info: dict[str, Any]
    heads: int
    kv_heads: int
    bits: bool
    leaves: frozenset[str]  # the module's arrays: attn, q, k, lse, mask/key_valid, mask/dense


class CallReader:
    """Reads tiles of one call of one module for one sample. See the module docstring."""

    def __init__(self, backend: Backend, layout: CallLayout) -> None:
        self.backend = backend
        self.layout = layout
        info = layout.info
        self.q_len, self.k_len = int(info["q_len"]), int(info["k_len"])
        self.k_offset, self.k_stored = int(info["k_offset"]), int(info["k_stored"])
        self.scale, self.softcap = float(info["scale"]), float(info["softcap"])
        self.causal = bool(info["causal"])
        self.window = None if info["window"] < 0 else int(info["window"])
        # stored row i sees key j <= i + diagonal (causal) and i + diagonal - j < window
        self.diagonal = int(info["q_offset"]) + int(info["mask_offset"])
        self.visibility = Visibility(self.causal, self.diagonal, self.window)
        self._rowkeys: np.ndarray | None = None
        self._stored_rows: np.ndarray | None = None
        self._key_valid: np.ndarray | None = None
        self._parent: np.ndarray | None = None

    # -- what exists ------------------------------------------------------------------------------
    def has(self, leaf: str) -> bool:
        return leaf in self.layout.leaves

    def method(self, requested: str) -> str:
        """``"stored"`` or ``"reconstructed"`` for a requested method (``"auto"`` prefers stored)."""
        if requested not in METHODS:
            raise ReadOptionError(f"method={requested!r}: use one of {METHODS}")
        can_rebuild = self.has("q") and self.has("k")
        if requested == "stored" or (requested == "auto" and self.has("attn")):
            if not self.has("attn"):
                raise NotInStoreError(
                    self._missing("stored attention ('attn')", "method='reconstructed'" * can_rebuild)
                )
            return "stored"
        if not can_rebuild:
            raise NotInStoreError(
                self._missing("q and k (needed to rebuild attention)", "method='stored'" * self.has("attn"))
            )
        return "reconstructed"

    def _missing(self, what: str, instead: str) -> str:
        stored = [t for t in ("attn", "q", "k", "lse") if self.has(t)]
        hint = f"; use {instead}" if instead else "; capture with record=('q', 'k', 'lse') or ('attn',)"
        return f"{self.layout.base} has no {what} (recorded: {stored}){hint}"

    @property
    def rowkeys(self) -> np.ndarray:
        """``[q_len]`` how many leading keys each stored row attended over."""
        if self._rowkeys is None:
            lay = self.layout
            self._rowkeys = self.backend.read(f"{lay.base}/rowkeys", (lay.position, lay.call, slice(0, self.q_len)))
        return self._rowkeys

    @property
    def key_valid(self) -> np.ndarray | None:
        """``[k_len]`` bool, False for padded keys; None when no key is padded."""
        if self._key_valid is None and self.layout.info["has_key_valid"]:
            lay = self.layout
            sel = (lay.position, lay.call, lay.sample, slice(0, self.k_len))
            valid = self.backend.read(f"{lay.base}/mask/key_valid", sel).astype(bool)
            # keys added later without padding information (a rolling cache's decode rows) are valid
            self._key_valid = np.pad(valid, (0, self.k_len - valid.size), constant_values=True)
        return self._key_valid

    @property
    def parent(self) -> np.ndarray | None:
        """``[batch, k_len]`` the slot preceding each key when the cache's slots were reordered (beam
        search; see :mod:`attnhooks.lineage`); None when every slot continued itself."""
        if self._parent is None and self.has("parent"):
            lay = self.layout
            parent = self.backend.read(
                f"{lay.base}/parent", (lay.position, lay.call, slice(None), slice(0, self.k_len))
            )
            self._parent = parent if bool((parent >= 0).any()) else np.zeros((0, 0), dtype=np.int64)
        return None if self._parent is None or self._parent.size == 0 else self._parent

    @property
    def stored_rows(self) -> np.ndarray:
        """``[q_len]`` bool: rows whose probabilities are stored (row windows may leave some out)."""
        if self._stored_rows is None:
            if self.has("attn_stored"):
                lay = self.layout
                sel = (lay.position, lay.call, slice(0, self.q_len))
                flags = self.backend.read(f"{lay.base}/attn_stored", sel).astype(bool)
                self._stored_rows = np.pad(flags, (0, self.q_len - flags.size))
            else:
                self._stored_rows = np.full(self.q_len, self.has("attn"))
        return self._stored_rows

    def read(self, heads: np.ndarray, rows: slice, cols: slice, method: str) -> np.ndarray:
        """Probabilities ``[h, r, c]`` by ``method``: ``"auto"`` reads the stored rows and rebuilds
        the others (row windows), ``"stored"`` refuses rows that were not stored."""
        if self.method(method) == "reconstructed":
            return self.reconstructed(heads, rows, cols)
        flags = self.stored_rows[rows]
        if flags.all():
            return self.stored(heads, rows, cols)
        if method == "stored" or not (self.has("q") and self.has("k")):
            spans = ", ".join(f"{a}..{b - 1}" for a, b in runs(self.stored_rows)) or "none"
            raise NotInStoreError(
                f"{self.layout.base}: attn is stored for rows {spans} only (row windows); rows {rows.start}.."
                f"{rows.stop - 1} need method='reconstructed' (or 'auto'), which needs q and k"
            )
        out = np.empty((heads.size, rows.stop - rows.start, cols.stop - cols.start), dtype=np.float32)
        start = rows.start
        for value in (True, False):
            for a, b in runs(flags if value else ~flags):
                part = slice(start + a, start + b)
                out[:, a:b] = self.stored(heads, part, cols) if value else self.reconstructed(heads, part, cols)
        return out

    def query_start(self) -> int:
        """Position of stored row 0 among the key positions (for distances and diagonals)."""
        return self.diagonal if self.causal else int(self.layout.info["q_offset"])

    # -- masks ------------------------------------------------------------------------------------
    def allowed(self, rows: slice, cols: slice) -> np.ndarray:
        """``[r, c]`` bool: which keys of ``cols`` each row of ``rows`` may attend (dense masks aside)."""
        return self.visibility.allowed(rows, cols, self.rowkeys[rows], self.key_valid)

    def key_counts(self, heads: np.ndarray, rows: slice) -> np.ndarray:
        """``[h, r]`` number of keys each row may attend (a dense mask's ``-inf`` entries excluded)."""
        counts = np.zeros((heads.size, rows.stop - rows.start), dtype=np.int64)
        for cols in _blocks(self.k_len, _KEY_BLOCK):
            ok = self.allowed(rows, cols)[None]
            dense = self.dense(heads, rows, cols)
            if dense is not None:
                ok = ok & np.isfinite(dense)
            counts += ok.sum(axis=-1)
        return counts

    def dense(self, heads: np.ndarray, rows: slice, cols: slice) -> np.ndarray | None:
        """The stored additive mask ``[h | 1, r, c]`` (float32), None when the mask is compact."""
        info, lay = self.layout.info, self.layout
        if not info["dense_batch"]:
            return None
        b = lay.sample if info["dense_batch"] > 1 else 0
        per_head = heads if info["dense_heads"] > 1 else np.zeros(1, dtype=np.int64)
        dense = self._take("mask/dense", per_head, rows, cols, sample=b)
        short = (rows.stop - rows.start - dense.shape[1], cols.stop - cols.start - dense.shape[2])
        if max(short) > 0:  # rows continued without a dense mask (e.g. a decode row): nothing added
            dense = np.pad(dense, ((0, 0), (0, max(0, short[0])), (0, max(0, short[1]))))
        return dense

    # -- tiles ------------------------------------------------------------------------------------
    def stored(self, heads: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
        """Stored probabilities ``[h, r, c]`` float32, zero beyond the keys each row attended."""
        attn = self._take("attn", heads, rows, cols).astype(np.float32, copy=False)
        self._require_attn(heads, rows, cols)
        beyond = np.arange(cols.start, cols.stop)[None, :] >= self.rowkeys[rows][:, None]
        return np.where(beyond[None], np.float32(0.0), attn) if beyond.any() else attn

    def _require_attn(self, heads: np.ndarray, rows: slice, cols: slice) -> None:
        """Every chunk the writer wrote under this read must exist: each row was written over the
        keys it attended, so in each band of rows, the keys every row of the band attended."""
        require = getattr(self.backend, "require", None)  # (attnhooks.read.integrity.CheckedBackend)
        if require is None or heads.size == 0:
            return
        lay = self.layout
        rowkeys = self.rowkeys
        for start in range(rows.start, rows.stop, _REQUIRE_BAND):
            band = slice(start, min(start + _REQUIRE_BAND, rows.stop))
            keys = min(cols.stop, int(rowkeys[band].min()))
            if keys > cols.start:
                sel = (lay.position, lay.call, lay.sample, slice(int(heads.min()), int(heads.max()) + 1))
                require(f"{lay.base}/attn", (*sel, band, slice(cols.start, keys)))

    def reconstructed(self, heads: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
        """Probabilities ``[h, r, c]`` float32 rebuilt from q, k and lse (computed when not stored)."""
        live = self._live_cols(rows, cols)
        if heads.size == 0 or live.stop <= live.start or rows.stop <= rows.start:
            return np.zeros((heads.size, rows.stop - rows.start, cols.stop - cols.start), dtype=np.float32)
        lse = self.lse(heads, rows)
        p = probabilities(self.scores(heads, rows, live), lse)
        if live == cols:
            return p
        out = np.zeros((heads.size, rows.stop - rows.start, cols.stop - cols.start), dtype=np.float32)
        out[:, :, live.start - cols.start : live.stop - cols.start] = p
        return out

    def scores(self, heads: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
        """Masked scores ``[h, r, c]`` float32 (``-inf`` where a key may not be attended)."""
        q = self.queries(heads, rows)
        if self.parent is None:
            s = np.matmul(q, self.keys(heads, cols).transpose(0, 2, 1))
        else:  # each row reads the keys of its own history: [h, r, c, d]
            slots = key_slots(self.parent, self.layout.sample, self.rowkeys[rows])
            slots = np.pad(slots, ((0, 0), (0, max(0, cols.stop - slots.shape[1]))), constant_values=self.layout.sample)
            k = self.keys(heads, cols, samples=slice(None))[:, slots[:, cols], np.arange(cols.stop - cols.start)]
            s = np.einsum("hrd,hrcd->hrc", q, k)
        s *= np.float32(self.scale)
        if self.softcap:
            cap = np.float32(self.softcap)
            s = np.tanh(s / cap) * cap
        dense = self.dense(heads, rows, cols)
        if dense is not None:
            s += dense
        np.copyto(s, np.float32(-np.inf), where=~self.allowed(rows, cols)[None])
        out: np.ndarray = s.astype(np.float32, copy=False)
        return out

    def lse(self, heads: np.ndarray, rows: slice) -> np.ndarray:
        """Row log-sum-exp ``[h, r]`` float32: stored, or computed over the whole rows in key blocks."""
        if self.has("lse"):
            return self._take("lse", heads, rows).astype(np.float32, copy=False)
        blocks = _blocks(self._live_cols(rows, slice(0, self.k_len)).stop, _KEY_BLOCK)
        return logsumexp_blocks(
            (self.scores(heads, rows, cols) for cols in blocks), (heads.size, rows.stop - rows.start)
        )

    def _live_cols(self, rows: slice, cols: slice) -> slice:
        """The part of ``cols`` that some row of ``rows`` may attend (causal / window / rowkeys)."""
        rowkeys = self.rowkeys[rows] if rows.stop > rows.start else np.zeros(0, dtype=np.int64)  # no read for no rows
        return self.visibility.live_cols(rows, cols, rowkeys)

    def queries(self, heads: np.ndarray, rows: slice) -> np.ndarray:
        """Queries ``[h, r, d]`` (float32) of the selected heads and rows."""
        return self._take("q", heads, rows).astype(np.float32, copy=False)

    def keys(self, heads: np.ndarray, cols: slice, samples: slice | None = None) -> np.ndarray:
        """Keys ``[h, c, d]`` for each selected query head (GQA: its key head, repeated); with
        ``samples``, of those batch slots: ``[h, slots, c, d]``."""
        lay = self.layout
        kv = heads // (lay.heads // lay.kv_heads)
        if cols.start < self.k_offset or cols.stop > self.k_offset + self.k_stored:
            raise NotInStoreError(
                f"{lay.base}: keys {cols.start}..{cols.stop - 1} are needed but only keys {self.k_offset}.."
                f"{self.k_offset + self.k_stored - 1} were stored (the capture began inside this call's KV stream)"
            )
        keys = slice(cols.start - self.k_offset, cols.stop - self.k_offset)
        return self._take("k", kv, keys, sample=samples).astype(np.float32, copy=False)

    def _take(self, leaf: str, heads: np.ndarray, *inner: slice, sample: int | slice | None = None) -> np.ndarray:
        """``leaf[position, call, sample, heads, *inner]``: one read over the heads' range, then the
        heads in the order given (bfloat16 bits widened); with a ``sample`` slice, heads first:
        ``[heads, samples, *inner]``."""
        lay = self.layout
        low = int(heads.min()) if heads.size else 0
        high = int(heads.max()) + 1 if heads.size else 0
        sel: tuple[int | slice, ...] = (lay.position, lay.call, lay.sample if sample is None else sample)
        out = self.backend.read(f"{lay.base}/{leaf}", (*sel, slice(low, high), *inner))
        if self.layout.bits and leaf in ("q", "k"):
            out = widen_bits(out)
        if isinstance(sample, slice):
            out = np.moveaxis(out, 1, 0)
        if heads.size == high - low and bool((np.diff(heads) == 1).all()):
            return out  # the heads are the range read, in order: no copy
        taken: np.ndarray = out[heads - low]
        return taken


_REQUIRE_BAND = 128  # rows checked together for missing attn chunks (the smallest chunk height is 16)


def widen_bits(bits: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bits (uint16) as float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of True in a bool vector."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]
