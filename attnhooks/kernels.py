"""Exact attention math on captured tensors: probabilities, row log-sum-exp, verification.

These functions run with torch-function modes disabled and autocast off, so computing a
record never shows up as a model operation (to this or to an enclosing capture) and always
happens in float32.

Shapes: ``q [batch, heads, q_len, head_dim]``, ``k [batch, kv_heads, k_len, head_dim]``,
``v [batch, kv_heads, k_len, v_dim]``; query head ``h`` reads key head ``h // (heads // kv_heads)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from .masks import MaskSpec

__all__ = ["attention_probs", "isolated", "scores", "verify_rows"]


@contextlib.contextmanager
def isolated(device: torch.device) -> Iterator[None]:
    """No grad, no torch-function modes, no autocast: our own math, invisible to captures."""
    with torch.no_grad(), torch._C.DisableTorchFunction(), torch.autocast(device.type, enabled=False):
        yield


def scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None,
    mask: MaskSpec | None,
    rows: slice | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Float32 scores ``cap(q·kᵀ·scale) + mask`` ``[batch, heads, rows, k_len]``, GQA-aware."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    group = heads // kv_heads
    qs = q[:, :, rows or slice(None)].float()
    n_rows = qs.shape[2]
    grouped = qs.reshape(batch, kv_heads, group, n_rows, head_dim)
    out = torch.matmul(grouped, k.float().unsqueeze(2).transpose(-1, -2))
    out = out.reshape(batch, heads, n_rows, k_len)
    out.mul_(1.0 / math.sqrt(head_dim) if scale is None else scale)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    if mask is not None:
        bias = mask.additive(batch, q_len, k_len, rows=rows, device=q.device)
        if bias is not None:
            out.add_(bias)
    return out


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    mask: MaskSpec | None = None,
    rows: slice | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and row log-sum-exp of one attention call.

    Args:
        q: ``[batch, heads, q_len, head_dim]``.
        k: ``[batch, kv_heads, k_len, head_dim]``.
        scale: score multiplier; default ``1/sqrt(head_dim)`` as in SDPA.
        mask: the call's mask; None for none.
        rows: a slice of query rows to compute (default: all).
        softcap: soft-capping of the scores (Gemma 2): ``softcap * tanh(s / softcap)``.

    Returns:
        ``(attn [batch, heads, rows, k_len] float32, lse [batch, heads, rows] float32)``. Rows
        with no visible key have probability 0 everywhere and ``lse = -inf``.

    Example:
        >>> q = torch.randn(1, 2, 3, 4); k = torch.randn(1, 1, 3, 4)
        >>> p, lse = attention_probs(q, k, mask=MaskSpec(causal=True))
        >>> p.sum(-1)
        tensor([[[1., 1., 1.],
                 [1., 1., 1.]]])
    """
    with isolated(q.device):
        s = scores(q, k, scale, mask, rows, softcap)
        # max-shifted like torch.softmax, so rows of huge negative fill values stay uniform
        top = s.amax(dim=-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros((), device=top.device))
        s.sub_(top).exp_()
        total = s.sum(dim=-1, keepdim=True)
        s.div_(total).nan_to_num_(nan=0.0)
        lse = (top + total.log()).squeeze(-1)
    return s, lse


def verify_rows(attn_rows: torch.Tensor, v: torch.Tensor, out_rows: torch.Tensor) -> float:
    """Max abs difference between ``attn_rows @ v`` and the kernel's output rows.

    Args:
        attn_rows: ``[batch, heads, n, k_len]`` probabilities of the sampled rows.
        v: ``[batch, kv_heads, k_len, v_dim]``.
        out_rows: ``[batch, heads, n, v_dim]`` the kernel's output for the same rows.
    """
    with isolated(v.device):
        batch, heads, n, k_len = attn_rows.shape
        kv_heads = v.shape[1]
        grouped = attn_rows.double().reshape(batch, kv_heads, heads // kv_heads, n, k_len)
        pv = torch.matmul(grouped, v.double().unsqueeze(2)).reshape(batch, heads, n, v.shape[-1])
        return float((pv - out_rows.double()).abs().max()) if pv.numel() else 0.0
