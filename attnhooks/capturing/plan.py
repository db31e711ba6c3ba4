"""How narrowly a capture may intercept a model: the interception *plan*, learned once per model.

Two plans:

``"mode"``
    The torch-function mode (:mod:`attnhooks.capturing.intercept.mode`) is pushed for the whole
    captured forward, and every selected module gets a pre/post hook that names the module running
    when a call is seen. It sees every attention path (SDPA, an eager softmax, ``nn.MultiheadAttention``,
    ``emit``), at the price of a Python call for *every* torch function of the forward (~75 per
    layer of a Llama block).

``"registry"``
    For a Hugging Face model whose every attention call goes through transformers' attention
    registry: only the registry wrapper runs Python, and it looks into the implementation it wraps
    alone (a spied copy of it, :mod:`attnhooks.capturing.intercept.spy`, or the mode pushed around
    it), so the kernel's event is the very one the ``"mode"`` plan records (same tensors, same
    kernel, same lse); transformers' own ``sdpa`` calls skip even that once a call of their kind
    agreed with the kernel (:mod:`attnhooks.capturing.intercept.direct`). No other op of the model,
    and no module hook, passes through Python. The owner of a call is the
    innermost selected module among the module the registry is given and its ancestors (what the
    module hooks would name).

``"torch"``
    For a model made only of ``torch.nn``'s own modules (``nn.TransformerEncoder`` and its kind),
    whose attention can only be computed inside ``nn.MultiheadAttention``: the mode is pushed by
    pre/post hooks of the ``nn.MultiheadAttention`` modules alone, around their own forward (which
    is where the ``"mode"`` plan sees the call too), and the MHA fast path is switched off for the
    captured unit as under the ``"mode"`` plan. Decided by construction, nothing learned.

The ``"registry"`` plan is taken only when both hold:

1. the model is eligible by construction: an unwrapped ``transformers.PreTrainedModel`` (no
   ``torch.compile`` / PEFT / FSDP / checkpoint wrapper), made only of transformers' and
   ``torch.nn``'s own modules running their own ``forward`` (none replaced on the instance), no
   ``nn.MultiheadAttention``, and every module with a config runs a registered, non-eager attention
   implementation;
2. a captured unit of this model, with the same selection, ran under the ``"mode"`` plan and every
   attention call it saw came through the registry (and it saw at least one).

The decision of (2) is kept in a weak-keyed cache (the model object is its key; it is forgotten with
the model, or when its modules or implementations change), so that ``with capture(...)`` around
every step pays for the full interception once per model, not once per step.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterable

import torch.nn as nn

__all__ = ["MODE", "REGISTRY", "TORCH", "Plan", "forget"]

MODE = "mode"
REGISTRY = "registry"
TORCH = "torch"

# model -> {(signature, selection): True when a unit showed every call coming through the registry}
_LEARNED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], bool]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_OWN_PACKAGES = ("transformers.", "torch.nn.modules.")
_OWN_CLASSES: set[type] = set()  # classes found to be transformers' or torch.nn's own (not MHA)


def forget(model: nn.Module) -> None:
    """Drop what was learned about ``model``: its next capture starts with the ``"mode"`` plan."""
    with _LOCK:
        _LEARNED.pop(model, None)


class Plan:
    """The interception plan of one capture of ``root`` (the unwrapped model).

    Args:
        chain: the wrappers down to the model (:func:`~attnhooks.capturing.select.unwrap`).
        modules: ``{name: module}`` of the unwrapped model.
        selected: the names of the selected modules.
    """

    def __init__(self, chain: list[nn.Module], modules: dict[str, nn.Module], selected: Iterable[str]) -> None:
        self._root = chain[-1]
        self._modules = modules
        self._signature: tuple[object, ...] | None = _signature(chain, modules)
        self._key = (self._signature, frozenset(selected)) if self._signature is not None else None
        self.kind = MODE
        self.learned = False  # a unit of this capture showed the registry sees every call
        self.events = 0  # attention events seen in the current captured unit
        self.outside = 0  # of those, events that did not come through the registry
        self._owners: dict[int, str | None] = {}
        self._torch_only = len(chain) == 1 and all(
            type(m).__module__.startswith("torch.nn.modules.") for m in modules.values()
        )

    def choose(self) -> str:
        """The plan for this capture (at ``__enter__``): ``"torch"`` for a model of torch.nn's own modules,
        ``"registry"`` when it was learned, else ``"mode"``."""
        self.kind = TORCH if self._torch_only else MODE
        if self._key is not None:
            with _LOCK:
                if _LEARNED.get(self._root, {}).get(self._key):
                    self.kind = REGISTRY
        return self.kind

    def saw(self, through_registry: bool) -> None:
        """One attention event was taken; ``through_registry`` when it came inside a registry call."""
        self.events += 1
        if not through_registry:
            self.outside += 1

    def learn(self, failed: bool) -> None:
        """A captured unit ended: under the ``"mode"`` plan, remember whether the registry saw it all."""
        events, outside, self.events, self.outside = self.events, self.outside, 0, 0
        if self.kind != MODE or self._key is None or failed or events == 0:
            return
        self.learned = outside == 0
        with _LOCK:
            _LEARNED.setdefault(self._root, {})[self._key] = self.learned

    def owner_of(self, module: nn.Module, named: dict[int, str]) -> str | None:
        """Under the ``"registry"`` plan: the innermost selected module among ``module`` and its
        ancestors (by name), as the module hooks of the ``"mode"`` plan would name it."""
        key = id(module)
        if key not in self._owners:
            self._owners[key] = _innermost(_name_of(module, self._modules), self._modules, named)
        return self._owners[key]


def _innermost(name: str | None, modules: dict[str, nn.Module], named: dict[int, str]) -> str | None:
    while name is not None:
        selected = named.get(id(modules[name]))
        if selected is not None:
            return selected
        name = None if name == "" else name.rpartition(".")[0]
    return None


def _name_of(module: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    for name, m in modules.items():
        if m is module:
            return name
    return None


def _signature(chain: list[nn.Module], modules: dict[str, nn.Module]) -> tuple[object, ...] | None:
    """What the learned plan depends on (the modules and their attention implementations), or None
    when the model is not eligible for the ``"registry"`` plan by construction."""
    root = chain[-1]
    if len(chain) > 1 or not _is_pretrained(root):
        return None
    registry = _registry_names()
    if registry is None:
        return None
    impls: set[str] = set()
    configs: set[int] = set()
    for module in modules.values():
        cls = type(module)
        if cls not in _OWN_CLASSES:
            if issubclass(cls, nn.MultiheadAttention) or not cls.__module__.startswith(_OWN_PACKAGES):
                return None
            _OWN_CLASSES.add(cls)
        if "forward" in module.__dict__:
            return None  # a forward replaced on the instance (accelerate's hooks, a patch): not transformers' own
        config = module.__dict__.get("config")
        if config is None or id(config) in configs:
            continue
        configs.add(id(config))
        impl = getattr(config, "_attn_implementation", None)
        if not isinstance(impl, str) or impl == "eager" or impl not in registry:
            return None
        impls.add(impl)
    return (tuple(sorted(impls)), *map(id, modules.values()))


def _is_pretrained(module: nn.Module) -> bool:
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(module).__mro__
    )


def _registry_names() -> set[str] | None:
    """The names transformers' attention registry holds, or None without transformers."""
    module = sys.modules.get("transformers.modeling_utils")
    interface = getattr(module, "AttentionInterface", None)
    mapping = getattr(interface, "_global_mapping", None)
    if not isinstance(mapping, dict):
        return None
    names = set(mapping)
    local = getattr(getattr(module, "ALL_ATTENTION_FUNCTIONS", None), "_local_mapping", None)
    if isinstance(local, dict):
        names.update(local)
    return names
