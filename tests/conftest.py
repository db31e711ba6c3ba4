"""Shared fixtures. The leak guard runs around every test of the suite."""

from __future__ import annotations

import gc
import os
import sys
import weakref

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


_MODULES: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_object_new = object.__new__


def _tracked_new(cls, *args, **kwargs):
    """Every nn.Module made while the suite runs (constructed, copied or unpickled) is remembered
    weakly, so the leak guard looks at modules only instead of scanning every object (~0.4 s a test)."""
    module = _object_new(cls)
    _MODULES.add(module)
    return module


nn.Module.__new__ = _tracked_new  # test suite only: attnhooks itself never patches torch classes


def _leaks() -> list[str]:
    """Everything a capture could leave behind, described; empty when clean."""
    found = []
    for obj in list(_MODULES):
        hooks = [d for d in ("_forward_hooks", "_forward_pre_hooks") if getattr(obj, d, None)]
        if hooks:
            found.append(f"{type(obj).__name__} keeps {hooks}")
        if "generate" in vars(obj):
            found.append(f"{type(obj).__name__} keeps a patched .generate")
    if torch.overrides._get_current_function_mode_stack():
        found.append(f"torch function modes left: {torch.overrides._get_current_function_mode_stack()}")
    if not torch.backends.mha.get_fastpath_enabled():
        found.append("torch.backends.mha fast path left disabled")
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is not None:
        for name, fn in modeling.AttentionInterface._global_mapping.items():
            if hasattr(fn, "__attnhooks_original__"):
                found.append(f"transformers attention registry entry {name!r} left wrapped")
    return found


@pytest.fixture(autouse=True)
def no_leftover_hooks():
    """Fail any test that leaves a hook, mode, registry patch or global switch behind."""
    before = set(_leaks())
    yield
    left = [leak for leak in _leaks() if leak not in before]
    if left:  # a module that died in a reference cycle is only gone once collected
        gc.collect()
        left = [leak for leak in _leaks() if leak not in before]
    assert not left, f"test left state behind: {left}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
