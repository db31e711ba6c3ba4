"""The row log-sum-exp comes from SDPA's own CPU flash kernel when SDPA would run it.

The capture then calls that kernel directly (same kernel, so the model's output is bit for bit what
SDPA returns) and keeps the lse it returns, instead of recomputing every score of the call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnhooks
import attnhooks.capturing.build
from attnhooks.attention.kernels import attention_probs
from tests import models


def _no_recompute(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("lse was recomputed instead of taken from the kernel")

    monkeypatch.setattr(attnhooks.capturing.build, "attention_probs", refuse)


@pytest.mark.parametrize("pad", [0, 3])
def test_lse_from_the_kernel_equals_the_scores_logsumexp_and_outputs_are_unchanged(pad, monkeypatch):
    model = models.llama()
    x, mask = models.ids(batch=2, length=16, pad_last=pad)
    with torch.no_grad():
        bare = model(input_ids=x, attention_mask=mask).logits
    _no_recompute(monkeypatch)
    with torch.no_grad(), attnhooks.capture(model, record=("q", "k", "lse")) as cap:
        logits = model(input_ids=x, attention_mask=mask).logits
    assert torch.equal(bare, logits)
    for rec in cap.records:
        _, want = attention_probs(rec.q, rec.k, rec.scale, rec.mask)
        hidden = torch.isneginf(want)
        assert torch.equal(hidden, torch.isneginf(rec.lse)), "rows that see no key have lse -inf"
        assert float((rec.lse - want)[~hidden].abs().max()) <= 1e-5


def test_training_is_bit_identical_with_kernel_lse():
    torch.manual_seed(0)
    a, b = models.llama(), models.llama()
    b.load_state_dict(a.state_dict())
    x, mask = models.ids(batch=2, length=12, pad_last=2)
    for model, capturing in ((a, False), (b, True)):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            with attnhooks.capture(model, record=("q", "k", "lse")) if capturing else torch.enable_grad():
                loss = model(input_ids=x, attention_mask=mask, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_and_gqa_at_the_kernel_boundary(dtype, monkeypatch):
    """Boolean and additive masks, is_causal, GQA and a custom scale: SDPA's output is unchanged."""

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, **kw):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 9, 16, generator=g).to(dtype) for _ in range(2))
    allowed = torch.rand(2, 1, 7, 9, generator=g) < 0.6
    allowed[0, 0, 3] = False  # a row that sees nothing
    cases = [
        {"is_causal": True, "enable_gqa": True},
        {"attn_mask": allowed, "enable_gqa": True},
        {"attn_mask": torch.randn(2, 4, 7, 9, generator=g).to(dtype), "enable_gqa": True, "scale": 0.3},
    ]
    module = Attn()
    _no_recompute(monkeypatch)
    for kw in cases:
        want = module(q, k, v, **kw)
        with attnhooks.capture(module, record=("q", "k", "lse")) as cap:
            got = module(q, k, v, **kw)
        assert torch.equal(want, got), kw
        (rec,) = cap.records
        assert rec.lse.dtype == torch.float32 and rec.lse.shape == (2, 4, 7)
        if "attn_mask" in kw and kw["attn_mask"].dtype == torch.bool:
            assert torch.isneginf(rec.lse[0, :, 3]).all()
