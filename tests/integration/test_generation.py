"""KV-cache generation: every decode row captured, only new keys kept, rows equal to eager."""

from __future__ import annotations

import torch

import attnhooks
import attnhooks.attention.kernels
from tests import models


def _generate(model, x, mask, n=16, **capture_kw):
    with torch.no_grad(), attnhooks.capture(model, **capture_kw) as cap:
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return cap, out


def test_greedy_generation_rows_equal_eager_attention_of_the_full_sequence():
    model, eager = models.same_weights(models.llama, "eager")
    x, mask = models.ids(batch=2, length=6, pad_last=2)
    cap, out = _generate(model, x, mask)
    assert out.shape == (2, 22)
    assert {r.step for r in cap.records} == {0}, "a generate() call is one step"
    assert {r.call for r in cap.records} == {0}, "decode calls continue the prefill call"
    full_mask = torch.cat([mask, torch.ones(2, out.shape[1] - 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = eager(input_ids=out, attention_mask=full_mask, output_attentions=True).attentions
    for layer in range(2):
        rec = cap.assemble(f"model.layers.{layer}.self_attn")
        n = rec.attn.shape[2]
        assert n == 6 + 15  # the last generated token is never fed back
        expected = ref[layer][:, :, :n, :n]
        assert float((rec.attn[0] - expected[0]).abs().max()) <= 1e-5
        assert float((rec.attn[1, :, 2:] - expected[1, :, 2:]).abs().max()) <= 1e-5  # valid rows
        assert rec.k.shape == (2, 2, n, 16) and rec.q.shape == (2, 4, n, 16)


def test_decode_records_keep_only_new_rows():
    model = models.llama()
    x, mask = models.ids(batch=1, length=5)
    cap, _ = _generate(model, x, mask, n=8)
    layer0 = [r for r in cap.records if r.module == "model.layers.0.self_attn"]
    prefill, *decode = sorted(layer0, key=lambda r: r.q_offset)
    assert prefill.q.shape[2] == 5 and prefill.k.shape[2] == 5
    for i, rec in enumerate(decode):
        assert rec.q.shape[2] == 1 and rec.k.shape[2] == 1, "O(N·d): one new query and key row"
        assert rec.q_offset == 5 + i and rec.k_offset == 5 + i and rec.k_len == 6 + i
    total_k_rows = sum(r.k.shape[2] for r in layer0)
    assert total_k_rows == 5 + len(decode)


def test_q_k_only_generation_rebuilds_eager_attention():
    model, eager = models.same_weights(models.llama, "eager")
    x, mask = models.ids(batch=1, length=4)
    cap, out = _generate(model, x, mask, n=5, record=("q", "k"))
    rec = cap.assemble("model.layers.1.self_attn")
    assert rec.attn is None and rec.q.shape[2] == 8 and rec.k.shape[2] == 8
    p, _ = attnhooks.attention.kernels.attention_probs(rec.q, rec.k, rec.scale, attnhooks.MaskSpec(causal=True))
    with torch.no_grad():
        ref = eager(input_ids=out[:, :8], output_attentions=True).attentions[1]
    assert float((p - ref).abs().max()) <= 1e-5


def test_t5_generate_is_one_step_with_encoder_and_cross_attention():
    model = models.t5()
    x, mask = models.ids(batch=1, length=7)
    with torch.no_grad(), attnhooks.capture(model) as cap:
        model.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert {r.step for r in cap.records} == {0}
    cross = [r for r in cap.records if r.module == "decoder.block.0.layer.1.EncDecAttention"]
    assert all(r.kind == "cross" for r in cross)
    assert cross[0].k.shape[2] == 7 and all(r.k.shape[2] == 0 for r in cross[1:]), "encoder keys stored once"
    full = cap.assemble("decoder.block.0.layer.1.EncDecAttention")
    assert full.attn.shape[2:] == (len(cross), 7)
    assert torch.allclose(full.attn.sum(-1), torch.ones(()))


def test_hand_written_decode_loop_continues_one_step():
    """model(..., past_key_values=cache) in a loop: continuation forwards stay in the prefill's step."""
    from transformers import DynamicCache

    model = models.llama()
    x, _ = models.ids(batch=1, length=5)
    with torch.no_grad(), attnhooks.capture(model, record=("q", "k")) as cap:
        cache = DynamicCache()
        out = model(input_ids=x, past_key_values=cache, use_cache=True)
        for _ in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        model(input_ids=x)  # a new prompt: a new step
    layer0 = [r for r in cap.records if r.module == "model.layers.0.self_attn"]
    assert [(r.step, r.call, r.q_offset, r.k.shape[2]) for r in layer0] == [
        (0, 0, 0, 5),
        (0, 0, 5, 1),
        (0, 0, 6, 1),
        (0, 0, 7, 1),
        (1, 0, 0, 5),
    ]
