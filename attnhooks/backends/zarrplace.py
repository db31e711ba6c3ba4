"""Where a Zarr store lives: a directory on the local file system (:class:`LocalPlace`) or a prefix
under an fsspec URL (:class:`UrlPlace`); how each creates a store with its root attributes atomically,
removes it, finds a chunk and cleans up after a killed writer (see :mod:`attnhooks.backends.zarrstore`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import zarr

from attnhooks.errors import StoreOptionError

__all__ = ["LocalPlace", "UrlPlace", "place", "url_fs", "write_atomically"]


def place(location: str) -> LocalPlace | UrlPlace:
    target = location.removeprefix("zarr://")
    if "://" in target and not target.startswith("file://"):
        return UrlPlace(target)
    return LocalPlace(target.removeprefix("file://"))


class LocalPlace:
    """A store directory on the local file system."""

    def __init__(self, path: str) -> None:
        self.path = path

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def holds_metadata(self) -> bool:
        return os.path.isdir(self.path) and os.path.exists(os.path.join(self.path, "zarr.json"))

    def store(self, readonly: bool) -> str:
        return self.path  # zarr makes its local store, read-only or not as the open mode says

    def create(self, attrs: dict[str, Any], replace: bool) -> zarr.Group:
        # create aside, then rename into place: the store never exists without its root attributes
        path = self.path
        parent = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(parent, f".{os.path.basename(path)}.creating-{uuid.uuid4().hex[:8]}")
        try:
            zarr.open_group(tmp, mode="w-", zarr_format=3, attributes=attrs)
        except BaseException:  # a full disk, say: nothing of the attempt is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            if replace:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            os.rename(tmp, path)  # fails when another process (a rank) created the store meanwhile
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return zarr.open_group(path, mode="r+", zarr_format=3)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # -- node metadata, read and written here: each through zarr costs a hop through its event
    # loop (1-15 ms on a busy machine), and a writer makes several per module at its first step
    def has_node(self, path: str) -> bool:
        """Whether a group or array exists at ``path`` (its ``zarr.json``)."""
        return os.path.isfile(self._meta(path))

    def node_attrs(self, path: str) -> dict[str, Any]:
        """The attributes in the node's ``zarr.json``; KeyError when there is no node."""
        try:
            with open(self._meta(path), "rb") as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            raise KeyError(path) from None
        return dict(meta.get("attributes") or {})

    def update_node_attrs(self, path: str, values: dict[str, Any], readonly: bool = False) -> None:
        """Update the node's attributes: one atomic rewrite of its ``zarr.json`` (as zarr does)."""
        if readonly:
            raise PermissionError(f"{self.path} is open read-only")
        target = self._meta(path)
        try:
            with open(target, "rb") as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            raise KeyError(path) from None
        meta["attributes"] = {**(meta.get("attributes") or {}), **values}
        write_atomically(target, [_json(meta)])

    def create_group_node(self, path: str, attrs: dict[str, Any] | None = None) -> None:
        """A group at ``path`` and at each missing parent (a ``zarr.json`` of an empty group each);
        with ``attrs``, the group at ``path`` has them: one write of a new group's ``zarr.json``, or
        its attributes updated (:meth:`update_node_attrs`) when it exists."""
        parts = [p for p in path.split("/") if p]
        for n in range(1, len(parts) + 1):
            sub, own = "/".join(parts[:n]), (attrs or {}) if n == len(parts) else {}
            if self.has_node(sub):
                if own:
                    self.update_node_attrs(sub, own)
                continue
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)
            write_atomically(self._meta(sub), [_json({"attributes": own, "zarr_format": 3, "node_type": "group"})])

    def _meta(self, path: str) -> str:
        return os.path.join(self.path, *[p for p in path.split("/") if p], "zarr.json")

    def has(self, array: str, key: str) -> bool:
        return os.path.exists(os.path.join(self.path, key))

    def cleanup(self) -> list[str]:
        root = Path(self.path)
        removed = []
        for tmp in root.rglob("*.partial"):
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp.relative_to(root)))
        return removed


class UrlPlace:
    """A store under a URL of any fsspec file system (object stores included)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = url_fs(url)
        self._listed: dict[str, set[str]] = {}  # chunk keys found per array (has())

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def holds_metadata(self) -> bool:
        return bool(self.fs.isfile(f"{self.path}/zarr.json"))

    def store(self, readonly: bool) -> zarr.storage.FsspecStore:
        return zarr.storage.FsspecStore.from_url(self.url, read_only=readonly)

    def create(self, attrs: dict[str, Any], replace: bool) -> zarr.Group:
        if replace:  # (unlike a local rename, a writer killed right here has lost the old store too)
            self.fs.rm(self.path, recursive=True)
        # No build-aside-and-rename here (object stores cannot rename a prefix atomically) and none
        # needed: the root zarr.json is one put with the attributes already in it, and the store
        # exists only once that put has landed, so it never exists without its schema.
        return zarr.open_group(self.store(readonly=False), mode="w-", zarr_format=3, attributes=attrs)

    def has(self, array: str, key: str) -> bool:
        """Whether the chunk ``key`` (``<array>/c/0/1`` or ``<array>/c.0.1``) of ``array`` exists: one
        listing per array (an object store answers an existence check with a request each), a
        request only for a chunk the listing lacks (a chunk written since, or damage)."""
        known = self._listed.get(array)
        if known is None:
            folder = f"{self.path}/{array}"
            try:
                found = self.fs.find(folder)
            except FileNotFoundError:
                found = []
            prefix = f"{folder}/c"  # c/0/1 or c.0.1
            found = [name for name in found if name.startswith(prefix)]
            known = self._listed[array] = {f"{array}/c{name[len(prefix) :]}" for name in found}
        if key in known:
            return True
        if self.fs.exists(f"{self.path}/{key}"):
            known.add(key)
            return True
        return False

    def remove(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def cleanup(self) -> list[str]:
        return []  # every key is one put: an object store keeps no temporaries of a killed writer


def _json(meta: dict[str, Any]) -> bytes:
    """A node's ``zarr.json`` as written here: without indentation, which only Python's own JSON encoder
    does (9x the time of the C one: 1.7 ms for the stacks' description of a 32-layer model, rewritten
    at every commit as the stacks grow; the file is a third of the size too). Readers do not care."""
    return json.dumps(meta).encode()


def write_atomically(target: str, parts: list[Any]) -> None:
    """Write ``parts`` (bytes-like, one after the other) to ``target`` through a temporary file and an
    atomic rename (``*.partial`` temporaries, as zarr's local store, are what ``cleanup`` removes
    after a killed writer); a failed write (a full disk) leaves no temporary behind."""
    tmp = f"{target}.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def url_fs(url: str) -> tuple[Any, str]:
    """The fsspec file system of ``url`` and the path on it, or a StoreOptionError naming what to install."""
    scheme = url.split("://", 1)[0]
    try:
        from fsspec.core import url_to_fs
    except ImportError as err:
        raise StoreOptionError(
            f"{url}: a Zarr store on a URL goes through fsspec, which is not installed: "
            f"pip install fsspec (and the package for {scheme}://, e.g. s3fs for s3://, gcsfs for gs://)"
        ) from err
    try:
        fs, path = url_to_fs(url)
    except ImportError as err:
        raise StoreOptionError(
            f"{url}: fsspec needs another package for {scheme}:// URLs ({err}): pip install it, "
            f"or use a local path ending in .zarr"
        ) from err
    except ValueError as err:
        raise StoreOptionError(
            f"{url}: fsspec does not know the protocol {scheme!r} ({err}); use a local path ending in .zarr "
            f"or a URL of an fsspec protocol (memory, s3, gs, az, ...)"
        ) from err
    return fs, str(path)
