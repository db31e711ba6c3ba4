"""Zarr (format 3) backend: a directory store on the local file system, or a store on any fsspec URL.

**Local paths** (and ``file://``): one file per chunk, metadata rewritten atomically. zarr's local
store writes every key through a temporary file and an atomic rename, so a killed writer leaves
each array's metadata either old or new, never torn; the only leftovers are the ``*.partial``
temporaries, which :meth:`ZarrBackend.cleanup` removes. A new store is built aside and renamed
into place, so it never exists without its root attributes.

**URLs** (``s3://bucket/run.zarr``, ``gs://...``, ``memory://run.zarr``, any fsspec protocol):
read and written through zarr's ``FsspecStore``. Each key is one object put, which object stores
make atomic, so a new store needs no rename: its root ``zarr.json`` is put once with the root
attributes already in it. There are no temporaries to clean up. This needs ``pip install fsspec``
and the package of the protocol (``s3fs``, ``gcsfs``, ``adlfs``...). Credentials and other
storage options come from fsspec's own configuration: environment variables
``FSSPEC_<PROTOCOL>_<OPTION>`` (``FSSPEC_S3_ENDPOINT_URL=http://localhost:9000``) or
``FSSPEC_<PROTOCOL>='{"key": ..., "secret": ...}'``, JSON / INI files in ``~/.config/fsspec``
(or ``$FSSPEC_CONFIG_DIR``), and the provider's usual ones (``AWS_PROFILE``,
``GOOGLE_APPLICATION_CREDENTIALS``...).

**Writes.** Arrays created here keep their chunk files side by side in the array's folder
(``c.3.0.0``, zarr's ``default`` chunk key encoding with ``.``), not a folder per axis: a step's
chunk then costs one file, not a file and five folders. On a local store, a write that covers whole
chunks of an uncompressed array goes straight to the chunk files (:mod:`attnhooks.backends.zarrchunks`:
~0.06 ms of file system per chunk instead of ~1 ms of zarr's own machinery), with the same bytes and
checksum zarr would write; every other write goes through zarr. On a local store arrays are made the same
way, their ``zarr.json`` written here from zarr's own metadata functions
(:mod:`attnhooks.backends.zarrarrays`: ~1 ms an array instead of 3-10 ms), once zarr's own array of the
same kind showed the same document.

Zarr 3 has no bfloat16, so the writer stores bfloat16 as float32 or as raw uint16 bits (see
:mod:`attnhooks.schema`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import Crc32cCodec

from attnhooks.backends.base import Codec, Selection, check_mode, check_remove, refuse_existing, split
from attnhooks.backends.integrity import MAX_CHUNKS_CHECKED, chunks_of, corrupt
from attnhooks.backends.zarrarrays import compressor, create, keywords
from attnhooks.backends.zarrchunks import ChunkFiles
from attnhooks.backends.zarrplace import LocalPlace, UrlPlace
from attnhooks.backends.zarrplace import place as place_of
from attnhooks.errors import NotAStoreError

__all__ = ["ZarrBackend"]


class ZarrBackend:
    """A Zarr v3 store on the local file system or on any fsspec URL."""

    name: ClassVar[str] = "zarr"
    schemes: ClassVar[tuple[str, ...]] = ("zarr",)
    suffixes: ClassVar[tuple[str, ...]] = (".zarr",)
    default_codec: ClassVar[Codec] = Codec("zstd", 1)

    def __init__(self, location: str, group: zarr.Group, readonly: bool) -> None:
        self.location = location
        self.readonly = readonly
        self._root = group
        self._place = place_of(location)
        self._arrays: dict[str, zarr.Array[Any]] = {}
        self._groups: dict[str, zarr.Group] = {}
        self._pending: list[tuple[zarr.Array[Any], Selection, np.ndarray]] | None = None  # batched()
        self._pending_paths: set[str] = set()
        # whole chunks of a local store written straight to their files (zarr: ~1 ms per chunk)
        self._files = ChunkFiles(self._place.path) if isinstance(self._place, LocalPlace) and not readonly else None
        self._present: set[str] = set()  # chunk keys found in the store (missing_chunks)

    @classmethod
    def exists(cls, location: str) -> bool:
        return place_of(location).exists()

    @classmethod
    def check_codec(cls, codec: Codec) -> None:
        """Raise StoreOptionError for a codec this backend cannot write (before a store is made)."""
        compressor(codec)

    @classmethod
    def open(cls, location: str, mode: str, attrs: dict[str, Any] | None = None) -> ZarrBackend:
        check_mode(mode)
        place = place_of(location)
        exists = place.exists()
        if mode == "w-" and exists:
            refuse_existing(location)
        if mode not in ("r", "r+"):
            return cls(location, place.create(attrs or {}, replace=exists), readonly=False)
        if not exists:
            raise NotAStoreError(f"{location}: no such store")
        if not place.holds_metadata():
            raise NotAStoreError(f"{location} is not a Zarr v3 store (no zarr.json)")
        try:
            group = zarr.open_group(place.store(mode == "r"), mode="r" if mode == "r" else "r+", zarr_format=3)
        except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError, ValueError) as err:
            raise NotAStoreError(f"{location} is not a Zarr v3 group: {err}") from err
        return cls(location, group, readonly=mode == "r")

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
        self.create_group_with(path, {})

    def create_group_with(self, path: str, attrs: dict[str, Any]) -> None:
        """:meth:`create_group` then :meth:`set_attrs`; a local store writes a new group's ``zarr.json`` once."""
        if isinstance(self._place, LocalPlace) and not self.readonly:
            self._flush()
            return self._place.create_group_node(path, attrs)
        self._group(path)
        if attrs:
            self.set_attrs(path, attrs)

    def _group(self, path: str) -> zarr.Group:
        """The group at ``path``, made with its parents when missing; cached (a lookup reads metadata: ~1 ms)."""
        group = self._groups.get(path)
        if group is None:
            group = self._root
            for part in split(path):
                group = group[part] if part in group else group.create_group(part)  # type: ignore[assignment]
            self._groups[path] = group
        return group

    def create_array(
        self, path: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill_value: Any, codec: Codec
    ) -> None:
        self._flush()
        self._forget(path)
        kw, (*parents, leaf) = keywords(dtype, fill_value, codec), split(path)
        local = self._place if self._files is not None else None  # (writable: made without zarr's event loop)
        self._arrays[path] = create(
            local,  # type: ignore[arg-type]
            self._root, path, shape, chunks, kw,
            lambda: self._group("/".join(parents)).create_array(leaf, shape=shape, chunks=chunks, overwrite=True, **kw),
        )  # fmt: skip

    def remove(self, path: str) -> None:
        """Delete the group or array at ``path`` with everything under it; nothing if there is none."""
        self._flush()
        check_remove(self, path)
        if not self.contains(path):
            return
        parts = split(path)
        for cache in (self._arrays, self._groups):
            for key in [key for key in cache if split(key)[: len(parts)] == parts]:
                del cache[key]
        self._forget(None)
        del self._root["/".join(parts)]

    def contains(self, path: str) -> bool:
        local = isinstance(self._place, LocalPlace)
        return path == "" or (self._place.has_node(path) if local else path in self._root)  # type: ignore[union-attr]

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
        self._flush()
        arr = self._array(path)
        # per axis, the extent of the chunks that survive the resize
        kept = [min(o, -(-n // c) * c) for o, n, c in zip(arr.shape, shape, arr.chunks)]
        for axis, new in enumerate(shape):
            if new < kept[axis]:
                region = [slice(0, k) for k in kept]
                region[axis] = slice(new, kept[axis])
                arr[tuple(region)] = arr.metadata.fill_value  # type: ignore[assignment]
        arr.resize(shape)
        self._forget(path)

    def write(self, path: str, selection: Selection, value: np.ndarray) -> None:
        arr = self._array(path)
        whole = self._files.whole(path, arr, selection) if self._files is not None else None
        if whole is not None:
            if path in self._pending_paths:
                self._flush()  # the array's held writes first: writes to one array stay in order
            self._files.write(whole, value)  # type: ignore[union-attr]
            return
        if self._pending is not None:
            self._pending.append((arr, selection, value))
            self._pending_paths.add(path)
            return
        arr[selection] = value

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Hold the writes made inside, then make them together: each write through zarr's
        synchronous API waits on zarr's event-loop thread (~1 ms for a small chunk), so the writer
        hands the many small writes of a step over at once (writes to one array stay in order, one
        after the other: two partial writes of one chunk must not race). Any other call flushes
        what is held first, so reads and structure changes see every write before them."""
        if self._pending is not None:
            yield
            return
        self._pending = []
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            self._pending_paths.clear()
            if sys.exc_info()[0] is None:
                write_together(pending)

    def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._pending_paths.clear()
            write_together(pending)

    def read(self, path: str, selection: Selection = ()) -> np.ndarray:
        self._flush()
        arr = self._array(path)
        try:
            out = np.asarray(arr[selection])
        except (ValueError, RuntimeError, OSError) as err:  # a chunk failing its checksum or to decompress
            damaged = corrupt(path, arr.shape, arr.chunks, selection, arr.__getitem__, err, self.location)
            if damaged is None:
                raise
            raise damaged from err
        return out.astype(object) if out.dtype.kind == "T" else out

    def checksummed(self, path: str) -> bool:
        """True when the array's chunks carry a checksum (a store written by attnhooks 0.2 on)."""
        return any(isinstance(c, Crc32cCodec) for c in self._array(path).compressors)

    def missing_chunks(self, path: str, selection: Selection = ()) -> list[tuple[int, ...]]:
        """The chunks of ``selection`` that are not in the store, for an array written with
        checksums (every chunk written is kept); ``[]`` for an array of an older store, where an
        absent chunk may be one that held only the fill value."""
        if not self.checksummed(path):
            return []
        return _absent(self._array(path), self._place, self._present, selection)

    # -- attributes ---------------------------------------------------------------------------
    def attrs(self, path: str) -> dict[str, Any]:
        if isinstance(self._place, LocalPlace):  # (its zarr.json read here: always what is on disk)
            return self._place.node_attrs(path)
        return dict((self._root[path] if path else self._root).attrs)

    def set_attrs(self, path: str, values: dict[str, Any]) -> None:
        self._flush()
        if isinstance(self._place, LocalPlace):  # one atomic rewrite of the node's zarr.json
            self._place.update_node_attrs(path, values, self.readonly)
        else:  # one put of the node's zarr.json
            (self._root[path] if path else self._root).attrs.update(values)

    def flush(self) -> None:
        self._flush()  # (every write made has then reached the file system or object store)

    def _forget(self, path: str | None) -> None:
        if self._files is not None:
            self._files.forget(path)

    def close(self) -> None:
        self._forget(None)
        self._arrays.clear()
        self._groups.clear()
        self._present.clear()

    def refresh(self) -> None:
        """Read the metadata again (zarr keeps each node's metadata from when it was opened)."""
        self.close()
        store = self._place.store(self.readonly)
        self._root = zarr.open_group(store, mode="r" if self.readonly else "r+", zarr_format=3)

    @classmethod
    def cleanup(cls, location: str) -> list[str]:
        return place_of(location).cleanup()

    @classmethod
    def discard(cls, location: str) -> None:
        """Remove the whole store at ``location`` (the writer's: a capture that created it and failed
        before committing anything)."""
        place_of(location).remove()


def _absent(
    arr: zarr.Array[Any], place: LocalPlace | UrlPlace, present: set[str], selection: Selection
) -> list[tuple[int, ...]]:
    """The chunks of ``selection`` of ``arr`` not in the store (``present``: those found before,
    asked once per chunk, not once per read that covers it)."""
    missing = []
    for n, coords in enumerate(chunks_of(arr.shape, arr.chunks, selection)):
        if n >= MAX_CHUNKS_CHECKED:
            break
        key = f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"
        if key in present:
            continue
        if place.has(arr.path, key):
            present.add(key)
        else:
            missing.append(coords)
    return missing


def write_together(writes: list[tuple[zarr.Array[Any], Selection, np.ndarray]]) -> None:
    """Make ``writes`` in one trip through zarr's event loop: the arrays concurrently, each array's
    writes in order. Falls back to one write at a time where this zarr has no asynchronous array
    (``Array._async_array.setitem``, zarr 3.0-3.1)."""
    if len(writes) < 2 or not all(hasattr(getattr(a, "_async_array", None), "setitem") for a, _, _ in writes):
        for arr, selection, value in writes:
            arr[selection] = value
        return
    chains: dict[int, list[tuple[Any, Selection, np.ndarray]]] = {}
    for arr, selection, value in writes:
        chains.setdefault(id(arr), []).append((arr._async_array, selection, value))

    async def chain(items: list[tuple[Any, Selection, np.ndarray]]) -> None:
        for target, selection, value in items:
            await target.setitem(selection, value)

    async def everything() -> None:
        await asyncio.gather(*(chain(items) for items in chains.values()))

    zarr_sync(everything())


def zarr_sync(coroutine: Any) -> Any:
    """Run ``coroutine`` on zarr's own event loop (its ``sync``), as its synchronous API does."""
    from zarr.core.sync import sync

    return sync(coroutine)
