"""The arrays of a store being written: where a call's block goes, each array's shape (created on
first use, grown as steps and sequences come), its chunks, its codec and its storage dtype.

Every record array is ``[steps, calls, batch, ...]``: a step's position, the call within the step,
then the call's own axes (see :mod:`attnhooks.schema`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from attnhooks.backends.base import Backend, Codec
from attnhooks.capturing.record import Record
from attnhooks.schema import module_path
from attnhooks.write.options import StoreOptions

__all__ = ["ArrayLayout", "chunk_shape", "pow2", "storage_dtype"]

_CHUNK_BYTES = 8 << 20
_SMALL_CHUNK_BYTES = 1 << 20  # below this, chunks grow over heads and samples: fewer, larger writes
_RAW_LEAVES = frozenset(
    {"q", "k", "lse", *(f"summary/{name}" for name in ("entropy", "topk_weight", "received", "sink", "band"))}
)  # written without compression by default: see ArrayLayout.codec_for
STEP_CHUNK = 1024  # steps per chunk of the one-value-per-step tables (``steps``, ``calls``)
_MIN_STEPS = 64  # step-axis capacity of a new array; it doubles when full (readers go by ``committed``)
_FILLS = {"mask/key_valid": True, "lse": -np.inf, "parent": -1}  # record leaves not filled with 0


class ArrayLayout:
    """The arrays of one store over its backend. Only the writer thread uses it: it caches every
    array's shape, since it alone changes them.

    Attributes:
        backend: the store's backend.
        options: the capture's store options (``dtype=`` and ``compression=`` matter here).
        codec: the store's codec (``compression=``, else the backend's default).
        bytes_written: bytes of record blocks written through :meth:`put`.
    """

    def __init__(self, backend: Backend, options: StoreOptions, fresh: bool = False) -> None:
        self.backend = backend
        self.options = options
        self.fresh = fresh  # the store held nothing when this writer began: no array exists that it did not make
        self.codec = options.codec or backend.default_codec
        # the codecs of record arrays stored raw or not, and of tables, made once (a replace is ~10 µs)
        self._leaf_codecs = {
            raw: dataclasses.replace(Codec("none", 0) if raw else self.codec, skip_empty=False) for raw in (True, False)
        }
        self._table_codec = dataclasses.replace(self.codec, name="none", level=0, skip_empty=False, rewritten=True)
        self.bytes_written = 0
        self._shapes: dict[str, tuple[int, ...] | None] = {}
        self._cells: dict[str, tuple[int, np.ndarray]] = {}  # put_cell: (first step, values) of a chunk
        self._created: set[str] = set()  # arrays this writer created (nothing to read back from them)

    # -- record arrays ------------------------------------------------------------------------
    def put(
        self, module: Mapping[str, Any], leaf: str, base: tuple[int, int], inner: tuple[slice, ...], value: np.ndarray
    ) -> None:
        """Write ``value`` (a call's ``[batch, ...]`` block) at ``[pos, call, :batch, *inner]`` of the
        module's array ``leaf``, creating or growing the array as needed.

        Args:
            module: the module's attributes (its ``name``, ``dtype`` and ``source_dtype``).
            leaf: the array within the module (``"q"``, ``"attn"``, ``"summary/entropy"``, ...).
            base: ``(pos, call)``.
            inner: slices of the block's axes after the batch; a missing one is the whole axis.
            value: ``[batch, ...]``.
        """
        path = module_path(module["name"], leaf)
        sel = _inner_selection(value.shape, inner)
        need = (base[0] + 1, base[1] + 1, *(s.stop for s in sel))
        if self.shape_of(path) is None:
            fill = _FILLS.get(leaf, 0)
            chunks = chunk_shape(need, value.dtype.itemsize, leaf)
            self._new_array(path, need, value.dtype.name, chunks, fill, self.codec_for(leaf, module))
        self._grow(path, need)
        self.backend.write(path, (*base, *sel), value)
        self.bytes_written += value.nbytes

    def codec_for(self, leaf: str, module: Mapping[str, Any]) -> Codec:
        """The store's codec; but float arrays of model-derived values (q, k, lse and the row
        summaries, in the model's own float dtype) are written raw unless ``compression=`` was
        given: zstd-1 saves 7-15% on them for 2.2x the writer's CPU (measured: 3.4 s vs 1.55 s per
        576 MiB of q), CPU a capture takes from the model's threads. Their chunks are never all
        zeros, so zarr's check for empty chunks is skipped too (1.25 s -> 0.61 s per 576 MiB).
        attn (exact zeros under masks), the overview maps, indices and masks compress 2-5x and
        stay compressed; so does widened bfloat16 (its low halves are zeros)."""
        if leaf not in _RAW_LEAVES:
            return self.codec
        widened = module["source_dtype"] not in (module["dtype"], None)
        raw = self.options.codec is None and not widened
        return self._leaf_codecs[raw]

    # -- any array ----------------------------------------------------------------------------
    def shape_of(self, path: str) -> tuple[int, ...] | None:
        """The array's shape, None when it does not exist; cached (this writer alone changes it)."""
        if path not in self._shapes:
            if self.fresh:
                return None  # (not cached: _new_array caches what it makes)
            self._shapes[path] = self.backend.shape(path) if self.backend.contains(path) else None
        return self._shapes[path]

    def ensure(self, path: str, need: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill: Any) -> None:
        """Make sure the array at ``path`` exists with at least the shape ``need`` (a table, stored
        uncompressed: its chunks are a few hundred bytes, and a raw chunk is one the Zarr backend
        writes straight to its file; checksummed as the store's codec says where a rewrite of a chunk
        is atomic, see :class:`~attnhooks.backends.base.Codec`)."""
        if self.shape_of(path) is None:
            self._new_array(path, need, dtype, chunks, fill, self._table_codec)
        else:
            self._grow(path, need)

    def put_cell(self, path: str, pos: int, value: Any, fill: Any) -> None:
        """Set ``path[pos]`` of a one-value-per-step table (created or grown as needed, chunks of
        :data:`STEP_CHUNK` steps) by writing the whole chunk around it: the writer keeps the chunk's
        values, so the backend writes whole chunks, never reading one back to change one value."""
        self.ensure(path, (pos + 1,), "int64", (STEP_CHUNK,), fill)
        first = pos - pos % STEP_CHUNK
        cell = self._cells.get(path)
        if cell is None or cell[0] != first:
            values = np.full(STEP_CHUNK, fill, dtype=np.int64)
            shape = self.shape_of(path)
            assert shape is not None
            if path not in self._created:  # a store appended to: the chunk's earlier steps
                known = self.backend.read(path, (slice(first, min(first + STEP_CHUNK, shape[0])),))
                values[: len(known)] = known
            cell = self._cells[path] = (first, values)
        cell[1][pos - first] = value
        shape = self.shape_of(path)
        assert shape is not None
        end = min(first + STEP_CHUNK, shape[0])
        self.backend.write(path, (slice(first, end),), cell[1][: end - first])

    def write_at(self, path: str, sel: tuple[Any, ...], value: np.ndarray, fill: Any) -> None:
        """Write ``value`` and reset the rest of the row to ``fill`` (stale data of a dropped step):
        the whole row, so whole chunks of a table chunked by step."""
        shape = self.shape_of(path)
        assert shape is not None
        row = np.full(shape[1:], fill, dtype=value.dtype)
        row[tuple(sel[1:])] = value
        self.backend.write(path, (sel[0],), row)

    def _new_array(
        self, path: str, need: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill: Any, codec: Codec
    ) -> None:
        shape = (max(need[0], _MIN_STEPS), *need[1:])  # room for steps ahead: one metadata write, not one per step
        self.backend.create_array(path, shape, dtype, chunks, fill, codec)
        self._shapes[path] = shape
        self._created.add(path)

    def _grow(self, path: str, need: tuple[int, ...]) -> None:
        shape = self.shape_of(path)
        assert shape is not None
        if all(s >= n for s, n in zip(shape, need)):
            return
        grown = [max(s, n) for s, n in zip(shape, need)]
        if need[0] > shape[0]:
            grown[0] = max(need[0], 2 * shape[0], _MIN_STEPS)
        self.backend.resize(path, tuple(grown))
        self._shapes[path] = tuple(grown)

    # -- storage dtypes -------------------------------------------------------------------------
    def stored_dtype(self, rec: Record) -> str:
        """The dtype the record's q and k are stored in (``"bfloat16-bits"``: bfloat16 as uint16)."""
        t = rec.q if rec.q is not None else rec.k
        return storage_dtype(t.dtype if t is not None else torch.float32, self.options.dtype)

    def cast(self, t: torch.Tensor) -> np.ndarray:
        """``t`` (q or k, on the host) in its storage dtype."""
        target = storage_dtype(t.dtype, self.options.dtype)
        if target == "bfloat16-bits":
            return t.contiguous().view(torch.uint16).numpy()
        return t.to(getattr(torch, target)).numpy()

    def attn(self, t: torch.Tensor) -> np.ndarray:
        """``attn`` as stored: float16 under ``dtype="float16"``, else float32."""
        return t.to(torch.float16 if self.options.dtype == "float16" else torch.float32).numpy()


def chunk_shape(shape: tuple[int, ...], itemsize: int, leaf: str) -> tuple[int, ...]:
    """Chunks of a ``[steps, calls, batch, ...]`` array: one step, one call, one sample (and one
    head of ``attn``); the sequence axes rounded up to powers of two and split so that a chunk
    stays under ~8 MiB. Where that leaves chunks under ~1 MiB (short sequences), they take more
    heads, then more samples: a chunk costs a file (or object) write of ~1 ms whatever its size.

    Example:
        >>> chunk_shape((1, 1, 2, 8, 100, 100), 4, "attn")  # [S, C, B, H, Lq, Lk] float32
        (1, 1, 2, 8, 128, 128)
    """
    out = [1, 1, 1, *shape[3:]]
    if leaf in ("q", "k", "lse", "mask/dense") or leaf.startswith("summary/"):
        seq_axis = 4
    elif leaf == "attn":
        out[3] = 1  # one head per chunk
        seq_axis = 4
    else:  # mask/key_valid [S, C, B, Lk]
        seq_axis = 3
    for axis in range(seq_axis, len(shape)):
        out[axis] = pow2(shape[axis])
    while math.prod(out) * itemsize > _CHUNK_BYTES and out[seq_axis] > 16:
        out[seq_axis] //= 2
    # short sequences: every head, then several samples in one chunk (each chunk is a file write)
    for axis in (3, 2) if leaf == "attn" else (2,):
        whole = shape[axis] if axis == 3 else pow2(shape[axis], floor=1)
        while out[axis] < whole and math.prod(out) * itemsize * 2 <= _SMALL_CHUNK_BYTES:
            out[axis] = min(whole, out[axis] * 2)
    return tuple(out)


def pow2(n: int, floor: int = 16) -> int:
    """The smallest power of two ``>= n``, at least ``floor``."""
    return max(floor, 1 << max(n - 1, 0).bit_length())


def storage_dtype(dtype: torch.dtype, option: str | None) -> str:
    """The dtype a tensor of ``dtype`` is stored in under ``dtype=option``: bfloat16 is widened to
    float32 unless ``"bfloat16-bits"`` keeps its bits as uint16."""
    if option == "float16":
        return "float16"
    if option == "float32":
        return "float32"
    if dtype == torch.bfloat16:
        return "bfloat16-bits" if option == "bfloat16-bits" else "float32"
    return str(dtype).removeprefix("torch.")


def _inner_selection(shape: tuple[int, ...], inner: tuple[slice, ...]) -> tuple[slice, ...]:
    """Selection of a ``[batch, ...]`` block: ``inner`` slices for axes 1.., full extents elsewhere."""
    sel = [slice(0, shape[0])]
    for axis in range(1, len(shape)):
        given = inner[axis - 1] if axis - 1 < len(inner) else slice(None)
        start = given.start or 0
        sel.append(slice(start, start + shape[axis]))
    return tuple(sel)
