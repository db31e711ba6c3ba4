"""Blockwise reductions equal the same quantities computed from the whole probability matrix."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnhooks.attention.kernels import attention_probs
from attnhooks.attention.masks import MaskSpec
from attnhooks.reduce import native
from attnhooks.reduce import summary as reduce
from attnhooks.reduce.summary import SummaryOptions, summarize_call
from tests.property.common import SETTINGS

TOL = 1e-5


@pytest.fixture(autouse=True, params=["native", "torch"])
def summary_path(request):
    """Every test runs on both paths of the CPU summary: the C row kernel and torch's ops."""
    if request.param == "native":
        if native.summary_kernel() is None:
            pytest.skip(f"the C summary kernel is not available here: {native.status()}")
        yield request.param
    else:
        with mock.patch.object(native, "summary_kernel", lambda: None):
            yield request.param


def reference_summary(p: torch.Tensor, q_start: int, opt: SummaryOptions) -> dict[str, torch.Tensor]:
    """Every reduction from the whole matrix ``p [B, H, q, k]``, written plainly."""
    b, h, q_len, k_len = p.shape
    plogp = torch.where(p > 0, p * p.clamp_min(1e-45).log(), 0.0)
    band = torch.zeros(b, h, q_len, opt.band)
    for i in range(q_len):
        for w in range(opt.band):
            j = q_start + i - w
            if 0 <= j < k_len:
                band[:, :, i, w] = p[:, :, i, j]
    want = {"entropy": -plogp.sum(-1), "received": p.sum(2), "sink": p[..., : opt.sinks].sum(-1), "band": band}
    if opt.pooled:
        rb, cb = math.ceil(q_len / opt.pooled), math.ceil(k_len / opt.pooled)
        pq, pk = math.ceil(q_len / rb), math.ceil(k_len / cb)
        want["pooled_max"], want["pooled_mean"] = torch.zeros(b, h, pq, pk), torch.zeros(b, h, pq, pk)
        for r in range(pq):
            for c in range(pk):
                cell = p[:, :, r * rb : (r + 1) * rb, c * cb : (c + 1) * cb]
                want["pooled_max"][:, :, r, c] = cell.amax(dim=(-1, -2))
                want["pooled_mean"][:, :, r, c] = cell.mean(dim=(-1, -2))
    return want


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _check(q, k, mask, q_start, opt, scale=None, softcap=None):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    p, lse = attention_probs(q, k, scale, mask, softcap=softcap)
    got = summarize_call(q, k, lse, scale=scale, mask=mask, softcap=softcap, q_start=q_start, options=opt)
    want = reference_summary(p, q_start, opt)
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        assert (_maxdiff(got[name], value)) <= TOL, name
    top = min(opt.topk, k.shape[2])
    assert got["topk_index"].dtype == torch.int32 and got["topk_index"].shape[-1] == top
    best = p.topk(top, dim=-1).values
    assert (_maxdiff(got["topk_weight"], best)) <= TOL
    picked = torch.gather(p, -1, got["topk_index"].long())
    assert (_maxdiff(picked, got["topk_weight"])) <= TOL


MASKS = ("none", "causal", "causal-kv", "padding", "window", "dense", "dense-heads")


@SETTINGS
@given(
    batch=st.integers(1, 2),
    kv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    q_len=st.integers(1, 23),
    extra=st.integers(0, 9),
    kind=st.sampled_from(MASKS),
    block=st.integers(1, 9),
    pooled=st.integers(1, 7),
    band=st.integers(1, 6),
    topk=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    topk_bin=st.sampled_from([1, 2, 3, 32]),
    share_bin=st.sampled_from([1, 2, 16]),
    block_bytes=st.sampled_from([1, 200, 8 << 20]),
)
def test_blockwise_reductions_equal_the_whole_matrix(
    batch, kv, group, q_len, extra, kind, block, pooled, band, topk, seed, topk_bin, share_bin, block_bytes
):
    """Small bins and blocks (patched) take every path of the large ones: the top-k search among
    the best bins, shared overview bins, blocks of one head or of a part of a GQA group."""
    g = torch.Generator().manual_seed(seed)
    k_len = q_len + extra
    q = torch.randn(batch, kv * group, q_len, 8, generator=g) * 2
    k = torch.randn(batch, kv, k_len, 8, generator=g) * 2
    q_start = k_len - q_len  # rows are the last q_len positions, as in a KV cache
    mask = {
        "none": None,
        "causal": MaskSpec(causal=True, offset=q_start),
        "causal-kv": MaskSpec(causal=True, offset=q_start, key_valid=torch.rand(batch, k_len, generator=g) < 0.8),
        "padding": MaskSpec(key_valid=torch.arange(k_len)[None, :].expand(batch, -1) >= batch - 1),
        "window": MaskSpec(causal=True, offset=q_start, window=3),
        "dense": MaskSpec(dense=torch.randn(batch, 1, q_len, k_len, generator=g)),
        "dense-heads": MaskSpec(dense=_hiding_bias(batch, kv * group, q_len, k_len, g)),
    }[kind]
    opt = SummaryOptions(topk=topk, sinks=2, band=band, pooled=pooled, block=block)
    with (
        mock.patch.object(reduce, "_TOPK_BIN", topk_bin),
        mock.patch.object(reduce, "_SHARE_BIN", share_bin),
        mock.patch.object(reduce, "_BLOCK_BYTES", block_bytes),
    ):
        _check(q, k, mask, q_start, opt)


def _hiding_bias(batch, heads, q_len, k_len, g):
    """A per-head additive mask that hides some keys (-inf), and every key of some rows."""
    bias = torch.randn(batch, heads, q_len, k_len, generator=g)
    bias[torch.rand(bias.shape, generator=g) < 0.3] = float("-inf")
    bias[:, :, torch.rand(q_len, generator=g) < 0.2] = float("-inf")
    return bias


def test_long_rows_find_their_top_keys_among_the_best_bins():
    """Rows of hundreds of keys at the real bin sizes: a peaked head (some keys far above the rest,
    log p below the exp floor elsewhere), ties, and a short last bin."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 300, 16, generator=g), torch.randn(1, 2, 700, 16, generator=g)
    k[:, :, 5] = 40 * q[:, :2].mean(2)  # a key most rows attend to, by far
    k[:, :, 650:660] = k[:, :, 640:650]  # duplicate keys: equal weights
    for mask in (None, MaskSpec(causal=True, offset=400), MaskSpec(causal=True, offset=400, window=100)):
        for opt in (SummaryOptions(topk=8, pooled=20, block=64), SummaryOptions(topk=3, pooled=0, block=1000)):
            _check(q, k, mask, 400, opt)


def test_soft_capping_and_a_custom_scale():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 30, 16, generator=g) * 4, torch.randn(1, 2, 30, 16, generator=g) * 4
    _check(q, k, MaskSpec(causal=True), 0, SummaryOptions(block=7, pooled=4), scale=0.7, softcap=5.0)


def test_options_are_checked():
    with pytest.raises(ValueError, match="topk"):
        SummaryOptions(topk=-1)
    with pytest.raises(ValueError, match="block"):
        SummaryOptions(block=0)


def test_reductions_can_be_turned_off():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    _, lse = attention_probs(q, k, None, MaskSpec(causal=True))
    opt = SummaryOptions(topk=0, sinks=0, band=0, pooled=0)
    got = summarize_call(q, k, lse, scale=8**-0.5, mask=MaskSpec(causal=True), options=opt)
    assert sorted(got) == ["entropy", "received"]
