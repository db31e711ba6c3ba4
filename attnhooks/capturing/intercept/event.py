"""AttentionEvent: what an interception mechanism saw, handed to the capture that owns it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from attnhooks.attention.masks import MaskSpec

__all__ = ["AttentionEvent", "Collector", "Sink", "heads_first", "to_4d"]


@dataclass
class AttentionEvent:
    """One attention call as seen at a kernel boundary. Tensors are the live ones (not copies).

    Attributes:
        q: ``[batch, heads, q_len, head_dim]`` or None when the mechanism cannot see it.
        k: ``[batch, kv_heads, k_len, head_dim]`` or None.
        v: ``[batch, kv_heads, k_len, v_dim]``, for verification; None when unseen.
        out: ``[batch, heads, q_len, v_dim]`` the kernel's output, for verification; None when unseen.
        attn: ``[batch, heads, q_len, k_len]`` probabilities the model materialised (eager), else None.
        scores: ``[batch, heads, q_len, k_len]`` the softmax input (eager), else None.
        mask: the mask the kernel applied (None when none or unknown).
        scale: score factor; None means SDPA's default ``1/sqrt(head_dim)``.
        softcap: scores were soft-capped as ``softcap * tanh(s / softcap)`` before the mask.
        dropout: dropout probability applied to the probabilities.
        source: the mechanism: ``"sdpa"``, ``"eager"``, ``"mha"``, ``"hf:<impl>"``, ``"emit"``.
        module: the module object when the mechanism knows it (HF registry, ``emit``).
        lse: ``[batch, heads, q_len]`` float32 row log-sum-exp the kernel returned, else None.
        project: maps per-head ``attn @ v`` rows ``[batch, heads, n, v_dim]`` to the space of
            ``out`` when the kernel's output is not per head (``nn.MultiheadAttention``: merged heads
            and ``out_proj``), so ``verify`` can still compare.
    """

    q: torch.Tensor | None
    k: torch.Tensor | None
    source: str
    v: torch.Tensor | None = None
    out: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    mask: MaskSpec | None = None
    scale: float | None = None
    softcap: float | None = None
    dropout: float = 0.0
    module: torch.nn.Module | None = None
    lse: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    _shape: tuple[int, int, int, int] | None = field(default=None, init=False, repr=False, compare=False)

    def known_shape(self, q_shape: torch.Size, k_shape: torch.Size) -> None:
        """Set :attr:`shape` from the shapes of ``q`` and ``k`` a mechanism read already (4-D, no ``attn``)."""
        self._shape = int(q_shape[0]), int(q_shape[1]), int(q_shape[2]), int(k_shape[2])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, heads, q_len, k_len)`` of the call (read once: an event's tensors are not replaced;
        ``dataclasses.replace`` makes a new event)."""
        if self._shape is None:
            if self.attn is not None:
                b, h, lq, lk = self.attn.shape
                self._shape = int(b), int(h), int(lq), int(lk)
            else:
                assert self.q is not None and self.k is not None  # every mechanism sets attn or q and k
                b, h, lq, _ = self.q.shape
                self._shape = int(b), int(h), int(lq), int(self.k.shape[2])
        return self._shape


class Sink(Protocol):
    """The receiving side of interception: a running capture."""

    def owner(self, module: torch.nn.Module | None = None) -> str | None:
        """Name of the selected module a call belongs to, or None to ignore the call."""

    def heads(self, owner: str) -> int | None:
        """Head count the module declares (``heads`` / ``num_heads`` / ...), for ``[batch*heads, ...]``
        tensors; None when it declares none."""

    def on_attention(self, owner: str, event: AttentionEvent) -> None:
        """Take one attention call made inside ``owner``."""

    def on_row(
        self,
        owner: str,
        q: torch.Tensor,
        k: torch.Tensor,
        lse: torch.Tensor | None,
        mask: MaskSpec,
        scale: float | None,
        source: str,
    ) -> bool:
        """Take a decode call of ``owner`` without an event: ``q`` ``[batch, heads, 1, head_dim]``, ``k``
        ``[batch, kv_heads, k_len, head_dim]`` as the kernel used them, ``lse`` ``[batch, heads, 1]`` the
        kernel's (or None), no dropout; False (nothing taken) when it needs :meth:`on_attention`."""

    def wants_lse(self) -> bool:
        """True when records keep the row log-sum-exp (worth taking from the kernel)."""

    def verifies(self) -> bool:
        """True when records are checked against the kernel's output (``verify=``): an event's ``out`` is read."""

    def on_dropout(self, owner: str, p: float) -> None:
        """Dropout with probability ``p`` was applied inside ``owner`` after its last attention."""


class Collector:
    """Stands in for a capture as a mode's sink while a call is looked into: the events it is given
    are kept (for the caller to check and hand on), everything else is the capture's."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.events: list[tuple[str, AttentionEvent]] = []

    def owner(self, module: torch.nn.Module | None = None) -> str | None:
        return self.sink.owner(module)

    def heads(self, owner: str) -> int | None:
        return self.sink.heads(owner)

    def wants_lse(self) -> bool:
        return self.sink.wants_lse()

    def verifies(self) -> bool:
        return self.sink.verifies()

    def on_attention(self, owner: str, event: AttentionEvent) -> None:
        self.events.append((owner, event))

    def on_row(self, *call: object) -> bool:
        return False  # every call as an event, to be checked

    def on_dropout(self, owner: str, p: float) -> None:
        self.sink.on_dropout(owner, p)


def heads_first(out: object) -> torch.Tensor | None:
    """An attention implementation's output ``[batch, len, heads, dim]`` (or a tuple starting with it)
    as ``[batch, heads, len, dim]``, the event's ``out``; None when it is not such a tensor."""
    output = out[0] if isinstance(out, tuple) else out
    return output.transpose(1, 2) if isinstance(output, torch.Tensor) and output.dim() == 4 else None


def to_4d(t: torch.Tensor) -> torch.Tensor:
    """View ``[..., L, D]`` as ``[batch, heads, L, D]``: 3-D gets one head, >4-D folds into batch."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() == 2:
        return t[None, None]
    return t.reshape(-1, *t.shape[-3:])
