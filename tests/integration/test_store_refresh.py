"""``Store.refresh()`` shows what is committed now, on every backend (issue 18, case 7): a store
opened while it was being written shows the later steps and the final status after a refresh, and
a second ``open_store`` of the same HDF5 file in one process is not held to what the first read."""

from __future__ import annotations

import pytest

import attnhooks
from tests.models import encoder_step, tiny_encoder


@pytest.fixture(scope="module")
def layer():
    return tiny_encoder()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_refresh_shows_what_is_committed_now(tmp_path, layer, suffix):
    path = tmp_path / f"run{suffix}"
    with attnhooks.capture(layer, store=path, every=1) as cap:
        encoder_step(layer)
        cap.flush()
        first = attnhooks.open_store(path)
        assert first.steps == [0] and first.status == "writing"
        encoder_step(layer)
        cap.flush()
        first.refresh()
        assert first.steps == [0, 1] and first.status == "writing"
    first.refresh()
    assert first.steps == [0, 1] and first.status == "complete"
    second = attnhooks.open_store(path)  # the first is still open
    assert second.steps == [0, 1] and second.status == "complete"
    module = second.modules[0]
    assert second.attention(module, 1).shape == first.attention(module, 1).shape == (2, 3, 3)
    first.close()
    second.close()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_reader_opened_before_an_append_sees_it_after_refresh(tmp_path, layer, suffix):
    path = tmp_path / f"run{suffix}"
    with attnhooks.capture(layer, store=path):
        encoder_step(layer)
    reader = attnhooks.open_store(path)
    assert reader.steps == [0]
    with attnhooks.capture(layer, store=path, mode="append"):
        encoder_step(layer)
    assert attnhooks.open_store(path).steps == [0, 1]
    reader.refresh()
    assert reader.steps == [0, 1] and reader.status == "complete"
    reader.close()
