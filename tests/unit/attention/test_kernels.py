"""attention_probs / scores / verify_rows on constructed cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import attnhooks
from attnhooks import MaskSpec
from attnhooks.attention.kernels import attention_probs, scores, verify_rows

NEG_INF = float("-inf")


def test_zero_queries_give_uniform_rows():
    for k_len in (1, 3, 7):
        q = torch.zeros(2, 3, 4, 5)
        k = torch.randn(2, 3, k_len, 5)
        p, lse = attention_probs(q, k)
        assert torch.allclose(p, torch.full_like(p, 1 / k_len), atol=1e-7, rtol=0)
        assert torch.allclose(lse, torch.full_like(lse, math.log(k_len)), atol=1e-6, rtol=0)


def test_outputs_are_float32_with_expected_shapes():
    q = torch.randn(2, 4, 3, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    p, lse = attention_probs(q, k)
    assert p.dtype == torch.float32 and tuple(p.shape) == (2, 4, 3, 5)
    assert lse.dtype == torch.float32 and tuple(lse.shape) == (2, 4, 3)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 3), atol=1e-6)


def test_bfloat16_inputs_are_computed_in_float32():
    q = torch.randn(1, 2, 3, 4).bfloat16()
    k = torch.randn(1, 2, 5, 4).bfloat16()
    p, _ = attention_probs(q, k)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 2.0, dim=-1)
    assert p.dtype == torch.float32
    assert float((p.double() - ref).abs().max()) <= 1e-6


def test_a_key_with_a_huge_score_takes_all_the_probability():
    d = 4
    q = torch.zeros(1, 1, 2, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 5, d)
    k[0, 0, 3, 0] = 1000.0  # score 1000 * scale against 0 for the other keys
    p, lse = attention_probs(q, k)
    assert torch.allclose(p[..., 3], torch.ones(1, 1, 2), atol=1e-6, rtol=0)
    assert float(p[..., [0, 1, 2, 4]].abs().max()) < 1e-30
    assert torch.allclose(lse, torch.full_like(lse, 1000.0 / math.sqrt(d)), rtol=1e-6)


def test_default_scale_is_one_over_sqrt_head_dim():
    q, k = torch.randn(1, 2, 3, 9), torch.randn(1, 2, 4, 9)
    p_default, lse_default = attention_probs(q, k)
    p_explicit, lse_explicit = attention_probs(q, k, scale=1 / 3)
    assert torch.allclose(p_default, p_explicit, atol=1e-7) and torch.allclose(lse_default, lse_explicit, atol=1e-6)


def test_explicit_scale_matches_a_float64_softmax():
    q, k = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6, 5)
    for scale in (0.0, 0.3, 1.0, -2.0):
        p, lse = attention_probs(q, k, scale=scale)
        s = q.double() @ k.double().transpose(-1, -2) * scale
        assert float((p.double() - torch.softmax(s, -1)).abs().max()) <= 1e-6
        assert float((lse.double() - torch.logsumexp(s, -1)).abs().max()) <= 1e-5


def test_zero_scale_is_uniform_not_default():
    """``scale=0.0`` is a real scale (all scores 0), not "use the default"."""
    p, _ = attention_probs(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 4, 4), scale=0.0)
    assert torch.allclose(p, torch.full_like(p, 0.25))


def test_gqa_query_head_h_reads_key_head_h_over_group():
    heads, kv_heads, d = 6, 2, 4
    q = torch.randn(1, heads, 3, d)
    k = torch.randn(1, kv_heads, 5, d)
    p, lse = attention_probs(q, k)
    expanded = k.repeat_interleave(heads // kv_heads, dim=1)
    p_ref, lse_ref = attention_probs(q, expanded)
    assert torch.allclose(p, p_ref, atol=1e-7) and torch.allclose(lse, lse_ref, atol=1e-6)
    # and concretely: head 2 (group 0) uses key head 0, head 3 (group 1) uses key head 1
    s2 = q[0, 2].double() @ k[0, 0].double().T / 2
    s3 = q[0, 3].double() @ k[0, 1].double().T / 2
    assert float((p[0, 2].double() - s2.softmax(-1)).abs().max()) <= 1e-6
    assert float((p[0, 3].double() - s3.softmax(-1)).abs().max()) <= 1e-6


def test_heads_not_a_multiple_of_kv_heads_is_an_error():
    with pytest.raises(ValueError, match="multiple"):
        attention_probs(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4))


def test_causal_mask_known_probabilities():
    """With q = 0 every visible key has the same score: row i is uniform over keys 0..i."""
    q, k = torch.zeros(1, 1, 4, 2), torch.randn(1, 1, 4, 2)
    p, lse = attention_probs(q, k, mask=MaskSpec(causal=True))
    expect = torch.tril(torch.ones(4, 4)) / torch.arange(1, 5)[:, None]
    assert torch.allclose(p[0, 0], expect, atol=1e-7)
    assert torch.allclose(lse[0, 0], torch.log(torch.arange(1.0, 5.0)), atol=1e-6)


def test_key_padding_known_probabilities():
    q, k = torch.zeros(2, 1, 2, 3), torch.randn(2, 1, 4, 3)
    key_valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    p, _ = attention_probs(q, k, mask=MaskSpec(key_valid=key_valid))
    assert torch.allclose(p[0, 0], torch.tensor([[0.5, 0.5, 0, 0]] * 2))
    assert torch.allclose(p[1, 0], torch.full((2, 4), 0.25))


@pytest.mark.parametrize(
    "mask",
    [
        MaskSpec(key_valid=torch.tensor([[False, False, False]])),
        MaskSpec(causal=True, offset=-1),  # query row 0 sits before every key
        MaskSpec(dense=torch.tensor([[False, False, False], [True, False, True]])),
        MaskSpec(dense=torch.tensor([[NEG_INF, NEG_INF, NEG_INF], [0.0, 1.0, NEG_INF]])),
    ],
    ids=["padding", "causal-offset", "dense-bool", "dense-float"],
)
def test_fully_masked_row_is_zeros_with_lse_neg_inf(mask):
    q, k = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 3, 4)
    p, lse = attention_probs(q, k, mask=mask)
    assert not bool(torch.isnan(p).any()) and not bool(torch.isnan(lse).any())
    assert bool((p[:, :, 0] == 0).all())
    assert bool((lse[:, :, 0] == NEG_INF).all())
    visible = p[:, :, 1:].sum(-1)
    if bool(torch.isfinite(lse[:, :, 1:]).all()):
        assert torch.allclose(visible, torch.ones_like(visible), atol=1e-6)


def test_float_bias_is_added_to_the_scaled_scores():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    bias = torch.randn(1, 2, 3, 5)
    p, lse = attention_probs(q, k, scale=0.7, mask=MaskSpec(dense=bias))
    s = q.double() @ k.double().transpose(-1, -2) * 0.7 + bias.double()
    assert float((p.double() - s.softmax(-1)).abs().max()) <= 1e-6
    assert float((lse.double() - s.logsumexp(-1)).abs().max()) <= 1e-5


def test_softcap_caps_scores_before_the_mask():
    q, k = torch.randn(1, 2, 4, 8) * 10, torch.randn(1, 2, 4, 8) * 10
    cap = 5.0
    s = scores(q, k, 0.5, MaskSpec(causal=True), softcap=cap)
    raw = q.double() @ k.double().transpose(-1, -2) * 0.5
    capped = torch.tanh(raw / cap) * cap
    hidden = ~torch.ones(4, 4, dtype=torch.bool).tril()
    assert bool((s[..., hidden] == NEG_INF).all())
    assert float((s[..., ~hidden].double() - capped[..., ~hidden]).abs().max()) <= 1e-5
    assert float(s[..., ~hidden].abs().max()) <= cap
    p, _ = attention_probs(q, k, 0.5, MaskSpec(causal=True), softcap=cap)
    assert float((p.double() - capped.masked_fill(hidden, NEG_INF).softmax(-1)).abs().max()) <= 1e-6


def test_softcap_with_huge_scores_is_bounded():
    """Capped scores lie in (-cap, cap): even an enormous score leaves the others visible."""
    q = torch.zeros(1, 1, 1, 2)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 2, 2)
    k[0, 0, 0, 0] = 1e6
    p, _ = attention_probs(q, k, scale=1.0, softcap=1.0)
    e = math.e
    assert torch.allclose(p[0, 0, 0], torch.tensor([e / (e + 1), 1 / (e + 1)]), atol=1e-6)


@pytest.mark.parametrize("mask", [None, MaskSpec(causal=True, offset=2), MaskSpec(dense=torch.randn(1, 2, 6, 8))])
def test_rows_slice_matches_full_computation(mask):
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 1, 8, 4)
    full_p, full_lse = attention_probs(q, k, mask=mask)
    for rows in (slice(0, 6), slice(2, 5), slice(5, 6)):
        p, lse = attention_probs(q, k, mask=mask, rows=rows)
        assert torch.allclose(p, full_p[:, :, rows], atol=1e-7)
        assert torch.allclose(lse, full_lse[:, :, rows], atol=1e-6)


def test_inputs_are_not_modified():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    q0, k0 = q.clone(), k.clone()
    bias = torch.randn(3, 3)
    b0 = bias.clone()
    attention_probs(q, k, mask=MaskSpec(dense=bias), softcap=2.0)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(bias, b0)


def test_works_under_grad_and_returns_no_graph():
    q = torch.randn(1, 1, 2, 4, requires_grad=True)
    k = torch.randn(1, 1, 2, 4, requires_grad=True)
    p, lse = attention_probs(q, k)
    assert not p.requires_grad and not lse.requires_grad


def test_is_invisible_to_an_active_capture():
    """The library's own math inside a captured forward is never recorded as a model call."""

    class UsesKernels(nn.Module):
        def forward(self, q, k):
            p, _ = attention_probs(q, k)
            return p

    model = UsesKernels()
    with attnhooks.capture(model) as cap:
        model(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
    assert cap.records == []


# -- verify_rows --------------------------------------------------------------------------------------------


def test_verify_rows_is_zero_for_the_right_output():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 3)
    p, _ = attention_probs(q, k, mask=MaskSpec(causal=True, offset=1))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=MaskSpec(causal=True, offset=1).additive(2, 5, 6), enable_gqa=True
    )
    assert verify_rows(p, v, out) <= 1e-5
    rows = torch.tensor([0, 3])
    assert verify_rows(p[:, :, rows], v, out[:, :, rows]) <= 1e-5


def test_verify_rows_exact_known_value():
    attn = torch.tensor([[[[0.25, 0.75], [1.0, 0.0]]]])
    v = torch.tensor([[[[4.0], [8.0]]]])
    assert verify_rows(attn, v, torch.tensor([[[[7.0], [4.0]]]])) == 0.0
    assert verify_rows(attn, v, torch.tensor([[[[7.0], [4.5]]]])) == pytest.approx(0.5)


def test_verify_rows_is_large_for_a_wrong_output():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8) * 3
    p, _ = attention_probs(q, k)
    wrong_attn, _ = attention_probs(q, k, mask=MaskSpec(causal=True))
    out = wrong_attn.double() @ v.double()
    assert verify_rows(p, v, out) > 1e-2
    assert verify_rows(p, v, (p.double() @ v.double()) + 1.0) == pytest.approx(1.0, abs=1e-6)


def test_verify_rows_gqa_grouping():
    """Query head h is checked against value head h // (heads // kv_heads)."""
    attn = torch.softmax(torch.randn(1, 4, 3, 5), -1)
    v = torch.randn(1, 2, 5, 2)
    out = attn.double() @ v.double().repeat_interleave(2, dim=1)
    assert verify_rows(attn, v, out) <= 1e-6
    swapped = attn.double() @ v.double()[:, [1, 0]].repeat_interleave(2, dim=1)
    assert verify_rows(attn, v, swapped) > 1e-3


def test_verify_rows_empty_is_zero():
    assert verify_rows(torch.zeros(1, 2, 0, 3), torch.randn(1, 2, 3, 4), torch.zeros(1, 2, 0, 4)) == 0.0
