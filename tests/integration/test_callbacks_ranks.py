"""The callbacks' windows under torch.distributed (a gloo group of one process): every captured step
goes to this rank's group of a rank set, the later windows appending to the group the first created."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import attnhooks
from attnhooks.integrations.core import CallbackCore


def test_windows_write_a_rank_set_under_ddp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(16, 4, batch_first=True, dropout=0.0)
        model = torch.nn.parallel.DistributedDataParallel(layer)
        core = CallbackCore(2, store=tmp_path / "ranks.zarr", metrics=("entropy",))
        core.check(model)
        for step in range(5):
            if core.captures(step):
                core.train.open(model, step)
            model(torch.randn(2, 5, 16)).sum().backward()
            core.emit(core.train.close())
    finally:
        dist.destroy_process_group()
    st = attnhooks.open_store(tmp_path / "ranks.zarr")
    assert st.rank_set and st.ranks == [0] and st.steps == [0, 2, 4] and st.modules == ["self_attn"]
    assert [h.step for h in core.history] == [0, 2, 4]
    assert st.attention("self_attn", step=4, rank=0).shape == (4, 5, 5)
