"""In-memory backend (``memory://name``): for tests, and for stores that need not outlive the process.

Stores live in a process-wide table by name, so ``memory://run`` opened twice is the same store.
Values are copied in and out, and attributes go through JSON, so code that works here does not
rely on sharing objects with the backend.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from attnhooks.backends.base import Codec, Selection, check_mode, check_remove, refuse_existing, split
from attnhooks.errors import NotAStoreError

__all__ = ["MemoryBackend"]


@dataclass
class _Array:
    data: np.ndarray
    chunks: tuple[int, ...]
    fill_value: Any
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Group:
    members: dict[str, _Group | _Array] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


class MemoryBackend:
    """A backend whose stores are Python objects in this process."""

    name: ClassVar[str] = "memory"
    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    suffixes: ClassVar[tuple[str, ...]] = ()
    default_codec: ClassVar[Codec] = Codec("none", 0)
    _stores: ClassVar[dict[str, _Group]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, location: str, root: _Group, readonly: bool) -> None:
        self.location = location
        self.readonly = readonly
        self._root = root

    @classmethod
    def _key(cls, location: str) -> str:
        return location.split("://", 1)[-1].strip("/")

    @classmethod
    def exists(cls, location: str) -> bool:
        return cls._key(location) in cls._stores

    @classmethod
    def open(cls, location: str, mode: str, attrs: dict[str, Any] | None = None) -> MemoryBackend:
        check_mode(mode)
        key = cls._key(location)
        with cls._lock:
            if mode in ("r", "r+"):
                if key not in cls._stores:
                    raise NotAStoreError(f"{location}: no such in-memory store")
                return cls(location, cls._stores[key], readonly=mode == "r")
            if mode == "w-" and key in cls._stores:
                refuse_existing(location)
            cls._stores[key] = _Group(attrs=json.loads(json.dumps(attrs or {})))
            return cls(location, cls._stores[key], readonly=False)

    @classmethod
    def delete(cls, location: str) -> None:
        """Forget the in-memory store at ``location`` (no error when there is none)."""
        with cls._lock:
            cls._stores.pop(cls._key(location), None)

    # -- structure --------------------------------------------------------------------------
    def _node(self, path: str) -> _Group | _Array:
        node: _Group | _Array = self._root
        for part in split(path):
            if not isinstance(node, _Group) or part not in node.members:
                raise KeyError(path)
            node = node.members[part]
        return node

    def _array(self, path: str) -> _Array:
        node = self._node(path)
        if not isinstance(node, _Array):
            raise KeyError(f"{path} is a group, not an array")
        return node

    def _parent(self, path: str) -> tuple[_Group, str]:
        *parents, leaf = split(path)
        node: _Group = self._root
        for part in parents:
            child = node.members.setdefault(part, _Group())
            if not isinstance(child, _Group):
                raise KeyError(f"{part} is an array")
            node = child
        return node, leaf

    def create_group(self, path: str) -> None:
        self._writable()
        if path:
            parent, leaf = self._parent(path)
            parent.members.setdefault(leaf, _Group())

    def create_array(
        self, path: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill_value: Any, codec: Codec
    ) -> None:
        self._writable()
        parent, leaf = self._parent(path)
        np_dtype = np.dtype(object) if dtype == "str" else np.dtype(dtype)
        data = np.full(shape, "" if dtype == "str" else fill_value, dtype=np_dtype)
        parent.members[leaf] = _Array(data, tuple(chunks), fill_value)

    def remove(self, path: str) -> None:
        """Delete the group or array at ``path`` with everything under it; nothing if there is none."""
        check_remove(self, path)
        if self.contains(path):
            *parents, leaf = split(path)
            parent = self._node("/".join(parents))
            assert isinstance(parent, _Group)  # it holds ``leaf``
            del parent.members[leaf]

    def contains(self, path: str) -> bool:
        try:
            self._node(path)
        except KeyError:
            return False
        return True

    def children(self, path: str) -> list[str]:
        node = self._node(path)
        return sorted(node.members) if isinstance(node, _Group) else []

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self._array(path).data.shape)

    def dtype(self, path: str) -> str:
        data = self._array(path).data
        return "str" if data.dtype == object else data.dtype.name

    def resize(self, path: str, shape: tuple[int, ...]) -> None:
        self._writable()
        arr = self._array(path)
        old = arr.data
        fill = "" if old.dtype == object else arr.fill_value
        new = np.full(shape, fill, dtype=old.dtype)
        common = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, shape))
        new[common] = old[common]
        arr.data = new

    def write(self, path: str, selection: Selection, value: np.ndarray) -> None:
        self._writable()
        self._array(path).data[selection] = value

    def read(self, path: str, selection: Selection = ()) -> np.ndarray:
        return np.array(self._array(path).data[selection], copy=True)

    # -- attributes ---------------------------------------------------------------------------
    def attrs(self, path: str) -> dict[str, Any]:
        return json.loads(json.dumps(self._node(path).attrs))  # type: ignore[no-any-return]

    def set_attrs(self, path: str, values: dict[str, Any]) -> None:
        self._writable()
        node = self._node(path)
        node.attrs = {**node.attrs, **json.loads(json.dumps(values))}

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    @classmethod
    def cleanup(cls, location: str) -> list[str]:
        return []

    def _writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"{self.location} is open read-only")
