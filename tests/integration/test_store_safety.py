"""A store never replaces what attnhooks did not write, and a refused option leaves nothing on disk
(issue 18, first cases): ``mode="overwrite"`` refuses a folder or file that is not an attnhooks
store, leaving it untouched; a codec the backend cannot write is refused before the store exists,
so the retry with a fixed option is not refused as an existing store."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import zarr

import attnhooks


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()


def _capture(layer, store, **kw):
    with torch.no_grad(), attnhooks.capture(layer, store=store, **kw):
        layer(torch.randn(1, 3, 8))


def test_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path, layer):
    folder = tmp_path / "mydata.zarr"
    folder.mkdir()
    (folder / "precious.txt").write_text("years of work")
    with pytest.raises(attnhooks.StoreExistsError, match="not an attnhooks store"):
        _capture(layer, folder, mode="overwrite")
    assert (folder / "precious.txt").read_text() == "years of work"


def test_overwrite_refuses_a_zarr_store_attnhooks_did_not_write(tmp_path, layer):
    path = tmp_path / "theirs.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3, attributes={"experiment": "A"})
    group.create_array("data", shape=(3,), dtype="float32")[:] = np.arange(3, dtype=np.float32)
    with pytest.raises(attnhooks.StoreExistsError, match="did not write"):
        _capture(layer, path, mode="overwrite")
    assert zarr.open_group(str(path), mode="r").attrs["experiment"] == "A"


@pytest.mark.parametrize("content", ["hdf5", "text"])
def test_overwrite_refuses_an_hdf5_path_holding_something_else(tmp_path, layer, content):
    path = tmp_path / "theirs.h5"
    if content == "hdf5":
        with h5py.File(path, "w") as f:
            f["data"] = np.arange(4)
    else:
        path.write_text("not even HDF5")
    before = path.read_bytes()
    with pytest.raises(attnhooks.StoreExistsError):
        _capture(layer, path, mode="overwrite")
    assert path.read_bytes() == before


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_overwrite_still_replaces_an_attnhooks_store(tmp_path, layer, suffix):
    path = tmp_path / f"run{suffix}"
    _capture(layer, path)
    _capture(layer, path, mode="overwrite", every=1)
    st = attnhooks.open_store(path)
    assert st.steps == [0] and st.status == "complete"


@pytest.mark.parametrize(("suffix", "codec"), [(".zarr", "lzf"), (".h5", "blosc")])
def test_a_codec_the_backend_cannot_write_is_refused_before_the_store_exists(tmp_path, layer, suffix, codec):
    path = tmp_path / f"run{suffix}"
    with pytest.raises(attnhooks.StoreOptionError, match=codec):
        _capture(layer, path, compression=codec)
    assert not path.exists(), "nothing is created for a refused option"
    _capture(layer, path, compression="gzip")  # the retry with a fixed option: not 'already exists'
    assert attnhooks.open_store(path).steps == [0]


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_step_id_is_used_once(tmp_path, layer, suffix):
    path = tmp_path / f"run{suffix}"
    with torch.no_grad(), attnhooks.capture(layer, store=path, keep=True) as cap:
        cap.step = 3
        layer(torch.randn(1, 3, 8))
        layer(torch.randn(1, 3, 8))  # a second forward under the same assignment: call 1 of step 3
        cap.step = 4
        cap.step = 4  # assigning a step again before it ran is fine
        layer(torch.randn(1, 3, 8))
        with pytest.raises(attnhooks.CaptureStateError, match="step 3 was captured already"):
            cap.step = 3
        layer(torch.randn(1, 3, 8))  # still step 4
    st = attnhooks.open_store(path)
    assert st.steps == [3, 4]
    assert st.calls(st.modules[0], 3) == 2 and st.calls(st.modules[0], 4) == 2


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_step_id_the_appended_store_holds_is_refused(tmp_path, layer, suffix):
    path = tmp_path / f"run{suffix}"
    with torch.no_grad(), attnhooks.capture(layer, store=path) as cap:
        for step in (0, 1):
            cap.step = step
            layer(torch.randn(1, 3, 8))
    with torch.no_grad(), attnhooks.capture(layer, store=path, mode="append") as cap:
        with pytest.raises(attnhooks.CaptureStateError, match="holds step 1 already"):
            cap.step = 1
        cap.step = 2
        layer(torch.randn(1, 3, 8))
    assert attnhooks.open_store(path).steps == [0, 1, 2]


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_capture_that_fails_before_its_first_step_leaves_no_store(tmp_path, layer, suffix):
    """A buffer too small for one call is only known at the first call: the store made at the
    start is removed again, so the retry with a fixed buffer is not refused as existing."""
    path = tmp_path / f"b{suffix}"
    with pytest.raises(attnhooks.StoreOptionError, match="buffer"):
        _capture(layer, path, buffer=10)
    assert not path.exists()
    _capture(layer, path)
    assert attnhooks.open_store(path).steps == [0]


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_failure_after_a_committed_step_keeps_the_store(tmp_path, layer, suffix):
    path = tmp_path / f"b{suffix}"
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), attnhooks.capture(layer, store=path) as cap:
        layer(torch.randn(1, 3, 8))
        cap.flush()
        raise RuntimeError("boom")
    assert attnhooks.open_store(path).steps == [0]
