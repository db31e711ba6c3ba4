"""Captured attention equals the model's own eager attention, on transformers model code.

Each model runs on its SDPA path under capture; the reference is the same weights with
``attn_implementation="eager"`` and ``output_attentions=True``. Padded batches compare valid
query rows (padded query rows have no defined attention).
"""

from __future__ import annotations

import pytest
import torch

import attnhooks
from tests import models

TOL = 1e-5


def _compare(records, reference, valid_rows=None):
    assert len(records) == len(reference)
    for rec, ref in zip(records, reference):
        assert rec.attn is not None and rec.attn.dtype == torch.float32
        assert rec.attn.shape == ref.shape, (rec.module, rec.attn.shape, ref.shape)
        diff = (rec.attn - ref).abs()
        if valid_rows is not None:
            diff = diff[valid_rows.expand_as(diff)]
        assert float(diff.max()) <= TOL, (rec.module, float(diff.max()))


def _run(make, inputs, pad_rows=None):
    sdpa, eager = models.same_weights(make, "eager")
    with torch.no_grad():
        reference = eager(**inputs, output_attentions=True)
        with attnhooks.capture(sdpa, verify=True) as cap:
            sdpa(**inputs)
    path = "eager" if sdpa.config._attn_implementation == "eager" else "sdpa"  # T5 on 4.x: no SDPA path
    for rec in cap.records:
        assert rec.source == path
        assert path == "eager" or (rec.verify_error is not None and rec.verify_error < 1e-4)
    return cap, reference


@pytest.mark.parametrize("pad", [0, 4])
def test_bert_matches_eager(pad):
    x, mask = models.ids(pad_last=pad)
    cap, ref = _run(models.bert, {"input_ids": x, "attention_mask": mask})
    assert [r.module for r in cap.records] == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    # BERT has no causal mask: padded keys are masked for every query, so every row is valid.
    _compare(cap.records, ref.attentions)
    assert all(r.kind == "self" and not r.mask.causal for r in cap.records)


@pytest.mark.parametrize("pad", [0, 4])
def test_gpt2_matches_eager(pad):
    x, mask = models.ids(pad_last=pad)
    cap, ref = _run(models.gpt2, {"input_ids": x, "attention_mask": mask})
    assert [r.module for r in cap.records] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    _compare(cap.records, ref.attentions, valid_rows=mask.bool()[:, None, :, None])


@pytest.mark.parametrize("pad", [0, 5])
def test_llama_gqa_matches_eager(pad):
    x, mask = models.ids(pad_last=pad)
    cap, ref = _run(models.llama, {"input_ids": x, "attention_mask": mask})
    _compare(cap.records, ref.attentions, valid_rows=mask.bool()[:, None, :, None])
    for rec in cap.records:
        assert rec.q.shape == (2, 4, 12, 16)
        assert rec.k.shape == (2, 2, 12, 16), "K must stay at the KV-head count"
        assert rec.mask.dense is None, "causal + padding masks are stored compactly"


def test_t5_encoder_decoder_and_cross_match_eager():
    x, mask = models.ids(pad_last=3)
    dec = x[:, :5]
    cap, ref = _run(models.t5, {"input_ids": x, "attention_mask": mask, "decoder_input_ids": dec})
    by_kind = {}
    for rec in cap.records:
        by_kind.setdefault((rec.module.split(".")[0], rec.kind), []).append(rec)
    _compare(by_kind[("encoder", "self")], ref.encoder_attentions)
    _compare(by_kind[("decoder", "self")], ref.decoder_attentions)
    _compare(by_kind[("decoder", "cross")], ref.cross_attentions)
    assert by_kind[("decoder", "cross")][0].module == "decoder.block.0.layer.1.EncDecAttention"
    # T5's relative position bias rides in the mask: it must be kept, exactly.
    enc0 = by_kind[("encoder", "self")][0]
    assert enc0.mask.dense is not None and enc0.mask.dense.dtype.is_floating_point


def test_vit_matches_eager():
    pixels = torch.randn(2, 3, 32, 32)
    cap, ref = _run(models.vit, {"pixel_values": pixels})
    _compare(cap.records, ref.attentions)
    assert cap.records[0].attn.shape == (2, 4, 17, 17)  # 16 patches + CLS


@pytest.mark.parametrize("make", [models.bert, models.gpt2, models.llama, models.t5])
def test_eager_models_are_captured_exactly(make):
    """Eager attention is read from the model's own softmax: identical to output_attentions."""
    model = make("eager")
    x, mask = models.ids(pad_last=3)
    inputs = {"input_ids": x, "attention_mask": mask}
    if make is models.t5:
        inputs["decoder_input_ids"] = x[:, :4]
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        with attnhooks.capture(model) as cap:
            model(**inputs)
    ref = out.attentions if make is not models.t5 else out.encoder_attentions
    got = [r for r in cap.records if r.module.split(".")[0] != "decoder"]
    assert all(r.source == "eager" for r in cap.records)
    for rec, expected in zip(got, ref):
        assert torch.equal(rec.attn, expected.float())


def test_registry_kernel_invisible_to_the_mode_is_captured_from_its_arguments():
    """A flash-style implementation (no visible SDPA/softmax) registered with its mask function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def opaque_kernel(module, query, key, value, attention_mask, **kwargs):
        with torch._C.DisableTorchFunction():  # like a C++/CUDA kernel: nothing visible inside
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("opaque_test", opaque_kernel)
    AttentionMaskInterface.register("opaque_test", sdpa_mask)
    try:
        _check_llama_implementation("opaque_test")
    finally:
        del AttentionInterface._global_mapping["opaque_test"]
        del AttentionMaskInterface._global_mapping["opaque_test"]


def test_outputs_unchanged_by_capture():
    model = models.llama()
    x, mask = models.ids(pad_last=3)
    with torch.no_grad():
        bare = model(input_ids=x, attention_mask=mask).logits
        with attnhooks.capture(model):
            captured = model(input_ids=x, attention_mask=mask).logits
    assert torch.equal(bare, captured)


@pytest.mark.slow
def test_flex_attention_configuration_is_captured():
    """flex_attention runs a higher-order op the mode cannot see: the registry wrapper captures it,
    rebuilding the element mask from the BlockMask."""
    _check_llama_implementation("flex_attention")


def _check_llama_implementation(impl):
    """A padded Llama batch on ``impl`` is captured through the registry, equal to eager attention."""
    model, eager = models.same_weights(models.llama, "eager")
    model.set_attn_implementation(impl)
    x, mask = models.ids(pad_last=4)
    with torch.no_grad():
        ref = eager(input_ids=x, attention_mask=mask, output_attentions=True).attentions
        with attnhooks.capture(model, verify=True) as cap:
            model(input_ids=x, attention_mask=mask)
    assert [r.source for r in cap.records] == [f"hf:{impl}"] * 2
    assert all(r.verify_error < 1e-4 for r in cap.records)
    _compare(cap.records, ref, valid_rows=mask.bool()[:, None, :, None])
