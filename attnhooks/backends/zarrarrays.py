"""How attnhooks makes a Zarr array: its codecs, and on a local store its creation without zarr's event loop.

zarr's ``create_array`` costs 3-10 ms of wall time here (measured on zarr 3.1.6: a hop through its event
loop and thread pool, a directory removal for ``overwrite``, a look at each parent's metadata), and a
store writer of a 32-layer model makes about nine stack arrays and a few tables at its first commit: a
third of the close of a ``generate`` streamed to Zarr. On a local store, :func:`create_local` makes the
array's ``zarr.json`` with zarr's own metadata code (the functions ``create_array`` calls, without I/O:
~0.5 ms), writes it through a temporary file and an atomic rename as zarr's local store does, and builds
the ``zarr.Array`` from the same metadata.

**Verify, don't assume:** those metadata functions are zarr's private ones. :func:`create` lets zarr make
the first array of each kind (dtype, fill value, codecs) in a process and compares the ``zarr.json`` zarr
wrote with the one made here, byte for byte; only a kind that matched is made here after that. If one
differs, or a function is missing or fails, a warning says so and zarr makes every array of the process,
as before. (Nothing extra is made for the check: the array zarr made is the store's.)
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

from attnhooks.backends.base import Codec, split
from attnhooks.backends.zarrplace import LocalPlace, write_atomically
from attnhooks.errors import StoreOptionError

__all__ = ["CHECKS", "compressor", "create", "create_local", "document", "keywords"]

# chunk files side by side in the array's folder (c.3.0.0), not nested (c/3/0/0): a step's chunk would
# otherwise make a new folder per axis, ~0.2 ms each on this file system
_KEY_ENCODING = {"name": "default", "separator": "."}


def keywords(dtype: str, fill_value: Any, codec: Codec) -> dict[str, Any]:
    """zarr's ``create_array`` keywords for an array of ``dtype`` (``"str"``: text) stored as ``codec``
    says, besides its shape and chunks."""
    text = dtype == "str"
    return {
        "dtype": str if text else dtype,
        "fill_value": "" if text else fill_value,
        "compressors": compressors(Codec("none", 0, checksum=codec.checksum) if text else codec),
        "chunk_key_encoding": _KEY_ENCODING,
        # with checksums every chunk written is kept, also one of fill values only: a chunk missing
        # from a written region is then damage (missing_chunks), not an empty chunk
        "config": {"write_empty_chunks": codec.checksum or not codec.skip_empty},
    }


def compressors(codec: Codec) -> list[Any]:
    """The bytes codecs of an array: its compression, then a crc32c checksum of the stored bytes."""
    found = compressor(codec)
    return [*([found] if found is not None else []), *([Crc32cCodec()] if codec.checksum else [])]


def compressor(codec: Codec) -> Any:
    """zarr's codec for ``codec``'s compression (None: none); StoreOptionError for one it lacks."""
    if codec.name == "none":
        return None
    if codec.name == "zstd":
        return ZstdCodec(level=codec.level)
    if codec.name == "gzip":
        return GzipCodec(level=codec.level)
    if codec.name == "blosc":
        return BloscCodec(cname="zstd", clevel=codec.level, shuffle="shuffle")
    raise StoreOptionError(f"compression {codec.name!r} is not available in the zarr backend (zstd, gzip, blosc, none)")


def create_local(
    root: zarr.Group, place: LocalPlace, path: str, shape: tuple[int, ...], chunks: tuple[int, ...], kw: dict[str, Any]
) -> zarr.Array[Any]:
    """The array at ``path`` of the local store ``place`` (whose root group is ``root``), made as zarr's
    ``create_array(..., overwrite=True)`` makes it from ``shape``, ``chunks`` and :func:`keywords`: whatever
    was at ``path`` is removed, a missing parent group is made, then its ``zarr.json`` is written."""
    from zarr.core.array import Array, AsyncArray
    from zarr.storage import StorePath

    metadata = _metadata(shape, chunks, kw)
    *parents, _ = split(path)
    directory = os.path.join(place.path, *split(path))
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    elif os.path.lexists(directory):
        os.remove(directory)
    if parents and not place.has_node("/".join(parents)):
        place.create_group_node("/".join(parents))
    os.makedirs(directory, exist_ok=True)
    write_atomically(os.path.join(directory, "zarr.json"), [document(metadata)])
    prefix = root.store_path.path
    where = StorePath(root.store_path.store, f"{prefix}/{path}" if prefix else path)
    return Array(AsyncArray(metadata=metadata, store_path=where, config=kw["config"]))


def document(metadata: Any) -> bytes:
    """The ``zarr.json`` zarr writes for ``metadata``."""
    from zarr.core.buffer import default_buffer_prototype

    return bytes(metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())


def _metadata(shape: tuple[int, ...], chunks: tuple[int, ...], kw: dict[str, Any]) -> Any:
    """The array's ``ArrayV3Metadata``, by the functions zarr's ``init_array`` calls (no sharding, no
    filters, the serializer zarr picks for the dtype)."""
    from zarr.core.array import AsyncArray

    dtype, codecs = _encoding(kw["dtype"], tuple(kw["compressors"]))
    return AsyncArray._create_metadata_v3(
        shape=shape,
        dtype=dtype,
        chunk_shape=tuple(chunks),
        fill_value=kw["fill_value"],
        chunk_key_encoding=kw["chunk_key_encoding"],
        codecs=codecs,
        dimension_names=None,
        attributes=None,
    )


@functools.lru_cache(maxsize=64)
def _encoding(dtype: Any, compressors: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
    """zarr's data type and codecs (serializer, then ``compressors``) of an array (made once per kind)."""
    from zarr.core.array import _parse_chunk_encoding_v3
    from zarr.core.dtype import parse_dtype

    zdtype = parse_dtype(dtype, zarr_format=3)
    filters, serializer, compressed = _parse_chunk_encoding_v3(
        compressors=compressors, filters="auto", serializer="auto", dtype=zdtype
    )
    return zdtype, (*filters, serializer, *compressed)


class Checks:
    """What this process learnt of zarr's metadata functions: the kinds of array (dtype, fill value, codecs,
    config) whose ``zarr.json`` made here was the one zarr made, or why they are not used."""

    def __init__(self) -> None:
        self.verified: set[str] = set()
        self.failed: str | None = None


CHECKS = Checks()


def create(
    place: LocalPlace | None,
    root: zarr.Group,
    path: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    kw: dict[str, Any],
    by_zarr: Callable[[], zarr.Array[Any]],
) -> zarr.Array[Any]:
    """The array at ``path``: made by :func:`create_local` on a local store (``place``; None: elsewhere) once
    an array of its kind was made by zarr (``by_zarr()``) in this process and its ``zarr.json`` was the one
    :func:`create_local` makes; by zarr otherwise (a mismatch warns once and leaves every array to zarr)."""
    if place is None or CHECKS.failed is not None:
        return by_zarr()
    kind = repr(sorted(kw.items()))
    if kind in CHECKS.verified:
        return create_local(root, place, path, shape, chunks, kw)
    made = by_zarr()
    try:
        ours = document(_metadata(shape, chunks, kw))
        theirs = Path(place.path, *split(path), "zarr.json").read_bytes()
        if ours != theirs:
            raise ValueError(f"zarr wrote {theirs!r}, attnhooks would write {ours!r}")
    except Exception as err:  # a private function that changed, another document: zarr makes every array
        CHECKS.failed = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"attnhooks: this zarr ({zarr.__version__}) makes arrays otherwise than attnhooks would "
            f"({CHECKS.failed}); every array is created through zarr (slower store creation)",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        CHECKS.verified.add(kind)
    return made
