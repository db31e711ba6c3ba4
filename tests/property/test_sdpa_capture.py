"""Property tests: a capture of ``F.scaled_dot_product_attention`` is exact.

A one-call module runs SDPA with random shapes, GQA ratios, scales and masks (none, causal,
boolean, additive float). Each captured record is compared with an independent float64
reference written here (no attnhooks code involved): ``softmax(q·kᵀ·scale + mask)`` with query
head ``h`` reading key head ``h // (heads // kv_heads)`` and SDPA's top-left ``is_causal``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attnhooks
from attnhooks.attention.kernels import attention_probs
from tests.property.common import NEG_INF, SETTINGS, TOL

# how a mask tensor is laid out: which of [batch, heads] it has, and its rank
SHAPES = ("LL", "HLL", "1HLL", "B1LL", "BHLL", "B11L", "11LL")
MASK_KINDS = (
    "none",
    "causal",  # is_causal=True
    "bool_random",  # random True/False, possibly different per head
    "bool_padding",  # key padding only
    "bool_causal_padding",  # bottom-right causal & key padding (a compact form exists)
    "float_zero_inf",  # 0 / -inf version of a padding or causal-padding mask
    "float_bias",  # real-valued additive bias with some -inf
)


class SDPAModule(nn.Module):
    """A module whose forward is exactly one SDPA call."""

    def __init__(self, attn_mask, is_causal, scale, enable_gqa):
        super().__init__()
        self.attn_mask, self.is_causal, self.scale, self.enable_gqa = attn_mask, is_causal, scale, enable_gqa

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.attn_mask, is_causal=self.is_causal, scale=self.scale, enable_gqa=self.enable_gqa
        )


# -- independent float64 reference ----------------------------------------------------------------


def reference_bias(mask, is_causal, batch, heads, q_len, k_len):
    """The additive float64 mask SDPA applies, as ``[batch, heads, q_len, k_len]`` (0 / -inf / bias)."""
    bias = torch.zeros(batch, heads, q_len, k_len, dtype=torch.float64)
    if is_causal:  # SDPA: top-left aligned, j <= i, whatever q_len and k_len are
        hidden = torch.ones(q_len, k_len, dtype=torch.bool).triu(1)
        bias = bias.masked_fill(hidden, NEG_INF)
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = bias.masked_fill(~mask.expand(batch, heads, q_len, k_len), NEG_INF)
        else:
            bias = bias + mask.double().expand(batch, heads, q_len, k_len)
    return bias


def reference(q, k, scale, bias):
    """``(probs, lse)`` in float64; a row with no visible key has probs 0 and lse -inf."""
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    kk = k.double().repeat_interleave(heads // kv_heads, dim=1)
    factor = 1.0 / math.sqrt(head_dim) if scale is None else scale
    s = torch.matmul(q.double(), kk.transpose(-1, -2)) * factor + bias
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(nan=0.0)
    return probs, lse


def max_diff(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_lse_close(got, want):
    assert got.shape == want.shape
    inf_got, inf_want = torch.isinf(got), torch.isinf(want)
    assert torch.equal(inf_got, inf_want), "rows with no visible key must have lse = -inf (and only those)"
    assert bool((got[inf_got] < 0).all())
    finite = want[~inf_want]
    bound = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    assert max_diff(got[~inf_got], finite) <= TOL * bound


# -- strategies -----------------------------------------------------------------------------------


@st.composite
def sdpa_cases(draw):
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    q_len = draw(st.integers(1, 9))
    k_len = draw(st.integers(1, 9))
    head_dim = draw(st.integers(1, 8))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0), st.sampled_from([-0.7, 1.0])))
    kind = draw(st.sampled_from(MASK_KINDS))
    shape = draw(st.sampled_from(SHAPES))
    p_true = draw(st.sampled_from([0.15, 0.5, 0.9]))
    every_row_visible = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        q_len=q_len,
        k_len=k_len,
        head_dim=head_dim,
        scale=scale,
        kind=kind,
        shape=shape,
        p_true=p_true,
        every_row_visible=every_row_visible,
        dtype=dtype,
        seed=seed,
    )


def _layout(shape, batch, heads, q_len, k_len):
    """The mask tensor's shape for a layout name."""
    sizes = {"B": batch, "H": heads, "1": 1}
    lead = [sizes[c] for c in shape[:-2]]
    rows = 1 if shape.endswith("1L") else q_len
    return [*lead, rows, k_len]


def make_mask(case, gen):
    """``(attn_mask, is_causal)`` for a case, built with the case's generator."""
    kind, b, h, lq, lk = case["kind"], case["batch"], case["heads"], case["q_len"], case["k_len"]
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    shape = _layout(case["shape"], b, h, lq, lk)
    if kind == "bool_random":
        mask = torch.rand(shape, generator=gen) < case["p_true"]
        if case["every_row_visible"]:
            pick = torch.randint(0, lk, (*shape[:-1], 1), generator=gen)
            mask = mask.scatter(-1, pick, True)
        return mask, False
    if kind == "float_bias":
        mask = (torch.rand(shape, generator=gen) * 8 - 4).to(case["dtype"])
        hidden = torch.rand(shape, generator=gen) > case["p_true"]
        if case["every_row_visible"]:
            pick = torch.randint(0, lk, (*shape[:-1], 1), generator=gen)
            hidden = hidden.scatter(-1, pick, False)
        return mask.masked_fill(hidden, NEG_INF), False
    # structured: key padding (optionally bottom-right causal), identical across heads
    lead = case["shape"][:-2]
    rows = shape[-2]
    key_valid = torch.rand(b if "B" in lead else 1, lk, generator=gen) < max(case["p_true"], 0.5)
    if case["every_row_visible"]:
        key_valid[:, -1] = True
    allowed = key_valid[:, None, None, :].expand(-1, 1, rows, lk)
    causal = kind == "bool_causal_padding" or (kind == "float_zero_inf" and bool(torch.rand((), generator=gen) < 0.5))
    if causal and rows == lq:
        i = torch.arange(lq)[:, None] + (lk - lq)
        allowed = allowed & (torch.arange(lk)[None, :] <= i)
    allowed = allowed.expand(-1, h if "H" in lead else 1, rows, lk)
    while allowed.dim() > len(shape):
        allowed = allowed[0]
    allowed = allowed.contiguous()
    assert list(allowed.shape) == shape
    if kind == "float_zero_inf":
        zero = torch.zeros((), dtype=case["dtype"])
        return torch.where(allowed, zero, NEG_INF), False
    return allowed, False


def make_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hk, lq, lk, d, dt = (case[n] for n in ("batch", "heads", "kv_heads", "q_len", "k_len", "head_dim", "dtype"))
    q = torch.randn(b, h, lq, d, generator=gen).to(dt)
    k = torch.randn(b, hk, lk, d, generator=gen).to(dt)
    v = torch.randn(b, hk, lk, d + 1, generator=gen).to(dt)
    mask, is_causal = make_mask(case, gen)
    return q, k, v, mask, is_causal


# -- the properties ---------------------------------------------------------------------------------


def test_layouts_cover_sdpa_broadcasting():
    """The mask layouts used below all broadcast to [batch, heads, q_len, k_len] as SDPA requires."""
    for shape in SHAPES:
        dims = _layout(shape, 2, 3, 4, 5)
        torch.zeros(dims).expand(2, 3, 4, 5)


@SETTINGS
@given(sdpa_cases())
def test_sdpa_capture_matches_float64_reference(case):
    q, k, v, mask, is_causal = make_inputs(case)
    b, h, hk, lq, lk = case["batch"], case["heads"], case["kv_heads"], case["q_len"], case["k_len"]
    if mask is not None:
        assert mask.expand(b, h, lq, lk).shape == (b, h, lq, lk)
    model = SDPAModule(mask, is_causal, case["scale"], enable_gqa=hk < h)

    plain = model(q, k, v)
    with attnhooks.capture(model, record=("attn", "q", "k", "lse"), verify=lq) as cap:
        captured = model(q, k, v)

    # the model's own computation is untouched
    assert torch.equal(plain, captured)
    assert len(cap.records) == 1
    rec = cap.records[0]
    assert rec.source == "sdpa" and rec.module == "" and rec.step == 0 and rec.call == 0
    assert rec.k_len == lk and rec.q_offset == 0 and rec.k_offset == 0
    assert rec.kind in ("self", "cross")

    # q and k exactly as given (k at the KV-head count), in the model's dtype, on the CPU
    assert rec.q.dtype == q.dtype and torch.equal(rec.q, q)
    assert rec.k.dtype == k.dtype and tuple(rec.k.shape) == (b, hk, lk, case["head_dim"]) and torch.equal(rec.k, k)
    want_scale = 1.0 / math.sqrt(case["head_dim"]) if case["scale"] is None else case["scale"]
    assert rec.scale == pytest.approx(want_scale, rel=1e-12)

    # probabilities and lse against the independent float64 reference
    bias = reference_bias(mask, is_causal, b, h, lq, lk)
    probs, lse = reference(q, k, case["scale"], bias)
    assert rec.attn.dtype == torch.float32 and tuple(rec.attn.shape) == (b, h, lq, lk)
    assert max_diff(rec.attn, probs) <= TOL
    assert_lse_close(rec.lse, lse)
    hidden_rows = torch.isinf(lse)
    assert bool((rec.attn[hidden_rows] == 0).all()), "a row with no visible key must be all zeros"
    assert bool(((rec.attn.sum(-1) - 1).abs()[~hidden_rows] <= 1e-5).all())
    # fully masked rows: SDPA itself outputs zeros there, and the capture agrees with it
    out_rows = captured.expand(b, h, lq, -1)
    assert bool((out_rows[hidden_rows] == 0).all())

    # the MaskSpec rebuilds exactly the mask the kernel applied ...
    additive = rec.mask.additive(b, lq, lk)
    rebuilt = (
        torch.zeros(b, h, lq, lk, dtype=torch.float64) if additive is None else additive.double().expand(b, h, lq, lk)
    )
    assert torch.equal(rebuilt, bias)  # (float masks are drawn in float32, so the float32 rebuild is exact)
    # ... compactly when a compact form exists
    if case["kind"] in ("none", "causal", "bool_padding", "bool_causal_padding", "float_zero_inf"):
        assert rec.mask.dense is None, rec.mask
    if case["kind"] == "none":
        assert rec.mask.is_trivial
    if case["kind"] == "causal":
        assert rec.mask.causal and rec.mask.offset == 0 and rec.mask.key_valid is None

    # ... and the record's q, k, scale and mask reproduce its probabilities
    again, again_lse = attention_probs(rec.q, rec.k, rec.scale, rec.mask)
    assert max_diff(again, rec.attn) <= 1e-6
    assert_lse_close(again_lse, rec.lse.double())
    rows = slice(lq // 2, lq)
    part, _ = attention_probs(rec.q, rec.k, rec.scale, rec.mask, rows=rows)
    assert max_diff(part, rec.attn[:, :, rows]) <= 1e-6

    # verify=q_len checked every row against the kernel's output
    assert rec.verify_error is not None and rec.verify_error <= 1e-4


@SETTINGS
@given(sdpa_cases(), st.sampled_from([("q", "k"), ("attn",), ("lse",), ("attn", "lse")]))
def test_sdpa_capture_keeps_only_what_was_asked(case, record):
    q, k, v, mask, is_causal = make_inputs(case)
    model = SDPAModule(mask, is_causal, case["scale"], enable_gqa=case["kv_heads"] < case["heads"])
    with attnhooks.capture(model, record=record) as cap:
        model(q, k, v)
    (rec,) = cap.records
    for name in ("q", "k", "attn", "lse"):
        assert (getattr(rec, name) is not None) == (name in record), name
    assert rec.heads == case["heads"]


@SETTINGS
@given(sdpa_cases(), st.integers(1, 3))
def test_sdpa_repeated_calls_within_a_step(case, calls):
    """A module calling SDPA several times in one forward gets call indices 0..n-1, each exact."""
    q, k, v, mask, is_causal = make_inputs(case)
    inner = SDPAModule(mask, is_causal, case["scale"], enable_gqa=case["kv_heads"] < case["heads"])

    class Repeat(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = inner

        def forward(self, q, k, v):
            return [self.attn(q * (i + 1), k, v) for i in range(calls)]

    model = Repeat()
    with attnhooks.capture(model) as cap:
        model(q, k, v)
    assert [(r.module, r.step, r.call) for r in cap.records] == [("attn", 0, c) for c in range(calls)]
    bias = reference_bias(mask, is_causal, case["batch"], case["heads"], case["q_len"], case["k_len"])
    for rec in cap.records:
        probs, _ = reference(q * (rec.call + 1), k, case["scale"], bias)
        assert max_diff(rec.attn, probs) <= TOL


@pytest.mark.parametrize("style", ["positional", "three_d"])
def test_sdpa_call_styles(style):
    """Positional arguments are bound like SDPA binds them; 3-D inputs are one head."""
    q, k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6, 5), torch.randn(2, 3, 6, 5)
    bias = torch.randn(4, 6)

    class Positional(nn.Module):
        def forward(self, q, k, v):
            if style == "three_d":
                return F.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0], bias, 0.0, False, scale=0.4)
            return F.scaled_dot_product_attention(q, k, v, bias, 0.0, False, scale=0.4)

    model = Positional()
    with attnhooks.capture(model) as cap:
        model(q, k, v)
    (rec,) = cap.records
    if style == "three_d":
        q, k = q[:, :1], k[:, :1]
    assert torch.equal(rec.q, q) and torch.equal(rec.k, k) and rec.scale == 0.4
    probs, _ = reference(q, k, 0.4, reference_bias(bias, False, *rec.attn.shape))
    assert max_diff(rec.attn, probs) <= TOL


class _OneCall(nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x)


def test_sdpa_manual_steps_restart_call_indices():
    model, x = _OneCall(), torch.randn(1, 1, 2, 4)
    cap = attnhooks.capture(model)
    with cap:
        for step in range(3):
            cap.step = step
            model(x)
    assert [(r.step, r.call) for r in cap.records] == [(0, 0), (1, 0), (2, 0)]


def test_sdpa_automatic_steps_restart_call_indices():
    """Record.call is the index of the call *within its step*; every forward is a new step."""
    model, x = _OneCall(), torch.randn(1, 1, 2, 4)
    with attnhooks.capture(model) as cap:
        for _ in range(3):
            model(x)
    assert [(r.step, r.call) for r in cap.records] == [(0, 0), (1, 0), (2, 0)]


def test_sdpa_empty_query_with_verify():
    """SDPA accepts q_len = 0; a capture with verify=True must not break the forward."""
    model = SDPAModule(None, False, None, False)
    q, k = torch.randn(1, 2, 0, 4), torch.randn(1, 2, 3, 4)
    with attnhooks.capture(model, verify=True) as cap:
        out = model(q, k, k)
    assert tuple(out.shape) == (1, 2, 0, 4)
    (rec,) = cap.records
    assert tuple(rec.attn.shape) == (1, 2, 0, 3)


def test_sdpa_empty_query_without_verify():
    model = SDPAModule(None, False, None, False)
    q, k = torch.randn(1, 2, 0, 4), torch.randn(1, 2, 3, 4)
    with attnhooks.capture(model, record=("attn", "q", "k", "lse")) as cap:
        model(q, k, k)
    (rec,) = cap.records
    assert tuple(rec.attn.shape) == (1, 2, 0, 3) and tuple(rec.lse.shape) == (1, 2, 0)
