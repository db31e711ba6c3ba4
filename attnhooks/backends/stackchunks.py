"""The stacks of :mod:`attnhooks.backends.stacks` and the module chunks held for them.

A writer's block for one module (a call's q at a step, a step's row of a table) is a part of one
stack chunk that spans many modules. :class:`HeldChunks` keeps each module's part in memory, one
buffer per module chunk, and writes each stack chunk whole, once per flush: one write (one file
on a local Zarr store) per stack and step instead of one per module.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnhooks.backends.base import Backend, Codec, Selection
from attnhooks.backends.integrity import spans

__all__ = ["HeldChunks", "Member", "Stack", "member_selection"]

_CACHE_BYTES = 32 << 20  # clean module chunks kept for later writes (continuing steps, step tables)


@dataclass
class Stack:
    """One stack array: its members' chunk shape, dtype and fill, and which member is at which index."""

    path: str
    chunks: tuple[int, ...]  # a member's chunk shape
    dtype: str
    fill: Any
    codec: Codec | None  # None: a stack found in the store (not joined by new members)
    members: list[str | None] = field(default_factory=list)  # member paths by index (None: removed)
    width: int = 0  # members per stack chunk; 0 until the array exists
    existed: bool = False  # the array was in the store when opened: its chunks may hold data
    dirty: bool = False  # members or shapes changed since the attributes were written


@dataclass
class Member:
    """A module's array stored at ``[:, index]`` of ``stack``, with its own (logical) shape."""

    stack: Stack
    index: int
    shape: tuple[int, ...]


class HeldChunks:
    """The module chunks written since the last flush (and those of the last flush, kept clean up
    to 32 MiB), over the backend ``inner`` that holds the stacks."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self._cache: dict[tuple[str, tuple[int, ...]], dict[int, np.ndarray]] = {}  # (stack, coords) -> buffers
        self._dirty: set[tuple[str, tuple[int, ...]]] = set()
        self._flushed: set[tuple[str, tuple[int, ...]]] = set()  # stack chunks written by this instance
        self._bytes = 0

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    @property
    def full(self) -> bool:
        """More than 64 MiB held: write out before the step ends (memory stays bounded whatever
        the step's length; positions not yet committed hold nothing a reader trusts)."""
        return self._bytes > 2 * _CACHE_BYTES

    def write(self, member: Member, selection: Selection, value: np.ndarray) -> None:
        """Hold ``value`` at ``selection`` of ``member`` (written to the stack at :meth:`write_out`)."""
        spans_, _ = spans(selection, member.shape)
        block = np.asarray(value).reshape([b - a for a, b in spans_])
        chunks = member.stack.chunks
        if self._write_in_one(member, spans_, block):
            return
        for coords in itertools.product(*(range(a // c, -(-b // c)) for (a, b), c in zip(spans_, chunks))):
            lo = [c * n for c, n in zip(coords, chunks)]
            inside = [(max(a, l0), min(b, l0 + n)) for (a, b), l0, n in zip(spans_, lo, chunks)]
            # the write covers the whole chunk (an edge chunk: up to the array's end); exactly: no padding
            exact = all(s == l0 and e == l0 + n for (s, e), l0, n in zip(inside, lo, chunks))
            whole = exact or all(
                s == l0 and (e == l0 + n or e >= size) for (s, e), l0, n, size in zip(inside, lo, chunks, member.shape)
            )
            buffer = self._buffer(member, coords, whole, exact)
            target = tuple(slice(s - l0, e - l0) for (s, e), l0 in zip(inside, lo))
            source = tuple(slice(s - a, e - a) for (s, e), (a, _) in zip(inside, spans_))
            buffer[target] = block[source]
            self._dirty.add((member.stack.path, coords))

    def _write_in_one(self, member: Member, extent: list[tuple[int, int]], block: np.ndarray) -> bool:
        """:meth:`write` of a block inside one chunk (a writer's usual block: a call's q at a step, a
        step's row of a table) in one pass over the axes; False (nothing done) for any other."""
        coords, target = [], []
        exact = whole = True
        for (a, b), n, size in zip(extent, member.stack.chunks, member.shape):
            c = a // n
            if b <= a or (b - 1) // n != c:
                return False
            lo = c * n
            coords.append(c)
            target.append(slice(a - lo, b - lo))
            if a != lo or b != lo + n:
                exact = False
                whole = whole and a == lo and b >= size
        key = tuple(coords)
        self._buffer(member, key, whole, exact)[tuple(target)] = block
        self._dirty.add((member.stack.path, key))
        return True

    def _buffer(self, member: Member, coords: tuple[int, ...], whole: bool, exact: bool) -> np.ndarray:
        """The held chunk ``coords`` of ``member``: from the store when it may hold data there and
        the write does not cover all of it, else the fill value (nothing when the write covers
        every element of the chunk)."""
        key = (member.stack.path, coords)
        held = self._cache.setdefault(key, {})
        buffer = held.get(member.index)
        if buffer is not None:
            return buffer
        stack = member.stack
        if exact:
            buffer = np.empty(stack.chunks, dtype=stack.dtype)
        else:
            buffer = np.full(stack.chunks, stack.fill, dtype=stack.dtype)
        if not whole and stack.width and (stack.existed or key in self._flushed):
            region = tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, stack.chunks, member.shape))
            if all(r.stop > r.start for r in region):
                known = self.inner.read(stack.path, member_selection(member, region))
                buffer[tuple(slice(0, r.stop - r.start) for r in region)] = known
        held[member.index] = buffer
        self._bytes += buffer.nbytes
        return buffer

    def write_out(self, stacks: dict[str, Stack]) -> None:
        """Write every stack chunk with held changes, whole; then keep at most 32 MiB of clean buffers."""
        written, self._dirty = self._dirty, set()
        for path, coords in sorted(written):
            stack = stacks.get(path)
            if stack is not None:
                self._write_chunk(stack, coords)
        # keep what was just written (a step that continues, a step table's chunk of 1024 steps
        # writes it again), up to 32 MiB; older chunks are read back if ever written again
        for key in [k for k in self._cache if k not in written]:
            self._drop(key)
        for key in list(self._cache):
            if self._bytes <= _CACHE_BYTES:
                break
            self._drop(key)

    def _write_chunk(self, stack: Stack, coords: tuple[int, ...]) -> None:
        """Write the held buffers of chunk ``coords`` of every member column they fall in (members
        without a buffer keep what the store holds, or the fill value in a chunk never written)."""
        held = self._cache.get((stack.path, coords), {})
        if not held:
            return
        physical = self.inner.shape(stack.path)
        tail = (physical[0], *physical[2:])
        region = [slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, stack.chunks, tail)]
        extent = [r.stop - r.start for r in region]
        for column in sorted({index // stack.width for index in held}):
            first = column * stack.width
            count = min(stack.width, len(stack.members) - first)
            selection = (region[0], slice(first, first + count), *region[1:])
            present = [i for i in range(first, first + count) if i in held]
            if len(present) < count and (stack.existed or (stack.path, coords) in self._flushed):
                block = self.inner.read(stack.path, selection)
            elif len(present) < count:
                block = np.full([extent[0], count, *extent[1:]], stack.fill, dtype=stack.dtype)
            else:  # every member's part is held: each slot is written whole below
                block = np.empty([extent[0], count, *extent[1:]], dtype=stack.dtype)
            for index in present:
                block[:, index - first] = held[index][tuple(slice(0, e) for e in extent)]
            self.inner.write(stack.path, selection, block)
        self._flushed.add((stack.path, coords))

    def forget(self, path: str) -> None:
        """Drop the clean buffers of the stack ``path`` (a member's shape changed)."""
        for key in [k for k in self._cache if k[0] == path and k not in self._dirty]:
            self._drop(key)

    def _drop(self, key: tuple[str, tuple[int, ...]]) -> None:
        for buffer in self._cache.pop(key).values():
            self._bytes -= buffer.nbytes

    def clear(self) -> None:
        self._cache.clear()
        self._dirty.clear()
        self._bytes = 0


def member_selection(member: Member, selection: Selection) -> Selection:
    """``selection`` of ``member`` (against its shape) as a selection of its stack."""
    out: list[slice | int] = []
    for axis, size in enumerate(member.shape):
        sel = selection[axis] if axis < len(selection) else slice(None)
        if isinstance(sel, slice):
            start, stop, step = sel.indices(size)
            out.append(slice(start, max(start, stop), step))
        else:
            out.append(int(sel) + size if int(sel) < 0 else int(sel))
    return (out[0], member.index, *out[1:])
