"""The capture API: selection, options, steps, lifecycle, training safety, emit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import attnhooks


class Attn(nn.Module):
    """A minimal SDPA attention block."""

    def __init__(self, dim=16, heads=2, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Net(nn.Module):
    def __init__(self, layers=2, checkpointed=False, dropout=0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Attn(dropout=dropout) for _ in range(layers))
        self.mlp = nn.Linear(16, 16)
        self.checkpointed = checkpointed

    def forward(self, x):
        for block in self.blocks:
            x = x + (checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x))
        return self.mlp(x)


def test_default_capture_records_every_call_in_order():
    net, x = Net(), torch.randn(2, 5, 16)
    with attnhooks.capture(net) as cap:
        net(x)
    assert [(r.module, r.call, r.step) for r in cap.records] == [("blocks.0", 0, 0), ("blocks.1", 0, 0)]
    rec = cap.records[0]
    assert rec.q.shape == rec.k.shape == (2, 2, 5, 8) and rec.attn.shape == (2, 2, 5, 5)
    assert rec.lse is None and not rec.q.requires_grad and rec.q.device.type == "cpu"


@pytest.mark.parametrize(
    "modules, expected",
    [
        ("blocks.1", ["blocks.1"]),
        ("blocks.*", ["blocks.0", "blocks.1"]),
        ("**.1", ["blocks.1"]),
        (["blocks.0"], ["blocks.0"]),
        (lambda name, m: isinstance(m, Attn) and name.endswith("1"), ["blocks.1"]),
    ],
)
def test_module_selection(modules, expected):
    net = Net()
    with attnhooks.capture(net, modules=modules) as cap:
        net(torch.randn(1, 4, 16))
    assert [r.module for r in cap.records] == expected


def test_unknown_module_lists_near_matches():
    with pytest.raises(attnhooks.ModuleSelectionError, match=r"did you mean .*'blocks\.1'") as err:
        attnhooks.capture(Net(), modules="blocks.1.atn")
    assert isinstance(err.value, LookupError) and isinstance(err.value, attnhooks.AttnHooksError)
    with pytest.raises(attnhooks.ModuleSelectionError, match="predicate selected none"):
        attnhooks.capture(Net(), modules=lambda n, m: False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"record": ("attn", "weights")}, "each entry must be one of"),
        ({"record": ()}, "at least one"),
        ({"every": 0}, "positive int"),
        ({"dropout": "ignore"}, "'flag' or 'refuse'"),
        ({"verify": -1}, "number of rows"),
    ],
)
def test_bad_options_are_value_errors(kwargs, match):
    with pytest.raises(attnhooks.RecordOptionError, match=match) as err:
        attnhooks.capture(Net(), **kwargs)
    assert isinstance(err.value, ValueError)


def test_selected_module_without_attention_warns():
    net = Net()
    with pytest.warns(attnhooks.AttnHooksWarning, match="made no attention call.*'mlp'"):
        with attnhooks.capture(net, modules=["blocks.0", "mlp"]):
            net(torch.randn(1, 3, 16))


def test_every_nth_step_and_manual_steps():
    net, x = Net(layers=1), torch.randn(1, 3, 16)
    with attnhooks.capture(net, every=3, record=("q",)) as cap:
        for _ in range(7):
            net(x)
    assert [r.step for r in cap.records] == [0, 3, 6]
    with attnhooks.capture(net, every=10, record=("q",)) as cap:
        for step in range(25):
            cap.step = step
            net(x)
            net(x)  # e.g. two micro-batches in one optimizer step
    assert [(r.step, r.call) for r in cap.records] == [(0, 0), (0, 1), (10, 0), (10, 1), (20, 0), (20, 1)]


def test_training_outputs_and_gradients_are_bit_identical():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 6, 16)

    def grads():
        net.zero_grad()
        out = net(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    bare_out, bare_grads = grads()
    with attnhooks.capture(net) as cap:
        cap_out, cap_grads = grads()
    assert torch.equal(bare_out, cap_out)
    assert all(torch.equal(a, b) for a, b in zip(bare_grads, cap_grads))
    assert all(not r.attn.requires_grad and r.attn.grad_fn is None for r in cap.records)


def test_gradient_checkpointing_does_not_duplicate_records():
    net = Net(checkpointed=True)
    with attnhooks.capture(net) as cap:
        net(torch.randn(1, 4, 16)).sum().backward()
    assert [r.module for r in cap.records] == ["blocks.0", "blocks.1"]


def test_autocast_bf16_on_cpu():
    net, x = Net(), torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bare = net(x)
        with attnhooks.capture(net, verify=True) as cap:
            captured = net(x)
    assert torch.equal(bare, captured)
    rec = cap.records[0]
    assert rec.q.dtype == torch.bfloat16 and rec.attn.dtype == torch.float32
    assert torch.allclose(rec.attn.sum(-1), torch.ones(()), atol=1e-5)
    assert rec.verify_error < 5e-2


def test_sdpa_dropout_is_flagged_or_refused():
    net = Net(layers=1, dropout=0.3).train()
    with pytest.warns(attnhooks.FaithfulnessWarning), attnhooks.capture(net) as cap:
        net(torch.randn(1, 3, 16))
    assert cap.records[0].dropout == 0.3
    with pytest.raises(attnhooks.DropoutError), attnhooks.capture(net, dropout="refuse"):
        net(torch.randn(1, 3, 16))


def test_eager_dropout_module_after_softmax_is_flagged():
    class EagerAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.2)

        def forward(self, q, k):
            return self.drop(torch.softmax(q @ k.transpose(-1, -2), dim=-1))

    m = EagerAttn().train()
    with pytest.warns(attnhooks.FaithfulnessWarning), attnhooks.capture(m) as cap:
        m(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert cap.records[0].dropout == 0.2


def test_no_state_survives_an_exception_in_the_forward():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()

        def forward(self, x):
            self.attn(x)
            raise RuntimeError("boom")

    m = Boom()
    with pytest.raises(RuntimeError, match="boom"), attnhooks.capture(m) as cap:
        m(torch.randn(1, 3, 16))
    assert len(cap.records) == 1
    assert not torch.overrides._get_current_function_mode_stack()
    # the leak guard (conftest) checks hooks and the fast-path switch after the test


def test_nested_and_consecutive_captures():
    net, x = Net(), torch.randn(1, 3, 16)
    with attnhooks.capture(net, record=("attn",)) as outer:
        net(x)
        with attnhooks.capture(net, modules="blocks.1", record=("q",)) as inner:
            net(x)
        net(x)
    assert [r.module for r in inner.records] == ["blocks.1"]
    assert len(outer.records) == 6 and [r.step for r in outer.records] == [0, 0, 1, 1, 2, 2]
    assert torch.equal(outer.records[3].attn, outer.records[5].attn)
    with attnhooks.capture(net) as again:
        net(x)
    assert len(again.records) == 2
    cap = attnhooks.capture(net)
    with cap, pytest.raises(attnhooks.CaptureStateError):
        cap.__enter__()


def test_custom_einsum_module_is_detected_and_emit_declares_opaque_ones():
    class EinsumAttn(nn.Module):
        def forward(self, q, k, v):
            s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
            return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    class Opaque(nn.Module):
        def forward(self, q, k, v):
            with torch._C.DisableTorchFunction():  # a fused kernel nobody can see into
                out = F.scaled_dot_product_attention(q, k, v)
            attnhooks.emit(self, q=q, k=k, v=v, out=out)
            return out

    q, k, v = (torch.randn(1, 5, 2, 4) for _ in range(3))
    e = EinsumAttn()
    with attnhooks.capture(e) as cap:
        e(q, k, v)
    rec = cap.records[0]
    assert rec.source == "eager" and rec.q.shape == (1, 2, 5, 4) and abs(rec.scale - 0.5) < 1e-6
    expected = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.5, -1)
    assert torch.allclose(rec.attn, expected, atol=1e-6)

    o, qh, kh, vh = Opaque(), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    with attnhooks.capture(o, verify=True) as cap:
        o(qh, kh, vh)
    assert cap.records[0].source == "emit" and cap.records[0].verify_error < 1e-5
    assert torch.allclose(cap.records[0].attn, expected, atol=1e-6)
    o(qh, kh, vh)  # with no capture, emit is a no-op


def test_lse_record_matches_logsumexp_of_scores():
    net, x = Net(layers=1), torch.randn(1, 4, 16)
    with attnhooks.capture(net, record=("lse", "q", "k")) as cap:
        net(x)
    rec = cap.records[0]
    assert rec.attn is None and rec.lse.shape == (1, 2, 4)
    scores = (rec.q.double() @ rec.k.double().transpose(-1, -2)) * rec.scale
    scores = scores.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(rec.lse.double(), torch.logsumexp(scores, -1), atol=1e-5)


def test_import_is_light():
    code = (
        "import sys, attnhooks, attnhooks.analysis; "
        "heavy = {'zarr', 'h5py', 'matplotlib', 'transformers', 'diffusers', 'xarray', 'dask', 'bertviz'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
