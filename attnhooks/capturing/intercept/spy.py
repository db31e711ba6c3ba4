"""Python functions that call SDPA, run with SDPA looked up as a spy instead of under the mode.

The torch-function mode sees an SDPA call inside a Python function (transformers'
``sdpa_attention_forward``, torch's ``multi_head_attention_forward``) only by seeing *every* torch
call of it, each a trip through Python (~3 µs apiece on a 2-core CPU). :func:`spied` makes a copy of
such a function from its own code object whose globals are a copy of its module's, with the names
that lead to ``scaled_dot_product_attention`` (the function itself, ``torch.nn.functional``, or
``torch``) leading to :func:`spy` instead; nothing global is patched, and the copy runs the very code
of the original. While the copy runs (:func:`spying`, or between :func:`enter` and :func:`leave` on
the hot path), ``spy`` hands the SDPA call to the mode's SDPA handler
(:mod:`~attnhooks.capturing.intercept.sdpa`), exactly as the mode would have: the same kernel event,
the same lse from the CPU flash kernel.

The caller checks that the call it wrapped made the SDPA call it expected (the handler's event came);
a function that reaches SDPA by another route makes none, and the caller falls back as it would
without the spy.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from attnhooks.capturing.intercept import sdpa

__all__ = ["enter", "leave", "spied", "spying"]

_LOCAL = threading.local()  # .mode: the mode whose sink the spy reports to, while a spied copy runs


def spy(*args: Any, **kwargs: Any) -> Any:
    """``scaled_dot_product_attention`` as a spied copy sees it: the SDPA handler of the current mode."""
    mode = getattr(_LOCAL, "mode", None)
    if mode is None:  # a spied copy run outside enter()/leave() (cannot happen in attnhooks): plain SDPA
        return F.scaled_dot_product_attention(*args, **kwargs)
    return sdpa.handle_sdpa(mode, F.scaled_dot_product_attention, args, kwargs)


def enter(mode: Any) -> Any:
    """From here on the spy reports to ``mode``'s sink (its ``registry_shapes`` and ``mask_spec`` apply);
    returns what :func:`leave` restores (a plain call: a context manager costs a microsecond per call)."""
    outer, _LOCAL.mode = getattr(_LOCAL, "mode", None), mode
    return outer


def leave(outer: Any) -> None:
    """Undo the :func:`enter` that returned ``outer``."""
    _LOCAL.mode = outer


@contextlib.contextmanager
def spying(mode: Any) -> Iterator[None]:
    """Within: the spy reports to ``mode``'s sink (:func:`enter` and :func:`leave` around the block)."""
    outer = enter(mode)
    try:
        yield
    finally:
        leave(outer)


class _Seen:
    """A module seen through: its attributes, but for the ones replaced."""

    def __init__(self, real: types.ModuleType, replaced: dict[str, Any]) -> None:
        self._real = real
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


_FUNCTIONAL = _Seen(F, {"scaled_dot_product_attention": spy})
_NN = _Seen(torch.nn, {"functional": _FUNCTIONAL})
_TORCH = _Seen(torch, {"nn": _NN})
_STANDINS = {id(F.scaled_dot_product_attention): spy, id(F): _FUNCTIONAL, id(torch.nn): _NN, id(torch): _TORCH}


def spied(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """A copy of ``fn`` that calls :func:`spy` for SDPA, or None when its code names no way to SDPA
    (or it is not a plain Python function: a closure, a builtin, a compiled function)."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ or not isinstance(fn, types.FunctionType):
        return None
    if "scaled_dot_product_attention" not in code.co_names:  # (global and attribute names alike)
        return None
    names = dict(fn.__globals__)
    replaced = False
    for name in code.co_names:
        standin = _STANDINS.get(id(names.get(name)))
        if standin is not None:
            names[name] = standin
            replaced = True
    if not replaced:
        return None
    copy = types.FunctionType(code, names, fn.__name__, fn.__defaults__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy
