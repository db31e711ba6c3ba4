"""Opening a store for a capture: its options checked before anything exists on disk, its backend
opened with typed errors, and the writer that the capture hands its steps to."""

from __future__ import annotations

import errno
import inspect
import os
from collections.abc import Callable
from typing import Any

from attnhooks.backends.base import Backend, Codec, backend_for
from attnhooks.backends.lease import Lease
from attnhooks.backends.subtree import LAYOUT
from attnhooks.capturing.distributed import RankInfo
from attnhooks.errors import (
    AttnHooksError,
    StoreBusyError,
    StoreExistsError,
    StoreFullError,
    StoreOptionError,
    StoreWriteError,
)
from attnhooks.schema import SUPPORTED
from attnhooks.write.ranks import open_rank
from attnhooks.write.writer import StoreOptions, StoreWriter, dumps_options, parse_bytes, root_attrs

__all__ = ["Location", "open_backend", "opener", "store_options"]

Location = str | os.PathLike[str] | Backend
_MODES = {"create": "w-", "overwrite": "w", "append": "r+"}


def opener(
    store: Location, options: StoreOptions, described: dict[str, Any]
) -> Callable[[dict[str, Any], RankInfo | None], StoreWriter]:
    """What a capture calls when it starts: opens ``store`` and returns its writer. ``described``: the
    capture's options as given, kept in the store's metadata."""

    def open_writer(meta: dict[str, Any], rank: RankInfo | None) -> StoreWriter:
        meta = {**meta, "options": dumps_options(described)}
        lease = _lease(store, options.mode, rank)
        try:
            backend = open_backend(store, options, meta, rank)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        # a store this capture created at a path (not a backend instance handed in): its backend's
        # optional discard(location), to remove it again if the capture fails before a step is committed
        created = isinstance(store, (str, os.PathLike)) and options.mode != "r+" and rank is None
        discard = getattr(type(backend), "discard", None) if created else None

        def on_close(empty: bool) -> None:
            try:
                if empty and discard is not None:  # a retry must not find the empty store
                    discard(backend.location)
            finally:
                if lease is not None:
                    lease.release()

        try:
            appending = options.mode == "r+"
            fresh = isinstance(store, (str, os.PathLike))  # (a backend handed in may hold anything)
            return StoreWriter(backend, options, meta, appending=appending, on_close=on_close, fresh=fresh)
        except BaseException:
            backend.close()
            on_close(False)
            raise

    return open_writer


def _lease(store: Location, mode: str, rank: RankInfo | None) -> Lease | None:
    """The store's lease (one writer per store, :mod:`attnhooks.backends.lease`), taken before the store
    is created or opened (a backend instance: before it is written); None for a store that takes none
    (a URL, a memory store)."""
    location = store.location if isinstance(store, Backend) else os.fspath(store)
    what = {"w-": "create", "w": "overwrite", "r+": "append to"}[mode]
    try:
        return Lease.take(location, rank=None if rank is None else rank.rank, what=what)
    except StoreBusyError as err:
        if mode == "w-":  # two captures creating one store at once: the one that came second finds it existing
            raise StoreExistsError(f"{location} is being created by another capture: {err}") from err
        raise
    except OSError as err:  # the lease cannot be written where the store was to be: neither can the store
        kind = StoreFullError if err.errno in (errno.ENOSPC, errno.EDQUOT) else StoreWriteError
        raise kind(f"cannot write the store at {location}: {err.strerror or err}") from err


def store_options(
    mode: str, buffer: int | str, when_full: str, dtype: str | None, compression: str | Codec | None
) -> StoreOptions:
    if mode not in _MODES:
        raise StoreOptionError(f"mode={mode!r}: use 'create', 'overwrite' or 'append'")
    if when_full not in ("block", "drop"):
        raise StoreOptionError(f"when_full={when_full!r}: use 'block' (wait for the writer) or 'drop' (skip the step)")
    if dtype not in (None, "float32", "float16", "bfloat16-bits"):
        raise StoreOptionError(f"dtype={dtype!r}: use None (the model's), 'float32', 'float16' or 'bfloat16-bits'")
    if isinstance(compression, str):
        if compression not in ("zstd", "gzip", "lzf", "blosc", "none"):
            raise StoreOptionError(
                f"compression={compression!r}: use 'zstd', 'gzip', 'lzf' (HDF5), 'blosc' (Zarr), 'none', "
                "or None for the backend's default"
            )
        compression = Codec(compression, 0 if compression in ("none", "lzf") else 1)
    return StoreOptions(_MODES[mode], parse_bytes(buffer), when_full, dtype, compression)


def open_backend(
    store: str | os.PathLike[str] | Backend, options: StoreOptions, meta: dict[str, Any], rank: RankInfo | None
) -> Backend:
    """Open the store's backend for writing, with typed errors for the usual failures. A new
    store is created with its root attributes in place (it never exists without its schema).
    Under ``torch.distributed`` (``rank``), this rank's group of a rank set (:mod:`attnhooks.backends.subtree`)."""
    if not isinstance(store, (str, os.PathLike)):
        if not isinstance(store, Backend):
            raise StoreOptionError(f"store={store!r}: use a path, a URL or a backend instance")
        return store
    location = os.fspath(store)
    cls = backend_for(location)
    mode = options.mode
    check_codec = getattr(cls, "check_codec", None)  # optional capability: refuse before anything exists
    if check_codec is not None and options.codec is not None:
        check_codec(options.codec)
    try:
        if mode == "w" and rank is None and cls.exists(location):
            _refuse_replacing_what_is_not_ours(cls, location)
        if rank is not None:
            return open_rank(location, cls, rank, mode, root_attrs(cls, options, meta))
        if mode == "r+" or "attrs" not in inspect.signature(cls.open).parameters:
            return cls.open(location, mode)  # (a backend without atomic creation: the writer sets the root)
        return cls.open(location, mode, root_attrs(cls, options, meta))
    except AttnHooksError:
        raise
    except PermissionError as err:
        raise StoreWriteError(f"cannot write the store at {location}: {err.strerror or err}") from err
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFullError(
                f"cannot create the store at {location}: the device is full or over quota ({err}); "
                "free space or write elsewhere (nothing was left behind)"
            ) from err
        raise StoreWriteError(f"cannot open the store at {location}: {err}") from err


def _refuse_replacing_what_is_not_ours(cls: type[Backend], location: str) -> None:
    """``mode="overwrite"`` replaces an attnhooks store (a root with its schema, or a rank set) and
    nothing else: a folder or file of anything else at ``location`` is refused, untouched."""
    try:
        existing = cls.open(location, "r")
    except (AttnHooksError, OSError, ValueError) as err:
        raise StoreExistsError(
            f"{location} exists and is not an attnhooks store ({type(err).__name__}: {err}); mode='overwrite' "
            "replaces only attnhooks stores: move it away yourself, or write the capture elsewhere"
        ) from err
    try:
        attrs = existing.attrs("")
    finally:
        existing.close()
    if attrs.get("schema") not in SUPPORTED and attrs.get("layout") != LAYOUT:
        found = ", ".join(sorted(attrs)[:6]) or "no attributes"
        raise StoreExistsError(
            f"{location} holds a {cls.name} store that attnhooks did not write (root attributes: {found}); "
            "mode='overwrite' replaces only attnhooks stores: move it away yourself, or write elsewhere"
        )
