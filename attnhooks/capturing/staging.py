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
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Stager"]


class Stager:
    """Device-to-host staging for one capture."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}
        self._dirty: set[torch.device] = set()
        self._events: list[Any] = []

    def stage(self, t: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """A host tensor with the contents of ``t``.

        Args:
            t: a tensor of the model (or one computed by attnhooks from it).
            owned: ``t`` was made by attnhooks and nobody else holds it: on the CPU no copy is made.
        """
        t = t.detach()
        kind = t.device.type
        if kind == "cpu":
            return t if owned else t.clone()
        if kind != "cuda":
            return t.to("cpu", copy=True)
        stream = self._stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(stream)
        self._dirty.add(t.device)
        return host

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


class _Events:
    """The events of one seal; ``synchronize()`` waits for all of them."""

    def __init__(self, events: list[Any]) -> None:
        self._events = events

    def synchronize(self) -> None:
        for event in self._events:
            event.synchronize()
