"""Eager attention: the softmax inside an attention module, paired with the product before it.

A model that computes attention itself (``attn_implementation="eager"``, T5's position bias,
soft-capping, ALiBi, an einsum-based custom module) materialises the probabilities with a
softmax over the last dimension. Those probabilities are exactly what the model used. The
queries and keys come from the most recent two-operand product (``matmul``, ``@``, ``bmm``,
``baddbmm``, two-operand ``einsum``) made in the same module whose output has the softmax's
``[..., q_len, k_len]`` shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attnhooks.capturing.intercept.event import AttentionEvent

__all__ = ["DROPOUTS", "PRODUCTS", "SOFTMAXES", "QKProduct", "handle_dropout", "handle_product", "handle_softmax"]

PRODUCTS = (
    torch.matmul,
    torch.Tensor.matmul,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    torch.Tensor.baddbmm,
    torch.einsum,
)
SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)
DROPOUTS = (F.dropout,)


@dataclass
class QKProduct:
    """A product that may be the attention scores: ``q [..., q_len, d] · k [..., k_len, d]ᵀ``."""

    owner: str
    q: torch.Tensor
    k: torch.Tensor
    out: torch.Tensor


def handle_product(mode: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the product; remember its operands as the candidate q and k of the owner module."""
    out = func(*args, **kwargs)
    if not isinstance(out, torch.Tensor) or out.dim() < 3:
        return out
    owner = mode.sink.owner()
    if owner is None:
        return out
    operands = _einsum_qk(args) if func is torch.einsum else _matmul_qk(func, args)
    if operands is not None:
        mode.last_product = QKProduct(owner, operands[0], operands[1], out)
    return out


def handle_softmax(mode: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the softmax; when it normalises a score product of the owner, report the attention."""
    out = func(*args, **kwargs)
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    product = mode.last_product
    if product is None or not isinstance(x, torch.Tensor) or x.dim() < 3:
        return out
    if dim not in (-1, x.dim() - 1) or product.out.shape[-2:] != x.shape[-2:]:
        return out
    if not _within(mode.sink.owner(), product.owner):
        return out
    owner = product.owner
    mode.last_product = None
    heads = _heads(product.q, x, mode.sink.heads(owner))
    event = AttentionEvent(
        q=_fold_heads(product.q, heads),
        k=_fold_heads(product.k, heads),
        attn=_fold_heads(out, heads),
        scores=_fold_heads(x, heads),
        source="eager",
    )
    mode.sink.on_attention(owner, event)
    mode.last_attention = (owner, tuple(out.shape))
    return out


def handle_dropout(mode: Any, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Flag dropout applied to attention probabilities (training mode, ``p > 0``)."""
    names = ("input", "p", "training", "inplace")
    a = {"p": 0.5, "training": True, **dict(zip(names, args)), **kwargs}
    last = mode.last_attention
    x = a.get("input")
    if a["training"] and a["p"] > 0 and last is not None and isinstance(x, torch.Tensor):
        owner, shape = last
        if tuple(x.shape) == shape and _within(mode.sink.owner(), owner):
            mode.sink.on_dropout(owner, float(a["p"]))
    return func(*args, **kwargs)


def _within(name: str | None, owner: str) -> bool:
    """True when module ``name`` is ``owner`` or one of its submodules (an ``nn.Softmax`` child)."""
    if name is None:
        return False
    return name == owner or owner == "" or name.startswith(owner + ".")


def _matmul_qk(func: Any, args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q, k)`` of ``a @ b`` / ``bmm(a, b)`` / ``baddbmm(bias, a, b)``; k as ``[..., k_len, d]``."""
    operands = args[1:3] if func in (torch.baddbmm, torch.Tensor.baddbmm) else args[:2]
    if len(operands) < 2:
        return None
    a, b = operands
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 or b.dim() < 2:
        return None
    return a, b.transpose(-1, -2)


def _einsum_qk(args: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q [..., q_len, d], k [..., k_len, d])`` of ``einsum("...qd,...kd->...qk", q, k)``.

    Batch letters missing from an operand become size-1 dimensions (MQA: a key without a head
    letter gets one head). Returns None for anything that is not such a score product.
    """
    if len(args) != 3 or not isinstance(args[0], str):
        return None
    eq, a, b = args
    if "->" not in eq or "." in eq:
        return None
    inputs, out = eq.replace(" ", "").split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or len(out) < 3:
        return None
    sa, sb = parts
    contracted = (set(sa) & set(sb)) - set(out)
    qi, ki = out[-2], out[-1]
    if len(contracted) != 1 or qi not in sa or ki not in sb or qi in sb or ki in sa:
        return None
    d = contracted.pop()
    batch = out[:-2]
    if not (set(sa) <= set(batch) | {qi, d} and set(sb) <= set(batch) | {ki, d}):
        return None
    return _permute(a, sa, batch, qi, d), _permute(b, sb, batch, ki, d)


def _permute(t: torch.Tensor, subs: str, batch: str, pos: str, d: str) -> torch.Tensor:
    """Reorder ``t`` (labelled ``subs``) to ``[*batch, pos, d]``, size 1 for absent batch letters."""
    present = [c for c in batch if c in subs] + [pos, d]
    t = t.permute(*[subs.index(c) for c in present])
    for i, c in enumerate(batch):
        if c not in subs:
            t = t.unsqueeze(i)
    return t


def _heads(q: torch.Tensor, scores: torch.Tensor, declared: int | None) -> int:
    """Heads of a score tensor: its own 4-D shape; for ``[batch*heads, q, k]`` the module's head count."""
    if scores.dim() >= 4:
        return int(scores.shape[-3])
    if declared and scores.dim() == 3 and scores.shape[0] % declared == 0 and q.shape[0] == scores.shape[0]:
        return declared
    return 1


def _fold_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., n, m]`` as ``[batch, heads, n, m]`` (3-D inputs are batch-major ``batch*heads``)."""
    if t.dim() == 4:
        return t
    return t.reshape(-1, heads, *t.shape[-2:])
