"""Property: attention rebuilt from a store's q, k (and lse) equals the attention the kernel used.

Random calls declared through :func:`attnhooks.emit`: GQA, cross-attention lengths, custom scales,
SDPA's causal flag, key padding, arbitrary boolean masks (rows may see nothing) and additive float
masks shared by the heads or per head. Each is captured to a store once with the probabilities and
once with q and k only; the rebuilt matrices, and random tiles of them, must equal the stored
probabilities and a plain torch reference.
"""

from __future__ import annotations

import uuid

import numpy as np
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import attnhooks
from attnhooks.backends.memory import MemoryBackend
from tests.property.common import SETTINGS, TOL

MASKS = ("none", "causal", "padding", "boolean", "additive", "additive-per-head")


class Emitter(nn.Module):
    def forward(self, q, k, mask, causal, scale):
        attnhooks.emit(self, q=q, k=k, mask=mask, is_causal=causal, scale=scale)


@st.composite
def calls(draw):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    q_len, k_len, dim = draw(st.integers(1, 10)), draw(st.integers(1, 10)), draw(st.sampled_from([4, 8]))
    kind = draw(st.sampled_from(MASKS))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g) * 2
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g) * 2
    mask = None
    if kind == "padding":
        valid = torch.ones(batch, k_len, dtype=torch.bool)
        valid[-1, : draw(st.integers(0, k_len - 1))] = False
        mask = valid[:, None, None, :]
    elif kind == "boolean":
        mask = torch.rand(batch, 1, q_len, k_len, generator=g) < 0.7
    elif kind.startswith("additive"):
        mask = torch.randn(batch, heads if kind.endswith("head") else 1, q_len, k_len, generator=g)
    return q, k, mask, kind == "causal", scale


def _reference(q, k, mask, causal, scale):
    """The exact probabilities (float64), and how far float32 ones may be from them: ``exp(s - lse)``
    in float32 is off by about ``|s| * 2**-24`` relative, so the tolerance grows with the largest score
    (scores reach ~100 with ``scale=2``, where 1e-5 alone is too tight for any float32 softmax)."""
    group = q.shape[1] // k.shape[1]
    q, k = q.double(), k.double()
    mask = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    s = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    tol = TOL * max(1.0, float(s.abs().max()) / 16)
    if causal:
        s = s.masked_fill(~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return torch.softmax(s, dim=-1).nan_to_num(0.0).float(), tol


def _store(call, record):
    location = f"memory://reconstruct-{uuid.uuid4().hex}"
    module = Emitter()
    with attnhooks.capture(module, store=location, record=record):
        module(*call)
    return location


@settings(SETTINGS)
@given(call=calls(), data=st.data())
def test_rebuilt_attention_equals_stored_and_reference(call, data):
    ref, tol = _reference(*call)
    full = _store(call, ("attn", "q", "k", "lse"))
    bare = _store(call, ("q", "k"))
    try:
        with_attn, without = attnhooks.open_store(full), attnhooks.open_store(bare)
        batch, heads, q_len, k_len = ref.shape
        for s in range(batch):
            want = ref[s].numpy()
            stored = with_attn.attention("", 0, s, method="stored")
            assert np.abs(stored - want).max() <= tol
            for st_, method in ((with_attn, "reconstructed"), (without, "auto")):
                got = st_.attention("", 0, s, method=method)
                assert got.shape == want.shape and np.abs(got - want).max() <= tol
            r0 = data.draw(st.integers(0, q_len - 1))
            r1 = data.draw(st.integers(r0, q_len))
            c0 = data.draw(st.integers(0, k_len - 1))
            c1 = data.draw(st.integers(c0, k_len))
            h = data.draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=3))
            tile = without.attention("", 0, s, heads=h, rows=slice(r0, r1), cols=slice(c0, c1))
            assert tile.shape == (len(h), r1 - r0, c1 - c0)
            assert np.abs(tile - want[h, r0:r1, c0:c1]).max(initial=0.0) <= tol
    finally:
        MemoryBackend.delete(full)
        MemoryBackend.delete(bare)
