"""The storage backend protocol and the registry that picks a backend for a location.

A backend stores a hierarchy of groups and n-dimensional arrays with JSON-able attributes, numpy
in and numpy out. It knows nothing about attention or torch: the layout of schema ``attnhooks/1``
lives in :mod:`attnhooks.schema`, the write protocol in :mod:`attnhooks.write.commit`, the reader in
:mod:`attnhooks.read`. Paths are ``/``-separated, relative to the root (``""`` is the root).

Backends are found by name (``"zarr"``), URI scheme (``"memory://run"``) or file suffix
(``.zarr``, ``.h5`` / ``.hdf5``). A URL whose path ends in ``.zarr`` is a Zarr store on that
fsspec file system whatever its scheme (``s3://bucket/run.zarr``, ``memory://run.zarr``).
Third-party backends register with :func:`register_backend` or through the
``attnhooks.backends`` entry-point group (the entry point loads the class).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from attnhooks.errors import StoreExistsError, StoreOptionError

__all__ = [
    "MODES",
    "Backend",
    "Codec",
    "backend_for",
    "backend_names",
    "register_backend",
]

MODES = ("r", "r+", "w-", "w")
"""Open modes: read-only, read/write existing, create (fail if it exists), overwrite."""

Selection = tuple[slice | int, ...]


@dataclass(frozen=True)
class Codec:
    """How an array's chunks are stored: ``name`` is the compression, ``"zstd"``, ``"gzip"`` or
    ``"none"``; ``skip_empty``: a chunk holding only the fill value may be left unwritten (zarr
    checks every chunk for it, a pass over the data that doubles the CPU of an uncompressed write;
    the writer turns it off for arrays that are never empty, such as q and k). Backends without
    such a check ignore it. ``checksum``: store a checksum with every chunk, verified on every read
    (and keep every chunk written, so that a missing one is found missing); on by default.
    ``rewritten``: the array's chunks are written again as steps are added (the per-step tables), so
    a chunk holding committed entries is rewritten; a backend whose rewrite is not atomic (HDF5 writes
    in place, and the OS stops a killed writer's write between pages) leaves such chunks without a
    checksum, since a torn rewrite (committed entries unchanged, the new one half written) must not
    make the committed entries unreadable."""

    name: str = "zstd"
    level: int = 1
    skip_empty: bool = True
    checksum: bool = True
    rewritten: bool = False


@runtime_checkable
class Backend(Protocol):
    """What the writer and the reader need from a storage engine.

    Class attributes ``name``, ``schemes`` and ``suffixes`` route locations to the backend;
    ``open`` makes an instance. Two methods are optional (not part of the protocol, so that backends
    written before them stay backends): ``remove(path)`` deletes the group or array at ``path`` and
    everything under it, forgetting any handle on them (a missing ``path`` is not an error; a
    read-only backend raises ``PermissionError``, the root ``StoreOptionError``, see
    :func:`check_remove`); overwriting one rank of a rank set needs it. ``create_group_with(path,
    attrs)`` does what ``create_group(path)`` then ``set_attrs(path, attrs)`` do, in fewer writes (the
    writer makes each module's group so). Errors raised by the
    engine (``OSError`` for a full disk or a read-only directory) are allowed to propagate: the
    writer wraps them.
    """

    name: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]
    suffixes: ClassVar[tuple[str, ...]]
    default_codec: ClassVar[Codec]
    location: str
    readonly: bool

    @classmethod
    def open(cls, location: str, mode: str, attrs: dict[str, Any] | None = None) -> Backend:
        """Open ``location`` in one of :data:`MODES`; ``w-`` raises :class:`StoreExistsError`.

        With ``w-`` / ``w`` and ``attrs``, the new store must appear at ``location`` with these
        root attributes already in place (build it aside and rename it, or on an object store
        put the root metadata once with them in it), so that a process killed while creating it
        never leaves a store without its schema. ``w`` replaces what was there: the new store holds
        its root attributes and nothing else (its writer relies on it and never asks whether a path exists).
        """
        ...

    @classmethod
    def exists(cls, location: str) -> bool: ...

    def create_group(self, path: str) -> None: ...

    def create_array(
        self,
        path: str,
        shape: tuple[int, ...],
        dtype: str,
        chunks: tuple[int, ...],
        fill_value: Any,
        codec: Codec,
    ) -> None:
        """An array growable along every axis; ``dtype`` is a numpy name or ``"str"``."""
        ...

    def contains(self, path: str) -> bool: ...

    def children(self, path: str) -> list[str]:
        """Names of the groups and arrays directly under group ``path``."""
        ...

    def shape(self, path: str) -> tuple[int, ...]: ...

    def dtype(self, path: str) -> str: ...

    def resize(self, path: str, shape: tuple[int, ...]) -> None: ...

    def write(self, path: str, selection: Selection, value: np.ndarray) -> None: ...

    def read(self, path: str, selection: Selection = ()) -> np.ndarray: ...

    def attrs(self, path: str) -> dict[str, Any]: ...

    def set_attrs(self, path: str, values: dict[str, Any]) -> None:
        """Update (not replace) attributes; on the root this is the commit point, so it must be
        atomic: a reader sees all of ``values`` or none."""
        ...

    def flush(self) -> None:
        """Make everything written so far durable before the next commit."""
        ...

    def close(self) -> None: ...

    @classmethod
    def cleanup(cls, location: str) -> list[str]:
        """Remove engine-level leftovers of a killed writer (nothing may have it open); return
        what was removed."""
        ...


_REGISTRY: dict[str, type[Backend]] = {}
_BUILTIN = {
    "memory": "attnhooks.backends.memory:MemoryBackend",
    "zarr": "attnhooks.backends.zarrstore:ZarrBackend",
    "hdf5": "attnhooks.backends.hdf5:HDF5Backend",
}
ENTRY_POINT_GROUP = "attnhooks.backends"
# suffixes of formats that a backend reads on any fsspec file system: a URL ending in one goes to
# that backend whatever its scheme (memory://run.zarr is Zarr on fsspec's memory file system)
_URL_SUFFIXES = {".zarr": "zarr"}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Make ``cls`` available by its ``name``, ``schemes`` and ``suffixes`` (usable as a decorator)."""
    for attr in ("name", "schemes", "suffixes", "open", "exists"):
        if not hasattr(cls, attr):
            raise StoreOptionError(f"{cls.__name__} is not a backend: it has no {attr!r}")
    _REGISTRY[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    """Every backend known: built-in, registered and declared through entry points."""
    return sorted({*_BUILTIN, *_REGISTRY, *(ep.name for ep in _entry_points())})


def backend_for(location: str | os.PathLike[str], backend: str | None = None) -> type[Backend]:
    """The backend class for ``location``: by explicit name, a URL ending in ``.zarr`` (Zarr on
    fsspec), URI scheme, then file suffix.

    Raises:
        StoreOptionError: nothing matches, naming the known backends and suffixes.
    """
    text = os.fspath(location)
    if backend is not None:
        return _load(backend)
    scheme = text.split("://", 1)[0].lower() if "://" in text else None
    suffix = Path(text.split("://", 1)[-1].rstrip("/")).suffix.lower()
    if scheme not in (None, "file") and suffix in _URL_SUFFIXES:
        return _load(_URL_SUFFIXES[suffix])
    for cls in _candidates():
        if scheme is not None and scheme in cls.schemes:
            return cls
        if scheme in (None, "file") and suffix and suffix in cls.suffixes:
            return cls
    if scheme is None and Path(text).is_dir() and (Path(text) / "zarr.json").exists():
        return _load("zarr")
    raise StoreOptionError(
        f"no storage backend for {text!r}: use a path ending in .zarr, .h5 or .hdf5, a URL ending in .zarr "
        f"(any fsspec file system: s3://bucket/run.zarr, memory://run.zarr), a memory://name URL, "
        f"or pass backend= one of {backend_names()}"
    )


def _candidates() -> Iterator[type[Backend]]:
    """Built-in and registered backends first; the installed packages' entry points (a slower scan)
    only when none of those matched."""
    known = sorted({*_BUILTIN, *_REGISTRY})
    yield from _loadable(known)
    yield from _loadable(sorted({ep.name for ep in _entry_points()} - set(known)))


def _loadable(names: list[str]) -> Iterator[type[Backend]]:
    for name in names:
        try:
            yield _load(name)
        except StoreOptionError:
            continue  # an optional dependency is missing: another backend may still match


def _load(name: str) -> type[Backend]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    target = _BUILTIN.get(name)
    if target is None:
        for ep in _entry_points():
            if ep.name == name:
                return register_backend(ep.load())
        raise StoreOptionError(f"unknown storage backend {name!r}; known: {backend_names()}")
    module_name, _, attr = target.partition(":")
    try:
        module = __import__(module_name, fromlist=[attr])
    except ImportError as err:
        extra = {"zarr": "zarr", "hdf5": "hdf5"}.get(name, name)
        raise StoreOptionError(
            f"the {name!r} backend needs {err.name or 'a missing package'}: pip install 'attnhooks[{extra}]'"
        ) from err
    return register_backend(getattr(module, attr))


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise StoreOptionError(f"mode={mode!r}: use one of {MODES}")


def refuse_existing(location: str) -> None:
    raise StoreExistsError(
        f"{location} already exists; pass mode='overwrite' to replace it or mode='append' to add steps to it"
    )


def check_remove(backend: Backend, path: str) -> None:
    """Refuse :meth:`Backend.remove` on a read-only backend or on the root."""
    if backend.readonly:
        raise PermissionError(f"{backend.location} is open read-only: cannot remove {path!r}")
    if not split(path):
        raise StoreOptionError(
            f"remove({path!r}) names the root of {backend.location}: open the store with mode 'w' to replace it"
        )


def split(path: str) -> list[str]:
    return [p for p in path.split("/") if p]
