"""Direct registry events: a Hugging Face ``sdpa`` call taken from the registry's own arguments,
without pushing the torch-function mode around it.

Under the ``"registry"`` plan (:mod:`attnhooks.capturing.plan`) the wrapper of transformers'
``sdpa_attention_forward`` used to push the mode around it, so the kernel's event was recorded; every
torch op of that function then ran through Python (~60 µs per call on a 2-core CPU, most of what a
short-sequence call cost). The registry is given post-RoPE ``q``, ``k`` at the KV-head count, the
mask and the scale; the kernel is given the same tensors rearranged (``repeat_kv``, ``pack_gqa``,
the mask cut to the keys, ``is_causal`` decided from the mask and the query length).

Verify, don't assume: the first call of each *shape of call* in a process (the function, the
module's class, the mask's kind, decode or prefill, the query and key lengths' relation, the keyword
names, the device and dtype) runs under the mode anyway, and the kernel's event is compared with the
direct one: the same q and k (bit for bit), the same scale, the same mask (every element). Calls of
that shape go direct only when they agreed; a disagreement warns once and keeps that shape on the
mode, which records what the kernel was given.

A capture that records the row log-sum-exp on the CPU keeps the mode: there the kernel's own lse comes
for free (:mod:`~attnhooks.capturing.intercept.sdpa`), and recomputing it costs more than the mode
(~250 µs for a 64 x 64 call of 16 heads against ~30 µs), besides differing from the kernel's in the last
bits. On other devices the lse is computed from q and k under either path, so calls go direct.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import torch

from attnhooks.attention.masks import MaskSpec, unmasked
from attnhooks.capturing.intercept.event import AttentionEvent, heads_first
from attnhooks.errors import AttnHooksWarning

__all__ = ["VERDICTS", "Verdicts", "agrees", "call_key", "direct_event", "is_direct", "terms"]

_HF_SDPA = ("transformers.integrations.sdpa_attention", "sdpa_attention_forward")
_UNSEEN = ("position_bias", "s_aux", "softcap")  # changes the kernel's inputs beyond q, k, mask: the mode sees them


def is_direct(fn: Any) -> bool:
    """``fn`` is transformers' own ``sdpa_attention_forward`` (not a function registered in its place)."""
    return (getattr(fn, "__module__", None), getattr(fn, "__name__", None)) == _HF_SDPA


def call_key(
    fn: Any, module: Any, q: torch.Tensor, k: torch.Tensor, mask: Any, n_args: int, kwargs: dict[str, Any]
) -> tuple[Any, ...] | None:
    """What decides how ``fn`` hands this call to the kernel, or None when the call must go through the
    mode (a position bias, attention sinks or a soft-cap in its keywords)."""
    for name in _UNSEEN:
        if kwargs.get(name) is not None:
            return None
    q_shape, k_shape = q.shape, k.shape  # (each .shape makes a torch.Size)
    q_len, k_len = q_shape[-2], k_shape[-2]
    if isinstance(mask, torch.Tensor):
        mask_kind: Any = (mask.dim(), mask.dtype, mask.shape[1] if mask.dim() == 4 else 0)
    else:
        mask_kind = type(mask)
    return (
        fn,
        type(module),
        mask_kind,
        q_len == 1,
        (q_len > k_len) - (q_len < k_len),
        q_shape[1] == k_shape[1],
        n_args,
        tuple(kwargs),  # (in the order given: one call site passes them in one order)
        bool(kwargs.get("dropout")),
        kwargs.get("is_causal"),
        "cpu" if q.is_cpu else q.device.type,  # (is_cpu makes no torch.device)
        q.dtype,
    )


def terms(
    mode: Any, module: Any, q: torch.Tensor, k: torch.Tensor, mask: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[MaskSpec, float | None, float]:
    """``(mask, scale, dropout)`` of an ``sdpa_attention_forward`` call, from its own arguments: the mask as
    the kernel is given it (``is_causal`` only for several query rows and no mask)."""
    dropout = kwargs.get("dropout", args[0] if args else 0.0)
    scale = kwargs.get("scaling", args[1] if len(args) > 1 else None)
    causal = kwargs.get("is_causal", args[2] if len(args) > 2 else None)
    if causal is None:
        causal = getattr(module, "is_causal", True)
    q_len, k_len = q.shape[-2], k.shape[-2]
    if isinstance(mask, torch.Tensor):
        spec = mode.mask_spec(mask, False, q_len, k_len)
    else:
        spec = unmasked(bool(q_len > 1 and causal))
    return spec, scale, float(dropout or 0.0)


def direct_event(
    mode: Any,
    module: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any,
    out: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    known: tuple[MaskSpec, float | None, float] | None = None,
) -> AttentionEvent:
    """The event of an ``sdpa_attention_forward`` call from its own arguments (:func:`terms`, or ``known``:
    what it gave for this call already); its output (a transposed view, a dispatch of its own) only when the
    capture verifies records against it."""
    spec, scale, dropout = known or terms(mode, module, q, k, mask, args, kwargs)
    event = AttentionEvent(
        q=q,
        k=k,
        v=v,
        out=heads_first(out) if mode.sink.verifies() else None,
        mask=spec,
        scale=scale,
        dropout=dropout,
        source="sdpa",
    )
    event.known_shape(q.shape, k.shape)
    return event


def agrees(kernel: AttentionEvent, direct: AttentionEvent) -> str | None:
    """None when ``direct`` describes the call exactly as ``kernel`` (the mode's event) does; else what differs."""
    if kernel.q is None or kernel.k is None or direct.q is None or direct.k is None:
        return "q or k unseen"
    shapes = [(tuple(kernel.q.shape), tuple(kernel.k.shape)), (tuple(direct.q.shape), tuple(direct.k.shape))]
    if shapes[0] != shapes[1]:
        return f"shapes (q, k): kernel {shapes[0]}, registry {shapes[1]}"
    default = 1.0 / math.sqrt(direct.q.shape[-1])
    scales = [e.scale if e.scale is not None else default for e in (kernel, direct)]
    if scales[0] != scales[1]:
        return f"scale: kernel {scales[0]}, registry {scales[1]}"
    if kernel.dropout != direct.dropout:
        return f"dropout: kernel {kernel.dropout}, registry {direct.dropout}"
    with torch._C.DisableTorchFunction():
        if not (torch.equal(kernel.q, direct.q) and torch.equal(kernel.k, direct.k)):
            return "q or k values"
        batch, _, q_len, k_len = direct.shape
        zero = torch.zeros(batch, 1, q_len, k_len, device=direct.q.device)
        a, b = ((m or MaskSpec()).additive(batch, q_len, k_len, device=zero.device) for m in (kernel.mask, direct.mask))
        a, b = (zero if m is None else m.expand(batch, -1, q_len, k_len) for m in (a, b))
        if a.shape != b.shape and a.shape[1] == 1:
            a = a.expand_as(b)
        if not torch.equal(a, b.expand_as(a)):
            return "mask"
    return None


class Verdicts:
    """Per process: which shapes of call were seen to agree with the kernel (True), or not (False)."""

    def __init__(self) -> None:
        self._known: dict[tuple[Any, ...], bool] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> bool | None:
        return self._known.get(key)

    def settle(self, key: tuple[Any, ...], why: str | None, module: Any) -> None:
        with self._lock:
            first = key not in self._known
            self._known[key] = why is None
        if why is not None and first:
            warnings.warn(
                f"attnhooks: transformers' sdpa call of {type(module).__name__} gives the kernel other inputs than its "
                f"own arguments say ({why}); calls of this kind are captured at the kernel (slower). Please report "
                "the transformers version.",
                AttnHooksWarning,
                stacklevel=4,
            )


VERDICTS = Verdicts()
