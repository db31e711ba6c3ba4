"""The module hooks of one capture, as its interception plan (:mod:`attnhooks.capturing.plan`) needs them.

``"mode"``: every selected module that may own attention gets a pre/post hook that keeps the stack of
selected modules running (the innermost one owns a call the mode sees). ``"torch"``: only the
``nn.MultiheadAttention`` modules get hooks, which push the mode (and name the call's owner) around
their own forward. ``"registry"``: none; the registry wrapper does both. Every handle goes into the
capture's ``ExitStack``; switching to the ``"registry"`` plan between units removes them early.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from attnhooks.capturing.plan import MODE, TORCH

if TYPE_CHECKING:
    from attnhooks.capturing.session import Capture

__all__ = ["ModuleHooks"]


class ModuleHooks:
    """Installs, runs and removes the module hooks of ``cap``."""

    def __init__(self, cap: Capture) -> None:
        self.cap = cap
        self.handles: list[Any] = []  # the selected modules' pre/post hooks (the "mode" plan)
        self._mha_entered: list[bool] = []  # the "torch" plan: whether each running MHA pushed the mode

    def install(self, stack: ExitStack, kind: str) -> None:
        """The hooks of plan ``kind``, each removed by ``stack``."""
        if kind not in (MODE, TORCH):
            return  # the "registry" plan: no module hook
        cap = self.cap
        names = cap._selection.names
        for name, module in cap._modules_by_name.items():
            if kind == TORCH and isinstance(module, nn.MultiheadAttention):
                owner = cap._plan.owner_of(module, names)
                if owner is not None:
                    stack.callback(module.register_forward_pre_hook(functools.partial(self._enter_mha, owner)).remove)
                    stack.callback(module.register_forward_hook(self._leave_mha, always_call=True).remove)
            if kind != MODE or names.get(id(module)) != name:
                continue
            if cap._selection.everything and name and not _may_own_attention(module):
                continue  # torch's own leaf layers (Linear, norms, dropout...) never compute attention
            for handle in (
                module.register_forward_pre_hook(self._push),
                module.register_forward_hook(self._pop, always_call=True),
            ):
                stack.callback(handle.remove)
                self.handles.append(handle)

    def remove(self) -> None:
        """Remove the ``"mode"`` plan's hooks now (the capture switched to the ``"registry"`` plan)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def clear(self) -> None:
        self.handles.clear()
        self._mha_entered.clear()

    def _push(self, module: nn.Module, args: Any) -> None:
        if self.cap._passes.capturing:
            self.cap._stack.append(self.cap._selection.names[id(module)])

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.cap._passes.capturing and self.cap._stack:
            self.cap._stack.pop()

    def _enter_mha(self, owner: str, module: nn.Module, args: Any) -> None:
        entered = self.cap._passes.capturing
        if entered:
            self.cap._stack.append(owner)
            self.cap._mode.__enter__()  # type: ignore[no-untyped-call]
        self._mha_entered.append(entered)

    def _leave_mha(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._mha_entered and self._mha_entered.pop():
            self.cap._mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            if self.cap._stack:
                self.cap._stack.pop()


def _may_own_attention(module: nn.Module) -> bool:
    """False for torch.nn's built-in leaf layers: a softmax or SDPA inside one is not attention of
    its own, and skipping their hooks keeps the per-module cost off most module calls."""
    if module._modules or isinstance(module, nn.MultiheadAttention):
        return True
    return not type(module).__module__.startswith("torch.nn.modules.")
