"""``F.scaled_dot_product_attention``: the kernel boundary of SDPA, flash and efficient attention."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from ..masks import MaskSpec
from .event import AttentionEvent, to_4d

__all__ = ["FUNCTIONS", "handle_sdpa"]

FUNCTIONS = (F.scaled_dot_product_attention,)

_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None}


def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """SDPA's arguments by name (its signature is positional-or-keyword)."""
    bound = dict(_DEFAULTS)
    bound.update(zip(_PARAMS, args))
    bound.update(kwargs)
    return bound


def handle_sdpa(mode: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the kernel unchanged, then report q, k, v, mask and output to the capture."""
    out = func(*args, **kwargs)
    owner = mode.sink.owner()
    if owner is None:
        return out
    a = bind(args, kwargs)
    q, k = to_4d(a["query"]), to_4d(a["key"])
    mask = MaskSpec.from_kernel(a["attn_mask"], bool(a["is_causal"]), q.shape[-2], k.shape[-2])
    event = AttentionEvent(
        q=q,
        k=k,
        v=to_4d(a["value"]),
        out=to_4d(out),
        mask=mask,
        scale=a["scale"],
        dropout=float(a["dropout_p"]),
        source="sdpa",
    )
    mode.sink.on_attention(owner, event)
    return out

