"""Opening this rank's group of a rank set for writing (layout: :mod:`attnhooks.backends.subtree`).

The backend must let several processes write distinct groups of one store at once: Zarr does (on
a local file system and on object stores through fsspec), HDF5 does not (one writer per file), so
a distributed capture into an ``.h5`` path is refused with what to do instead.
"""

from __future__ import annotations

import contextlib
from typing import Any

from attnhooks.backends.base import Backend
from attnhooks.backends.subtree import LAYOUT, group, present, remove_group, subtree
from attnhooks.capturing.distributed import RankInfo
from attnhooks.errors import NotAStoreError, StoreExistsError, StoreOptionError
from attnhooks.schema import SCHEMA

__all__ = ["open_rank"]

_MULTI_WRITER = ("zarr", "memory")  # backends known to take several writers in distinct groups


def open_rank(location: str, cls: type[Backend], info: RankInfo, mode: str, attrs: dict[str, Any]) -> Backend:
    """Open this rank's group of the rank set at ``location`` for writing.

    ``mode`` is the backend mode of a plain store, applied to the rank's group: ``"w-"`` refuses a
    group that exists, ``"w"`` replaces it, ``"r+"`` appends to it. The root is created when
    missing and may exist already (another rank of this job made it); a plain store there is
    refused, never replaced, since other ranks may be writing next to it.
    """
    if cls.name not in _MULTI_WRITER:
        raise StoreOptionError(
            f"{location}: a {cls.name} store takes one writer, and this capture runs under torch.distributed "
            f"(rank {info.rank} of {info.world_size}); write a .zarr store (every rank writes its own group of it), "
            f"or pass capture(..., distributed=False) with one path per rank, e.g. f'run-rank{{rank}}.h5'"
        )
    root = _open_root(location, cls, info)
    path = group(info.rank)
    try:
        exists = root.contains(path)
        if exists and mode == "w-":
            raise StoreExistsError(
                f"{location} already holds rank {info.rank}; pass mode='overwrite' to replace each rank's part "
                "or mode='append' to add steps to it"
            )
        if not exists and mode == "r+":
            raise NotAStoreError(f"{location} has no rank {info.rank} to append to (it holds ranks {present(root)})")
        if exists and mode == "w":
            remove_group(root, path)
        if mode != "r+":
            root.create_group(path)
            root.set_attrs(path, attrs)  # one write: the group shows its schema or is skipped by readers
    except BaseException:
        root.close()
        raise
    return subtree(root, path, owner=True)


def _open_root(location: str, cls: type[Backend], info: RankInfo) -> Backend:
    marker = {"schema": SCHEMA, "layout": LAYOUT, "world_size": info.world_size}
    if not cls.exists(location):
        # another rank may create it between the check and the creation: what is there is checked below
        with contextlib.suppress(StoreExistsError, OSError):
            cls.open(location, "w-", marker).close()
    root = cls.open(location, "r+")
    found = root.attrs("")
    if found.get("layout") != LAYOUT:
        root.close()
        what = "a single-process store" if found.get("schema") else "something that is not an attnhooks store"
        raise StoreExistsError(
            f"{location} holds {what}; a capture under torch.distributed writes a rank set (one group per rank): "
            "remove it or write elsewhere"
        )
    if found.get("world_size") != info.world_size:
        root.set_attrs("", {"world_size": info.world_size})
    return root
