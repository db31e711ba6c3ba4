"""``F.scaled_dot_product_attention``: the kernel boundary of SDPA, flash and efficient attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from attnhooks.capturing.intercept.event import AttentionEvent, to_4d

__all__ = ["FUNCTIONS", "handle_sdpa"]

FUNCTIONS = (F.scaled_dot_product_attention,)

_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None}
# the op's binding in the torch namespace where there is one: the same kernel, without the Python call of
# torch.ops' packet (~2 µs of a decode call's ~7)
_FLASH_CPU = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None) or (
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
)
_FLASH_CHOICE = SDPBackend.FLASH_ATTENTION.value  # what torch._fused_sdp_choice returns for it


def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """SDPA's arguments by name (its signature is positional-or-keyword)."""
    bound = dict(_DEFAULTS)
    bound.update(zip(_PARAMS, args))
    bound.update(kwargs)
    return bound


def handle_sdpa(mode: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the kernel unchanged, then report q, k, v, mask and output to the capture.

    When the capture records the row log-sum-exp and SDPA would run its CPU flash kernel, that
    kernel is called directly: the same kernel, so the same output bit for bit, plus its lse for
    free (instead of recomputing every score afterwards).
    """
    owner = mode.sink.owner()
    if owner is None:
        return func(*args, **kwargs)
    a = bind(args, kwargs)
    lse = _flash_cpu(a) if mode.sink.wants_lse() else None
    out = func(*args, **kwargs) if lse is None else lse[0]
    kernel_lse = None if lse is None else lse[1]
    q, k, out4, attn_mask = to_4d(a["query"]), to_4d(a["key"]), to_4d(out), a["attn_mask"]
    v = to_4d(a["value"])
    qs, ks = q.shape, k.shape  # (each .shape makes a torch.Size)
    if mode.registry_shapes is not None:
        q_shape, k_shape = mode.registry_shapes
        if qs != q_shape and q.numel() == q_shape.numel() and qs[0] == q_shape[0]:
            q, out4, attn_mask = _unpack_gqa(q, out4, attn_mask, q_shape)
            kernel_lse = None if kernel_lse is None else kernel_lse.reshape(q_shape[:3])
            qs = q.shape
        if k_shape[1] < ks[1] and ks[1] % k_shape[1] == 0:
            k, v = _dedupe_kv(k, k_shape[1]), _dedupe_kv(v, k_shape[1])
            ks = k.shape
    mask = mode.mask_spec(attn_mask, bool(a["is_causal"]), qs[2], ks[2])
    event = AttentionEvent(
        q=q,
        k=k,
        v=v,
        out=out4,
        mask=mask,
        scale=a["scale"],
        dropout=float(a["dropout_p"]),
        source="sdpa",
        lse=kernel_lse,
    )
    event.known_shape(qs, ks)
    mode.sink.on_attention(owner, event)
    return out


def _flash_cpu(a: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(output, lse)`` from the CPU flash kernel when SDPA itself would run it; else None."""
    gqa = bool(a.get("enable_gqa", False))
    return flash_cpu(a["query"], a["key"], a["value"], a["attn_mask"], a["dropout_p"], a["is_causal"], a["scale"], gqa)


def flash_cpu(
    q: Any, k: Any, v: Any, mask: Any, dropout: float, causal: bool, scale: float | None, gqa: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(output, lse)`` of SDPA's arguments from the CPU flash kernel, when SDPA itself would run it
    (the same kernel: the same output, bit for bit); else None."""
    if not (isinstance(q, torch.Tensor) and q.is_cpu and q.dim() == 4 and k.dim() == 4):
        return None
    choice = torch._fused_sdp_choice(q, k, v, mask, dropout, causal, scale=scale, enable_gqa=gqa)
    if choice != _FLASH_CHOICE:
        return None
    if mask is not None and mask.dtype == torch.bool:  # what SDPA does with a boolean mask
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out, lse = _FLASH_CPU(q, k, v, 0.0, bool(causal), attn_mask=mask, scale=scale)
    if mask is not None:  # rows that see no key: the kernel reports 0, the log of an empty sum is -inf
        hidden = torch.isneginf(mask).all(dim=-1)
        if bool(hidden.any()):
            lse = lse.masked_fill(hidden.expand(lse.shape), float("-inf"))
    return out, lse


def _unpack_gqa(
    q: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Undo transformers' ``pack_gqa`` (one decode token's query heads folded into rows per KV head).

    The registry received q as ``shape = [batch, heads, 1, head_dim]``; the kernel got it as
    ``[batch, kv_heads, heads // kv_heads, head_dim]``. A pure reshape, so this is exact.
    """
    batch, heads, q_len = shape[0], shape[1], shape[2]
    q = q.reshape(shape)
    out = out.reshape(batch, heads, q_len, out.shape[-1])
    if mask is not None and mask.dim() == 4 and mask.shape[1] != 1:
        mask = mask.reshape(mask.shape[0], heads, q_len, mask.shape[-1])
    return q, out, mask


def _dedupe_kv(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Undo ``repeat_kv``: head ``h`` of the repeated tensor is KV head ``h // group``."""
    return t[:, :: t.shape[1] // kv_heads]
