"""Staging: copy what a hook keeps off the model's tensors, without stalling the model on a GPU.

On the CPU a staged tensor is a plain copy (the model may update its KV cache in place later).
On CUDA it is a pinned host buffer filled by a non-blocking copy on a side stream that first waits
for the model's stream; the source tensor is marked as used by the side stream so the caching
allocator does not reuse it early, and an event marks when the host buffer is complete. The
writer thread waits on that event before reading the buffer; an in-memory capture waits at the
end of each captured forward (:meth:`Stager.synchronize`).

Nothing here synchronises the host with the device: the copies are queued, and the pinned buffers come
from torch's caching host allocator, which hands a freed buffer out again once the copies that used it
have completed (so a capture streaming to a store reuses its staging memory step after step).

On the CPU, the host buffers of records of 16 KiB and more (copies of q and k, the probabilities
attnhooks computes) come from a :class:`Recycler`, one per thread that runs captured models, shared
by its captures (a ``with capture(...)`` around every step reuses the buffers of the last one): a
buffer is handed out again once nothing but the recycler holds it (the records were cleared, or
written to the store). It keeps at most 32 MiB, busy or free, so up to that much host memory stays
with the thread between captures. Allocating them fresh cost more than the copy: glibc returns a
step's freed records to the system at once (its trim threshold), and the next step faults every
page back in; a 256 KiB probability block took ~280 µs to fill that way against ~150 µs in a reused
buffer, here.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict, deque
from typing import Any

import torch

__all__ = ["Recycler", "Stager", "detached", "recycler"]


class Stager:
    """Device-to-host staging for one capture."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}
        self._dirty: set[torch.device] = set()
        self._events: list[Any] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new tensor for a record (its contents undefined): a recycled host buffer on the CPU."""
        if device.type == "cpu" and math.prod(shape) * dtype.itemsize >= _SMALL:
            return recycler().empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=device)

    def stage(self, t: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """A host tensor with the contents of ``t``.

        Args:
            t: a tensor of the model (or one computed by attnhooks from it).
            owned: ``t`` was made by attnhooks and nobody else holds it: on the CPU no copy is made.
        """
        if t.requires_grad:
            t = t.detach()
        if t.is_cpu:
            if owned:
                return t
            # small tensors (a decode step's q and k) come from malloc's small bins, never faulted in
            return t.clone() if t.nbytes < _SMALL else recycler().like(t).copy_(t)
        if not t.is_cuda:
            return t.to("cpu", copy=True)
        stream = self._stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(stream)
        self._dirty.add(t.device)
        return host

    def stage_keys(self, k: torch.Tensor, start: int) -> torch.Tensor:
        """:meth:`stage` of the keys ``k[:, :, start:]`` (``[batch, heads, keys, dim]``): a continuation's new
        keys. A few keys on the CPU (a decode step's one) are copied in one op (``narrow_copy``: a third of a
        view and its copy)."""
        if not start:
            return self.stage(k)
        if k.requires_grad:
            k = k.detach()
        keys = k.size(2)
        n = keys - start
        if k.is_cpu and k.nbytes * n < _SMALL * keys:
            return k.narrow_copy(2, start, n)
        return self.stage(k.narrow(2, start, n))

    def seal(self) -> Any:
        """An event that completes when everything staged since the last seal is on the host
        (None when nothing is in flight: CPU tensors are complete at once)."""
        if not self._dirty:
            return None
        events = []
        for device in self._dirty:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._streams[device])
            events.append(event)
        self._dirty.clear()
        self._events.extend(events)
        return _Events(events)

    def synchronize(self) -> None:
        """Wait until every staged copy is on the host."""
        for event in self._events:
            event.synchronize()
        self._events.clear()

    def _stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        return stream


def detached(t: torch.Tensor) -> torch.Tensor:
    """``t`` outside autograd: ``t.detach()`` when it requires grad, else ``t`` itself (no new tensor: a
    decode step stages three tensors a call, and a ``detach`` is a dispatch of its own)."""
    return t.detach() if t.requires_grad else t


class _Events:
    """The events of one seal; ``synchronize()`` waits for all of them."""

    def __init__(self, events: list[Any]) -> None:
        self._events = events

    def synchronize(self) -> None:
        for event in self._events:
            event.synchronize()


class Recycler:
    """Host buffers of a thread's captures, handed out again once nothing but the recycler holds them.

    Buffers are kept per shape and dtype, oldest first; ``empty`` takes the oldest when it is free
    (no Python reference but the recycler's, no other tensor, view or array on its memory), or the
    next one (the busy one goes to the back), else allocates one. At most ``limit`` bytes are kept
    (the shapes used least recently go first), so a capture whose records are all kept (nothing
    comes free) stops keeping buffers at ``limit``.

    Whether a buffer is free is read from its storage's use count (a private torch function): it is
    checked once per process to count what this relies on (views, arrays); where it does not, or is
    missing, no buffer is reused.
    """

    def __init__(self, limit: int = 32 << 20) -> None:
        self.limit = limit
        self.kept = 0  # bytes of the buffers kept
        self._buffers: OrderedDict[_Key, deque[torch.Tensor]] = OrderedDict()
        self._dense: dict[tuple[torch.Size, tuple[int, ...]], bool] = {}  # (shape, strides): a dense layout (like)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """A buffer for a copy of ``t`` (contents undefined), laid out as ``t`` is when that layout is dense (a
        permutation of a contiguous one, as ``q`` after a projection's ``transpose(1, 2)`` and RoPE): the copy
        is then a straight one, where a contiguous buffer made it a transposing copy (a third of the
        instructions of a 4 x 64-token prefill call's capture went to the two transposing copies of q and k)."""
        shape, stride = t.shape, t.stride()
        dense = self._dense.get((shape, stride))
        if dense is None:  # (empty_like keeps the strides of a dense, non-overlapping tensor only)
            if len(self._dense) >= _DENSE_KEPT:
                self._dense.clear()
            dense = self._dense[(shape, stride)] = torch.empty_like(t).stride() == stride
        return self.empty(shape, t.dtype, stride if dense else None)

    def empty(
        self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, stride: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """A buffer of ``shape`` and ``dtype``, contiguous or with ``stride`` (a dense layout)."""
        key = (tuple(shape), dtype, stride)
        kept = self._buffers.get(key)
        if kept is not None:
            self._buffers.move_to_end(key)
            for _ in range(min(2, len(kept))):  # a buffer held for long goes round, not blocking the rest
                kept.rotate(-1)
                if _free(kept[-1]):
                    return kept[-1]
        t = torch.empty(shape, dtype=dtype) if stride is None else torch.empty_strided(shape, stride, dtype=dtype)
        size = t.nbytes
        if _COUNTS and 0 < size <= self.limit // 4:
            if kept is None:
                kept = self._buffers[key] = deque()
            kept.append(t)
            self.kept += size
            while self.kept > self.limit:
                self._drop_oldest()
        return t

    def clear(self) -> None:
        """Keep nothing (a capture that ended)."""
        self._buffers.clear()
        self.kept = 0

    def _drop_oldest(self) -> None:
        key, kept = next(iter(self._buffers.items()))
        self.kept -= kept.popleft().nbytes
        if not kept:
            del self._buffers[key]


_SMALL = 16 << 10  # bytes below which a buffer is allocated, not recycled
_Key = tuple[tuple[int, ...], torch.dtype, tuple[int, ...] | None]  # shape, dtype, strides (None: contiguous)
_DENSE_KEPT = 4096  # layouts remembered (then forgotten at once: a run of many prompt lengths)
_use_count = getattr(torch._C, "_storage_Use_Count", None)
_LOCAL = threading.local()


def recycler() -> Recycler:
    """This thread's recycler."""
    try:
        return _LOCAL.recycler  # type: ignore[no-any-return]
    except AttributeError:
        _LOCAL.recycler = Recycler()
        return _LOCAL.recycler  # type: ignore[no-any-return]


def _free(t: torch.Tensor) -> bool:
    """Nothing but the recycler's deque holds ``t`` or its memory. (References here: the deque's, the
    argument's and getrefcount's own; storage: ``t``'s and the temporary ``untyped_storage()``'s.)"""
    return sys.getrefcount(t) == 3 and _use_count(t.untyped_storage()._cdata) == 2  # type: ignore[misc]


def _counts() -> bool:
    """The use counts read as :func:`_free` expects: a view, an array and a held reference each make a
    buffer busy, and their release frees it."""
    if _use_count is None:
        return False
    try:
        kept = deque([torch.empty(4)])
        free = [_free(kept[0])]
        view = kept[0][1:]
        free.append(_free(kept[0]))
        del view
        array = kept[0].numpy()
        free.append(_free(kept[0]))
        del array
        held = kept[0]
        free.append(_free(kept[0]))
        del held
        free.append(_free(kept[0]))
        return free == [True, False, False, False, True]
    except Exception:  # a private function that changed: no reuse
        return False


_COUNTS = _counts()
