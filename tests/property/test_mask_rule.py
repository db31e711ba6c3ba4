"""The mask rule exists twice: in torch (``MaskSpec``, where the model runs) and in numpy
(``CallReader.allowed``, where a store is read without torch). Random compact masks (causal with
any offset, a sliding window, key padding) go through a capture into a store: the reader must allow
exactly the keys the capture's mask allowed."""

from __future__ import annotations

import uuid

import numpy as np
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import attnhooks
from attnhooks.attention.masks import MaskSpec
from tests.property.common import SETTINGS


class Emitter(nn.Module):
    def forward(self, q, k, mask):
        attnhooks.emit(self, q=q, k=k, mask=mask)


@st.composite
def masks(draw):
    batch, q_len, k_len = draw(st.integers(1, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 12))
    causal = draw(st.booleans())
    offset = draw(st.integers(-2, k_len))
    window = draw(st.none() | st.integers(1, k_len + 1))
    padded = draw(st.lists(st.integers(0, k_len - 1), max_size=3))
    key_valid = None
    if padded:
        key_valid = torch.ones(batch, k_len, dtype=torch.bool)
        key_valid[-1, padded] = False
    spec = MaskSpec(causal=causal, offset=offset, window=window if causal else None, key_valid=key_valid)
    return batch, q_len, k_len, spec


@SETTINGS
@given(masks())
def test_the_reader_allows_exactly_what_the_capture_allowed(case):
    batch, q_len, k_len, spec = case
    allowed = spec.additive(batch, q_len, k_len)
    allowed = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool) if allowed is None else torch.isfinite(allowed)
    allowed = allowed.expand(batch, 1, q_len, k_len)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(batch, 2, q_len, 4, generator=g), torch.randn(batch, 2, k_len, 4, generator=g)
    url = f"memory://mask-rule-{uuid.uuid4().hex}"
    emitter = Emitter()
    with torch.no_grad(), attnhooks.capture(emitter, store=url, record=("q", "k")):
        emitter(q, k, allowed)
    st_ = attnhooks.open_store(url)
    for b in range(batch):
        reader = st_.call_reader("", sample=b)
        rows, cols = slice(0, q_len), slice(0, k_len)
        got = reader.allowed(rows, cols)
        dense = reader.dense(np.arange(2), rows, cols)
        if dense is not None:
            got = got & np.isfinite(dense).all(axis=0)
        assert np.array_equal(got, allowed[b, 0].numpy()), (spec, got, allowed[b, 0])
