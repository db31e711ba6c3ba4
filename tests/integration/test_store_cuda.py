"""The CUDA staging path: pinned host buffers filled on a side stream. Skipped without a GPU."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import attnhooks
from attnhooks.capturing.staging import Stager
from tests import models

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_staged_copies_are_pinned_and_complete_after_the_event():
    stager = Stager()
    src = torch.randn(4, 8, 512, 64, device="cuda")
    host = stager.stage(src)
    assert host.device.type == "cpu" and host.is_pinned()
    ready = stager.seal()
    assert ready is not None
    ready.synchronize()
    assert torch.equal(host, src.cpu())


def test_staging_runs_on_a_side_stream_while_the_model_stream_keeps_going():
    stager = Stager()
    src = torch.randn(64, 1024, 1024, device="cuda")  # 256 MiB
    torch.cuda.synchronize()
    start = time.perf_counter()
    stager.stage(src)
    enqueue = time.perf_counter() - start
    stager.synchronize()
    total = time.perf_counter() - start
    assert enqueue < total / 4, f"staging blocked the caller for {enqueue:.4f}s of {total:.4f}s"


def test_cuda_capture_to_store_equals_cpu_capture(tmp_path):
    model = models.llama().cuda()
    x, mask = models.ids(batch=2, length=12, pad_last=3)
    path = tmp_path / "gpu.zarr"
    with torch.no_grad(), attnhooks.capture(model, store=path, keep=True) as cap:
        model(input_ids=x.cuda(), attention_mask=mask.cuda())
    st = attnhooks.open_store(path)
    for rec in cap.records:
        assert rec.q.device.type == "cpu"
        for b in range(2):
            assert np.array_equal(st.q(rec.module, 0, b), rec.q[b].numpy())
            assert np.array_equal(st.attention(rec.module, 0, b), rec.attn[b].numpy())
    cpu = models.llama()
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    with torch.no_grad(), attnhooks.capture(cpu) as ref:
        cpu(input_ids=x, attention_mask=mask)
    for a, b in zip(cap.records, ref.records):
        assert float((a.attn - b.attn).abs().max()) < 1e-4
