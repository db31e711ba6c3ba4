"""HDF5 backend: one file, written in SWMR mode so that a killed writer leaves a readable file.

HDF5 keeps metadata in a cache and writes it back in no particular order, so a plain writer killed
mid-step can leave pointers to blocks never written. In SWMR (single-writer / multiple-reader)
mode the library orders its metadata flushes so that the file on disk is always consistent, and a
reader opening with ``swmr=True`` sees the last flushed state, also after the writer died. So:

* a new file is built aside with its root attributes, switched to SWMR, then renamed into place,
  so it never exists without its schema; a file opened to append switches to SWMR at once;
* new groups and arrays are created in SWMR mode too (HDF5 2 accepts it; killed at random 50 times
  while creating groups and arrays, every file read back whole);
* readers open with ``swmr=True`` when the file was left open for writing by a killed process, and
  :meth:`HDF5Backend.cleanup` rewrites such a file (raw chunks copied, not recompressed) so that
  it opens normally again (an array HDF5 refuses to copy whole is copied chunk by chunk); a superblock
  ending before the data is read amended (:mod:`~attnhooks.backends.hdf5eoa`);
* the per-step tables, whose chunks are rewritten in place as steps are added, carry no checksum: a
  killed rewrite is torn between pages, and must not make the committed entries unreadable.

Compression: zstd level 1 through ``hdf5plugin`` (installed with ``attnhooks[hdf5]``; measured
here about 10x the throughput of gzip level 1 at the same ratio, see ``benchmarks/store_throughput.py``).
Other HDF5 readers need ``import hdf5plugin`` (or ``HDF5_PLUGIN_PATH``) to decode it; pass
``compression="gzip"`` for files every HDF5 tool reads as is. Without ``hdf5plugin`` the default
falls back to gzip level 1.

Attributes: :mod:`~attnhooks.backends.hdf5attrs` (JSON text for values that are not scalars or plain strings).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import h5py
import numpy as np

try:  # registers the zstd / blosc filters with HDF5, for writing and for reading
    import hdf5plugin
except ImportError:  # pragma: no cover - hdf5plugin comes with attnhooks[hdf5]
    hdf5plugin = None  # type: ignore[assignment]

from attnhooks.backends.base import Codec, Selection, check_mode, check_remove, refuse_existing
from attnhooks.backends.hdf5attrs import decode, write_attrs
from attnhooks.backends.hdf5copy import rewrite
from attnhooks.backends.hdf5eoa import amended, close_file, open_past_eoa
from attnhooks.backends.integrity import MAX_CHUNKS_CHECKED, chunks_of, corrupt
from attnhooks.errors import NotAStoreError, StoreOptionError

__all__ = ["HDF5Backend"]

_STR = "attnhooks:utf8"  # marks a uint8 dataset holding strings as UTF-8 bytes, NUL-padded, on a last axis
_STR_CHUNK = 32
# groups keep up to 32 attributes in their object header (HDF5 moves them to a fractal heap and a
# B-tree from 9 on): a module's ~15 are then one block of metadata, not three, to write and to tear
_GCPL = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
_GCPL.set_attr_phase_change(32, 24)
_LCPL = h5py.h5p.create(h5py.h5p.LINK_CREATE)  # as h5py makes links: UTF-8 names, missing parents made
_LCPL.set_create_intermediate_group(True)
_LCPL.set_char_encoding(h5py.h5t.CSET_UTF8)


class HDF5Backend:
    """A store in one HDF5 file."""

    name: ClassVar[str] = "hdf5"
    schemes: ClassVar[tuple[str, ...]] = ("hdf5", "h5")
    suffixes: ClassVar[tuple[str, ...]] = (".h5", ".hdf5")
    default_codec: ClassVar[Codec] = Codec("zstd", 1) if hdf5plugin is not None else Codec("gzip", 1)

    def __init__(self, location: str, file: h5py.File, readonly: bool) -> None:
        self.location = location
        self.readonly = readonly
        self._path = _local(location)
        self._file = file
        self._datasets: dict[str, h5py.Dataset] = {}
        # paths a writer knows to exist (it made or saw them; only it deletes, and forgets them then):
        # HDF5 answers `path in file` in 20-40 us, and a new store's modules ask it ~10 times each
        self._present: set[str] = set()

    @classmethod
    def check_codec(cls, codec: Codec) -> None:
        """Raise StoreOptionError for a codec this backend cannot write (before a store is made)."""
        _filter(codec)

    @classmethod
    def exists(cls, location: str) -> bool:
        return os.path.exists(_local(location))

    @classmethod
    def open(cls, location: str, mode: str, attrs: dict[str, Any] | None = None) -> HDF5Backend:
        check_mode(mode)
        path = _local(location)
        exists = os.path.exists(path)
        if mode == "w-" and exists:
            refuse_existing(location)
        if mode in ("r", "r+") and not exists:
            raise NotAStoreError(f"{location}: no such file")
        if exists and mode in ("r", "r+") and not h5py.is_hdf5(path):
            raise NotAStoreError(f"{location} is not an HDF5 file")
        if mode == "r":
            return cls(location, _open_for_reading(path), readonly=True)
        # append: open as it is; create: aside with the root attributes, then renamed into place
        file = _open_or_explain(path) if mode == "r+" else _create(path, attrs or {})
        try:
            with _io():
                file.swmr_mode = True  # from here on the file on disk is always consistent
        except RuntimeError as err:  # a file in an older format (not written by attnhooks): no SWMR
            if "superblock version" not in str(err):
                raise
        return cls(location, file, readonly=False)

    # -- structure --------------------------------------------------------------------------
    def _dataset(self, path: str) -> h5py.Dataset:
        ds = self._datasets.get(path)
        if ds is None:
            node = self._file[path]
            if not isinstance(node, h5py.Dataset):
                raise KeyError(f"{path} is a group, not an array")
            ds = self._datasets[path] = node
        return ds

    def create_group(self, path: str) -> None:
        if path and not self.contains(path):
            with _io():
                h5py.h5g.create(self._file.id, path.encode(), lcpl=_LCPL, gcpl=_GCPL)
            self._present.add(path)

    def create_array(
        self, path: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill_value: Any, codec: Codec
    ) -> None:
        if self.contains(path):
            self._delete(path)
        file = self._file
        is_str = dtype == "str"
        if is_str:  # UTF-8 bytes along one more axis: SWMR cannot write variable-length strings
            shape, chunks, dtype, fill_value = (*shape, 0), (*chunks, _STR_CHUNK), "uint8", 0
        with _io():
            ds = self._datasets[path] = file.create_dataset(
                path,
                shape=shape,
                maxshape=(None,) * len(shape),
                chunks=tuple(max(c, 1) for c in chunks),
                dtype=np.dtype(dtype),
                fillvalue=fill_value,
                # a checksum per chunk, verified by HDF5 on every read; not on a chunk rewritten in place
                # (a per-step table): a killed rewrite leaves it half old, half new (Codec.rewritten)
                fletcher32=codec.checksum and not codec.rewritten,
                **_filter(codec),
            )
            if is_str:
                ds.attrs[_STR] = True
        self._present.add(path)

    def remove(self, path: str) -> None:
        """Delete the group or array at ``path`` with everything under it; nothing if there is none.
        The file does not shrink (h5repack reclaims the space)."""
        check_remove(self, path)
        if self.contains(path):
            self._delete(path)

    def _delete(self, path: str) -> None:
        """Delete an object. SWMR cannot (HDF5 crashes): leave it for the deletion, then resume.
        Only :meth:`remove` and a caller re-creating an array land here."""
        self._datasets.clear()
        self._present.clear()
        swmr = self._file.swmr_mode
        with _io():
            if swmr:
                self._file.close()
                self._file = h5py.File(self._path, "r+", libver="latest", rdcc_nbytes=0)
            del self._file[path]
            if swmr:
                self._file.flush()
                self._file.swmr_mode = True

    def contains(self, path: str) -> bool:
        if path == "" or path in self._present:
            return True
        found = path in self._file
        if found and not self.readonly:  # (a reader is not told of a writer's deletions: it asks each time)
            self._present.add(path)
        return found

    def children(self, path: str) -> list[str]:
        node = self._file[path] if path else self._file
        return sorted(node.keys()) if isinstance(node, h5py.Group) else []

    def _is_str(self, ds: h5py.Dataset) -> bool:
        return bool(ds.attrs.get(_STR, False))

    def shape(self, path: str) -> tuple[int, ...]:
        ds = self._dataset(path)
        return tuple(ds.shape[:-1] if self._is_str(ds) else ds.shape)

    def dtype(self, path: str) -> str:
        ds = self._dataset(path)
        return "str" if self._is_str(ds) else ds.dtype.name

    def resize(self, path: str, shape: tuple[int, ...]) -> None:
        ds = self._dataset(path)
        with _io():
            ds.resize((*shape, ds.shape[-1]) if self._is_str(ds) else shape)

    def write(self, path: str, selection: Selection, value: np.ndarray) -> None:
        ds = self._dataset(path)
        with _io():
            if not self._is_str(ds):
                ds[selection] = value
                return
            encoded = [str(v).encode() for v in np.asarray(value, dtype=object).ravel()]
            width = max([ds.shape[-1], *map(len, encoded)])
            if width > ds.shape[-1]:
                ds.resize((*ds.shape[:-1], width))
            raw = np.zeros((len(encoded), width), dtype=np.uint8)
            for i, data in enumerate(encoded):
                raw[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
            ds[(*selection, slice(None))] = raw.reshape(*np.shape(value), width)

    def read(self, path: str, selection: Selection = ()) -> np.ndarray:
        ds = self._dataset(path)
        if not self._is_str(ds):
            try:
                return np.asarray(ds[selection])
            except OSError as err:  # "data error detected by fletcher32 checksum", a filter failing to decode
                if "addr overflow" in str(err) and self._amend():
                    return self.read(path, selection)
                damaged = corrupt(path, ds.shape, ds.chunks, selection, ds.__getitem__, err, self.location)
                if damaged is None:
                    raise
                raise damaged from err
        if ds.shape[-1] == 0:  # nothing written yet: every string is empty
            return np.full(np.empty(ds.shape[:-1], dtype=np.uint8)[selection].shape, "", dtype=object)
        raw = np.asarray(ds[(*selection, slice(None))])
        flat = raw.reshape(-1, raw.shape[-1])
        out = np.array([bytes(row).rstrip(b"\0").decode() for row in flat], dtype=object)
        return out.reshape(raw.shape[:-1])

    def checksummed(self, path: str) -> bool:
        """True when the array's chunks carry a checksum (a store written by attnhooks 0.2 on)."""
        return bool(self._dataset(path).fletcher32)

    def missing_chunks(self, path: str, selection: Selection = ()) -> list[tuple[int, ...]]:
        """The chunks of ``selection`` never written to the file, for an array written with
        checksums (``[]`` for an array of an older store)."""
        ds = self._dataset(path)
        if not self.checksummed(path) or self._is_str(ds):
            return []
        missing = []
        for n, coords in enumerate(chunks_of(ds.shape, ds.chunks, selection)):
            if n >= MAX_CHUNKS_CHECKED:
                break
            if ds.id.get_chunk_info_by_coord(tuple(c * k for c, k in zip(coords, ds.chunks))).byte_offset is None:
                missing.append(coords)
        return missing

    # -- attributes ---------------------------------------------------------------------------
    def attrs(self, path: str) -> dict[str, Any]:
        node = self._file[path] if path else self._file
        return {key: decode(value) for key, value in node.attrs.items()}

    def set_attrs(self, path: str, values: dict[str, Any]) -> None:
        node = self._file[path] if path else self._file
        with _io():
            write_attrs(node, values)

    def flush(self) -> None:
        with _io():
            self._file.flush()

    def close(self) -> None:
        self._datasets.clear()
        with _io():
            close_file(self._file)

    def _amend(self) -> bool:
        """Reopen a reader's file with its superblock amended (:mod:`~attnhooks.backends.hdf5eoa`); False: not that."""
        file = None if not self.readonly or amended(self._file) else open_past_eoa(self._path)
        if file is None:
            return False
        self.close()
        self._file = file
        return True

    def refresh(self) -> None:
        """A reader: open the file again, to see what was committed since it was opened (HDF5 reads
        its metadata once per open)."""
        if self.readonly:
            self.close()
            self._file = _open_for_reading(self._path)

    @classmethod
    def discard(cls, location: str) -> None:
        """Remove the store file at ``location`` (the writer's: a capture that created it and failed
        before committing anything)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(_local(location))

    @classmethod
    def cleanup(cls, location: str) -> list[str]:
        """Rewrite a file left open by a killed SWMR writer so that it opens without ``swmr=True``
        (:func:`~attnhooks.backends.hdf5copy.rewrite`)."""
        path = _local(location)
        if not os.path.exists(path) or not _left_open(path):
            return []
        return rewrite(path)


@contextmanager
def _io() -> Iterator[None]:
    """h5py reports a full disk as ``RuntimeError('... errno = 28 ...')``: make it an ``OSError``
    with the errno, so that the writer can say what happened."""
    try:
        yield
    except (RuntimeError, OSError) as err:
        found = re.search(r"errno = (\d+)", str(err))
        code = int(found.group(1)) if found else getattr(err, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT) and not (isinstance(err, OSError) and err.errno == code):
            raise OSError(code, f"{os.strerror(code)} ({err})") from err
        raise


def _local(location: str) -> str:
    for scheme in ("hdf5://", "h5://", "file://"):
        if location.startswith(scheme):
            return location[len(scheme) :]
    return location


def _left_open(path: str) -> bool:
    try:
        h5py.File(path, "r").close()
    except OSError as err:
        if "already open for write" in str(err):
            return True
        raise
    return False


def _create(path: str, attrs: dict[str, Any]) -> h5py.File:
    """A new file at ``path`` with its root attributes, built aside and renamed into place (it never
    exists without its schema); a failure (a full disk) leaves nothing behind."""
    tmp = f"{path}.creating-{uuid.uuid4().hex[:8]}"
    file = None
    try:
        with _io():
            # no chunk cache: the writer writes each chunk whole, once, and a cache would only
            # hold a chunk per dataset in memory, outside the capture's budget
            file = h5py.File(tmp, "w", libver="latest", rdcc_nbytes=0)
            write_attrs(file, attrs)
            file.flush()
        os.replace(tmp, path)
    except BaseException:
        if file is not None and file.id.valid:
            with contextlib.suppress(Exception):
                file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return file


def _open_for_reading(path: str) -> h5py.File:
    """A reader's handle of ``path``. A file no writer holds is opened through a Python file object:
    HDF5 shares one open file (and its metadata cache) among all handles of a path in a process, so
    a second reader (or a refresh) opened the usual way would see what the first one read, not what
    the file holds now. A file open for writing (SWMR, which needs HDF5's own file driver) is read in
    SWMR mode."""
    raw = open(path, "rb")  # noqa: SIM115 - h5py reads it until the handle closes (closed with it)
    try:
        file = h5py.File(raw, "r")
    except OSError as err:
        raw.close()
        if "already open for write" not in str(err):
            raise NotAStoreError(f"{path} cannot be opened as HDF5: {err}") from err
        return h5py.File(path, "r", swmr=True)  # a live writer, or one that was killed
    file._attnhooks_raw = raw  # closed with the file (hdf5eoa.close_file)
    return file


def _open_or_explain(path: str) -> h5py.File:
    from attnhooks.errors import StoreStateError

    try:
        return h5py.File(path, "r+", libver="latest", rdcc_nbytes=0)
    except OSError as err:
        if "already open for write" in str(err):
            raise StoreStateError(
                f"{path} is still open for writing by another process, or its writer was killed; "
                f"if no writer is running, run attnhooks.repair({path!r}) first"
            ) from err
        raise


def _filter(codec: Codec) -> dict[str, Any]:
    if codec.name == "none":
        return {}
    if codec.name == "gzip":
        return {"compression": "gzip", "compression_opts": codec.level}
    if codec.name == "lzf":
        return {"compression": "lzf"}
    if codec.name == "zstd":
        if hdf5plugin is None:
            raise StoreOptionError(
                "zstd in HDF5 needs the hdf5plugin package (pip install 'attnhooks[hdf5]'), also to read the file; "
                "or pass compression='gzip', which every HDF5 reader decodes"
            )
        return dict(hdf5plugin.Zstd(clevel=codec.level))
    raise StoreOptionError(f"compression {codec.name!r} is not available in the HDF5 backend (zstd, gzip, lzf, none)")
