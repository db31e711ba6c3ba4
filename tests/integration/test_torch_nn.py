"""torch.nn attention: MultiheadAttention (all argument paths) and the Transformer layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import attnhooks


def _reference(mha, q, k, v, **kw):
    with torch.no_grad():
        return mha(q, k, v, need_weights=True, average_attn_weights=False, **kw)[1]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_matches_its_own_weights(batch_first, need_weights):
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -3:] = True
    ref = _reference(mha, x, x, x, key_padding_mask=padding)
    with torch.no_grad(), attnhooks.capture(mha, verify=True) as cap:
        out = mha(x, x, x, need_weights=need_weights, key_padding_mask=padding)
    rec = cap.records[0]
    assert rec.module == "" and rec.source == "mha"
    assert rec.verify_error < 1e-5, "attn @ v through out_proj reproduces the module's output"
    assert float((rec.attn - ref).abs().max()) <= 1e-5
    assert (out[1] is None) == (not need_weights), "the caller still gets what it asked for"


def test_mha_cross_attention_masks_bias_kv_and_zero_attn():
    mha = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True, add_zero_attn=True, kdim=8, vdim=8)
    mha.eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    attn_mask = torch.zeros(5, 6, dtype=torch.bool)
    attn_mask[:, 0] = True
    ref = _reference(mha, q, kv, kv, attn_mask=attn_mask)
    with torch.no_grad(), attnhooks.capture(mha, verify=True) as cap:
        mha(q, kv, kv, attn_mask=attn_mask)
    rec = cap.records[0]
    assert rec.verify_error < 1e-5
    assert rec.kind == "cross" and rec.attn.shape == (2, 2, 5, 8)  # 6 keys + bias_k + zero key
    assert float((rec.attn - ref).abs().max()) <= 1e-5


def test_transformer_encoder_fast_path_is_captured_and_restored():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, 32)
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad(), attnhooks.capture(enc) as cap:
        captured = enc(x)
    assert torch.backends.mha.get_fastpath_enabled(), "the fast-path switch is restored"
    assert [r.module for r in cap.records] == ["layers.0.self_attn", "layers.1.self_attn"]
    h = x
    with torch.no_grad():
        for rec, mod in zip(cap.records, enc.layers):
            ref = _reference(mod.self_attn, h, h, h)
            assert float((rec.attn - ref).abs().max()) <= 1e-5
            h = mod(h)
        assert torch.allclose(captured, enc(x), atol=1e-5)


def test_transformer_decoder_layer_self_and_cross():
    dec = nn.TransformerDecoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    tgt, memory = torch.randn(1, 4, 16), torch.randn(1, 9, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    with torch.no_grad(), attnhooks.capture(dec, verify=True) as cap:
        dec(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
    self_rec, cross_rec = cap.records
    assert self_rec.verify_error < 1e-5 and cross_rec.verify_error < 1e-5
    assert (self_rec.module, cross_rec.module) == ("self_attn", "multihead_attn")
    assert self_rec.attn.shape == (1, 2, 4, 4) and cross_rec.attn.shape == (1, 2, 4, 9)
    assert torch.all(self_rec.attn[0, :, 0, 1:] == 0), "causal: row 0 sees only key 0"
    assert cross_rec.kind == "cross"


def test_training_mode_mha_with_dropout_is_flagged():
    mha = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True).train()
    x = torch.randn(1, 3, 16)
    with pytest.warns(attnhooks.FaithfulnessWarning, match="dropout"), attnhooks.capture(mha) as cap:
        mha(x, x, x)
    assert cap.records[0].dropout == 0.5
    with pytest.raises(attnhooks.DropoutError, match=r"model\.eval"), attnhooks.capture(mha, dropout="refuse"):
        mha(x, x, x)


def test_verify_reports_a_record_that_does_not_reproduce_the_kernel():
    """The check is real: a module that declares the wrong mask is caught by attn @ v vs out."""

    class Mislabelled(nn.Module):
        def forward(self, q, k, v):
            with torch._C.DisableTorchFunction():
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            attnhooks.emit(self, q=q, k=k, v=v, out=out)  # forgot is_causal=True
            return out

    m, q = Mislabelled(), torch.randn(1, 2, 6, 4)
    with pytest.warns(attnhooks.FaithfulnessWarning, match="does not reproduce"), attnhooks.capture(m, verify=6) as cap:
        m(q, q, q)
    assert cap.records[0].verify_error > 0.05


@pytest.mark.parametrize("training", [False, True])
def test_mha_lse_is_the_flash_kernels_on_the_calls_own_inputs(training):
    """Without need_weights (the Transformer layers' call) the CPU flash kernel gives the lse, run on
    the q, k, v and mask the call hands SDPA; with need_weights it is computed from the scores."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True, dropout=0.0).train(training)
    x = torch.randn(2, 7, 32, requires_grad=training)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -3:] = True
    records = {}
    for need_weights in (False, True):
        with torch.set_grad_enabled(training), attnhooks.capture(mha, record=("q", "k", "lse", "attn")) as cap:
            out = mha(x, x, x, need_weights=need_weights, key_padding_mask=padding)[0]
            if training:
                out.sum().backward()
        records[need_weights] = cap.records[0]
    fast, slow = records[False], records[True]
    assert torch.equal(fast.q, slow.q) and torch.equal(fast.k, slow.k)
    scores = fast.q @ fast.k.transpose(-1, -2) * fast.scale + fast.mask.additive(2, 7, 7)
    assert torch.allclose(fast.lse, torch.logsumexp(scores, -1), atol=1e-5)
    assert torch.allclose(fast.lse, slow.lse, atol=1e-5)
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with torch.no_grad():
        _, lse = kernel(fast.q, fast.k, torch.randn(2, 4, 7, 8), 0.0, False, attn_mask=fast.mask.additive(2, 7, 7))
    assert torch.equal(fast.lse, lse), "the kernel's own lse, bit for bit"


def test_mha_without_weights_records_its_own_sdpa_call_and_falls_back_when_it_makes_none(monkeypatch):
    from attnhooks.capturing.intercept import mha as intercept

    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 6, 32)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, -2:] = True
    with torch.no_grad():
        ref = _reference(layer.self_attn, x, x, x, key_padding_mask=padding)
    runs = {}
    real = intercept._project
    for name, body in (("spy", intercept._BODY), ("no sdpa call", nn.functional.multi_head_attention_forward)):
        monkeypatch.setattr(intercept, "_BODY", body)
        rebuilt = []
        monkeypatch.setattr(intercept, "_project", lambda *a, seen=rebuilt: seen.append(1) or real(*a))
        with torch.no_grad(), attnhooks.capture(layer, record=("q", "k", "lse", "attn"), verify=True) as cap:
            out = layer(x, src_key_padding_mask=padding)
        assert torch.allclose(out, layer(x, src_key_padding_mask=padding), atol=0), "the layer's output, unchanged"
        runs[name] = (cap.records[0], bool(rebuilt))
    (spied, spy_rebuilt), (fallback, fallback_rebuilt) = runs["spy"], runs["no sdpa call"]
    assert not spy_rebuilt and fallback_rebuilt, "q and k come from the SDPA call, not a second projection"
    for rec in (spied, fallback):
        assert rec.source == "mha" and rec.verify_error < 1e-5
        assert float((rec.attn - ref).abs().max()) <= 1e-5
        assert rec.mask.key_valid is not None and not rec.mask.key_valid[0, -1]
    assert torch.equal(spied.q, fallback.q) and torch.equal(spied.k, fallback.k)
    assert torch.equal(spied.lse, fallback.lse)
