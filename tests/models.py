"""Small random-initialised third-party models for tests (no downloads)."""

from __future__ import annotations

import warnings

import torch


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def llama(impl: str = "sdpa", heads: int = 4, kv_heads: int = 2, layers: int = 2, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        attn_implementation=impl,
        **kw,
    )
    return LlamaForCausalLM(cfg).eval()


# the small sliding-window decoders (2 layers, 4 heads over 2 KV heads of 16)
_WINDOWED = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
}


def mistral(impl: str = "sdpa", window: int = 4):
    """A Llama-like model with a sliding window: its cache rolls during generation."""
    from transformers import MistralConfig, MistralForCausalLM

    _quiet()
    cfg = MistralConfig(**_WINDOWED, sliding_window=window, attn_implementation=impl)
    return MistralForCausalLM(cfg).eval()


def gemma2(impl: str = "eager", window: int = 4):
    """Sliding-window and full layers alternating (a mixed cache), with logit soft-capping (no SDPA
    path in transformers: captured on its eager path)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    _quiet()
    cfg = Gemma2Config(**_WINDOWED, sliding_window=window, attn_implementation=impl)
    return Gemma2ForCausalLM(cfg).eval()


def bert(impl: str = "sdpa"):
    from transformers import BertConfig, BertModel

    _quiet()
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        attn_implementation=impl,
    )
    return BertModel(cfg).eval()


def gpt2(impl: str = "sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet()
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_implementation=impl)
    return GPT2LMHeadModel(cfg).eval()


def t5(impl: str | None = None):
    """T5 on its SDPA path where transformers has one (5.x), else (4.x) on its eager path."""
    from transformers import T5Config, T5ForConditionalGeneration

    _quiet()
    impl = impl or ("sdpa" if getattr(T5ForConditionalGeneration, "_supports_sdpa", False) else "eager")
    cfg = T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        attn_implementation=impl,
    )
    return T5ForConditionalGeneration(cfg).eval()


def vit(impl: str = "sdpa"):
    from transformers import ViTConfig, ViTModel

    _quiet()
    cfg = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        attn_implementation=impl,
    )
    return ViTModel(cfg).eval()


def same_weights(make, impl: str):
    """Two copies of a model with identical weights: the default (sdpa) and ``impl``."""
    a = make()
    b = make(impl)
    b.load_state_dict(a.state_dict())
    return a, b


def ids(batch: int = 2, length: int = 12, vocab: int = 128, pad_last: int = 0):
    """Token ids and an attention mask; the last sample has ``pad_last`` padded (left) positions."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_last:
        mask[-1, :pad_last] = 0
        x[-1, :pad_last] = 0
    return x, mask


def unet():
    """A small randomly initialised diffusers UNet2DConditionModel: self and cross attention."""
    import warnings

    from diffusers import UNet2DConditionModel

    warnings.filterwarnings("ignore", module="diffusers")
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


# the small encoder-decoders (2 + 2 layers, 4 heads, 64 wide)
_SEQ2SEQ = {
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
}


def bart(impl: str = "sdpa"):
    from transformers import BartConfig, BartForConditionalGeneration

    _quiet()
    cfg = BartConfig(
        vocab_size=128,
        **_SEQ2SEQ,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        attn_implementation=impl,
    )
    return BartForConditionalGeneration(cfg).eval()


def whisper(impl: str = "sdpa"):
    """A tiny Whisper: 8 mel bins, 32 input frames (16 encoder positions)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    _quiet()
    cfg = WhisperConfig(
        vocab_size=128,
        num_mel_bins=8,
        **_SEQ2SEQ,
        max_source_positions=16,
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        attn_implementation=impl,
    )
    return WhisperForConditionalGeneration(cfg).eval()


def tiny_encoder():
    """One small encoder layer (d=8, 2 heads, seed 0) for store tests that need a model, not its size."""
    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()


def encoder_step(layer) -> None:
    """One forward of ``tiny_encoder()`` on a random ``[1, 3, 8]`` input."""
    with torch.no_grad():
        layer(torch.randn(1, 3, 8))
