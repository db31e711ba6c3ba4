"""Integrity (issue 18, cases 4 and 5): every chunk carries a checksum the reader verifies (Zarr's
crc32c codec, HDF5's fletcher32 filter), a chunk missing from a committed step is found missing, and
either is a StoreCorruptError naming the array, the step and the chunk, while the other steps read as
before. ``attnhooks verify`` lists the damaged steps without changing anything."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import attnhooks
from attnhooks.backends.base import Codec
from attnhooks.backends.stacks import StackedBackend
from attnhooks.cli import main
from tests.models import llama


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()


def _write(layer, path, steps=3, **kw):
    torch.manual_seed(1)
    with torch.no_grad(), attnhooks.capture(layer, store=path, every=1, **kw):
        for _ in range(steps):
            layer(torch.randn(1, 5, 16))
    return attnhooks.open_store(path)


def _chunk_files(folder):
    """The chunk files under an array's folder (keys ``c.0.1`` or, in older stores, ``c/0/1``)."""
    return sorted(
        os.path.join(d, f)
        for d, _, files in os.walk(folder)
        for f in files
        if os.path.relpath(os.path.join(d, f), folder)[:2] in ("c.", "c/")
    )


def _stored_at(path, array):
    """Where a module's ``array`` is stored: in a store of schema attnhooks/2 the small per-module
    arrays live in stacks (one module here, so the stack's chunks are the module's)."""
    with attnhooks.open_store(path) as st:
        members = st.backend.members() if isinstance(st.backend, StackedBackend) else []
        return next((stack for member, stack, _ in members if member == array), array)


def _zarr_chunk(path, array, position):
    array = _stored_at(path, array)
    found = [
        f
        for f in _chunk_files(os.path.join(path, array))
        if os.path.relpath(f, os.path.join(path, array)).replace("/", ".").startswith(f"c.{position}.")
    ]
    assert len(found) == 1, found
    return found[0]


def _scribble_hdf5_chunk(path, array, position):
    """Overwrite the bytes of the chunk at ``position`` (axis 0) of ``array`` with random bytes."""
    array = _stored_at(path, array)
    with h5py.File(path, "r") as f:
        ds = f[array]
        info = ds.id.get_chunk_info_by_coord((position,) + (0,) * (ds.ndim - 1))
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset)
        raw.write(np.random.default_rng(0).integers(0, 256, info.size, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_scribbled_q_chunk_is_refused_naming_array_step_and_chunk(tmp_path, layer, suffix):
    path = str(tmp_path / f"run{suffix}")
    st = _write(layer, path, record=("q", "k", "lse"), compression="none")
    module = st.modules[0]
    before = {step: st.attention(module, step, method="reconstructed") for step in st.steps}
    st.close()
    array = f"modules/{module}/q"
    if suffix == ".zarr":
        chunk = _zarr_chunk(path, array, 1)
        size = os.path.getsize(chunk)
        with open(chunk, "wb") as f:
            f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    else:
        _scribble_hdf5_chunk(path, array, 1)
    st = attnhooks.open_store(path)
    with pytest.raises(attnhooks.StoreCorruptError, match=r"array modules/self_attn/q, step 1, chunk\(s\) \(1,") as err:
        st.attention(module, 1, method="reconstructed")
    assert err.value.steps == (1,) and err.value.array == array
    for step in (0, 2):  # the other steps read exactly as before
        np.testing.assert_array_equal(st.attention(module, step, method="reconstructed"), before[step])
    report = attnhooks.verify(path)
    assert not report.ok and report.damaged_steps == [1], str(report)


def test_a_deleted_attn_chunk_is_missing_not_zeros(tmp_path, layer):
    path = str(tmp_path / "run.zarr")
    st = _write(layer, path, record="attn")
    module = st.modules[0]
    os.remove(_zarr_chunk(path, f"modules/{module}/attn", 2))
    st = attnhooks.open_store(path)
    with pytest.raises(attnhooks.StoreCorruptError, match=r"step 2, .*missing"):
        st.attention(module, 2)
    assert st.attention(module, 0).sum(-1) == pytest.approx(1.0)
    report = attnhooks.verify(path)
    assert report.damaged_steps == [2] and report.steps == 3 and "DAMAGED" in str(report)


def test_verify_on_the_cli_lists_damaged_steps_and_exits_1(tmp_path, layer, capsys):
    path = str(tmp_path / "run.zarr")
    _write(layer, path, record=("q", "k"))
    assert main(["verify", path]) == 0
    assert "no damage" in capsys.readouterr().out
    os.remove(_zarr_chunk(path, "modules/self_attn/k", 0))
    assert main(["repair", "--check", path]) == 1
    out, err = capsys.readouterr()
    assert "step 0" in out and "modules/self_attn/k missing" in out
    assert err.count("\n") == 1 and "damaged: step(s) [0]" in err
    assert os.path.exists(_zarr_chunk(path, "modules/self_attn/q", 0)), "--check changes nothing"


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_store_without_checksums_still_reads_and_says_so(tmp_path, layer, suffix):
    path = str(tmp_path / f"old{suffix}")
    st = _write(layer, path, record="attn", compression=Codec("none", 0, checksum=False))
    assert st.attention(st.modules[0], 1).shape == (2, 5, 5)
    report = attnhooks.verify(path)
    assert report.ok and not report.checksummed and "without checksums" in str(report)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_generation_with_row_windows_reads_back_whole(tmp_path, suffix):
    """Decode rows are written over their own keys only: the missing-chunk check must not take the
    keys a row never attended (and rows a window left out) for missing chunks."""
    torch.manual_seed(0)
    model = llama(impl="eager")
    x = torch.randint(1, 128, (1, 20))
    path = str(tmp_path / f"gen{suffix}")
    rows = [slice(0, 4), slice(30, 35)]
    with torch.no_grad(), attnhooks.capture(model, store=path, record=("attn", "q", "k", "lse"), rows=rows):
        model.generate(input_ids=x, max_new_tokens=20, do_sample=False, pad_token_id=0)
    report = attnhooks.verify(path)
    assert report.ok and report.checksummed and report.calls > 0, str(report)
    st = attnhooks.open_store(path)
    module = st.modules[0]
    p = st.attention(module, 0)
    assert p.shape[1] == 39 and np.allclose(p.sum(-1), 1.0, atol=1e-5)


def test_info_on_a_store_with_a_damaged_table_prints_one_line(tmp_path, layer, capsys):
    path = str(tmp_path / "run.zarr")
    _write(layer, path, steps=1)
    chunk = _chunk_files(os.path.join(path, _stored_at(path, "modules/self_attn/info")))[0]
    with open(chunk, "r+b") as f:
        f.write(b"\0" * 8)
    assert main(["info", path]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "modules/self_attn/info" in err and "Traceback" not in err


def test_a_chunk_deleted_from_a_url_store_is_missing(layer):
    """On fsspec URLs (here its memory file system) the chunks of an array are listed once, and a
    chunk the listing lacks is asked for on its own before it is called missing."""
    fsspec = pytest.importorskip("fsspec")
    url = "memory://integrity/run.zarr"
    st = _write(layer, url, record=("q", "k", "lse"))
    module = st.modules[0]
    fs = fsspec.filesystem("memory")
    q = _stored_at(url, "modules/self_attn/q")
    chunks = sorted(c for c in fs.find(f"/integrity/run.zarr/{q}") if not c.endswith("zarr.json"))
    assert len(chunks) == 3
    fs.rm(chunks[1])
    st = attnhooks.open_store(url)
    with pytest.raises(attnhooks.StoreCorruptError, match="step 1"):
        st.q(module, 1)
    assert st.q(module, 2).shape == (2, 5, 8)
    assert attnhooks.verify(url).damaged_steps == [1]
    fs.rm("/integrity", recursive=True)


def test_a_torn_rewrite_of_a_step_table_keeps_its_committed_entries(tmp_path, layer):
    """A per-step table's chunk is rewritten as steps are added (HDF5 writes it in place); a writer killed
    inside that write leaves the chunk half new, half old: the pages written hold the new entry, the rest
    (the end of the chunk, where fletcher32 kept its checksum) is old. Its committed entries are the same
    in both, so they must stay readable: the tables carry no checksum in HDF5, the record arrays do."""
    path = str(tmp_path / "run.h5")
    _write(layer, path, record=("q", "k", "lse")).close()
    with h5py.File(path, "r") as f:
        steps = f["steps"]
        assert not steps.fletcher32 and steps.chunks[0] > 1, "a table: chunks over many steps, no checksum"
        assert f[_stored_at(path, "modules/self_attn/q")].fletcher32
        info = steps.id.get_chunk_info(0)
        before = steps[:]
    with open(path, "r+b") as raw:  # the first page of the rewrite: the next step's entry (3) landed
        raw.seek(info.byte_offset + 3 * 8)
        raw.write(np.int64(3).tobytes())
    with attnhooks.open_store(path) as st:
        assert st.steps == [0, 1, 2] and np.array_equal(st.backend.read("steps")[:3], before[:3])
        assert st.attention("self_attn", 2, method="reconstructed").shape[-2:] == (5, 5)


def _left_open(path, eoa=None):
    """Mark the HDF5 file at ``path`` open for writing in SWMR mode, as a killed writer leaves it (its
    superblock's flags), with its end-of-allocation mark at ``eoa`` (None: left at the file's end)."""
    import struct

    from attnhooks.backends.hdf5eoa import lookup3

    with open(path, "r+b") as raw:
        head = bytearray(raw.read(44))
        assert head[8] == 3 and struct.unpack("<Q", head[28:36])[0] == os.path.getsize(path)
        head[11] = 5  # open for writing, in SWMR mode
        if eoa is not None:
            head[28:36] = struct.pack("<Q", eoa)
        raw.seek(0)
        raw.write(bytes(head) + struct.pack("<I", lookup3(bytes(head))))


def test_a_superblock_ending_before_the_data_is_read_amended_and_repaired(tmp_path, layer):
    """A writer killed in SWMR mode can leave the superblock's end-of-allocation mark (EOA) before blocks
    it wrote (seen once in ~300 kills under load): HDF5 then refuses every chunk past it ("addr overflow"),
    committed steps included. The reader reads the file through an amended superblock (nothing written),
    repair rewrites it; both show the committed steps bit for bit."""
    import struct

    path = str(tmp_path / "run.h5")
    st = _write(layer, path, record=("q", "k", "lse"), compression="none")
    before = {step: st.attention("self_attn", step, method="reconstructed") for step in st.steps}
    st.close()
    with h5py.File(path, "r") as f:
        q = f[_stored_at(path, "modules/self_attn/q")]
        last = max(q.id.get_chunk_info(i).byte_offset for i in range(q.id.get_num_chunks()))
    _left_open(path, eoa=last)  # the superblock a killed writer left: EOA before the last q chunk
    with open(path, "rb") as raw, h5py.File(raw, "r") as f, pytest.raises(OSError, match="addr overflow"):
        f[_stored_at(path, "modules/self_attn/q")][...]  # what HDF5 alone makes of it (as a reader opens it)
    with attnhooks.open_store(path) as st:
        for step in st.steps:
            np.testing.assert_array_equal(st.attention("self_attn", step, method="reconstructed"), before[step])
    report = attnhooks.repair(path)
    assert report.committed == 3 and "open-for-write flag (file rewritten)" in report.removed
    with open(path, "rb") as raw:
        assert struct.unpack("<Q", raw.read(36)[28:36])[0] == os.path.getsize(path)
    with attnhooks.open_store(path) as st:
        for step in st.steps:
            np.testing.assert_array_equal(st.attention("self_attn", step, method="reconstructed"), before[step])


def _tear_description(path, copy="/stacks"):
    """What a writer killed inside a rewrite of the stacks' description leaves (replaying a rewrite's writes
    one at a time showed it: the group's header and the heap of variable-length data are two writes, and
    either without the other reads as neither value): the size in the heap object of the description of the
    group ``copy`` (``/stacks`` or ``/stacks/spare``) no longer matches its header's. Both copies hold the same
    text: the object patched is the one that makes ``copy``'s fail."""
    import struct

    with h5py.File(path, "r") as f:
        text = f["stacks"].attrs["attnhooks_stack"].encode()
        assert f["stacks/spare"].attrs["attnhooks_stack"].encode() == text
    data, found = Path(path).read_bytes(), []
    while (at := data.find(text, found[-1] + 1 if found else 0)) >= 0:
        found.append(at)
    assert len(found) == 2, "two copies in the heap: the group's and the spare's"
    for at in found:
        size = struct.unpack("<Q", data[at - 8 : at])[0]
        assert size == len(text), "a heap object's size precedes its data"
        with open(path, "r+b") as raw:
            raw.seek(at - 8)
            raw.write(struct.pack("<Q", size - 1))
        with h5py.File(path, "r") as f:
            try:
                dict(f[copy].attrs)
            except OSError:
                return  # that copy torn (the other reads: checked by the caller)
        with open(path, "r+b") as raw:  # the other copy: put back, try the next
            raw.seek(at - 8)
            raw.write(struct.pack("<Q", size))
    raise AssertionError(f"no heap object tears the description of {copy}")


def test_a_torn_rewrite_of_the_stacks_description_reads_its_spare_copy(tmp_path, layer):
    """The stacks' description (one text attribute of the ``stacks`` group, rewritten at every commit that
    changes a member's shape) torn by a killed writer made every store with committed steps fail to open.
    Its spare copy, written and flushed before it, is read instead; repair leaves the torn one out and says
    so, and an append writes both again. Every step reads bit for bit as before."""
    path = str(tmp_path / "run.h5")
    st = _write(layer, path, record=("q", "k", "lse"), compression="none")
    before = {step: st.attention("self_attn", step, method="reconstructed") for step in st.steps}
    st.close()
    _tear_description(path)
    _left_open(path)
    with open(path, "rb") as raw, h5py.File(raw, "r") as f:
        with pytest.raises(OSError, match="global heap object size"):
            dict(f["stacks"].attrs)
        assert "q.0" in f["stacks/spare"].attrs["attnhooks_stack"]

    def same(st):
        assert st.steps == sorted(before)
        for step, value in before.items():
            np.testing.assert_array_equal(st.attention("self_attn", step, method="reconstructed"), value)

    with attnhooks.open_store(path) as st:
        same(st)
    report = attnhooks.repair(path)
    assert report.committed == 3
    said = [r for r in report.removed if "'attnhooks_stack' did not read" in r and "/stacks/spare is used" in r]
    assert said, report.removed
    with attnhooks.open_store(path) as st:
        same(st)
    with torch.no_grad(), attnhooks.capture(layer, store=path, mode="append"):
        layer(torch.randn(1, 7, 16))  # a longer step: the members' shapes change, the description is rewritten
    with h5py.File(path, "r") as f:
        assert f["stacks"].attrs["attnhooks_stack"] == f["stacks/spare"].attrs["attnhooks_stack"]
    with attnhooks.open_store(path) as st:
        assert st.steps == [0, 1, 2, 3] and st.q("self_attn", 3).shape[-2] == 7
        for step, value in before.items():
            np.testing.assert_array_equal(st.attention("self_attn", step, method="reconstructed"), value)


def test_a_torn_spare_description_is_left_out_by_repair(tmp_path, layer):
    """A writer killed while it rewrote the spare copy (the first of the two writes) left the stacks' own
    description as it was: readers use it, repair leaves the torn copy out and says so."""
    path = str(tmp_path / "run.h5")
    st = _write(layer, path, record=("q", "k", "lse"), compression="none")
    before = {step: st.q("self_attn", step) for step in st.steps}
    st.close()
    _tear_description(path, "/stacks/spare")
    _left_open(path)
    with attnhooks.open_store(path) as st:
        for step, value in before.items():
            np.testing.assert_array_equal(st.q("self_attn", step), value)
    report = attnhooks.repair(path)
    assert any(r.startswith("/stacks/spare: its attribute") and "/stacks is used" in r for r in report.removed)
    with attnhooks.open_store(path) as st, h5py.File(path, "r") as f:
        assert "attnhooks_stack" not in f["stacks/spare"].attrs
        for step, value in before.items():
            np.testing.assert_array_equal(st.q("self_attn", step), value)
