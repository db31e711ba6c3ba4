"""``F.scaled_dot_product_attention``: the kernel boundary of SDPA, flash and efficient attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from attnhooks.attention.masks import unmasked
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
    if len(args) == 3:  # how transformers and torch call it (a third of the cost of the general way)
        return {"query": args[0], "key": args[1], "value": args[2], **_DEFAULTS, **kwargs}
    bound = dict(_DEFAULTS)
    bound.update(zip(_PARAMS, args))
    bound.update(kwargs)
    return bound


def handle_sdpa(mode: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the kernel unchanged, then report q, k, v, mask and output to the capture.

    When the capture records the row log-sum-exp and SDPA would run its CPU flash kernel, that
    kernel is called directly: the same kernel, so the same output bit for bit, plus its lse for
    free (instead of recomputing every score afterwards). A decode call (one query row) is offered to
    the capture without an event first (``on_row``: a decode step's calls are many and short).
    """
    owner = mode.sink.owner()
    if owner is None:
        return func(*args, **kwargs)
    a = bind(args, kwargs)
    q, k, v, attn_mask, scale = a["query"], a["key"], a["value"], a["attn_mask"], a["scale"]
    causal, dropout = bool(a["is_causal"]), float(a["dropout_p"])
    both = None
    if mode.sink.wants_lse():
        both = flash_cpu(q, k, v, attn_mask, dropout, causal, scale, bool(a.get("enable_gqa", False)))
    out, kernel_lse = (func(*args, **kwargs), None) if both is None else both
    if q.dim() != 4 or k.dim() != 4:
        q, k, v = to_4d(q), to_4d(k), to_4d(v)
    qs, ks = q.shape, k.shape  # (each .shape makes a torch.Size)
    packed = None  # the registry's q shape, where transformers packed GQA's query heads into rows
    if mode.registry_shapes is not None:
        q_shape, k_shape = mode.registry_shapes
        if qs != q_shape and q.numel() == q_shape.numel() and qs[0] == q_shape[0]:
            q, attn_mask, packed = q.reshape(q_shape), _unpacked_mask(attn_mask, q_shape), q_shape
            kernel_lse = None if kernel_lse is None else kernel_lse.reshape(q_shape[:3])
            qs = q.shape
        if k_shape[1] < ks[1] and ks[1] % k_shape[1] == 0:
            k, v = _dedupe_kv(k, k_shape[1]), _dedupe_kv(v, k_shape[1])
            ks = k.shape
    mask = unmasked(causal) if attn_mask is None else mode.mask_spec(attn_mask, causal, qs[2], ks[2])
    if qs[2] == 1 and not dropout and mode.sink.on_row(owner, q, k, kernel_lse, mask, scale, "sdpa"):
        return out  # a decode call, taken without an event
    out4 = to_4d(out)
    if packed is not None:
        out4 = out4.reshape(packed[0], packed[1], packed[2], out4.shape[-1])
    event = AttentionEvent(
        q=q,
        k=k,
        v=to_4d(v),
        out=out4,
        mask=mask,
        scale=scale,
        dropout=dropout,
        source="sdpa",
        lse=kernel_lse,
    )
    event.known_shape(qs, ks)
    mode.sink.on_attention(owner, event)
    return out


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


def _unpacked_mask(mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """Undo transformers' ``pack_gqa`` on a mask (one decode token's query heads folded into rows per KV
    head): the registry received q as ``shape = [batch, heads, 1, head_dim]``, the kernel got it as
    ``[batch, kv_heads, heads // kv_heads, head_dim]``. q and the output are undone by a reshape (exact)."""
    if mask is not None and mask.dim() == 4 and mask.shape[1] != 1:
        mask = mask.reshape(mask.shape[0], shape[1], shape[2], mask.shape[-1])
    return mask


def _dedupe_kv(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Undo ``repeat_kv``: head ``h`` of the repeated tensor is KV head ``h // group``."""
    return t[:, :: t.shape[1] // kv_heads]
