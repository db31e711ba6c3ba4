"""Record: what one attention call produced, as kept by a capture."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnhooks.attention.masks import MaskSpec

__all__ = ["Record"]


@dataclass
class Record:
    """One attention call of one module, captured.

    Attributes:
        module: qualified name of the module that made the call, as in ``named_modules()`` of the
            unwrapped model (no ``module.`` / ``base_model.model.`` prefixes from DDP or PEFT).
        call: index of this call of ``module`` within its step (0 unless the module runs several
            times per step, as shared layers or a UNet over denoising timesteps). A KV-cache
            continuation keeps the index of the call it continues.
        step: the capture's step counter when the call happened.
        q: ``[batch, heads, q_len, head_dim]`` queries as the kernel received them (after RoPE),
            on the CPU, in the model's dtype; None when not recorded.
        k: ``[batch, kv_heads, k_new, head_dim]`` keys at the KV-head count; for a continuation
            only the keys not recorded before (positions ``[k_offset, k_len)``).
        attn: ``[batch, heads, q_len, k_len]`` float32 probabilities the model used; None when not
            recorded.
        lse: ``[batch, heads, q_len]`` float32 row log-sum-exp of the scores; None when not recorded.
        scale: the factor the scores were multiplied by (``1/sqrt(head_dim)`` unless the call set
            another; 1.0 when ``q`` is already scaled, as in ``nn.MultiheadAttention``'s weights path).
        mask: the mask the kernel applied, rebuildable exactly (see :class:`MaskSpec`).
        softcap: logit soft-capping the call applied (``tanh(s / c) * c``, Gemma 2), or None.
        q_offset: position of query row 0 within its stream (0 except in continuations).
        k_offset: position of the first key in ``k`` (0 except in continuations).
        k_len: total number of keys the call attended over.
        kind: ``"self"`` or ``"cross"`` attention.
        source: how the call was seen: ``"sdpa"``, ``"eager"``, ``"mha"``, ``"hf:<impl>"``, ``"emit"``.
        dropout: attention dropout probability active during the call (0.0 = none). With dropout
            the probabilities the model used were randomly zeroed and rescaled; ``attn`` holds them
            before dropout.
        attn_rows: the rows of the call ``attn`` holds when ``capture(..., rows=)`` chose windows:
            ``((start, stop), ...)`` relative to this record's rows, in order (``attn`` is their rows
            concatenated); None when ``attn`` holds every row.
        summary: blockwise reductions of the probabilities (``record="summary"``; see
            :mod:`attnhooks.reduce`), name -> tensor; None when not recorded.
        parents: ``[batch, k_new]`` int64, for the keys of ``k``: the batch slot whose keys precede each
            one (a KV cache whose slots were reordered between forwards, as beam search does: slot
            ``b``'s history before key ``k_offset + j`` is slot ``parents[b, j]``'s); None when every
            slot continues itself. :func:`attnhooks.lineage.key_slots` follows it back.
        verify_error: max abs difference of ``attn @ v`` against the kernel's output on sampled rows
            when the capture ran with ``verify=True``; None when not checked.
    """

    module: str
    call: int
    step: int
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    scale: float = 1.0
    mask: MaskSpec = field(default_factory=MaskSpec)
    softcap: float | None = None
    q_offset: int = 0
    k_offset: int = 0
    k_len: int = 0
    kind: str = "self"
    source: str = ""
    dropout: float = 0.0
    summary: dict[str, torch.Tensor] | None = None
    attn_rows: tuple[tuple[int, int], ...] | None = None
    parents: torch.Tensor | None = None
    verify_error: float | None = None

    @property
    def heads(self) -> int | None:
        """Number of query heads, from whichever tensor was recorded."""
        for t in (self.attn, self.q, self.lse, None if self.summary is None else self.summary.get("entropy")):
            if t is not None:
                return int(t.shape[1])
        return None

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{name}={tuple(t.shape)}" for name in ("q", "k", "attn", "lse") if (t := getattr(self, name)) is not None
        )
        return f"Record({self.module!r}, step={self.step}, call={self.call}, {self.source}, {shapes})"
