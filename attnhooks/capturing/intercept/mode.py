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

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        handler = _HANDLERS.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(self, func, args, kwargs or {})

    def forget(self) -> None:
        """Drop per-forward state (the pending score product) so nothing leaks across steps."""
        self.last_product = None
        self.last_attention = None
