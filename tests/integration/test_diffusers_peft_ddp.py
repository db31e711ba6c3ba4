"""diffusers UNet (self and cross attention), PEFT LoRA and DDP wrappers."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

import attnhooks
from tests import models


def test_unet_self_and_cross_attention_match_the_eager_processor():
    from diffusers.models.attention_processor import AttnProcessor

    unet = models.unet()
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad(), attnhooks.capture(unet, verify=True) as sdpa_cap:
        unet(x, 10, encoder_hidden_states=text)
    unet.set_attn_processor(AttnProcessor())  # eager: baddbmm + softmax, heads folded into batch
    with torch.no_grad(), attnhooks.capture(unet) as eager_cap:
        unet(x, 10, encoder_hidden_states=text)
    assert len(sdpa_cap.records) == len(eager_cap.records) == 8
    for fast, slow in zip(sdpa_cap.records, eager_cap.records):
        assert fast.module == slow.module and slow.source == "eager"
        assert fast.attn.shape == slow.attn.shape, "eager [batch*heads] scores are unfolded to heads"
        assert float((fast.attn - slow.attn).abs().max()) <= 1e-5
        assert fast.verify_error < 1e-4
    kinds = {r.module.rsplit(".", 1)[-1]: r.kind for r in sdpa_cap.records}
    assert kinds == {"attn1": "self", "attn2": "cross"}
    cross = next(r for r in sdpa_cap.records if r.kind == "cross")
    assert cross.attn.shape == (2, 8, 256, 7), "token -> 16x16 latent map per head"


def test_unet_called_per_timestep_in_one_step_stores_each_call():
    unet = models.unet()
    x, text = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad(), attnhooks.capture(unet, record=("q", "k")) as cap:
        cap.step = 0
        for t in (900, 500, 100):
            x = unet(x, t, encoder_hidden_states=text).sample
    name = "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert [r.call for r in cap.records if r.module == name] == [0, 1, 2]
    assert {r.step for r in cap.records} == {0}


def test_peft_lora_wrapped_llama_keeps_names_and_exactness():
    from peft import LoraConfig, get_peft_model

    base, eager = models.same_weights(models.llama, "eager")
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # make LoRA change the attention
    x, mask = models.ids(pad_last=3)
    with torch.no_grad(), attnhooks.capture(lora, modules="model.layers.*.self_attn", verify=True) as cap:
        lora(input_ids=x, attention_mask=mask)
    assert [r.module for r in cap.records] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(r.verify_error < 1e-4 for r in cap.records)
    # reference: the same LoRA weights merged into an eager copy
    merged = lora.merge_and_unload()
    eager.load_state_dict(merged.state_dict())
    with torch.no_grad():
        ref = eager(input_ids=x, attention_mask=mask, output_attentions=True).attentions
    valid = mask.bool()[:, None, :, None]
    for rec, expected in zip(cap.records, ref):
        assert float((rec.attn - expected).abs()[valid.expand_as(expected)].max()) <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapped_model_has_unwrapped_names(gloo_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = models.llama()
    ddp = DDP(model)
    x, _ = models.ids()
    with attnhooks.capture(ddp, modules=["model.layers.1.self_attn"]) as cap:
        ddp(input_ids=x).logits.sum().backward()
    assert [r.module for r in cap.records] == ["model.layers.1.self_attn"]
    with pytest.raises(attnhooks.ModuleSelectionError, match="did you mean"):
        attnhooks.capture(ddp, modules="module.model.layers.1.self_attn")


def test_fsdp_wrapped_models_have_the_models_own_names(gloo_group):
    """FSDP (both APIs) inserts ``_fsdp_wrapped_module`` segments or renames classes: the records
    still carry the model's own names and equal a capture of the unwrapped model."""
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    def encoder() -> torch.nn.TransformerEncoder:
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    x = torch.randn(2, 5, 16)
    reference = encoder()
    with attnhooks.capture(reference) as cap:
        reference(x)
    expected = {r.module: r.attn for r in cap.records}
    names = ["layers.0.self_attn", "layers.1.self_attn"]
    assert list(expected) == names

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's deprecation notice
        policy = ModuleWrapPolicy({torch.nn.TransformerEncoderLayer})
        fsdp1 = FullyShardedDataParallel(encoder(), auto_wrap_policy=policy, device_id=torch.device("cpu"))
    fsdp2 = encoder()
    for layer in fsdp2.layers:
        fully_shard(layer)
    fully_shard(fsdp2)
    for wrapped in (fsdp1, fsdp2):
        with attnhooks.capture(wrapped, modules="layers.*.self_attn") as cap:
            wrapped(x)
        assert [r.module for r in cap.records] == names
        for rec in cap.records:
            torch.testing.assert_close(rec.attn, expected[rec.module], atol=1e-6, rtol=0)
