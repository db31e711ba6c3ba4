"""Rank sets: one store written by every process of a ``torch.distributed`` job.

Layout (schema ``attnhooks/1``)::

    <root>       attrs: schema, layout="ranks", world_size
      rank<r>/   a complete store of rank r (the layout of :mod:`attnhooks.schema`) with its own
                 status, committed, created, ... and rank, world_size in its attributes

Each rank writes only its own group and commits it on its own: no collective operation happens, in
hooks or anywhere else, so a rank that does not capture is never waited for, and a rank that
crashes leaves every other rank's steps (and its own committed ones) readable. The root is created
by whichever rank comes first; its attributes never change afterwards except ``world_size``.

The backend must let several processes write distinct groups of one store at once: Zarr does (on
a local file system and on object stores through fsspec), HDF5 does not (one writer per file), so
a distributed capture into an ``.h5`` path is refused with what to do instead.

This module imports no torch: :func:`current` imports ``torch.distributed`` when it is called.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from .backends.base import Backend, Codec, Selection
from .errors import AttnHooksError, NotAStoreError, StoreExistsError, StoreOptionError
from .schema import SCHEMA

__all__ = ["LAYOUT", "RankInfo", "Subtree", "current", "group", "open_rank", "present", "subtree"]

LAYOUT = "ranks"
_GROUP = re.compile(r"rank(\d+)")
_MULTI_WRITER = ("zarr", "memory")  # backends known to take several writers in distinct groups


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job."""

    rank: int
    world_size: int


def current(require: bool = False) -> RankInfo | None:
    """The rank and world size of this process when ``torch.distributed`` is initialised, else
    None (``require``: a StoreOptionError instead)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if require:
            raise StoreOptionError(
                "capture(distributed=True) needs torch.distributed.init_process_group() to have run in this process"
            )
        return None
    return RankInfo(dist.get_rank(), dist.get_world_size())


def group(rank: int) -> str:
    """The group of ``rank`` under a rank set's root."""
    return f"rank{rank}"


def present(root: Backend) -> list[int]:
    """Ranks whose group exists and has its schema (a group being created has none yet)."""
    ranks = []
    for name in root.children(""):
        match = _GROUP.fullmatch(name)
        if match and root.attrs(name).get("schema") is not None:
            ranks.append(int(match.group(1)))
    return sorted(ranks)


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
            _remove(root, path)
        if mode != "r+":
            root.create_group(path)
            root.set_attrs(path, attrs)  # one write: the group shows its schema or is skipped by readers
    except BaseException:
        root.close()
        raise
    return subtree(root, path, owner=True)


def subtree(root: Backend, prefix: str, owner: bool = False) -> Backend:
    """The group ``prefix`` of ``root`` as a backend of its own (see :class:`Subtree`)."""
    return cast(Backend, Subtree(root, prefix, owner))


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


def _remove(root: Backend, path: str) -> None:
    remove = getattr(root, "remove", None)
    if remove is None:
        raise StoreOptionError(
            f"the {root.name} backend cannot remove a group, so mode='overwrite' cannot replace a rank"
        )
    remove(path)


class Subtree:
    """The group ``prefix`` of an open backend, seen as a backend of its own (one rank's store).

    Paths are relative to the group; ``""`` is the group itself, whose attributes are the rank's
    root attributes. ``owner``: closing the subtree closes the backend under it. The engine's
    ``name``, ``default_codec``... are the wrapped backend's (instance attributes: make one with
    :func:`subtree`, which types it as a :class:`Backend`).
    """

    def __init__(self, root: Backend, prefix: str, owner: bool = False) -> None:
        self.root = root
        self.prefix = prefix.strip("/")
        self.owner = owner
        self.location = root.location
        self.readonly = root.readonly
        self.name = root.name
        self.schemes = root.schemes
        self.suffixes = root.suffixes
        self.default_codec = root.default_codec

    def _path(self, path: str) -> str:
        return f"{self.prefix}/{path}" if path else self.prefix

    @classmethod
    def open(cls, location: str, mode: str, attrs: dict[str, Any] | None = None) -> Backend:
        raise AttnHooksError("a Subtree is made from an open backend, not opened by location")

    @classmethod
    def exists(cls, location: str) -> bool:
        return False

    @classmethod
    def cleanup(cls, location: str) -> list[str]:
        return []

    def create_group(self, path: str) -> None:
        self.root.create_group(self._path(path))

    def create_array(
        self, path: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill_value: Any, codec: Codec
    ) -> None:
        self.root.create_array(self._path(path), shape, dtype, chunks, fill_value, codec)

    def contains(self, path: str) -> bool:
        return self.root.contains(self._path(path))

    def children(self, path: str) -> list[str]:
        return self.root.children(self._path(path))

    def shape(self, path: str) -> tuple[int, ...]:
        return self.root.shape(self._path(path))

    def dtype(self, path: str) -> str:
        return self.root.dtype(self._path(path))

    def resize(self, path: str, shape: tuple[int, ...]) -> None:
        self.root.resize(self._path(path), shape)

    def write(self, path: str, selection: Selection, value: np.ndarray) -> None:
        self.root.write(self._path(path), selection, value)

    def read(self, path: str, selection: Selection = ()) -> np.ndarray:
        return self.root.read(self._path(path), selection)

    def attrs(self, path: str) -> dict[str, Any]:
        return self.root.attrs(self._path(path))

    def set_attrs(self, path: str, values: dict[str, Any]) -> None:
        self.root.set_attrs(self._path(path), values)

    def remove(self, path: str) -> None:
        _remove(self.root, self._path(path))

    def flush(self) -> None:
        self.root.flush()

    def close(self) -> None:
        if self.owner:
            self.root.close()

    def __repr__(self) -> str:
        return f"<Subtree {self.prefix} of {self.location}>"
