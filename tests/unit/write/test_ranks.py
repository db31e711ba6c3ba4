"""Rank sets (:mod:`attnhooks.backends.subtree`) written in one process: torch.distributed's answer is faked,
except in the last test, which joins a real gloo process group of one."""

from __future__ import annotations

import importlib
import os
import socket
import uuid

import fsspec
import numpy as np
import pytest
import torch
import torch.distributed as dist

import attnhooks
from attnhooks.backends.memory import MemoryBackend
from attnhooks.capturing.distributed import RankInfo

CAPTURE = importlib.import_module("attnhooks.capturing.session")
STEPS = {0: 3, 1: 2}  # steps each rank writes


@pytest.fixture
def as_rank(monkeypatch):
    """``as_rank(r)``: from now on, captures believe they are rank r of 2."""

    def set_rank(rank: int, world: int = 2) -> None:
        monkeypatch.setattr(CAPTURE, "current", lambda require=False: RankInfo(rank, world))

    return set_rank


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()


@pytest.fixture(params=["memory", "zarr", "fsspec"])
def location(request, tmp_path):
    """A rank set's location: in-process memory, a local Zarr directory, Zarr on fsspec's memory."""
    if request.param == "zarr":
        yield str(tmp_path / "set.zarr")
    elif request.param == "fsspec":
        folder = f"test-ranks-{uuid.uuid4().hex}"
        yield f"memory://{folder}/set.zarr"
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{folder}"):
            fs.rm(f"/{folder}", recursive=True)
    else:
        loc = f"memory://test-ranks-{uuid.uuid4().hex}"
        yield loc
        MemoryBackend.delete(loc)


def _inputs(rank: int, step: int) -> torch.Tensor:
    return torch.randn(2, 5 + rank, 16, generator=torch.Generator().manual_seed(17 * rank + step))


def _write(model, location, as_rank, rank, steps=None, **options):
    as_rank(rank)
    with attnhooks.capture(model, store=location, keep=True, **options) as cap, torch.no_grad():
        for step in range(STEPS[rank] if steps is None else steps):
            model(_inputs(rank, step))
    return cap.records


def test_each_rank_writes_its_own_group_and_reads_back_exactly(model, location, as_rank):
    records = {rank: _write(model, location, as_rank, rank) for rank in (1, 0)}
    with attnhooks.open_store(location) as st:
        assert st.rank_set and st.ranks == [0, 1] and st.world_size == 2
        assert st.default_rank == 0 and st.steps == [0, 1, 2], "plain calls read the lowest rank"
        assert st.rank(1).steps == [0, 1] and st.rank(1).default_rank == 1
        assert st.rank(1).rank(0) is st, "a rank's store reaches its siblings"
        assert "rank 1 of [0, 1]" in repr(st.rank(1))
        for rank, recs in records.items():
            assert st.rank(rank).metadata["rank"] == rank and st.rank(rank).metadata["world_size"] == 2
            for rec in recs:
                for sample in range(2):
                    got = st.attention("self_attn", rec.step, sample, rank=rank)
                    np.testing.assert_array_equal(got, rec.attn[sample].numpy())
                    np.testing.assert_array_equal(st.q("self_attn", rec.step, sample, rank=rank), rec.q[sample])
        assert st.info("self_attn", 0, rank=1)["q_len"] == 6 and st.info("self_attn", 0)["q_len"] == 5
        assert st.calls("self_attn", 1, rank=1) == 1
        with pytest.raises(attnhooks.NotInStoreError, match=r"no step 2"):
            st.attention("self_attn", 2, rank=1)
        with pytest.raises(attnhooks.NotInStoreError, match=r"no rank 5; its ranks are \[0, 1\]"):
            st.attention("self_attn", 0, rank=5)


def test_a_plain_store_is_rank_zero(model, tmp_path):
    location = str(tmp_path / "plain.zarr")
    with attnhooks.capture(model, store=location) as cap, torch.no_grad():
        model(_inputs(0, 0))
    assert cap.rank is None
    with attnhooks.open_store(location) as st:
        assert not st.rank_set and st.ranks == [0] and st.world_size == 1
        assert st.rank(0) is st
        np.testing.assert_array_equal(st.attention("self_attn", rank=0), st.attention("self_attn"))
        with pytest.raises(attnhooks.NotInStoreError, match="no rank 1"):
            st.attention("self_attn", rank=1)


def test_modes_apply_to_the_ranks_own_group(model, location, as_rank):
    _write(model, location, as_rank, 0)
    _write(model, location, as_rank, 1)
    with pytest.raises(attnhooks.StoreExistsError, match="already holds rank 1"):
        _write(model, location, as_rank, 1)
    _write(model, location, as_rank, 1, steps=4, mode="overwrite")
    _write(model, location, as_rank, 0, steps=1, mode="append")
    with attnhooks.open_store(location) as st:
        assert st.rank(1).steps == [0, 1, 2, 3], "rank 1 replaced"
        assert st.rank(0).steps == [0, 1, 2, 3], "rank 0 continued its step ids"
        assert st.rank(0).status == st.rank(1).status == "complete"
    with pytest.raises(attnhooks.NotAStoreError, match="no rank 2 to append to"):
        _write(model, location, as_rank, 2, mode="append")


def test_ranks_that_do_not_capture_install_nothing(model, location, as_rank):
    as_rank(1)
    with attnhooks.capture(model, store=location, ranks=[0]) as cap:
        assert not model._forward_hooks and not model._forward_pre_hooks, "no hook on a rank that does not capture"
        with torch.no_grad():
            model(_inputs(1, 0))
    assert cap.records == [] and cap.writer is None
    with pytest.raises(attnhooks.NotAStoreError):
        attnhooks.open_store(location)  # nothing was created
    _write(model, location, as_rank, 0, ranks=[0])
    with attnhooks.open_store(location) as st:
        assert st.ranks == [0]


def test_refusals_say_what_to_do_instead(model, tmp_path, as_rank):
    as_rank(1)
    with pytest.raises(attnhooks.StoreOptionError, match=r"one writer.*\.zarr.*distributed=False"):
        attnhooks.capture(model, store=str(tmp_path / "run.h5")).__enter__()
    assert not model._forward_hooks
    h5 = str(tmp_path / "rank1.h5")
    _write(model, h5, as_rank, 1, distributed=False)
    with attnhooks.open_store(h5) as st:
        assert not st.rank_set and st.ranks == [1] and st.world_size == 2, "a plain store keeps its rank"
        assert st.attention("self_attn", rank=1).shape == (4, 6, 6)
    plain = str(tmp_path / "plain.zarr")
    _write(model, plain, as_rank, 0, distributed=False)
    with pytest.raises(attnhooks.StoreExistsError, match="single-process store"):
        _write(model, plain, as_rank, 0)
    for bad in ({"distributed": "yes"}, {"ranks": [-1]}, {"ranks": []}, {"ranks": ["0"]}):
        with pytest.raises(attnhooks.RecordOptionError):
            attnhooks.capture(model, **bad)


def test_distributed_true_needs_a_process_group(model, tmp_path):
    assert not dist.is_initialized()
    with pytest.raises(attnhooks.StoreOptionError, match="init_process_group"):
        attnhooks.capture(model, store=str(tmp_path / "x.zarr"), distributed=True).__enter__()
    assert not model._forward_hooks


def test_a_group_without_its_schema_is_not_a_rank_yet(model, location, as_rank):
    _write(model, location, as_rank, 0)
    backend = attnhooks.open_store(location, "r+").backend.root  # the set's root backend
    backend.create_group("rank3")  # a rank caught between creating its group and its attributes
    with attnhooks.open_store(location) as st:
        assert st.ranks == [0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_real_process_group_makes_a_rank_set(model, tmp_path, monkeypatch):
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        location = str(tmp_path / "one.zarr")
        with attnhooks.capture(model, store=location) as cap, torch.no_grad():
            model(_inputs(0, 0))
        assert cap.rank == RankInfo(0, 1)
    finally:
        dist.destroy_process_group()
    with attnhooks.open_store(location) as st:
        assert st.rank_set and st.ranks == [0] and st.world_size == 1 and st.steps == [0]


def test_the_command_line_reads_any_rank(model, tmp_path, as_rank, capsys):
    from attnhooks.cli.main import main

    location = str(tmp_path / "set.zarr")
    for rank in (0, 1):
        _write(model, location, as_rank, rank)
    assert main(["info", location]) == 0
    assert "ranks:   2 of 2: 0 (complete, 3 steps), 1 (complete, 2 steps)" in capsys.readouterr().out
    figure = tmp_path / "rank1.png"
    assert main(["view", location, "heatmap", "--rank", "1", "--step", "1", "-o", str(figure)]) == 0
    assert figure.stat().st_size > 1000
    assert main(["analyze", location, "--rank", "1", "-o", str(tmp_path / "m.json")]) == 0
    capsys.readouterr()
    assert main(["view", location, "heatmap", "--rank", "4", "-o", str(figure)]) == 1
    assert "no rank 4; its ranks are [0, 1]" in capsys.readouterr().err
