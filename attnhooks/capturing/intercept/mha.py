"""``nn.MultiheadAttention`` (and the Transformer layers built on it).

``F.multi_head_attention_forward`` projects q, k, v itself and then calls SDPA or a softmax
inside the intercepted call, where a mode no longer sees anything.

Without ``need_weights`` (the Transformer layers' call) the handler runs a spied copy of torch's
function (:mod:`~attnhooks.capturing.intercept.spy`), whose SDPA call goes to the SDPA handler: the
record is that SDPA call, with the kernel's q, k, mask and, from the CPU flash kernel, its lse, and
nothing is computed twice. Exactly one SDPA call must come out of it; otherwise (a torch whose
function computes differently) q and k are rebuilt as below.

With ``need_weights`` (or that fallback) the handler rebuilds q and k with the same projection
helpers torch uses, reports them with the combined ``attn_mask`` / ``key_padding_mask``, and runs
the original call unchanged for the output.

The native fast path (eval mode, no grad) bypasses Python entirely; a capture turns it off
with ``torch.backends.mha.set_fastpath_enabled(False)`` for the duration of a captured forward.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attnhooks.attention.kernels import isolated
from attnhooks.attention.masks import MaskSpec
from attnhooks.capturing.intercept import sdpa, spy
from attnhooks.capturing.intercept.event import AttentionEvent, Collector

__all__ = ["FUNCTIONS", "handle_mha"]

FUNCTIONS = (F.multi_head_attention_forward,)
_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_PARAMS = tuple(_SIGNATURE.parameters)
_DEFAULTS = {name: p.default for name, p in _SIGNATURE.parameters.items() if p.default is not p.empty}
# binding by position and name (inspect's bind costs ~20 µs a call) holds when every parameter is plain
_PLAIN = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in _SIGNATURE.parameters.values())


def handle_mha(mode: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Report the per-head attention of the call, then run it unchanged."""
    owner = mode.sink.owner()
    if owner is None:
        return func(*args, **kwargs)
    a = _arguments(args, kwargs)
    if not a["need_weights"] and _BODY is not None:
        probe = Collector(mode.sink)
        sink, mode.sink = mode.sink, probe
        try:
            with spy.spying(mode):
                result = _BODY(*args, **kwargs)
        finally:
            mode.sink = sink
        if len(probe.events) == 1:
            event = probe.events[0][1]
            event.source = "mha"
            sink.on_attention(owner, event)
            return result
        event = _event(a, mode.sink.wants_lse())  # not the one SDPA call expected: q, k rebuilt (not run again)
    else:
        event = _event(a, mode.sink.wants_lse())
        result = func(*args, **kwargs)
    output = result[0]
    event.out = (output if output.dim() == 3 else output.unsqueeze(1)).transpose(0, 1).unsqueeze(1)
    event.project = _out_projection(a["out_proj_weight"], a["out_proj_bias"])
    mode.sink.on_attention(owner, event)
    return result


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in."""
    if not _PLAIN or len(args) > len(_PARAMS) or any(name not in _SIGNATURE.parameters for name in kwargs):
        bound = _SIGNATURE.bind(*args, **kwargs)  # raises as the call itself would
        bound.apply_defaults()
        return bound.arguments
    a = dict(_DEFAULTS)
    a.update(zip(_PARAMS, args))
    a.update(kwargs)
    return a


_BODY = spy.spied(F.multi_head_attention_forward)  # calls the SDPA handler (None: no SDPA call by name)


def _event(a: dict[str, Any], with_lse: bool) -> AttentionEvent:
    """The call's event; ``with_lse``: with the row log-sum-exp of the CPU flash kernel, run on the very
    q, k, v and mask the call hands SDPA (computing it from the scores would cost twice as much)."""
    query = a["query"]
    batched = query.dim() == 3
    heads = int(a["num_heads"])
    dropout = float(a["dropout_p"]) if a["training"] else 0.0
    lse = None
    with isolated(query.device):
        q, k, v = _project(a, heads)  # [B, H, L, D], [B, H, S, D], [B, H, S, D]
        padding = a["key_padding_mask"]
        if not batched and padding is not None:
            padding = padding.unsqueeze(0)
        mask, additive = _mask(a, q.shape[0], heads, q.shape[2], k.shape[2], padding)
        if with_lse and not a["need_weights"]:
            causal = bool(a["is_causal"]) and additive is None
            kernel = sdpa.flash_cpu(q, k, v, additive, dropout, causal, None, False)
            lse = None if kernel is None else kernel[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    return AttentionEvent(q=q, k=k, v=v, mask=mask, scale=scale, dropout=dropout, source="mha", lse=lse)


def _out_projection(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-head ``attn @ v`` rows ``[B, H, n, D]`` -> the call's output rows ``[B, 1, n, E]``."""

    def project(pv: torch.Tensor) -> torch.Tensor:
        b, h, n, d = pv.shape
        merged = pv.permute(0, 2, 1, 3).reshape(b, n, h * d)
        w = weight.to(pv.dtype)
        return F.linear(merged, w, bias.to(pv.dtype) if bias is not None else None).unsqueeze(1)

    return project


def _project(a: dict[str, Any], heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v exactly as ``multi_head_attention_forward`` computes them, as ``[B, H, L, D]``."""
    query, key, value = a["query"], a["key"], a["value"]
    if query.dim() == 2:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    tgt_len, bsz, embed = query.shape
    head_dim = embed // heads
    if not a["use_separate_proj_weight"]:
        q, k, v = F._in_projection_packed(  # type: ignore[attr-defined]
            query, key, value, a["in_proj_weight"], a["in_proj_bias"]
        )
    else:
        b = a["in_proj_bias"]
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        q, k, v = F._in_projection(  # type: ignore[attr-defined]
            query, key, value, a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"], bq, bk, bv
        )
    if a["bias_k"] is not None:
        k = torch.cat([k, a["bias_k"].repeat(1, bsz, 1)])
        v = torch.cat([v, a["bias_v"].repeat(1, bsz, 1)])
    q = q.view(tgt_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
    k = _heads_first(k, a["static_k"], bsz, heads)
    v = _heads_first(v, a["static_v"], bsz, heads)
    if a["add_zero_attn"]:
        k = torch.cat([k, k.new_zeros(bsz, heads, 1, k.shape[-1])], dim=2)
        v = torch.cat([v, v.new_zeros(bsz, heads, 1, v.shape[-1])], dim=2)
    return q, k, v


def _heads_first(t: torch.Tensor, static: torch.Tensor | None, bsz: int, heads: int) -> torch.Tensor:
    """``[S, B, H*D]`` (or a given ``static_k``/``static_v`` ``[B*H, S, D]``) as ``[B, H, S, D]``."""
    if static is not None:
        return static.view(bsz, heads, static.shape[1], static.shape[2])
    return t.view(t.shape[0], bsz, heads, t.shape[-1] // heads).permute(1, 2, 0, 3)


def _mask(
    a: dict[str, Any], bsz: int, heads: int, q_len: int, k_len: int, padding: torch.Tensor | None
) -> tuple[MaskSpec, torch.Tensor | None]:
    """The mask the call applies (``attn_mask`` + ``key_padding_mask``, padded for extra keys) and
    its additive form (None when the call has no mask tensor)."""
    attn_mask, causal = a["attn_mask"], bool(a["is_causal"])
    if attn_mask is None and padding is None:
        return MaskSpec(causal=causal), None
    per_head = attn_mask is not None and attn_mask.dim() == 3
    total = torch.zeros(bsz, heads if per_head else 1, q_len, k_len, device=a["query"].device)
    if attn_mask is not None:
        m = _additive(attn_mask)
        m = m.view(bsz, heads, *m.shape[-2:]) if per_head else m
        total[..., : m.shape[-1]] += m
    if padding is not None:
        p = _additive(padding)
        total[..., : p.shape[-1]] += p[:, None, None, :]
    if causal and attn_mask is None:
        hidden = torch.ones(q_len, k_len, dtype=torch.bool, device=total.device).triu(1)
        total.masked_fill_(hidden, float("-inf"))
    return MaskSpec.from_kernel(total, False, q_len, k_len), total


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """MHA convention: a bool mask marks positions NOT allowed (True = masked out)."""
    if mask.dtype == torch.bool:
        zero = torch.zeros((), device=mask.device)
        return torch.where(mask, float("-inf"), zero)
    return mask.float()
