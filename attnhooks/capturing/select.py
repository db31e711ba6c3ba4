"""Which modules a capture watches, and the names it gives them.

Names are those of ``named_modules()`` on the *unwrapped* model: DistributedDataParallel /
DataParallel (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT (``.get_base_model()``)
are looked through, and the segments wrappers insert inside the model (FSDP's
``_fsdp_wrapped_module``, activation checkpointing's ``_checkpoint_wrapped_module``, a compiled
submodule's ``_orig_mod``) are left out of the names, so a record says ``model.layers.0.self_attn``
however the model is wrapped.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.nn as nn

from attnhooks.errors import AttnHooksWarning, ModuleSelectionError
from attnhooks.names import glob_regex

__all__ = ["Modules", "Selection", "declared_heads", "glob_regex", "named_modules", "select", "unwrap", "warn_silent"]

WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})

Modules = str | Iterable[str] | Callable[[str, nn.Module], bool] | None


def unwrap(model: nn.Module) -> list[nn.Module]:
    """``[model, ..., innermost]``: the chain of wrappers down to the model that has the names."""
    chain = [model]
    while True:
        m = chain[-1]
        inner = getattr(m, "_orig_mod", None)
        if inner is None and isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = m.module
        get_base = getattr(m, "get_base_model", None)
        if inner is None and callable(get_base):
            inner = get_base()
        if not isinstance(inner, nn.Module) or inner is m or any(inner is c for c in chain):
            return chain
        chain.append(inner)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` with wrapper segments left out of the names; where a wrapper and the
    module it wraps get the same name, the name is the wrapped module's (the one that computes).

    The names and their order are those of ``model.named_modules()`` (pre-order, a module met twice
    named once, by its first name), walked without a generator per module: a capture is made per
    step in a training loop, so this runs once per step.
    """
    named: dict[str, nn.Module] = {}
    seen: set[int] = set()
    todo: list[tuple[str, nn.Module]] = [("", model)]
    pop, push = todo.pop, todo.append
    while todo:
        name, module = pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        named[name] = module
        children = module._modules
        if not children:
            continue
        prefix = name + "." if name else ""
        for key in reversed(children):
            child = children[key]
            if child is not None:
                push((name if key in WRAPPER_SEGMENTS else prefix + key, child))
    return named


@dataclass(frozen=True)
class Selection:
    """Module object id -> qualified name, for the modules a capture attributes calls to.

    ``everything`` is True when no ``modules=`` was given: then every module may own an attention
    call (the innermost one that is running when the call happens).
    """

    names: dict[int, str]
    everything: bool

    def name_of(self, module: nn.Module) -> str | None:
        return self.names.get(id(module))


def select(model: nn.Module, modules: Modules, named: dict[str, nn.Module] | None = None) -> Selection:
    """Resolve a ``modules=`` argument on ``model`` (already unwrapped).

    Args:
        model: the unwrapped model.
        modules: None for all; a glob (``"model.layers.*.self_attn"``, see :func:`glob_regex`);
            a list of names or globs;
            or a predicate ``(name, module) -> bool``.
        named: ``named_modules(model)`` when the caller has it already.

    Raises:
        ModuleSelectionError: a name or glob matches no module (the message lists near matches),
            or a predicate selects nothing.
    """
    named = named_modules(model) if named is None else named
    by_name = {name: id(m) for name, m in named.items()}
    if modules is None:
        return Selection({mid: name for name, mid in by_name.items()}, everything=True)
    if callable(modules):
        chosen = [name for name, m in named.items() if modules(name, m)]
        if not chosen:
            raise ModuleSelectionError(
                f"the modules= predicate selected none of the model's {len(named)} modules; "
                "check it against [name for name, _ in model.named_modules()]"
            )
        return Selection({by_name[n]: n for n in chosen}, everything=False)
    patterns = [modules] if isinstance(modules, str) else list(modules)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ModuleSelectionError(f"modules= takes a glob, a list of names or globs, or a predicate; got {modules!r}")
    chosen_names: dict[str, None] = {}
    for pattern in patterns:
        regex = glob_regex(pattern)
        hits = [n for n in named if regex.fullmatch(n)]
        if not hits:
            raise ModuleSelectionError(_no_match(pattern, list(named)))
        chosen_names.update(dict.fromkeys(hits))
    return Selection({by_name[n]: n for n in chosen_names}, everything=False)


def _no_match(pattern: str, names: list[str]) -> str:
    near = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    if not near:
        stem = pattern.split("*")[0].rstrip(".")
        near = [n for n in names if stem and stem in n][:5]
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return (
        f"modules={pattern!r} matches no module of the model{hint} "
        "Names are those of model.named_modules() (wrappers such as DDP or PEFT are looked "
        "through); in globs '*' stays within a dotted segment and '**' spans segments, e.g. 'model.layers.*.self_attn'."
    )


def warn_silent(selection: Selection, seen: set[str]) -> None:
    """Warn once about selected modules that made no attention call (a selection that names the
    wrong modules, or a custom attention to declare with ``emit``)."""
    if selection.everything:
        return
    silent = [n for n in selection.names.values() if n not in seen]
    if silent:
        shown = ", ".join(repr(n) for n in silent[:8]) + (" ..." if len(silent) > 8 else "")
        warnings.warn(
            f"attnhooks: {len(silent)} selected module(s) made no attention call during the forward: "
            f"{shown}. Select the modules that compute attention, or declare a custom one with "
            "attnhooks.emit(self, q=..., k=..., attn=...) in its forward.",
            AttnHooksWarning,
            stacklevel=4,
        )


_HEAD_ATTRS = ("heads", "num_heads", "num_attention_heads", "n_head", "n_heads")


def declared_heads(module: nn.Module | None) -> int | None:
    """The head count ``module`` declares (``heads`` / ``num_heads`` / ...), None when it declares none."""
    for attr in _HEAD_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
