"""The suite's leak guard (tests/conftest.py) sees what a capture could leave behind."""

from __future__ import annotations

import copy

import torch

from tests.conftest import _leaks


def test_the_guard_sees_hooks_on_new_and_copied_modules():
    assert not _leaks()
    layer = torch.nn.Linear(2, 2)
    handle = layer.register_forward_hook(lambda *_: None)
    twin = copy.deepcopy(layer)  # made through __new__ without __init__: tracked as well
    assert _leaks() == ["Linear keeps ['_forward_hooks']"] * 2
    handle.remove()
    twin._forward_hooks.clear()
    assert not _leaks()


def test_the_guard_sees_patched_generate_and_modes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.generate = lambda: None
    assert "Sequential keeps a patched .generate" in _leaks()
    del model.generate
    with torch.overrides.TorchFunctionMode():
        assert any("torch function modes left" in leak for leak in _leaks())
    assert not _leaks()
