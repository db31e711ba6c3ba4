"""A ``torch.compile``d model (CPU inductor) captured every N steps by the callbacks' window rule: the
captured steps run eagerly (their records equal the eager model's attention at those weights), the
other steps run the compiled graph, and capturing adds no graph and no recompilation."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnhooks
from attnhooks.integrations.core import CallbackCore

VOCAB, WIDTH, HEADS, SEQ = 32, 32, 4, 12


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.attn = SelfAttention()
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x + self.attn(x))


def eager_attention(weights: dict[str, torch.Tensor], ids: torch.Tensor) -> np.ndarray:
    """The eager model's probabilities ``[batch, heads, q, k]``, written out: softmax(q kᵀ / √d + causal)."""
    model = TinyLM()
    model.load_state_dict(weights)
    with torch.no_grad():
        q, k, _ = model.attn.qkv_heads(model.embed(ids))
        scores = q @ k.transpose(-1, -2) / (WIDTH // HEADS) ** 0.5
        n = ids.shape[1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1).numpy()


def run(compiled: nn.Module, model: nn.Module, core: CallbackCore | None) -> tuple[list[float], dict[int, tuple]]:
    """Six optimizer steps of 2 micro-batches; captured steps as the callbacks open and close them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.randint(0, VOCAB, (12, 4, SEQ), generator=torch.Generator().manual_seed(0))
    losses, seen = [], {}
    for step in range(6):
        if core is not None and core.captures(step):
            seen[step] = (copy.deepcopy(model.state_dict()), data[2 * step + 1])
            core.train.open(model, step)
        for micro in (2 * step, 2 * step + 1):
            logits = compiled(data[micro][:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), data[micro][:, 1:].flatten())
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        if core is not None:
            core.emit(core.train.close())
    return losses, seen


COMPILER = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.slow
@pytest.mark.skipif(COMPILER is None, reason="torch.compile's CPU inductor needs a C++ compiler (g++): none on PATH")
def test_compiled_model_captured_every_n_exactly_without_recompiling(tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = TinyLM()
    start = copy.deepcopy(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    run(torch.compile(model), model, None)
    bare = {"frames": dict(counters["frames"]), "graphs": counters["stats"]["unique_graphs"]}
    assert bare["graphs"] >= 1 and not counters["recompiles"]

    model.load_state_dict(start)
    core = CallbackCore(2, store=tmp_path / "c.zarr", record=("attn", "q", "k"), metrics=("entropy",))
    core.check(model)
    torch._dynamo.reset()
    counters.clear()
    _, seen = run(torch.compile(model), model, core)
    assert {"frames": dict(counters["frames"]), "graphs": counters["stats"]["unique_graphs"]} == bare
    assert not counters["recompiles"] and not counters["graph_break"]

    st = attnhooks.open_store(tmp_path / "c.zarr")
    assert st.steps == [0, 2, 4] and st.modules == ["attn"] and st.calls("attn", 2) == 2
    for step, (weights, ids) in seen.items():
        want = eager_attention(weights, ids[:, :-1])
        got = np.stack([st.attention("attn", step, sample, call=1) for sample in range(4)])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert [h.step for h in core.history] == [0, 2, 4]
