"""Small per-module arrays stacked across modules: one array, and one chunk per step, for many
modules (schema ``attnhooks/2``).

A 32-layer model captured every step writes seven small arrays per module per step (q, k, lse and
the four per-call tables): ~220 chunk files of a few kilobytes each per step, and creating a file
costs 0.1-0.5 ms here whatever its size, so the writer fell minutes behind a training run. Stacked,
the same step is one chunk file per leaf: ``modules/<m>/q [S, C, B, H, L, D]`` of every module with
the same chunk geometry lives at ``[:, i]`` of one array ``stacks/q.0 [S, M, C, B, H, L, D]``.

:class:`StackedBackend` wraps any backend and keeps the per-module view: ``modules/<m>/q`` still
exists, has its own shape, reads and writes as before; only its storage moved. The writer's
blocks for one step are held in memory (one buffer per module chunk, each at most
:data:`MEMBER_BYTES`) and written as whole stack chunks at :meth:`StackedBackend.flush`, which the
commit protocol calls before it advances ``committed``; so a committed step's chunks are on disk
and a killed writer leaves only positions nobody reads. Each stack's attributes name its members
and their shapes (attributes of the ``stacks`` group: ``{"attnhooks_stack": {"q.0": {"members":
[[path, shape], ...], ...}}}``), written at flush, after a spare copy (:data:`SPARE`).

Arrays whose chunk per module is larger than :data:`MEMBER_BYTES` (long sequences), other leaves
(attn, masks, summaries, tokens) and stores of schema ``attnhooks/1`` stay one array per module.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

from attnhooks.backends.base import Backend, Codec, Selection, split
from attnhooks.backends.integrity import spans
from attnhooks.backends.stackchunks import HeldChunks, Member, Stack, member_selection
from attnhooks.errors import StoreCorruptError

__all__ = ["ATTR", "GROUP", "MEMBER_BYTES", "SPARE", "STACKED_LEAVES", "StackedBackend", "stacked_view", "writing"]

GROUP = "stacks"
STACKED_LEAVES = frozenset({"q", "k", "lse", "calls", "info", "scalars", "rowkeys"})
MEMBER_BYTES = 1 << 20
"""A module's array is stacked when one of its chunks is at most this size."""
_STACK_CHUNK_BYTES = 8 << 20  # a stack chunk spans as many modules as fit in this
ATTR = "attnhooks_stack"
SPARE = f"{GROUP}/spare"
"""A group whose attribute ``attnhooks_stack`` is a copy of the stacks' description, written and flushed
before the ``stacks`` group's own at every change. HDF5 rewrites a text attribute in two places (the
group's header and the file's heap of variable-length data), and a writer killed between the two writes
leaves an attribute that reads as neither value ("Expected global heap object size does not match"):
without a copy, a store with committed steps would no longer open. With it, a kill in either write
leaves the other copy whole, and readers take the spare when the group's does not read (it describes the
stacks on disk; steps past ``committed`` are not read)."""


def stacked_view(backend: Backend, committed: int | None = None) -> Backend:
    """``backend`` for reading: wrapped when the store holds stacks, else itself. A store that
    committed nothing (``committed == 0``: its writer was killed in the first step) is read as it
    is when its stacks cannot be read (an HDF5 writer killed while creating them): no step needs them."""
    if not backend.contains(GROUP):
        return backend
    try:
        return cast(Backend, StackedBackend(backend, stacking=False))
    except (KeyError, OSError):
        if committed == 0:
            return backend
        raise


class StackedBackend:
    """``backend`` with the small per-module arrays of :data:`STACKED_LEAVES` stored in stacks.

    Args:
        backend: the store's (or one rank's) backend.
        stacking: new module arrays may be stacked (a writer of a new ``attnhooks/2`` store); when
            False, only the stacks already in the store are read and written.
    """

    def __init__(self, backend: Backend, stacking: bool) -> None:
        self.inner = backend
        self.stacking = stacking
        self._stacks: dict[str, Stack] = {}
        self._members: dict[str, Member] = {}
        self._open: dict[tuple[Any, ...], Stack] = {}  # stacks new members may join, by geometry
        self._held = HeldChunks(backend)
        self._load()

    def __getattr__(self, name: str) -> Any:  # location, readonly, batched, refresh's peers...
        return getattr(self.inner, name)

    @property
    def unwrapped(self) -> Backend:
        return self.inner

    def _load(self) -> None:
        self._stacks, self._members = _stored_stacks(self.inner)

    # -- structure --------------------------------------------------------------------------
    def contains(self, path: str) -> bool:
        return path in self._members or self.inner.contains(path)

    def children(self, path: str) -> list[str]:
        names = set(self.inner.children(path)) if self.inner.contains(path) else set()
        prefix = f"{path}/" if path else ""
        for member in self._members:
            if member.startswith(prefix) and "/" not in member[len(prefix) :]:
                names.add(member[len(prefix) :])
        return sorted(names)

    def shape(self, path: str) -> tuple[int, ...]:
        member = self._members.get(path)
        return member.shape if member is not None else self.inner.shape(path)

    def dtype(self, path: str) -> str:
        member = self._members.get(path)
        return member.stack.dtype if member is not None else self.inner.dtype(path)

    def create_array(
        self, path: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], fill_value: Any, codec: Codec
    ) -> None:
        if path in self._members:
            self._drop_member(path)
        if not self._stackable(path, dtype, chunks):
            self.inner.create_array(path, shape, dtype, chunks, fill_value, codec)
            return
        key = (split(path)[-1], dtype, tuple(chunks), repr(fill_value), codec)
        stack = self._open.get(key)
        if stack is None:
            stack = Stack(self._new_stack_path(split(path)[-1]), tuple(chunks), dtype, fill_value, codec)
            self._open[key] = stack
            self._stacks[stack.path] = stack
        self._members[path] = Member(stack, len(stack.members), tuple(shape))
        stack.members.append(path)
        stack.dirty = True
        self._fit(stack)

    def _stackable(self, path: str, dtype: str, chunks: tuple[int, ...]) -> bool:
        parts = split(path)
        return (
            self.stacking
            and len(parts) == 3
            and parts[0] == "modules"
            and parts[2] in STACKED_LEAVES
            and dtype != "str"
            and math.prod(chunks) * np.dtype(dtype).itemsize <= MEMBER_BYTES
        )

    def _new_stack_path(self, leaf: str) -> str:
        for n in itertools.count():
            path = f"{GROUP}/{leaf}.{n}"
            if path not in self._stacks and not self.inner.contains(path):
                return path
        raise AssertionError("unreachable")

    def resize(self, path: str, shape: tuple[int, ...]) -> None:
        member = self._members.get(path)
        if member is None:
            self.inner.resize(path, shape)
            return
        old = member.shape
        shrink = any(n < o for n, o in zip(shape, old))
        if shrink:  # (repair's trim) cut values read as the fill value if the array grows again
            self.flush()
            region = tuple(slice(0, o) for o in old)
            for axis, (n, o) in enumerate(zip(shape, old)):
                if n < o:
                    cut = list(region)
                    cut[axis] = slice(n, o)
                    sel = member_selection(Member(member.stack, member.index, old), tuple(cut))
                    block = np.full([s.stop - s.start for s in cut], member.stack.fill, dtype=member.stack.dtype)
                    self.inner.write(member.stack.path, sel, block)
            self._held.forget(member.stack.path)  # (growing keeps them: a chunk's shape never changes)
        member.shape = tuple(shape)
        member.stack.dirty = True
        self._fit(member.stack)

    def remove(self, path: str) -> None:
        if path == "":
            self._remove_inner(path)  # (the backend says whether the root may go)
        prefix = f"{path}/" if path else ""
        for member in [m for m in self._members if m == path or m.startswith(prefix)]:
            self._drop_member(member)
        for stack in [s for s in self._stacks.values() if not any(s.members)]:
            self._held.forget(stack.path)
            del self._stacks[stack.path]
            self._open = {k: s for k, s in self._open.items() if s is not stack}
            if stack.width:
                self._remove_inner(stack.path)
        if path and self.inner.contains(path):
            self._remove_inner(path)

    def _remove_inner(self, path: str) -> None:
        remove = getattr(self.inner, "remove", None)
        if remove is None:
            raise AttributeError(f"{type(self.inner).__name__} cannot remove arrays")
        remove(path)

    def _drop_member(self, path: str) -> None:
        member = self._members.pop(path)
        member.stack.members[member.index] = None
        member.stack.dirty = True

    def _fit(self, stack: Stack) -> None:
        """Grow the stack's array (when it exists) to hold every member's shape."""
        if not stack.width:
            return
        need = self._extent(stack)
        have = self.inner.shape(stack.path)
        if any(n > h for n, h in zip(need, have)):
            self.inner.resize(stack.path, tuple(max(n, h) for n, h in zip(need, have)))

    def _extent(self, stack: Stack) -> tuple[int, ...]:
        shapes = [self._members[m].shape for m in stack.members if m is not None]
        tail = tuple(max(axis) for axis in zip(*shapes)) if shapes else tuple(0 for _ in stack.chunks)
        return (tail[0], len(stack.members), *tail[1:])

    def _create(self, stack: Stack) -> None:
        """Create the stack's array, one chunk spanning as many members as fit."""
        assert stack.codec is not None
        member_bytes = math.prod(stack.chunks) * np.dtype(stack.dtype).itemsize
        stack.width = max(1, min(len(stack.members), _STACK_CHUNK_BYTES // max(member_bytes, 1)))
        chunks = (stack.chunks[0], stack.width, *stack.chunks[1:])
        self.inner.create_group(GROUP)  # explicitly, as module groups are (HDF5: not as a side effect)
        self.inner.create_array(stack.path, self._extent(stack), stack.dtype, chunks, stack.fill, stack.codec)

    # -- data ---------------------------------------------------------------------------------
    def write(self, path: str, selection: Selection, value: np.ndarray) -> None:
        member = self._members.get(path)
        if member is None:
            self.inner.write(path, selection, value)
            return
        self._held.write(member, selection, value)
        if self._held.full:  # a long step (a long generation): its chunks go out before its commit
            self._write_held()

    def read(self, path: str, selection: Selection = ()) -> np.ndarray:
        member = self._members.get(path)
        if member is None:
            return self.inner.read(path, selection)
        if self._held.dirty:
            self.flush()
        if not member.stack.width:  # declared, nothing written yet
            extent, squeeze = spans(selection, member.shape)
            out = np.full([b - a for a, b in extent], member.stack.fill, dtype=member.stack.dtype)
            return out.reshape([n for n, s in zip(out.shape, squeeze) if not s])
        try:
            return self.inner.read(member.stack.path, member_selection(member, selection))
        except StoreCorruptError as err:
            raise _as_member(err, path) from err.__cause__

    def missing_chunks(self, path: str, selection: Selection = ()) -> list[tuple[int, ...]]:
        member = self._members.get(path)
        missing = getattr(self.inner, "missing_chunks", None)
        if missing is None:
            return []
        if member is None:
            return list(missing(path, selection))
        if not member.stack.width:
            return []
        found = missing(member.stack.path, member_selection(member, selection))
        return sorted({(c[0], *c[2:]) for c in found})

    def checksummed(self, path: str) -> bool:
        member = self._members.get(path)
        checksummed = getattr(self.inner, "checksummed", None)
        if checksummed is None:
            return False
        if member is None:
            return bool(checksummed(path))
        return bool(member.stack.width) and bool(checksummed(member.stack.path))

    # -- flushing -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the held chunks as whole stack chunks and the stacks' changed attributes, then
        flush the backend: after this, every write made is durable."""
        self._write_held()
        if any(stack.dirty and stack.width for stack in self._stacks.values()):
            # every stack's description, on the group (HDF5 in SWMR mode adds no attributes to arrays)
            _describe(self.inner, {ATTR: _described(self._stacks, self._members)})
        self.inner.flush()

    def _write_held(self) -> None:
        for stack in self._stacks.values():
            if stack.codec is not None and not stack.width and any(stack.members):
                self._create(stack)
        self._held.write_out(self._stacks)

    # -- the rest -----------------------------------------------------------------------------
    def attrs(self, path: str) -> dict[str, Any]:
        return self.inner.attrs(path)

    def set_attrs(self, path: str, values: dict[str, Any]) -> None:
        self.inner.set_attrs(path, values)

    def create_group(self, path: str) -> None:
        self.inner.create_group(path)

    def close(self) -> None:
        self._held.clear()
        self.inner.close()

    def refresh(self) -> None:
        """Read the store's metadata again (a reader of a store being written)."""
        refresh = getattr(self.inner, "refresh", None)
        if refresh is not None:
            refresh()
        self._held.clear()
        self._load()

    def members(self) -> Iterator[tuple[str, str, int]]:
        """``(member path, stack path, index)`` of every stacked array."""
        for path, member in self._members.items():
            yield path, member.stack.path, member.index


def _stored_stacks(inner: Backend) -> tuple[dict[str, Stack], dict[str, Member]]:
    """The stacks described in the store (their group's attributes) and their members."""
    stacks: dict[str, Stack] = {}
    members: dict[str, Member] = {}
    for name, described in _description(inner).items():
        path = f"{GROUP}/{name}"
        if not inner.contains(path):
            continue
        dtype = inner.dtype(path)
        fill = _parse_fill(described["fill"], dtype)
        stack = Stack(path, tuple(described["chunks"]), dtype, fill, None, existed=True)
        stack.width = int(described["width"])
        for index, entry in enumerate(described["members"]):
            stack.members.append(None if entry is None else entry[0])
            if entry is not None:
                members[entry[0]] = Member(stack, index, tuple(entry[1]))
        stacks[path] = stack
    return stacks, members


def _description(inner: Backend) -> dict[str, Any]:
    """The stacks' description: the ``stacks`` group's, or its spare copy's (:data:`SPARE`) when the
    group's does not read (a writer killed while rewriting it) or is missing (left out by a repair)."""
    if not inner.contains(GROUP):
        return {}
    try:
        described = inner.attrs(GROUP).get(ATTR)
    except OSError:  # (h5py: "Expected global heap object size does not match")
        described = None
        if not inner.contains(SPARE):
            raise
    if described is None and inner.contains(SPARE):
        described = inner.attrs(SPARE).get(ATTR)
    return described or {}


def _describe(inner: Backend, described: dict[str, Any]) -> None:
    """Write the stacks' description: its spare copy (:data:`SPARE`) first and flushed, then the group's."""
    if not inner.contains(SPARE):
        inner.create_group(SPARE)
    inner.set_attrs(SPARE, described)
    inner.flush()
    inner.set_attrs(GROUP, described)


def _described(stacks: dict[str, Stack], members: dict[str, Member]) -> dict[str, Any]:
    """What :func:`_stored_stacks` reads back: each created stack's geometry, fill and members."""
    out = {}
    for stack in stacks.values():
        if stack.width:
            listed = [None if m is None else [m, list(members[m].shape)] for m in stack.members]
            out[split(stack.path)[-1]] = {
                "chunks": list(stack.chunks), "width": stack.width, "fill": str(stack.fill), "members": listed,
            }  # fmt: skip
            stack.dirty = False
    return out


def writing(backend: Backend, appending: bool) -> Backend:
    """``backend`` for a writer: a new store stacks the small per-module arrays (schema
    ``attnhooks/2``); a store of an older schema appended to keeps one array per module."""
    from attnhooks.schema import SCHEMA

    stacking = not appending or backend.attrs("").get("schema") == SCHEMA
    return cast(Backend, StackedBackend(backend, stacking=stacking))


def _parse_fill(text: str, dtype: str) -> Any:
    """A fill value written by :meth:`StackedBackend.flush` (``str`` of the value)."""
    if np.dtype(dtype).kind == "b":
        return text == "True"
    return np.dtype(dtype).type(text).item()


def _as_member(err: StoreCorruptError, path: str) -> StoreCorruptError:
    """``err`` about a stack, told of the member array ``path`` (the stack's module axis dropped)."""
    chunks = sorted({(c[0], *c[2:]) for c in err.chunks})
    return StoreCorruptError(err.location, path, chunks, err.what, err.steps)
