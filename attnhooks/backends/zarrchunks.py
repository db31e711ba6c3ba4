"""Whole chunks written straight to the files of a local Zarr store.

A write through zarr's own API costs ~0.8-1 ms of CPU per chunk, whatever its size (measured on
zarr 3.1.6: indexing, the asynchronous codec pipeline and a hop through zarr's event loop and
thread pool), against ~0.06 ms for the file write itself. A store of a 32-layer model written every
step makes ~220 such writes per step, so zarr's own overhead is what made the writer fall minutes
behind. Most of those writes cover whole chunks (a call's q, k and lse at their step; a step's row
of a per-call table), and for arrays whose chunks are plain little-endian bytes with an optional
``crc32c`` checksum (what attnhooks writes uncompressed) a whole chunk is simple to encode exactly
as zarr would: the C-order bytes of the chunk, an edge chunk padded with the fill value, then the
little-endian CRC-32C of those bytes. :class:`ChunkFiles` writes such chunks itself, through a
temporary file and an atomic rename as zarr's local store does (``*.partial``, removed by
``cleanup``), and leaves every other write (a part of a chunk, a compressed array, a URL) to zarr.

**Verify, don't assume:** the encoding is checked once per process against zarr's own reading of it
(:func:`encoding_verified`); if this zarr reads the bytes differently, every write goes through zarr.
"""

from __future__ import annotations

import functools
import itertools
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.metadata import ArrayV3Metadata

from attnhooks.backends.base import Selection
from attnhooks.backends.integrity import chunk_region, spans
from attnhooks.backends.zarrplace import write_atomically

__all__ = ["ChunkFiles", "Whole", "encoding_verified"]


@dataclass(frozen=True)
class _Plan:
    """How the whole chunks of one array are written: its directory, chunk grid, dtype and fill."""

    directory: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype[Any]
    fill: Any
    checksum: bool
    encode_key: Any  # (coords) -> the chunk's key under the array


@dataclass(frozen=True)
class Whole:
    """Whole chunks of one array to write: the array's plan and, per axis, the ``[start, stop)``."""

    plan: _Plan
    spans: list[tuple[int, int]]


class ChunkFiles:
    """Whole-chunk writes to the arrays of a local Zarr store rooted at ``root`` (a directory).

    Attributes:
        written: chunks written here (not through zarr) so far.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.written = 0
        self._plans: dict[str, _Plan | None] = {}
        self._dirs: set[str] = set()

    def forget(self, path: str | None = None) -> None:
        """Drop what is known of the array at ``path`` (all arrays: None): its shape changed."""
        if path is None:
            self._plans.clear()
        else:
            self._plans.pop(path, None)

    def whole(self, path: str, arr: zarr.Array[Any], selection: Selection) -> Whole | None:
        """The whole chunks that ``selection`` of ``arr`` covers, when this class can write them;
        None when zarr must write them (a part of a chunk, an encoding not handled here)."""
        if path not in self._plans:
            self._plans[path] = _plan(self.root, arr)
        plan = self._plans[path]
        if plan is None:
            return None
        spans = _whole_chunk_spans(plan.shape, plan.chunks, selection)
        return None if spans is None else Whole(plan, spans)

    def write(self, whole: Whole, value: np.ndarray) -> None:
        """Write ``value`` (the block of ``whole``'s selection) into its chunk files."""
        plan, spans = whole.plan, whole.spans
        block = np.asarray(value).reshape(tuple(b - a for a, b in spans))
        for coords in itertools.product(*(range(a // c, -(-b // c)) for (a, b), c in zip(spans, plan.chunks))):
            region = chunk_region(coords, plan.chunks, plan.shape)
            part = block[tuple(slice(r.start - a, r.stop - a) for r, (a, _) in zip(region, spans))]  # type: ignore[misc, union-attr]
            self._put(plan, coords, _encode(plan, part))

    def _put(self, plan: _Plan, coords: tuple[int, ...], data: list[Any]) -> None:
        target = os.path.join(plan.directory, plan.encode_key(coords))
        folder = os.path.dirname(target)
        if folder not in self._dirs:
            os.makedirs(folder, exist_ok=True)
            self._dirs.add(folder)
        write_atomically(target, data)
        self.written += 1


def _plan(root: str, arr: zarr.Array[Any], verify: bool = True) -> _Plan | None:
    """How ``arr``'s whole chunks are written here, or None when zarr must write them: anything but
    a regular grid of C-order, little-endian numeric chunks kept when empty, stored raw (an optional
    ``crc32c`` last), or a zarr whose reading of that encoding did not check out."""
    meta = arr.metadata
    if not isinstance(meta, ArrayV3Metadata) or (verify and not encoding_verified()):
        return None
    codecs = list(meta.codecs)
    dtype = np.dtype(arr.dtype)
    checksum = bool(codecs) and type(codecs[-1]) is Crc32cCodec
    if checksum:
        codecs.pop()
    if len(codecs) != 1 or type(codecs[0]) is not BytesCodec or dtype.kind not in "biuf":
        return None
    endian = codecs[0].endian
    if dtype.itemsize > 1 and (endian is None or endian.value != "little"):
        return None
    if not arr.config.write_empty_chunks or arr.config.order != "C":
        return None
    return _Plan(
        directory=os.path.join(root, *arr.path.split("/")),
        shape=tuple(arr.shape),
        chunks=tuple(arr.chunks),
        dtype=dtype.newbyteorder("<"),
        fill=meta.fill_value,
        checksum=checksum,
        encode_key=meta.encode_chunk_key,
    )


def _whole_chunk_spans(
    shape: tuple[int, ...], chunks: tuple[int, ...], selection: Selection
) -> list[tuple[int, int]] | None:
    """Per axis, the ``[start, stop)`` that ``selection`` covers, when it covers whole chunks (an
    edge chunk counts as whole when the selection reaches the array's end); None otherwise."""
    if len(selection) > len(shape):
        return None
    for sel, size in zip(selection, shape):  # step-1 slices and ints inside the array only
        if isinstance(sel, slice) and sel.step not in (None, 1):
            return None
        if not isinstance(sel, slice) and not (isinstance(sel, (int, np.integer)) and 0 <= sel < size):
            return None
    extents, _ = spans(selection, shape)
    for (start, stop), size, chunk in zip(extents, shape, chunks):
        if stop <= start or start % chunk or (stop % chunk and stop != size):
            return None
    return extents


def _encode(plan: _Plan, part: np.ndarray) -> list[Any]:
    """A chunk's stored bytes, as the buffers to write one after the other (no copy of the data
    into one ``bytes``): ``part`` padded to the chunk shape with the fill value, C order, little
    endian, then its CRC-32C (little endian) when the array is checksummed."""
    if part.shape == plan.chunks:
        full = np.ascontiguousarray(part, dtype=plan.dtype)
    else:
        full = np.full(plan.chunks, plan.fill, dtype=plan.dtype)
        full[tuple(slice(0, n) for n in part.shape)] = part
    data = full.reshape(-1).view(np.uint8)
    return [data, struct.pack("<I", _crc32c(data))] if plan.checksum else [data]


def _crc32c(data: Any) -> int:
    import google_crc32c  # zarr's own crc32c codec uses it

    return int(google_crc32c.value(data))


@functools.cache
def encoding_verified() -> bool:
    """True when this zarr reads chunks encoded here as the values written (checked once per process
    on a small array with an edge chunk, with and without a checksum); else warns once."""
    try:
        with tempfile.TemporaryDirectory(prefix="attnhooks-zarr-check-") as tmp:
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            expected = np.arange(15, dtype=np.float32).reshape(3, 5) - 7.5
            for name, compressors in (("plain", None), ("checked", [Crc32cCodec()])):
                arr = group.create_array(
                    name, shape=(3, 5), chunks=(2, 4), dtype="float32", fill_value=-1.0,
                    compressors=compressors, config={"write_empty_chunks": True},
                )  # fmt: skip
                plan = _plan(tmp, arr, verify=False)
                if plan is None:
                    raise ValueError(f"the codecs of a plain array are {getattr(arr.metadata, 'codecs', None)}")
                ChunkFiles(tmp).write(Whole(plan, [(0, 3), (0, 5)]), expected)
                if not np.array_equal(arr[...], expected):
                    raise ValueError("zarr read back other values")
    except Exception as err:  # any surprise: zarr writes everything, as before
        warnings.warn(
            f"attnhooks: this zarr ({zarr.__version__}) does not read whole chunks encoded by attnhooks as "
            f"written ({type(err).__name__}: {err}); every chunk goes through zarr (slower writes)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True
