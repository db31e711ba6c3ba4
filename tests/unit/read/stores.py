"""Tiny ``torch.nn`` models for the reader's unit tests, and what the fixtures capture from them."""

from __future__ import annotations

import torch

LAYERS = 11  # enough for "10.self_attn" to sort after "9.self_attn"
STEPS = (5, 9)  # user step ids, in the order they are written


def layers(n: int = LAYERS) -> torch.nn.Sequential:
    """``n`` tiny encoder layers: modules ``0.self_attn`` .. ``{n-1}.self_attn``, 2 heads of 4."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *(torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True) for _ in range(n))
    ).eval()


def inputs(seed: int, length: int = 3) -> torch.Tensor:
    """A batch of 2 sequences of ``length`` tokens (d_model 8)."""
    return torch.randn(2, length, 8, generator=torch.Generator().manual_seed(seed))
