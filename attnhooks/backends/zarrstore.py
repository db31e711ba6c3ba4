"""Zarr (format 3) backend: a directory store, one file per chunk, metadata rewritten atomically.

zarr's local store writes every key through a temporary file and an atomic rename, so a killed
writer leaves each array's metadata either old or new, never torn; the only leftovers are the
``*.partial`` temporaries, which :meth:`ZarrBackend.cleanup` removes. Zarr 3 has no bfloat16, so
the writer stores bfloat16 as float32 or as raw uint16 bits (see :mod:`attnhooks.schema`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from ..errors import NotAStoreError, StoreOptionError
from .base import Codec, Selection, check_mode, refuse_existing, split

__all__ = ["ZarrBackend"]


def _local(location: str) -> str:
    return location[len("file://") :] if location.startswith("file://") else location


class ZarrBackend:
    """A Zarr v3 store on the local file system (or any location zarr accepts)."""

    name: ClassVar[str] = "zarr"
    schemes: ClassVar[tuple[str, ...]] = ("zarr",)
    suffixes: ClassVar[tuple[str, ...]] = (".zarr",)
    default_codec: ClassVar[Codec] = Codec("zstd", 1)

    def __init__(self, location: str, group: zarr.Group, readonly: bool) -> None:
        self.location = location
        self.readonly = readonly
        self._root = group
        self._arrays: dict[str, zarr.Array[Any]] = {}

    @classmethod
    def exists(cls, location: str) -> bool:
        path = _local(location.removeprefix("zarr://"))
        return os.path.exists(path)

    @classmethod
    def open(cls, location: str, mode: str, attrs: dict[str, Any] | None = None) -> ZarrBackend:
        check_mode(mode)
        path = _local(location.removeprefix("zarr://"))
        exists = os.path.exists(path)
        if mode == "w-" and exists:
            refuse_existing(location)
        if mode in ("r", "r+"):
            if not exists:
                raise NotAStoreError(f"{location}: no such store")
            if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "zarr.json")):
                raise NotAStoreError(f"{location} is not a Zarr v3 store (no zarr.json)")
            try:
                group = zarr.open_group(path, mode="r" if mode == "r" else "r+", zarr_format=3)
            except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError, ValueError) as err:
                raise NotAStoreError(f"{location} is not a Zarr v3 group: {err}") from err
            return cls(location, group, readonly=mode == "r")
        # create aside, then rename into place: the store never exists without its root attributes
        parent = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(parent, f".{os.path.basename(path)}.creating-{uuid.uuid4().hex[:8]}")
        zarr.open_group(tmp, mode="w-", zarr_format=3, attributes=attrs or {})
        if mode == "w" and exists:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.rename(tmp, path)
        return cls(location, zarr.open_group(path, mode="r+", zarr_format=3), readonly=False)

    # -- structure --------------------------------------------------------------------------
    def _array(self, path: str) -> zarr.Array[Any]:
        arr = self._arrays.get(path)
        if arr is None:
            node = self._root[path] if path else self._root
            if not isinstance(node, zarr.Array):
                raise KeyError(f"{path} is not an array")
            arr = self._arrays[path] = node
        return arr

    def create_group(self, path: str) -> None:
        group = self._root
        for part in split(path):
            group = group[part] if part in group else group.create_group(part)  # type: ignore[assignment]

    def create_array(
        self, path: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill_value: Any, codec: Codec
    ) -> None:
        *parents, leaf = split(path)
        self.create_group("/".join(parents))
        group = self._root["/".join(parents)] if parents else self._root
        assert isinstance(group, zarr.Group)
        self._arrays[path] = group.create_array(
            leaf,
            shape=shape,
            dtype=str if dtype == "str" else dtype,
            chunks=chunks,
            fill_value="" if dtype == "str" else fill_value,
            compressors=None if dtype == "str" else _compressor(codec),
            overwrite=True,
        )

    def contains(self, path: str) -> bool:
        return path == "" or path in self._root

    def children(self, path: str) -> list[str]:
        node = self._root[path] if path else self._root
        return sorted(node.keys()) if isinstance(node, zarr.Group) else []

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self._array(path).shape)

    def dtype(self, path: str) -> str:
        dtype = self._array(path).dtype
        return "str" if dtype.kind in "UTO" else np.dtype(dtype).name

    def resize(self, path: str, shape: tuple[int, ...]) -> None:
        """Resize; values cut off by a shrink read as the fill value if the array grows again
        (zarr itself only deletes chunks wholly outside the new shape)."""
        arr = self._array(path)
        # per axis, the extent of the chunks that survive the resize
        kept = [min(o, -(-n // c) * c) for o, n, c in zip(arr.shape, shape, arr.chunks)]
        for axis, new in enumerate(shape):
            if new < kept[axis]:
                region = [slice(0, k) for k in kept]
                region[axis] = slice(new, kept[axis])
                arr[tuple(region)] = arr.metadata.fill_value  # type: ignore[assignment]
        arr.resize(shape)

    def write(self, path: str, selection: Selection, value: np.ndarray) -> None:
        self._array(path)[selection] = value

    def read(self, path: str, selection: Selection = ()) -> np.ndarray:
        out = np.asarray(self._array(path)[selection])
        return out.astype(object) if out.dtype.kind == "T" else out

    # -- attributes ---------------------------------------------------------------------------
    def attrs(self, path: str) -> dict[str, Any]:
        node = self._root[path] if path else self._root
        return dict(node.attrs)

    def set_attrs(self, path: str, values: dict[str, Any]) -> None:
        node = self._root[path] if path else self._root
        node.attrs.update(values)  # one atomic rewrite of the node's zarr.json

    def flush(self) -> None:
        return None  # every write above has reached the file system when it returns

    def close(self) -> None:
        self._arrays.clear()

    @classmethod
    def cleanup(cls, location: str) -> list[str]:
        root = Path(_local(location.removeprefix("zarr://")))
        removed = []
        for tmp in root.rglob("*.partial"):
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp.relative_to(root)))
        return removed


def _compressor(codec: Codec) -> Any:
    if codec.name == "none":
        return None
    if codec.name == "zstd":
        return ZstdCodec(level=codec.level)
    if codec.name == "gzip":
        return GzipCodec(level=codec.level)
    if codec.name == "blosc":
        return BloscCodec(cname="zstd", clevel=codec.level, shuffle="shuffle")
    raise StoreOptionError(f"compression {codec.name!r} is not available in the zarr backend (zstd, gzip, blosc, none)")
