"""Property tests: a capture of eagerly computed attention is exact.

A one-layer module computes ``softmax(q·kᵀ·scale + bias + mask) @ v`` itself, with the score
product written as ``torch.matmul``, ``@``, ``einsum("bhqd,bhkd->bhqk")`` or the multi-query
``einsum("bqhd,bkd->bhqk")`` (a key without a head letter), and the softmax as ``torch.softmax``,
``F.softmax``, ``Tensor.softmax`` or an ``nn.Softmax`` child. The record must hold exactly the
probabilities the model computed, q and k as the product's operands (``[B, H, L, D]``), and a
scale and mask that rebuild those probabilities through :func:`attnhooks.attention.kernels.attention_probs`.
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
import attnhooks.attention.kernels
from attnhooks.attention.kernels import attention_probs
from tests.property.common import NEG_INF, SETTINGS, TOL

PRODUCTS = ("matmul", "at", "einsum", "einsum_mqa")
SOFTMAXES = ("torch", "functional", "method", "module")
SCALINGS = ("mul", "div_sqrt", "none", "prescaled_q", "softcap")
MASKINGS = ("none", "fill_neg_inf", "fill_finfo_min", "fill_minus_1e9", "add_zero_inf", "bias", "bias_and_fill")


class EagerAttention(nn.Module):
    """Eager attention; keeps the scores and probabilities it computed for the test to compare."""

    def __init__(self, product, softmax, scaling, scale, bias=None, allowed=None, fill=NEG_INF, additive=False):
        super().__init__()
        self.product, self.softmax_kind, self.scaling, self.scale = product, softmax, scaling, scale
        self.bias, self.allowed, self.fill, self.additive = bias, allowed, fill, additive
        self.sm = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        head_dim = q.shape[-1]
        if self.scaling == "prescaled_q":
            q = q * self.scale
        if self.product == "matmul":
            s = torch.matmul(q, k.transpose(-1, -2))
        elif self.product == "at":
            s = q @ k.transpose(-1, -2)
        elif self.product == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:  # multi-query: q [B, Lq, H, D], k [B, Lk, D], v [B, Lk, Dv]
            s = torch.einsum("bqhd,bkd->bhqk", q, k)
        if self.scaling == "mul":
            s = s * self.scale
        elif self.scaling == "div_sqrt":
            s = s / math.sqrt(head_dim)
        elif self.scaling == "softcap":  # Gemma 2: softcap * tanh(scores / softcap), not linear in q·kᵀ
            s = torch.tanh(s * self.scale / 2.0) * 2.0
        if self.bias is not None:
            s = s + self.bias
        if self.allowed is not None:
            if self.additive:
                zero = torch.zeros((), dtype=s.dtype)
                s = s + torch.where(self.allowed, zero, NEG_INF)
            else:
                s = s.masked_fill(~self.allowed, self.fill)
        if self.softmax_kind == "torch":
            p = torch.softmax(s, dim=-1)
        elif self.softmax_kind == "functional":
            p = F.softmax(s, dim=-1)
        elif self.softmax_kind == "method":
            p = s.softmax(-1)
        else:
            p = self.sm(s)
        self.scores, self.probs = s, p
        if self.product == "einsum_mqa":
            return torch.einsum("bhqk,bkd->bqhd", p, v)
        return p @ v


@st.composite
def eager_cases(draw, maskings=MASKINGS, scalings=SCALINGS):
    return dict(
        batch=draw(st.integers(1, 3)),
        heads=draw(st.integers(1, 4)),
        q_len=draw(st.integers(1, 9)),
        k_len=draw(st.integers(1, 9)),
        head_dim=draw(st.integers(1, 8)),
        product=draw(st.sampled_from(PRODUCTS)),
        softmax=draw(st.sampled_from(SOFTMAXES)),
        scaling=draw(st.sampled_from(scalings)),
        scale=draw(st.one_of(st.floats(0.05, 2.0), st.sampled_from([1.0, 0.125, -0.5]))),
        masking=draw(st.sampled_from(maskings)),
        bias_layout=draw(st.sampled_from(["1HLL", "LL", "BHLL"])),
        mask_layout=draw(st.sampled_from(["B1LL", "LL", "B11L", "BHLL"])),
        p_true=draw(st.sampled_from([0.3, 0.7, 0.95])),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _sized(layout, b, h, lq, lk):
    sizes = {"B": b, "H": h, "1": 1}
    rows = 1 if layout.endswith("1L") else lq
    return [sizes[c] for c in layout[:-2]] + [rows, lk]


def build(case):
    """``(model, (q, k, v), expected_q, expected_k, allowed [B,H,Lq,Lk] or None)`` for a case."""
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, lq, lk, d, dt = (case[n] for n in ("batch", "heads", "q_len", "k_len", "head_dim", "dtype"))
    mqa = case["product"] == "einsum_mqa"
    if mqa:
        q = torch.randn(b, lq, h, d, generator=gen).to(dt)
        k = torch.randn(b, lk, d, generator=gen).to(dt)
        v = torch.randn(b, lk, d + 1, generator=gen).to(dt)
    else:
        q = torch.randn(b, h, lq, d, generator=gen).to(dt)
        k = torch.randn(b, h, lk, d, generator=gen).to(dt)
        v = torch.randn(b, h, lk, d + 1, generator=gen).to(dt)
    bias = allowed = None
    masking = case["masking"]
    if masking in ("bias", "bias_and_fill"):
        bias = (torch.rand(_sized(case["bias_layout"], b, h, lq, lk), generator=gen) * 6 - 3).to(dt)
    if masking in ("fill_neg_inf", "fill_finfo_min", "fill_minus_1e9", "add_zero_inf", "bias_and_fill"):
        allowed = torch.rand(_sized(case["mask_layout"], b, h, lq, lk), generator=gen) < case["p_true"]
        # every row keeps a visible key: a fully -inf row would make the model's own softmax NaN
        pick = torch.randint(0, lk, (*allowed.shape[:-1], 1), generator=gen)
        allowed = allowed.scatter(-1, pick, True)
    fill = {"fill_finfo_min": torch.finfo(dt).min, "fill_minus_1e9": -1e9}.get(masking, NEG_INF)
    model = EagerAttention(
        case["product"],
        case["softmax"],
        case["scaling"],
        case["scale"],
        bias,
        allowed,
        fill,
        additive=masking == "add_zero_inf",
    )
    op_q = q * case["scale"] if case["scaling"] == "prescaled_q" else q
    want_q = op_q.permute(0, 2, 1, 3) if mqa else op_q
    want_k = k.unsqueeze(1) if mqa else k
    full_allowed = None if allowed is None else allowed.expand(b, h, lq, lk)
    return model, (q, k, v), want_q, want_k, full_allowed


def max_diff(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


@SETTINGS
@given(eager_cases())
def test_eager_capture_is_exact(case):
    model, inputs, want_q, want_k, allowed = build(case)
    b, h, lq, lk = case["batch"], case["heads"], case["q_len"], case["k_len"]

    plain = model(*inputs)
    with attnhooks.capture(model, record=("attn", "q", "k", "lse")) as cap:
        captured = model(*inputs)
    assert torch.equal(plain, captured), "the capture changed the model's output"

    assert len(cap.records) == 1, cap.records
    rec = cap.records[0]
    assert rec.source == "eager" and rec.module == "" and rec.call == 0

    # exactly the probabilities the model materialised
    assert rec.attn.dtype == torch.float32 and tuple(rec.attn.shape) == (b, h, lq, lk)
    assert torch.equal(rec.attn, model.probs.float())
    # q and k: the product's operands as [B, H, L, D]; the multi-query key has one head
    assert rec.q.dtype == case["dtype"] and torch.equal(rec.q, want_q)
    assert rec.k.dtype == case["dtype"] and torch.equal(rec.k, want_k)
    assert rec.k.shape[1] == (1 if case["product"] == "einsum_mqa" else h)
    # lse of the model's own scores
    want_lse = torch.logsumexp(model.scores.double(), dim=-1)
    assert max_diff(rec.lse, want_lse) <= TOL * max(1.0, float(want_lse.abs().max()))

    # the inferred scale and mask rebuild the probabilities
    again, again_lse = attention_probs(rec.q, rec.k, rec.scale, rec.mask)
    assert max_diff(again, rec.attn) <= TOL, (rec.scale, rec.mask)
    assert max_diff(again_lse, rec.lse) <= TOL * max(1.0, float(want_lse.abs().max()))

    # where the scores are a pure multiple of q·kᵀ plus a 0/-inf mask, that is what is inferred
    if case["masking"] in ("none", "fill_neg_inf", "fill_finfo_min", "add_zero_inf") and case["scaling"] != "softcap":
        true_scale = {"mul": case["scale"], "div_sqrt": 1 / math.sqrt(case["head_dim"])}.get(case["scaling"], 1.0)
        if bool((torch.matmul(want_q.double(), want_k.double().transpose(-1, -2)).abs() > 1e-3).any()):
            assert rec.scale == pytest.approx(true_scale, rel=1e-4)
        additive = rec.mask.additive(b, lq, lk)
        # hidden keys carry -inf, or finfo.min where the model filled them so (kept as is: exact)
        floor = torch.finfo(torch.float32).min / 2
        hidden = (
            torch.zeros(b, h, lq, lk, dtype=torch.bool) if additive is None else additive.expand(b, h, lq, lk) <= floor
        )
        assert torch.equal(hidden, torch.zeros_like(hidden) if allowed is None else ~allowed)
        if additive is not None:
            assert bool((additive.expand(b, h, lq, lk)[~hidden] == 0).all())


@SETTINGS
@given(eager_cases(maskings=("none",), scalings=("mul", "div_sqrt", "none", "prescaled_q")))
def test_eager_capture_without_mask_is_compact(case):
    """Plain scaled scores: the record's mask is trivial, so nothing dense is kept per call."""
    model, inputs, _, _, _ = build(case)
    with attnhooks.capture(model) as cap:
        model(*inputs)
    (rec,) = cap.records
    assert rec.mask.is_trivial, rec.mask


def test_eager_bmm_with_declared_heads():
    """``[batch*heads, L, D]`` scores (bmm) are folded into heads using the module's ``num_heads``."""

    class BmmAttention(nn.Module):
        num_heads = 3

        def forward(self, q, k, v):  # [B*H, L, D]
            self.probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.5, dim=-1)
            return torch.bmm(self.probs, v)

    b, h, lq, lk, d = 2, 3, 4, 5, 6
    q, k, v = torch.randn(b * h, lq, d), torch.randn(b * h, lk, d), torch.randn(b * h, lk, d)
    model = BmmAttention()
    with attnhooks.capture(model) as cap:
        model(q, k, v)
    (rec,) = cap.records
    assert tuple(rec.attn.shape) == (b, h, lq, lk)
    assert torch.equal(rec.attn, model.probs.reshape(b, h, lq, lk))
    assert torch.equal(rec.q, q.reshape(b, h, lq, d)) and torch.equal(rec.k, k.reshape(b, h, lk, d))
    assert rec.scale == pytest.approx(0.5, rel=1e-5)
    again, _ = attention_probs(rec.q, rec.k, rec.scale, rec.mask)
    assert max_diff(again, rec.attn) <= TOL


def test_eager_fully_masked_row_with_finfo_min_is_rebuilt():
    """HF-style eager masking adds ``finfo.min``: a fully masked row is uniform in the model."""

    class Eager(nn.Module):
        def forward(self, q, k, allowed):
            s = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~allowed, torch.finfo(q.dtype).min)
            self.probs = torch.softmax(s, dim=-1)
            return self.probs

    q, k = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    allowed = torch.ones(3, 3, dtype=torch.bool).tril()
    allowed[0] = False  # query row 0 sees nothing: the model's softmax gives it 1/3 everywhere
    model = Eager()
    with attnhooks.capture(model) as cap:
        model(q, k, allowed)
    (rec,) = cap.records
    assert torch.allclose(rec.attn[0, 0, 0], torch.full((3,), 1 / 3))  # what the model used
    again, _ = attention_probs(rec.q, rec.k, rec.scale, rec.mask)
    assert max_diff(again, rec.attn) <= TOL  # fails: row 0 is rebuilt as all zeros
