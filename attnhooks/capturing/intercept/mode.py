"""AttentionMode: the torch-function mode that sees attention calls while a captured forward runs.

The mode is pushed only for the duration of a captured step (not for the whole ``with`` block),
so uncaptured steps, the backward pass and the optimizer run without it. Every function it does
not know goes straight through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from attnhooks.attention.masks import MaskSpec, unmasked
from attnhooks.capturing.intercept import eager, mha, sdpa
from attnhooks.capturing.intercept.emit import emit, handle_emit
from attnhooks.capturing.intercept.event import Sink

__all__ = ["AttentionMode"]

Handler = Callable[[Any, Any, tuple[Any, ...], dict[str, Any]], Any]


def _handlers() -> dict[Any, Handler]:
    table: dict[Any, Handler] = {}
    groups: list[tuple[tuple[Any, ...], Handler]] = [
        (sdpa.FUNCTIONS, sdpa.handle_sdpa),
        (mha.FUNCTIONS, mha.handle_mha),
        (eager.PRODUCTS, eager.handle_product),
        (eager.SOFTMAXES, eager.handle_softmax),
        (eager.DROPOUTS, eager.handle_dropout),
        ((emit,), handle_emit),
    ]
    for functions, handler in groups:
        table.update(dict.fromkeys(functions, handler))
    return table


_HANDLERS = _handlers()


class AttentionMode(TorchFunctionMode):
    """Routes attention-related torch functions to their handlers; the rest pass through.

    Args:
        sink: the capture that names owners and receives the events.
    """

    def __init__(self, sink: Sink) -> None:
        super().__init__()
        self.sink = sink
        self.last_product: eager.QKProduct | None = None
        self.last_attention: tuple[str, tuple[int, ...]] | None = None
        # set by the HF registry wrapper while an implementation runs: the q and k shapes it was given
        self.registry_shapes: tuple[torch.Size, torch.Size] | None = None
        self._masks: dict[tuple[int, bool, int, int], tuple[torch.Tensor, int, MaskSpec]] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        handler = _HANDLERS.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(self, func, args, kwargs or {})

    def forget(self) -> None:
        """Drop per-forward state (the pending score product, the masks seen) so nothing leaks across steps."""
        self.last_product = None
        self.last_attention = None
        self._masks.clear()

    def mask_spec(self, mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int) -> MaskSpec:
        """:meth:`MaskSpec.from_kernel`, once per mask tensor and forward: a model hands every layer the
        same mask tensor, and describing it (compact form, copies to the host) is the costly part of a
        padded batch's call (and a host synchronisation on a GPU). The same tensor, unchanged since
        (its version counter), gives the same description; inference tensors, which keep no version
        counter, are described every time. A mask over more keys than the call's (a registry's, before the
        implementation cuts it) is described over the first ``k_len``."""
        if mask is None:
            return unmasked(is_causal)
        if mask.is_inference():
            return MaskSpec.from_kernel(mask[..., :k_len], is_causal, q_len, k_len)
        key = (id(mask), is_causal, q_len, k_len)
        seen = self._masks.get(key)
        if seen is not None and seen[0] is mask and seen[1] == mask._version:
            return seen[2]
        spec = MaskSpec.from_kernel(mask[..., :k_len], is_causal, q_len, k_len)
        self._masks[key] = (mask, mask._version, spec)
        return spec
