"""One writer per store (issue 18, cases 6 and 8): a lease beside the store, taken atomically at
creation or append and released at close, stale when its pid is gone on this host or its heartbeat
is older than the timeout. Two captures creating one store at once: one wins, the other gets
StoreExistsError; repair and a second writer refuse while a live writer holds the store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attnhooks
from attnhooks.backends.lease import lease_path, read_holder
from attnhooks.cli import main
from tests.integration import store_worker as worker
from tests.models import encoder_step, tiny_encoder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def layer():
    return tiny_encoder()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_second_writer_is_refused_while_the_first_is_open(tmp_path, layer, suffix):
    path = tmp_path / f"run{suffix}"
    with attnhooks.capture(layer, store=path):
        encoder_step(layer)
        assert read_holder(lease_path(str(path))).pid == os.getpid()
        with pytest.raises(attnhooks.StoreBusyError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            with attnhooks.capture(layer, store=path, mode="append"):
                pass
        with pytest.raises(attnhooks.StoreBusyError, match="while a writer holds it"):
            attnhooks.repair(path)
    assert not os.path.exists(lease_path(str(path))), "released at close"
    with attnhooks.capture(layer, store=path, mode="append"):
        encoder_step(layer)
    assert attnhooks.open_store(path).steps == [0, 1]


_RACER = """
import sys, time, torch, attnhooks
path, go = sys.argv[1], float(sys.argv[2])
torch.manual_seed(int(sys.argv[3]))
layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
time.sleep(max(0.0, go - time.time()))
try:
    with torch.no_grad(), attnhooks.capture(layer, store=path, every=1):
        for _ in range(int(sys.argv[3])):
            layer(torch.randn(1, 3, 8))
            time.sleep(0.05)
    print("won", flush=True)
except attnhooks.StoreExistsError as err:
    print("exists", err, flush=True)
"""


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_two_processes_creating_one_store_one_wins(tmp_path, suffix):
    path = str(tmp_path / f"race{suffix}")
    go = time.time() + 8.0  # both start their capture at this moment (torch imports take a few seconds)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, path, str(go), str(n)], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        for n in (3, 4)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["exists", "won"], outs
    winner = 3 if outs[0].startswith("won") else 4
    st = attnhooks.open_store(path)
    assert st.steps == list(range(winner)) and st.status == "complete", "the winner's steps are all there"


def _worker(path, hold):
    proc = subprocess.Popen(
        [sys.executable, str(Path(worker.__file__)), path, "--steps", "3", "--hold", hold],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    for line in proc.stdout:
        if line.startswith(hold):
            return proc
    raise AssertionError(f"the worker exited with {proc.wait()} before holding at {hold!r}")


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_repair_refuses_a_live_writer_and_takes_over_once_it_is_killed(tmp_path, suffix, capsys):
    path = str(tmp_path / f"live{suffix}")
    proc = _worker(path, "end")  # three steps committed, the capture still open
    try:
        with pytest.raises(attnhooks.StoreBusyError, match=f"pid {proc.pid}"):
            attnhooks.repair(path)
        assert main(["repair", path]) == 1
        assert "--force" in capsys.readouterr().err
        with pytest.raises(attnhooks.StoreBusyError):
            with attnhooks.capture(torch.nn.Identity(), store=path, mode="append"):
                pass
        with attnhooks.open_store(path) as st:
            assert st.steps == [0, 1, 2], "reading is never refused"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.path.exists(lease_path(path)), "a killed writer leaves its lease"
    report = attnhooks.repair(path)  # its pid is gone: the lease is stale at once
    assert report.removed[0] == f"lease live{suffix}.lease" and report.status == "recovered"
    assert not os.path.exists(lease_path(path))
    assert attnhooks.open_store(path).steps == [0, 1, 2]


def test_a_lease_of_another_host_is_taken_over_only_after_its_heartbeat_timed_out(tmp_path, layer, monkeypatch):
    monkeypatch.setenv("ATTNHOOKS_LEASE_TIMEOUT", "30")
    path = tmp_path / "run.zarr"
    with attnhooks.capture(layer, store=path):
        encoder_step(layer)
    lease = lease_path(str(path))
    Path(lease).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time(), "token": "x"}))
    with pytest.raises(attnhooks.StoreBusyError, match="pid 1 on elsewhere"):
        with attnhooks.capture(layer, store=path, mode="append"):
            pass
    os.utime(lease, (time.time() - 31, time.time() - 31))  # its last heartbeat: 31 s ago
    with attnhooks.capture(layer, store=path, mode="append"):
        encoder_step(layer)
    assert attnhooks.open_store(path).steps == [0, 1] and not os.path.exists(lease)


def test_the_holder_keeps_its_lease_fresh(tmp_path, layer, monkeypatch):
    monkeypatch.setenv("ATTNHOOKS_LEASE_TIMEOUT", "0.4")  # a heartbeat every 0.1 s
    path = tmp_path / "run.h5"
    with attnhooks.capture(layer, store=path):
        encoder_step(layer)
        first = read_holder(lease_path(str(path))).heartbeat
        time.sleep(0.6)
        holder = read_holder(lease_path(str(path)))
        assert holder.heartbeat > first and not holder.stale()
