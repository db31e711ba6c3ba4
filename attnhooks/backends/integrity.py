"""Checked reads, shared by the backends: which chunks a selection touches, and which of them fail
to decode or are missing.

A backend stores a checksum with every chunk of the arrays it creates (Zarr v3's ``crc32c`` codec,
HDF5's ``fletcher32`` filter) and writes every chunk it is given, also one holding only the fill
value, so that a chunk absent from a written region is damage, not an empty chunk left out. A
read that fails to decode is narrowed down here to the chunks that fail, and reported as
:class:`~attnhooks.errors.StoreCorruptError` naming the array and the chunks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from attnhooks.errors import StoreCorruptError

__all__ = ["MAX_CHUNKS_CHECKED", "chunk_region", "chunks_of", "corrupt", "spans"]

MAX_CHUNKS_CHECKED = 1 << 16
"""At most this many chunks of one read are checked one by one (a read larger than that is reported
as a whole)."""

Selection = tuple[slice | int, ...]


def chunks_of(shape: tuple[int, ...], chunks: tuple[int, ...], selection: Selection) -> Iterator[tuple[int, ...]]:
    """The grid coordinates of the chunks that ``selection`` (ints and step-1 slices, leading axes;
    the rest whole) touches in an array of ``shape`` chunked by ``chunks``.

    Example:
        >>> list(chunks_of((4, 10), (1, 4), (2, slice(3, 9))))
        [(2, 0), (2, 1), (2, 2)]
    """
    extents, _ = spans(selection, shape)
    if any(stop <= start for start, stop in extents):
        return
    ranges = [range(start // chunk, (stop - 1) // chunk + 1) for (start, stop), chunk in zip(extents, chunks)]
    yield from itertools.product(*ranges)


def spans(selection: Selection, shape: tuple[int, ...]) -> tuple[list[tuple[int, int]], list[bool]]:
    """Per axis of ``shape``, the ``[start, stop)`` that ``selection`` (ints and slices, leading
    axes; the rest whole) covers, and whether an int dropped the axis.

    Example:
        >>> spans((2, slice(3, 9)), (4, 10, 5))
        ([(2, 3), (3, 9), (0, 5)], [True, False, False])
    """
    out, squeeze = [], []
    for axis, size in enumerate(shape):
        sel = selection[axis] if axis < len(selection) else slice(None)
        if isinstance(sel, slice):
            start, stop, _ = sel.indices(size)
            out.append((start, max(start, stop)))
            squeeze.append(False)
        else:
            i = int(sel) + size if int(sel) < 0 else int(sel)
            out.append((i, i + 1))
            squeeze.append(True)
    return out, squeeze


def chunk_region(coords: tuple[int, ...], chunks: tuple[int, ...], shape: tuple[int, ...]) -> Selection:
    """The selection of the chunk at grid ``coords`` (cut to ``shape``)."""
    return tuple(slice(c * n, min((c + 1) * n, size)) for c, n, size in zip(coords, chunks, shape))


def corrupt(
    path: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    selection: Selection,
    read: Callable[[Selection], object],
    err: BaseException,
    location: str,
) -> StoreCorruptError | None:
    """After ``read(selection)`` raised ``err``: the chunks of the selection that fail alone, as a
    :class:`StoreCorruptError`, or None when every chunk reads (``err`` was not about the data)."""
    bad: list[tuple[int, ...]] = []
    for n, coords in enumerate(chunks_of(shape, chunks, selection)):
        if n >= MAX_CHUNKS_CHECKED:
            break
        try:
            read(chunk_region(coords, chunks, shape))
        except Exception:
            bad.append(coords)
    if not bad:
        return None
    return StoreCorruptError(location, path, bad, f"fail(s) to decode ({type(err).__name__}: {err})")
