"""Spied copies: a function's own code, with the names that lead to SDPA leading to the SDPA handler;
nothing global is changed, and a function with no way to SDPA gets no copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnhooks.capturing.intercept import spy
from attnhooks.capturing.intercept.event import Collector


def through_torch(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) * 2


def through_f(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def eager(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class _Sink:
    def owner(self, module=None):
        return "attn"

    def wants_lse(self):
        return True


class _Mode:
    registry_shapes = None

    def __init__(self):
        self.sink = Collector(_Sink())

    def mask_spec(self, mask, is_causal, q_len, k_len):
        from attnhooks.attention.masks import MaskSpec

        return MaskSpec(causal=is_causal) if mask is None else MaskSpec.from_kernel(mask, is_causal, q_len, k_len)


def test_a_spied_copy_reports_its_sdpa_call_and_returns_the_same_output():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    for fn, causal in ((through_torch, True), (through_f, False)):
        copy = spy.spied(fn)
        assert copy is not None and copy is not fn and copy.__code__ is fn.__code__
        mode = _Mode()
        with spy.spying(mode):
            out = copy(q, k, v)
        assert torch.equal(out, fn(q, k, v)), "the kernel SDPA would run: the same output, bit for bit"
        ((owner, event),) = mode.sink.events
        assert owner == "attn" and torch.equal(event.q, q) and event.mask.causal is causal
        assert event.lse is not None and event.lse.shape == (2, 3, 5), "the CPU flash kernel's lse"
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention, "nothing global patched"
    assert torch.nn.functional is F


def test_no_copy_without_a_way_to_sdpa_and_outside_spying_the_copy_is_plain():
    assert spy.spied(eager) is None and spy.spied(len) is None
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    assert torch.equal(spy.spied(through_f)(q, k, v), through_f(q, k, v))  # no mode: plain SDPA
