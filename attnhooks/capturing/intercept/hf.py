"""Hugging Face's attention-function registry (``AttentionInterface``).

transformers modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v,
mask, scaling=, dropout=, sliding_window=, softcap=, ...)`` with post-RoPE q ``[B, H, Lq, D]`` and k
at the KV-head count. While a capture runs, every registered implementation is wrapped *in place*
(same key), so its mask function stays registered with it and padded batches keep their masks.

The wrapper names the module exactly (it is the first argument). When the implementation calls
a kernel the mode can see (``sdpa``), that kernel's event is the record. Under the ``"registry"``
plan the kernel is seen through a spied copy of the implementation when it calls SDPA by a name
(:mod:`~attnhooks.capturing.intercept.spy`), else under the mode pushed around the call; and
transformers' own ``sdpa`` calls are reported from their arguments once a call of their kind was
checked against the kernel (:mod:`~attnhooks.capturing.intercept.direct`). When it cannot
(``flash_attention_*``, ``flex_attention``, a third-party kernel), the wrapper reports the call
from the registry's own arguments and the capture computes the probabilities exactly.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, MutableMapping
from typing import Any

import torch

from attnhooks.attention.kernels import isolated
from attnhooks.attention.masks import MaskSpec
from attnhooks.capturing.intercept import direct, spy
from attnhooks.capturing.intercept.event import AttentionEvent, Collector, Sink, heads_first
from attnhooks.errors import AttnHooksWarning, CaptureError

__all__ = ["RegistryPatch"]


class RegistryPatch:
    """Wraps every entry of transformers' attention registry for one capture; ``remove`` undoes it.

    A no-op when transformers has not been imported (then no model of it can be running).
    """

    def __init__(self, sink: Sink, counter: Callable[[], int], mode: Any, running: list[str]) -> None:
        self._sink = sink
        self._count = counter
        self._mode = mode
        self._running = running  # the capture's stack of running owners
        self._installed: list[tuple[MutableMapping[str, Any], str, Any, Any]] = []
        self.active = False
        self.narrow = False  # the "registry" plan: kernels are looked for only inside a wrapped call
        self.depth = 0  # wrapped calls running now
        self._lse = False  # the capture records the row log-sum-exp
        self._spied: dict[Any, Callable[..., Any] | None] = {}  # implementation -> its spied copy (None: none)
        self._owner: Callable[[Any], str | None] = _nobody  # the sink's owner(), while installed

    def install(self, narrow: bool = False) -> None:
        """Wrap the registry's entries; ``narrow``: also look into each wrapped call (and name the owner),
        for a capture that pushes the mode nowhere else (:mod:`attnhooks.capturing.plan`)."""
        self.narrow = narrow
        self._lse = self._sink.wants_lse()  # (fixed for a capture: its options are)
        self._owner = self._sink.owner  # the capture's own method, not the proxy's lookup (dropped by remove)
        module = sys.modules.get("transformers.modeling_utils")
        interface = getattr(module, "AttentionInterface", None)
        mapping = getattr(interface, "_global_mapping", None)
        if module is not None and not isinstance(mapping, dict):
            version = getattr(sys.modules.get("transformers"), "__version__", "?")
            warnings.warn(
                f"attnhooks: transformers {version} has no AttentionInterface._global_mapping (the attention "
                "registry attnhooks wraps); calls through flash / flex / custom attention implementations are "
                "not captured in this version (SDPA and eager still are). Please report the version.",
                AttnHooksWarning,
                stacklevel=3,
            )
        if not isinstance(mapping, dict):
            return
        mappings = [mapping]
        local = getattr(getattr(module, "ALL_ATTENTION_FUNCTIONS", None), "_local_mapping", None)
        if isinstance(local, dict):
            mappings.append(local)
        for table in mappings:
            for name, fn in list(table.items()):
                wrapped = self._wrap(name, fn)
                table[name] = wrapped
                self._installed.append((table, name, fn, wrapped))
        self.active = True

    def remove(self) -> None:
        self.active = self.narrow = False
        self._owner = _nobody
        for table, name, fn, wrapped in reversed(self._installed):
            if table.get(name) is wrapped:
                table[name] = fn
        self._installed.clear()

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        can_go_direct = direct.is_direct(fn)

        @functools.wraps(fn)
        def wrapper(
            module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any
        ) -> Any:
            owner = self._owner(module) if self.active else None
            if owner is None:
                return fn(module, query, key, value, attention_mask, *args, **kwargs)
            # (the CPU kernel's lse is free under the mode, recomputing it is not: see the module docstring)
            if can_go_direct and self.narrow and not (self._lse and query.is_cpu):
                route = self._route(fn, module, query, key, attention_mask, len(args), kwargs)
                if route is not None:
                    return self._direct(*route, fn, owner, module, query, key, value, attention_mask, args, kwargs)
            seen, outer, mode = self._count(), self._mode.registry_shapes, self._mode
            mode.registry_shapes = (query.shape, key.shape)
            self.depth += 1
            try:
                if self.narrow:
                    out = self._at_kernel(owner, fn, module, query, key, value, attention_mask, args, kwargs)
                else:
                    out = fn(module, query, key, value, attention_mask, *args, **kwargs)
                mode.registry_shapes = outer
                if self._count() == seen:
                    event = _event(name, module, query, key, value, attention_mask, out, kwargs)
                    if event is not None:
                        self._sink.on_attention(owner, event)
            finally:
                self.depth -= 1
                mode.registry_shapes = outer
            return out

        wrapper.__attnhooks_original__ = fn  # type: ignore[attr-defined]
        return wrapper

    def _at_kernel(
        self,
        owner: str,
        fn: Callable[..., Any],
        module: Any,
        query: Any,
        key: Any,
        value: Any,
        mask: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """``fn`` under the mode, or its spied copy (:mod:`~attnhooks.capturing.intercept.spy`) when it
        calls SDPA by a name: the same kernel event, without every other op passing through Python."""
        copy = self._spied.get(fn, fn)
        if copy is fn:
            copy = self._spied[fn] = spy.spied(fn)
        self._running.append(owner)
        if copy is not None:
            outer = spy.enter(self._mode)
            try:
                return copy(module, query, key, value, mask, *args, **kwargs)
            finally:
                spy.leave(outer)
                self._running.pop()
        self._mode.__enter__()
        try:
            return fn(module, query, key, value, mask, *args, **kwargs)
        finally:
            self._mode.__exit__(None, None, None)
            self._running.pop()

    def _route(
        self, fn: Any, module: Any, q: Any, k: Any, mask: Any, n_args: int, kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], bool] | None:
        """``(the call's kind, it agreed with the kernel before)`` when it may go direct
        (:mod:`~attnhooks.capturing.intercept.direct`); None: at the kernel."""
        key = direct.call_key(fn, module, q, k, mask, n_args, kwargs)
        verdict = None if key is None else direct.VERDICTS.get(key)
        if key is None or verdict is False:
            return None
        return key, bool(verdict)

    def _direct(self, key: tuple[Any, ...], agreed: bool, fn: Callable[..., Any], owner: str, *call: Any) -> Any:
        """Run ``fn`` as it is and report its call from its arguments; the first call of its kind in
        the process (not ``agreed`` yet) runs at the kernel, and the kernel's event is compared with
        the direct one."""
        module, query, k, value, mask, args, kwargs = call
        self.depth += 1
        try:
            if agreed:
                out = fn(module, query, k, value, mask, *args, **kwargs)
                known = None
                if query.shape[2] == 1:  # a decode call: taken without an event where the sink can
                    known = spec, scale, dropout = direct.terms(self._mode, module, query, k, mask, args, kwargs)
                    if not dropout and self._sink.on_row(owner, query, k, None, spec, scale, "sdpa"):
                        return out
                event = direct.direct_event(self._mode, module, query, k, value, mask, out, args, kwargs, known)
                self._sink.on_attention(owner, event)
                return out
            probe = Collector(self._sink)
            sink, self._mode.sink = self._mode.sink, probe
            outer, self._mode.registry_shapes = self._mode.registry_shapes, (query.shape, k.shape)
            try:
                out = self._at_kernel(owner, fn, *call)
            finally:
                self._mode.sink, self._mode.registry_shapes = sink, outer
            mine = direct.direct_event(self._mode, module, query, k, value, mask, out, args, kwargs)
            why = (
                direct.agrees(probe.events[0][1], mine)
                if len(probe.events) == 1
                else f"{len(probe.events)} kernel calls"
            )
            direct.VERDICTS.settle(key, why, module)
            for who, event in probe.events or [(owner, mine)]:
                self._sink.on_attention(who, event)
            return out
        finally:
            self.depth -= 1


def _nobody(module: Any = None) -> str | None:
    return None


def _event(
    name: str, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, out: Any, kw: dict[str, Any]
) -> AttentionEvent | None:
    """An event from the registry's arguments, for kernels the mode cannot look into."""
    if kw.get("s_aux") is not None or kw.get("position_bias") is not None:
        warnings.warn(
            f"attnhooks: {name} call of {type(module).__name__} uses attention sinks or a position bias "
            "inside the kernel; this call is not captured. Use attn_implementation='sdpa' or 'eager'.",
            AttnHooksWarning,
            stacklevel=3,
        )
        return None
    causal = kw.get("is_causal", getattr(module, "is_causal", None))
    if causal is None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4) and q.shape[-2] > 1:
        raise CaptureError(
            f"attnhooks: the {name} call of {type(module).__name__} gives no 4-D mask and neither the call nor "
            "the module says whether it is causal (`is_causal`); this transformers version passes it under "
            "another name. Use attn_implementation='sdpa' or 'eager', and please report the version."
        )
    with isolated(q.device):
        spec = _mask(bool(causal), mask, q.shape[-2], k.shape[-2], kw.get("sliding_window"))
    scale = kw.get("scaling", getattr(module, "scaling", None))  # the module's own when the call gives none
    return AttentionEvent(
        q=q,
        k=k,
        v=v,
        out=heads_first(out),
        mask=spec,
        scale=scale,
        softcap=kw.get("softcap"),
        dropout=float(kw.get("dropout") or 0.0),
        source=f"hf:{name}",
    )


def _mask(causal: bool, mask: Any, q_len: int, k_len: int, window: int | None) -> MaskSpec:
    """The registry's mask in any of its forms: 4-D tensor, 2-D padding, BlockMask or None."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        return MaskSpec.from_kernel(mask[..., :k_len], False, q_len, k_len)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return MaskSpec(causal=causal, offset=k_len - q_len, window=window, key_valid=mask[:, -k_len:].bool().cpu())
    if mask is not None and hasattr(mask, "mask_mod"):
        return MaskSpec(dense=_dense_block_mask(mask, q_len, k_len))
    return MaskSpec(causal=causal, offset=k_len - q_len, window=window)


def _dense_block_mask(block_mask: Any, q_len: int, k_len: int) -> torch.Tensor:
    """Element-level boolean mask ``[B, H, q_len, k_len]`` of a flex-attention BlockMask."""
    from torch.nn.attention.flex_attention import create_mask

    batch, heads = block_mask.kv_num_blocks.shape[:2]
    dense = create_mask(block_mask.mask_mod, batch, heads, q_len, k_len, device=block_mask.kv_num_blocks.device)
    return dense.to("cpu")
