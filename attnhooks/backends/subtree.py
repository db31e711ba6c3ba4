"""Rank sets on a backend: one store written by every process of a ``torch.distributed`` job.

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
"""

from __future__ import annotations

import re
from typing import Any, cast

import numpy as np

from attnhooks.backends.base import Backend, Codec, Selection
from attnhooks.errors import AttnHooksError, StoreOptionError

__all__ = ["LAYOUT", "Subtree", "group", "present", "remove_group", "subtree"]

LAYOUT = "ranks"
_GROUP = re.compile(r"rank(\d+)")


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


def subtree(root: Backend, prefix: str, owner: bool = False) -> Backend:
    """The group ``prefix`` of ``root`` as a backend of its own (see :class:`Subtree`)."""
    return cast(Backend, Subtree(root, prefix, owner))


def remove_group(root: Backend, path: str) -> None:
    """Remove the group ``path`` of ``root`` (a backend that cannot remove groups: StoreOptionError)."""
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
        remove_group(self.root, self._path(path))

    def flush(self) -> None:
        self.root.flush()

    def close(self) -> None:
        if self.owner:
            self.root.close()

    def __repr__(self) -> str:
        return f"<Subtree {self.prefix} of {self.location}>"
