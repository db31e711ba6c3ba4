"""Distributed capture: examples/train_ddp.py under torchrun (2 ranks, gloo, CPU) and a rank that crashes.

The example trains with DDP and captures every other step into one Zarr store. The test replays the
training in this process (each rank's batch on one model, gradients averaged as DDP does: each
rank's divided by the world size, then summed) and captures each rank's batch on its own: the store's
rank r must hold exactly that. The same run without capture must produce the same losses, to the bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnhooks

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_ddp.py"
WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS, EVERY, WORLD = 6, 2, 2
LR = 3e-3
MODULES = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(EXAMPLE)]
    cmd += ["--steps", str(STEPS), "--lr", str(LR), *args]
    done = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _losses(folder: Path) -> list[list[float]]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_ddp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The example under torchrun twice: capturing every other step, and not capturing."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = _torchrun(tmp, "--store", "run.zarr", "--every", str(EVERY), "--losses", "captured")
    _torchrun(tmp, "--every", "0", "--losses", "plain")
    return tmp, out.stdout


@pytest.fixture(scope="module")
def replay(example):
    """Each rank's captured records and losses, replayed in one process: ``{(rank, step): records}``,
    with one torch thread as each rank ran (the suite's thread count is put back afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _replay(example)
    finally:
        torch.set_num_threads(before)


def _replay(example):
    ids, vocab = example.corpus()
    model = example.build_model(len(vocab))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR)
    records, losses = {}, [[] for _ in range(WORLD)]
    for step in range(STEPS):
        grads = []
        for rank in range(WORLD):
            inputs, targets = example.batch(ids, step, rank)
            with attnhooks.capture(model, modules=MODULES) as cap:
                loss = example.loss_of(model, inputs, targets)
            if step % EVERY == 0:
                records[rank, step] = cap.records
            losses[rank].append(loss.item())
            grads.append(torch.autograd.grad(loss, params))
        for p, *per_rank in zip(params, *grads):
            p.grad = sum(g / WORLD for g in per_rank)
        optimizer.step()
    return records, losses


def test_the_store_holds_every_rank_with_the_models_own_names(runs):
    tmp, stdout = runs
    assert "ranks [0, 1]" in stdout
    with attnhooks.open_store(tmp / "run.zarr") as st:
        assert st.rank_set and st.ranks == [0, 1] and st.world_size == WORLD
        for rank in st.ranks:
            sub = st.rank(rank)
            assert sub.status == "complete"
            assert sub.steps == list(range(0, STEPS, EVERY))
            assert sub.modules == MODULES, "no 'module.' prefix from DDP"
            assert (sub.metadata["rank"], sub.metadata["world_size"]) == (rank, WORLD)
            ids, _ = st.tokens(step=2, rank=rank)
            assert len(ids) == 48


def test_each_rank_equals_a_single_process_capture_of_its_batch(runs, replay):
    tmp, _ = runs
    records, _ = replay
    with attnhooks.open_store(tmp / "run.zarr") as st:
        for (rank, step), recs in records.items():
            assert [r.module for r in recs] == MODULES
            for rec in recs:
                for sample in range(rec.attn.shape[0]):
                    stored = st.attention(rec.module, step, sample, rank=rank)
                    np.testing.assert_allclose(stored, rec.attn[sample].numpy(), atol=1e-5, rtol=0)
                    np.testing.assert_allclose(st.q(rec.module, step, sample, rank=rank), rec.q[sample], atol=1e-5)
                    np.testing.assert_allclose(st.k(rec.module, step, sample, rank=rank), rec.k[sample], atol=1e-5)
        for sample in range(8):
            a = st.attention(MODULES[0], 2, sample, rank=0)
            b = st.attention(MODULES[0], 2, sample, rank=1)
            assert np.abs(a - b).max() > 1e-2, "the ranks saw different batches"


def test_capture_leaves_the_training_losses_identical(runs, replay):
    tmp, _ = runs
    captured, plain = _losses(tmp / "captured"), _losses(tmp / "plain")
    assert captured == plain, "capture changed the training"
    assert captured[0][-1] < captured[0][0] - 0.5, "the example trains"
    _, replayed = replay
    np.testing.assert_allclose(np.array(captured), np.array(replayed), rtol=1e-5)


def test_a_dask_metric_over_all_ranks_and_steps_equals_the_in_memory_one(runs, replay):
    tmp, _ = runs
    records, _ = replay
    with attnhooks.open_store(tmp / "run.zarr") as st:
        ds = st.to_xarray(rows=16)
        assert ds.attention.dims[:2] == ("module", "rank")
        p = ds.attention.where(ds.attention > 0)
        entropy = -(p * np.log(p)).sum("key", min_count=1)
        lazy = entropy.mean(["rank", "step", "call", "sample", "query"])
        assert lazy.chunks is not None, "a dask computation"
        per_head = lazy.compute().values  # [module, head]
    for m, module in enumerate(MODULES):
        attn = torch.cat([rec.attn for recs in records.values() for rec in recs if rec.module == module])
        expected = -(attn * torch.log(attn.clamp_min(1e-30))).sum(-1).mean(dim=(0, 2))
        np.testing.assert_allclose(per_head[m], expected.numpy(), rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_rank_that_crashes_leaves_the_others_readable(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    store = tmp_path / "crash.zarr"
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(store), "5", *extra],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, extra in ((0, ()), (1, ("--die-at", "2")))
    ]
    outputs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 17], outputs
    assert outputs[1][0].split() == ["committed", "0", "committed", "1"]

    model = ddp_worker.build_model()
    with attnhooks.open_store(store) as st:
        assert st.ranks == [0, 1]
        whole, broken = st.rank(0), st.rank(1)
        assert (whole.status, whole.steps) == ("complete", [0, 1, 2, 3, 4])
        assert (broken.status, broken.steps) == ("writing", [0, 1]), "only the committed steps, still readable"
        for rank, step in ((0, 4), (1, 1)):
            with attnhooks.capture(model) as cap, torch.no_grad():
                model(ddp_worker.inputs(step, rank))
            expected = cap.records[0].attn
            for sample in range(2):
                got = st.attention("self_attn", step, sample, rank=rank)
                np.testing.assert_allclose(got, expected[sample].numpy(), atol=1e-6)
        with pytest.raises(attnhooks.NotInStoreError, match="no step 2"):
            st.attention("self_attn", 2, rank=1)
        n_keys = st.to_xarray(variables=("n_keys",)).n_keys.sel(module="self_attn", rank=1).values
        assert np.isnan(n_keys[2:]).all() and (n_keys[:2] == 12).all(), "steps the rank never committed are NaN"

    report = attnhooks.repair(store)
    assert (report.ranks[0].status, report.ranks[1].status) == ("complete", "recovered")
    assert report.status_before == "writing" and report.status == "recovered"
    with attnhooks.open_store(store) as st:
        assert st.rank(1).status == "recovered" and st.rank(1).steps == [0, 1]
