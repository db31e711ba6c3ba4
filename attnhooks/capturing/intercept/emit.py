"""``attnhooks.emit``: declare the attention of a custom module in one line.

Modules whose attention the automatic mechanisms cannot see (a fused kernel of their own, a
Triton op, a C++ extension) report it themselves::

    class MyAttention(nn.Module):
        def forward(self, x):
            q, k, v = self.qkv(x).view(...).unbind(2)
            out, probs = my_fused_kernel(q, k, v)
            attnhooks.emit(self, q=q, k=k, attn=probs)   # a no-op when nothing captures
            return self.proj(out)

``emit`` dispatches through torch's function-override protocol, so every capture active on the
model sees it and, with none active, it returns at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import handle_torch_function, has_torch_function

from attnhooks.attention.masks import MaskSpec
from attnhooks.capturing.intercept.event import AttentionEvent, to_4d
from attnhooks.errors import EmitError

__all__ = ["emit", "handle_emit"]


def emit(
    module: torch.nn.Module,
    *,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    attn: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> None:
    """Report one attention call of ``module`` to every active capture.

    Args:
        module: the attention module making the call (usually ``self``).
        q: ``[batch, heads, q_len, head_dim]`` queries, as the kernel used them.
        k: ``[batch, kv_heads, k_len, head_dim]`` keys.
        attn: ``[batch, heads, q_len, k_len]`` probabilities, when the module has them; otherwise
            the capture computes them exactly from q, k, ``mask``, ``is_causal`` and ``scale``.
        v: ``[batch, kv_heads, k_len, v_dim]`` values, for ``verify=True``.
        out: ``[batch, heads, q_len, v_dim]`` the kernel's output, for ``verify=True``.
        mask: SDPA convention: bool (True = may attend) or float (added to the scores).
        is_causal: SDPA's top-left causal mask.
        scale: score factor; default ``1/sqrt(head_dim)``.

    Example:
        >>> import torch, attnhooks
        >>> m = torch.nn.Identity()
        >>> attnhooks.emit(m, q=torch.randn(1, 2, 3, 4), k=torch.randn(1, 2, 3, 4))  # no capture: no-op
    """
    tensors = tuple(t for t in (q, k, attn) if t is not None)
    if not tensors:
        raise EmitError("attnhooks.emit needs at least one of q=, k=, attn=")
    if has_torch_function(tensors):
        handle_torch_function(
            emit, tensors, module, q=q, k=k, attn=attn, v=v, out=out, mask=mask, is_causal=is_causal, scale=scale
        )


def handle_emit(mode: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Turn an ``emit`` call into an event for the capture."""
    owner = mode.sink.owner(args[0])
    if owner is None:
        return
    q, k, attn = (to_4d(t) if t is not None else None for t in (kwargs["q"], kwargs["k"], kwargs["attn"]))
    if attn is None and (q is None or k is None):
        raise EmitError("attnhooks.emit without attn= needs both q= and k=")
    q_len = attn.shape[-2] if attn is not None else q.shape[-2]  # type: ignore[union-attr]
    k_len = attn.shape[-1] if attn is not None else k.shape[-2]  # type: ignore[union-attr]
    v, out = kwargs["v"], kwargs["out"]
    event = AttentionEvent(
        q=q,
        k=k,
        attn=attn,
        v=to_4d(v) if v is not None else None,
        out=to_4d(out) if out is not None else None,
        mask=MaskSpec.from_kernel(kwargs["mask"], kwargs["is_causal"], q_len, k_len),
        scale=kwargs["scale"],
        source="emit",
    )
    mode.sink.on_attention(owner, event)
